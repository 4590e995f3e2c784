"""``CachedLoader``: stage two for any training loop — replayed views, labels and the teacher's record.

One loader serves ``kdcache train`` and a user's own loop (docs/api.md), so both train the same
student from the same seed. Per batch it yields ``(images, labels, teacher)``:

* ``images`` — the exact views the teacher labelled in stage one, rendered by ``kdcache.replay``
  at the student's size, normalised, then the user's optional ``transform`` (B, C, H, W) -> same B;
* ``labels`` — int64 class ids;
* ``teacher`` — the cached record of those (view, row) pairs (``SparseLogits``, ``SampledLogits``
  or, for ``teacher="a,b"``, an ``EnsembleRecord``): ``probs(T)``, ``log_probs(T)``, ``logits()``,
  ``to(device)``; a train-time ``correction`` is already applied.

A store whose views mix (Mixup, CutMix) yields float (B, classes) ``labels``: w * onehot(y) +
(1 - w) * onehot(y_partner), the exact mix of the pixels served (timm's mixup targets, which
``F.cross_entropy`` takes as class probabilities). A store with view groups (``weak``, ``strong``)
yields each of the three as a dict {group: value}: the same rows, one view of every group per step.

The epoch order depends only on (seed, epoch) (``kdcache.soft_labels``); ``rank``/``world`` take
disjoint shares that cover it, with the same number of steps on every rank. Image workers persist
across epochs. ``state_dict()`` / ``load_state_dict()`` resume mid-epoch at the next batch.

Everything is checked before the first batch: the dataset against the store's fingerprint, the
teacher names, a correction applied twice, a loss that is biased on a sampled record or reads
temperatures the tail does not cover, and that every block is done (an unfinished store is refused,
naming the `kdcache teach` command that finishes it; ``allow_partial=True`` serves only the rows of
the shards done in every view, with a ``PartialStoreWarning``). Every block read is checked against
its crc32 once (``kdcache.soft_labels``). Problems raise ``KdcacheError`` subclasses with one line.
"""

from __future__ import annotations

import os
import shlex
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache.corrections import apply_correction, get_correction
from kdcache.data import ImageDataset, load_dataset
from kdcache.ensemble import EnsembleRecord, ensemble_attrs, parse_teachers
from kdcache.fidelity import check_store_tail_coverage
from kdcache.losses import LOSSES, get_loss, loss_temperatures, resolve_hparams
from kdcache.records import get_layout
from kdcache.replay import Mix, OrderBatches, ViewBatch, ViewedRows, default_workers, replay_loader, resolve_device
from kdcache.soft_labels import EpochOrder, SoftLabels
from kdcache.stores.errors import SpecError, StoreError
from kdcache.stores.logit_store import LogitStore
from kdcache.views import view_policy_from_record

PRELOAD_BUDGET = 8 << 30  # soft labels of every member are preloaded when they fit (decoded) in this


class PartialStoreWarning(UserWarning):
    """``allow_partial=True`` on an unfinished store: training sees only the rows of its done shards."""


@dataclass(frozen=True)
class Member:
    """One teacher of the store the loader reads: its name, attrs and soft-label source."""

    name: str
    attrs: dict[str, Any]
    soft: SoftLabels


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise SpecError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """Explicit rank/world, else the initialised process group's, else one process."""
    dist = torch.distributed
    if world is None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = _positive_int(world, "world")
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not 0 <= rank < world:
        raise SpecError(f"rank must be an integer in 0..{world - 1} (world {world}); got {rank!r}")
    return int(rank), world


def open_logit_store(store: str | os.PathLike | LogitStore | Any) -> LogitStore:
    """A ``LogitStore`` from a path/URL, a ``LogitStore`` or a ``kdcache.Store``."""
    if isinstance(store, LogitStore):
        return store
    if hasattr(store, "logit_store"):
        return store.logit_store
    if not LogitStore.exists(store):
        raise StoreError(f"no store at {store}; check the path, or make one with `kdcache teach`")
    return LogitStore.open(store)


