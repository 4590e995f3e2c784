"""Record layouts (teacher attrs "layout") as classes behind one interface, found by name in a registry.

Adding a layout: a module with a ``Layout`` subclass (and its ``RecordSchema``), plus one
``register_layout`` line here. See ``kdcache.records.base``.
"""

from kdcache.records.base import (
    APPROXIMATE,
    AUTO,
    EXACT,
    LAYOUTS,
    UNDEFINED,
    Layout,
    Record,
    get_layout,
    k_choices,
    layout_for_k,
    names_layout,
    register_layout,
    strictest,
    unregister_layout,
)
from kdcache.records.dense import Dense
from kdcache.records.sampled import Sampled
from kdcache.records.topk import TopK

register_layout(TopK)
register_layout(Dense)
register_layout(Sampled)

__all__ = [
    "APPROXIMATE",
    "AUTO",
    "EXACT",
    "LAYOUTS",
    "UNDEFINED",
    "Dense",
    "Layout",
    "Record",
    "Sampled",
    "TopK",
    "get_layout",
    "k_choices",
    "layout_for_k",
    "names_layout",
    "register_layout",
    "strictest",
    "unregister_layout",
]
