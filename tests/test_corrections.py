"""Corrections: float64 numpy references, properties, and dense/sparse commutation.

Tolerances: float64 inputs at 1e-9 (LoCa's log-space formula vs the probability formula), float32
inputs at 1e-4 (logits of magnitude <= ~30). swap and sort only move values: compared exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import FAST, random_logits
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.corrections import CORRECTIONS, apply_correction
from kdcache.sparse import SparseLogits
from kdcache.stores.errors import SpecError

TEMPS = (1.0, 2.0, 4.0)


# ---------------------------------------------------------------- float64 numpy references
def swap_ref(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = z.copy()
    for b in range(z.shape[0]):
        m = int(np.argmax(z[b]))
        out[b, m], out[b, y[b]] = z[b, y[b]], z[b, m]
    return out


def sort_ref(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SortKD in words: label gets the max, classes ranked above it move down one rank."""
    out = z.copy()
    for b in range(z.shape[0]):
        order = np.argsort(-z[b], kind="stable")
        v = z[b, order]
        r = int(np.where(order == y[b])[0][0])
        out[b, y[b]] = v[0]
        for j in range(r):
            out[b, order[j]] = v[j + 1]
    return out


def loca_ref_probs(z: np.ndarray, y: np.ndarray, alpha: float, t: float) -> np.ndarray:
    """LoCa on probabilities at T, wrong samples only (paper Eqs. 4-6)."""
    e = np.exp(z / t - z.max(axis=1, keepdims=True) / t)
    p = e / e.sum(axis=1, keepdims=True)
    out = p.copy()
    for b in range(z.shape[0]):
        m = int(np.argmax(p[b]))
        if m == y[b]:
            continue
        s = alpha / (1 - p[b, y[b]] + p[b, m])
        out[b] = s * p[b]
        out[b, y[b]] = 1 - s * (1 - p[b, y[b]])
    return out


REFS = {"swap": swap_ref, "sort": sort_ref}
dense_cases = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(2, 12), st.floats(0.3, 8.0))


# ---------------------------------------------------------------- dense: examples and references
def test_sort_and_swap_examples_from_the_notes():
    z = torch.tensor([[1, 5, 3, 4, 0.5, 2]], dtype=torch.float64)
    y = torch.tensor([2])
    assert apply_correction("sort", z, y).tolist() == [[1, 4, 5, 3, 0.5, 2]]
    assert apply_correction("swap", z, y).tolist() == [[1, 3, 5, 4, 0.5, 2]]
    assert apply_correction("none", z, y).tolist() == z.tolist()


@FAST
@given(dense_cases, st.sampled_from(["swap", "sort"]))
def test_swap_and_sort_match_reference_and_keep_the_multiset(case, name):
    seed, b, c, scale = case
    z, y = random_logits(seed, b, c, scale)
    out = apply_correction(name, z, y)
    np.testing.assert_array_equal(out.numpy(), REFS[name](z.numpy(), y.numpy()))
    assert torch.equal(out.sort(dim=1).values, z.sort(dim=1).values)
    assert torch.equal(out.argmax(dim=1), y)


