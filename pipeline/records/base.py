"""The record-layout interface and its registry: one class per layout, found by the name stores keep.

A layout (teacher attrs "layout") is the policy of one kind of record: which arrays a block stores
(``schema``, plain data that ``stores/format.py`` reads), how stage one builds a record from dense
logits (``from_logits``) and turns it into those arrays (``to_arrays``), how stage two builds the
record back from a decoded block (``from_arrays``), what it costs in RAM once decoded, how its error
is measured and which losses and temperatures it supports. Callers look a layout up by name
(``get_layout``) instead of comparing strings, so a new layout is one module plus one
``register_layout`` line (``kdcache.records.__init__``), the way zarr registers codecs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from kdcache.sampled import SampledLogits
from kdcache.sparse import SparseLogits
from kdcache.stores.errors import SpecError, StoreError
from kdcache.stores.format import DECODED_DTYPES, RECORD_SCHEMAS, RecordSchema, register_record_schema

Record = SparseLogits | SampledLogits

AUTO = "auto"  # --k auto: not a layout; top-k or dense once ``kdcache.fidelity.choose_k`` has measured k

# What a record gives at a temperature it does not declare (``undeclared_temperatures``):
EXACT = "exact"  # every logit is kept: any temperature is exact
APPROXIMATE = "approximate"  # reconstructed (top-k's tail spread from its T = 1 mass); stage one probes the error
UNDEFINED = "undefined"  # cannot be estimated at all (sampled: p_T needs the all-class logsumexp at T)
_STRICTNESS = (EXACT, APPROXIMATE, UNDEFINED)


class Layout(ABC):
    """One record layout. Instances are stateless singletons held in ``LAYOUTS``."""

    name: ClassVar[str]  # the teacher attrs "layout" value
    schema: ClassVar[RecordSchema]  # the (V, N, k) arrays a block stores (stores/format.py)
    k_syntax: ClassVar[str]  # how --k asks for it, for help and errors: "an integer", "'all'", "'sampled:S'"
    error_metric: ClassVar[str] = "kl"  # per-temperature error stage one sums (block stats "<metric>_T<t>")
    linear_losses_only: ClassVar[bool] = False  # only losses linear in teacher probabilities are unbiased on it
    train_time_corrections: ClassVar[bool] = True  # has every class's logit, so a correction can act at train time
    undeclared_temperatures: ClassVar[str] = EXACT  # EXACT, APPROXIMATE or UNDEFINED

    # ------------------------------------------------------------------ choice from --k
    @abstractmethod
    def claim_k(self, k: int | str, num_classes: int) -> int | None:
        """The k this layout stores for ``--k k`` (slots per row), or None when --k asks for another layout.

        Claims of different layouts never overlap, so ``layout_for_k`` does not depend on registry order."""

    def names_k(self, value: str) -> bool:
        """Whether the non-integer --k string ``value`` asks for this layout (parsed without num_classes)."""
        return False

    # ------------------------------------------------------------------ stage one
    @abstractmethod
    def from_logits(self, logits: Tensor, labels: Tensor, *, k: int, temperatures: Sequence[float],
                    sampling: Mapping[str, Any] | None = None, views=None, rows=None) -> Record:
        """The record of dense (corrected) logits (B, C). ``sampling`` (teacher attrs "sampling") and the rows'
        ``views``/``rows`` matter only to layouts whose records are drawn per (view, row)."""

    def to_arrays(self, record: Record) -> dict[str, np.ndarray]:
        """The arrays of ``schema`` plus label_logit and tail, on the CPU, for ``LogitStore.write_block``."""
        out = {name: getattr(record, name) for name in self.schema.slot_arrays}
        out |= {"label_logit": record.label_logit, "tail": record.tail_lse}
        return {name: t.detach().to("cpu").numpy() for name, t in out.items()}

    # ------------------------------------------------------------------ stage two
    @abstractmethod
    def from_arrays(self, batch: Mapping[str, np.ndarray], labels: Tensor, attrs: Mapping[str, Any],
                    device: torch.device | str) -> Record:
        """A decoded block (``LogitStore.read_block`` keys) of a teacher with these ``attrs``, on ``device``."""

    def decoded_bytes_per_row(self, attrs: Mapping[str, Any]) -> int:
        """RAM one (view, row) takes once decoded by ``LogitStore.read_block`` (preload decisions)."""
        per_slot = sum(DECODED_DTYPES[name].itemsize for name in self.schema.slot_arrays)
        tail = DECODED_DTYPES["tail"].itemsize * len(attrs["temperatures"])
        return int(attrs["k"]) * per_slot + DECODED_DTYPES["label_logit"].itemsize + tail

    def __repr__(self) -> str:
        return f"<layout {self.name}>"


def batch_tensors(batch: Mapping[str, np.ndarray], names: Iterable[str], device) -> dict[str, Tensor]:
    """The named arrays of a decoded block as tensors on ``device`` (shared by the layouts' ``from_arrays``)."""
    return {name: torch.from_numpy(np.ascontiguousarray(batch[name])).to(device, non_blocking=True) for name in names}


def labels_on(labels: Tensor, device) -> Tensor:
    """int64 labels on ``device`` (a no-op when the trainer already moved them)."""
    return torch.as_tensor(labels).to(device=device, dtype=torch.int64)


# ---------------------------------------------------------------------------------------- registry
LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout | type[Layout]) -> Layout | type[Layout]:
    """Register a layout (an instance, or a class as a decorator) under its ``name``; returns the argument.

    Also registers its schema with the store (``stores/format.py``), so its arrays can be created and read."""
    instance = layout() if isinstance(layout, type) else layout
    if instance.name == AUTO or instance.name in LAYOUTS:
        raise StoreError(f"layout name {instance.name!r} is taken; register the layout under another name")
    if instance.schema.layout != instance.name:
        raise StoreError(f"layout {instance.name!r} has the schema of {instance.schema.layout!r}; give it its own")
    register_record_schema(instance.schema)
    LAYOUTS[instance.name] = instance
    return layout


