"""Stage one's cheap record path (issue 12): the float32 closed-form record error against the float64 full pass,
records that do not depend on the statistics, the sampled error with its standard error, stores made before
the sample still read and resumed, and the throughput profile of `kdcache teach --profile`.

Stated bounds (float32 ``fast_record_error`` vs float64 ``kl_to_dense`` / ``gradient_error``), per row:
top-k and dense KL |fast - ref| <= 3e-4 * ref + 3e-7 nats at declared and undeclared T; the sampled layout's
gradient error within 1e-3 relative + 1e-9. A block's sampled mean is within 4 standard errors of the
full-pass mean.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from helpers import SMALL_TEACH, TEACHER, random_logits

from kdcache.fidelity import PROBE_TEMPERATURES, fast_record_error, gradient_error, record_error, sparse_kl
from kdcache.records import get_layout
from kdcache.replay import BlockBatches, ViewedRows, replay_loader
from kdcache.sampled import SampledLogits
from kdcache.sparse import SparseLogits, kl_to_dense
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import TeachConfig, load_teacher_for_store, open_store_for, prepare, run_teach, stats_names

teach_mod = importlib.import_module("kdcache.teach")  # kdcache.teach is also the function


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small tensors: one thread is fastest, and a 2-thread process stalls whenever a neighbour holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TEMPS = (1.0, 4.0)
SMALL = "kdcache.models:tiny_cnn"  # a fast teacher: these tests are about the record path, not the forward
NAME = "tiny_cnn"


def teacher_like(seed: int, rows: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits with a confident label, a few rivals and a noisy tail (as benchmarks/loader.py makes)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    z = rng.standard_normal((rows, classes), dtype=np.float32)
    z[np.arange(rows), y] += rng.uniform(2.0, 8.0, rows).astype(np.float32)
    rivals = rng.integers(0, classes, (rows, 3))
    z[np.arange(rows)[:, None], rivals] += rng.uniform(0.5, 3.0, rivals.shape).astype(np.float32)
    return torch.from_numpy(z), torch.from_numpy(y)


CASES = {
    "teacher-like C=1000": lambda: teacher_like(0, 96, 1000),
    "normal C=1000": lambda: random_logits(1, 96, 1000, dtype=torch.float32),
    "heavy-tailed C=1000": lambda: random_logits(2, 96, 1000, heavy_tailed=True, dtype=torch.float32),
    "near-uniform C=1000": lambda: random_logits(3, 96, 1000, scale=0.05, dtype=torch.float32),
    "scale 30 C=100": lambda: random_logits(4, 96, 100, scale=30.0, dtype=torch.float32),
    "C=12": lambda: random_logits(5, 96, 12, dtype=torch.float32),
}


@pytest.mark.parametrize("case", CASES)
def test_float32_closed_form_kl_is_within_the_stated_bound_of_the_float64_full_pass(case):
    z, y = CASES[case]()
    c = z.shape[1]
    for k in sorted({1, 10, c - 1}):
        rec = SparseLogits.from_dense(z, y, k, TEMPS)
        for t in sorted({*TEMPS, *PROBE_TEMPERATURES}):
            ref = kl_to_dense(z, rec, t)
            fast = fast_record_error(z, rec, t)
            assert fast.dtype == torch.float32 and fast.shape == ref.shape
            err = (fast.double() - ref).abs()
            bound = 3e-4 * ref + 3e-7
            assert (err <= bound).all(), f"k={k} T={t}: worst excess {(err - bound).max().item():.2e}"
    dense = SparseLogits.from_dense(z, y, c, TEMPS)  # k == C: exact, and no pass over (B, C) at all
    assert (fast_record_error(z, dense, 4.0) == 0).all() and (record_error(z, dense, 4.0) == 0).all()


def test_float64_closed_form_equals_the_full_pass_to_rounding():
    """The closed form is exact, not an approximation: in float64 it is the full pass to ~1e-12."""
    z, y = teacher_like(6, 128, 1000)
    rec = SparseLogits.from_dense(z, y, 10, TEMPS)
    for t in (0.5, 1.0, 4.0, 20.0):
        np.testing.assert_allclose(sparse_kl(z, rec, t, torch.float64), kl_to_dense(z, rec, t), rtol=1e-9, atol=1e-15)


def test_float32_gradient_error_of_sampled_records_is_within_bound():
    z, y = teacher_like(7, 256, 1000)
    rec = SampledLogits.from_dense(z, y, 16, TEMPS, seed=0)
    for t in TEMPS:
        ref = gradient_error(z, rec, t)
        fast = fast_record_error(z, rec, t)
        assert fast.dtype == torch.float32
        assert ((fast.double() - ref).abs() <= 1e-3 * ref + 1e-9).all()


# ------------------------------------------------------------------------------------------ real stores
@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory):
    """The small teach run (digits test, 2 crop-flip views, 128-row shards: 6 blocks), its error sampled as
    above FULL_PASS_CLASSES (every 4th row, probes every 8th), and the float32 teacher logits of every block
    recomputed independently."""
    out = tmp_path_factory.mktemp("rp") / "s.kdc"
    cfg = TeachConfig(dataset="digits", split="test", teachers=[SMALL], out=str(out), k=5, views=2,
                      view_policy="crop-flip", shard_rows=128, chunk_rows=64, batch_size=32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teach_mod, "FULL_PASS_CLASSES", 0)
        mp.setattr(teach_mod, "ERROR_STRIDE", 4)
        mp.setattr(teach_mod, "PROBE_STRIDE", 8)
        store = run_teach(cfg)
    return store, cfg, block_logits(store, cfg)


def block_logits(store: LogitStore, cfg: TeachConfig) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(view, shard) -> (logits, labels), through the rebuilt teacher over the replayed views, in the batches
    stage one used (same shapes, so the same float32 logits on this CPU)."""
    job = prepare(TeachConfig(**{**cfg.__dict__, "k": "all"}))
    t = load_teacher_for_store(store, SMALL, job.dataset.num_classes, job.device)
    rows = ViewedRows(job.dataset, job.policy, store.views(), store.manifest_column("dataset_index"), job.size)
    out = {}
    for v in range(store.num_views):
        for s in range(store.num_shards):
            a, b = store.shard_bounds(s)
            zs, ys = [], []
            with torch.inference_mode():
                for x, y, *_ in replay_loader(rows, BlockBatches([(v, a, b)], cfg.batch_size), 0, job.device):
                    zs.append(t.model(x).float())
                    ys.append(y)
            out[(v, s)] = (torch.cat(zs), torch.cat(ys))
    return out


