"""Records that keep their promise: choose k from an error budget, measure record error, check coverage.

- ``choose_k``: ``--k auto``. On a sample of teacher outputs, the KL(dense || record) at every declared
  temperature for k = 1, 2, 5, 10, 20, 50, 100, ... and finally C (dense); the smallest k whose mean KL
  is <= ``max_kl`` at EVERY declared T wins. The record is measured as it will be read back (through the
  store's value encoding, ``roundtrip_record``), so the promise holds for what stage two gets.
- ``record_error`` / ``gradient_error``: the error metrics of a record (KL for top-k and dense; for
  sampled records KL is infinite, so the squared error of the KD logit-gradient at the teacher), in float64;
  ``fast_record_error`` / ``sparse_kl``: the same in float32, the KL in closed form, cheap enough for stage one.
- ``check_tail_coverage``: a loss reading the teacher at a temperature whose tail statistics the store
  lacks gets one warning (or a SpecError when strict) with the error to expect.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kdcache.records import APPROXIMATE, EXACT, UNDEFINED, get_layout, layout_for_k
from kdcache.sampled import SampledLogits
from kdcache.sparse import SparseLogits, check_temperatures, kl_to_dense
from kdcache.stores.codecs import decode_values, encode_values, to_float16
from kdcache.stores.errors import SpecError
from kdcache.stores.format import teacher_schema

DEFAULT_MAX_KL = 1e-3
AUTO_SAMPLE_ROWS = 4096  # rows of view 0 (from row 0, so possibly past the first shard) that `--k auto` measures on
# Temperatures at which the chosen record's error is also measured when they are NOT declared (then the
# tail is spread from its T = 1 mass), so a later loss at such a T can be told the error to expect.
PROBE_TEMPERATURES = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0)


class TailCoverageWarning(UserWarning):
    """A loss reads the teacher at a temperature the record's tail statistics do not cover."""


def check_max_kl(max_kl: float) -> float:
    """``max_kl`` if finite and > 0, else a one-line SpecError."""
    try:
        value = float(max_kl)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SpecError(f"--max-kl must be a finite number > 0 (mean KL(dense || record) per row, in nats); "
                        f"got {max_kl!r}")
    return value


