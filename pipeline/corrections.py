"""Label-aware teacher corrections (none, swap, sort, LoCa): one implementation, dense or sparse.

Each correction is written once, as ``fn(z, y, rest_lse, **args) -> z'`` on a (B, n) block of raw
logits ``z`` holding the classes it may change, with ``y`` (B,) the label's column in that block and
``rest_lse(T)`` the (B,) logsumexp of z / T over the classes outside the block. The classes outside
the block must be left unchanged by the correction and never rank above the block's maximum.

- Dense logits (B, C): the block is the whole row, ``y`` the labels, nothing outside it.
- ``SparseLogits``: the block is [top-k values, label logit] (the label column is -inf when the label
  is already in the top-k), the outside is the record's tail. The corrected block is re-ranked; its
  k largest entries are the new top-k and the one left over, if any, moves into the tail by
  ``logaddexp`` at every declared temperature. swap and sort only move values between classes, and
  LoCa changes only the label logit (pushing it to the top), so the result equals the record of the
  corrected dense logits (tests/test_corrections.py holds the two paths equal).

Corrections leave samples whose teacher argmax is already the label unchanged. The store records
which correction its values carry; refusing to apply one twice is the store reader's job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from kdcache.sparse import SparseLogits
from kdcache.stores.errors import SpecError

RestLse = Callable[[float], Tensor]


def _gather(z: Tensor, col: Tensor) -> Tensor:
    return z.gather(1, col[:, None]).squeeze(1)


def _put(z: Tensor, col: Tensor, value: Tensor) -> Tensor:
    return z.scatter(1, col[:, None], value[:, None])


def none(z: Tensor, y: Tensor, rest_lse: RestLse) -> Tensor:
    """No correction."""
    return z


def swap(z: Tensor, y: Tensor, rest_lse: RestLse) -> Tensor:
    """SLD teacher swap: exchange the label logit and the max logit when the argmax is wrong.

    Limantoro et al., "Swapped Logit Distillation", arXiv 2504.20108 (Multimedia Systems 31:264,
    2025); official code StephenEkaputra/Swapped-Logit-Distillation, ``mdistiller/distillers/SLD.py``.
    """
    m = z.argmax(dim=1)
    z_y, z_m = _gather(z, y), _gather(z, m)
    return _put(_put(z, m, z_y), y, z_m)  # identity when m == y


def sort(z: Tensor, y: Tensor, rest_lse: RestLse) -> Tensor:
    """SortKD: the label gets the max; the classes ranked above it move down one rank.

    Limantoro, "Parameter-free logit distillation via sorting", arXiv 2508.16544 (IEEE SPL 2025);
    official code StephenEkaputra/SortKD, ``sort()`` in ``mdistiller/distillers/KD.py``. Same
    algorithm, with +inf instead of +1e9 to put the label first.
    """
    ranked = z.sort(dim=1, descending=True).values
    key = _put(z, y, torch.full_like(y, math.inf, dtype=z.dtype))
    order = key.argsort(dim=1, descending=True, stable=True)
    return torch.empty_like(z).scatter_(1, order, ranked)


def check_loca_args(alpha: float, temperature: float) -> None:
    """LoCa's arguments, checked before any work (stage one refuses them before creating a store)."""
    if not 0.0 < alpha < 1.0:
        raise SpecError(f"loca alpha must be in (0, 1) (so the label stays the strict argmax); got {alpha!r}: "
                        "pass e.g. --loca-alpha 0.9")
    if not (math.isfinite(temperature) and temperature > 0):
        raise SpecError(f"loca temperature must be > 0; got {temperature!r}: pass e.g. --loca-temperature 4")


def loca(z: Tensor, y: Tensor, rest_lse: RestLse, alpha: float = 0.9, temperature: float = 4.0) -> Tensor:
    """LoCa logit calibration at the KD temperature T, for samples whose teacher argmax is wrong.

    Yang, Wu, Yang, "LoCa: Logit Calibration for Knowledge Distillation", ECAI 2024, arXiv 2409.04778.
    With p = softmax(z / T), m the wrong argmax and s = alpha / (1 - p_y + p_m):
    p'_i = s * p_i for i != y and p'_y = 1 - s * (1 - p_y). So non-label ratios are kept, the sum is 1,
    and the label is the strict argmax for 0 < alpha < 1.

    Returned as logits z' with softmax(z' / T) = p': the non-label logits are kept as they are (a
    uniform shift, here 0, is free) and the label logit becomes
    z'_y = T * (logaddexp(z_m / T, log(1 - alpha) + lse_{i != y}(z_i / T)) - log alpha),
    which is the formula above solved for z'_y, in log space (no 1 - p cancellation).

    Sources: the paper's Eqs. 1-6 as transcribed in third-party paper notes (a Chinese reading-notes
    repo and the sciencestack.ai summary, which give s = alpha * sigma, sigma = 1 / (1 - p_gt + p_k));
    the full paper text was not available. Eq. 4 is stated "for wrong samples", so correct samples
    are left unchanged here. Unverified: that p is taken at the KD temperature T (rather than at
    T = 1 and re-tempered) and the per-dataset alpha; defaults alpha = 0.9 (notes: 0.9-1.0 works), T = 4.
    """
    check_loca_args(alpha, temperature)
    t = float(temperature)
    wrong = z.argmax(dim=1) != y
    others = _put(z, y, torch.full_like(z[:, 0], -math.inf))
    z_m = others.max(dim=1).values
    lse_others = torch.logaddexp((others / t).logsumexp(dim=1), rest_lse(t).to(z.dtype))
    new_y = t * (torch.logaddexp(z_m / t, math.log1p(-alpha) + lse_others) - math.log(alpha))
    return _put(z, y, torch.where(wrong, new_y, _gather(z, y)))


