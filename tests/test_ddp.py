"""Stage two under torchrun (DDP, 2 CPU processes on gloo) trains the same student as one process.

Rank r takes rows[r::2] of the epoch order in batches of B/2, so its i-th batch and its partner's
make up exactly positions [i*B, (i+1)*B) of the single-process order; with a student without
BatchNorm the averaged gradient is the single-process gradient up to all-reduce rounding. Measured:
max |weight difference| ~1.5e-8 after 8 steps; the tolerance is 1e-5 (weights are O(0.1)).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.loader import CachedLoader
from kdcache.models import build_model
from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import TeachConfig, run_teach
from kdcache.train import TrainConfig, run_train, validate

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
ARGS = dict(student="tiny_cnn_nobn", teacher="resnet18", loss="kd", batch_size=64, lr=0.2,
            max_steps_per_epoch=4, view_schedule="random", preload="yes", workers=0, device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "s.kdc"
    run_teach(TeachConfig(dataset="digits", split="test", teachers=["torchvision:resnet18:none"], out=str(out),
                          k=4, views=2, view_policy="crop-flip", chunk_rows=128, shard_rows=256))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(store: Path, out: Path, epochs: int, *extra: str, agent: bool = True) -> subprocess.CompletedProcess:
    """Two ranks of `kdcache train` on gloo: under torchrun (``agent``), or started directly with the
    environment torchrun gives its workers (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT; saves the
    agent's start-up)."""
    cli = ["-m", "kdcache.cli", "train", str(store), "--out", str(out), "--epochs", str(epochs),
           "--student", ARGS["student"], "--teacher", ARGS["teacher"], "--loss", ARGS["loss"],
           "--batch-size", str(ARGS["batch_size"]), "--lr", str(ARGS["lr"]),
           "--max-steps-per-epoch", str(ARGS["max_steps_per_epoch"]), "--view-schedule", ARGS["view_schedule"],
           "--preload", ARGS["preload"], "--workers", "0", "--device", "cpu", *extra]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if agent:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), *cli]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    procs = [subprocess.Popen([sys.executable, *cli], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**env, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    code = max(abs(p.returncode) for p in procs)
    return subprocess.CompletedProcess(cli, code, "\n".join(outs), "")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "student.pt", weights_only=True)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_processes_train_the_same_student_as_one(tmp_path, store):
    """Also: the DDP run resumes (every rank loads rank 0's checkpoint) to the uninterrupted result."""
    for epochs in (1, 2):
        run_train(TrainConfig(source=str(store), out=str(tmp_path / f"one{epochs}"), epochs=epochs, **ARGS))
    res = launch(store, tmp_path / "two", 1)
    assert res.returncode == 0, res.stdout + res.stderr
    one1, two1 = weights(tmp_path / "one1"), weights(tmp_path / "two")
    init = build_model("tiny_cnn_nobn", 10, seed=0).state_dict()
    assert max_diff(one1, init) > 1000 * TOL, "the student must have trained"
    assert max_diff(one1, two1) < TOL

    res = launch(store, tmp_path / "two", 2, "--resume", agent=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert max_diff(weights(tmp_path / "one2"), weights(tmp_path / "two")) < TOL
    single = pq.read_table(tmp_path / "one2" / "metrics.parquet").to_pylist()
    ddp = pq.read_table(tmp_path / "two" / "metrics.parquet").to_pylist()
    assert [m["epoch"] for m in ddp] == [1, 2]
    for a, b in zip(single, ddp, strict=True):  # train metrics are summed over ranks: the global batch's
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["train_top1"] == b["train_top1"] and a["test_top1"] == b["test_top1"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.endswith(".tmp")) == [
        "checkpoint.pt", "config.json", "metrics.parquet", "student.pt"]


def test_global_batch_must_divide_by_world(tmp_path, store):
    cfg = TrainConfig(source=str(store), out=str(tmp_path / "x"), **{**ARGS, "batch_size": 63})
    with pytest.raises(SpecError, match="divisible by the 2 processes"):
        validate(cfg, world=2)


def loader(store: Path, rank: int = 0, world: int = 1, preload: str = "yes") -> CachedLoader:
    """The public loader as `kdcache train` opens it for ARGS (per-rank batch B / world)."""
    return CachedLoader(store, ARGS["batch_size"] // world, teacher=ARGS["teacher"], seed=0, preload=preload,
                        view_schedule=ARGS["view_schedule"], workers=0, rank=rank, world=world)


def test_ranks_read_disjoint_shares_of_the_epoch(store, tmp_path):
    whole = loader(store).order(3)
    shares = [loader(store, r, 2).order(3) for r in range(2)]
    for r, share in enumerate(shares):  # positions r, r + 2, ... of the single-process (row, view) order
        assert share.rows.tolist() == whole.rows[r::2].tolist()
        assert share.views.tolist() == whole.views[r::2].tolist()


def test_streamed_ranks_read_disjoint_chunks_that_cover_the_epoch(store, tmp_path):
    """Streamed soft labels: rank r takes the r-th of N arcs of the epoch's rotated chunk ring, so the
    ranks' rows are disjoint, together every row once, and each rank's records are its rows' records."""
    shares = [loader(store, r, 2, preload="no").members[0].soft for r in range(2)]
    orders = [soft.order(3) for soft in shares]
    rows = [set(o.rows.tolist()) for o in orders]
    assert rows[0].isdisjoint(rows[1])
    assert sorted(rows[0] | rows[1]) == list(range(LogitStore.open(str(store)).num_rows))
    chunk = LogitStore.open(str(store)).chunk_rows
    for soft, order in zip(shares, orders, strict=True):
        assert set(np.unique(order.rows // chunk).tolist()) == {int(c) for b in order.buffers for c in b.chunks}
        got = next(soft.batches(order, 32))
        for key, value in got.items():
            want = np.stack([soft.store.read_block("resnet18", int(v), int(r), int(r) + 1)[key][0]
                             for r, v in zip(order.rows[:32], order.views[:32], strict=True)])
            np.testing.assert_array_equal(value, want)
