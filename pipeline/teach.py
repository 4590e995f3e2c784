"""Stage one: run teacher(s) over stored views of a dataset and write their records into a store.

loader (workers, pinned memory) -> device -> eval teacher(s) under autocast (fp32 logits) ->
correction -> sparse record on the device -> bounded queue -> writer thread (whole shards).

The unit of work is a *block*: one view of one shard of rows. A block is written in one go and
its ``done`` flag is set last, so a killed run leaves only unfinished blocks, which a rerun redoes.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from kdcache._version import __version__
from kdcache.corrections import apply_correction, get_correction
from kdcache.data import ImageDataset, as_image_dataset, load_dataset
from kdcache.fidelity import (
    AUTO_SAMPLE_ROWS,
    DEFAULT_MAX_KL,
    auto_k,
    check_max_kl,
    error_metric,
    fast_record_error,
    raw_record_bytes,
    sparse_kl,
    undeclared_probe_temperatures,
)
from kdcache.models import build_ready_teacher, ready_teacher, state_dict_sha256, teacher_name
from kdcache.progress import rows_progress
from kdcache.records import AUTO, get_layout, layout_for_k
from kdcache.replay import BlockBatches, ViewedRows, default_workers, replay_loader, resolve_device
from kdcache.sampled import SampledLogits, default_proposal_temperature, parse_samples
from kdcache.sparse import SparseLogits, check_temperatures
from kdcache.stores.errors import CorruptionError, SpecError, StoreError
from kdcache.stores.lock import DriverLock
from kdcache.stores.logit_store import BadBlock, LogitStore
from kdcache.views import MAX_VIEWS, ViewGroups, ViewPolicy, policy_from_spec, view_groups

DEFAULT_TEMPERATURES = (1.0, 4.0)
MAX_IMAGE_SIZE = 4096  # --image-size: pixels per side a teacher is run at
log = logging.getLogger("kdcache")


STORE, TEACHER = "store", "teacher"  # where an identity field is recorded: the store's attrs, each teacher's


def identity(kind: str, default: Any = MISSING, *, default_factory: Any = MISSING,
             value: Callable[[Any], Any] | None = None, when: Callable[[Any], bool] | None = None) -> Any:
    """A config field a resumed run must keep (``kind``: STORE or TEACHER). ``value(cfg)`` is what is
    recorded (default: the field itself), ``when(cfg)`` limits it to the configs it matters to."""
    return field(default=default, default_factory=default_factory,
                 metadata={"identity": kind, "value": value, "when": when})


@dataclass
class TeachConfig:
    """Everything that defines a store. Two runs with equal configs write identical stores.

    Fields made with ``identity(...)`` are recorded in the store and compared on resume, in field order
    (the order of the attrs existing stores hold: keep it)."""

    dataset: str = identity(STORE)
    teachers: list[str]
    out: str
    split: str = identity(STORE, "train")
    k: int | str = identity(TEACHER, 10)  # N, "all", "auto" (smallest k within max_kl at every T) or "sampled:S"
    encoding: str = identity(TEACHER, "float16")
    temperatures: tuple[float, ...] = identity(TEACHER, DEFAULT_TEMPERATURES, value=lambda c: list(c.temperatures))
    correction: str = identity(TEACHER, "none")
    correction_args: dict[str, Any] = identity(TEACHER, default_factory=dict,
                                               value=lambda c: c.resolved_correction_args())
    # --k auto: budget on mean KL(dense || record) at each declared T
    max_kl: float = identity(TEACHER, DEFAULT_MAX_KL, when=lambda c: c.k == "auto")
    # --k sampled:S: declared T of the proposal (default: largest)
    proposal_temperature: float | None = identity(TEACHER, None, when=lambda c: is_sampled(c.k))
    views: int | str = identity(STORE, 1)
    view_policy: str = identity(STORE, "identity")  # a policy string: 'crop-flip | randaugment | cutout:0.5'
    # named linked views (--view-group weak=SPEC): views of each group per row, served together in stage two
    view_groups: tuple[tuple[str, str], ...] = identity(STORE, (), value=lambda c: [list(g) for g in c.view_groups],
                                                        when=lambda c: bool(c.view_groups))
    image_size: int | None = identity(STORE, None)
    seed: int = identity(STORE, 0)
    shard_rows: int = identity(STORE, 65536)
    chunk_rows: int = identity(STORE, 8192)
    batch_size: int = 256
    workers: int | None = None
    device: str = "auto"
    amp: bool = True
    overwrite: bool = False
    break_lock: bool = False  # remove another driver's lock on the store first (stores/lock.py)

    def store_identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that created the store."""
        return identity_dict(self, STORE)

    def teacher_identity(self, spec: str) -> dict[str, Any]:
        """The fields a resumed run must share, per teacher."""
        return identity_dict(self, TEACHER, spec=spec)

    def resolved_correction_args(self) -> dict[str, Any]:
        """The correction's arguments with defaults filled; SpecError on an unknown name, argument or value."""
        return get_correction(self.correction).args(self.correction_args)


def identity_dict(cfg: TeachConfig, kind: str, **head: Any) -> dict[str, Any]:
    """``head``, then every ``identity(kind)`` field of ``cfg`` that applies, in field order."""
    out = dict(head)
    for f in fields(cfg):
        meta = f.metadata
        if meta.get("identity") != kind or (meta["when"] is not None and not meta["when"](cfg)):
            continue
        out[f.name] = meta["value"](cfg) if meta["value"] is not None else getattr(cfg, f.name)
    return out


@dataclass
class BlockResult:
    """One finished block of one teacher, on its way to the writer thread."""

    teacher: str
    view: int
    shard: int
    record: dict[str, np.ndarray]
    stats: np.ndarray