def auto_k_candidates(num_classes: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, 100, ... below C, then C itself (dense)."""
    out, scale = [], 1
    while scale < num_classes:
        out += [m * scale for m in (1, 2, 5) if m * scale < num_classes]
        scale *= 10
    return (*out, num_classes)


def _key(t: float) -> str:
    return str(float(t))


@dataclass(frozen=True)
class KChoice:
    """What ``choose_k`` measured and chose (``as_attrs()`` is what the store's teacher attrs keep)."""

    k: int
    num_classes: int
    max_kl: float
    sample_rows: int
    kl_by_temperature: dict[float, float]  # mean KL of the chosen record at each declared T
    kl_at_other_temperatures: dict[float, float]  # chosen record at undeclared probe T (uniform-tail fallback)
    tried: dict[int, dict[float, float]] = field(default_factory=dict)  # every k measured -> KL per T

    @property
    def dense(self) -> bool:
        return self.k == self.num_classes

    def as_attrs(self) -> dict:
        return {
            "mode": "auto",
            "k": self.k,
            "max_kl": self.max_kl,
            "sample_rows": self.sample_rows,
            "kl_by_temperature": {_key(t): v for t, v in self.kl_by_temperature.items()},
            "kl_at_other_temperatures": {_key(t): v for t, v in self.kl_at_other_temperatures.items()},
            "tried": {str(k): {_key(t): v for t, v in kl.items()} for k, kl in self.tried.items()},
        }


def mean_kl(dense_logits: Tensor, record: SparseLogits, temperature: float) -> float:
    return float(kl_to_dense(dense_logits, record, temperature).mean())


def choose_k(
    logits: Tensor,
    labels: Tensor,
    temperatures: Iterable[float],
    max_kl: float = DEFAULT_MAX_KL,
    *,
    roundtrip: Callable[[SparseLogits], SparseLogits] | None = None,
    record_bytes: Callable[[int], float] | None = None,
    candidates: Sequence[int] | None = None,
    probe_temperatures: Iterable[float] = PROBE_TEMPERATURES,
) -> KChoice:
    """The smallest k whose record (after ``roundtrip``) has mean KL(dense || record) <= max_kl at every
    declared temperature, on these rows; C (dense) when no smaller k does. Pure: same inputs, same choice.

    ``logits`` (B, C) are the dense (corrected) teacher logits of the sample. ``candidates`` (default
    ``auto_k_candidates(C)``: 1, 2, 5, 10, 20, 50, ...) are measured in increasing order; between the
    last failing and the first passing candidate, bisection finds the smallest passing k (the KL does
    not increase with k). With ``record_bytes(k)`` (bytes of a record of k), a k whose record would be
    no smaller than the dense one is not considered: dense is exact at every T for the same bytes.
    Raises SpecError when even the dense record misses the budget, which only a lossy ``roundtrip``
    (rounding of the stored values) can cause.
    """
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"choose_k needs a non-empty (B, C) sample of logits; got {tuple(logits.shape)}")
    budget = check_max_kl(max_kl)
    temps = check_temperatures(temperatures)
    num_classes = logits.shape[1]
    k_max = num_classes - 1  # the largest k worth considering
    if record_bytes is not None:
        dense_bytes = record_bytes(num_classes)
        while k_max >= 1 and record_bytes(k_max) >= dense_bytes:
            k_max -= 1
    ks = sorted({int(k) for k in (candidates or auto_k_candidates(num_classes)) if 1 <= int(k) < k_max})
    if k_max >= 1:
        ks.append(k_max)
    tried: dict[int, dict[float, float]] = {}

    def measure(k: int) -> tuple[SparseLogits, bool]:
        rec = SparseLogits.from_dense(logits, labels, k, temps)
        if roundtrip is not None:
            rec = roundtrip(rec)
        tried[k] = {t: mean_kl(logits, rec, t) for t in temps}
        return rec, all(v <= budget for v in tried[k].values())

    def chosen(k: int, rec: SparseLogits) -> KChoice:
        other = {float(t): mean_kl(logits, rec, t) for t in probe_temperatures
                 if rec.temperature_index(float(t)) is None}
        return KChoice(k, num_classes, budget, logits.shape[0], tried[k], other, dict(sorted(tried.items())))

    failed = 0  # largest k known to miss the budget
    for k in ks:
        rec, ok = measure(k)
        if not ok:
            failed = k
            continue
        while k - failed > 1:  # bisect (failed, k]: the smallest passing k
            mid = (failed + k) // 2
            mid_rec, mid_ok = measure(mid)
            if mid_ok:
                k, rec = mid, mid_rec
            else:
                failed = mid
        return chosen(k, rec)
    rec, ok = measure(num_classes)
    if ok:
        return chosen(num_classes, rec)
    worst = max(tried[num_classes].items(), key=lambda kv: kv[1])
    raise SpecError(
        f"--max-kl {budget:g} is below what the stored values can reach: even the dense record, rounded by the "
        f"value encoding, has mean KL {worst[1]:.2e} at T={worst[0]:g}; raise --max-kl (or use --encoding "
        "float16)"
    )


def raw_record_bytes(num_classes: int, k: int, encoding: str, num_temperatures: int) -> int:
    """Uncompressed bytes of one stored record: the store's schema for k (dense when k == C)."""
    _, layout = layout_for_k(k, num_classes)
    schema = teacher_schema(num_classes, k, encoding, layout, num_temperatures)
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in schema.values())


def auto_k(logits: Tensor, labels: Tensor, temperatures: Iterable[float], max_kl: float, encoding: str) -> KChoice:
    """``choose_k`` for a store with this value encoding: records measured as read back, sizes as stored."""
    temps = check_temperatures(temperatures)
    c = logits.shape[1]
    return choose_k(logits, labels, temps, max_kl,
                    roundtrip=lambda r: roundtrip_record(r, encoding, r.k == r.num_classes),
                    record_bytes=lambda k: raw_record_bytes(c, k, encoding, len(temps)))


def roundtrip_record(rec: SparseLogits, encoding: str, dense: bool) -> SparseLogits:
    """The record as stage two reads it back from a store with this value encoding.

    Mirrors what stage one writes (``kdcache.teach.record_to_numpy``: a dense record stores all C
    logits in class order) and what stage two builds from it (dense: ``SparseLogits.from_dense``).
    """
    device, temps = rec.device, rec.temperatures
    if dense:
        stored = decode_values(encode_values(rec.logits().detach().cpu().numpy(), encoding), encoding)
        z = torch.from_numpy(stored).to(device)
        return SparseLogits.from_dense(z, rec.labels, rec.num_classes, temps)
    values = decode_values(encode_values(rec.values.detach().cpu().numpy(), encoding), encoding)
    label_logit = to_float16(rec.label_logit.detach().cpu().numpy(), "label_logit").astype(np.float32)
    return SparseLogits(
        values=torch.from_numpy(values).to(device),
        indices=rec.indices,
        label_logit=torch.from_numpy(label_logit).to(device),
        labels=rec.labels,
        tail_lse=rec.tail_lse.float(),
        temperatures=temps,
        num_classes=rec.num_classes,
    )


