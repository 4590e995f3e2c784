"""Student-side distillation losses that read the teacher from a cached ``SparseLogits`` record.

Every loss has the same signature::

    fn(student_logits (B, C), teacher: SparseLogits | None, labels (B,), *, epoch=1, **hp) -> scalar

``epoch`` is 1-based, as in mdistiller. The teacher is read only through ``teacher.log_probs(T)``
(log-probabilities of the record at temperature T) and ``teacher.logits()`` (raw logits). Both are
exact when the record is dense (k == C). At k < C, the top-k classes and the label stay exact and the
other classes share the stored tail mass (see pipeline/sparse.py). ``LossSpec.temperatures(hp)`` lists
the temperatures a loss reads the teacher at. The trainer checks that the store declares tail statistics
at those temperatures, because the tail mass is exact only there.

Each function follows the official code of its paper on dense inputs (tests/test_losses.py checks each
one against an independent float64 transcription of the formula). Defaults are the papers' CIFAR-100
settings (formulas and references: docs/methods.md):

=====  ==========================================================================================
ce     cross-entropy only (no teacher)
kd     Hinton et al. 2015; megvii-research/mdistiller mdistiller/distillers/KD.py
dkd    Zhao et al., CVPR 2022; mdistiller mdistiller/distillers/DKD.py
ttm    Zheng & Yang, ICLR 2024; zkxufo/TTM distiller_zoo/ttm.py
wttm   Zheng & Yang, ICLR 2024; zkxufo/TTM distiller_zoo/wttm.py
clkd   Zhang et al., arXiv 2211.14773; NO official code, the structure is UNVERIFIED (see ``clkd``)
sld    Limantoro et al. 2025 (arXiv 2504.20108); StephenEkaputra/Swapped-Logit-Distillation
       mdistiller/distillers/SLD.py
=====  ==========================================================================================

Corrections (``--correction swap|sort|loca``) are applied to the record before it reaches a loss, so
they compose with every loss here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.corrections import apply_correction
from kdcache.stores.errors import SpecError

if TYPE_CHECKING:
    from kdcache.sparse import SparseLogits


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) = sum_c p_c (log p_c - log q_c), shape (B,). p = 0 contributes 0.

    The target goes in as probabilities (as in the official code), so gradients also flow through p
    when it depends on the student (the SLD pseudo-teacher).
    """
    return F.kl_div(log_q, log_p.exp(), reduction="none").sum(1)


def ce(student_logits: Tensor, teacher: SparseLogits | None, labels: Tensor, *, epoch: int = 1) -> Tensor:
    """Plain cross-entropy on the hard labels. The teacher is ignored and may be None."""
    return F.cross_entropy(student_logits, labels)


def kd(
    student_logits: Tensor,
    teacher: SparseLogits,
    labels: Tensor,
    *,
    epoch: int = 1,
    T: float = 4.0,
    w_ce: float = 0.1,
    w_kd: float = 0.9,
) -> Tensor:
    """Hinton KD, as in mdistiller ``KD.py``.

    L = w_ce * CE(z_s, y) + w_kd * T^2 * mean_b sum_c KL(softmax(z_t/T) || softmax(z_s/T)).
    The KL is summed over classes and averaged over the batch. CIFAR-100: T=4, w_ce=0.1, w_kd=0.9.
    """
    log_q = F.log_softmax(student_logits / T, dim=1)
    loss_kd = _kl(teacher.log_probs(T), log_q).mean() * T**2
    return w_ce * F.cross_entropy(student_logits, labels) + w_kd * loss_kd


