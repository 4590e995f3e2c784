"""Record layouts (kdcache.records): every registered layout round-trips through a real store, costs what it
says in RAM, behaves as its declared properties say, and the registry finds what is registered."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache import records
from kdcache.sparse import SparseLogits
from kdcache.stores.errors import SpecError, StoreError
from kdcache.stores.format import RecordSchema
from kdcache.stores.logit_store import LogitStore

C = 10
TEMPS = (1.0, 4.0)
DISTINCT, REPEATS = 4, 1000  # sampled records: 1000 independent draws of each of 4 teacher distributions
SAMPLING = {"samples": 8, "proposal_temperature": 4.0, "seed": 3}
# The --k that asks for each layout. A new layout must add its own here (test_every_layout_has_a_k_spec).
K_SPECS = {"topk": 3, "dense": "all", "sampled": f"sampled:{SAMPLING['samples']}"}


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(DISTINCT, C, generator=gen) * 2.5
    labels = torch.randint(0, C, (DISTINCT,), generator=gen)
    return base.repeat(REPEATS, 1), labels.repeat(REPEATS)


def _store(path, rows: int) -> LogitStore:
    labels = np.zeros(rows, np.int64)
    manifest = {"dataset_index": np.arange(rows), "sample_id": [str(i) for i in range(rows)], "label": labels}
    return LogitStore.create(str(path), labels=labels, views={}, num_views=1, attrs={}, manifest=manifest,
                             shard_rows=rows, chunk_rows=rows // 4)


def _through_store(tmp_path, name: str, encoding: str = "float16"):
    """dense logits -> from_logits -> to_arrays -> a real store -> read_block -> from_arrays."""
    layout = records.get_layout(name)
    z, y = _logits()
    k, layout_name = records.layout_for_k(K_SPECS[name], C)
    assert layout_name == name
    sampling = SAMPLING if name == "sampled" else None
    rec = layout.from_logits(z, y, k=k, temperatures=TEMPS, sampling=sampling, views=0, rows=np.arange(len(y)))
    store = _store(tmp_path / f"{name}-{encoding}.kdc", len(y))
    store.add_teacher("t", num_classes=C, k=k, encoding=encoding, layout=name, temperatures=TEMPS,
                      attrs={"sampling": sampling} if sampling else {})
    store.write_block("t", 0, 0, layout.to_arrays(rec))
    assert store.verify() == []
    attrs = store.teacher_attrs("t")
    batch = store.read_block("t", 0, 0, len(y))
    return z, y, batch, attrs, layout.from_arrays(batch, y, attrs, "cpu")


def _check_dense(z, back, t):
    # exact up to the float16 rounding of the stored logits
    expected = torch.softmax(z.half().double() / t, dim=1)
    torch.testing.assert_close(back.log_probs(t).double().exp(), expected, rtol=0, atol=1e-6)


def _check_topk(z, back, t):
    # the kept classes (top-k and the label) are exact up to float16 rounding (|dz| <= 2^-11 |z|)
    p = torch.softmax(z.double() / t, dim=1)
    q = back.log_probs(t).double().exp()
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, back.indices, True)
    kept[torch.arange(len(p)), back.labels] = True
    assert back.k == K_SPECS["topk"]
    torch.testing.assert_close(q[kept], p[kept], rtol=3e-3, atol=1e-7)
    torch.testing.assert_close(q.sum(1), torch.ones(len(q), dtype=q.dtype), rtol=0, atol=1e-5)


def _check_sampled(z, back, t):
    # unbiased: the mean of REPEATS independent estimates of each distribution is within 5 standard errors
    # of the float64 truth (+ 3e-3 relative for the float16 values the weights are computed from)
    p = torch.softmax(z.double() / t, dim=1).reshape(REPEATS, DISTINCT, C)[0]
    est = back.log_probs(t).double().exp().reshape(REPEATS, DISTINCT, C)
    mean, stderr = est.mean(0), est.std(0) / math.sqrt(REPEATS)
    assert (stderr > 0).any()  # the draws really differ row to row
    assert ((mean - p).abs() <= 5 * stderr + 3e-3 * p + 1e-9).all(), (mean - p).abs().max()


CHECKS = {"dense": _check_dense, "topk": _check_topk, "sampled": _check_sampled}


def test_every_layout_has_a_k_spec_and_a_check():
    assert set(K_SPECS) == set(records.LAYOUTS) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(records.LAYOUTS))
@pytest.mark.parametrize("t", TEMPS)
def test_round_trip_through_a_store_reconstructs_as_the_layout_promises(tmp_path, name, t):
    z, y, _batch, attrs, back = _through_store(tmp_path, name)
    assert attrs["layout"] == name and len(back) == len(y) and back.num_classes == C
    assert (back.labels == y).all()
    CHECKS[name](z, back, t)


@pytest.mark.parametrize("name", sorted(records.LAYOUTS))
@pytest.mark.parametrize("encoding", ["float16", "uint8"])
def test_decoded_bytes_per_row_is_what_read_block_returns(tmp_path, name, encoding):
    _z, y, batch, attrs, _back = _through_store(tmp_path, name, encoding)
    actual = sum(arr.nbytes for arr in batch.values())
    assert records.get_layout(name).decoded_bytes_per_row(attrs) * len(y) == actual


@pytest.mark.parametrize("name", sorted(records.LAYOUTS))
def test_declared_properties_match_what_the_record_does(tmp_path, name):
    layout = records.get_layout(name)
    z, _y, _batch, _attrs, back = _through_store(tmp_path, name)
    if layout.train_time_corrections:  # a correction needs every class's logit
        assert back.logits().shape == z.shape
    else:
        with pytest.raises(SpecError):
            back.logits()
    undeclared = 2.0
    if layout.undeclared_temperatures == records.UNDEFINED:
        with pytest.raises(SpecError):
            back.log_probs(undeclared)
    else:
        q = back.log_probs(undeclared).double().exp()
        assert torch.isfinite(q).all()
        if layout.undeclared_temperatures == records.EXACT:
            _check_dense(z, back, undeclared)
    # only layouts with linear-only losses may lack a finite KL: those report another error metric
    assert (layout.error_metric == "kl") == (not layout.linear_losses_only)


# ------------------------------------------------------------------------------------ choosing from --k
@pytest.mark.parametrize("k, expected", [
    (1, (1, "topk")), (9, (9, "topk")), (10, (10, "dense")), ("all", (10, "dense")),
    ("sampled:4", (4, "sampled")), ("sampled:200", (10, "sampled")), ("auto", (0, records.AUTO)),
])
def test_layout_for_k(k, expected):
    assert records.layout_for_k(k, C) == expected


@pytest.mark.parametrize("k, needle", [
    (0, r"between 1 and 10"), (11, r"between 1 and 10"), (True, r"between 1 and 10"),
    ("most", "an integer, 'all'"), ("sampled:0", "sampled:S"),
])
def test_bad_k_is_a_spec_error(k, needle):
    with pytest.raises(SpecError, match=needle):
        records.layout_for_k(k, C)


def test_names_layout_and_k_choices_follow_the_registry():
    assert records.names_layout("all") and records.names_layout("auto") and records.names_layout("sampled:3")
    assert not records.names_layout("7") and not records.names_layout("most")
    choices = records.k_choices()
    assert all(records.get_layout(n).k_syntax in choices for n in records.LAYOUTS) and "'auto'" in choices


def test_strictest_layout_of_an_ensemble():
    assert records.strictest(["dense", "dense"]).name == "dense"
    assert records.strictest(["dense", "topk"]).name == "topk"
    assert records.strictest(["topk", "sampled", "dense"]).name == "sampled"


# ------------------------------------------------------------------------------------ registry
class _TopOne(records.Layout):
    """A toy layout: the single largest logit (a top-k with k fixed at 1, under its own name)."""

    name = "toy_top1"
    schema = RecordSchema("toy_top1", ("values", "indices"))
    k_syntax = "'top1'"

    def claim_k(self, k, num_classes):
        return 1 if k == "top1" else None

    def names_k(self, value):
        return value == "top1"

    def from_logits(self, logits, labels, *, k, temperatures, sampling=None, views=None, rows=None):
        return SparseLogits.from_dense(logits, labels, 1, temperatures)

    def from_arrays(self, batch, labels, attrs, device):
        return records.get_layout("topk").from_arrays(batch, labels, attrs, device)


def test_a_registered_layout_is_found_and_stored(tmp_path):
    with pytest.raises(StoreError, match="unknown record layout 'toy_top1'.*topk, dense, sampled"):
        records.get_layout("toy_top1")
    records.register_layout(_TopOne)
    try:
        toy = records.get_layout("toy_top1")
        assert isinstance(toy, _TopOne) and records.layout_for_k("top1", C) == (1, "toy_top1")
        assert records.names_layout("top1")
        z, y = _logits()
        store = _store(tmp_path / "toy.kdc", len(y))
        store.add_teacher("t", num_classes=C, k=1, layout="toy_top1", temperatures=TEMPS)  # stores learned it
        store.write_block("t", 0, 0, toy.to_arrays(toy.from_logits(z, y, k=1, temperatures=TEMPS)))
        back = toy.from_arrays(store.read_block("t", 0, 0, len(y)), y, store.teacher_attrs("t"), "cpu")
        assert (back.indices[:, 0] == z.argmax(1)).all()
        with pytest.raises(StoreError, match="taken"):
            records.register_layout(_TopOne)
    finally:
        records.unregister_layout("toy_top1")
    with pytest.raises(StoreError, match="unknown record layout"):
        records.get_layout("toy_top1")
    with pytest.raises(StoreError, match="unknown layout 'toy_top1'"):
        _store(tmp_path / "gone.kdc", 8).add_teacher("t", num_classes=C, k=1, layout="toy_top1")
