"""`kdcache verify` / ``kdcache.verify``: check a store's structure and checksums, and with a teacher
rebuild it, replay stored views and compare with the cache.

A cached logit is only worth something if it is what the teacher says about *that* input, so the
replay check recomputes a random sample of (view, row) pairs through the same view replay and correction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.corrections import apply_correction
from kdcache.data import load_dataset
from kdcache.models import build_ready_teacher, teacher_name
from kdcache.replay import ViewedRows, resolve_device
from kdcache.stores.errors import CorruptionError, SpecError, StoreError
from kdcache.stores.logit_store import LogitStore
from kdcache.views import view_policy_from_record


@dataclass
class VerifyReport:
    """What ``verify`` found: ``problems`` (structure, done flags, checksums), blocks done per teacher
    as (done, total), and one ReplayReport per teacher spec checked. ``ok``: nothing is damaged;
    ``complete``: besides, every block of every teacher is done (`kdcache verify` exits 0 only then, 3 when
    the store is merely unfinished, 2 when something is damaged)."""

    store: str
    problems: list[str] = field(default_factory=list)
    blocks_done: dict[str, tuple[int, int]] = field(default_factory=dict)
    replays: list[ReplayReport] = field(default_factory=list)
    repairable: bool = True  # every problem is a bad block: `kdcache repair` mends it
    creating: bool = False  # the store's creation has not finished (running, or killed)

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.replays)

    @property
    def unfinished(self) -> int:
        """Blocks not done, over all teachers."""
        return sum(total - done for done, total in self.blocks_done.values())

    @property
    def complete(self) -> bool:
        return not self.creating and bool(self.blocks_done) and self.unfinished == 0

    def finish_command(self) -> str:
        """The command that finishes an incomplete (undamaged) store."""
        if self.creating or not self.blocks_done:  # no teacher yet: repair has no recorded teacher to run
            return f"rerun the `kdcache teach` command that made {self.store} (same --out)"
        return f"kdcache repair {self.store}"

    def raise_for_problems(self) -> None:
        """CorruptionError (one line) unless ``ok``: the first thing a rerun of stage one must fix."""
        if self.problems and self.repairable:
            raise CorruptionError(f"{len(self.problems)} problem(s) in {self.store}: damaged blocks; run `kdcache "
                                  f"repair {self.store}` to recompute them")
        if self.problems:
            raise CorruptionError(f"{len(self.problems)} problem(s) in {self.store}: labels, views, the manifest "
                                  "or a teacher's arrays are damaged, which cannot be recomputed block by block; "
                                  "re-teach with --overwrite")
        for rep in self.replays:
            if not rep.ok:
                raise CorruptionError(f"the cache does not reproduce teacher '{rep.teacher}' (excess over "
                                      f"tolerance {rep.max_excess:.2e}); was it cached with another teacher "
                                      "or dataset? re-teach with --overwrite")


def verify(store: str | os.PathLike | LogitStore, teacher: str | Sequence[str] | None = None, samples: int = 64,
           seed: int = 0, device: str = "auto") -> VerifyReport:
    """Structure, done flags and per-block checksums (``LogitStore.verify``); with ``teacher`` (a spec or a
    list of specs) also the replay check of ``samples`` stored (view, row) pairs per teacher, skipped when
    the store already has problems. Reports, never raises for what it finds: see ``raise_for_problems``."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:  # checked before any work
        raise SpecError(f"--samples must be an integer >= 1 ((view, row) pairs to recompute); got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"--seed must be an integer >= 0; got {seed!r}")
    resolve_device(device)
    if not isinstance(store, LogitStore) and LogitStore.in_creation(store):
        return VerifyReport(os.fspath(store), creating=True)
    st = store if isinstance(store, LogitStore) else LogitStore.open(os.fspath(store))
    found = st.integrity()
    report = VerifyReport(st.url if isinstance(store, LogitStore) else os.fspath(store), found.problems(),
                          repairable=found.repairable)
    for name in st.teachers:
        if not found.teachers.get(name):  # a teacher whose arrays are all there
            done = st.done(name)
            report.blocks_done[name] = (int(done.sum()), int(done.size))
    if report.problems:
        return report
    specs = [teacher] if isinstance(teacher, str) else list(teacher or [])
    report.replays = [replay_check(st, spec, samples=samples, seed=seed, device=device) for spec in specs]
    return report


@dataclass
class ReplayReport:
    teacher: str
    samples: int
    max_abs_diff: float
    max_excess: float  # max over entries of |diff| - tolerance; > 0 means a mismatch
    top1_agreement: float

    @property
    def ok(self) -> bool:
        return self.max_excess <= 0 and self.top1_agreement == 1.0


def tolerance(stored: np.ndarray, encoding: str, bf16: bool = False) -> np.ndarray:
    """Per-entry bound on |cached - recomputed|: the encoding's rounding plus forward noise: fp32 noise, or
    for a store labelled under bf16 autocast (8-bit mantissa, batch-dependent kernels) 2^-6 of the row's
    largest |logit| plus 2^-6 relative."""
    if bf16:
        noise = 2.0**-6 * (np.abs(stored).max(axis=-1, keepdims=True) + np.abs(stored))
    else:
        noise = 1e-3 + 1e-3 * np.abs(stored)
    if encoding == "uint8":
        span = stored.max(axis=-1, keepdims=True) - stored.min(axis=-1, keepdims=True)
        return noise + span / 510.0
    return noise + np.abs(stored) * 2.0**-11


def replay_check(store: LogitStore, spec: str, samples: int = 64, seed: int = 0,
                 device: str = "auto") -> ReplayReport:
    identity = store.attrs["identity"]
    dataset = load_dataset(identity["dataset"], identity["split"])
    if dataset.fingerprint() != store.attrs["dataset"]["fingerprint"]:
        raise StoreError("the dataset on this machine differs from the cached one (fingerprint); "
                         "point the dataset spec at the same data")
    dev = resolve_device(device)
    name = teacher_name(spec)
    if name not in store.teachers:
        raise StoreError(f"teacher '{name}' is not in {store.url} (it has: {', '.join(store.teachers) or 'none'}); "
                         "pass one of its --teacher specs")
    # rebuilt as the store's run built it: the same seed gives the same random (:none) weights
    model, _ = build_ready_teacher(spec, dataset.num_classes, identity["seed"], tuple(store.attrs["input_size"]), dev)
    tattrs = store.teacher_attrs(name)
    bf16 = labelled_in_bf16(store, name)
    done = store.done(name)
    pairs = [(v, r) for v, s in np.argwhere(done) for r in range(*store.shard_bounds(int(s)))]
    if not pairs:
        raise StoreError(f"teacher '{name}' has no finished blocks to verify; run `kdcache teach` first")
    rng = np.random.default_rng(seed)
    pick = [pairs[i] for i in rng.choice(len(pairs), size=min(samples, len(pairs)), replace=False)]
    size = tuple(store.attrs["input_size"])
    policy = view_policy_from_record(store.attrs["view_policy"])
    rows = ViewedRows(dataset, policy, store.views(), store.manifest_column("dataset_index"), size)
    x, y, *_ = rows.__getitems__([(int(v), int(r)) for v, r in pick])
    x, y = x.to(dev), y.to(dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
        raw = model(x).float()
    corr = tattrs["correction"]
    z = apply_correction(corr["name"], raw, y, **corr["args"]).cpu().numpy()
    diffs, excess, agree = [], [], []
    for i, (v, r) in enumerate(pick):
        try:
            rec = store.read_block(name, int(v), int(r), int(r) + 1)
        except Exception as err:  # a chunk that cannot be decoded is corruption, not a bug
            raise CorruptionError(f"view {v} row {r} of teacher '{name}' is unreadable ({err}); "
                                  "rerun `kdcache teach` with --overwrite") from err
        stored = rec["values"][0]
        recomputed = z[i] if "indices" not in rec else z[i][rec["indices"][0]]
        d = np.abs(stored - recomputed)
        diffs.append(d.max())
        tol = tolerance(stored, tattrs["encoding"], bf16)
        excess.append((d - tol).max())
        # top-1 agrees unless the stored top class is behind the recomputed one by more than the tolerance
        top = int(np.argmax(stored))
        best = float(recomputed.max() if "counts" in rec else z[i].max())  # sampled: among the classes drawn
        agree.append(best - float(recomputed[top]) <= float(tol[top]))
    return ReplayReport(name, len(pick), float(max(diffs)), float(max(excess)), float(np.mean(agree)))


def labelled_in_bf16(store: LogitStore, name: str) -> bool:
    """Whether any finished block of the teacher was labelled under bf16 autocast (its ``bf16_rows`` stat)."""
    return store.block_stat_totals(name).get("bf16_rows", 0.0) > 0