@dataclass(frozen=True)
class Correction:
    """A registered correction: its block function and its default arguments."""

    name: str
    fn: Callable[..., Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[..., None] | None = None  # validates the resolved arguments' values

    def args(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``given``; SpecError on an unknown argument or a bad value."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise SpecError(f"correction {self.name!r} has no argument {unknown[0]!r} (arguments: {allowed})")
        resolved = {**self.defaults, **given}
        if self.check is not None:
            self.check(**resolved)
        return resolved


CORRECTIONS: Mapping[str, Correction] = MappingProxyType(
    {
        "none": Correction("none", none),
        "swap": Correction("swap", swap),
        "sort": Correction("sort", sort),
        "loca": Correction("loca", loca, MappingProxyType({"alpha": 0.9, "temperature": 4.0}), check_loca_args),
    }
)


def get_correction(name: str) -> Correction:
    try:
        return CORRECTIONS[name]
    except KeyError:
        raise SpecError(f"unknown correction {name!r}; choose one of: {', '.join(CORRECTIONS)}") from None


def apply_correction(
    name: str, x: Tensor | SparseLogits, labels: Tensor | None = None, **args: Any
) -> Tensor | SparseLogits:
    """Apply correction ``name`` to dense raw logits (B, C) (labels required) or to a SparseLogits.

    Returns the same type. ``args`` override the correction's defaults (LoCa: alpha, temperature).
    """
    corr = get_correction(name)
    kwargs = corr.args(args)
    if isinstance(x, SparseLogits):
        if labels is not None:
            raise ValueError("apply_correction: a SparseLogits carries its labels; pass labels=None")
        return x if name == "none" else _correct_record(corr.fn, x, kwargs)
    if not isinstance(x, Tensor):  # e.g. a SampledLogits: its unsampled classes have no logits to move
        if name == "none":
            return x
        raise SpecError(f"correction {name!r} cannot be applied to a {type(x).__name__} record at train time; "
                        f"cache the store with --correction {name} instead")
    if labels is None:
        raise ValueError("apply_correction: dense logits need labels")
    if x.ndim != 2:
        raise ValueError(f"apply_correction: logits must be (B, C); got shape {tuple(x.shape)}")
    y = labels.to(device=x.device, dtype=torch.int64).reshape(-1)
    no_rest = torch.full_like(x[:, 0], -math.inf)
    return corr.fn(x, y, lambda t: no_rest, **kwargs)


def _correct_record(fn: Callable[..., Tensor], rec: SparseLogits, kwargs: Mapping[str, Any]) -> SparseLogits:
    """Run ``fn`` on the block [top-k, label] and rebuild the record (see the module docstring)."""
    k = rec.k
    match = rec.indices == rec.labels[:, None]
    inside = match.any(dim=1)
    y = torch.where(inside, match.long().argmax(dim=1), k)  # the label's column in the block
    block = torch.cat([rec.values, rec.label_logit.masked_fill(inside, -math.inf)[:, None]], dim=1)
    classes = torch.cat([rec.indices, rec.labels[:, None]], dim=1)

    out = fn(block, y, rec.tail_at, **kwargs)
    ranked, order = out.sort(dim=1, descending=True, stable=True)
    left_over = ranked[:, k]  # -inf when the label was in the top-k (its duplicate column)
    temps = torch.tensor(rec.temperatures, dtype=rec.tail_lse.dtype, device=rec.device)
    tail = torch.logaddexp(rec.tail_lse, left_over[:, None].to(rec.tail_lse.dtype) / temps)
    return SparseLogits(
        values=ranked[:, :k],
        indices=classes.gather(1, order[:, :k]),
        label_logit=_gather(out, y),
        labels=rec.labels,
        tail_lse=tail,
        temperatures=rec.temperatures,
        num_classes=rec.num_classes,
    )
