"""Compact teacher records: top-k logits + the label logit + tail log-sum-exps, and back to dense.

CONTRACT (other modules rely on exactly this; see also docs/CONTRACTS.md)

``SparseLogits`` fields, all torch tensors on one device, batch dimension B first:

  values       (B, k) float32  top-k raw logits, sorted descending (values[:, 0] is the max)
  indices      (B, k) int64    their class ids
  label_logit  (B,)   float32  raw logit of the label class (whether or not it is in the top-k)
  labels       (B,)   int64    the label class ids
  tail_lse     (B, S) float32  for each declared temperature T_j: logsumexp_c (z_c / T_j) over the
                               "rest" classes c = not in the top-k and not the label; -inf when the
                               rest is empty (e.g. k == num_classes)
  temperatures tuple[float, ...] of length S, the T_j above, ascending; always contains 1.0
  num_classes  int

(float64 logits given to ``from_dense`` stay float64, for reference tests; anything narrower than
float32, e.g. AMP half logits, is widened to float32 first.)

Because the tail statistics are symmetric functions of the rest-logits (log-sum-exp), label-based
permutations of the logits (swap, sort) and uniform shifts of the non-label logits (LoCa) map a
record to the record of the corrected dense logits exactly (``pipeline/corrections.py``).

Reconstruction (``log_probs(T)``): top-k classes and the label get their exact logits / T; the
n_rest = C - k - [label not in top-k] rest classes share the tail mass uniformly: each gets
``tail_lse[:, j] - log(n_rest)`` when T == T_j is declared, else ``(tail_lse_at_1 - log(n_rest)) / T``
(uniform raw logits whose mass at T = 1 is exact). ``logits()`` is the same at T = 1 in raw-logit
space (used by CLKD, which needs raw logits, not log-probabilities).

``kl_to_dense(dense_logits, record, T)`` is the error metric that ``inspect`` and the benchmarks
report: KL(softmax(z / T) || reconstruction at T) per row, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kdcache.stores.errors import SpecError

_NEG_INF = float("-inf")


def check_k(k: int, num_classes: int) -> int:
    """Return ``k`` if 1 <= k <= num_classes, else raise a one-line SpecError."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        raise SpecError(f"--k must be between 1 and {num_classes} (the number of classes); got {k!r}")
    return k


def check_temperatures(temperatures: Iterable[float]) -> tuple[float, ...]:
    """Sorted, de-duplicated temperatures with 1.0 added; SpecError unless all are finite and > 0."""
    temps = [float(t) for t in temperatures]
    bad = [t for t in temps if not (math.isfinite(t) and t > 0)]
    if bad:
        raise SpecError(f"temperatures must be finite and > 0; got {bad[0]!r}")
    return tuple(sorted(set(temps) | {1.0}))


