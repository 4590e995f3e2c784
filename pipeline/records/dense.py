"""Dense records (``--k all``, or N == C): every logit in class order, no indices; exact at every temperature."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.records.base import EXACT, Layout, batch_tensors, labels_on
from kdcache.sparse import SparseLogits
from kdcache.stores.format import DENSE


class Dense(Layout):
    """Stage two rebuilds a k == C ``SparseLogits`` from the stored logits (empty tail: exact)."""

    name = "dense"
    schema = DENSE
    k_syntax = "'all'"
    undeclared_temperatures = EXACT

    def claim_k(self, k: int | str, num_classes: int) -> int | None:
        is_int = isinstance(k, int) and not isinstance(k, bool)
        return num_classes if k == "all" or (is_int and k == num_classes) else None

    def names_k(self, value: str) -> bool:
        return value == "all"

    def from_logits(self, logits: Tensor, labels: Tensor, *, k: int, temperatures: Sequence[float],
                    sampling: Mapping[str, Any] | None = None, views=None, rows=None) -> SparseLogits:
        if k != logits.shape[1]:
            raise ValueError(f"a dense record keeps every class: k must be {logits.shape[1]}, got {k}")
        return SparseLogits.from_dense(logits, labels, k, temperatures=temperatures)

    def to_arrays(self, record: SparseLogits) -> dict[str, np.ndarray]:
        # the stored values are the logits in class order (the record keeps them sorted, with indices)
        out = {"values": record.logits(), "label_logit": record.label_logit, "tail": record.tail_lse}
        return {name: t.detach().to("cpu").numpy() for name, t in out.items()}

    def from_arrays(self, batch: Mapping[str, np.ndarray], labels: Tensor, attrs: Mapping[str, Any],
                    device: torch.device | str) -> SparseLogits:
        values = batch_tensors(batch, ("values",), device)["values"]
        return SparseLogits.from_dense(values, labels_on(labels, device), int(attrs["num_classes"]),
                                       temperatures=tuple(attrs["temperatures"]))
