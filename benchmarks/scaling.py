"""Stage-one scaling: `kdcache teach` in one process vs on a dask LocalCluster with 1 and 2 workers.

Same config, fresh store per run; throughput = records (rows x views) / wall time of the whole
driver call (prepare + store creation + labelling + summary attrs), so all rows are comparable:

- ``single``: ``run_teach`` in this process with torch's default intra-op threads (all cores).
- ``single_1thread``: the same with one torch thread: the baseline for per-worker scaling.
- ``single_per_block_1thread``: one thread, one ``label_blocks`` call per block as a dask task
  makes it, but no dask: separates the cost of block-sized tasks from the cost of dask.
- ``dask1_warm`` / ``dask2_warm``: ``run_teach_distributed(scheduler=...)`` on a LocalCluster from
  ``start_local_cluster(n)``, warmed by one untimed run so every worker holds the teacher (the
  steady state of a long job), one torch thread per worker (``--worker-threads``).
- ``dask1_cold`` / ``dask2_cold``: ``run_teach_distributed(cluster="local:n")``, the CLI path,
  cluster start, worker imports and teacher loading included (what a short job pays).

Why one thread per worker: on this shared 2-core box, a 2-thread torch process collapses when
other processes hold a core (an OpenMP team waits for its descheduled thread; measured 5-15x
slower), so multi-thread rows measure the neighbours more than kdcache. Repeats are interleaved
and medians reported; the load average after each repeat is in the JSON.

    .venv/bin/python benchmarks/scaling.py --out benchmarks/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kdcache.distributed import run_teach_distributed, start_local_cluster
from kdcache.teach import TeachConfig, finish, label_blocks, open_store_for, pending_blocks, prepare, run_teach

ROOT = Path(__file__).resolve().parents[1]


def make_config(args, out: Path) -> TeachConfig:
    return TeachConfig(dataset=args.dataset, split=args.split, teachers=[args.teacher], out=str(out), k=args.k,
                       views=args.views, view_policy="crop-flip", image_size=args.image_size,
                       shard_rows=args.shard_rows, chunk_rows=args.shard_rows, batch_size=args.batch_size,
                       device="cpu")


def run_per_block(cfg: TeachConfig):
    job = prepare(cfg)
    store = open_store_for(job)
    for block in pending_blocks(store, [t.name for t in job.teachers]):
        label_blocks(job, store, [block])
    finish(store, job)
    return store


def timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--split", default="train")
    ap.add_argument("--teacher", default="torchvision:resnet18:none")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="LocalCluster sizes to measure")
    ap.add_argument("--worker-threads", type=int, default=1, help="torch threads per dask worker")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (cluster start included) runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "scaling.json"))
    args = ap.parse_args()
    sizes = [int(n) for n in args.workers.split(",")]
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-scaling-"))
    counter = iter(range(10**6))

    def fresh() -> Path:
        return tmp / f"s{next(counter)}.kdc"

    from distributed import Client

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"single": [], "single_1thread": [], "single_per_block_1thread": [],
                                     **{f"dask{n}_warm": [] for n in sizes}}
    wt = args.worker_threads
    threads = torch.get_num_threads()
    load_per_repeat: list[float] = []
    records = None
    clusters = {n: start_local_cluster(n, dashboard_address=":0") for n in sizes}
    try:
        for n, cluster in clusters.items():  # warm: every worker imports torch and loads the teacher
            with Client(cluster) as client:
                client.wait_for_workers(n)
            run_teach_distributed(make_config(args, fresh()), scheduler=cluster.scheduler_address,
                                  torch_threads=wt)
        run_teach(make_config(args, fresh()))  # warm this process too
        for r in range(args.repeats):
            seconds, store = timed(lambda: run_teach(make_config(args, fresh())))
            times["single"].append(seconds)
            records = store.num_rows * store.num_views
            torch.set_num_threads(1)
            times["single_1thread"].append(timed(lambda: run_teach(make_config(args, fresh())))[0])
            times["single_per_block_1thread"].append(timed(lambda: run_per_block(make_config(args, fresh())))[0])
            torch.set_num_threads(threads)
            for n, cluster in clusters.items():
                seconds, _ = timed(lambda c=cluster: run_teach_distributed(
                    make_config(args, fresh()), scheduler=c.scheduler_address, torch_threads=wt))
                times[f"dask{n}_warm"].append(seconds)
            load_per_repeat.append(round(os.getloadavg()[0], 2))
            print(f"repeat {r} (load {load_per_repeat[-1]}): "
                  + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    finally:
        for cluster in clusters.values():
            cluster.close()
    if not args.no_cold:
        for n in sizes:
            seconds, _ = timed(lambda n=n: run_teach_distributed(make_config(args, fresh()), cluster=f"local:{n}",
                                                                 torch_threads=wt))
            times[f"dask{n}_cold"] = [seconds]
            print(f"cold local:{n}: {seconds:.2f}s", flush=True)
    load_after = os.getloadavg()
    shutil.rmtree(tmp, ignore_errors=True)

    rate = {name: records / statistics.median(v) for name, v in times.items()}
    result = {
        "what": "stage-one records/s (rows x views): one process vs dask LocalCluster workers, same config",
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu_cores": cores, "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads_single_process": threads, "torch_threads_per_dask_worker": wt, "device": "cpu",
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after],
                    "load_average_1min_after_each_repeat": load_per_repeat},
        "workload": {"dataset": f"{args.dataset}:{args.split}", "teacher": args.teacher, "k": args.k,
                     "views": args.views, "image_size": args.image_size, "shard_rows": args.shard_rows,
                     "batch_size": args.batch_size, "records": records,
                     "blocks": records and -(-records // args.views // args.shard_rows) * args.views},
        "seconds": {name: [round(s, 3) for s in v] for name, v in times.items()},
        "records_per_s": {name: round(v, 1) for name, v in rate.items()},
        "ratio_to_single": {name: round(v / rate["single"], 3) for name, v in rate.items() if name != "single"},
        "ratio_to_single_1thread": {name: round(v / rate["single_1thread"], 3) for name, v in rate.items()
                                    if name not in ("single", "single_1thread")},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("records_per_s", "ratio_to_single", "ratio_to_single_1thread")},
                     indent=2))


if __name__ == "__main__":
    main()