@dataclass(frozen=True, eq=False)
class SparseLogits:
    """A batch of sparse teacher records (see the module docstring for the field contract)."""

    values: Tensor
    indices: Tensor
    label_logit: Tensor
    labels: Tensor
    tail_lse: Tensor
    temperatures: tuple[float, ...]
    num_classes: int

    def __post_init__(self) -> None:
        # Shape checks only: no value checks, which would synchronise a GPU.
        temps = tuple(float(t) for t in self.temperatures)
        object.__setattr__(self, "temperatures", temps)
        b, k = self.values.shape
        if self.indices.shape != (b, k) or self.label_logit.shape != (b,) or self.labels.shape != (b,):
            raise ValueError("SparseLogits: values/indices must be (B, k), label_logit/labels (B,)")
        if self.tail_lse.shape != (b, len(temps)):
            raise ValueError(f"SparseLogits: tail_lse must be (B, {len(temps)}), got {tuple(self.tail_lse.shape)}")
        if 1.0 not in temps:
            raise ValueError("SparseLogits: temperatures must contain 1.0")
        check_k(k, self.num_classes)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, logits: Tensor, labels: Tensor, k: int, temperatures: Iterable[float] = (1.0,)) -> SparseLogits:
        """The record of dense raw logits (B, C): top-k, label logit, tail logsumexp at each T."""
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, C); got shape {tuple(logits.shape)}")
        num_classes = logits.shape[1]
        check_k(k, num_classes)
        temps = check_temperatures(temperatures)
        z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        labels = labels.to(device=z.device, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != z.shape[0]:
            raise ValueError(f"labels must be ({z.shape[0]},); got {labels.shape[0]} labels")

        top = z.topk(k, dim=1, largest=True, sorted=True)
        label_logit = z.gather(1, labels[:, None]).squeeze(1)
        # "rest" = neither top-k nor label. Mask to -inf and logsumexp (never subtract masses).
        is_rest = torch.ones_like(z, dtype=torch.bool)
        is_rest.scatter_(1, top.indices, False).scatter_(1, labels[:, None], False)
        tail = torch.stack(
            [(z if t == 1.0 else z / t).masked_fill(~is_rest, _NEG_INF).logsumexp(dim=1) for t in temps],
            dim=1,
        )
        return cls(top.values, top.indices, label_logit, labels, tail, temps, num_classes)

    @classmethod
    def concat(cls, records: Sequence[SparseLogits]) -> SparseLogits:
        """Stack records along the batch; they must share k, temperatures and num_classes."""
        if not records:
            raise ValueError("concat needs at least one record")
        first = records[0]
        for r in records[1:]:
            if (r.k, r.temperatures, r.num_classes) != (first.k, first.temperatures, first.num_classes):
                raise ValueError("concat: records differ in k, temperatures or num_classes")
        return cls(
            *(torch.cat([getattr(r, f) for r in records]) for f in _TENSOR_FIELDS),
            first.temperatures,
            first.num_classes,
        )

    # ------------------------------------------------------------------ basics
    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __len__(self) -> int:
        return self.values.shape[0]

    def to(self, device: torch.device | str) -> SparseLogits:
        return replace(self, **{f: getattr(self, f).to(device) for f in _TENSOR_FIELDS})

    def index(self, sel: Tensor | slice | Sequence[int]) -> SparseLogits:
        """Select rows (index tensor, bool mask or slice)."""
        return replace(self, **{f: getattr(self, f)[sel] for f in _TENSOR_FIELDS})

    # ------------------------------------------------------------------ tail statistics
    def label_in_topk(self) -> Tensor:
        """(B,) bool: the label is one of the top-k classes."""
        return (self.indices == self.labels[:, None]).any(dim=1)

    def num_rest(self) -> Tensor:
        """(B,) int64: how many classes the tail statistics cover."""
        return self.num_classes - self.k - (~self.label_in_topk()).long()

    def temperature_index(self, temperature: float) -> int | None:
        """Column of ``tail_lse`` for this temperature, or None if it was not declared."""
        for j, t in enumerate(self.temperatures):
            if math.isclose(t, temperature, rel_tol=1e-9, abs_tol=0.0):
                return j
        return None

    def tail_at(self, temperature: float) -> Tensor:
        """(B,) exact logsumexp of z / T over the rest classes; SpecError if T was not declared.

        Corrections that need the exact non-label mass at T (LoCa) use this.
        """
        j = self.temperature_index(temperature)
        if j is not None:
            return self.tail_lse[:, j]
        if self.k == self.num_classes:  # no rest classes: exact at any temperature
            return self.tail_lse[:, 0]
        raise SpecError(
            f"the record has no tail statistics at T={temperature:g} (declared: "
            f"{', '.join(f'{t:g}' for t in self.temperatures)}); re-teach with that temperature declared"
        )

    # ------------------------------------------------------------------ reconstruction
    def scaled_logits(self, temperature: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
        """(B, C) reconstructed logits / T, before normalisation (see the module docstring)."""
        if not temperature > 0:
            raise SpecError(f"temperature must be > 0; got {temperature!r}")
        dtype = dtype or self.values.dtype
        n_rest = self.num_rest()
        j = self.temperature_index(temperature)
        tail = self.tail_lse.to(dtype)
        log_n = n_rest.clamp_min(1).to(dtype).log()
        # Declared T: exact tail mass at T. Otherwise uniform raw logits with the T = 1 mass exact.
        j, scale = (j, 1.0) if j is not None else (self.temperature_index(1.0), temperature)
        fill = (tail[:, j] - log_n) / scale
        fill = fill.masked_fill(n_rest == 0, _NEG_INF)
        out = fill[:, None].repeat(1, self.num_classes)
        out.scatter_(1, self.indices, self.values.to(dtype) / temperature)
        out.scatter_(1, self.labels[:, None], self.label_logit.to(dtype)[:, None] / temperature)
        return out

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """(B, C) log-probabilities of the reconstruction at temperature T."""
        return torch.log_softmax(self.scaled_logits(temperature), dim=1)

    def probs(self, temperature: float = 1.0) -> Tensor:
        """(B, C) probabilities of the reconstruction at temperature T (rows sum to 1)."""
        return torch.softmax(self.scaled_logits(temperature), dim=1)

    def logits(self) -> Tensor:
        """(B, C) reconstructed raw logits (exact when k == num_classes)."""
        return self.scaled_logits(1.0)


_TENSOR_FIELDS = ("values", "indices", "label_logit", "labels", "tail_lse")


def kl_to_dense(dense_logits: Tensor, record: SparseLogits, temperature: float = 1.0) -> Tensor:
    """(B,) float64 KL(softmax(z / T) || record's reconstruction at T): the record's error.

    Computed in float64; tiny negative values from rounding are clamped to 0.
    """
    if dense_logits.shape != (len(record), record.num_classes):
        raise ValueError(
            f"dense logits {tuple(dense_logits.shape)} do not match the record ({len(record)}, {record.num_classes})"
        )
    record = record.to(dense_logits.device)
    log_p = torch.log_softmax(dense_logits.detach().double() / temperature, dim=1)
    log_q = torch.log_softmax(record.scaled_logits(temperature, torch.float64), dim=1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=1).clamp_min(0.0)
