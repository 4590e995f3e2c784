"""``ViewGroups``: named, linked views of every row (``weak`` and ``strong`` for SLD, MLKD, CRLD).

Each group is its own ``ViewPolicy`` with the same number of views V; the store's view axis holds the
groups one after another (group g owns views g*V .. (g+1)*V - 1), every view's parameters drawn
independently. Parameters are named ``<group>.<param>`` plus ``group`` (which group a view belongs
to); a group's parameters are zero in the other groups' views (zarr compresses them to nothing).
Stage two serves view slot s of every group of a row in the same step (``kdcache.loader``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision

from kdcache.stores import format as fmt
from kdcache.stores.errors import SpecError
from kdcache.views.base import MAX_VIEWS, U8
from kdcache.views.policy import ViewPolicy, resolve_num_views

GROUP = "group"


class ViewGroups:
    """Several named policies over the same rows; ``sample(V)`` gives G * V views."""

    name = "groups"
    num_views_all = None

    def __init__(self, groups: list[tuple[str, ViewPolicy]]):
        if len(groups) < 2:
            raise SpecError("view groups need at least two groups (e.g. --view-group weak=crop-flip "
                            "--view-group strong='crop-flip | randaugment'); for one, use --view-policy")
        names = [g for g, _ in groups]
        for g in names:
            fmt.check_node_name(g, "view group")
            if not g.replace("-", "").replace("_", "").isalnum():
                raise SpecError(f"view group name '{g}' must be letters, digits, '-' or '_'")
        if len(set(names)) != len(names):
            raise SpecError(f"view group names must differ; got {', '.join(names)}")
        if len(groups) > 255:
            raise SpecError(f"at most 255 view groups; got {len(groups)}")
        self.policies = dict(groups)
        self.views_per_group: int | None = None

    @property
    def spec(self) -> str:
        return "; ".join(f"{g}={p.spec}" for g, p in self.policies.items())

    @property
    def args(self) -> dict[str, Any]:
        return {"groups": [[g, p.spec] for g, p in self.policies.items()], "views": self.views_per_group}

    @property
    def mixes(self) -> bool:
        return any(p.mixes for p in self.policies.values())

    @property
    def aspect_dependent(self) -> bool:
        return any(p.aspect_dependent for p in self.policies.values())

    @property
    def groups(self) -> dict[str, range] | None:
        v = self.views_per_group
        if v is None:
            return None
        return {g: range(i * v, (i + 1) * v) for i, g in enumerate(self.policies)}

    @property
    def param_dtypes(self) -> dict[str, np.dtype]:
        return {GROUP: U8} | {f"{g}.{k}": d for g, p in self.policies.items() for k, d in p.param_dtypes.items()}

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "args": self.args, "spec": self.spec, "torchvision": torchvision.__version__}

    def __repr__(self) -> str:
        return f"ViewGroups({self.spec!r})"

    def num_views(self, num_views: int | str) -> int:
        """Views in all: ``num_views`` per group."""
        v = resolve_num_views(num_views, None, self.spec)
        if v * len(self.policies) > MAX_VIEWS:
            raise SpecError(f"{v} views in each of {len(self.policies)} groups is more than {MAX_VIEWS} views")
        return v * len(self.policies)

    def sample(self, num_views, num_rows, image_size=None, seed: int = 0, image_sizes=None) -> dict[str, np.ndarray]:
        """``num_views`` views per group: {param: (G * V, N)}; group g draws with seed ``[seed, g]``."""
        total = self.num_views(num_views)
        v = total // len(self.policies)
        if self.views_per_group not in (None, v):
            raise SpecError(f"these view groups were made with {self.views_per_group} views per group, not {v}")
        self.views_per_group = v
        out = {k: np.zeros((total, num_rows), dtype=d) for k, d in self.param_dtypes.items()}
        for i, (g, policy) in enumerate(self.policies.items()):
            part = policy.sample(v, num_rows, image_size, seed=int(np.random.default_rng([seed, i]).integers(2**62)),
                                 image_sizes=image_sizes)
            rows = slice(i * v, (i + 1) * v)
            out[GROUP][rows] = i
            for k, a in part.items():
                out[f"{g}.{k}"][rows] = a
        return out

    # ------------------------------------------------------------------ replay
    def _split(self, params: dict[str, Any], i: int) -> tuple[ViewPolicy, dict[str, Any]]:
        g, policy = list(self.policies.items())[i]
        return policy, {k: params[f"{g}.{k}"] for k in policy.param_dtypes}

    def _by_group(self, params: dict[str, np.ndarray]):
        """For each group present in a batch: its positions, its policy and its own parameters there."""
        group = np.asarray(params[GROUP]).astype(np.int64)
        for i in np.unique(group):
            at = np.flatnonzero(group == i)
            policy, own = self._split(params, int(i))
            yield at, policy, {k: np.asarray(v)[at] for k, v in own.items()}

    def partner_rows(self, params: dict[str, np.ndarray]) -> np.ndarray | None:
        if not self.mixes:
            return None
        out = np.full(len(params[GROUP]), -1, dtype=np.int64)
        for at, policy, own in self._by_group(params):
            if policy.mixes:
                out[at] = policy.partner_rows(own)
        return out

    def apply(self, image: torch.Tensor, params: dict[str, Any], size, partner=None) -> torch.Tensor:
        policy, own = self._split(params, int(params[GROUP]))
        return policy.apply(image, own, size, partner)

    def apply_batch(self, images: torch.Tensor, params: dict[str, np.ndarray], size, partners=None) -> torch.Tensor:
        out = None
        for at, policy, own in self._by_group(params):
            x = policy.apply_batch(images[torch.from_numpy(at)], own, size,
                                   None if partners is None else [partners[b] for b in at])
            out = x.new_empty((len(images), *x.shape[1:])) if out is None else out
            out[torch.from_numpy(at)] = x
        return out

    def mix_weights(self, params: dict[str, np.ndarray], size) -> np.ndarray:
        weights = np.ones(len(params[GROUP]))
        for at, policy, own in self._by_group(params):
            weights[at] = policy.mix_weights(own, size)
        return weights
