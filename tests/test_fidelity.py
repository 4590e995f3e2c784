"""Records keep their promise: `--k auto` meets its budget, the tail is exact where declared (through a
real store), and a loss at an uncovered temperature is warned about (or refused when strict).

Tolerances: KL comparisons against the budget are exact (same function, same inputs). Store round trips
compare float16-stored logits with a float64 reference built from the replayed float32 teacher:
log-probabilities within 2e-3 absolute (float16 has an 11-bit mantissa: |z| * 2^-11 per logit).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, random_logits, runner, teach
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.cli.main import app
from kdcache.fidelity import (
    AUTO_SAMPLE_ROWS,
    PROBE_TEMPERATURES,
    TailCoverageWarning,
    auto_k,
    auto_k_candidates,
    check_max_kl,
    check_store_tail_coverage,
    check_tail_coverage,
    choose_k,
    mean_kl,
    raw_record_bytes,
    roundtrip_record,
)
from kdcache.sparse import SparseLogits, kl_to_dense
from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore

TEACHER = "kdcache.models:small_cnn"  # random weights, 100-class head on mnist-pairs: fast on CPU
NAME = "small_cnn"
DATA = "mnist-pairs?n=300"


# heavy-tailed logits (a few large ones per row, like a trained teacher's), float32 unless asked
make = functools.partial(random_logits, dtype=torch.float32, heavy_tailed=True)


# ------------------------------------------------------------------------------------------ choose_k
def test_auto_candidates():
    assert auto_k_candidates(100) == (1, 2, 5, 10, 20, 50, 100)
    assert auto_k_candidates(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert auto_k_candidates(7) == (1, 2, 5, 7)
    assert auto_k_candidates(1) == (1,)


def err_dense_kl(z, y, temps, rt):
    rec = rt(SparseLogits.from_dense(z, y, z.shape[1], temps))
    return [kl_to_dense(z, rec, t).mean().item() for t in rec.temperatures]


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 60),
    st.floats(0.2, 6.0),
    st.sampled_from([(1.0,), (1.0, 4.0), (0.5, 2.0, 8.0)]),
    st.floats(1e-7, 0.5),
    st.sampled_from([None, "float16", "uint8"]),
    st.booleans(),
)
def test_auto_never_exceeds_its_budget_on_the_sample_it_measured(seed, c, scale, temps, budget, encoding, sized):
    z, y = make(seed, 32, c, scale)
    rt = None if encoding is None else (lambda r: roundtrip_record(r, encoding, r.k == r.num_classes))
    size = (lambda k: raw_record_bytes(c, k, encoding or "float16", len(temps))) if sized else None
    try:
        choice = choose_k(z, y, temps, budget, roundtrip=rt, record_bytes=size)
    except SpecError as err:  # only a lossy encoding may miss the budget even when dense
        assert encoding is not None and "raise --max-kl" in str(err)
        assert max(choice_kl for choice_kl in err_dense_kl(z, y, temps, rt)) > budget
        return
    rec = SparseLogits.from_dense(z, y, choice.k, temps)
    rec = rec if rt is None else rt(rec)
    for t in rec.temperatures:
        assert kl_to_dense(z, rec, t).mean().item() <= budget
        assert choice.kl_by_temperature[t] <= budget
    # smallest: every smaller candidate misses the budget at some declared temperature
    for k, kl in choice.tried.items():
        if k < choice.k:
            assert max(kl.values()) > budget
    assert choice.sample_rows == 32 and choice.dense == (choice.k == c)


def test_auto_picks_dense_when_nothing_smaller_fits_and_measures_other_temperatures():
    z, y = make(0, 64, 30, 4.0)
    assert choose_k(z, y, (1.0, 4.0), 1e-12).k == 29  # one rest class: its tail logsumexp is its logit
    choice = choose_k(z, y, (1.0, 4.0), 1e-12, record_bytes=lambda k: raw_record_bytes(30, k, "float16", 2))
    assert choice.k == 30 and choice.dense  # ... but no smaller than dense, which is exact too
    assert all(v == 0 for v in choice.kl_by_temperature.values())
    z, y = make(1, 64, 100, 4.0)
    choice = choose_k(z, y, (1.0, 4.0), 2e-2)
    assert 1 < choice.k < 100
    assert set(choice.kl_at_other_temperatures) == {0.5, 2.0, 3.0, 5.0, 6.0, 8.0, 10.0, 20.0}
    attrs = choice.as_attrs()
    assert json.loads(json.dumps(attrs)) == attrs and attrs["k"] == choice.k


def test_uint8_dense_below_budget_is_a_spec_error():
    z, y = make(2, 64, 50, 8.0)
    with pytest.raises(SpecError, match="--max-kl .* raise --max-kl"):
        choose_k(z, y, (1.0, 4.0), 1e-12, roundtrip=lambda r: roundtrip_record(r, "uint8", r.k == r.num_classes))


def test_bisection_finds_the_smallest_k_and_dense_wins_when_not_larger():
    z, y = make(3, 64, 100, 3.0, dtype=torch.float64)
    temps = (1.0, 4.0)
    kl = {k: max(mean_kl(z, SparseLogits.from_dense(z, y, k, temps), t) for t in temps) for k in range(1, 101)}
    for budget in (3e-2, 1e-3):
        choice = choose_k(z, y, temps, budget, probe_temperatures=())
        assert choice.k == min(k for k, v in kl.items() if v <= budget)  # brute force agrees
        assert len(choice.tried) < 20  # candidates + bisection, not every k
        sized = auto_k(z.float(), y, temps, budget, "float16")
        # float16 top-k costs 4 B per class (value + uint16 index), dense 2 B: k >= 50 is never cheaper
        assert sized.k < 50 or sized.k == 100
        assert raw_record_bytes(100, sized.k, "float16", 2) <= raw_record_bytes(100, 100, "float16", 2)


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), float("inf"), "x"])
def test_max_kl_must_be_positive(bad):
    with pytest.raises(SpecError, match="--max-kl must be a finite number > 0"):
        check_max_kl(bad)


# ------------------------------------------------------------------------------------------ coverage
def test_tail_coverage_covered_dense_and_sampled():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_tail_coverage((1.0, 4.0), (4.0, 1.0)) == ()
        assert check_tail_coverage((1.0,), (4.0, 7.0), layout="dense") == ()  # exact at every T
    with pytest.raises(SpecError, match="sampled record"):
        check_tail_coverage((1.0, 4.0), (2.0,), layout="sampled")


def test_tail_coverage_warns_once_with_expected_error_or_raises_when_strict():
    with pytest.warns(TailCoverageWarning) as caught:
        missing = check_tail_coverage((1.0, 4.0), (2.0, 4.0, 6.0), measured_kl={"2.0": 3.5e-3})
    assert missing == (2.0, 6.0) and len(caught) == 1
    msg = str(caught[0].message)
    assert "T=2: KL 3.50e-03 measured" in msg and "T=6: uniform-tail reconstruction; error grows with T" in msg
    with pytest.raises(SpecError, match="T=6: uniform-tail"):
        check_tail_coverage((1.0, 4.0), (6.0,), strict=True)
    attrs = {"temperatures": [1.0, 4.0], "layout": "topk",
             "fidelity": {"kl_at_other_temperatures": {"6.0": 1e-2}}}
    with pytest.warns(TailCoverageWarning, match="T=6: KL 1.00e-02"):
        check_store_tail_coverage(attrs, (6.0,))


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("args, needle", [
    (["--k", "auto", "--max-kl", "0"], "--max-kl"),
    (["--k", "auto", "--max-kl", "-1e-3"], "--max-kl"),
    (["--temperatures", "0,4"], "--temperatures"),
    (["--k", "sampled:0"], "sampled:S"),
    (["--k", "sampled:256"], "sampled:S"),
    (["--k", "sampled:x"], "sampled:S"),
    (["--k", "sampled:8", "--proposal-temperature", "2"], "--proposal-temperature"),
    (["--k", "5", "--proposal-temperature", "4"], "--proposal-temperature"),
    (["--k", "some"], "--k"),
])
def test_bad_record_flags_are_one_line_exit_2(tmp_path, args, needle):
    out = tmp_path / "bad.kdc"
    res = teach(DATA, "--split", "test", "--teacher", TEACHER, "--out", str(out), *args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output
    assert not out.exists()


# ------------------------------------------------------------------------------------------ store round trip
def replay_dense(store: LogitStore, view: int = 0) -> torch.Tensor:
    """The store's teacher recomputed on its rows (float32 forward, as stage one), as float64."""
    from kdcache.data import load_dataset
    from kdcache.replay import ViewedRows
    from kdcache.teach import load_teacher_for_store
    from kdcache.views import get_view_policy

    ident = store.attrs["identity"]
    ds = load_dataset(ident["dataset"], ident["split"])
    t = load_teacher_for_store(store, TEACHER, ds.num_classes, torch.device("cpu"))
    policy = get_view_policy(store.attrs["view_policy"]["name"], **store.attrs["view_policy"]["args"])
    size = tuple(store.attrs["input_size"])
    rows = ViewedRows(ds, policy, store.views(), store.manifest_column("dataset_index"), size)
    x = torch.stack([rows[(view, r)][0] for r in range(store.num_rows)])
    with torch.inference_mode():
        return torch.cat([t.model(x[a : a + 100]).float() for a in range(0, len(x), 100)]).double()


