"""Stage one on dask.distributed: one task per pending block, the teachers loaded once per worker.

``kdcache teach --cluster local:N`` starts N worker processes on this machine (one per GPU:
``dask_cuda.LocalCUDACluster`` when dask-cuda is installed and GPUs are present, else a
``LocalCluster`` with one thread per worker); ``--scheduler tcp://HOST:PORT`` joins a running
cluster whose workers (``dask worker`` / ``dask cuda worker``) can all reach the store.

The driver (this process) does exactly what the single-process run does before and after the
loop: validate and build the job (``prepare``), take the store's driver lock, create or resume
the store and its teachers' arrays (``open_store_for``: metadata is written once, here), and at
the end write the summary attrs (``finish``). In between it submits ``label_block_task`` for every
(view, shard) block that some teacher still lacks, with ``retries=2``; a task is the same
``label_blocks`` call the single-process loop makes, restricted to one block, so a worker writes
that block's whole-shard regions, stats, checksum and finally its ``done`` flag. A killed worker's
task is rescheduled by dask; a killed driver is resumed by rerunning the same command (only blocks
whose ``done`` flag is unset are submitted again). Identical configs give identical stores, whether
run in one process or across any number of workers.

Task granularity: one (view, shard) block per task, not one shard with all its views. A block is
already the unit of writing (exactly one shard of every per-view array), of ``done`` flags and of
resuming, so a block task needs no bookkeeping of its own; it spreads a store with few shards and
many views (a small dataset, ``--views 162``) over many workers; and a failure or retry costs one
block, not ``views`` blocks. The price is per-task overhead (open the store, read the view
parameters and the manifest, start a loader), which a block of ``shard_rows`` rows (64k by default,
minutes of GPU time) amortises; use smaller ``--shard-rows`` only for small data.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kdcache.stores.errors import KdcacheError, SpecError, StoreError
from kdcache.stores.lock import DriverLock
from kdcache.stores.logit_store import LogitStore, open_location
from kdcache.teach import (
    Job,
    TeachConfig,
    discard_if_nothing_done,
    finish,
    label_blocks,
    open_store_for,
    pending_blocks,
    prepare,
)

# zarr's own concurrency inside a worker that already runs one task per process (zarr docs,
# "Using Zarr with Dask": total concurrency ~ dask threads x zarr async.concurrency).
WORKER_ZARR_CONFIG = {"async.concurrency": 4, "threading.max_workers": 4}
# DataLoader workers inside tasks need non-daemonic dask worker processes (docs/scaling.md).
# dask's nanny also starts workers with MALLOC_TRIM_THRESHOLD_=65536, which pins glibc's mmap
# threshold: every large torch allocation becomes an mmap/munmap pair, and CPU inference ran 1.8x
# slower here (1.7 s -> 3.2 s, benchmarks/scaling.py workload). Unset it for the workers we start.
DASK_CONFIG = {"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
TASK_RETRIES = 2
TASK_PREFIX = "kdcache-teach-block"


# ---------------------------------------------------------------------------------- cluster


def parse_cluster(spec: str) -> int:
    """'local:N' -> N (worker processes on this machine)."""
    kind, _, n = spec.partition(":")
    if kind != "local" or not n.isdigit() or int(n) < 1:
        raise SpecError(f"--cluster must be local:N with N >= 1 worker processes (one per GPU); got '{spec}'. "
                        "To use an existing cluster pass --scheduler tcp://HOST:PORT instead")
    return int(n)


def cuda_cluster_available() -> bool:
    """dask-cuda installed and CUDA GPUs visible: then local:N means one worker per GPU."""
    if importlib.util.find_spec("dask_cuda") is None:
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def start_local_cluster(n_workers: int, **kwargs):
    """N single-threaded, non-daemonic worker processes on this machine (LocalCUDACluster on GPUs).

    Sets ``DASK_CONFIG`` for the rest of this process, not just while starting: the nannies live
    here and read it again whenever they restart a worker that died."""
    import dask
    from distributed import LocalCluster

    dask.config.set(DASK_CONFIG)
    if cuda_cluster_available():
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(n_workers=n_workers, threads_per_worker=1, **kwargs)
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, **kwargs)


@contextmanager
def connect(cluster: str | None, scheduler: str | None) -> Iterator[Any]:
    """A dask Client on a new local cluster (``local:N``) or an existing scheduler."""
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except ValueError as err:
            raise SpecError(f"--scheduler {scheduler!r} is not a scheduler address ({err}); "
                            "pass one like tcp://HOST:8786") from None
        except (OSError, TimeoutError) as err:
            raise KdcacheError(f"cannot reach the dask scheduler at {scheduler} ({type(err).__name__}: {err}); "
                               "start one with `dask scheduler` and workers with `dask worker`") from None
        with client:
            yield client
        return
    assert cluster is not None
    with start_local_cluster(parse_cluster(cluster)) as lc, Client(lc) as client:
        yield client


def dashboard_line(client) -> str:
    """'dask: 2 workers, dashboard http://...' (and what to do when something is missing)."""
    n = len(client.scheduler_info().get("workers", {}))
    workers = f"{n} worker{'s' if n != 1 else ''}" if n else "no workers yet (waiting for `dask worker`s to join)"
    line = f"dask: {workers}, dashboard {client.dashboard_link}"
    if importlib.util.find_spec("bokeh") is None:
        line += " (pip install bokeh for its graphical pages)"
    return line


# ---------------------------------------------------------------------------------- worker side

_JOB_LOCK = threading.Lock()
_JOB: tuple[str, Job] | None = None  # (config key, job): the dataset and teachers this worker holds
_ZARR_CONFIGURED = False
_THREAD = threading.local()  # torch's intra-op thread count is per calling thread (OpenMP)


def job_key(cfg: TeachConfig) -> str:
    """What a worker's job depends on: the config minus where the store is and how it is opened."""
    d = dataclasses.asdict(cfg)
    for name in ("out", "overwrite", "break_lock"):
        d.pop(name, None)
    return json.dumps(d, sort_keys=True, default=str)


