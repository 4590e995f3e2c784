"""Sampled records (``--k sampled:S``): S classes drawn per (view, row) with counts; unbiased in expectation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.records.base import UNDEFINED, Layout
from kdcache.sampled import SampledLogits, parse_samples
from kdcache.stores.errors import SpecError
from kdcache.stores.format import SAMPLED


class Sampled(Layout):
    """Importance-sampled records (``kdcache.sampled``). KL to dense is infinite (p̂ = 0 off the sample), so
    the error is the KD gradient's (``kdcache.fidelity.gradient_error``); only losses linear in the teacher's
    probabilities stay unbiased, train-time corrections need logits it lacks, and p_T is undefined at an
    undeclared T (it needs the all-class log-sum-exp at T)."""

    name = "sampled"
    schema = SAMPLED
    k_syntax = "'sampled:S'"
    error_metric = "grad_sq_error"
    linear_losses_only = True
    train_time_corrections = False
    undeclared_temperatures = UNDEFINED

    def claim_k(self, k: int | str, num_classes: int) -> int | None:
        return min(parse_samples(k), num_classes) if self.names_k(k) else None  # W = min(S, C) slots

    def names_k(self, value: int | str) -> bool:
        return isinstance(value, str) and value.startswith("sampled:")

    def from_logits(self, logits: Tensor, labels: Tensor, *, k: int, temperatures: Sequence[float],
                    sampling: Mapping[str, Any] | None = None, views=None, rows=None) -> SampledLogits:
        """``k`` (the width) follows from ``sampling["samples"]``; draws depend on (seed, view, row) only."""
        if not sampling:
            raise SpecError("a sampled record needs its sampling settings (samples, proposal_temperature, seed); "
                            "pass the teacher attrs' 'sampling'")
        return SampledLogits.from_dense(logits, labels, int(sampling["samples"]), temperatures,
                                        sampling["proposal_temperature"], seed=int(sampling["seed"]),
                                        rows=rows, views=0 if views is None else views)

    def from_arrays(self, batch: Mapping[str, np.ndarray], labels: Tensor, attrs: Mapping[str, Any],
                    device: torch.device | str) -> SampledLogits:
        return SampledLogits.from_arrays(dict(batch), labels, dict(attrs), device)
