"""View policies: augmentation with explicit, stored parameters, so stage two replays exactly the
input the teacher labelled in stage one (docs/methods.md, "What a cache changes"; docs/views.md).

A policy is a chain of ops written ``'crop-flip | randaugment:n=2,magnitude=uniform | cutout:0.5'``
(``kdcache.views.spec``), or several named groups of such chains (``ViewGroups``). One file per op,
registered below (``VIEW_OPS``); ``kdcache list policies`` lists them.
"""

from __future__ import annotations

import torchvision

from kdcache.stores.errors import SpecError
from kdcache.views.autoaugment import AutoAugment
from kdcache.views.base import MAX_VIEWS, UNIT, MixOp, ViewOp
from kdcache.views.crop_flip import CropFlip
from kdcache.views.cutmix import CutMix
from kdcache.views.cutout import Cutout
from kdcache.views.groups import ViewGroups
from kdcache.views.identity import Identity
from kdcache.views.mixup import Mixup
from kdcache.views.policy import ViewPolicy
from kdcache.views.randaugment import RandAugment
from kdcache.views.random_erasing import RandomErasing
from kdcache.views.rrc_flip import RRCFlip
from kdcache.views.spec import parse_policy
from kdcache.views.trivialaugment import TrivialAugment

VIEW_OPS: dict[str, type[ViewOp]] = {op.name: op for op in (
    Identity,
    CropFlip,
    RRCFlip,
    RandAugment,
    TrivialAugment,
    AutoAugment,
    Cutout,
    RandomErasing,
    Mixup,
    CutMix,
)}


def policy_from_spec(spec: str) -> ViewPolicy:
    """A policy string (``'rrc-flip | trivialaugment | mixup:alpha=0.8'``) -> its ``ViewPolicy``."""
    return parse_policy(spec, VIEW_OPS)


def view_groups(groups: list[tuple[str, str]]) -> ViewGroups:
    """[(name, policy string), ...] -> ``ViewGroups`` (``--view-group weak=crop-flip ...``)."""
    return ViewGroups([(name, policy_from_spec(spec)) for name, spec in groups])


def get_view_policy(name: str, **args) -> ViewPolicy:
    """The one-op policy ``name`` built with ``args`` (its constructor arguments, as a store records them)."""
    cls = VIEW_OPS.get(name)
    if cls is None:
        raise SpecError(f"unknown view policy '{name}'; expected one of {', '.join(VIEW_OPS)}")
    try:
        return ViewPolicy([cls(**args)])
    except TypeError as err:
        raise SpecError(f"bad arguments {args} for view policy '{name}': {err}") from None


def view_policy_from_record(record: dict) -> ViewPolicy | ViewGroups:
    """Rebuild the policy a store recorded; refuse a torchvision whose major.minor differs (replay could then
    differ from what the teacher saw)."""
    stored = str(record.get("torchvision", ""))
    if stored.split(".")[:2] != torchvision.__version__.split(".")[:2]:
        raise SpecError(f"the views were made with torchvision {stored or '?'} but this is {torchvision.__version__}; "
                        f"install torchvision=={stored} to replay them exactly")
    name, args = record["name"], dict(record.get("args", {}))
    if name == "pipeline":
        return policy_from_spec(args["spec"])
    if name == "groups":
        groups = view_groups([(g, spec) for g, spec in args["groups"]])
        groups.views_per_group = args.get("views")
        return groups
    return get_view_policy(name, **args)


__all__ = ["MAX_VIEWS", "UNIT", "VIEW_OPS", "AutoAugment", "CropFlip", "CutMix", "Cutout", "Identity", "MixOp",
           "Mixup", "RRCFlip", "RandAugment", "RandomErasing", "TrivialAugment", "ViewGroups", "ViewOp", "ViewPolicy",
           "get_view_policy", "policy_from_spec", "view_groups", "view_policy_from_record"]
