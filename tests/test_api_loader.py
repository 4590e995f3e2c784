"""The public library: `import kdcache` as one package, `CachedLoader` in a user's own loop, the examples."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from kdcache.train import TrainConfig, run_train

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "kdcache.models:small_cnn"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """digits, 2 crop-flip views, top-4: several chunks, so streamed and preloaded orders differ."""
    out = tmp_path_factory.mktemp("api") / "digits.kdc"
    kdcache.teach("digits", TEACHER, out, k=4, views=2, view_policy="crop-flip", chunk_rows=128, shard_rows=256,
                  progress=False)
    return out


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ one import package
def test_kdcache_imports_from_a_folder_with_its_own_pipeline_stores_and_cli(tmp_path):
    for name in ("pipeline", "stores", "cli"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    res = python("-c", "import kdcache, kdcache.stores, kdcache.cli.main; print(kdcache.__version__)", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == kdcache.__version__


def test_the_source_folders_are_not_importable_by_their_own_names(tmp_path):
    for name in ("pipeline", "stores", "cli"):
        res = python("-c", f"import {name}", cwd=tmp_path)
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, name


def test_the_wheel_installs_only_kdcache(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ folder in the repo
    for name in ("pipeline", "stores", "cli"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("kdcache-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kdcache"}
    for module in ("kdcache/__init__.py", "kdcache/loader.py", "kdcache/stores/logit_store.py",
                   "kdcache/cli/main.py", "kdcache/cli/__main__.py", "kdcache/records/base.py"):
        assert module in names


def test_version_and_python_dash_m(tmp_path):
    res = python("-m", "kdcache.cli", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "teach" in res.stdout


# ------------------------------------------------------------------ the loader
def test_open_store_describes_the_store(store):
    st = kdcache.open_store(store)
    assert (st.rows, st.views, st.teachers, st.num_classes) == (1437, 2, ["small_cnn"], 10)
    info = st.describe()
    assert info["teachers"]["small_cnn"]["k"] == 4 and info["rows"] == st.rows


@pytest.mark.parametrize("preload", ["yes", "no"])
def test_batches_are_the_cached_records_of_the_served_views(store, preload):
    """Each batch's teacher record is the store's record of exactly those (view, row) pairs, and its
    images are those pairs' replayed views."""
    loader = kdcache.CachedLoader(store, batch_size=100, seed=3, preload=preload, view_schedule="random")
    loader.set_epoch(2)
    order = loader.order()
    raw = loader.store
    images, labels, teacher = next(iter(loader))
    views, rows = order.views[:100], order.rows[:100]
    want = np.stack([raw.read_block("small_cnn", int(v), int(r), int(r) + 1)["values"][0]
                     for v, r in zip(views, rows, strict=True)])
    np.testing.assert_array_equal(teacher.values.numpy(), want.astype(np.float32))
    np.testing.assert_array_equal(labels.numpy(), raw.labels()[rows])
    x, y, *_ = loader.rows.__getitems__(np.stack([views, rows], axis=1))
    assert torch.equal(images, x) and torch.equal(labels, y)
    assert teacher.probs(4.0).shape == (100, 10)