def dkd(
    student_logits: Tensor,
    teacher: SparseLogits,
    labels: Tensor,
    *,
    epoch: int = 1,
    w_ce: float = 1.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
    warmup: int = 20,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022), line for line as in mdistiller ``DKD.py``.

    TCKD: KL between the binary splits b = [p_gt, 1 - p_gt] at T (student side: ``log`` of the summed
    probabilities). NCKD: KL between softmax(z/T - 1000 * onehot(y)), i.e. the distributions over the
    non-target classes. Both are summed over the batch, divided by B and multiplied by T^2.
    L = w_ce * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD).
    CIFAR-100 (res32x4->res8x4): w_ce=1, alpha=1, beta=8, T=4, warmup=20.

    The teacher enters as log-probabilities at T. Subtracting 1000 at the label and taking a softmax
    gives the same result whether it starts from the logits / T or from the log-probabilities, because
    softmax ignores a per-row shift.
    """
    batch = labels.shape[0]
    gt = F.one_hot(labels, student_logits.shape[1]).bool()
    log_p_t = teacher.log_probs(T)

    def binary(p: Tensor) -> Tensor:  # mdistiller cat_mask: [p_gt, sum of the others]
        return torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], dim=1)

    b_s = binary(F.softmax(student_logits / T, dim=1))
    b_t = binary(log_p_t.exp())
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T**2 / batch
    p2_t = F.softmax(log_p_t - 1000.0 * gt, dim=1)
    log_p2_s = F.log_softmax(student_logits / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p2_s, p2_t, reduction="sum") * T**2 / batch
    scale = min(epoch / warmup, 1.0)
    return w_ce * F.cross_entropy(student_logits, labels) + scale * (alpha * tckd + beta * nckd)


def ttm(
    student_logits: Tensor,
    teacher: SparseLogits,
    labels: Tensor,
    *,
    epoch: int = 1,
    w_ce: float = 1.0,
    gamma: float = 0.1,
    beta: float = 100.0,
) -> Tensor:
    """Transformed Teacher Matching (Zheng & Yang, ICLR 2024), as in zkxufo/TTM ``distiller_zoo/ttm.py``.

    The teacher is power-transformed: p_t^gamma / sum_j p_t,j^gamma = softmax(gamma * z_t), i.e. the
    record's log-probabilities at T = 1/gamma. The student is NOT temperature-scaled and there is no
    T^2 factor. L = w_ce * CE + beta * mean_b KL(softmax(gamma z_t) || softmax(z_s)). The official
    ``train_student.py`` is run with ``-r 1 -a 0 -b beta``. Defaults: res32x4->res8x4 row of Table 8
    (gamma=0.1, beta=100).
    """
    kl = _kl(teacher.log_probs(1.0 / gamma), F.log_softmax(student_logits, dim=1))
    return w_ce * F.cross_entropy(student_logits, labels) + beta * kl.mean()


def wttm(
    student_logits: Tensor,
    teacher: SparseLogits,
    labels: Tensor,
    *,
    epoch: int = 1,
    w_ce: float = 1.0,
    gamma: float = 0.1,
    beta: float = 3.0,
) -> Tensor:
    """Weighted TTM (Zheng & Yang, ICLR 2024), as in zkxufo/TTM ``distiller_zoo/wttm.py``.

    L = w_ce * CE + beta * mean_b [U_b * KL(softmax(gamma z_t) || softmax(z_s))], with the sample
    weight U = sum_j p_t,j^gamma and p_t = softmax(z_t) (the T = 1 teacher), which is the official
    code's ``norm``. Defaults: res32x4->res8x4 row of Table 8 (gamma=0.1, beta=3).

    Because sum_j p_j^gamma = exp(lse(gamma z) - gamma lse(z)), we have
    log U = gamma * log p_1[c] - log p_{1/gamma}[c] for any class c whose logit is exact. We evaluate it
    at the label, which is always exact in the record. On a dense record this equals the code's sum. On
    a sparse record it is U of the true logits whenever both temperatures 1 and 1/gamma are declared in
    the store, whereas summing the reconstructed probabilities would put the tail mass on a uniform spread.
    """
    log_p = teacher.log_probs(1.0 / gamma)
    at_label = teacher.labels[:, None]
    log_u = gamma * teacher.log_probs(1.0).gather(1, at_label) - log_p.gather(1, at_label)
    kl = _kl(log_p, F.log_softmax(student_logits, dim=1))
    return w_ce * F.cross_entropy(student_logits, labels) + beta * (log_u.squeeze(1).exp() * kl).mean()


def _class_correlation(z: Tensor) -> Tensor:
    """(C, C) matrix (Z - mean_batch)^T (Z - mean_batch) / (C - 1), as in the reimplementation."""
    d = z - z.mean(0, keepdim=True)
    return d.T @ d / (z.shape[1] - 1)


def clkd(
    student_logits: Tensor,
    teacher: SparseLogits,
    labels: Tensor,
    *,
    epoch: int = 1,
    w_ce: float = 0.1,
    mu: float = 0.5,
    nu: float = 0.4,
    beta: float = 2.0,
) -> Tensor:
    """Class-aware Logit KD (Zhang, Liu, Hopcroft, He; arXiv 2211.14773). UNVERIFIED, no official code.

    The paper's body and code were not available. This follows the structure that two independent
    third-party reimplementations share (docs/methods.md, "clkd"), on raw logits without
    softmax or temperature:
      L_ins = MSE(rownorm(Z_s), rownorm(Z_t))   each sample's logit vector L2-normalised; mean over B*C
      L_cla = MSE(colnorm(Z_s), colnorm(Z_t))   each class's column over the BATCH L2-normalised
      L_cc  = ||B_s - B_t||_F^2 / C^2           B = (Z - mean_batch)^T (Z - mean_batch) / (C - 1), C x C
      L = w_ce * CE + mu * (L_ins + beta * L_cla) + nu * L_cc
    ``w_ce`` is the paper's lambda. Defaults lambda=0.1, mu=0.5, nu=0.4, beta=2.0 come from the
    reimplementations. Unverified: C x C vs B x B correlation (the two reimplementations disagree),
    squared vs plain Frobenius norm (they disagree), the 1/(C-1) scaling and all four weights.
    L_cla and L_cc are batch-level terms, so the loss depends on how rows are grouped into batches.
    At k < C the tail classes' raw logits are the uniform reconstruction of ``teacher.logits()``.
    """
    z_s, z_t = student_logits, teacher.logits()
    num_classes = z_s.shape[1]
    loss_ins = F.mse_loss(F.normalize(z_s, dim=1), F.normalize(z_t, dim=1))
    loss_cla = F.mse_loss(F.normalize(z_s, dim=0), F.normalize(z_t, dim=0))
    loss_cc = (_class_correlation(z_s) - _class_correlation(z_t)).pow(2).sum() / num_classes**2
    loss_ce = F.cross_entropy(z_s, labels)
    return w_ce * loss_ce + mu * (loss_ins + beta * loss_cla) + nu * loss_cc


def sld(
    student_logits: Tensor,
    teacher: SparseLogits,
    labels: Tensor,
    *,
    epoch: int = 1,
    w_ce: float = 0.1,
    w_kd: float = 0.9,
    sld_start_epoch: int = 150,
    temperatures: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
    views: int = 2,
) -> Tensor:
    """Swapped Logit Distillation (Limantoro et al. 2025, arXiv 2504.20108): the loss of one view.

    Follows StephenEkaputra/Swapped-Logit-Distillation ``mdistiller/distillers/SLD.py``. The teacher
    logits are swapped (the label's logit and the max logit exchange places when the teacher is wrong).
    After ``sld_start_epoch`` (hard-coded gamma = 150 in the code; active for epoch > 150) the student's
    own swapped logits serve as a second, pseudo-teacher target. As in the code, that clone is NOT
    detached, so gradients also flow through the target side. For each T in ``temperatures`` (the code
    SUMS over T = 1..6):
      L = w_ce * CE + sum_T w_kd * T^2 * [KL(swap(z_t)/T || z_s/T)
                                          + 1[epoch > start] * KL(swap(z_s)/T || z_s/T)]
    with softmaxes implied and each KL summed over classes, averaged over the batch.
    Defaults: CIFAR cfg w_ce=0.1, w_kd=0.9.

    The official training is two-view: a weak crop-flip view and an independent strong RandAugment +
    Cutout view of every row, the CE and KD terms summed over both (``SLD.forward_train``). That is
    this function on each view group of a store with two groups, summed (``kdcache.train.step_loss``;
    tests/test_view_groups.py checks it in float64 against a transcription). ``views`` is how many
    linked views a step trains on: 2 (the paper) needs such a store, 1 trains one view per step on any
    store; ``kdcache.loader.check_policy_use`` refuses a mismatch. Swap is idempotent, so a store written
    with ``--correction swap`` gives the same teacher side.
    """
    teacher_swapped = apply_correction("swap", teacher)
    student_swapped = apply_correction("swap", student_logits, labels)  # not detached, as in SLD.py
    loss = w_ce * F.cross_entropy(student_logits, labels)
    for T in temperatures:
        log_q = F.log_softmax(student_logits / T, dim=1)
        loss = loss + w_kd * T**2 * _kl(teacher_swapped.log_probs(T), log_q).mean()
        if epoch > sld_start_epoch:
            log_pseudo = F.log_softmax(student_swapped / T, dim=1)
            loss = loss + w_kd * T**2 * _kl(log_pseudo, log_q).mean()
    return loss


# ----------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function, its default hyperparameters (read-only), whether it reads a
    teacher, ``temperatures(hp)``: the temperatures at which it reads ``teacher.log_probs``, and
    ``linear_in_teacher``: the gradient is linear in the teacher's probabilities, so a sampled record's
    unbiased p̂ (Anshumann et al. 2025) gives an unbiased gradient; other losses normalise, re-weight or
    read raw logits and would be biased on it."""

    fn: Callable[..., Tensor]
    defaults: Mapping[str, Any]
    needs_teacher: bool
    temperatures: Callable[[Mapping[str, Any]], tuple[float, ...]]
    linear_in_teacher: bool = False
    lr: float = 0.05  # the paper's CIFAR-100 SGD learning rate (ResNet/WRN students, batch 64)
    reads_label: bool = False  # it reads the label's logit (DKD's target split, SLD's swap): one label per row


def _spec(fn: Callable[..., Tensor], temperatures, needs_teacher: bool = True,
          linear_in_teacher: bool = False, lr: float = 0.05, reads_label: bool = False) -> LossSpec:
    """Register ``fn`` with the keyword defaults of its own signature (one source of truth)."""
    params = inspect.signature(fn).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "epoch"}
    return LossSpec(fn, MappingProxyType(defaults), needs_teacher, temperatures, linear_in_teacher, lr, reads_label)