def unregister_layout(name: str) -> None:
    """Forget a layout and its schema (tests register toy layouts)."""
    LAYOUTS.pop(name, None)
    RECORD_SCHEMAS.pop(name, None)


def get_layout(name: str) -> Layout:
    """The registered layout called ``name``; StoreError naming the known layouts otherwise."""
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise StoreError(f"unknown record layout {name!r} (known: {', '.join(LAYOUTS)}); the store was made by "
                         "another kdcache, or the module registering that layout is not imported") from None


def layout_for_k(k: int | str, num_classes: int) -> tuple[int, str]:
    """(stored k, layout name) for ``--k``: an integer N -> topk (dense when N == C), 'all' -> dense,
    'sampled:S' -> sampled, 'auto' -> (0, AUTO) until ``kdcache.teach.resolve_record`` measures k."""
    if k == AUTO:
        return 0, AUTO
    claims = [(stored, layout.name) for layout in LAYOUTS.values()
              if (stored := layout.claim_k(k, num_classes)) is not None]
    if len(claims) > 1:
        raise RuntimeError(f"layouts {[name for _, name in claims]} all claim --k {k!r}; their claims must not overlap")
    if not claims:
        if isinstance(k, int):
            raise SpecError(f"--k must be between 1 and {num_classes} (the number of classes); got {k!r}")
        raise SpecError(f"--k must be {k_choices()}; got '{k}'")
    return claims[0]


def names_layout(value: str) -> bool:
    """Whether a non-integer --k string is 'auto' or names a registered layout (the CLI's parse)."""
    return value == AUTO or any(layout.names_k(value) for layout in LAYOUTS.values())


def k_choices() -> str:
    """What --k accepts, for messages: "an integer, 'all', 'sampled:S' or 'auto'"."""
    options = [layout.k_syntax for layout in LAYOUTS.values()] + [f"'{AUTO}'"]
    return ", ".join(options[:-1]) + " or " + options[-1]


def strictest(names: Iterable[str]) -> Layout:
    """The layout among ``names`` whose limits cover all the others' (an ensemble's, for the trainer's checks):
    undefined beats approximate beats exact off the declared temperatures, then linear-only losses, then
    no train-time corrections."""
    layouts = [get_layout(name) for name in names]
    if not layouts:
        raise ValueError("strictest needs at least one layout name")
    return max(layouts, key=lambda lo: (_STRICTNESS.index(lo.undeclared_temperatures), lo.linear_losses_only,
                                        not lo.train_time_corrections))