def stored_record(store: LogitStore, view: int = 0) -> SparseLogits:
    a = store.teacher_attrs(NAME)
    blk = store.read_view(NAME, view)
    labels = torch.from_numpy(store.labels()).long()
    temps = tuple(a["temperatures"])
    if a["layout"] == "dense":
        return SparseLogits.from_dense(torch.from_numpy(blk["values"]), labels, a["num_classes"], temps)
    return SparseLogits(torch.from_numpy(blk["values"]), torch.from_numpy(blk["indices"]),
                        torch.from_numpy(blk["label_logit"]), labels, torch.from_numpy(blk["tail"]), temps,
                        a["num_classes"])


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fid") / "dense.kdc"
    res = teach(DATA, "--split", "test", "--teacher", TEACHER, "--k", "all", "--out", str(out), "--batch-size", "100")
    assert res.exit_code == 0, res.output
    return out


def test_all_record_through_the_store_equals_the_dense_teacher_at_any_temperature(dense_store):
    store = LogitStore.open(str(dense_store))
    assert store.teacher_attrs(NAME)["layout"] == "dense"
    z = replay_dense(store)
    rec = stored_record(store)
    for t in (0.5, 1.0, 2.5, 4.0, 10.0):  # declared (1, 4) and not: dense is exact everywhere
        want = torch.log_softmax(z / t, dim=1)
        got = rec.log_probs(t).double()
        bound = 2.0**-11 * z.abs().max().item() / t * 2 + 1e-4  # float16 rounding of logits, two-sided
        assert (got - want).abs().max().item() < bound
        assert kl_to_dense(z, rec, t).max().item() < 1e-5