LOSSES: dict[str, LossSpec] = {
    "ce": _spec(ce, lambda hp: (), needs_teacher=False, linear_in_teacher=True),
    "kd": _spec(kd, lambda hp: (float(hp["T"]),), linear_in_teacher=True),
    "dkd": _spec(dkd, lambda hp: (float(hp["T"]),), reads_label=True),
    "ttm": _spec(ttm, lambda hp: (1.0 / hp["gamma"],), linear_in_teacher=True),
    "wttm": _spec(wttm, lambda hp: (1.0, 1.0 / hp["gamma"])),
    "clkd": _spec(clkd, lambda hp: (1.0,)),  # raw logits: the tail is reconstructed from its T=1 mass
    # SLD's CIFAR-100 configs train ResNet/WRN/VGG8 students at LR 0.025 (docs/methods.md, "sld")
    "sld": _spec(sld, lambda hp: tuple(float(t) for t in hp["temperatures"]), lr=0.025, reads_label=True),
}


def get_loss(name: str) -> LossSpec:
    """The registered ``LossSpec`` for ``name``, or a SpecError listing the valid losses."""
    if name not in LOSSES:
        raise SpecError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """Cast an override (possibly a CLI string) to the type of the default, or raise a SpecError."""
    try:
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else value
            return tuple(float(v) for v in items)
        if isinstance(default, int):
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        return float(value)
    except (TypeError, ValueError):
        raise SpecError(
            f"hyperparameter {key}={value!r} of loss {name!r} must be of type {type(default).__name__}"
        ) from None