# ------------------------------------------------------------------------------------ error metrics
def gradient_error(dense_logits: Tensor, record: SparseLogits | SampledLogits, temperature: float,
                   dtype: torch.dtype = torch.float64) -> Tensor:
    """(B,) ||(sum_c r_c) p - r||^2 with p = softmax(z / T), r = the record's probabilities at T (in ``dtype``).

    This is the squared error of the KD logit-gradient (per unit T, without the T^2 factor) when the
    student equals the teacher, where the dense gradient is 0: a top-k record's bias, or a sampled
    record's noise (zero mean over draws). Finite for every record type, unlike KL.
    """
    p = torch.softmax(dense_logits.detach().to(dtype) / temperature, dim=1)
    r = record.to(dense_logits.device).log_probs(temperature).to(dtype).exp()
    diff = r.sum(dim=1, keepdim=True) * p - r
    return (diff * diff).sum(dim=1)


def record_error(dense_logits: Tensor, record: SparseLogits | SampledLogits, temperature: float) -> Tensor:
    """(B,) float64 per-row error stage one reports: KL(dense || record) for top-k and dense records, the
    gradient error for sampled records (their KL is infinite: p̂ = 0 off the sample)."""
    if isinstance(record, SampledLogits):
        return gradient_error(dense_logits, record, temperature)
    return kl_to_dense(dense_logits, record, temperature)


_MASKED = -1e4  # u at the kept classes: exp() underflows to 0 and 0 * _MASKED stays 0 (-inf would give nan)


def sparse_kl(dense_logits: Tensor, record: SparseLogits, temperature: float, dtype: torch.dtype = torch.float32
              ) -> Tensor:
    """(B,) KL(dense || top-k/dense record) at T in ``dtype``, in closed form: stage one's cheap error.

    The top-k classes and the label are exact in the reconstruction, so only the rest classes (n of them)
    differ: they get one value a each (declared T: a = tail_T - log n; else a = (tail_1 - log n) / T).
    With u = z/T - a over the rest, S0 = sum e^u, S1 = sum u e^u, rest mass P of p at T and
    d = log n - log S0 (log of the rest's mass in q over its mass in p, before normalising),
    KL = log1p(P expm1(d)) + P S1 / S0 exactly. u is centred on the record's own rest value, so
    nothing cancels catastrophically: float32 is within 3e-4 relative + 3e-7 nats of the float64 ``kl_to_dense``
    per row (tests/test_record_path.py). Four passes over (B, C), no (B, C) reconstruction.
    """
    if record.k == record.num_classes:  # dense: every logit kept, the reconstruction is exact
        return torch.zeros(len(record), dtype=dtype, device=dense_logits.device)
    record = record.to(dense_logits.device)
    inv = 1.0 / temperature
    n = record.num_rest()
    has_rest = n > 0
    log_n = n.clamp_min(1).to(dtype).log()
    j = record.temperature_index(temperature)
    tail = record.tail_lse.to(dtype)
    j1 = record.temperature_index(1.0)
    a = tail[:, j] - log_n if j is not None else (tail[:, j1] - log_n) * inv
    a = torch.where(has_rest, a, torch.zeros_like(a))  # no rest: tail = -inf; the row's KL is 0 (below)
    u = torch.add(-a[:, None], dense_logits.detach().to(dtype), alpha=inv)
    u.scatter_(1, record.indices, _MASKED).scatter_(1, record.labels[:, None], _MASKED)
    e = u.exp()
    s0 = e.sum(dim=1)
    s1 = (e * u).sum(dim=1)
    log_s0 = s0.log()
    rest_lse = a + log_s0  # logsumexp of z / T over the rest
    kept = torch.cat([record.values.to(dtype) * inv,
                      torch.where(record.label_in_topk(), float("-inf"), record.label_logit.to(dtype) * inv)[:, None]],
                     dim=1).logsumexp(dim=1)
    p_rest = torch.exp(rest_lse - torch.logaddexp(kept, rest_lse))
    d = -torch.log(s0 / n.clamp_min(1).to(dtype))  # log n - log S0, without rounding either log (both ~ log C)
    kl = torch.log1p(p_rest * torch.expm1(d)) + p_rest * (s1 / s0)
    return torch.where(has_rest, kl, torch.zeros_like(kl)).clamp_min(0.0)