def test_topk_tail_mass_through_the_store_equals_the_dense_teacher_at_every_declared_temperature(tmp_path):
    out = tmp_path / "top.kdc"
    temps = (1.0, 2.5, 4.0, 10.0)
    res = teach(DATA, "--split", "test", "--teacher", TEACHER, "--k", "5", "--temperatures", "2.5,4,10",
                "--out", str(out), "--batch-size", "100")
    assert res.exit_code == 0, res.output
    store = LogitStore.open(str(out))
    rec = stored_record(store)
    assert rec.temperatures == temps
    z = replay_dense(store)
    rest = torch.ones_like(z, dtype=torch.bool)
    rest.scatter_(1, rec.indices, False).scatter_(1, rec.labels[:, None], False)
    for j, t in enumerate(temps):
        log_p = torch.log_softmax(z / t, dim=1)
        ref_tail_lse = (z / t).masked_fill(~rest, -math.inf).logsumexp(1)
        np.testing.assert_allclose(rec.tail_lse[:, j].double().numpy(), ref_tail_lse.numpy(), rtol=0, atol=1e-4)
        want_mass = log_p.masked_fill(~rest, -math.inf).exp().sum(1)
        got_mass = rec.log_probs(t).double().masked_fill(~rest, -math.inf).exp().sum(1)
        np.testing.assert_allclose(got_mass.numpy(), want_mass.numpy(), rtol=2e-3, atol=1e-7)