@FAST
@given(dense_cases, st.floats(0.05, 0.99), st.sampled_from([1.0, 2.0, 4.0]))
def test_loca_matches_probability_formula(case, alpha, t):
    seed, b, c, scale = case
    z, y = random_logits(seed, b, c, scale)
    out = apply_correction("loca", z, y, alpha=alpha, temperature=t)
    p_new = torch.softmax(out / t, dim=1).numpy()
    want = loca_ref_probs(z.numpy(), y.numpy(), alpha, t)
    np.testing.assert_allclose(p_new, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p_new.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert torch.equal(out.argmax(dim=1), y)
    # Non-label logits are kept as they are, so non-target probability ratios are kept.
    keep = torch.ones_like(z, dtype=torch.bool).scatter_(1, y[:, None], False)
    assert torch.equal(out[keep], z[keep])
    p_old = torch.softmax(z / t, dim=1).numpy()
    other = (y.numpy() + 1) % c
    for i in range(b):
        j = [q for q in range(c) if q != y[i]]
        np.testing.assert_allclose(p_new[i, j] / p_new[i, other[i]], p_old[i, j] / p_old[i, other[i]], rtol=1e-9)


@FAST
@given(dense_cases, st.sampled_from(["swap", "sort", "loca"]))
def test_correct_samples_are_unchanged(case, name):
    seed, b, c, scale = case
    z, y = random_logits(seed, b, c, scale, rank=0)
    assert torch.equal(apply_correction(name, z, y), z)


def test_loca_float32_close_to_float64():
    z, y = random_logits(5, 32, 100, scale=5.0, dtype=torch.float32)
    got = apply_correction("loca", z, y)
    want = apply_correction("loca", z.double(), y)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- dense / sparse commutation
RANKS = {"rank0": 0, "inside": "inside", "outside": "outside", "random": None}


def label_rank(where, k: int, c: int):
    if where == "inside":
        return (1, max(k - 1, 1)) if k >= 2 else 0
    if where == "outside":
        return (k, c - 1) if k < c else (c - 1)
    return where


def assert_records_equal(a: SparseLogits, b: SparseLogits, tol: float):
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.labels, b.labels)
    assert a.temperatures == b.temperatures and a.num_classes == b.num_classes
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=tol)
    torch.testing.assert_close(a.label_logit, b.label_logit, rtol=0, atol=tol)
    torch.testing.assert_close(a.tail_lse, b.tail_lse, rtol=tol, atol=tol)
    for t in a.temperatures:
        torch.testing.assert_close(a.log_probs(t), b.log_probs(t), rtol=0, atol=tol)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 12),
    st.data(),
    st.sampled_from(["none", "swap", "sort", "loca"]),
    st.sampled_from(sorted(RANKS)),
)
def test_correction_commutes_with_from_dense(seed, c, data, name, where):
    k = data.draw(st.integers(1, c))
    z, y = random_logits(seed, 5, c, scale=data.draw(st.floats(0.5, 8.0)), rank=label_rank(RANKS[where], k, c))
    args = {"temperature": data.draw(st.sampled_from(TEMPS))} if name == "loca" else {}
    dense_first = SparseLogits.from_dense(apply_correction(name, z, y, **args), y, k, TEMPS)
    sparse_first = apply_correction(name, SparseLogits.from_dense(z, y, k, TEMPS), **args)
    assert_records_equal(dense_first, sparse_first, tol=1e-9)
    # The corrected record is well formed: descending values, label on top, label logit consistent.
    assert (sparse_first.values[:, :-1] >= sparse_first.values[:, 1:]).all()
    if name != "none":
        assert torch.equal(sparse_first.indices[:, 0], y)
        assert torch.equal(sparse_first.values[:, 0], sparse_first.label_logit)


@pytest.mark.parametrize("name", ["swap", "sort", "loca"])
@pytest.mark.parametrize("k,where", [(1, "outside"), (5, "rank0"), (5, "inside"), (5, "outside"), (100, "random")])
def test_commutation_float32(name, k, where):
    c = 100
    z, y = random_logits(11, 64, c, scale=4.0, dtype=torch.float32, rank=label_rank(RANKS[where], k, c))
    dense_first = SparseLogits.from_dense(apply_correction(name, z, y), y, k, (1.0, 4.0))
    sparse_first = apply_correction(name, SparseLogits.from_dense(z, y, k, (1.0, 4.0)))
    assert_records_equal(dense_first, sparse_first, tol=1e-4)


def test_sparse_loca_needs_its_temperature_declared():
    z, y = random_logits(0, 4, 10, rank=(5, 9))
    rec = SparseLogits.from_dense(z, y, 3, (1.0,))
    with pytest.raises(SpecError, match="no tail statistics at T=4"):
        apply_correction("loca", rec)
    exact = SparseLogits.from_dense(z, y, 10, (1.0,))  # k == C: nothing in the tail, any T works
    want = SparseLogits.from_dense(apply_correction("loca", z, y), y, 10, (1.0,))
    assert_records_equal(apply_correction("loca", exact), want, tol=1e-9)


# ---------------------------------------------------------------- registry and errors
def test_registry():
    assert list(CORRECTIONS) == ["none", "swap", "sort", "loca"]
    assert dict(CORRECTIONS["loca"].defaults) == {"alpha": 0.9, "temperature": 4.0}
    assert all(callable(c.fn) for c in CORRECTIONS.values())


def test_errors():
    z, y = random_logits(0, 2, 5)
    rec = SparseLogits.from_dense(z, y, 2, TEMPS)
    with pytest.raises(SpecError, match="unknown correction 'smooth'; choose one of: none, swap, sort, loca"):
        apply_correction("smooth", z, y)
    with pytest.raises(SpecError, match="has no argument 'beta'"):
        apply_correction("loca", z, y, beta=1.0)
    with pytest.raises(SpecError, match="has no argument 'alpha'"):
        apply_correction("swap", z, y, alpha=1.0)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(SpecError, match=r"alpha must be in \(0, 1\)"):
            apply_correction("loca", z, y, alpha=alpha)
    with pytest.raises(SpecError, match="temperature must be > 0"):
        apply_correction("loca", z, y, temperature=0.0)
    with pytest.raises(ValueError, match="need labels"):
        apply_correction("swap", z)
    with pytest.raises(ValueError, match="carries its labels"):
        apply_correction("swap", rec, y)
    assert math.isfinite(apply_correction("loca", z, y, alpha=0.999).sum().item())