def test_record_arrays_equal_those_of_from_dense_computed_independently(sampled_store):
    """The statistics never touch the record: every stored array is what SparseLogits.from_dense gives."""
    store, cfg, logits = sampled_store
    layout = get_layout("topk")
    for (v, s), (z, y) in logits.items():
        a, b = store.shard_bounds(s)
        want = layout.to_arrays(SparseLogits.from_dense(z, y, 5, cfg.temperatures))
        got = store.read_block(NAME, v, a, b)
        np.testing.assert_array_equal(got["values"], want["values"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(got["indices"], want["indices"])
        np.testing.assert_array_equal(got["label_logit"], want["label_logit"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(got["tail"], want["tail"])


def test_sampled_error_states_its_sample_and_is_within_4_se_of_the_full_pass(sampled_store):
    store, cfg, logits = sampled_store
    summary = store.teacher_attrs(NAME)["summary"]
    rows = store.num_rows * store.num_views
    bounds = [store.shard_bounds(s) for s in range(store.num_shards)]
    assert summary["error_rows"] == sum(-(-(b - a) // 4) for a, b in bounds) * store.num_views < rows
    assert summary["probe_rows"] == sum(-(-(b - a) // 8) for a, b in bounds) * store.num_views
    recs = {vs: SparseLogits.from_dense(z, y, 5, cfg.temperatures) for vs, (z, y) in logits.items()}
    for t, kl in summary["kl_by_temperature"].items():
        full = torch.cat([kl_to_dense(logits[vs][0], r, float(t)) for vs, r in recs.items()])
        se = summary["kl_by_temperature_se"][t]
        assert 0 < se < kl and abs(kl - full.mean().item()) <= 4 * se
    for t, kl in summary["kl_at_other_temperatures"].items():
        full = torch.cat([kl_to_dense(logits[vs][0], r, float(t)) for vs, r in recs.items()])
        se = summary["kl_at_other_temperatures_se"][t]
        assert abs(kl - full.mean().item()) <= 4 * se + 1e-9


OLD_NAMES = ("rows", "teacher_correct", "changed_by_correction", "bf16_rows", "kl_T1", "kl_T4", "probe_rows",
             *(f"kl_probe_T{t:g}" for t in PROBE_TEMPERATURES if t not in TEMPS))


def test_a_store_made_before_the_sample_resumes_with_its_own_columns_and_still_describes(tmp_path, monkeypatch):
    """A store whose block_stats lack error_rows and the squares (made by an older kdcache) is resumed with its
    own columns, its declared-T error summed over every row, and inspect shows it without a standard error."""
    from kdcache.describe import describe

    cfg = TeachConfig(dataset="digits", split="test", teachers=[SMALL], out=str(tmp_path / "old.kdc"), k=5,
                      views=2, view_policy="crop-flip", shard_rows=128, chunk_rows=64, batch_size=32)
    job = prepare(cfg)
    monkeypatch.setattr(teach_mod, "stats_names", lambda layout, temps: OLD_NAMES)
    store = open_store_for(job)  # the teacher's arrays as the old code made them
    monkeypatch.undo()
    monkeypatch.setattr(teach_mod, "FULL_PASS_CLASSES", 0)  # new stores would sample every 32nd row
    assert set(OLD_NAMES) < set(stats_names("topk", TEMPS))
    store = run_teach(cfg)  # resumes: all 6 blocks are pending
    attrs = store.teacher_attrs(NAME)
    assert attrs["block_stats_names"] == list(OLD_NAMES) and store.done(NAME).all()
    summary = attrs["summary"]
    rows = store.num_rows * store.num_views
    assert summary["error_rows"] == rows == summary["rows_done"] and summary["kl_by_temperature_se"] is None
    full = {t: [] for t in summary["kl_by_temperature"]}
    for (_vs, (z, y)) in block_logits(store, cfg).items():
        rec = SparseLogits.from_dense(z, y, 5, cfg.temperatures)
        for t in full:
            full[t].append(kl_to_dense(z, rec, float(t)))
    for t, kl in summary["kl_by_temperature"].items():
        ref = torch.cat(full[t]).mean().item()
        assert abs(kl - ref) <= 3e-4 * ref + 3e-7  # every row, float32: the per-row bound holds for the mean
    info = describe(store)["teachers"][NAME]
    assert info["kl_by_temperature_se"] is None and info["error_rows"] == rows


def test_teach_profile_reports_rows_per_s_and_where_the_time_went(tmp_path):
    from helpers import cli

    profile = tmp_path / "profile.json"
    argv = ["teach", *(SMALL if a == TEACHER else a for a in SMALL_TEACH)]
    res = cli(*argv, "--out", tmp_path / "p.kdc", "--profile", profile)
    assert res.exit_code == 0, res.output
    assert "rows/s" in res.output and "loader" in res.output and "writer" in res.output
    data = json.loads(profile.read_text())
    assert {"rows", "wall_s", "rows_per_s", "seconds", "shares", "bottleneck", "device", "workers"} <= set(data)
    assert data["rows"] == 360 * 2 and data["rows_per_s"] > 0
    shares = data["shares"]
    assert set(shares) == {"loader", "teacher", "writer"} and data["bottleneck"] in shares
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.02)
    assert sum(data["seconds"].values()) == pytest.approx(data["wall_s"], rel=0.02)
    again = cli(*argv, "--out", tmp_path / "q.kdc", "--profile", profile, "--cluster", "local:1")
    assert again.exit_code == 2 and "--profile" in again.output
