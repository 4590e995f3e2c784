"""kdcache.losses against independent float64 transcriptions of each paper's formula.

The references below are written from the formulas in docs/methods.md and the official code.
They share no code with pipeline/losses.py: plain float64 torch, explicit loops for swap, the NCKD
distribution computed by dropping the label column rather than with the -1000 trick.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.losses import LOSSES, get_loss, loss_temperatures, resolve_hparams
from kdcache.sparse import SparseLogits
from kdcache.stores.errors import SpecError

B, C = 16, 10

# ------------------------------------------------------------------------ float64 references


def log_softmax(z):
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def kl_rows(p, log_q):
    """sum_c p (log p - log q) per row, for strictly positive p."""
    return (p * (torch.log(p) - log_q)).sum(1)


def cross_entropy(z, y):
    return -log_softmax(z)[torch.arange(len(y)), y].mean()


def swap_rows(z, y):
    out = z.clone()
    for i in range(len(y)):
        m = int(torch.argmax(z[i]))
        if m != int(y[i]):
            out[i, m], out[i, y[i]] = z[i, y[i]], z[i, m]
    return out


def ref_ce(zs, zt, y, epoch):
    return cross_entropy(zs, y)


def ref_kd(zs, zt, y, epoch, T, w_ce, w_kd):
    p_t = torch.softmax(zt / T, dim=1)
    return w_ce * cross_entropy(zs, y) + w_kd * T**2 * kl_rows(p_t, log_softmax(zs / T)).mean()


def ref_dkd(zs, zt, y, epoch, w_ce, alpha, beta, T, warmup):
    rows = torch.arange(len(y))
    p_s, p_t = torch.softmax(zs / T, dim=1), torch.softmax(zt / T, dim=1)
    b_s = torch.stack([p_s[rows, y], 1 - p_s[rows, y]], dim=1)
    b_t = torch.stack([p_t[rows, y], 1 - p_t[rows, y]], dim=1)
    tckd = T**2 * kl_rows(b_t, torch.log(b_s)).mean()
    keep = torch.ones_like(zs, dtype=torch.bool)
    keep[rows, y] = False
    nt_s = zs[keep].view(len(y), -1) / T  # the C - 1 non-target logits
    nt_t = zt[keep].view(len(y), -1) / T
    nckd = T**2 * kl_rows(torch.softmax(nt_t, dim=1), log_softmax(nt_s)).mean()
    return w_ce * cross_entropy(zs, y) + min(epoch / warmup, 1.0) * (alpha * tckd + beta * nckd)


def _power_transform(zt, gamma):
    p_gamma = torch.softmax(zt, dim=1) ** gamma
    u = p_gamma.sum(1)
    return p_gamma / u[:, None], u


def ref_ttm(zs, zt, y, epoch, w_ce, gamma, beta):
    p_hat, _ = _power_transform(zt, gamma)
    return w_ce * cross_entropy(zs, y) + beta * kl_rows(p_hat, log_softmax(zs)).mean()


def ref_wttm(zs, zt, y, epoch, w_ce, gamma, beta):
    p_hat, u = _power_transform(zt, gamma)
    return w_ce * cross_entropy(zs, y) + beta * (u * kl_rows(p_hat, log_softmax(zs))).mean()


def ref_clkd(zs, zt, y, epoch, w_ce, mu, nu, beta):
    def rownorm(z):
        return z / torch.sqrt((z**2).sum(1, keepdim=True))

    def corr(z):
        d = z - z.mean(0)
        return d.T @ d / (z.shape[1] - 1)

    ins = ((rownorm(zs) - rownorm(zt)) ** 2).mean()
    cla = ((rownorm(zs.T) - rownorm(zt.T)) ** 2).mean()
    cc = ((corr(zs) - corr(zt)) ** 2).sum() / zs.shape[1] ** 2
    return w_ce * cross_entropy(zs, y) + mu * (ins + beta * cla) + nu * cc


def ref_sld(zs, zt, y, epoch, w_ce, w_kd, sld_start_epoch, temperatures, views=2, detach_pseudo=False):
    """One view's SLD loss (``views``, the linked views per step, is the trainer's: it sums over view groups)."""
    zt_sw, zs_sw = swap_rows(zt, y), swap_rows(zs, y)
    if detach_pseudo:
        zs_sw = zs_sw.detach()
    loss = w_ce * cross_entropy(zs, y)
    for T in temperatures:
        log_q = log_softmax(zs / T)
        loss = loss + w_kd * T**2 * kl_rows(torch.softmax(zt_sw / T, dim=1), log_q).mean()
        if epoch > sld_start_epoch:
            loss = loss + w_kd * T**2 * kl_rows(torch.softmax(zs_sw / T, dim=1), log_q).mean()
    return loss


REFS = {
    "ce": ref_ce,
    "kd": ref_kd,
    "dkd": ref_dkd,
    "ttm": ref_ttm,
    "wttm": ref_wttm,
    "clkd": ref_clkd,
    "sld": ref_sld,
}

# (loss, hyperparameter overrides, epoch): defaults plus the other configurations the notes list
CASES = [
    ("ce", {}, 1),
    ("kd", {}, 1),
    ("kd", {"T": 1.0, "w_ce": 0.5, "w_kd": 0.5}, 7),  # ImageNet config
    ("dkd", {}, 5),  # inside the warmup
    ("dkd", {}, 30),
    ("dkd", {"beta": 0.5, "T": 1.0, "warmup": 1}, 1),  # ImageNet r34->r18
    ("ttm", {}, 1),
    ("ttm", {"gamma": 0.3, "beta": 7.0}, 1),
    ("wttm", {}, 1),
    ("wttm", {"gamma": 0.8, "beta": 1.6}, 1),
    ("clkd", {}, 1),
    ("sld", {}, 150),  # student term still off
    ("sld", {}, 151),  # student term on
]
CASE_IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)]


# ------------------------------------------------------------------------ fixtures and helpers


def make_batch(seed=0, b=B, c=C):
    """float32 teacher/student logits and labels; some rows have a correct teacher or student."""
    rng = np.random.default_rng(seed)
    zt = (3.0 * rng.standard_normal((b, c))).astype(np.float32)
    zs = (2.0 * rng.standard_normal((b, c))).astype(np.float32)
    y = rng.integers(0, c, size=b)
    y[:3] = zt[:3].argmax(1)  # teacher right (swap is a no-op there)
    y[3:5] = zs[3:5].argmax(1)  # student right
    return torch.from_numpy(zs), torch.from_numpy(zt), torch.from_numpy(y).long()


def record(zt, y, name, hp, k=None):
    temps = tuple(sorted({1.0, *loss_temperatures(name, hp)}))
    return SparseLogits.from_dense(zt, y, k=zt.shape[1] if k is None else k, temperatures=temps)


def run(name, zs, zt, y, hp, epoch, k=None):
    """Implementation in float32 on the sparse record; returns (loss, grad wrt the student)."""
    zs = zs.clone().requires_grad_(True)
    loss = get_loss(name).fn(zs, record(zt, y, name, hp, k), y, epoch=epoch, **hp)
    loss.backward()
    return loss.detach(), zs.grad


def run_ref(name, zs, zt, y, hp, epoch, **extra):
    zs = zs.double().requires_grad_(True)
    loss = REFS[name](zs, zt.double(), y, epoch, **hp, **extra)
    loss.backward()
    return loss.detach(), zs.grad


# ------------------------------------------------------------------------ tests


def test_defaults_are_the_papers_cifar100_settings():
    assert {n: dict(s.defaults) for n, s in LOSSES.items()} == {
        "ce": {},
        "kd": {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9},
        "dkd": {"w_ce": 1.0, "alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20},
        "ttm": {"w_ce": 1.0, "gamma": 0.1, "beta": 100.0},
        "wttm": {"w_ce": 1.0, "gamma": 0.1, "beta": 3.0},
        "clkd": {"w_ce": 0.1, "mu": 0.5, "nu": 0.4, "beta": 2.0},
        "sld": {"w_ce": 0.1, "w_kd": 0.9, "sld_start_epoch": 150, "temperatures": (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
                "views": 2},
    }
    assert [n for n, s in LOSSES.items() if not s.needs_teacher] == ["ce"]
    # learning rates of the CIFAR-100 configs (ResNet/WRN students): mdistiller/TTM 0.05, SLD 0.025
    assert {n: s.lr for n, s in LOSSES.items()} == {n: 0.025 if n == "sld" else 0.05 for n in LOSSES}
    assert sorted(n for n, s in LOSSES.items() if s.linear_in_teacher) == ["ce", "kd", "ttm"]


def test_every_registered_loss_has_a_reference_and_cases():
    """A loss added to the registry without a reference transcription and a case would go untested."""
    assert set(REFS) == set(LOSSES)
    assert {name for name, _, _ in CASES} == set(LOSSES)


@pytest.mark.parametrize(("name", "overrides", "epoch"), CASES, ids=CASE_IDS)
def test_matches_float64_reference_and_gradients(name, overrides, epoch):
    zs, zt, y = make_batch()
    hp = resolve_hparams(name, overrides)
    loss, grad = run(name, zs, zt, y, hp, epoch)
    ref, ref_grad = run_ref(name, zs, zt, y, hp, epoch)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "overrides", "epoch"), CASES, ids=CASE_IDS)
def test_sparse_record(name, overrides, epoch):
    """k < C gives finite losses and gradients; k = C - 1 leaves at most one tail class, whose logit the
    tail statistics hold exactly, so it must equal the dense (k = C) record."""
    zs, zt, y = make_batch(seed=1)
    hp = resolve_hparams(name, overrides)
    dense, dense_grad = run(name, zs, zt, y, hp, epoch)
    for k in (1, 3, C - 2):
        loss, grad = run(name, zs, zt, y, hp, epoch, k=k)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss, grad = run(name, zs, zt, y, hp, epoch, k=C - 1)
    assert float(loss) == pytest.approx(float(dense), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-6)


def test_ce_needs_no_teacher():
    zs, _, y = make_batch()
    assert get_loss("ce").fn(zs, None, y) == pytest.approx(float(ref_ce(zs.double(), None, y, 1)))


def test_wttm_weight_is_exact_on_a_sparse_record():
    """With T = 1 and 1/gamma declared, the WTTM sample weight read from a top-3 record is the dense
    U = sum_j softmax(z_t)_j^gamma, not the power sum of the uniform-tail reconstruction."""
    zs, zt, y = make_batch(seed=2)
    hp = resolve_hparams("wttm", {"w_ce": 0.0})
    rec = record(zt, y, "wttm", hp, k=3)
    loss = LOSSES["wttm"].fn(zs, rec, y, **hp)
    _, u = _power_transform(zt.double(), hp["gamma"])
    kl = kl_rows(rec.log_probs(1.0 / hp["gamma"]).double().exp(), log_softmax(zs.double()))
    assert float(loss) == pytest.approx(float(hp["beta"] * (u * kl).mean()), rel=1e-5)


@pytest.mark.parametrize("epoch", [1, 5, 10, 19, 20, 40])
def test_dkd_warmup_scales_the_kd_part(epoch):
    zs, zt, y = make_batch()
    hp = resolve_hparams("dkd", {})
    rec = record(zt, y, "dkd", hp)
    ce = hp["w_ce"] * torch.nn.functional.cross_entropy(zs, y)
    full = LOSSES["dkd"].fn(zs, rec, y, epoch=hp["warmup"], **hp) - ce
    part = LOSSES["dkd"].fn(zs, rec, y, epoch=epoch, **hp) - ce
    assert float(full) > 0
    assert float(part) == pytest.approx(min(epoch / hp["warmup"], 1.0) * float(full), rel=1e-5)


def test_sld_student_term_schedule_and_gradient():
    zs, zt, y = make_batch()
    hp = resolve_hparams("sld", {})
    rec = record(zt, y, "sld", hp)
    fn = LOSSES["sld"].fn
    off = [float(fn(zs, rec, y, epoch=e, **hp)) for e in (1, 100, 150)]
    assert off[0] == off[1] == off[2]
    on = float(fn(zs, rec, y, epoch=151, **hp))
    assert on > off[0]  # the student is wrong on most rows
    # a student that is right on every row: its swap is the identity and the term is zero
    right = zs.clone()
    right[torch.arange(B), y] = right.max(1).values + 1.0
    assert float(fn(right, rec, y, epoch=151, **hp)) == pytest.approx(float(fn(right, rec, y, epoch=1, **hp)))
    # the pseudo-teacher is NOT detached (official SLD.py): gradients differ from a detached target
    _, grad = run("sld", zs, zt, y, hp, 151)
    _, detached = run_ref("sld", zs, zt, y, hp, 151, detach_pseudo=True)
    _, attached = run_ref("sld", zs, zt, y, hp, 151)
    torch.testing.assert_close(grad.double(), attached, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grad.double(), detached, rtol=1e-3, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 6),
    c=st.integers(2, 12),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 30.0),
    T=st.sampled_from([1.0, 2.0, 4.0]),
    data=st.data(),
)
def test_kd_is_at_least_weighted_ce(b, c, seed, scale, T, data):
    """KL >= 0, so kd >= w_ce * CE, for dense and sparse records alike."""
    rng = np.random.default_rng(seed)
    zt = torch.from_numpy((scale * rng.standard_normal((b, c))).astype(np.float32))
    zs = torch.from_numpy((scale * rng.standard_normal((b, c))).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, c, size=b)).long()
    k = data.draw(st.integers(1, c))
    hp = resolve_hparams("kd", {"T": T})
    loss = LOSSES["kd"].fn(zs, record(zt, y, "kd", hp, k=k), y, **hp)
    ce = hp["w_ce"] * torch.nn.functional.cross_entropy(zs, y)
    assert math.isfinite(float(loss))
    assert float(loss) >= float(ce) - 1e-5 * (1.0 + abs(float(ce)))


# ------------------------------------------------------------------------ generic properties, over the registry
# Every loss in LOSSES, at its defaults and at an epoch where every term is on (DKD past its warm-up,
# SLD's student term active).
ALL_ON = 1000
REGISTERED = sorted(LOSSES)
NEEDS_TEACHER = sorted(n for n, s in LOSSES.items() if s.needs_teacher)


def loss_and_grad(fn, zs, teacher, y, hp, epoch=ALL_ON):
    zs = zs.clone().requires_grad_(True)
    loss = fn(zs, teacher, y, epoch=epoch, **hp)
    loss.backward()
    return loss.detach(), zs.grad


def teacher_effect(fn, hp, k=None, seed=3):
    """How much swapping the teacher for another changes (loss, gradient wrt the student): the same
    student logits and labels, two different teachers' records."""
    zs, zt, y = make_batch(seed)
    _, other, _ = make_batch(seed + 100)
    temps = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0)  # every default loss temperature: the tail is exact there
    records = [SparseLogits.from_dense(t, y, k or C, temperatures=temps) for t in (zt, other)]
    (l1, g1), (l2, g2) = (loss_and_grad(fn, zs, r, y, hp) for r in records)
    return abs(float(l1) - float(l2)), float((g1 - g2).abs().max())


