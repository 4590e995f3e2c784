"""Importance-sampled teacher records (``--k sampled:S``): unbiased in expectation, a few classes per row.

Method: Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
ACL 2025 (arXiv 2503.16870), "Random Sampling KD". Top-k records are *biased*: the tail is either
dropped or spread by a model (here: uniform logits with exact mass at each declared T), so the
student's KD gradient is wrong in expectation no matter how many epochs it trains. Sampling classes
from a proposal that is > 0 everywhere and re-weighting them by p / q gives an estimate of the teacher
distribution whose expectation is exact, so the KD gradient is exact in expectation. (Paper text used:
the abstract and third-party summaries of the method; the paper samples from a tempered teacher
q ~ p^tau and recommends tau = 1, where every weight is 1 and the target is simply counts / S.)

Record (per (view, row), stage one, ``SampledLogits.from_dense``):

  draw S class ids with replacement from q = softmax(z / T_q), T_q a declared temperature (default:
  the largest declared), with uniforms from a counter-based hash of (seed, view, row, draw), so a
  rerun, a resumed run and any batching give the same draws;
  store the W = min(S, C) slots: the unique sampled ids (``indices``), their raw logits (``values``),
  how often each was drawn (``counts``, uint8, sum S), sorted by logit descending; unused slots
  repeat the first entry with count 0;
  the label logit; and in ``tail`` the logsumexp over ALL classes of z / T at every declared T, so
  p_T(i) = exp(z_i / T - lse_T) and q(i) are exact for every stored i.

Estimate (stage two, ``log_probs(T)``, T declared):

  p̂_T(c) = sum over stored slots i with id c of (count_i / S) * p_T(i) / q(i),   0 for unsampled c.

E[count_c / S] = q(c), so E[p̂_T(c)] = p_T(c) for every class c: unbiased. p̂ sums to 1 exactly at
T = T_q (all weights are 1: p̂ = counts / S) and to 1 in expectation at other T. ``kd`` reads it through
``F.kl_div``, which gives p = 0 entries zero weight, and its gradient with respect to the student's
logits, T * ((sum_c p̂_c) s - p̂) with s the student's softmax at T, is linear in p̂, hence unbiased.
Losses that are linear in the teacher's probabilities (``kd``, ``ttm``) stay unbiased; losses that
normalise or take logs of teacher probabilities (``dkd``'s NCKD, ``wttm``'s weight, ``clkd``'s raw
logits) do not, and ``logits()`` refuses.

Variance and size vs top-k (measured in benchmarks/RESULTS.md, "Record fidelity"):

- Per class, Var[p̂_T(c)] = (p_T(c)^2 / q(c) - p_T(c)^2) / S: it falls as 1 / S and is smallest when
  q is close to p_T (zero-variance weights at T = T_q: p̂ = counts / S, multinomial noise only).
  Estimating a sharper T < T_q from a flatter q is safe (weights p / q are bounded by 1 / q(argmax));
  estimating a flatter T > T_q from a sharper q gives heavy weights on rarely drawn tail classes.
- Cost: W slots of (value, index, count) = 2 + 2 + 1 bytes each before compression (W <= S, and the
  number of distinct ids is much smaller than S on a peaked teacher), vs top-k's 4 bytes per slot.
- Top-k has no variance but a fixed bias that training never averages away; sampled records have no
  bias but a fixed per-(row, view) noise: the draw is stored, so a row's estimate is the same every
  epoch. The noise averages out over the rows of a batch and over views (each view has its own
  draw), like zero-mean label noise. KL(dense || record) is infinite for a sampled record (p̂ = 0 off
  the sample), so its error is reported as the squared error of the KD logit-gradient at the teacher
  (``kdcache.fidelity.gradient_error``) instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from kdcache.sparse import check_temperatures
from kdcache.stores.errors import SpecError

MAX_SAMPLES = 255  # counts are stored as uint8
_NEG_INF = float("-inf")
_TENSOR_FIELDS = ("values", "indices", "counts", "label_logit", "labels", "tail_lse")


# ---------------------------------------------------------------------------------------- draws
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a strong 64-bit hash."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def draw_uniforms(seed: int, views: int | Sequence[int] | np.ndarray, rows: Sequence[int] | np.ndarray,
                  samples: int) -> np.ndarray:
    """(B, samples) float64 uniforms in [0, 1), a pure function of (seed, view, row, draw index).

    Counter-based (no generator state), so a row's draws do not depend on batching, order, device or
    on which other rows a run labels: reruns and resumed runs store identical samples.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1).astype(np.uint64)
    views = np.broadcast_to(np.asarray(views, dtype=np.int64), rows.shape).astype(np.uint64)
    key = _splitmix64(np.full(rows.shape, np.uint64(int(seed) % 2**64)))
    key = _splitmix64(key ^ views)
    key = _splitmix64(key ^ rows)
    draws = np.arange(samples, dtype=np.uint64)
    h = _splitmix64(key[:, None] ^ _splitmix64(draws)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def parse_samples(spec: str) -> int:
    """``'sampled:S'`` -> S (1 <= S <= 255), else a one-line SpecError."""
    _, _, s = spec.partition(":")
    try:
        n = int(s)
    except ValueError:
        n = -1
    if not 1 <= n <= MAX_SAMPLES:
        raise SpecError(f"--k sampled:S needs an integer S between 1 and {MAX_SAMPLES} (draws per row); got '{spec}'")
    return n


def default_proposal_temperature(temperatures: Iterable[float]) -> float:
    """The largest declared temperature: the flattest proposal, so tail classes get drawn."""
    return max(check_temperatures(temperatures))


# ---------------------------------------------------------------------------------------- record
@dataclass(frozen=True, eq=False)
class SampledLogits:
    """A batch of importance-sampled teacher records (see the module docstring).

    values       (B, W) float32  raw logits of the stored classes, descending (W = min(S, C) slots)
    indices      (B, W) int64    their class ids; unused slots repeat slot 0 with count 0
    counts       (B, W) int64    draws per slot; each row sums to S
    label_logit  (B,)   float32  the label's raw logit
    labels       (B,)   int64
    tail_lse     (B, n) float32  logsumexp over ALL classes of z / T_j for each declared T_j
    temperatures tuple of the T_j, ascending, containing 1.0 and ``proposal_temperature``
    num_classes, proposal_temperature
    """

    values: Tensor
    indices: Tensor
    counts: Tensor
    label_logit: Tensor
    labels: Tensor
    tail_lse: Tensor
    temperatures: tuple[float, ...]
    num_classes: int
    proposal_temperature: float

    def __post_init__(self) -> None:
        temps = tuple(float(t) for t in self.temperatures)
        object.__setattr__(self, "temperatures", temps)
        object.__setattr__(self, "proposal_temperature", float(self.proposal_temperature))
        b, w = self.values.shape
        if self.indices.shape != (b, w) or self.counts.shape != (b, w):
            raise ValueError("SampledLogits: values, indices and counts must all be (B, W)")
        if self.label_logit.shape != (b,) or self.labels.shape != (b,):
            raise ValueError("SampledLogits: label_logit and labels must be (B,)")
        if self.tail_lse.shape != (b, len(temps)):
            raise ValueError(f"SampledLogits: tail_lse must be (B, {len(temps)}), got {tuple(self.tail_lse.shape)}")
        if self._tindex(self.proposal_temperature) is None:
            raise ValueError("SampledLogits: the proposal temperature must be one of the temperatures")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        logits: Tensor,
        labels: Tensor,
        samples: int,
        temperatures: Iterable[float] = (1.0,),
        proposal_temperature: float | None = None,
        *,
        seed: int = 0,
        rows: Tensor | Sequence[int] | np.ndarray | None = None,
        views: int | Tensor | Sequence[int] | np.ndarray = 0,
    ) -> SampledLogits:
        """Draw ``samples`` classes per row of dense raw logits (B, C) from softmax(z / T_q).

        ``rows``/``views`` (default: 0..B-1 and view 0) identify each row for its draws; with the same
        (seed, view, row) and logits the record is identical.
        """
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, C); got shape {tuple(logits.shape)}")
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
            raise SpecError(f"samples must be an integer between 1 and {MAX_SAMPLES}; got {samples!r}")
        temps = check_temperatures(temperatures)
        t_q = default_proposal_temperature(temps) if proposal_temperature is None else float(proposal_temperature)
        if not any(math.isclose(t_q, t, rel_tol=1e-9) for t in temps):
            raise SpecError(f"the proposal temperature {t_q:g} must be one of the declared temperatures "
                            f"({', '.join(f'{t:g}' for t in temps)})")
        b, c = logits.shape
        z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        labels = labels.to(device=z.device, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != b:
            raise ValueError(f"labels must be ({b},); got {labels.shape[0]} labels")
        rows = np.arange(b) if rows is None else _as_numpy(rows)
        views = _as_numpy(views)

        # Inverse-CDF sampling in float64 from the counter-based uniforms.
        q = torch.softmax(z.double() / t_q, dim=1)
        cdf = q.cumsum(dim=1)
        u = torch.from_numpy(draw_uniforms(seed, views, rows, samples)).to(z.device)
        ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        last_positive = (c - 1) - (q > 0).flip(1).long().argmax(dim=1, keepdim=True)
        ids = torch.minimum(ids, last_positive)  # rounding at the top end never picks a q = 0 class

        counts = torch.zeros(b, c, dtype=torch.int64, device=z.device).scatter_add_(1, ids, torch.ones_like(ids))
        width = min(samples, c)
        key = z.masked_fill(counts == 0, _NEG_INF)
        order = key.sort(dim=1, descending=True, stable=True).indices[:, :width]
        cnt = counts.gather(1, order)
        pad = cnt == 0
        idx = torch.where(pad, order[:, :1], order)
        tail = torch.stack([(z / t).logsumexp(dim=1) for t in temps], dim=1)
        return cls(
            values=z.gather(1, idx),
            indices=idx,
            counts=cnt,
            label_logit=z.gather(1, labels[:, None]).squeeze(1),
            labels=labels,
            tail_lse=tail,
            temperatures=temps,
            num_classes=c,
            proposal_temperature=t_q,
        )

    @classmethod
    def from_arrays(cls, batch: dict, labels: Tensor, attrs: dict, device: torch.device | str = "cpu") -> SampledLogits:
        """A batch read from a store (``LogitStore.read_block`` keys) of a teacher with layout 'sampled'."""
        t = {key: torch.as_tensor(np.ascontiguousarray(batch[key])).to(device) for key in
             ("values", "indices", "counts", "label_logit", "tail")}
        return cls(
            values=t["values"].float(),
            indices=t["indices"].long(),
            counts=t["counts"].long(),
            label_logit=t["label_logit"].float(),
            labels=torch.as_tensor(labels).to(device=device, dtype=torch.int64),
            tail_lse=t["tail"].float(),
            temperatures=tuple(attrs["temperatures"]),
            num_classes=int(attrs["num_classes"]),
            proposal_temperature=float(attrs["sampling"]["proposal_temperature"]),
        )

    @classmethod
    def concat(cls, records: Sequence[SampledLogits]) -> SampledLogits:
        if not records:
            raise ValueError("concat needs at least one record")
        first = records[0]
        key = (first.k, first.temperatures, first.num_classes, first.proposal_temperature)
        if any((r.k, r.temperatures, r.num_classes, r.proposal_temperature) != key for r in records[1:]):
            raise ValueError("concat: records differ in slots, temperatures, num_classes or proposal temperature")
        return replace(first, **{f: torch.cat([getattr(r, f) for r in records]) for f in _TENSOR_FIELDS})

    # ------------------------------------------------------------------ basics
    @property
    def k(self) -> int:
        """Slots per row (W = min(S, C)); the store's ``k``."""
        return self.values.shape[1]

    @property
    def samples(self) -> Tensor:
        """(B,) draws per row (S)."""
        return self.counts.sum(dim=1)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __len__(self) -> int:
        return self.values.shape[0]

    def to(self, device: torch.device | str) -> SampledLogits:
        return replace(self, **{f: getattr(self, f).to(device) for f in _TENSOR_FIELDS})

    def index(self, sel: Tensor | slice | Sequence[int]) -> SampledLogits:
        return replace(self, **{f: getattr(self, f)[sel] for f in _TENSOR_FIELDS})

    def num_unique(self) -> Tensor:
        """(B,) distinct classes drawn per row."""
        return (self.counts > 0).sum(dim=1)

    def _tindex(self, temperature: float) -> int | None:
        for j, t in enumerate(self.temperatures):
            if math.isclose(t, temperature, rel_tol=1e-9, abs_tol=0.0):
                return j
        return None

    # ------------------------------------------------------------------ estimate
    def log_weights(self, temperature: float) -> Tensor:
        """(B, W) log of each slot's contribution (count / S) * p_T(i) / q(i); -inf for unused slots."""
        if not temperature > 0:
            raise SpecError(f"temperature must be > 0; got {temperature!r}")
        j = self._tindex(temperature)
        if j is None:
            raise SpecError(
                f"a sampled record is exact only at its declared temperatures "
                f"({', '.join(f'{t:g}' for t in self.temperatures)}), not T={temperature:g}: p_T needs the "
                "logsumexp over all classes at T; re-teach with that temperature in --temperatures"
            )
        jq = self._tindex(self.proposal_temperature)
        v = self.values.float()
        frac = self.counts.float() / self.samples.clamp_min(1)[:, None].float()
        if j == jq:  # p = q: every weight is exactly count / S
            return frac.log()
        log_p = v / temperature - self.tail_lse[:, j : j + 1]
        log_q = v / self.proposal_temperature - self.tail_lse[:, jq : jq + 1]
        return frac.log() + (log_p - log_q)

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """(B, C) log p̂_T: the unbiased importance-sampling estimate; -inf where nothing was drawn.

        Not normalised at T != T_q (the sum is 1 in expectation); normalising would add bias.
        """
        lw = self.log_weights(temperature)
        out = torch.full((len(self), self.num_classes), _NEG_INF, dtype=lw.dtype, device=lw.device)
        # unused slots repeat a stored id with weight -inf: "amax" keeps the real entry
        return out.scatter_reduce(1, self.indices, lw, reduce="amax", include_self=True)

    def probs(self, temperature: float = 1.0) -> Tensor:
        """(B, C) p̂_T."""
        return self.log_probs(temperature).exp()

    def logits(self) -> Tensor:
        raise SpecError("a sampled record has no raw logits for the classes it did not draw; use a loss that "
                        "reads teacher probabilities (kd, ttm), or cache with --k N|all|auto")


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
