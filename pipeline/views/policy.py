"""``ViewPolicy``: a chain of view ops (``a | b | c``), sampled once per store and replayed exactly.

The policy is what a store records (``record()``) and what stage one, ``verify`` and stage two replay
(``kdcache.replay``). Its parameters are the ops' parameters, named ``<i>-<op>.<param>`` (a single op
keeps its plain names, so one-op stores read as before). Ops run on uint8 pixels; the result is
float32 in [0, 1] at the output size.

Mixing ops (Mixup, CutMix) come last and are alternatives tried left to right: the first whose
probability fires mixes the view, so ``cutmix:alpha=1,p=0.5 | mixup:alpha=0.8`` is timm's
``switch_prob=0.5``. For each (view, row) the policy draws a partner row (never the row itself), the
partner's *own* parameters for the ops before the mix (``partner.<param>``) and the mixing op's
draws, and stores them all: stage two rebuilds the same mixed image in any batch size, order and
number of ranks, unlike caches that mix batch neighbours (docs/methods.md, "Mixing").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision

from kdcache.stores.errors import SpecError
from kdcache.views.base import MAX_VIEWS, U8, U32, ViewOp, resize, to_float

MIX, PARTNER = "mix", "partner"  # which mixing op fired (0: none, j + 1: the j-th); the partner row


def resolve_num_views(num_views: int | str, enumerable: int | None, what: str) -> int:
    """``num_views`` (an int, or "all" where the views can be enumerated) as an int in 1..MAX_VIEWS."""
    if num_views == "all":
        if enumerable is None:
            raise SpecError(f"view policy '{what}' cannot enumerate all views; pass an integer number of views")
        return enumerable
    try:
        v = int(num_views)
    except (TypeError, ValueError):
        raise SpecError(f"number of views must be an integer or 'all'; got {num_views!r}") from None
    if v < 1:
        raise SpecError(f"number of views must be >= 1; got {v}")
    if v > MAX_VIEWS:
        raise SpecError(f"number of views must be at most {MAX_VIEWS} (each is a teacher pass and 3 files per "
                        f"shard); got {v}")
    return v


def image_hw_of(num_rows: int, image_size=None, image_sizes=None) -> np.ndarray:
    """Each row's source (H, W) as float (1, N, 2) (or (1, 1, 2)); square when unknown."""
    if image_sizes is not None:
        return np.asarray(image_sizes, dtype=np.float64).reshape(1, num_rows, 2)
    if image_size is not None:
        return np.asarray(image_size, dtype=np.float64).reshape(1, 1, 2)
    return np.ones((1, 1, 2))