def fast_record_error(dense_logits: Tensor, record: SparseLogits | SampledLogits, temperature: float) -> Tensor:
    """(B,) float32 ``record_error``, cheap enough for every row of every batch at stage one: the closed-form
    ``sparse_kl`` for top-k and dense records, the gradient error in float32 for sampled ones."""
    if isinstance(record, SampledLogits):
        return gradient_error(dense_logits, record, temperature, dtype=torch.float32)
    return sparse_kl(dense_logits, record, temperature)


def error_metric(layout: str) -> str:
    """Name of the per-temperature error a store's teacher summary holds for this layout."""
    return get_layout(layout).error_metric


# ------------------------------------------------------------------------------------ tail coverage
def _declared(t: float, temps: Sequence[float]) -> bool:
    return any(math.isclose(t, s, rel_tol=1e-9, abs_tol=0.0) for s in temps)


def undeclared_probe_temperatures(layout: str, temps: Sequence[float]) -> tuple[float, ...]:
    """The PROBE_TEMPERATURES a store does not declare, for layouts that only approximate an undeclared T
    (top-k: ``Layout.undeclared_temperatures``): stage one measures its record's KL there on a sample of
    every block's rows (``kdcache.teach.PROBE_STRIDE``), so stage two can say what a loss at such a T will
    read (dense records are exact everywhere; sampled ones are undefined off their declared T)."""
    if get_layout(layout).undeclared_temperatures != APPROXIMATE:
        return ()
    return tuple(t for t in PROBE_TEMPERATURES if not _declared(t, temps))


def check_tail_coverage(
    record_temperatures: Iterable[float],
    needed: Iterable[float],
    strict: bool = False,
    *,
    layout: str = "topk",
    measured_kl: Mapping[float | str, float] | None = None,
) -> tuple[float, ...]:
    """Check that a record's tail statistics cover the temperatures a loss reads the teacher at.

    Returns the uncovered temperatures (empty: all covered). If some are uncovered, issues ONE
    ``TailCoverageWarning`` naming them and the error to expect (the KL measured at that T on the
    teach-time sample when ``measured_kl`` has it, e.g. teacher attrs ``fidelity.kl_at_other_temperatures``;
    else "uniform-tail reconstruction; error grows with T"), or raises SpecError when ``strict``.
    By the layout's ``undeclared_temperatures``: exact ones (dense) never warn; undefined ones (sampled)
    cannot be estimated at an undeclared T at all (always raise). Call it once, when the trainer starts.
    """
    temps = [float(t) for t in record_temperatures]
    missing = tuple(sorted({float(t) for t in needed if not _declared(float(t), temps)}))
    off_declared = get_layout(layout).undeclared_temperatures
    if not missing or off_declared == EXACT:
        return ()
    declared = ", ".join(f"{t:g}" for t in temps)
    fix = "re-teach with --temperatures including them"
    if off_declared == UNDEFINED:
        raise SpecError(f"the loss reads the teacher at T={', '.join(f'{t:g}' for t in missing)} but a {layout} "
                        f"record is only defined at its declared temperatures ({declared}); {fix}")
    measured = {float(t): float(v) for t, v in (measured_kl or {}).items()}
    parts = []
    for t in missing:
        hit = next((v for s, v in measured.items() if math.isclose(s, t, rel_tol=1e-9)), None)
        parts.append(f"T={t:g}: " + (f"KL {hit:.2e} measured on the teach-time sample" if hit is not None
                                     else "uniform-tail reconstruction; error grows with T"))
    msg = (f"the loss reads the teacher at temperatures the store's tail statistics do not cover "
           f"(declared: {declared}): {'; '.join(parts)}; {fix}")
    if strict:
        raise SpecError(msg)
    warnings.warn(msg, TailCoverageWarning, stacklevel=2)
    return missing


def check_store_tail_coverage(teacher_attrs: Mapping, needed: Iterable[float], strict: bool = False
                              ) -> tuple[float, ...]:
    """``check_tail_coverage`` with everything read from a store's teacher attrs."""
    measured = ((teacher_attrs.get("fidelity") or {}).get("kl_at_other_temperatures")  # --k auto's sample
                or (teacher_attrs.get("summary") or {}).get("kl_at_other_temperatures"))  # a sample of every block
    return check_tail_coverage(teacher_attrs["temperatures"], needed, strict, layout=teacher_attrs["layout"],
                               measured_kl=measured)
