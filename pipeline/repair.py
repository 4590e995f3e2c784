"""`kdcache repair` / ``kdcache.repair.repair``: recompute a store's damaged and unfinished blocks with the
settings and teachers the store recorded, so the result equals a store that was never damaged.

A store knows how it was made: its root attrs hold the store-level flags (``identity``), each teacher's attrs
its own (spec, k, encoding, temperatures, correction) and the batch size. Repair rebuilds the `kdcache teach`
configuration from them and drives it as a rerun of that command does (pipeline/teach.py: ``open_store_for``
clears the done flags of bad blocks, ``pending_blocks`` then lists them with the unfinished ones).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from kdcache.stores.errors import SpecError, StoreError
from kdcache.stores.lock import DriverLock
from kdcache.stores.logit_store import BadBlock, LogitStore
from kdcache.teach import TeachConfig, finish, label_blocks, open_store_for, pending_blocks, prepare

DEFAULT_BATCH_SIZE = next(f.default for f in fields(TeachConfig) if f.name == "batch_size")


@dataclass
class RepairReport:
    """What ``repair`` did: per teacher, the damaged blocks whose done flags it cleared and how many blocks it
    recomputed (those plus the unfinished ones)."""

    store: str
    cleared: dict[str, list[BadBlock]] = field(default_factory=dict)
    recomputed: dict[str, int] = field(default_factory=dict)


def configs_for(store: LogitStore, *, batch_size: int | None = None, workers: int | None = None,
                device: str = "auto", break_lock: bool = False) -> list[TeachConfig]:
    """The `kdcache teach` configurations that made ``store``: one per set of teachers sharing their
    teacher-level flags (a teacher added later by another command gets its own). ``batch_size`` defaults to
    the recorded one (256 for stores made before it was recorded)."""
    identity = store.attrs.get("identity")
    if not isinstance(identity, dict) or "dataset" not in identity:
        raise StoreError(f"{store.url} records no `kdcache teach` settings (attrs 'identity'); repair cannot "
                         "rebuild it: re-teach with --overwrite")
    if str(identity["dataset"]).startswith("python:"):
        raise SpecError(f"{store.url} was cached from a Python dataset object ({identity['dataset']}); rerun "
                        "kdcache.teach(...) with the same dataset and teachers: it repairs on resume")
    groups: dict[str, tuple[dict[str, Any], list[str], int | None]] = {}
    for name in store.teachers:
        attrs = store.teacher_attrs(name)
        flags = dict(attrs.get("identity") or {})
        spec = flags.pop("spec", None)
        if not isinstance(spec, str):
            raise StoreError(f"teacher '{name}' of {store.url} records no spec; repair cannot rebuild it: re-teach "
                             "with --overwrite")
        if spec.startswith("python:"):
            raise SpecError(f"teacher '{name}' of {store.url} was a Python module ({spec}); rerun kdcache.teach(...) "
                            "with the same module: it repairs on resume")
        key = json.dumps(flags, sort_keys=True)
        groups.setdefault(key, (flags, [], attrs.get("batch_size")))[1].append(spec)
    if not groups:
        raise StoreError(f"{store.url} has no teacher yet; rerun the `kdcache teach` command that made it")
    store_flags = {key: value for key, value in identity.items() if key != "dataset"}
    configs = []
    for flags, specs, recorded in groups.values():
        try:
            cfg = TeachConfig(dataset=identity["dataset"], teachers=specs, out=store.url, **store_flags, **flags,
                              batch_size=batch_size or recorded or DEFAULT_BATCH_SIZE, workers=workers,
                              device=device, break_lock=break_lock)
        except TypeError as err:  # a flag this kdcache does not know: a store of a newer kdcache
            raise StoreError(f"{store.url} records settings this kdcache does not know ({err}); upgrade kdcache") \
                from None
        configs.append(cfg)
    return configs


def repair(store: str | os.PathLike, *, batch_size: int | None = None, workers: int | None = None,
           device: str = "auto", break_lock: bool = False,
           progress: Callable[[int, int], None] | None = None) -> RepairReport:
    """Clear the done flags of the store's bad blocks (``LogitStore.bad_blocks``) and recompute them and every
    unfinished block, holding the store's driver lock. Damaged labels, views or manifest are refused in one
    line (they cannot be recomputed block by block). ``progress(rows_done, rows_total)`` per teacher group."""
    url = os.fspath(store)
    report = RepairReport(url)
    for cfg in configs_for(LogitStore.open(url), batch_size=batch_size, workers=workers, device=device,
                           break_lock=break_lock):
        job = prepare(cfg)
        names = [t.name for t in job.teachers]
        with DriverLock(cfg.out, break_lock=cfg.break_lock):
            st = open_store_for(job)  # checks the store and clears the bad blocks' done flags (job.repaired)
            report.recomputed |= {name: int((~st.done(name)).sum()) for name in names}
            label_blocks(job, st, pending_blocks(st, names), progress)
            finish(st, job)
        report.cleared |= job.repaired
    return report