_POSITIVE = {"T", "gamma", "warmup", "temperatures", "views"}  # the rest (weights, start epoch) may be 0


def resolve_hparams(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The loss's defaults updated with ``overrides``. Unknown names and bad values raise SpecError."""
    spec = get_loss(name)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(spec.defaults))
    if unknown:
        valid = ", ".join(spec.defaults) or "none"
        raise SpecError(f"unknown hyperparameter {', '.join(unknown)} for loss {name!r}; valid: {valid}")
    hp = dict(spec.defaults)
    hp.update({k: _coerce(name, k, v, spec.defaults[k]) for k, v in overrides.items()})
    for key, value in hp.items():
        values = value if isinstance(value, tuple) else (value,)
        positive = key in _POSITIVE
        if not values or not all(math.isfinite(v) and (v > 0 if positive else v >= 0) for v in values):
            need = "> 0" if positive else ">= 0"
            raise SpecError(f"hyperparameter {key}={value!r} of loss {name!r} must be finite and {need}")
    return hp


def loss_temperatures(name: str, hp: Mapping[str, Any] | None = None) -> tuple[float, ...]:
    """The temperatures at which loss ``name`` reads the teacher under ``hp`` (defaults filled in)."""
    return get_loss(name).temperatures(resolve_hparams(name, hp))