def store_dataset(store: LogitStore, dataset: str | ImageDataset | Any | None) -> ImageDataset:
    """The images behind the store's rows (its recorded spec, or the one given), checked by fingerprint."""
    attrs = store.attrs
    identity = attrs.get("identity") or {}  # stores written by `kdcache teach` record it; raw LogitStores may not
    split = identity.get("split", "train")
    if dataset is None:
        spec = identity.get("dataset")
        if spec is None:
            raise SpecError(f"{store.url} records no dataset spec (it was not made by `kdcache teach`); pass dataset=")
        if spec.startswith("python:"):
            raise SpecError(f"{store.url} was cached from a Python dataset ({spec}); pass it again as dataset=")
        dataset = load_dataset(spec, split)
    elif isinstance(dataset, str):
        dataset = load_dataset(dataset, split)
    elif not isinstance(dataset, ImageDataset):
        from kdcache.data import as_image_dataset  # a user's map-style dataset

        dataset = as_image_dataset(dataset)
    if len(dataset) != store.num_rows:
        raise StoreError(f"{store.url} holds {store.num_rows} rows but the dataset has {len(dataset)} items; "
                         "pass the dataset the store was made from")
    if dataset.fingerprint() != attrs["dataset"]["fingerprint"]:
        raise StoreError(f"{store.url} was cached from other data than {dataset.spec!r} (dataset fingerprint "
                         "differs); pass the dataset the store was made from")
    return dataset


def teach_command(store: LogitStore, teacher: str) -> str:
    """The `kdcache teach` command that resumes ``teacher`` of ``store``, rebuilt from the identities stage
    one recorded (pipeline/teach.py: ``identity`` in the store's and the teacher's attrs); a sentence when
    they cannot make one (a Python dataset or teacher, or a store made by an older kdcache)."""
    fallback = f"rerun the `kdcache teach` command that made {store.url} (same --out)"
    ident, tid = store.attrs.get("identity"), store.teacher_attrs(teacher).get("identity")
    if not isinstance(ident, dict) or not isinstance(tid, dict):
        return fallback
    dataset, spec = str(ident.get("dataset", "")), str(tid.get("spec", ""))
    if not dataset or not spec or "python:" in dataset + spec:
        return fallback
    flags: list[tuple[str, Any]] = [
        ("--split", ident.get("split")), ("--teacher", spec), ("--k", tid.get("k")),
        ("--temperatures", ",".join(f"{float(t):g}" for t in tid.get("temperatures") or ())),
        ("--max-kl", tid.get("max_kl")), ("--proposal-temperature", tid.get("proposal_temperature")),
        ("--encoding", tid.get("encoding")), ("--correction", tid.get("correction")),
        ("--loca-alpha", (tid.get("correction_args") or {}).get("alpha")),
        ("--loca-temperature", (tid.get("correction_args") or {}).get("temperature")),
        ("--views", ident.get("views")), ("--view-policy", ident.get("view_policy")),
        *(("--view-group", f"{g}={spec}") for g, spec in ident.get("view_groups") or ()),
        ("--image-size", ident.get("image_size")), ("--seed", ident.get("seed")),
        ("--shard-rows", ident.get("shard_rows")), ("--chunk-rows", ident.get("chunk_rows")), ("--out", store.url)]
    words = ["kdcache", "teach", dataset] + [w for flag, v in flags if v not in (None, "")
                                             for w in (flag, f"{v:g}" if isinstance(v, float) else str(v))]
    return " ".join(shlex.quote(w) for w in words)