@pytest.mark.parametrize("name", NEEDS_TEACHER)
@pytest.mark.parametrize("k", [None, 3], ids=["dense", "top3"])
def test_a_different_teacher_changes_the_loss_and_its_gradient(name, k):
    """Fails for a loss that ignores its teacher (or reads only the labels from it)."""
    d_loss, d_grad = teacher_effect(LOSSES[name].fn, resolve_hparams(name), k)
    assert d_loss > 1e-4, f"{name}: the loss does not depend on the teacher"
    assert d_grad > 1e-5, f"{name}: the gradient does not depend on the teacher"


def test_the_teacher_effect_check_catches_a_loss_that_ignores_its_teacher():
    def ignores_teacher(student_logits, teacher, labels, *, epoch=1, T=4.0):
        return torch.nn.functional.cross_entropy(student_logits / T, labels)

    assert teacher_effect(ignores_teacher, {"T": 4.0}) == (0.0, 0.0)
    assert teacher_effect(LOSSES["ce"].fn, {}) == (0.0, 0.0)  # ce: needs_teacher is False, and it is not read


@pytest.mark.parametrize("name", REGISTERED)
def test_finite_float32_scalar_with_a_gradient_at_every_record_size(name):
    zs, zt, y = make_batch(seed=4)
    hp = resolve_hparams(name)
    for k in (1, 3, C):
        loss, grad = loss_and_grad(LOSSES[name].fn, zs, record(zt, y, name, hp, k), y, hp)
        assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", REGISTERED)