def test_auto_through_the_cli_keeps_its_promise_and_is_reported(tmp_path):
    out = tmp_path / "auto.kdc"
    args = [DATA, "--split", "test", "--teacher", TEACHER, "--k", "auto", "--max-kl", "5e-4", "--out", str(out),
            "--batch-size", "100", "--shard-rows", "200", "--chunk-rows", "100"]
    res = teach(*args)
    assert res.exit_code == 0, res.output
    store = LogitStore.open(str(out))
    a = store.teacher_attrs(NAME)
    fid = a["fidelity"]
    assert fid["mode"] == "auto" and fid["k"] == a["k"] and fid["max_kl"] == 5e-4
    assert fid["sample_rows"] == min(AUTO_SAMPLE_ROWS, store.num_rows) == 300
    assert 1 < fid["k"] < 100  # a real top-k choice, not the dense fallback
    assert all(v <= 5e-4 for v in fid["kl_by_temperature"].values())
    assert a["identity"]["k"] == "auto" and a["identity"]["max_kl"] == 5e-4
    # what stage two reads back meets the budget on the rows that were measured
    z, rec = replay_dense(store), stored_record(store)
    for t in rec.temperatures:
        assert kl_to_dense(z, rec, t).mean().item() <= 5e-4 * 1.01  # replay vs batched forward: fp32 noise

    info = json.loads(cli("inspect", out, "--json").output)
    assert info["teachers"][NAME]["fidelity"]["k"] == a["k"]
    text = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "250"}).output
    assert f"chose k={a['k']} for --max-kl 0.0005" in text

    before = store.read_view(NAME, 0)
    assert teach(*args).exit_code == 0  # resume: nothing to redo, same k
    after = LogitStore.open(str(out)).read_view(NAME, 0)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    res = teach(*[x if x != "5e-4" else "1e-3" for x in args])
    assert res.exit_code == 2 and "max_kl" in res.output


def test_fixed_k_stores_measure_the_error_at_undeclared_temperatures(tmp_path):
    """A top-k store declared at T=1 records, from every row of its blocks (a full pass up to 128 classes), the
    KL a loss at another T will read (uniform tail from the T=1 mass); with one block those are the same
    rows `--k auto` measures on, so the two agree, and stage two's warning quotes the number."""
    from kdcache.teach import TeachConfig, run_teach

    common = dict(dataset=DATA, split="test", teachers=[TEACHER], temperatures=(1.0,), batch_size=512,
                  shard_rows=512, chunk_rows=512)
    auto = run_teach(TeachConfig(out=str(tmp_path / "auto.kdc"), k="auto", max_kl=1e-2, **common))
    fid = auto.teacher_attrs(NAME)["fidelity"]
    fixed = run_teach(TeachConfig(out=str(tmp_path / "fixed.kdc"), k=fid["k"], **common))
    attrs = fixed.teacher_attrs(NAME)
    assert attrs["layout"] == "topk" and fixed.num_rows <= 512
    measured = attrs["summary"]["kl_at_other_temperatures"]
    assert set(measured) == {str(t) for t in PROBE_TEMPERATURES if t != 1.0}
    for t, kl in fid["kl_at_other_temperatures"].items():  # auto's is measured after float16 rounding
        assert measured[t] == pytest.approx(kl, rel=0.05, abs=1e-6)
    assert all(kl > 0 for kl in measured.values()), "a top-k record is not exact off its declared T"
    with pytest.warns(TailCoverageWarning, match=r"T=4: KL .* measured on the teach-time sample"):
        check_store_tail_coverage(attrs, (4.0,))