def served_shards(store: LogitStore, teachers: list[str], allow_partial: bool) -> np.ndarray | None:
    """The shards stage two may read: None (all) when every block of ``teachers`` is done. Otherwise an
    unfinished store is refused, or, with ``allow_partial``, the shards done in every view of every teacher
    are served (one warning). Restricting to whole shards keeps every view of a row servable, so the epoch
    order, the view schedule and DDP shares work unchanged on fewer rows."""
    done = [store.done(name) for name in teachers]
    if all(d.all() for d in done):
        return None
    first = next(i for i, d in enumerate(done) if not d.all())
    name, missing, total = teachers[first], int((~done[first]).sum()), done[first].size
    if not allow_partial:
        raise StoreError(f"{store.url}: {missing} of {total} blocks (view x shard) of teacher '{name}' are unfinished "
                         f"(`kdcache teach` stopped early); finish them with `{teach_command(store, name)}`, or train "
                         "on the done blocks only with --allow-partial (allow_partial=True)")
    shards = np.flatnonzero(np.logical_and.reduce([d.all(axis=0) for d in done]))
    if not len(shards):
        raise StoreError(f"{store.url}: no shard is done in every view of teacher(s) {', '.join(teachers)}, so "
                         f"--allow-partial has no rows to train on; finish them with `{teach_command(store, name)}`")
    rows = sum(b - a for a, b in map(store.shard_bounds, map(int, shards)))
    warnings.warn(f"{store.url} is unfinished ({missing} of {total} blocks of teacher '{name}' not done): training "
                  f"on the {rows} of {store.num_rows} rows of the {len(shards)} of {store.num_shards} shards done in "
                  "every view (--allow-partial)", PartialStoreWarning, stacklevel=3)
    return shards


def check_policy_use(policy, *, loss: str | None, loss_args: dict | None, correction: str) -> None:
    """Refuse what the served views cannot train, whoever labels them (the cache or a live teacher): a
    correction or a label-reading loss (DKD, SLD) on mixed views, which have two labels, and a loss whose
    ``views`` (linked views per step, SLD: 2) differs from the view groups the policy holds."""
    if policy.mixes and correction != "none":
        raise SpecError(f"correction {correction!r} moves the label's logit, and a mixed view has two labels; "
                        "train without a correction on a mixing store")
    if loss is None:
        return
    spec = get_loss(loss)
    if policy.mixes and spec.reads_label:
        raise SpecError(f"loss '{loss}' reads the logit of one label, and a mixed view (Mixup, CutMix) has two; "
                        "use kd, ttm, wttm or clkd on a mixing store, or cache views without mixing")
    hp = resolve_hparams(loss, loss_args)
    groups = list(policy.groups or ())
    if "views" in hp and hp["views"] != max(1, len(groups)):
        if not groups:
            raise SpecError(f"loss '{loss}' trains {hp['views']} linked views per step (weak, strong) and this "
                            "store has one; cache them with --view-group (`kdcache recipes NAME`), or pass "
                            "--loss-arg views=1")
        raise SpecError(f"loss '{loss}' with views={hp['views']} but the store links {len(groups)} view groups "
                        f"({', '.join(groups)}) per step; pass --loss-arg views={len(groups)}")


