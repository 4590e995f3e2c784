"""Stage one on a real dask.distributed LocalCluster (2 worker processes, CPU).

Each claim is checked against a single-process run of the same config: equal stores (every array,
checksums and block stats included) after a plain run, after a worker process dies mid-task, and
after the driver is SIGKILLed and the command rerun. Plus the driver lock: a second driver is
refused with a message naming the holder; a stale lock (dead pid) is taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from helpers import ROOT, TEACHER, assert_same_arrays, runner, wait_for_done

from kdcache.cli.main import app
from kdcache.distributed import job_key, parse_cluster, run_teach_distributed, start_local_cluster
from kdcache.stores.errors import SpecError
from kdcache.stores.lock import LOCK_NAME, StoreLockedError, read_lock
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import TeachConfig, run_teach

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
CRASHY = "crashy_teacher:crash_once_teacher"


def config(out: Path | str, **kw) -> TeachConfig:
    """digits test split (360 rows), 2 crop-flip views, 64-row shards: 6 shards x 2 views = 12 blocks."""
    base = dict(dataset="digits", split="test", teachers=[TEACHER], out=str(out), k=5, views=2,
                view_policy="crop-flip", shard_rows=64, chunk_rows=64, batch_size=32)
    return TeachConfig(**{**base, **kw})


def assert_same_store(a: Path | str, b: Path | str) -> None:
    """Every array equal (checksums and block stats included), and the same summaries."""
    x = assert_same_arrays(a, b)
    assert any(k.endswith("/checksum") for k in x) and any(k.endswith("/block_stats") for k in x)
    sa, sb = LogitStore.open(str(a)), LogitStore.open(str(b))
    for name in sa.teachers:
        assert sa.teacher_attrs(name)["summary"] == sb.teacher_attrs(name)["summary"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """In-process reference runs on one thread, like each worker: on a shared 2-core box a 2-thread
    torch process stalls whenever a neighbour holds a core (10x slower runs were measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def arm_file(tmp_path_factory) -> Path:
    """Set before the cluster starts, so its worker processes inherit the variable."""
    from crashy_teacher import ARM_ENV

    path = tmp_path_factory.mktemp("crash") / "arm"
    os.environ[ARM_ENV] = str(path)
    yield path
    os.environ.pop(ARM_ENV, None)


@pytest.fixture(scope="module")
def scheduler(arm_file) -> str:
    """One 2-worker LocalCluster for the module, joined with --scheduler / scheduler=."""
    from distributed import Client

    with start_local_cluster(2, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        assert all(not d for d in client.run(lambda: multiprocessing.current_process().daemon).values()), \
            "workers must be non-daemonic so DataLoader workers can run inside tasks"
        trim = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert "65536" not in trim.values(), "dask's malloc trim setting slows torch down 1.8x; it is unset"
        yield cluster.scheduler_address


def test_two_workers_write_the_single_process_store(tmp_path, scheduler):
    single = run_teach(config(tmp_path / "single.kdc"))
    blocks, logs = [], []
    dist = run_teach_distributed(config(tmp_path / "dist.kdc"), scheduler=scheduler, log=logs.append,
                                 progress=lambda done, total: blocks.append((done, total)))
    assert dist.done("resnet18").all() and dist.verify() == []
    assert blocks[-1] == (720, 720) and len(blocks) == 13  # 0, then once per block
    summary = next(line for line in logs if line.startswith("labelled 12 block(s) on "))
    loads = int(summary.split("teachers loaded ")[1].split(" ")[0])
    assert loads <= 2, f"each of the 2 workers loads the teacher at most once for 12 blocks: {summary}"
    assert_same_store(single.url, dist.url)
    assert read_lock(dist.url) is None, "the driver releases its lock"


def test_a_rerun_submits_only_the_unfinished_blocks(tmp_path, scheduler):
    """Blocks whose done flag is unset (as a crash leaves them) are relabelled; nothing else is submitted."""
    reference = run_teach(config(tmp_path / "reference.kdc"))
    run_teach(config(tmp_path / "resumed.kdc"))
    redo = [(0, 1), (1, 5)]  # (view, shard); shard 5 is the short last one (360 = 5 x 64 + 40)
    group = zarr.open_group(str(tmp_path / "resumed.kdc"), mode="r+")
    for view, shard in redo:  # as a crash leaves a block: data not (all) written, done flag unset
        group["teachers/resnet18/done"][view, shard] = False
        group["teachers/resnet18/values"][view, shard * 64:(shard + 1) * 64] = 0
    logs, totals = [], set()
    store = run_teach_distributed(config(tmp_path / "resumed.kdc"), scheduler=scheduler, log=logs.append,
                                  progress=lambda d, total: totals.add(total))
    assert totals == {64 + 40}, "progress counts only the pending blocks' rows"
    assert any(line.startswith("labelled 2 block(s) on ") for line in logs), logs
    assert any(line.startswith("dask: 2 workers, dashboard http") for line in logs), "the dashboard link is printed"
    assert store.done("resnet18").all() and store.verify() == []
    assert_same_store(reference.url, store.url)


def test_a_worker_killed_mid_task_is_retried(tmp_path, scheduler, arm_file):
    from distributed import Client

    with Client(scheduler) as client:
        before = set(client.run(os.getpid).values())
    arm_file.touch()
    cfg = dict(teachers=[CRASHY], k=3)
    dist = run_teach_distributed(config(tmp_path / "dist.kdc", **cfg), scheduler=scheduler)
    assert not arm_file.exists(), "a worker must have died"
    with Client(scheduler) as client:
        client.wait_for_workers(2, timeout=60)
        after = set(client.run(os.getpid).values())
        daemons = client.run(lambda: multiprocessing.current_process().daemon)
    assert before - after, "one worker process was replaced"
    assert not any(daemons.values()), "a restarted worker must be non-daemonic too (DataLoader workers)"
    assert dist.verify() == [] and dist.done("crash_once_teacher").all()
    assert_same_store(run_teach(config(tmp_path / "single.kdc", **cfg)).url, dist.url)


def test_dataloader_workers_run_inside_tasks(tmp_path, scheduler):
    cfg = config(tmp_path / "w.kdc", views=1, shard_rows=180, chunk_rows=60, workers=1)
    dist = run_teach_distributed(cfg, scheduler=scheduler)
    assert dist.done("resnet18").all() and dist.verify() == []


def test_driver_sigkill_then_rerun_resumes_to_the_same_store(tmp_path, scheduler):
    args = ["teach", "digits", "--split", "test", "--teacher", TEACHER, "--k", "4", "--views", "4",
            "--view-policy", "crop-flip", "--shard-rows", "32", "--chunk-rows", "32", "--batch-size", "32"]  # 48 blocks
    killed = tmp_path / "killed.kdc"
    cmd = [sys.executable, "-m", "kdcache.cli", *args, "--out", str(killed), "--cluster", "local:2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_done(killed, 4, proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers notice and exit
        proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that session still alive
    holder = read_lock(killed)
    assert holder is not None and holder.pid == proc.pid, "the killed driver leaves its lock behind"
    partial = LogitStore.open(str(killed)).done("resnet18")
    assert 0 < partial.sum() < partial.size, "killed mid-run"

    res = runner.invoke(app, [*args, "--out", str(killed), "--scheduler", scheduler])  # same command, resumed
    assert res.exit_code == 0, res.output
    assert read_lock(killed) is None
    clean = tmp_path / "clean.kdc"
    res = runner.invoke(app, [*args, "--out", str(clean)])  # uninterrupted, single process
    assert res.exit_code == 0, res.output
    assert_same_store(killed, clean)
    assert LogitStore.open(str(killed)).verify() == []


@pytest.fixture
def lock_holder(tmp_path):
    """A live process on this host holding the lock of tmp_path/held.kdc (another driver)."""
    out = tmp_path / "held.kdc"
    code = ("import sys, time; from kdcache.stores.lock import DriverLock; DriverLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_driver_is_refused_then_a_dead_holder_is_taken_over(lock_holder, scheduler):
    out, proc = lock_holder
    for driver in ("single", "dask"):
        if driver == "single":
            res = runner.invoke(app, ["teach", "digits", "--split", "test", "--teacher", TEACHER, "--k", "3",
                                      "--out", str(out)])
            assert res.exit_code == 2, res.output
            lines = [line for line in res.output.splitlines() if line.strip()]
            assert len(lines) == 1, res.output
            message = lines[0]
        else:
            with pytest.raises(StoreLockedError) as err:
                run_teach_distributed(config(out), scheduler=scheduler)
            message = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert "--break-lock" in message and str(out / LOCK_NAME) in message
    assert not LogitStore.exists(out), "a refused driver writes nothing"

    proc.kill()  # the holder dies without releasing: its lock is stale now
    proc.wait()
    store = run_teach_distributed(config(out), scheduler=scheduler)
    assert store.done("resnet18").all() and read_lock(out) is None


def test_a_lock_from_another_host_needs_break_lock(tmp_path):
    out = tmp_path / "remote.kdc"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"host": "gpu-node-7", "pid": 4242, "started": "2026-01-01T00:00:00Z", '
                                 '"command": "kdcache teach ...", "token": "abc"}')
    args = ["teach", "digits", "--split", "test", "--teacher", TEACHER, "--k", "3", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "pid 4242 on host gpu-node-7" in res.output and "--break-lock" in res.output
    res = runner.invoke(app, [*args, "--break-lock"])
    assert res.exit_code == 0, res.output
    assert LogitStore.open(str(out)).done("resnet18").all() and not (out / LOCK_NAME).exists()


def test_bad_cluster_specs_and_memory_stores_are_refused_before_any_work(tmp_path):
    for bad in ("local", "local:0", "remote:2", "local:x"):
        with pytest.raises(SpecError, match="local:N"):
            parse_cluster(bad)
    with pytest.raises(SpecError, match="exactly one"):
        run_teach_distributed(config(tmp_path / "a.kdc"))
    res = runner.invoke(app, ["teach", "digits", "--split", "test", "--teacher", TEACHER,
                              "--out", "memory://dist.kdc", "--cluster", "local:2"])
    assert res.exit_code == 2 and "memory" in res.output and "shared disk" in res.output
    res = runner.invoke(app, ["teach", "digits", "--split", "test", "--teacher", TEACHER,
                              "--out", str(tmp_path / "b.kdc"), "--cluster", "local:0"])
    assert res.exit_code == 2 and "local:N" in res.output
    assert not (tmp_path / "b.kdc").exists()
    res = runner.invoke(app, ["teach", "digits", "--split", "test", "--teacher", TEACHER,
                              "--out", str(tmp_path / "c.kdc"), "--scheduler", "notaurl"])
    assert res.exit_code == 2 and "tcp://HOST:8786" in res.output, res.output
    assert not (tmp_path / "c.kdc").exists(), "a first run that failed before any block leaves no store"


def test_worker_job_key_ignores_where_the_store_is():
    a, b = config("/x/a.kdc"), config("/y/b.kdc", overwrite=True)
    assert job_key(a) == job_key(b)
    assert job_key(a) != job_key(dataclasses.replace(a, k=4))
