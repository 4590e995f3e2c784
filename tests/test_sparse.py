"""SparseLogits against a float64 numpy reference of the record and its reconstruction.

Tolerances: float64 inputs are compared at 1e-9 (exact up to rounding); float32 inputs at 1e-4
absolute on log-probabilities of logits of magnitude <= ~30 (float32 has ~1e-7 relative precision).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import FAST, random_logits
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.sparse import SparseLogits, check_temperatures, kl_to_dense
from kdcache.stores.errors import SpecError

TEMPS = (1.0, 4.0)


# ---------------------------------------------------------------- float64 numpy reference
def lse(x: np.ndarray) -> float:
    if x.size == 0:
        return -math.inf
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def ref_parts(z_row: np.ndarray, y: int, k: int):
    """(top-k classes descending, rest classes) of one row, by a plain sort."""
    top = np.argsort(-z_row, kind="stable")[:k]
    rest = np.array([c for c in range(z_row.size) if c not in set(top) and c != y], dtype=int)
    return top, rest


def ref_log_probs(z: np.ndarray, y: np.ndarray, k: int, t: float, declared) -> np.ndarray:
    out = np.empty_like(z)
    for b in range(z.shape[0]):
        top, rest = ref_parts(z[b], y[b], k)
        q = np.full(z.shape[1], np.nan)
        if rest.size:
            if any(math.isclose(t, d) for d in declared):
                q[rest] = lse(z[b, rest] / t) - math.log(rest.size)
            else:
                q[rest] = (lse(z[b, rest]) - math.log(rest.size)) / t
        q[top] = z[b, top] / t
        q[y[b]] = z[b, y[b]] / t
        out[b] = q - lse(q)
    return out


def ref_kl(z: np.ndarray, log_q: np.ndarray, t: float) -> np.ndarray:
    log_p = z / t - np.array([[lse(r / t)] for r in z])
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


shapes = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(2, 12), st.floats(0.3, 8.0))


# ---------------------------------------------------------------- from_dense fields
@FAST
@given(shapes, st.data())
def test_from_dense_fields_match_reference(shape, data):
    seed, b, c, scale = shape
    k = data.draw(st.integers(1, c))
    z, y = random_logits(seed, b, c, scale)
    rec = SparseLogits.from_dense(z, y, k, TEMPS)
    zn, yn = z.numpy(), y.numpy()
    assert rec.temperatures == TEMPS and rec.num_classes == c and len(rec) == b
    assert rec.indices.dtype == torch.int64 and rec.labels.dtype == torch.int64
    for i in range(b):
        top, rest = ref_parts(zn[i], yn[i], k)
        assert rec.indices[i].tolist() == top.tolist()
        np.testing.assert_array_equal(rec.values[i].numpy(), zn[i, top])
        assert rec.label_logit[i].item() == zn[i, yn[i]]
        for j, t in enumerate(TEMPS):
            want = lse(zn[i, rest] / t)
            got = rec.tail_lse[i, j].item()
            assert (got == want == -math.inf) or got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_float32_in_float32_out_and_half_widened():
    z, y = random_logits(0, 4, 9, dtype=torch.float32)
    rec = SparseLogits.from_dense(z, y, 3)
    assert rec.values.dtype == rec.label_logit.dtype == rec.tail_lse.dtype == torch.float32
    assert SparseLogits.from_dense(z.half(), y, 3).values.dtype == torch.float32
    assert rec.log_probs(2.0).dtype == torch.float32


def test_temperatures_sorted_with_one_added():
    z, y = random_logits(0, 2, 5)
    assert SparseLogits.from_dense(z, y, 2, (4.0, 2.0, 4.0)).temperatures == (1.0, 2.0, 4.0)
    assert check_temperatures([]) == (1.0,)


# ---------------------------------------------------------------- reconstruction
@FAST
@given(shapes, st.data(), st.sampled_from([1.0, 4.0, 0.5, 2.5]))
def test_log_probs_and_logits_match_reference_float64(shape, data, t):
    seed, b, c, scale = shape
    k = data.draw(st.integers(1, c))
    z, y = random_logits(seed, b, c, scale)
    rec = SparseLogits.from_dense(z, y, k, TEMPS)
    want = ref_log_probs(z.numpy(), y.numpy(), k, t, TEMPS)
    np.testing.assert_allclose(rec.log_probs(t).numpy(), want, rtol=0, atol=1e-9)
    # logits() is the T = 1 reconstruction in raw-logit space: same softmax, exact top-k + label.
    raw = rec.logits()
    np.testing.assert_allclose(
        torch.log_softmax(raw, 1).numpy(), ref_log_probs(z.numpy(), y.numpy(), k, 1.0, TEMPS), rtol=0, atol=1e-9
    )
    assert torch.equal(raw.gather(1, rec.indices), rec.values)
    assert torch.equal(raw.gather(1, y[:, None]).squeeze(1), z.gather(1, y[:, None]).squeeze(1))


@FAST
@given(shapes, st.data(), st.sampled_from([1.0, 4.0, 2.5]))
def test_log_probs_match_reference_float32(shape, data, t):
    seed, b, c, scale = shape
    k = data.draw(st.integers(1, c))
    z, y = random_logits(seed, b, c, scale, dtype=torch.float32)
    rec = SparseLogits.from_dense(z, y, k, TEMPS)
    want = ref_log_probs(z.double().numpy(), y.numpy(), k, t, TEMPS)
    np.testing.assert_allclose(rec.log_probs(t).double().numpy(), want, rtol=0, atol=1e-4)


@FAST
@given(shapes, st.floats(0.05, 20.0))
def test_k_equals_num_classes_is_exact_at_any_temperature(shape, t):
    seed, b, c, scale = shape
    z, y = random_logits(seed, b, c, scale, dtype=torch.float32)
    rec = SparseLogits.from_dense(z, y, c, TEMPS)
    assert torch.isneginf(rec.tail_lse).all()
    assert torch.equal(rec.logits(), z)
    assert torch.equal(rec.log_probs(t), torch.log_softmax(z / t, dim=1))
    assert (kl_to_dense(z, rec, t) == 0).all()


def test_empty_rest_when_label_is_the_only_class_outside_topk():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    rec = SparseLogits.from_dense(z, torch.tensor([3]), 3, TEMPS)
    assert rec.num_rest().tolist() == [0] and torch.isneginf(rec.tail_lse).all()
    assert torch.equal(rec.logits(), z)
    assert kl_to_dense(z, rec, 4.0).item() == 0.0


@FAST
@given(shapes, st.data())
def test_tail_and_head_mass_exact_at_every_declared_temperature(shape, data):
    seed, b, c, scale = shape
    k = data.draw(st.integers(1, c))
    temps = (0.5, 1.0, 3.0, 4.0)
    z, y = random_logits(seed, b, c, scale, dtype=torch.float32)
    rec = SparseLogits.from_dense(z, y, k, temps)
    zn = z.double().numpy()
    for t in temps:
        q = rec.log_probs(t).double().exp().numpy()
        p = np.exp(zn / t - np.array([[lse(r / t)] for r in zn / 1.0]))
        for i in range(b):
            top, rest = ref_parts(zn[i], int(y[i]), k)
            np.testing.assert_allclose(q[i, rest].sum(), p[i, rest].sum(), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(q[i, top], p[i, top], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- KL metric
@FAST
@given(shapes, st.data(), st.sampled_from([1.0, 4.0, 2.5]))
def test_kl_to_dense_matches_reference_and_is_nonnegative(shape, data, t):
    seed, b, c, scale = shape
    k = data.draw(st.integers(1, c))
    z, y = random_logits(seed, b, c, scale)
    rec = SparseLogits.from_dense(z, y, k, TEMPS)
    kl = kl_to_dense(z, rec, t)
    assert kl.dtype == torch.float64 and kl.shape == (b,)
    assert (kl >= 0).all()
    want = ref_kl(z.numpy(), ref_log_probs(z.numpy(), y.numpy(), k, t, TEMPS), t)
    np.testing.assert_allclose(kl.numpy(), np.maximum(want, 0), rtol=1e-7, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1.0, 4.0]), st.floats(0.5, 6.0))
def test_kl_decreases_weakly_as_k_grows(seed, t, scale):
    c = 30
    z, y = random_logits(seed, 8, c, scale, dtype=torch.float32)
    kls = torch.stack([kl_to_dense(z, SparseLogits.from_dense(z, y, k, TEMPS), t) for k in range(1, c + 1)])
    # log-sum inequality: dropping a class from a uniform-tail group never raises the KL.
    # float32 tail statistics: allow 1e-6 of slack per step.
    assert (kls[1:] <= kls[:-1] + 1e-6).all()
    assert (kls[-1] == 0).all()


def test_kl_is_large_for_small_k_at_high_temperature():
    z, y = random_logits(1, 64, 100, scale=4.0, dtype=torch.float32)
    k1, k50 = (kl_to_dense(z, SparseLogits.from_dense(z, y, k, TEMPS), 4.0).mean() for k in (1, 50))
    assert k1 > 10 * k50 > 0


# ---------------------------------------------------------------- validation and plumbing
@pytest.mark.parametrize("k", [0, -1, 11, True, 2.0])
def test_bad_k_is_a_spec_error(k):
    z, y = random_logits(0, 2, 10)
    with pytest.raises(SpecError, match=r"--k must be between 1 and 10 \(the number of classes\)"):
        SparseLogits.from_dense(z, y, k)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_a_spec_error(t):
    z, y = random_logits(0, 2, 10)
    with pytest.raises(SpecError, match="temperatures must be finite and > 0"):
        SparseLogits.from_dense(z, y, 3, (1.0, t))
    rec = SparseLogits.from_dense(z, y, 3)
    if not t > 0:
        with pytest.raises(SpecError, match="temperature must be > 0"):
            rec.log_probs(t)


def test_tail_at_undeclared_temperature_is_refused_unless_rest_is_empty():
    z, y = random_logits(0, 3, 10)
    with pytest.raises(SpecError, match="no tail statistics at T=3"):
        SparseLogits.from_dense(z, y, 4, TEMPS).tail_at(3.0)
    assert torch.isneginf(SparseLogits.from_dense(z, y, 10).tail_at(3.0)).all()
    assert torch.equal(
        SparseLogits.from_dense(z, y, 4, TEMPS).tail_at(4.0), SparseLogits.from_dense(z, y, 4, TEMPS).tail_lse[:, 1]
    )


def test_index_concat_to_len():
    z, y = random_logits(3, 6, 9, dtype=torch.float32)
    rec = SparseLogits.from_dense(z, y, 4, TEMPS)
    parts = [rec.index(slice(0, 2)), rec.index(torch.tensor([2, 3])), rec.index(torch.arange(6) >= 4)]
    assert [len(p) for p in parts] == [2, 2, 2]
    back = SparseLogits.concat(parts).to("cpu")
    for f in ("values", "indices", "label_logit", "labels", "tail_lse"):
        assert torch.equal(getattr(back, f), getattr(rec, f))
    assert back.temperatures == rec.temperatures and back.num_classes == rec.num_classes
    with pytest.raises(ValueError, match="differ"):
        SparseLogits.concat([rec, SparseLogits.from_dense(z, y, 3, TEMPS)])


def test_constructor_checks_shapes():
    z, y = random_logits(0, 2, 6, dtype=torch.float32)
    rec = SparseLogits.from_dense(z, y, 3, TEMPS)
    with pytest.raises(ValueError, match="tail_lse"):
        SparseLogits(rec.values, rec.indices, rec.label_logit, rec.labels, rec.tail_lse[:, :1], TEMPS, 6)
    with pytest.raises(ValueError, match="1.0"):
        SparseLogits(rec.values, rec.indices, rec.label_logit, rec.labels, rec.tail_lse, (2.0, 4.0), 6)
