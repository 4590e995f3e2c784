"""Top-k records (``--k N``, N < C): the N largest logits, the label's logit and the tail log-sum-exp per declared T."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.records.base import APPROXIMATE, Layout, batch_tensors, labels_on
from kdcache.sparse import SparseLogits
from kdcache.stores.format import TOPK


class TopK(Layout):
    """Biased but deterministic: the tail's mass is exact at declared T, its shape is uniform
    (``kdcache.sparse``); at an undeclared T the tail is spread from its T = 1 mass, so stage one
    probes the error there (``kdcache.fidelity.undeclared_probe_temperatures``)."""

    name = "topk"
    schema = TOPK
    k_syntax = "an integer"
    undeclared_temperatures = APPROXIMATE

    def claim_k(self, k: int | str, num_classes: int) -> int | None:
        # k == C keeps every class: that is the dense layout's record (class order, no indices)
        is_int = isinstance(k, int) and not isinstance(k, bool)
        return k if is_int and 1 <= k < num_classes else None

    def from_logits(self, logits: Tensor, labels: Tensor, *, k: int, temperatures: Sequence[float],
                    sampling: Mapping[str, Any] | None = None, views=None, rows=None) -> SparseLogits:
        return SparseLogits.from_dense(logits, labels, k, temperatures=temperatures)

    def from_arrays(self, batch: Mapping[str, np.ndarray], labels: Tensor, attrs: Mapping[str, Any],
                    device: torch.device | str) -> SparseLogits:
        t = batch_tensors(batch, ("values", "indices", "label_logit", "tail"), device)
        return SparseLogits(values=t["values"], indices=t["indices"], label_logit=t["label_logit"],
                            labels=labels_on(labels, device), tail_lse=t["tail"],
                            temperatures=tuple(attrs["temperatures"]), num_classes=int(attrs["num_classes"]))