class ViewPolicy:
    """A chain of ops. ``sample`` -> {param: (V, N)}; ``apply`` / ``apply_batch`` replay one (view, row)
    or a batch of them; mixing policies also need the partner images and give ``mix_weights``."""

    def __init__(self, ops: list[ViewOp]):
        if not ops:
            raise SpecError("a view policy needs at least one op, e.g. crop-flip")
        first_mix = next((i for i, op in enumerate(ops) if op.mixes), len(ops))
        if any(not op.mixes for op in ops[first_mix:]):
            late = next(op for op in ops[first_mix:] if not op.mixes)
            raise SpecError(f"view policy '{self.spec_of(ops)}': mixing ops ({ops[first_mix].name}) must come last, "
                            f"after '{late.name}'; move them to the end")
        if first_mix == 0:
            raise SpecError(f"view policy '{self.spec_of(ops)}' mixes views but has no op before the mix; "
                            "start it with a crop, e.g. 'rrc-flip | mixup'")
        self.ops = list(ops)
        self.pre, self.mix_ops = self.ops[:first_mix], self.ops[first_mix:]
        self.prefixes = [""] if len(ops) == 1 else [f"{i}-{op.name}." for i, op in enumerate(ops)]

    # ------------------------------------------------------------------ description
    @staticmethod
    def spec_of(ops: list[ViewOp]) -> str:
        return " | ".join(op.spec() for op in ops)

    @property
    def spec(self) -> str:
        """The canonical policy string (every argument written out)."""
        return self.spec_of(self.ops)

    @property
    def name(self) -> str:
        return self.ops[0].name if len(self.ops) == 1 else "pipeline"

    @property
    def args(self) -> dict[str, Any]:
        return self.ops[0].args if len(self.ops) == 1 else {"spec": self.spec}

    @property
    def mixes(self) -> bool:
        return bool(self.mix_ops)

    @property
    def aspect_dependent(self) -> bool:
        return any(op.aspect_dependent for op in self.ops)

    @property
    def groups(self) -> dict[str, range] | None:
        """Named view groups (``ViewGroups``); a plain policy has none."""
        return None

    @property
    def num_views_all(self) -> int | None:
        return self.ops[0].num_views_all if len(self.ops) == 1 else None

    @property
    def param_dtypes(self) -> dict[str, np.dtype]:
        dtypes = {p + k: d for p, op in zip(self.prefixes, self.ops, strict=True) for k, d in op.param_dtypes.items()}
        if self.mixes:
            dtypes |= {PARTNER + "." + k: dtypes[k] for p, op in zip(self.prefixes, self.pre, strict=False)
                       for k in (p + n for n in op.param_dtypes)}
            dtypes |= {MIX: U8, PARTNER: U32}
        return dtypes

    def record(self) -> dict[str, Any]:
        """What the store keeps to rebuild and check this policy (JSON-able)."""
        return {"name": self.name, "args": self.args, "spec": self.spec, "torchvision": torchvision.__version__}

    def __repr__(self) -> str:
        return f"ViewPolicy({self.spec!r})"

    # ------------------------------------------------------------------ sampling
    def num_views(self, num_views: int | str) -> int:
        return resolve_num_views(num_views, self.num_views_all, self.spec)

    def sample(self, num_views: int | str, num_rows: int, image_size=None, seed: int = 0,
               image_sizes=None) -> dict[str, np.ndarray]:
        """{param: (V, N) array in its storage dtype}; deterministic in ``seed`` (op i draws from
        ``default_rng([seed, i])``, op 0 from ``default_rng(seed)``), whatever the batching."""
        v = self.num_views(num_views)
        if v > 1 and all(op.num_views_all == 1 for op in self.ops):
            raise SpecError(f"view policy '{self.spec}' has a single view; pass 1 view or use crop-flip / rrc-flip")
        if num_views == "all":
            return self.ops[0].sample_all(num_rows)
        shape, hw = (v, num_rows), image_hw_of(num_rows, image_size, image_sizes)
        params = self._sample_ops(self.ops, shape, hw, seed, salt=0)
        if self.mixes:
            params |= self._sample_partners(shape, hw, seed)
        return params

    def _sample_ops(self, ops, shape, hw, seed, salt: int) -> dict[str, np.ndarray]:
        params: dict[str, np.ndarray] = {}
        for i, (prefix, op) in enumerate(zip(self.prefixes, ops, strict=False)):
            rng = np.random.default_rng(seed if i == 0 and salt == 0 else [seed, i + salt])
            params |= {prefix + k: a for k, a in op.sample(rng, shape, hw).items()}
        return params

    def _sample_partners(self, shape, hw, seed) -> dict[str, np.ndarray]:
        """The partner of each (view, row) (uniform over the other rows), its own pre-mix parameters, and
        which mixing op fires."""
        v, n = shape
        if n < 2:
            raise SpecError(f"view policy '{self.spec}' mixes two rows but the dataset has {n}; drop the mixing op")
        if n > np.iinfo(np.uint32).max:
            raise SpecError(f"view policy '{self.spec}' stores partner rows as uint32: at most {2**32 - 1} rows")
        rng = np.random.default_rng([seed, 1_000_003])
        rows = np.arange(n)
        partner = rng.integers(0, n - 1, shape)
        partner = partner + (partner >= rows)  # never the row itself
        fired = np.zeros(shape, dtype=np.uint8)
        for j, op in enumerate(self.mix_ops):
            fire = (fired == 0) & (rng.random(shape) < op.p)
            fired[fire] = j + 1
        partner_hw = hw[0][partner] if hw.shape[1] == n else hw  # (V, N, 2): each partner's own size
        theirs = self._sample_ops(self.pre, shape, partner_hw, seed, salt=2_000_003)
        unmixed = fired == 0  # nothing of a partner is used there: zeros, which zarr stores for almost nothing
        partner[unmixed] = 0
        for a in theirs.values():
            a[unmixed] = 0
        return {MIX: fired, PARTNER: partner.astype(np.uint32)} | {PARTNER + "." + k: a for k, a in theirs.items()}

    # ------------------------------------------------------------------ replay
    def partner_rows(self, params: dict[str, np.ndarray]) -> np.ndarray | None:
        """(B,) the partner row of each (view, row) that mixes, -1 where none does; None if nothing mixes."""
        if not self.mixes:
            return None
        fired = np.asarray(params[MIX])
        return np.where(fired > 0, np.asarray(params[PARTNER]).astype(np.int64), -1)

    def _own(self, params: dict[str, Any], i: int, partner: bool = False) -> dict[str, Any]:
        prefix = (PARTNER + "." if partner else "") + self.prefixes[i]
        return {k: params[prefix + k] for k in self.ops[i].param_dtypes}

    def _render(self, image: torch.Tensor, params: dict[str, Any], size, partner: bool = False) -> torch.Tensor:
        x = image
        for i, op in enumerate(self.pre):
            x = op.transform(x, self._own(params, i, partner), size)
        return to_float(resize(x, size)).clamp_(0.0, 1.0)

    def apply(self, image: torch.Tensor, params: dict[str, Any], size,
              partner: torch.Tensor | None = None) -> torch.Tensor:
        """One (view, row): (C, H, W) uint8 image + its scalars (+ the partner's image when it mixes) ->
        float32 (C, *size) in [0, 1]."""
        x = self._render(image, params, size)
        fired = int(params[MIX]) if self.mixes else 0
        if fired:
            if partner is None:
                raise SpecError(f"view policy '{self.spec}': this view mixes with row {int(params[PARTNER])}; "
                                "pass its image as partner=")
            theirs = self._render(partner, params, size, partner=True)
            x = self.mix_ops[fired - 1].mix(x, theirs, self._own(params, len(self.pre) + fired - 1))
        return x

    def apply_batch(self, images: torch.Tensor, params: dict[str, np.ndarray], size,
                    partners: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """(B, C, H, W) images + {param: (B,)} (+ partner images, None where a view does not mix) ->
        (B, C, *size); equal to ``apply`` per image, vectorised for a single op without mixing."""
        params = {k: np.asarray(v) for k, v in params.items()}
        if len(self.ops) == 1:
            return to_float(resize(self.ops[0].transform_batch(images, params, size), size)).clamp_(0.0, 1.0)
        return torch.stack([self.apply(img, {k: v[b].item() for k, v in params.items()}, size,
                                       None if partners is None else partners[b])
                            for b, img in enumerate(images)])

    def mix_weights(self, params: dict[str, np.ndarray], size) -> np.ndarray:
        """(B,) the weight of each row's own label in its view (1 where it does not mix): lambda for Mixup,
        the unpasted fraction of the pixels at ``size`` for CutMix."""
        weights = np.ones(len(next(iter(params.values()))), dtype=np.float64)
        if not self.mixes:
            return weights
        fired = np.asarray(params[MIX])
        for b in np.flatnonzero(fired):
            i = len(self.pre) + int(fired[b]) - 1
            own = {k: np.asarray(v)[b].item() for k, v in self._own(params, i).items()}
            weights[b] = self.ops[i].weight(own, size)
        return weights

