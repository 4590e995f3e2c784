"""Helpers shared by the test files: ``from helpers import ...`` (tests/conftest.py puts tests/ on sys.path).

Only what several test files need lives here: the CLI runner, the small stage-one run most CLI tests
start from, random logits for the record/correction property tests, tiny stores built directly
through ``LogitStore.create``, and whole-store comparisons for the resume and distributed tests.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from hypothesis import settings
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.stores.logit_store import LogitStore

ROOT = Path(__file__).resolve().parents[1]  # the repository root (cwd of CLI subprocesses)
TEACHER = "torchvision:resnet18:none"  # random, seeded weights: offline and reproducible; stored as "resnet18"
FAST = settings(max_examples=40, deadline=None)  # hypothesis settings of the math property tests

runner = CliRunner()


# ------------------------------------------------------------------------------------------ the CLI
def cli(*args: str | Path):
    """``kdcache ARGS...`` in this process; returns typer's Result (exit_code, output)."""
    return runner.invoke(app, [str(a) for a in args])


def teach(*args: str | Path):
    """``kdcache teach ARGS...`` in this process."""
    return cli("teach", *args)


# digits test split (360 rows), 2 crop-flip views, top-5 of a random resnet18, 128-row shards: 3 shards x 2 views
SMALL_TEACH = ("digits", "--split", "test", "--teacher", TEACHER, "--k", "5", "--views", "2",
               "--view-policy", "crop-flip", "--shard-rows", "128", "--chunk-rows", "64")


def small_teach_args(out: str | Path, *extra: str) -> list[str]:
    """The argv (``teach ...``) of the small stage-one run, writing to ``out``."""
    return ["teach", *SMALL_TEACH, "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------ logits
def random_logits(seed: int, b: int, c: int, scale: float = 3.0, dtype=torch.float64, rank=None,
                  heavy_tailed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) continuous random logits (no ties) and (B,) int64 labels, from numpy seed ``seed``.

    ``heavy_tailed`` draws Student-t(3) logits (a few large ones per row, like a real teacher's) instead
    of normal ones. ``rank`` puts the label at that rank of its row (0 = the argmax), at a random rank in
    ``(lo, hi)`` when a tuple, or anywhere (uniform labels) when None.
    """
    rng = np.random.default_rng(seed)
    z = (rng.standard_t(3, size=(b, c)) if heavy_tailed else rng.normal(size=(b, c))) * scale
    if rank is None:
        y = rng.integers(0, c, size=b)
    else:
        ranks = rng.integers(rank[0], rank[1] + 1, size=b) if isinstance(rank, tuple) else np.full(b, rank)
        y = np.argsort(-z, axis=1)[np.arange(b), ranks]
    return torch.tensor(z, dtype=dtype), torch.tensor(y, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ stores
def manifest_for(labels: np.ndarray) -> dict:
    """A valid manifest for a store with these labels (dataset index = store row, ids "0", "1", ...)."""
    n = len(labels)
    return {"dataset_index": np.arange(n), "sample_id": [str(i) for i in range(n)], "label": np.asarray(labels)}


def empty_store(url: str | Path, n: int = 4, **kw) -> LogitStore:
    """A store of ``n`` rows with label 0, one view without parameters and no teacher (``LogitStore.create``)."""
    labels = np.zeros(n, dtype=np.int32)
    return LogitStore.create(url, labels=labels, views={}, num_views=1, attrs={}, manifest=manifest_for(labels),
                             **kw)


def store_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a store, by its path in the group ("teachers/resnet18/values", ...)."""
    out: dict[str, np.ndarray] = {}

    def walk(group, prefix: str) -> None:
        for name, arr in group.arrays():
            out[prefix + name] = arr[...]
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(zarr.open_group(str(path), mode="r"), "")
    return out


def assert_same_arrays(a: str | Path, b: str | Path) -> dict[str, np.ndarray]:
    """Two stores hold the same arrays with the same contents, bit for bit; returns a's arrays."""
    x, y = store_arrays(a), store_arrays(b)
    assert x.keys() == y.keys()
    assert any(k.endswith("/done") for k in x), "no teacher arrays compared"
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    return x


def wait_for_done(store: str | Path, at_least: int, proc: subprocess.Popen, teacher: str = "resnet18",
                  timeout: float = 180) -> int:
    """Poll a store a running ``kdcache teach`` (``proc``) writes until ``at_least`` blocks of ``teacher``
    are done; return how many are. Fails if the process exits first (then it cannot be killed mid-run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"teach exited ({proc.returncode}) before it could be killed; make the run longer")
        try:
            done = int(LogitStore.open(str(store)).done(teacher).sum())
        except Exception:  # not created yet, or its teacher not added yet
            done = 0
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} blocks done after {timeout:g} s")