def worker_job(cfg: TeachConfig) -> tuple[Job, bool]:
    """Load the dataset and teachers once per worker process and keep them for every later task
    of the same config (one slot: a new config frees the previous teachers' memory). Also returns
    whether this call loaded them."""
    global _JOB
    key = job_key(cfg)
    with _JOB_LOCK:  # a worker with several threads must not load the teacher twice
        loaded = _JOB is None or _JOB[0] != key
        if loaded:
            _JOB = None
            _JOB = (key, prepare(copy.deepcopy(cfg)))
        return dataclasses.replace(_JOB[1], cfg=cfg), loaded


def _configure_worker(torch_threads: int | None) -> None:
    """zarr's concurrency once per process; torch's threads once per executor thread (dask's
    nanny starts workers with OMP_NUM_THREADS=1, and a set_num_threads from another thread, e.g.
    ``client.run``, does not reach the thread that runs tasks)."""
    global _ZARR_CONFIGURED
    if not _ZARR_CONFIGURED:
        import zarr

        zarr.config.set(WORKER_ZARR_CONFIG)
        _ZARR_CONFIGURED = True
    if torch_threads and getattr(_THREAD, "torch_threads", None) != torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
        _THREAD.torch_threads = torch_threads


def _worker_device(device: str) -> str:
    """On a plain LocalCluster over several GPUs (no dask-cuda), worker i takes GPU i mod count."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ValueError, TypeError):
        return device
    return f"cuda:{index % torch.cuda.device_count()}"


def label_block_task(cfg: TeachConfig, view: int, shard: int, torch_threads: int | None = None) -> dict[str, Any]:
    """One dask task: label block (view, shard) for every teacher that lacks it, in this worker.

    Idempotent: a block rewritten after a retry gets the same bytes; the done flag is set last by
    ``LogitStore.write_block``. Returns small metadata only, never arrays."""
    _configure_worker(torch_threads)
    cfg = dataclasses.replace(cfg, device=_worker_device(cfg.device))
    start = time.perf_counter()
    job, teacher_loaded = worker_job(cfg)
    loaded = time.perf_counter()
    store = LogitStore.open(cfg.out, mode="r+")
    if job.dataset.fingerprint() != store.attrs["dataset"]["fingerprint"]:  # hashed once per worker
        raise StoreError(f"worker {socket.gethostname()}: dataset '{cfg.dataset}' ({cfg.split}) differs from the "
                         f"data {cfg.out} was cached from (fingerprint); every worker must see the same data "
                         "at the same path")
    rows = label_blocks(job, store, [(view, shard)])
    return {"view": view, "shard": shard, "rows": rows, "load_s": loaded - start, "teacher_loaded": teacher_loaded,
            "label_s": time.perf_counter() - loaded, "worker": f"{socket.gethostname()}:{os.getpid()}"}


# ---------------------------------------------------------------------------------- driver


def _shared_location(cfg: TeachConfig) -> str:
    """The store URL as workers must see it: absolute for local paths, refused for memory://."""
    fs, root, _ = open_location(cfg.out, read_only=True)
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if "memory" in protocols:
        raise SpecError(f"{cfg.out} lives in this process's memory, which dask workers cannot see; "
                        "with --cluster/--scheduler use a path on shared disk or an object-store URL")
    if "file" in protocols or "local" in protocols:
        return root  # absolute: workers may run in another directory
    return cfg.out