def test_every_row_once_per_epoch_and_epochs_differ(store):
    loader = kdcache.CachedLoader(store, batch_size=64, seed=0)
    loader.set_epoch(1)
    first = torch.cat([y for _, y, _ in loader])
    assert len(first) == (1437 // 64) * 64
    order1, order2 = loader.order(1), loader.order(2)
    assert sorted(order1.rows.tolist()) == list(range(1437))
    assert not np.array_equal(order1.rows, order2.rows)


@pytest.mark.parametrize("preload", ["yes", "no"])
def test_ranks_take_disjoint_shares_that_cover_the_epoch_in_equal_steps(store, preload):
    whole = kdcache.CachedLoader(store, batch_size=30, seed=1, preload=preload, rank=0, world=1)
    ranks = [kdcache.CachedLoader(store, batch_size=30, seed=1, preload=preload, rank=r, world=3) for r in range(3)]
    rows = [set(r.order(4).rows.tolist()) for r in ranks]
    assert sum(len(r) for r in rows) == 1437 and set.union(*rows) == set(whole.order(4).rows.tolist())
    assert all(a.isdisjoint(b) for i, a in enumerate(rows) for b in rows[i + 1:])
    steps = {r.steps(4) for r in ranks}
    assert len(steps) == 1, "every rank takes the same number of steps"
    (n,) = steps
    assert n == min(len(s) for s in rows) // 30
    for r in ranks:
        r.set_epoch(4)
        assert sum(1 for _ in r) == n


def test_a_resumed_loader_serves_the_same_remaining_batches(store):
    a = kdcache.CachedLoader(store, batch_size=50, seed=5, preload="no")
    a.set_epoch(3)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    rest = [(x, y, t.values) for x, y, t in it]
    b = kdcache.CachedLoader(store, batch_size=50, seed=5, preload="no")
    b.load_state_dict(state)
    b.set_epoch(3)
    again = [(x, y, t.values) for x, y, t in b]
    assert len(again) == len(rest) == a.steps(3) - 7
    for (x1, y1, v1), (x2, y2, v2) in zip(rest, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(v1, v2)


def test_workers_persist_across_epochs_and_serve_what_one_process_serves(store):
    one = kdcache.CachedLoader(store, batch_size=128, seed=2, workers=0, max_steps=3)
    two = kdcache.CachedLoader(store, batch_size=128, seed=2, workers=2, max_steps=3)
    for epoch in (1, 2):
        one.set_epoch(epoch)
        two.set_epoch(epoch)
        for (x1, y1, t1), (x2, y2, t2) in zip(one, two, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(t1.values, t2.values)
        if epoch == 1:
            workers = two._images._iterator._workers
    assert two._images._iterator._workers is workers, "the same worker processes serve epoch 2"
    two.close()


def test_a_user_transform_runs_after_replay(store):
    plain = kdcache.CachedLoader(store, batch_size=16, seed=0, max_steps=1)
    flipped = kdcache.CachedLoader(store, batch_size=16, seed=0, max_steps=1, transform=lambda x: x.flip(-1))
    (x, _, _), (xf, _, _) = next(iter(plain)), next(iter(flipped))
    assert torch.equal(xf, x.flip(-1))


def test_train_time_correction_and_ensemble_names(store):
    sort = kdcache.CachedLoader(store, batch_size=64, seed=0, correction="sort", max_steps=1)
    _, y, t = next(iter(sort))
    assert torch.equal(t.values.argmax(1), torch.zeros_like(y))  # values are sorted: column 0 is the max
    assert torch.equal(t.indices[:, 0], y), "sort gives the label the largest logit"


BAD = {
    "batch size 0": (dict(batch_size=0), "batch_size must be an integer >= 1"),
    "rank out of range": (dict(rank=2, world=2), "rank must be an integer in 0..1"),
    "world 0": (dict(world=0), "world must be an integer >= 1"),
    "teacher the store lacks": (dict(teacher="resnet50"), "has no teacher 'resnet50'"),
    "other data": (dict(dataset="digits?seed=3"), "fingerprint"),
    "other length": (dict(dataset="mnist5k"), "holds 1437 rows"),
    "unknown correction": (dict(correction="bogus"), "unknown correction"),
    "unknown loss": (dict(loss="nope"), "unknown loss"),
    "workers": (dict(workers=-1), "workers must be an integer >= 0"),
    "max steps": (dict(max_steps=0), "max_steps must be an integer >= 1"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_loader_input_is_one_line(store, case, tmp_path):
    kwargs, message = BAD[case]
    kwargs = {"batch_size": 32, **kwargs}
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(kdcache.KdcacheError, match=message) as err:
        kdcache.CachedLoader(store, **kwargs)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in store.iterdir()) == before


def test_set_epoch_zero_and_a_transform_that_drops_rows_are_refused(store):
    loader = kdcache.CachedLoader(store, batch_size=32)
    with pytest.raises(kdcache.SpecError, match="epoch"):
        loader.set_epoch(0)
    bad = kdcache.CachedLoader(store, batch_size=32, transform=lambda x: x[:-1])
    with pytest.raises(kdcache.SpecError, match="transform changed the batch size from 32 to 31"):
        next(iter(bad))


def test_a_missing_store_is_named():
    with pytest.raises(kdcache.StoreError, match="no store at"):
        kdcache.open_store("/nonexistent/x.kdc")


# ------------------------------------------------------------------ the examples
def test_own_loop_example_trains_the_same_student_as_kdcache_train(store, tmp_path):
    res = python(str(ROOT / "examples" / "own_loop.py"), str(store), "--epochs", "2", "--max-steps", "4",
                 "--out", str(tmp_path / "own.pt"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run_train(TrainConfig(source=str(store), student="small_cnn", out=str(tmp_path / "cli"), loss="kd", epochs=2,
                          batch_size=64, milestones=(1000,), max_steps_per_epoch=4, device="cpu"))
    own = torch.load(tmp_path / "own.pt", weights_only=True)
    cli = torch.load(tmp_path / "cli" / "student.pt", weights_only=True)
    init = kdcache.build_model("small_cnn", 10, seed=0).state_dict()
    assert max((own[k] - init[k]).abs().max().item() for k in own if own[k].is_floating_point()) > 1e-3
    for key in own:
        assert torch.allclose(own[key].double(), cli[key].double(), atol=1e-5, rtol=0), key


def test_timm_student_example_trains(store, tmp_path):
    pytest.importorskip("timm")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "timm_student.py"), str(store),
                          "--max-steps", "2", "--batch-size", "16", "--out", str(tmp_path / "t.pt")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "t.pt").stat().st_size > 0 and "epoch 1: loss" in res.stdout