def validate(cfg: TeachConfig, module_names: Sequence[str] = ()) -> None:
    """Reject bad flags before anything touches the disk (``module_names``: the user's module teachers)."""
    if not cfg.teachers and not module_names:
        raise SpecError("no teacher given; pass --teacher SPEC (e.g. torchvision:resnet18:none)")
    if isinstance(cfg.views, int) and cfg.views < 1:
        raise SpecError(f"--views must be >= 1 or 'all'; got {cfg.views}")
    if isinstance(cfg.views, int) and cfg.views > MAX_VIEWS:  # its (V, N) view parameters alone would not fit
        slots = cfg.k if isinstance(cfg.k, int) else 1
        per_row = cfg.views * raw_record_bytes(slots + 1, slots, cfg.encoding, len(cfg.temperatures))
        raise SpecError(f"--views {cfg.views} would not fit: each row's records take at least {per_row / 1e9:.3g} GB; "
                        f"cache at most {MAX_VIEWS} views (crop-flip has 162 in all)")
    ints = (("--image-size", cfg.image_size, 1), ("--workers", cfg.workers, 0), ("--seed", cfg.seed, 0))
    for flag, value, least in ints:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise SpecError(f"{flag} must be an integer >= {least} (or left out for the default); got {value!r}")
    if cfg.image_size is not None and cfg.image_size > MAX_IMAGE_SIZE:  # one float image of 100000² is 120 GB
        gb = 12 * cfg.image_size**2 / 1e9
        raise SpecError(f"--image-size {cfg.image_size} is larger than any teacher's input; use at most "
                        f"{MAX_IMAGE_SIZE} (one 3 x {cfg.image_size}² float32 image is {gb:.3g} GB)")
    if isinstance(cfg.k, int) and cfg.k < 1:
        raise SpecError(f"--k must be >= 1, 'all' or 'auto'; got {cfg.k}")
    if isinstance(cfg.k, str) and cfg.k not in ("all", "auto") and not is_sampled(cfg.k):
        raise SpecError(f"--k must be an integer, 'all', 'auto' or 'sampled:S'; got '{cfg.k}'")
    if is_sampled(cfg.k):
        parse_samples(cfg.k)
    cfg.max_kl = check_max_kl(cfg.max_kl)
    if any(t <= 0 for t in cfg.temperatures):
        raise SpecError(f"--temperatures must all be > 0; got {list(cfg.temperatures)}")
    cfg.temperatures = check_temperatures(cfg.temperatures)  # sorted, 1.0 included: the tail's columns
    check_proposal_temperature(cfg)
    if cfg.encoding not in ("float16", "uint8"):
        raise SpecError(f"--encoding must be float16 or uint8; got '{cfg.encoding}'")
    if cfg.batch_size < 1:
        raise SpecError(f"--batch-size must be >= 1; got {cfg.batch_size}")
    cfg.resolved_correction_args()
    policy = view_policy(cfg)
    if policy.mixes and cfg.correction != "none":
        raise SpecError(f"--correction {cfg.correction} moves the label's logit, and a mixed view has two labels; "
                        "cache mixed views without a correction (or drop the mixing ops)")
    names = [teacher_name(s) for s in cfg.teachers] + list(module_names)
    if len(set(names)) != len(names):
        raise SpecError(f"two --teacher specs map to the same store name ({names}); give distinct teachers")


def view_policy(cfg: TeachConfig) -> ViewPolicy | ViewGroups:
    """The policy of ``--view-policy`` or of the ``--view-group`` pairs (one or the other)."""
    if not cfg.view_groups:
        return policy_from_spec(cfg.view_policy)
    if cfg.view_policy != "identity":
        raise SpecError("pass --view-policy (one view per step) or --view-group (linked views), not both")
    return view_groups([tuple(g) for g in cfg.view_groups])


def is_sampled(k: int | str) -> bool:
    return isinstance(k, str) and k.startswith("sampled:")


def check_proposal_temperature(cfg: TeachConfig) -> None:
    """--k sampled:S draws from softmax(z / T_q), T_q declared (default: the largest declared T)."""
    if not is_sampled(cfg.k):
        if cfg.proposal_temperature is not None:
            raise SpecError("--proposal-temperature applies only to --k sampled:S")
        return
    if cfg.proposal_temperature is None:
        cfg.proposal_temperature = default_proposal_temperature(cfg.temperatures)
    t_q = float(cfg.proposal_temperature)
    if not any(abs(t_q - t) <= 1e-9 * t for t in cfg.temperatures):
        raise SpecError(f"--proposal-temperature {t_q:g} must be one of the declared --temperatures "
                        f"({', '.join(f'{t:g}' for t in cfg.temperatures)})")
    cfg.proposal_temperature = t_q


def input_size(cfg: TeachConfig, dataset: ImageDataset) -> tuple[int, int]:
    if cfg.image_size:
        return (cfg.image_size, cfg.image_size)
    if dataset.image_size is None:
        return (224, 224)
    return tuple(dataset.image_size)


def sparse_record(logits: torch.Tensor, labels: torch.Tensor, k: int, temps) -> SparseLogits:
    return SparseLogits.from_dense(logits, labels, k, temperatures=temps)


def make_record(t: LoadedTeacher, logits: torch.Tensor, labels: torch.Tensor, views, rows,
                cfg: TeachConfig) -> SparseLogits | SampledLogits:
    """The teacher's record of a batch, by its layout (``kdcache.records``); sampled records draw per
    (seed, view, row), so they do not depend on the batching."""
    return get_layout(t.layout).from_logits(logits, labels, k=t.k, temperatures=cfg.temperatures,
                                            sampling=t.sampling, views=views, rows=rows)


def record_to_numpy(rec: SparseLogits | SampledLogits, layout: str) -> dict[str, np.ndarray]:
    """The arrays a block of this layout stores (dense records keep class order and need no indices)."""
    return get_layout(layout).to_arrays(rec)


# "bf16_rows": rows whose forward ran under bf16 autocast (GPU + --amp), so verify knows the precision to
# replay at, even when dask workers on GPUs labelled a store whose driver has none.
STAT_NAMES = ("rows", "teacher_correct", "changed_by_correction", "bf16_rows")
# The record error costs a pass over (rows, classes) per temperature, the forward does not grow with the classes:
# up to FULL_PASS_CLASSES every row is measured (stage one's overhead was 0.99x a bare forward at 10 classes with a
# float64 full pass); above, the declared-T error is measured on every ERROR_STRIDE-th row of a block from its
# first and the undeclared probe T on every PROBE_STRIDE-th. Store rows are a seeded permutation of the dataset,
# so these are random samples of it, and a pure function of the block: resumed and distributed runs measure the
# same rows. The summary states the sample sizes and standard errors.
FULL_PASS_CLASSES = 128
ERROR_STRIDE = 32
PROBE_STRIDE = 256
ERROR_FLUSH_ROWS = 512  # sampled rows kept (dense logits on the device) before their error is computed


