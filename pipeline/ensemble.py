"""A teacher ensemble read from one store: several teachers' records of the same rows and views.

``kdcache train STORE --teacher a,b`` trains from the mean of the members' reconstructed
probabilities. Every member is cached over the same views of the same rows (stage one runs all
``--teacher`` specs on each batch), so the members' records of a batch line up row by row.

``EnsembleRecord`` exposes what the losses read from a record (``pipeline/losses.py``):

  log_probs(T)   log( mean_m exp(member_m.log_probs(T)) ): the log of the members' mean probability
                 at T (each member reconstructed as usual: exact top-k and label, tail spread at T)
  logits()       log_probs(1.0). An ensemble has no raw logits; losses that read raw logits (CLKD)
                 get the ensemble's log-probabilities at T = 1, i.e. logits up to a per-row shift,
                 the same as the raw logits of a teacher whose softmax is the ensemble mean.
  labels, num_classes, temperatures (the temperatures every member declares), __len__, to, index

Train-time corrections (``--correction``) and SLD (which swaps the teacher's logits) act on one
teacher's logits; they are refused for an ensemble (``kdcache.train.validate``). A member cached
with a correction enters the mean corrected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdcache.records import strictest
from kdcache.stores.errors import SpecError


def parse_teachers(spec: str | None) -> list[str]:
    """``a,b`` -> ['a', 'b']; SpecError on empty or repeated names."""
    names = [n.strip() for n in (spec or "").split(",")]
    if not spec or not all(names):
        raise SpecError(f"--teacher takes a teacher name or comma-separated names (an ensemble); got '{spec}'")
    if len(set(names)) != len(names):
        raise SpecError(f"--teacher names a teacher twice: '{spec}'")
    return names


def _has(temps: Sequence[float], t: float) -> bool:
    return any(math.isclose(t, s, rel_tol=1e-9, abs_tol=0.0) for s in temps)


def common_temperatures(members: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """The temperatures every member declares (always includes 1.0), ascending."""
    first = [float(t) for t in members[0]]
    return tuple(sorted(t for t in first if all(_has([float(s) for s in m], t) for m in members[1:])))


def ensemble_attrs(names: Sequence[str], attrs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Teacher attrs standing for the ensemble where the trainer reads one teacher's attrs.

    ``temperatures``: the common ones; ``layout``: the members' strictest (``kdcache.records.strictest``:
    dense when every member is dense, sampled when any member is sampled, else topk); ``correction``: the
    members' stored corrections when they agree, else ``mixed``.
    """
    layout = strictest(a["layout"] for a in attrs).name
    corrections = {(a.get("correction") or {}).get("name", "none") for a in attrs}
    correction = {"name": corrections.pop(), "args": {}} if len(corrections) == 1 else {"name": "mixed", "args": {}}
    num_classes = {a["num_classes"] for a in attrs}
    if len(num_classes) != 1:
        raise SpecError(f"teachers {', '.join(names)} differ in their number of classes {sorted(num_classes)}")
    return {
        "ensemble": list(names),
        "layout": layout,
        "k": max(a["k"] for a in attrs),
        "num_classes": num_classes.pop(),
        "temperatures": list(common_temperatures([a["temperatures"] for a in attrs])),
        "correction": correction,
    }


@dataclass(frozen=True, eq=False)
class EnsembleRecord:
    """A batch of several teachers' records of the same rows: the mean of their probabilities."""

    members: tuple[Any, ...]  # SparseLogits / SampledLogits of the same rows, same labels

    def __post_init__(self) -> None:
        members = tuple(self.members)
        object.__setattr__(self, "members", members)
        if not members:
            raise ValueError("EnsembleRecord needs at least one member")
        first = members[0]
        for m in members[1:]:
            if len(m) != len(first) or m.num_classes != first.num_classes:
                raise ValueError("EnsembleRecord: members differ in batch size or number of classes")

    @property
    def labels(self) -> Tensor:
        return self.members[0].labels

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def temperatures(self) -> tuple[float, ...]:
        return common_temperatures([m.temperatures for m in self.members])

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def __len__(self) -> int:
        return len(self.members[0])

    def to(self, device: torch.device | str) -> EnsembleRecord:
        return EnsembleRecord(tuple(m.to(device) for m in self.members))

    def index(self, sel) -> EnsembleRecord:
        return EnsembleRecord(tuple(m.index(sel) for m in self.members))

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """(B, C) log of the members' mean probability at temperature T."""
        stacked = torch.stack([m.log_probs(temperature) for m in self.members])
        return torch.logsumexp(stacked, dim=0) - math.log(len(self.members))

    def probs(self, temperature: float = 1.0) -> Tensor:
        return self.log_probs(temperature).exp()

    def logits(self) -> Tensor:
        """(B, C) the ensemble's log-probabilities at T = 1, standing in for raw logits (see module doc)."""
        return self.log_probs(1.0)