def run_teach_distributed(
    cfg: TeachConfig,
    cluster: str | None = None,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    torch_threads: int | None = None,
) -> LogitStore:
    """Stage one on dask: ``cluster='local:N'`` or ``scheduler='tcp://HOST:PORT'`` (exactly one).

    ``progress(rows_done, rows_total)`` is called as blocks finish; ``log`` gets one-line notes
    (the dashboard link). ``torch_threads``: CPU threads per task (default: cores // N for
    ``local:N``; for ``scheduler`` the workers' own setting, 1 under dask's nanny). Returns the
    finished store, open in "r+"."""
    if (cluster is None) == (scheduler is None):
        raise SpecError("pass exactly one of --cluster local:N (start workers here) or "
                        "--scheduler tcp://HOST:PORT (use a running cluster)")
    n_local = parse_cluster(cluster) if cluster is not None else None
    cfg = dataclasses.replace(cfg, out=_shared_location(cfg))
    # The driver validates the config, checks every teacher's head and creates the store, but
    # labels nothing: it builds the teachers on the CPU, leaving the GPUs to the workers.
    job = prepare(dataclasses.replace(cfg, device="cpu"))
    worker_cfg = dataclasses.replace(job.cfg, device=cfg.device)  # validated (e.g. temperatures)
    if torch_threads is None and n_local:
        torch_threads = max(1, (os.cpu_count() or 1) // n_local)
    with DriverLock(cfg.out, break_lock=cfg.break_lock) as lock, discard_if_nothing_done(lock):
        store = open_store_for(job)
        names = [t.name for t in job.teachers]
        todo = pending_blocks(store, names)
        if todo:
            _run_blocks(store, worker_cfg, todo, cluster, scheduler, torch_threads, progress, log)
        missing = pending_blocks(store, names)
        if missing:
            raise StoreError(f"{len(missing)} block(s) of {cfg.out} are still not done after the run (first: "
                             f"view {missing[0][0]} shard {missing[0][1]}); rerun the same command to finish them")
        finish(store, job)
    return store


def _run_blocks(store: LogitStore, cfg: TeachConfig, todo: list[tuple[int, int]], cluster: str | None,
                scheduler: str | None, torch_threads: int | None,
                progress: Callable[[int, int], None] | None, log: Callable[[str], None] | None) -> None:
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    bounds = {block: store.shard_bounds(block[1]) for block in todo}
    sizes = {block: stop - start for block, (start, stop) in bounds.items()}
    total = sum(sizes.values())
    with connect(cluster, scheduler) as client:
        if log:
            log(dashboard_line(client))
        views, shards = zip(*todo, strict=True)
        futures = client.map(label_block_task, [cfg] * len(todo), views, shards, [torch_threads] * len(todo),
                             key=TASK_PREFIX, pure=False, retries=TASK_RETRIES)
        block_of = {f.key: block for f, block in zip(futures, todo, strict=True)}
        done_rows, workers, loads = 0, set(), 0
        if progress:
            progress(0, total)
        try:
            for future in as_completed(futures):
                block = block_of[future.key]
                try:
                    result = future.result()
                    workers.add(result["worker"])
                    loads += result["teacher_loaded"]
                except KilledWorker as err:
                    raise StoreError(
                        f"view {block[0]} shard {block[1]}: its worker died repeatedly ({err}); the finished "
                        "blocks are kept, rerun the same command to resume (check the workers' memory/logs)"
                    ) from None
                except FutureCancelledError:
                    raise StoreError(f"view {block[0]} shard {block[1]}: the task was cancelled (cluster shut "
                                     "down?); rerun the same command to resume") from None
                done_rows += sizes[block]
                if progress:
                    progress(done_rows, total)
        finally:
            client.cancel([f for f in futures if not f.done()])
        if log:
            log(f"labelled {len(todo)} block(s) on {len(workers)} worker(s); teachers loaded {loads} time(s)")
