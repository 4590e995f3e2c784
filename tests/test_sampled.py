"""Sampled records (--k sampled:S): deterministic draws, an unbiased p̂, an unbiased KD gradient, and the
store round trip.

Statistical tests use N = 2000 independent draws (rows 0..N-1 of one teacher row, seeded, so the
tests are deterministic) and require every class's mean to lie within 4 standard errors of the dense
value. For p̂ the standard error is the exact one, sqrt(p^2 (1 - q) / (q S N)); for the gradient it is
the empirical one. With 10 classes and 2-4 settings, a correct estimator fails with probability < 1e-3
(and, being seeded, either always passes or always fails).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import runner

from kdcache.cli.main import app
from kdcache.fidelity import gradient_error, record_error
from kdcache.losses import kd
from kdcache.sampled import SampledLogits, draw_uniforms
from kdcache.sparse import SparseLogits
from kdcache.stores.errors import SpecError, StoreError
from kdcache.stores.logit_store import LogitStore

N = 2000
TEMPS = (1.0, 4.0)


def teacher_row(seed: int = 0, c: int = 10, scale: float = 2.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, c, generator=g, dtype=torch.float64) * scale


def draws(z: torch.Tensor, s: int, t_q: float, seed: int = 0) -> SampledLogits:
    """N independent records of the same teacher row (one per row id)."""
    zz = z.float().repeat(N, 1)
    return SampledLogits.from_dense(zz, torch.zeros(N, dtype=torch.long), s, TEMPS, t_q, seed=seed,
                                    rows=np.arange(N))


# ------------------------------------------------------------------------------------------ the record
def test_record_fields_and_determinism():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(12, 30, generator=g) * 3, torch.randint(0, 30, (12,), generator=g)
    rows = np.arange(100, 112)
    rec = SampledLogits.from_dense(z, y, 16, TEMPS, seed=7, rows=rows, views=3)
    assert rec.k == 16 and rec.proposal_temperature == 4.0 and rec.temperatures == TEMPS
    assert (rec.samples == 16).all()
    for i in range(12):
        used = rec.counts[i] > 0
        ids = rec.indices[i][used]
        assert len(set(ids.tolist())) == len(ids)  # distinct classes
        assert torch.equal(rec.values[i][used], z[i, ids])  # their raw logits, descending
        assert (rec.values[i][used].diff() <= 0).all()
        assert (rec.indices[i][~used] == rec.indices[i, 0]).all()  # padding repeats slot 0 with count 0
    torch.testing.assert_close(rec.tail_lse, torch.stack([(z / t).logsumexp(1) for t in TEMPS], 1))
    assert torch.equal(rec.label_logit, z.gather(1, y[:, None]).squeeze(1))
    # the same (seed, view, row) gives the same draws whatever the batching and order
    perm = torch.randperm(12, generator=g)
    again = SampledLogits.concat([
        SampledLogits.from_dense(z[perm[:5]], y[perm[:5]], 16, TEMPS, seed=7, rows=rows[perm[:5]], views=3),
        SampledLogits.from_dense(z[perm[5:]], y[perm[5:]], 16, TEMPS, seed=7, rows=rows[perm[5:]], views=3),
    ])
    back = torch.argsort(perm)
    for f in ("indices", "counts", "values"):
        assert torch.equal(getattr(again, f)[back], getattr(rec, f))
    other = SampledLogits.from_dense(z, y, 16, TEMPS, seed=7, rows=rows, views=4)
    assert not torch.equal(other.counts, rec.counts)  # another view: another draw
    u = draw_uniforms(0, 0, np.arange(5000), 4)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_more_samples_than_classes_and_plumbing():
    z = torch.tensor([[2.0, 1.0, 0.0]])
    rec = SampledLogits.from_dense(z, torch.tensor([2]), 40, TEMPS)
    assert rec.k == 3 and rec.counts.sum().item() == 40
    assert len(rec) == 1 and len(SampledLogits.concat([rec, rec]).index(slice(1, 2))) == 1
    assert rec.to("cpu").num_classes == 3
    with pytest.raises(SpecError, match="declared temperatures"):
        rec.log_probs(2.0)
    with pytest.raises(SpecError, match="no raw logits"):
        rec.logits()
    with pytest.raises(SpecError, match="proposal temperature"):
        SampledLogits.from_dense(z, torch.tensor([2]), 4, TEMPS, proposal_temperature=2.0)
    with pytest.raises(SpecError, match="between 1 and 255"):
        SampledLogits.from_dense(z, torch.tensor([2]), 256, TEMPS)


# ------------------------------------------------------------------------------------------ unbiased
@pytest.mark.parametrize("t_q", [1.0, 4.0])
def test_p_hat_is_unbiased_at_every_declared_temperature(t_q):
    z = teacher_row(0)
    s = 8
    rec = draws(z, s, t_q)
    q = torch.softmax(z[0] / t_q, 0)
    for t in TEMPS:
        p = torch.softmax(z[0] / t, 0)
        p_hat = rec.probs(t).double()
        se = (p**2 * (1 - q) / (q * s * N)).sqrt()
        assert ((p_hat.mean(0) - p).abs() <= 4 * se + 1e-12).all(), (t, p_hat.mean(0) - p, se)
    assert torch.allclose(rec.probs(t_q).sum(1), torch.ones(N))  # p = q: p̂ = counts / S, sums to 1


@pytest.mark.parametrize("t_q", [1.0, 4.0])
def test_kd_gradient_is_unbiased_and_topk_is_not(t_q):
    z = teacher_row(3)
    student = torch.randn(1, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.long)

    def grads(teacher, rows: int) -> torch.Tensor:
        s = student.float().repeat(rows, 1).requires_grad_(True)
        kd(s, teacher, y.repeat(rows), T=4.0, w_ce=0.0, w_kd=1.0).backward()
        return s.grad.double() * rows  # kd averages over the batch: per-row gradients

    dense = grads(SparseLogits.from_dense(z.float(), y, 10, TEMPS), 1)[0]
    g = grads(draws(z, 8, t_q), N)
    mean, se = g.mean(0), g.std(0) / N**0.5
    assert ((mean - dense).abs() <= 4 * se + 1e-6).all(), (mean - dense, se)
    top = grads(SparseLogits.from_dense(z.float(), y, 2, TEMPS), 1)[0]
    assert ((top - dense).abs() > 4 * se).any()  # the top-2 + tail record is biased, visibly at this N


def test_errors_are_finite_for_sampled_and_kl_for_sparse():
    z = teacher_row(5).float().repeat(64, 1)
    y = torch.zeros(64, dtype=torch.long)
    rec = SampledLogits.from_dense(z, y, 16, TEMPS, rows=np.arange(64))
    for t in TEMPS:
        err = record_error(z, rec, t)
        assert torch.isfinite(err).all() and (err >= 0).all() and err.mean() > 0
    dense = SparseLogits.from_dense(z, y, 10, TEMPS)
    assert (record_error(z, dense, 4.0) == 0).all() and (gradient_error(z, dense, 4.0) < 1e-12).all()


# ------------------------------------------------------------------------------------------ store
def test_store_counts_validation(tiny_store):
    st = tiny_store
    st.add_teacher("t", num_classes=10, k=3, layout="sampled", temperatures=(1.0, 4.0))
    rec = {"values": np.zeros((4, 3)), "indices": np.zeros((4, 3), np.int64), "label_logit": np.zeros(4),
           "tail": np.zeros((4, 2))}
    with pytest.raises(StoreError, match="counts"):
        st.write_block("t", 0, 0, rec)
    with pytest.raises(StoreError, match="counts"):
        st.write_block("t", 0, 0, {**rec, "counts": np.full((4, 3), 300)})
    st.write_block("t", 0, 0, {**rec, "counts": np.full((4, 3), 7)})
    assert st.read_block("t", 0, 0, 4)["counts"].tolist() == [[7, 7, 7]] * 4
    assert st.verify() == []


def test_sampled_through_the_cli_store_and_back(tmp_path):
    args = ["mnist-pairs?n=200", "--split", "test", "--teacher", "kdcache.models:small_cnn", "--k", "sampled:8",
            "--temperatures", "1,4", "--batch-size", "64", "--shard-rows", "100", "--chunk-rows", "50"]
    a, b = tmp_path / "a.kdc", tmp_path / "b.kdc"
    assert runner.invoke(app, ["teach", *args, "--out", str(a)]).exit_code == 0
    assert runner.invoke(app, ["teach", *args, "--batch-size", "50", "--out", str(b)]).exit_code == 0
    sa, sb = LogitStore.open(str(a)), LogitStore.open(str(b))
    attrs = sa.teacher_attrs("small_cnn")
    assert attrs["layout"] == "sampled" and attrs["k"] == 8
    assert attrs["sampling"]["samples"] == 8 and attrs["sampling"]["proposal_temperature"] == 4.0
    blk = sa.read_view("small_cnn", 0)
    assert (blk["counts"].sum(1) == 8).all()
    for key, arr in blk.items():  # other batching, same draws: reruns are identical
        np.testing.assert_array_equal(arr, sb.read_view("small_cnn", 0)[key], err_msg=key)

    rec = SampledLogits.from_arrays(blk, sa.labels(), attrs)
    assert rec.num_classes == 100 and len(rec) == 200
    student = torch.zeros(200, 100, requires_grad=True)
    loss = kd(student, rec, rec.labels, T=4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()

    info = runner.invoke(app, ["inspect", str(a), "--json"])
    t = __import__("json").loads(info.output)["teachers"]["small_cnn"]
    assert t["kl_by_temperature"] is None and set(t["grad_sq_error_by_temperature"]) == {"1.0", "4.0"}
    assert runner.invoke(app, ["inspect", str(a)]).exit_code == 0
    res = runner.invoke(app, ["verify", str(a), "--teacher", "kdcache.models:small_cnn", "--samples", "16"])
    assert res.exit_code == 0, res.output