def stats_names(layout: str, temps) -> tuple[str, ...]:
    """The block_stats columns of a teacher: STAT_NAMES, the error summed over the sampled rows per declared T,
    the sample size and the sums of squares (so the summary has a standard error), then (top-k only) the probe
    rows and the KL and its squares at each undeclared probe T (``undeclared_probe_temperatures``)."""
    metric = error_metric(layout)
    probes = undeclared_probe_temperatures(layout, temps)
    names = (*STAT_NAMES, *(f"{metric}_T{t:g}" for t in temps), "error_rows", *(f"{metric}_sq_T{t:g}" for t in temps))
    if probes:
        names += ("probe_rows", *(f"kl_probe_T{t:g}" for t in probes), *(f"kl_probe_sq_T{t:g}" for t in probes))
    return names


def top1_hits(raw: torch.Tensor, corrected: torch.Tensor, labels: torch.Tensor,
              rec: SparseLogits | SampledLogits | None = None) -> torch.Tensor:
    """Rows whose raw argmax is the label (int64 scalar): the ``teacher_correct`` block stat (``RecordPath`` sums
    STAT_NAMES per block on the device; the record error is ``ErrorSample``'s). Without a correction, a top-k or
    dense ``rec`` of the batch holds each row's largest logit: a hit is a label logit equal to it (a tie at the
    top counts), with no pass over (B, C)."""
    if corrected is raw and isinstance(rec, SparseLogits):
        return (rec.label_logit >= rec.values[:, 0]).sum()
    return (raw.argmax(1) == labels).sum()


def error_sample_strides(num_classes: int, full: bool = False) -> tuple[int, int]:
    """(declared, probe): the record error is measured on every s-th row of a block from its first (1: all)."""
    if num_classes <= FULL_PASS_CLASSES:
        return 1, 1
    return (1 if full else ERROR_STRIDE), PROBE_STRIDE