def test_invariant_to_the_order_of_rows_and_of_classes(name):
    """Permuting the batch, or renaming the classes consistently (student, teacher and labels), changes
    nothing: a loss must not pair a student row with another row's teacher, nor depend on class ids."""
    zs, zt, y = make_batch(seed=5)
    hp = resolve_hparams(name)
    fn = LOSSES[name].fn
    base, grad = loss_and_grad(fn, zs, record(zt, y, name, hp, k=4), y, hp)
    rows = torch.randperm(B, generator=torch.Generator().manual_seed(0))
    loss, g = loss_and_grad(fn, zs[rows], record(zt[rows], y[rows], name, hp, k=4), y[rows], hp)
    assert float(loss) == pytest.approx(float(base), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g, grad[rows], rtol=1e-4, atol=1e-6)
    cls = torch.randperm(C, generator=torch.Generator().manual_seed(1))  # new class j is old class cls[j]
    new_label = torch.argsort(cls)[y]
    loss, g = loss_and_grad(fn, zs[:, cls], record(zt[:, cls], new_label, name, hp, k=4), new_label, hp)
    assert float(loss) == pytest.approx(float(base), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g, grad[:, cls], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NEEDS_TEACHER)
def test_reads_the_teacher_only_at_its_declared_temperatures(name):
    """``LossSpec.temperatures`` is what the trainer checks the store's tail against. A top-3 record
    declaring only those temperatures must give the same loss as one declaring many more: a loss reading
    the teacher at an unlisted T would get the uniform T=1 tail there instead of the exact tail mass."""
    zs, zt, y = make_batch(seed=6)
    hp = resolve_hparams(name)
    fn = LOSSES[name].fn
    needed = loss_temperatures(name, hp)
    minimal = SparseLogits.from_dense(zt, y, 3, temperatures=(1.0, *needed))
    rich = SparseLogits.from_dense(zt, y, 3, temperatures=(0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, *needed))
    (l1, g1), (l2, g2) = loss_and_grad(fn, zs, minimal, y, hp), loss_and_grad(fn, zs, rich, y, hp)
    assert float(l1) == pytest.approx(float(l2), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_loss_temperatures():
    assert loss_temperatures("ce") == ()
    assert loss_temperatures("kd") == (4.0,)
    assert loss_temperatures("dkd", {"T": 1}) == (1.0,)
    assert loss_temperatures("ttm") == (10.0,)
    assert loss_temperatures("wttm", {"gamma": 0.5}) == (1.0, 2.0)
    assert loss_temperatures("clkd") == (1.0,)
    assert loss_temperatures("sld") == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert loss_temperatures("sld", {"temperatures": "1,4"}) == (1.0, 4.0)


def test_resolve_hparams():
    assert resolve_hparams("kd", {"T": "2", "w_kd": 1}) == {"T": 2.0, "w_ce": 0.1, "w_kd": 1.0}
    assert resolve_hparams("dkd", {"warmup": "5"})["warmup"] == 5
    assert resolve_hparams("kd", {"w_ce": 0})["w_ce"] == 0.0
    with pytest.raises(SpecError, match=r"unknown hyperparameter tau for loss 'kd'; valid: T, w_ce, w_kd"):
        resolve_hparams("kd", {"tau": 2.0})
    with pytest.raises(SpecError, match="valid: none"):
        resolve_hparams("ce", {"T": 2.0})
    valid = "ce, kd, dkd, ttm, wttm, clkd, sld"
    with pytest.raises(SpecError, match=f"unknown loss 'kdd'; valid losses: {valid}"):
        resolve_hparams("kdd", {})
    with pytest.raises(SpecError, match="must be of type float"):
        resolve_hparams("kd", {"T": "hot"})
    with pytest.raises(SpecError, match="must be of type int"):
        resolve_hparams("dkd", {"warmup": 2.5})
    for name, bad in [
        ("kd", {"T": 0}),
        ("ttm", {"gamma": 0}),
        ("kd", {"w_kd": -1}),
        ("sld", {"temperatures": ()}),
        ("kd", {"T": float("nan")}),
    ]:
        with pytest.raises(SpecError, match="must be finite"):
            resolve_hparams(name, bad)
    with pytest.raises(SpecError, match="unknown loss"):
        get_loss("nope")