def check_record_use(attrs: dict[str, Any], *, loss: str | None, loss_args: dict | None, correction: str,
                     ensemble: bool, strict: bool = False) -> None:
    """Refuse what would silently train on the wrong thing: a correction applied twice or to an
    ensemble, a train-time correction or a biased loss on a sampled record, a loss reading the teacher
    at temperatures the tail does not cover (a warning unless ``strict``)."""
    layout = get_layout(attrs["layout"])
    stored = (attrs.get("correction") or {}).get("name", "none")
    if correction != "none":
        if ensemble:
            raise SpecError(f"correction {correction!r} corrects one teacher's logits and an ensemble has none: "
                            "cache each teacher with `kdcache teach --correction`, or train from one teacher")
        if stored != "none":
            raise SpecError(f"the store's teacher is already corrected with '{stored}'; a correction is never "
                            "applied twice: drop the correction (or cache an uncorrected store)")
        if not layout.train_time_corrections:
            raise SpecError(f"correction {correction!r} needs the teacher's logits of every class, which a "
                            f"{layout.name} record does not keep; cache the store with --correction {correction}")
    if loss is None:
        return
    spec = get_loss(loss)
    if loss == "sld" and ensemble:
        raise SpecError("loss 'sld' swaps one teacher's logits and an ensemble has none; train from one teacher")
    if layout.linear_losses_only and not spec.linear_in_teacher:
        unbiased = " or ".join(n for n, s in LOSSES.items() if s.linear_in_teacher and s.needs_teacher)
        raise SpecError(f"loss '{loss}' is biased on a {layout.name} record (it is not linear in the teacher's "
                        f"probabilities); use loss {unbiased} on this store, or cache top-k/dense records")
    check_store_tail_coverage(attrs, loss_temperatures(loss, resolve_hparams(loss, loss_args)), strict)