class ErrorSample:
    """The record error of a block on its sampled rows (``error_sample_strides``), in float32 on the device: at
    each declared T ``kdcache.fidelity.fast_record_error``, at each undeclared probe T (top-k; a subset of those
    rows) the closed-form KL ``sparse_kl``. Sampled rows are gathered across batches and measured
    ``ERROR_FLUSH_ROWS`` at a time, so a batch holding a few costs one gather, not a dozen kernel launches.
    ``totals``: sample sizes, sums and sums of squares, in ``stats_names`` order after STAT_NAMES."""

    def __init__(self, temps, probes: tuple[float, ...], num_classes: int, full: bool = False):
        self.temps, self.probes = tuple(temps), tuple(probes)
        self.stride, self.probe_stride = error_sample_strides(num_classes, full)
        if self.probe_stride % self.stride:
            raise ValueError("the probe rows must be a subset of the sampled rows (PROBE_STRIDE % ERROR_STRIDE == 0)")
        self.logits: list[torch.Tensor] = []
        self.records: list[SparseLogits | SampledLogits] = []
        self.offsets: list[np.ndarray] = []
        self.pending = 0
        self.sums: torch.Tensor | None = None

    def add(self, corrected: torch.Tensor, rec: SparseLogits | SampledLogits, first: int) -> None:
        """A batch of consecutive rows of the block, the first at position ``first`` in the block."""
        lo = -(-first // self.stride) * self.stride  # the first sampled position at or after ``first``
        if lo >= first + len(corrected):
            return
        positions = np.arange(lo, first + len(corrected), self.stride)
        rows = slice(lo - first, None, self.stride)  # a strided view: no index kernels, one copy of the logits
        self.logits.append(corrected[rows].clone())
        self.records.append(rec.index(rows))
        self.offsets.append(positions)
        self.pending += len(positions)
        if self.pending >= ERROR_FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Measure the rows gathered so far."""
        if not self.pending:
            return
        z = torch.cat(self.logits)
        rec = type(self.records[0]).concat(self.records)
        offsets = np.concatenate(self.offsets)
        self.logits, self.records, self.offsets, self.pending = [], [], [], 0
        out = _sums(z, rec, self.temps, fast_record_error)
        if self.probes:
            sel = torch.from_numpy(np.flatnonzero(offsets % self.probe_stride == 0)).to(z.device, non_blocking=True)
            out = torch.cat([out, _sums(z[sel], rec.index(sel), self.probes, sparse_kl)])
        self.sums = out if self.sums is None else self.sums + out

    def totals(self, device: torch.device) -> torch.Tensor:
        """The block's error columns (zeros where no row was sampled); resets for the next block."""
        self.flush()
        t, p = len(self.temps), len(self.probes)
        sums = self.sums if self.sums is not None else torch.zeros(1 + 2 * t + (1 + 2 * p if p else 0),
                                                                   dtype=torch.float64, device=device)
        self.sums = None
        # _sums gives (n, sums, squares) per set; the columns are (sums, error_rows, squares, probe set as given)
        return torch.cat([sums[1 : 1 + t], sums[:1], sums[1 + t :]])


def _sums(z: torch.Tensor, rec: SparseLogits | SampledLogits, temps: tuple[float, ...], error: Callable
          ) -> torch.Tensor:
    """(1 + 2 T,) float64: rows, then per T the sum and the sum of squares of ``error(z, rec, T)`` (float32)."""
    errs = [error(z, rec, t) for t in temps]
    n = torch.tensor(float(len(z)), dtype=torch.float64, device=z.device)
    return torch.stack([n, *(e.sum(dtype=torch.float64) for e in errs), *(e.double().square().sum() for e in errs)])


def store_columns(store: LogitStore, name: str, layout: str, temps) -> list[int]:
    """Where each of the store's block_stats columns sits in ``stats_names`` (a store made before a column was
    added keeps its own columns: the sums of the ones it has)."""
    ours = stats_names(layout, temps)
    theirs = store.teacher_attrs(name).get("block_stats_names") or []
    missing = [n for n in theirs if n not in ours]
    if missing:
        raise StoreError(f"teacher {name!r} of {store.url} has block stats {missing} this kdcache does not compute; "
                         "upgrade kdcache to resume it")
    return [ours.index(n) for n in theirs]


@dataclass
class Throughput:
    """Where stage one's wall time went, so a user sees which of the three to scale: waiting for the loader
    (more --workers, faster storage), in the teacher (forward + record + stats: a faster device, a larger
    batch) or waiting for the writer (its queue full: faster storage for --out). Measured on the host, around
    the loop of ``label_blocks``; on a GPU the teacher's share includes waiting for its kernels."""

    rows: int = 0
    wall_s: float = 0.0
    loader_s: float = 0.0
    teacher_s: float = 0.0
    writer_s: float = 0.0
    device: str | None = None  # where the teacher ran
    workers: int | None = None  # loader worker processes
    batch_size: int | None = None

    def add(self, rows: int, wall_s: float, loader: float, teacher: float, writer: float) -> None:
        self.rows += rows
        self.wall_s += wall_s
        self.loader_s += loader
        self.teacher_s += teacher
        self.writer_s += writer

    def shares(self) -> dict[str, float]:
        wall = self.wall_s or 1.0
        return {"loader": self.loader_s / wall, "teacher": self.teacher_s / wall, "writer": self.writer_s / wall}

    def as_dict(self) -> dict[str, Any]:
        shares = self.shares()
        return {"rows": self.rows, "wall_s": self.wall_s, "rows_per_s": self.rows / self.wall_s if self.wall_s else 0.0,
                "seconds": {"loader": self.loader_s, "teacher": self.teacher_s, "writer": self.writer_s},
                "shares": shares, "bottleneck": max(shares, key=shares.get), "device": self.device,
                "workers": self.workers, "batch_size": self.batch_size}

    def line(self) -> str:
        d, s = self.as_dict(), self.shares()
        return (f"{d['rows_per_s']:,.0f} rows/s ({self.rows} rows in {self.wall_s:.1f} s); time waiting for the "
                f"loader {100 * s['loader']:.0f}%, in the teacher (forward + record + stats) "
                f"{100 * s['teacher']:.0f}%, for the writer (queue full) {100 * s['writer']:.0f}%: "
                f"the {d['bottleneck']} limits this run")

    def write(self, path: str | os.PathLike, **context: Any) -> None:
        """The profile as JSON (``--profile FILE.json``), with ``context`` (device, batch size, ...)."""
        with open(path, "w") as f:
            json.dump({**self.as_dict(), **context}, f, indent=2)
            f.write("\n")


class Writer:
    """Writer thread fed by a bounded queue: the device never waits for compression or disk."""

    def __init__(self, store: LogitStore, depth: int = 4):
        self.store = store
        self.queue: queue.Queue[BlockResult | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_block(item.teacher, item.view, item.shard, item.record,
                                           stats=item.stats)
                except BaseException as err:  # surfaced on the main thread by put()/close()
                    self.error = err

    def put(self, item: BlockResult) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


@dataclass
class LoadedTeacher:
    name: str
    spec: str
    model: torch.nn.Module
    k: int
    provenance: dict[str, Any]
    layout: str = "topk"  # a kdcache.records layout name, or AUTO until resolve_record measures k
    fidelity: dict[str, Any] | None = None  # --k auto: what was measured (teacher attrs "fidelity")
    sampling: dict[str, Any] | None = None  # --k sampled:S: samples, proposal_temperature, seed

    @property
    def dense(self) -> bool:
        """Every class is kept, in class order (derived from the layout, so the two never disagree)."""
        return self.layout != AUTO and get_layout(self.layout).schema.every_class


def record_layout(k: int | str, num_classes: int) -> tuple[int, str]:
    """(k, layout name) for --k (``kdcache.records.layout_for_k``); 'auto' gets k = 0 until ``resolve_record``
    measures it."""
    return layout_for_k(k, num_classes)


def resolve_k(k: int | str, num_classes: int) -> int:
    """The k stored for --k (slots per row); SpecError for auto, whose k is measured (``resolve_record``)."""
    stored, layout = record_layout(k, num_classes)
    if layout == AUTO:
        raise SpecError("--k auto has no fixed k until it is measured; use record_layout and resolve_record")
    return stored


def load_teacher(spec: str | torch.nn.Module, cfg: TeachConfig, num_classes: int, size, device,
                 name: str | None = None) -> LoadedTeacher:
    """A teacher from a spec, or the user's own module (stored as ``name``), on ``device`` in eval mode."""
    if isinstance(spec, torch.nn.Module):
        model, provenance = module_teacher(spec, cfg.seed)
        spec = provenance["spec"]
        model = ready_teacher(model, spec, num_classes, size, device)
    else:
        model, provenance = build_ready_teacher(spec, num_classes, cfg.seed, size, device)
    k, layout = record_layout(cfg.k, num_classes)
    sampling = None
    if layout == "sampled":
        sampling = {"samples": parse_samples(cfg.k), "proposal_temperature": cfg.proposal_temperature,
                    "seed": cfg.seed, "draws": "splitmix64(seed, view, row, draw) -> inverse CDF of q"}
    return LoadedTeacher(name or teacher_name(spec), spec, model, k, provenance, layout, sampling=sampling)


def module_teacher(module: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The user's module as a teacher: spec ``python:<ClassName>``, known by its weights' sha256 (a resumed
    run needs the same weights, see ``check_weights``)."""
    return module.eval(), {"spec": f"python:{type(module).__name__}", "weights": "python object",
                           "weights_sha256": state_dict_sha256(module.state_dict()), "seed": seed}


def check_weights(store: LogitStore, t: LoadedTeacher) -> None:
    """A resumed teacher must have the weights its finished blocks were made with (same spec, other
    weights: a retrained checkpoint or module)."""
    if t.name not in store.teachers:
        return
    old, new = store.teacher_attrs(t.name).get("weights_sha256"), t.provenance.get("weights_sha256")
    if old and new and old != new:
        raise StoreError(f"teacher '{t.name}' in {store.url} was cached with other weights (sha256 {old[:12]}... "
                         f"-> {new[:12]}...); pass overwrite (--overwrite) or a different out")


def bind_teacher(store: LogitStore, t: LoadedTeacher) -> None:
    """Take k / layout / sampling from the store's teacher (resumed runs, workers, verify)."""
    a = store.teacher_attrs(t.name)
    t.k, t.layout = a["k"], a["layout"]
    t.fidelity, t.sampling = a.get("fidelity"), a.get("sampling")


def probe_logits(job: Job, store: LogitStore, t: LoadedTeacher, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected teacher logits and labels of the first ``rows`` rows of view 0 (stored in a seeded
    permutation of the dataset, so a random sample of it)."""
    cfg = job.cfg
    blocks = [(0, 0, min(rows, store.num_rows))]
    viewed = ViewedRows(job.dataset, job.policy, store.views(), store.manifest_column("dataset_index"), job.size)
    workers = default_workers(job.dataset) if cfg.workers is None else cfg.workers
    autocast = torch.autocast(job.device.type, dtype=torch.bfloat16, enabled=cfg.amp and job.device.type == "cuda")
    out, labels = [], []
    with torch.inference_mode():
        for x, y, *_ in replay_loader(viewed, BlockBatches(blocks, cfg.batch_size), workers, job.device):
            x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
            if job.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                raw = t.model(x)
            out.append(apply_correction(cfg.correction, raw.float(), y, **cfg.resolved_correction_args()))
            labels.append(y)
    return torch.cat(out), torch.cat(labels)


def resolve_record(job: Job, store: LogitStore, t: LoadedTeacher) -> None:
    """``--k auto``: the smallest k within --max-kl at every declared T, measured on the first
    AUTO_SAMPLE_ROWS rows of view 0 as the store will hold them; a resumed run reuses it."""
    if t.layout != AUTO:
        return
    if t.name in store.teachers:
        bind_teacher(store, t)
        return
    cfg = job.cfg
    logits, labels = probe_logits(job, store, t, AUTO_SAMPLE_ROWS)
    choice = auto_k(logits, labels, cfg.temperatures, cfg.max_kl, cfg.encoding)
    t.k, t.layout = record_layout(choice.k, choice.num_classes)  # topk, or dense when k == C
    t.fidelity = choice.as_attrs()


def load_teacher_for_store(store: LogitStore, spec: str, num_classes: int, device) -> LoadedTeacher:
    """Rebuild a teacher exactly as the store's run built it (same seed for random weights)."""
    identity = store.attrs["identity"]
    cfg = TeachConfig(dataset=identity["dataset"], teachers=[spec], out=store.url, seed=identity["seed"],
                      k="all")
    name = teacher_name(spec)
    if name not in store.teachers:
        raise StoreError(f"teacher '{name}' is not in {store.url} (it has: {', '.join(store.teachers) or 'none'}); "
                         "pass one of its --teacher specs")
    t = load_teacher(spec, cfg, num_classes, tuple(store.attrs["input_size"]), device)
    bind_teacher(store, t)
    return t


def store_attrs(cfg: TeachConfig, dataset: ImageDataset, policy) -> dict[str, Any]:
    return {
        "identity": cfg.store_identity(),
        "dataset": {"spec": dataset.spec, "split": dataset.split, "fingerprint": dataset.fingerprint(),
                    "num_classes": dataset.num_classes},
        "num_classes": dataset.num_classes,
        "view_policy": policy.record(),
        "input_size": list(input_size(cfg, dataset)),
        "row_seed": cfg.seed,
        "created_with": {"kdcache": __version__, "torch": torch.__version__},
    }


def resumable(cfg: TeachConfig) -> bool:
    """True when ``cfg.out`` holds a finished store creation to resume (a creation that was interrupted is
    started again by ``LogitStore.create``, without --overwrite, when the command is the same)."""
    return not cfg.overwrite and LogitStore.exists(cfg.out) and not LogitStore.in_creation(cfg.out)


def open_or_create(cfg: TeachConfig, dataset: ImageDataset, policy) -> LogitStore:
    """Resume a store made by the same command, or create it; anything else needs --overwrite."""
    if resumable(cfg):
        store = LogitStore.open(cfg.out, mode="r+")
        old = store.attrs.get("identity")
        if old != cfg.store_identity():
            raise StoreError(
                f"{cfg.out} holds a store made with other settings ({_diff(old, cfg.store_identity())}); "
                "pass --overwrite to replace it or choose another --out"
            )
        if store.attrs["dataset"]["fingerprint"] != dataset.fingerprint():
            raise StoreError(f"{cfg.out} was cached from different data (fingerprint mismatch); pass --overwrite")
        return store
    n = len(dataset)
    perm = np.random.default_rng(cfg.seed).permutation(n)
    # images of many sizes (imagefolder): aspect-dependent views (rrc-flip) need each image's (H, W)
    sizes = dataset.image_sizes()[perm] if dataset.image_size is None and policy.aspect_dependent else None
    views = policy.sample(cfg.views, n, dataset.image_size, seed=cfg.seed, image_sizes=sizes)
    labels = np.asarray(dataset.labels)[perm]
    manifest = {
        "row": np.arange(n, dtype=np.int64),
        "dataset_index": perm.astype(np.int64),
        "sample_id": [str(dataset.sample_ids[i]) for i in perm],
        "label": labels.astype(np.int32),
    }
    return LogitStore.create(
        cfg.out, labels=labels, views=views, attrs=store_attrs(cfg, dataset, policy), manifest=manifest,
        shard_rows=cfg.shard_rows, chunk_rows=cfg.chunk_rows, overwrite=cfg.overwrite,
    )


def _diff(old: dict | None, new: dict) -> str:
    old = old or {}
    keys = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys) or "unknown"


def ensure_teacher(store: LogitStore, cfg: TeachConfig, t: LoadedTeacher, num_classes: int) -> None:
    """Create the teacher's arrays, or check a resumed teacher was made with the same settings."""
    identity = cfg.teacher_identity(t.spec)
    if t.name in store.teachers:
        old = store.teacher_attrs(t.name).get("identity")
        if old != identity:
            raise StoreError(
                f"teacher '{t.name}' in {cfg.out} was cached with other settings ({_diff(old, identity)}); "
                "pass --overwrite or a different --out"
            )
        return
    layout = t.layout
    extra = {key: value for key, value in (("fidelity", t.fidelity), ("sampling", t.sampling)) if value}
    store.add_teacher(
        t.name, num_classes=num_classes, k=t.k, encoding=cfg.encoding,
        layout=layout, temperatures=tuple(cfg.temperatures),
        stats_names=stats_names(layout, cfg.temperatures),
        attrs={"identity": identity, "spec": t.spec, **t.provenance,
               "correction": {"name": cfg.correction, "args": cfg.resolved_correction_args()},
               # the block stats (probe rows, float sums) depend on it: `kdcache repair` relabels with it
               "batch_size": cfg.batch_size, **extra},
    )


def clear_damaged_blocks(store: LogitStore, names: list[str]) -> dict[str, list[BadBlock]]:
    """Check the store (``LogitStore.integrity``: reads every done block) and clear the done flags of the
    teachers' bad blocks, so this run redoes them; returns them. Damage that blocks cannot mend (labels, views,
    manifest, a teacher's arrays) is refused in one line."""
    found = store.integrity(names)
    if not found.repairable:
        problems = found.problems()
        raise CorruptionError(f"{store.url} is damaged beyond its blocks ({problems[0]}; {len(problems)} problem(s) "
                              "in all): labels, views, the manifest and a teacher's arrays are written once and "
                              "cannot be recomputed block by block; re-teach with --overwrite")
    cleared = {name: bad for name, bad in found.blocks.items() if bad}
    for name, bad in cleared.items():
        store.reset_blocks(name, bad)
        log.warning("kdcache: %d damaged block(s) of teacher %s in %s (first: %s); recomputing them",
                    len(bad), name, store.url, bad[0])
    return cleared


def pending_blocks(store: LogitStore, names: list[str]) -> list[tuple[int, int]]:
    """(view, shard) pairs that some teacher still lacks."""
    todo = np.zeros((store.num_views, store.num_shards), dtype=bool)
    for name in names:
        todo |= ~store.done(name)
    return [tuple(map(int, vs)) for vs in np.argwhere(todo)]


@dataclass
class Job:
    """What stage one needs in memory to label blocks: data, replayable views, loaded teachers."""

    cfg: TeachConfig
    dataset: ImageDataset
    policy: Any
    device: torch.device
    size: tuple[int, int]
    teachers: list[LoadedTeacher]
    repaired: dict[str, list[BadBlock]] = field(default_factory=dict)  # bad blocks open_store_for cleared


def prepare(cfg: TeachConfig, dataset: ImageDataset | None = None,
            teachers: Mapping[str, torch.nn.Module] | None = None) -> Job:
    """Validate, load the dataset and teachers (checking their heads) before touching any store.

    ``dataset`` (an ImageDataset, e.g. ``as_image_dataset(obj)``) replaces loading ``cfg.dataset`` and sets
    ``cfg.dataset``/``cfg.split`` to its spec and split; ``teachers`` (name -> module) are added to
    ``cfg.teachers``' specs. The objects stay out of the config, which stays plain data."""
    modules = dict(teachers or {})
    validate(cfg, tuple(modules))
    if dataset is None:
        dataset = load_dataset(cfg.dataset, cfg.split)
    else:
        cfg.dataset, cfg.split = dataset.spec, dataset.split
    policy = view_policy(cfg)
    device = resolve_device(cfg.device)
    size = input_size(cfg, dataset)
    loaded = [load_teacher(s, cfg, dataset.num_classes, size, device) for s in cfg.teachers]
    loaded += [load_teacher(m, cfg, dataset.num_classes, size, device, name=n) for n, m in modules.items()]
    return Job(cfg, dataset, policy, device, size, loaded)


def open_store_for(job: Job) -> LogitStore:
    """Create or resume the store and the teachers' arrays (the driver's job, once)."""
    resumed = resumable(job.cfg)
    store = open_or_create(job.cfg, job.dataset, job.policy)
    for t in job.teachers:
        check_weights(store, t)
        resolve_record(job, store, t)
        ensure_teacher(store, job.cfg, t, job.dataset.num_classes)
    if resumed:  # a damaged block must not count as done: redo it (what `kdcache repair` runs)
        job.repaired = clear_damaged_blocks(store, [t.name for t in job.teachers])
    return store


def run_teach(cfg: TeachConfig, progress: Callable[[int, int], None] | None = None, *,
              dataset: ImageDataset | None = None, teachers: Mapping[str, torch.nn.Module] | None = None,
              throughput: Throughput | None = None) -> LogitStore:
    """Stage one in this process; ``progress(rows_done, rows_total)`` is called after each batch
    (``dataset``/``teachers``: the user's objects, see ``prepare``; ``throughput``: see ``label_blocks``).

    The store's driver lock is held from creating/resuming the store to the final attrs, so a
    second driver on the same store is refused (``stores/lock.py``)."""
    job = prepare(cfg, dataset, teachers)
    with DriverLock(cfg.out, break_lock=cfg.break_lock) as lock, discard_if_nothing_done(lock):
        store = open_store_for(job)
        label_blocks(job, store, pending_blocks(store, [t.name for t in job.teachers]), progress, throughput)
        finish(store, job)
    return store


@contextlib.contextmanager
def discard_if_nothing_done(lock: DriverLock) -> Iterator[None]:
    """A first run that fails before any block is done (a bad value found late, --k auto over budget, an
    unreachable scheduler) removes the store it made: no half-made store is left. Once a block is
    done the store is kept, so the rerun resumes."""
    try:
        yield
    except BaseException:
        if lock.created_root and not any_block_done(lock.url):
            lock.discard_new_store()
        raise


def any_block_done(url: str) -> bool:
    try:
        store = LogitStore.open(url)
        return any(bool(store.done(name).any()) for name in store.teachers)
    except Exception:  # a store that does not even open has nothing done
        return False


def finish(store: LogitStore, job: Job) -> None:
    """Driver-side attrs once all blocks are in: accuracy, correction rate, measured record error."""
    for t in job.teachers:
        store.set_teacher_attrs(t.name, summary=teacher_summary(store, t.name, job.cfg.temperatures))


class SomeViews:
    """The parameters of some views, indexed like the full (V, N) array (``arr[view, row]``, with
    scalars or arrays). A dask task labels one block: it needs one view's parameters, not V x N."""

    def __init__(self, per_view: dict[int, np.ndarray], num_views: int):
        views = sorted(per_view)
        self.slot = np.full(num_views, -1, dtype=np.int64)
        self.slot[views] = np.arange(len(views))
        self.data = np.stack([per_view[v] for v in views])

    def __getitem__(self, index):
        view, row = index
        slot = self.slot[view]
        if np.any(slot < 0):
            raise IndexError(f"view {view} was not loaded (loaded: {np.flatnonzero(self.slot >= 0).tolist()})")
        return self.data[slot, row]


def view_params_for(store: LogitStore, views) -> dict[str, Any]:
    """View parameters for ``ViewedRows`` covering ``views``: one read of everything when all views
    are wanted, else only those views' rows."""
    views = sorted({int(v) for v in views})
    if not views or len(views) == store.num_views:
        return store.views()
    per_view = {v: store.views(v) for v in views}
    return {name: SomeViews({v: per_view[v][name] for v in views}, store.num_views) for name in per_view[views[0]]}


class RecordPath:
    """What stage one does with one teacher's logits (the record path): per batch the record, the batch stats
    and the error sample; per block the arrays and stats the writer stores. ``label_blocks`` runs one per
    teacher; benchmarks/record_path.py times it without a forward."""

    def __init__(self, store: LogitStore, t: LoadedTeacher, cfg: TeachConfig, bf16: bool = False):
        self.t, self.cfg, self.bf16 = t, cfg, bf16
        attrs = store.teacher_attrs(t.name)
        self.columns = store_columns(store, t.name, attrs["layout"], cfg.temperatures)
        # a store made before error_rows existed sums the declared-T error over every row: keep doing so
        full = "error_rows" not in attrs.get("block_stats_names", [])
        self.errors = ErrorSample(cfg.temperatures, undeclared_probe_temperatures(attrs["layout"], cfg.temperatures),
                                  attrs["num_classes"], full)
        self.records: list[SparseLogits | SampledLogits] = []
        self.hits: list[torch.Tensor] = []
        self.changed: list[torch.Tensor] = []
        self.rows = 0

    def add(self, raw: torch.Tensor, corrected: torch.Tensor, labels: torch.Tensor, views: torch.Tensor,
            rows: torch.Tensor, block_start: int) -> None:
        """One batch of the block that starts at store row ``block_start`` (``rows``: store rows, on the host,
        consecutive as ``BlockBatches`` makes them)."""
        rec = make_record(self.t, corrected, labels, views, rows, self.cfg)
        self.errors.add(corrected, rec, int(rows[0]) - block_start)
        self.records.append(rec)
        self.rows += len(labels)
        self.hits.append(top1_hits(raw, corrected, labels, rec))
        if corrected is not raw:
            self.changed.append((corrected != raw).any(1).sum())

    def result(self, view: int, shard: int) -> BlockResult | None:
        """The finished block for the writer (None if no batch was added); resets for the next block."""
        if not self.records:
            return None
        recs, device = self.records, self.records[0].labels.device
        hits = torch.stack(self.hits).sum().double()
        changed = torch.stack(self.changed).sum().double() if self.changed else torch.zeros_like(hits)
        rows = torch.tensor([float(self.rows), float(self.rows if self.bf16 else 0)], dtype=torch.float64,
                            device=device)
        sums = torch.cat([torch.stack([rows[0], hits, changed, rows[1]]), self.errors.totals(device)])
        self.records, self.hits, self.changed, self.rows = [], [], [], 0
        return BlockResult(self.t.name, view, shard, record_to_numpy(type(recs[0]).concat(recs), self.t.layout),
                           sums.cpu().numpy()[self.columns])


def label_blocks(job: Job, store: LogitStore, todo: list[tuple[int, int]],
                 progress: Callable[[int, int], None] | None = None, throughput: Throughput | None = None) -> int:
    """Run every teacher that lacks a block over it and write it; returns the rows labelled. ``throughput``
    (optional) is given the time spent waiting for the loader, in the teacher and waiting for the writer."""
    cfg, teachers, device = job.cfg, job.teachers, job.device
    for t in teachers:  # the store says which k / layout was chosen (--k auto is measured by the driver)
        bind_teacher(store, t)
    done = {t.name: store.done(t.name) for t in teachers}
    blocks = [(v, *store.shard_bounds(s)) for v, s in todo]
    total = sum(b - a for _, a, b in blocks)
    rows = ViewedRows(job.dataset, job.policy, view_params_for(store, [v for v, _ in todo]),
                      store.manifest_column("dataset_index"), job.size)
    workers = default_workers(job.dataset) if cfg.workers is None else cfg.workers
    loader = replay_loader(rows, BlockBatches(blocks, cfg.batch_size), workers, device)
    corr_args = cfg.resolved_correction_args()
    writer = Writer(store)
    bf16 = cfg.amp and device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    paths = {t.name: RecordPath(store, t, cfg, bf16) for t in teachers}
    block_iter = iter(todo)
    current, filled, seen, block_len, start = None, 0, 0, 0, 0
    clock = time.perf_counter
    began = mark = clock()
    waits = {"loader": 0.0, "teacher": 0.0, "writer": 0.0}
    try:
        for x, y, _view, _row, _mix in loader:
            now = clock()
            waits["loader"] += now - mark
            mark = now
            if current is None:
                current = next(block_iter)
                start, stop = store.shard_bounds(current[1])
                block_len = stop - start
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                for t in teachers:
                    if done[t.name][current]:
                        continue
                    with autocast:
                        raw = t.model(x)
                    raw = raw.float()
                    corrected = apply_correction(cfg.correction, raw, y, **corr_args)
                    paths[t.name].add(raw, corrected, y, _view, _row, start)
            filled += len(y)
            seen += len(y)
            if progress:
                progress(seen, total)
            if filled == block_len:
                with torch.inference_mode():
                    results = [r for t in teachers if (r := paths[t.name].result(*current)) is not None]
                now = clock()
                waits["teacher"] += now - mark
                mark = now
                for result in results:
                    writer.put(result)
                current, filled = None, 0
            now = clock()
            waits[("writer" if filled == 0 else "teacher")] += now - mark
            mark = now
    finally:
        writer.close()
        now = clock()
        waits["writer"] += now - mark
        if throughput is not None:
            throughput.device, throughput.workers, throughput.batch_size = str(device), workers, cfg.batch_size
            throughput.add(seen, now - began, **waits)
    return seen


def teacher_summary(store: LogitStore, name: str, temps) -> dict[str, Any]:
    """Accuracy, correction rate and measured record error over the finished blocks. The error is a mean over
    the sampled rows (``error_rows``; every row in stores made before the sample) with its standard error
    (``*_se``; None in stores without the sums of squares)."""
    attrs = store.teacher_attrs(name)
    total = store.block_stat_totals(name)
    rows = max(total["rows"], 1.0)
    metric = error_metric(attrs["layout"])  # sampled: KL is infinite, the gradient error instead
    error_rows = total.get("error_rows", total["rows"])
    error, error_se = mean_and_se(total, error_rows, [(str(t), f"{metric}_T{t:g}", f"{metric}_sq_T{t:g}")
                                                       for t in temps])
    probes = undeclared_probe_temperatures(attrs["layout"], temps)
    other = {}
    if probes:
        cols = [(str(t), f"kl_probe_T{t:g}", f"kl_probe_sq_T{t:g}") for t in probes]
        other_kl, other_se = mean_and_se(total, total["probe_rows"], cols)
        other = {"kl_at_other_temperatures": other_kl, "kl_at_other_temperatures_se": other_se,
                 "probe_rows": int(total["probe_rows"])}
    sampled = attrs["layout"] == "sampled"
    key = "grad_sq_error_by_temperature" if sampled else "kl_by_temperature"
    return {
        "rows_done": int(total["rows"]),
        "teacher_top1": float(total["teacher_correct"] / rows),
        "changed_by_correction": float(total["changed_by_correction"] / rows),
        "bf16_rows": int(total["bf16_rows"]),
        "kl_by_temperature": None if sampled else error,
        **({"grad_sq_error_by_temperature": error} if sampled else {}),
        f"{key}_se": error_se,
        "error_rows": int(error_rows),
        **other,
    }


def mean_and_se(total: Mapping[str, float], n: float, cols: list[tuple[str, str, str]]
                ) -> tuple[dict[str, float], dict[str, float] | None]:
    """{T: mean} and {T: standard error of the mean} of per-row values from their sum and sum of squares over
    ``n`` rows; the errors are None when the store has no sums of squares (made before they were kept)."""
    n = max(float(n), 1.0)
    mean = {key: float(total[s] / n) for key, s, _ in cols}
    if any(sq not in total for _, _, sq in cols):
        return mean, None
    var = {key: max(total[sq] / n - mean[key] ** 2, 0.0) * n / max(n - 1.0, 1.0) for key, _, sq in cols}
    return mean, {key: math.sqrt(v / n) for key, v in var.items()}


def config_dict(cfg: TeachConfig) -> dict[str, Any]:
    return asdict(cfg)


# ---------------------------------------------------------------------------------- from Python

OPTIONS = tuple(f.name for f in fields(TeachConfig) if f.name not in ("dataset", "teachers", "out"))
TEACHER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def teach(dataset: Any, teachers: Any, out: str | os.PathLike, *, progress: bool = True, cluster: str | None = None,
          scheduler: str | None = None, profile: str | os.PathLike | None = None, **options: Any) -> LogitStore:
    """Stage one from Python: writes the store ``kdcache teach`` writes; rerunning it resumes.

    ``dataset``: a spec string (``"digits"``, ``"imagefolder:PATH"``, ...) or a map-style dataset,
    ``ds[i] -> (PIL image or uint8 (C, H, W) tensor, int label)`` (see ``kdcache.data.as_image_dataset``).
    ``teachers``: a spec, a list of specs, or a dict name -> nn.Module (or spec). A module is put in eval
    mode on the device; a resumed run needs the same weights. ``options`` are the CLI's, named as
    ``TeachConfig`` fields (``k=10, views=2, view_policy="crop-flip", correction_args={"alpha": 0.9}``).
    ``progress=False`` silences the bar. ``cluster="local:N"`` / ``scheduler="tcp://HOST:PORT"`` run on dask,
    for spec strings only (workers rebuild the dataset and teachers from the config). With ``progress``, the end
    of a single-process run prints rows/s and where the time went (``Throughput``); ``profile="FILE.json"``
    also writes that as JSON."""
    check_options(options)
    if profile is not None and (cluster is not None or scheduler is not None):
        raise SpecError("profile= measures a single-process run; drop it, or run without cluster=/scheduler=")
    specs, modules = split_teachers(teachers)
    if (cluster is not None or scheduler is not None) and (not isinstance(dataset, str) or modules):
        raise SpecError("cluster=/scheduler= ship the config to dask workers, which cannot rebuild Python dataset "
                        "or module objects; pass spec strings (dataset spec, package.module:factory teachers) "
                        "or run without a cluster")
    user_data = None if isinstance(dataset, str) else as_image_dataset(dataset, split=options.get("split", "train"))
    cfg = TeachConfig(dataset=dataset if user_data is None else user_data.spec, teachers=specs, out=os.fspath(out),
                      **normalise_options(options))
    with rows_progress("teach" if cluster is None and scheduler is None else "teach (dask)", progress) as report:
        if cluster is not None or scheduler is not None:
            from kdcache.distributed import run_teach_distributed

            return run_teach_distributed(cfg, cluster=cluster, scheduler=scheduler, progress=report,
                                         log=print if progress else None)
        throughput = Throughput()
        store = run_teach(cfg, progress=report, dataset=user_data, teachers=modules, throughput=throughput)
    report_throughput(throughput, cfg, profile, print_line=progress)
    return store


def report_throughput(throughput: Throughput, cfg: TeachConfig, profile: str | os.PathLike | None,
                      print_line: bool = True, echo: Callable[[str], None] | None = None) -> None:
    """The end-of-run line (``echo``, default stderr) and the ``--profile`` JSON of a single-process run."""
    if print_line and throughput.rows:
        (echo or (lambda line: print(line, file=sys.stderr)))(f"throughput: {throughput.line()}")
    if profile is not None:
        throughput.write(profile, out=cfg.out)


def check_options(options: Mapping[str, Any]) -> None:
    """An unknown keyword is a typo: name the closest option."""
    for key in options:
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(OPTIONS)}"
            raise SpecError(f"unknown teach() option {key!r}; {hint}")


def normalise_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The CLI's parsed forms: k/views "10" -> 10, temperatures 4 or "1,4" -> (1.0, 4.0), as the CLI records them."""
    out = dict(options)
    for key in ("k", "views"):
        if isinstance(out.get(key), str) and out[key].strip().isdigit():
            out[key] = int(out[key])
    if "temperatures" in out:
        t = out["temperatures"]
        try:
            values = t.split(",") if isinstance(t, str) else [t] if isinstance(t, int | float) else list(t)
            out["temperatures"] = tuple(float(v) for v in values if str(v).strip())
        except (TypeError, ValueError):
            raise SpecError(f"temperatures must be numbers, e.g. (1, 4); got {t!r}") from None
    if out.get("correction_args") is None:
        out.pop("correction_args", None)
    return out


def split_teachers(teachers: Any) -> tuple[list[str], dict[str, torch.nn.Module]]:
    """(specs, name -> module) from a spec, a module, a list of them, or a dict name -> module or spec."""
    if isinstance(teachers, str | torch.nn.Module):
        teachers = [teachers]
    if isinstance(teachers, Mapping):
        items = list(teachers.items())
    elif isinstance(teachers, Sequence):
        items = [(None, t) for t in teachers]
    else:
        raise SpecError(f"teachers is a {type(teachers).__name__}; expected a spec string, a list of specs "
                        "or a dict name -> nn.Module")
    specs, modules = [], {}
    for name, t in items:
        if isinstance(t, str):
            if name is not None and name != teacher_name(t):
                raise SpecError(f"teacher {name!r}: a spec teacher is stored as {teacher_name(t)!r}, named by its "
                                f"spec; use that key or pass the spec in a list")
            specs.append(t)
        elif isinstance(t, torch.nn.Module):
            name = type(t).__name__ if name is None else name
            if not isinstance(name, str) or not TEACHER_NAME.fullmatch(name):
                raise SpecError(f"teacher name {name!r} must be letters, digits, '_', '.' or '-'")
            modules[name] = t
        else:
            raise SpecError(f"teacher {name if name is not None else len(specs) + len(modules)!r} is a "
                            f"{type(t).__name__}; expected a spec string or a torch nn.Module")
    if not specs and not modules:
        raise SpecError("no teacher given; pass teachers=['torchvision:resnet18:none'] or {'name': module}")
    return specs, modules