class CachedLoader:
    """Batches of ``(images, labels, teacher)`` from a store, in the store's deterministic epoch order.

    ``batch_size`` is per process (under DDP each rank passes its share). ``workers`` image worker
    processes (default: 0 for in-memory datasets, else cores - 1) persist across epochs.
    ``teacher``: the store's teacher, or ``"a,b"`` for the mean of several (default: the only one).
    ``dataset``: the data the store was made from when its recorded spec is not loadable here
    (another path, or a Python dataset); checked by fingerprint. ``preload``: ``auto`` | ``yes`` |
    ``no`` (soft labels in RAM, or streamed chunk-shuffled). ``view_schedule``: ``cycle`` (epoch e
    reads view (e-1) mod V) or ``random``. ``loss`` / ``loss_args`` (optional): the loss the records
    feed, checked against the record (bias, tail coverage; ``strict`` makes coverage an error).
    ``device``: where records are built (images and labels stay on the CPU, pinned on CUDA).
    ``allow_partial``: train on an unfinished store, on the rows of the shards done in every view only
    (``PartialStoreWarning``); without it an unfinished store is a ``StoreError``.
    """

    def __init__(self, store, batch_size: int, *, teacher: str | None = None, dataset=None,
                 workers: int | None = None, seed: int = 0, preload: str = "auto", view_schedule: str = "cycle",
                 image_size: int | tuple[int, int] | None = None, transform: Callable | None = None,
                 correction: str = "none", correction_args: dict[str, Any] | None = None,
                 loss: str | None = None, loss_args: dict[str, Any] | None = None, strict: bool = False,
                 rank: int | None = None, world: int | None = None, max_steps: int | None = None,
                 device: str | torch.device = "cpu", records: bool = True, allow_partial: bool = False):
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.rank, self.world = _rank_world(rank, world)
        self.max_steps = None if max_steps is None else _positive_int(max_steps, "max_steps")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise SpecError(f"workers must be an integer >= 0; got {workers!r}")
        if transform is not None and not callable(transform):
            raise SpecError(f"transform must be callable (a batch (B, C, H, W) -> (B, ...)); got {transform!r}")
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.store = open_logit_store(store)
        self.dataset = store_dataset(self.store, dataset)
        self.correction = correction
        self.correction_args = get_correction(correction).args(correction_args or {})
        self.size = self._size(image_size)
        self.allow_partial = bool(allow_partial)
        self.policy = view_policy_from_record(self.store.attrs["view_policy"])
        # view groups: their names and the first view of each; a plain store is one unnamed group at 0
        self.groups: tuple[str, ...] | None = tuple(self.policy.groups) if self.policy.groups else None
        self._offsets = tuple(r.start for r in self.policy.groups.values()) if self.groups else (0,)
        self.members = self._members(teacher, preload, view_schedule)
        self.teacher = ",".join(m.name for m in self.members)
        self.teacher_attrs = self._teacher_attrs()
        self.records = records  # False: images and labels only, in the same order (a live teacher's baseline)
        check_policy_use(self.policy, loss=loss, loss_args=loss_args, correction=correction)
        if records:
            check_record_use(self.teacher_attrs, loss=loss, loss_args=loss_args, correction=correction,
                             ensemble=len(self.members) > 1, strict=strict)
        self._order_source = self.members[0].soft
        self.rows = ViewedRows(self.dataset, self.policy, self.store.views(),
                               self.store.manifest_column("dataset_index"), self.size, transform)
        self.workers = default_workers(self.dataset) if workers is None else workers
        self._sampler = OrderBatches(self.batch_size, self._offsets)
        self._images = replay_loader(self.rows, self._sampler, self.workers, self.device, persistent=True)
        self.epoch = 1
        self._served = 0  # batches of self.epoch already served (mid-epoch resume continues after them)
        self._batches = None

    # ------------------------------------------------------------------ setup
    def _size(self, image_size) -> tuple[int, int]:
        if image_size is None:
            return tuple(int(s) for s in self.store.attrs["input_size"])
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
            raise SpecError(f"image_size must be an integer >= 1 or (height, width); got {image_size!r}")
        return size

    def _members(self, teacher: str | None, preload: str, view_schedule: str) -> list[Member]:
        names = parse_teachers(teacher) if teacher is not None else self._only_teacher()
        for name in names:
            if name not in self.store.teachers:
                raise StoreError(f"{self.store.url} has no teacher '{name}' (it has: "
                                 f"{', '.join(self.store.teachers) or 'none'}); pick one of those")
        attrs = [self.store.teacher_attrs(n) for n in names]
        if preload == "auto" and len(names) > 1:  # one decision for all members: they serve one order
            need = sum(get_layout(a["layout"]).decoded_bytes_per_row(a) for a in attrs)
            preload = "yes" if need * self.store.num_rows * self.store.num_views <= PRELOAD_BUDGET else "no"
        shards = served_shards(self.store, names, self.allow_partial)
        slots = self.store.num_views // len(self._offsets)
        return [Member(n, a, SoftLabels(self.store, n, preload=preload, view_schedule=view_schedule, seed=self.seed,
                                        rank=self.rank, world=self.world, shards=shards, view_slots=slots))
                for n, a in zip(names, attrs, strict=True)]

    def _only_teacher(self) -> list[str]:
        if len(self.store.teachers) != 1:
            raise SpecError(f"{self.store.url} has teachers {', '.join(self.store.teachers) or 'none'}; "
                            "pick one with teacher=NAME (or 'a,b' for their ensemble)")
        return [self.store.teachers[0]]

    def _teacher_attrs(self) -> dict[str, Any]:
        if len(self.members) == 1:
            return self.members[0].attrs
        return ensemble_attrs([m.name for m in self.members], [m.attrs for m in self.members])

    # ------------------------------------------------------------------ epochs
    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def set_epoch(self, epoch: int) -> None:
        """Choose the (1-based) epoch the next iteration serves; the order depends only on (seed, epoch)."""
        epoch = _positive_int(epoch, "epoch (1-based)")
        if epoch != self.epoch or self._served >= self.steps(epoch):  # a finished epoch is served anew
            self._served = 0
        self.epoch = epoch

    def order(self, epoch: int | None = None) -> EpochOrder:
        """This rank's (views, rows) of the epoch, in serving order."""
        return self._order_source.order(self.epoch if epoch is None else epoch)

    def steps(self, epoch: int | None = None) -> int:
        """Batches per epoch: full batches of the smallest rank's share (so every rank takes the same
        number), one short batch when a share is smaller than a batch; at most ``max_steps``."""
        shares = self._order_source.share_rows(self.epoch if epoch is None else epoch)
        per_rank = [s // self.batch_size if s >= self.batch_size else int(s > 0) for s in shares]
        steps = min(per_rank)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def __len__(self) -> int:
        steps = self.steps()
        return steps if self._served >= steps else steps - self._served

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
        """The epoch's remaining batches; iterating again after a finished epoch serves the next one
        (as a loop that never calls ``set_epoch`` expects)."""
        if self._served >= self.steps():
            self.epoch, self._served = (self.epoch + 1, 0) if self._served else (self.epoch, 0)
        epoch, skip = self.epoch, self._served
        order, steps = self.order(epoch), self.steps(epoch)
        self._sampler.set_order(order.views, order.rows, steps, skip)
        # one soft-label stream per (member, group): group g reads the same rows at views shifted to its own
        soft = [[m.soft.batches(order.shifted(offset), self.batch_size, skip=skip) for offset in self._offsets]
                for m in self.members] if self.records else []
        self._batches = iter(self._images)
        try:
            for _ in range(steps - skip):
                batch: ViewBatch = next(self._batches)
                if len(batch.images) != len(batch.labels):
                    raise SpecError(f"the transform changed the batch size from {len(batch.labels)} to "
                                    f"{len(batch.images)}; it must map a batch (B, C, H, W) to (B, ...)")
                per_group = [self._serve(batch, g, [streams[g] for streams in soft]) for g in range(len(self._offsets))]
                self._served += 1
                if self.groups is None:
                    yield per_group[0]
                else:
                    yield tuple({name: part[i] for name, part in zip(self.groups, per_group, strict=True)}
                                for i in range(3))
        finally:
            for streams in soft:
                for s in streams:
                    s.close()
            self._batches = None

    def _serve(self, batch: ViewBatch, group: int, streams: list) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Group ``group``'s part of a rendered batch: (images, labels or mixed targets, teacher record)."""
        b = len(batch.labels) // len(self._offsets)
        part = slice(group * b, (group + 1) * b)
        x, y = batch.images[part], batch.labels[part]
        teacher = self._record([next(s) for s in streams], y) if streams else None
        if batch.mix is not None:
            mix = Mix(batch.mix.partner_labels[part], batch.mix.weights[part])
            y = mix.targets(y, self.num_classes)
        return x, y, teacher

    def _record(self, batches: list[dict[str, np.ndarray]], labels: torch.Tensor):
        y = labels.to(self.device, non_blocking=True)
        records = [get_layout(m.attrs["layout"]).from_arrays(b, y, m.attrs, self.device)
                   for b, m in zip(batches, self.members, strict=True)]
        rec = records[0] if len(records) == 1 else EnsembleRecord(tuple(records))
        if self.correction != "none":
            rec = apply_correction(self.correction, rec, **self.correction_args)
        return rec

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the epoch and the batches of it already served."""
        return {"epoch": self.epoch, "batches_served": self._served, "seed": self.seed,
                "batch_size": self.batch_size, "rank": self.rank, "world": self.world, "teacher": self.teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the next batch of ``state``'s epoch (the same loader settings are required)."""
        for key in ("seed", "batch_size", "world", "teacher"):
            if state.get(key) != getattr(self, key):
                raise SpecError(f"loader state is from a loader with another {key} ({state.get(key)!r} there, "
                                f"{getattr(self, key)!r} here); resume with the same settings")
        self.epoch = _positive_int(state["epoch"], "epoch")
        self._served = int(state["batches_served"])

    def close(self) -> None:
        """Stop the image workers now (they also stop when the loader is garbage collected)."""
        self._batches = None
        workers = getattr(self._images, "_iterator", None)
        if workers is not None:
            workers._shutdown_workers()
            self._images._iterator = None

    def __enter__(self) -> CachedLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CachedLoader({self.store.url!r}, teacher={self.teacher!r}, batch_size={self.batch_size}, "
                f"rank={self.rank}/{self.world}, epoch={self.epoch}, steps={self.steps()})")
