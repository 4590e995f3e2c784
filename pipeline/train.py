"""Stage two: ``kdcache train``, a student trained from a store with the public ``CachedLoader``.

The store says everything stage one knew (dataset, split, view policy, input size, correction,
temperatures), so the only settings are the student's. The loop is built from library pieces
(``kdcache.loader.CachedLoader``, ``kdcache.losses``, ``kdcache.models``), so a user's own loop over
the same loader trains the same student (examples/own_loop.py, tests/test_api_loader.py).

A dataset spec instead of a store trains without a cache (``--loss ce``: how users get a teacher),
and ``--online-teacher`` runs a live teacher on the same replayed views through the same record
path (the baseline a cache must match).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from kdcache.corrections import apply_correction
from kdcache.data import ImageDataset, load_dataset
from kdcache.loader import CachedLoader, check_policy_use
from kdcache.losses import get_loss, loss_temperatures, resolve_hparams
from kdcache.models import build_model, build_teacher, check_output_width
from kdcache.recipes import check_recipe, with_recipe
from kdcache.records import get_layout
from kdcache.replay import OrderBatches, ViewedRows, default_workers, pairs, replay_loader, resolve_device
from kdcache.soft_labels import epoch_rng
from kdcache.sparse import SparseLogits, check_temperatures
from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore
from kdcache.views import get_view_policy, policy_from_spec

# A field marked RESUMABLE may differ when a run is resumed: how long it goes on and where/how it
# runs, not what it trains. Every other field is compared against the checkpoint (comparable_config).
RESUMABLE = {"resumable": True}


@dataclass
class TrainConfig:
    """One student run. Same config and seed, same result (on the same device)."""

    source: str
    student: str
    out: str = field(metadata=RESUMABLE)
    loss: str = "kd"
    loss_args: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    dataset: str | None = None
    val: str | None = None  # --val SPEC: the evaluation set; None: the dataset's test split, if it has one
    correction: str = "none"
    correction_args: dict[str, Any] = field(default_factory=dict)
    online_teacher: str | None = None
    epochs: int = field(default=240, metadata=RESUMABLE)
    batch_size: int = 64
    lr: float | None = None  # None: the loss's paper setting (LossSpec.lr: 0.05, sld 0.025)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: tuple[int, ...] | None = None
    lr_decay: float = 0.1
    view_schedule: str = "cycle"
    view_policy: str = "identity"
    preload: str = field(default="auto", metadata=RESUMABLE)
    image_size: int | None = None
    workers: int | None = field(default=None, metadata=RESUMABLE)
    seed: int = 0
    device: str = field(default="auto", metadata=RESUMABLE)
    amp: bool = True
    resume: bool = field(default=False, metadata=RESUMABLE)
    overwrite: bool = field(default=False, metadata=RESUMABLE)  # clear an existing run in --out first
    strict: bool = field(default=False, metadata=RESUMABLE)
    allow_partial: bool = False  # an unfinished store: train on the shards done in every view (CachedLoader)
    max_steps_per_epoch: int | None = None
    # a paper's settings (kdcache.recipes, `kdcache recipes`) for the fields not set; resolved by run_train
    recipe: str | None = None

    def step_milestones(self) -> tuple[int, ...]:
        """mdistiller's CIFAR decay points (150/180/210 of 240) scaled to the run's length."""
        if self.milestones is not None:
            return tuple(self.milestones)
        return tuple(round(self.epochs * f) for f in (0.625, 0.75, 0.875))


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """LR for a 1-based epoch: step decay after each milestone (as mdistiller), or cosine."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    return cfg.lr * cfg.lr_decay ** sum(epoch > m for m in cfg.step_milestones())


def comparable_config(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that decide what a run trains, as JSON values (stored in every checkpoint)."""
    plain = json.loads(json.dumps(asdict(cfg), default=str))
    return {f.name: plain[f.name] for f in fields(cfg) if not f.metadata.get("resumable")}


def check_resume(stored: dict[str, Any] | None, current: dict[str, Any], path: Path) -> None:
    """--resume continues the same run; a checkpoint of another student, loss, store, ... is refused."""
    if stored is None:
        return  # a checkpoint from before configs were stored: nothing to compare
    changed = [key for key in sorted(set(stored) | set(current)) if stored.get(key) != current.get(key)]
    if changed:
        key = changed[0]
        raise SpecError(f"--resume: {path} is from a run with another {key} ({stored.get(key)!r} there, "
                        f"{current.get(key)!r} here); resume with the same settings or choose a new --out")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# (field, test, what it must be): every numeric setting, checked before anything is loaded (None: its default)
NUMBER_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("epochs", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("max_steps_per_epoch", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("image_size", lambda v: _is_int(v) and 1 <= v <= 4096, "an integer in 1..4096 (pixels)"),
    ("seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("lr", lambda v: v > 0, "a number > 0, e.g. 0.05"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
    ("weight_decay", lambda v: v >= 0, "a number >= 0, e.g. 5e-4"),
    ("lr_decay", lambda v: v > 0, "a number > 0, e.g. 0.1"),
)


def _number_ok(value: Any, test: Callable[[Any], bool]) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and bool(test(value)))


def validate(cfg: TrainConfig, world: int = 1) -> None:
    """Refuse settings that cannot make a run, before anything is loaded or written."""
    get_loss(cfg.loss)
    for name, test, expected in NUMBER_RULES:
        value = getattr(cfg, name)
        if value is not None and not _number_ok(value, test):
            raise SpecError(f"{_flag(name)} must be {expected}; got {value!r}")
    if cfg.milestones is not None:
        ms = tuple(cfg.milestones)
        if not all(_is_int(m) and m >= 1 for m in ms) or any(a >= b for a, b in zip(ms, ms[1:], strict=False)):
            raise SpecError(f"--milestones must be ascending epochs >= 1, e.g. 150,180,210; got "
                            f"{','.join(map(str, ms)) or 'none'}")
    if cfg.batch_size % world:
        raise SpecError(f"--batch-size is the global batch and must be divisible by the {world} processes "
                        f"(WORLD_SIZE); got {cfg.batch_size}")
    if cfg.schedule not in ("step", "cosine"):
        raise SpecError(f"--schedule must be step or cosine; got '{cfg.schedule}'")
    check_run_dir(cfg)


# What makes a directory a run: a train without --resume never writes over these (--overwrite clears them).
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.parquet", "student.pt")


def check_run_dir(cfg: TrainConfig) -> None:
    """Runs are never lost: an existing run in --out needs --resume (continue) or --overwrite (replace), and
    --resume needs a checkpoint. Nothing is written here."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {cfg.out} is an existing file; choose a directory for the run")
    if cfg.resume and cfg.overwrite:
        raise SpecError("--resume continues the run in --out and --overwrite replaces it; pass only one")
    checkpoint = out / "checkpoint.pt"
    if cfg.resume and not checkpoint.is_file():
        raise SpecError(f"--resume: no checkpoint at {checkpoint}, so there is nothing to continue; "
                        "run without --resume to start (or check --out)")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not cfg.resume and not cfg.overwrite:
        raise SpecError(f"--out {cfg.out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                        "--overwrite to replace it, or choose a new --out")
    check_writable(out, "--out")


def check_writable(path: Path, flag: str) -> None:
    """A directory we cannot write to is one line now, not a traceback after the first epoch."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        where = "is an existing file" if probe == Path(path).absolute() else f"is inside the file {probe}"
        raise SpecError(f"{flag} {path} {where}; choose a directory path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SpecError(f"{flag} {path} is not writable ({probe} is read-only for this user); "
                        "choose a directory you can write to")


@contextlib.contextmanager
def writing(out: Path, flag: str = "--out") -> Iterator[None]:
    """An OS error while writing the run (read-only or full disk) is one line naming the directory."""
    try:
        yield
    except OSError as err:
        raise SpecError(f"cannot write to {flag} {out}: {err.strerror or err}; choose a directory you can "
                        "write to (with free space)") from None


def clear_run(out: Path) -> None:
    """--overwrite: remove the previous run's files (only those: anything else in the directory stays)."""
    for name in (*RUN_FILES, "checkpoint.pt.tmp"):
        (out / name).unlink(missing_ok=True)


def check_student(model: torch.nn.Module, name: str, num_classes: int, size, device) -> None:
    try:
        check_output_width(model.eval(), name, num_classes, size, device)
    except SpecError:
        raise SpecError(f"student '{name}' does not output {num_classes} logits (the dataset's classes); "
                        "pick a classification architecture built for num_classes") from None


class OnlineTeacher:
    """A live teacher on the student's replayed batch, through the same sparse record path."""

    def __init__(self, spec: str, num_classes: int, seed: int, size, device, k: int, temperatures,
                 correction: dict[str, Any]):
        self.model, _ = build_teacher(spec, num_classes, seed=seed)
        self.model = self.model.to(device).eval()
        check_output_width(self.model, spec, num_classes, size, device)
        self.k, self.temperatures, self.correction = k, temperatures, correction

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> SparseLogits:
        raw = self.model(x).float()
        z = apply_correction(self.correction["name"], raw, labels, **self.correction.get("args", {}))
        return SparseLogits.from_dense(z, labels, self.k, temperatures=self.temperatures)


class DatasetEpochs:
    """Training from a dataset spec (no store): fresh views of the policy every epoch, the same
    image path (``kdcache.replay``), epoch order from (seed, epoch) and rank shares as the loader."""

    def __init__(self, dataset: ImageDataset, policy, size, batch_size: int, workers: int, seed: int,
                 rank: int, world: int, max_steps: int | None, device: torch.device):
        self.dataset, self.policy, self.size = dataset, policy, size
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world, self.max_steps, self.device = rank, world, max_steps, device
        self.num_classes = dataset.num_classes
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> int:
        """Full batches of the smallest rank's share rows[r::world] (every rank takes as many)."""
        smallest = len(self.dataset) // self.world
        n = smallest // self.batch_size if smallest >= self.batch_size else int(smallest > 0)
        return n if self.max_steps is None else min(n, self.max_steps)

    def __len__(self) -> int:
        return self.steps()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, None]]:
        n = len(self.dataset)
        rng = epoch_rng(self.seed, self.epoch)
        params = self.policy.sample(1, n, self.dataset.image_size, seed=int(rng.integers(2**31)))
        rows = rng.permutation(n)[self.rank :: self.world]
        viewed = ViewedRows(self.dataset, self.policy, params, np.arange(n), self.size)
        sampler = OrderBatches(self.batch_size)
        sampler.set_order(np.zeros(len(rows), dtype=np.int64), rows, self.steps())
        for batch in replay_loader(viewed, sampler, self.workers, self.device):
            y = batch.labels if batch.mix is None else batch.mix.targets(batch.labels, self.num_classes)
            yield batch.images, y, None


def evaluate(model: torch.nn.Module, dataset: ImageDataset, size, device, batch_size: int = 512) -> tuple[float, float]:
    """Top-1 / top-5 on the plain (identity) view of the held-out split."""
    policy = get_view_policy("identity")
    rows = ViewedRows(dataset, policy, policy.sample(1, len(dataset)), np.arange(len(dataset)), size)
    model.eval()
    hits1 = hits5 = 0
    with torch.inference_mode():
        for a in range(0, len(dataset), batch_size):
            x, y, *_ = rows.__getitems__(pairs(0, np.arange(a, min(a + batch_size, len(dataset)))))
            x, y = x.to(device), y.to(device)
            top = model(x).float().topk(min(5, dataset.num_classes), dim=1).indices
            hits1 += (top[:, 0] == y).sum().item()
            hits5 += (top == y[:, None]).any(1).sum().item()
    return hits1 / len(dataset), hits5 / len(dataset)


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_metrics(rows: list[dict[str, Any]], out: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows), out / "metrics.parquet")


@dataclass
class Ranks:
    """This process's place in a DDP run (``torchrun`` sets WORLD_SIZE, RANK, LOCAL_RANK); world 1: alone."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # run_train initialised the process group, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def init_ranks(device_spec: str) -> Ranks:
    """Join the DDP process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on
    CUDA with device cuda:LOCAL_RANK (whatever --device names). Else a single process on --device."""
    device = resolve_device(device_spec)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device, owns)


@dataclass
class Run:
    """Everything one training run holds between epochs."""

    cfg: TrainConfig
    ranks: Ranks
    batches: CachedLoader | DatasetEpochs
    test: ImageDataset | None  # None: no evaluation set (test_top1 / test_top5 are NaN)
    size: tuple[int, int]
    model: torch.nn.Module
    step_model: torch.nn.Module  # DDP-wrapped under torchrun; eval and state dicts use ``model``
    opt: torch.optim.Optimizer
    hp: dict[str, Any]
    online: OnlineTeacher | None
    out: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 1

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"


def open_batches(cfg: TrainConfig, ranks: Ranks, hp: dict[str, Any]) -> tuple[CachedLoader | DatasetEpochs,
                                                                               ImageDataset | None, tuple[int, int]]:
    """The run's batches (a store's ``CachedLoader``, or fresh views of a dataset spec), its evaluation
    set (``eval_dataset``) and the student's input size."""
    batch_size = cfg.batch_size // ranks.world
    if LogitStore.exists(cfg.source):
        if cfg.online_teacher and cfg.teacher and "," in cfg.teacher:
            raise SpecError("--online-teacher replaces the store's teacher; pass a single --teacher NAME with it")
        loader = CachedLoader(
            cfg.source, batch_size, teacher=cfg.teacher, dataset=cfg.dataset, workers=cfg.workers, seed=cfg.seed,
            preload=cfg.preload, view_schedule=cfg.view_schedule, image_size=cfg.image_size,
            correction=cfg.correction, correction_args=cfg.correction_args,
            loss=cfg.loss, loss_args=cfg.loss_args, strict=cfg.strict,
            allow_partial=cfg.allow_partial,
            rank=ranks.rank, world=ranks.world, max_steps=cfg.max_steps_per_epoch, device=ranks.device,
            records=cfg.online_teacher is None)
        spec = cfg.dataset or loader.store.attrs["identity"]["dataset"]
        return loader, eval_dataset(cfg, spec, loader.num_classes), loader.size
    try:
        train = load_dataset(cfg.source, "train")
    except SpecError:
        src = cfg.source  # a path or URL, not a 'name:...' dataset spec
        if src.endswith(".kdc") or "://" in src or (":" not in src and os.path.sep in src):
            raise SpecError(f"no store at {cfg.source} (and it is not a dataset spec either); check the path, "
                            "or make the store with `kdcache teach`") from None
        raise
    if get_loss(cfg.loss).needs_teacher and not cfg.online_teacher:
        raise SpecError(f"loss '{cfg.loss}' needs a teacher: pass a store made by `kdcache teach`, "
                        "or --online-teacher SPEC, or use --loss ce")
    if cfg.correction != "none" and not cfg.online_teacher:
        raise SpecError("--correction corrects a teacher; training from a dataset spec has none")
    size = (cfg.image_size,) * 2 if cfg.image_size else tuple(train.image_size or (224, 224))
    workers = default_workers(train) if cfg.workers is None else cfg.workers
    policy = policy_from_spec(cfg.view_policy)
    check_policy_use(policy, loss=cfg.loss, loss_args=cfg.loss_args, correction=cfg.correction)
    batches = DatasetEpochs(train, policy, size, batch_size, workers, cfg.seed,
                            ranks.rank, ranks.world, cfg.max_steps_per_epoch, ranks.device)
    return batches, eval_dataset(cfg, cfg.source, train.num_classes), size


def eval_dataset(cfg: TrainConfig, spec: str, num_classes: int) -> ImageDataset | None:
    """What the run evaluates on: --val SPEC (its test split, else all of it, e.g. imagefolder:VALDIR),
    else the training spec's held-out test split, else nothing, with a warning (test_top1 is then NaN)."""
    if cfg.val:
        try:
            test = load_dataset(cfg.val, "test")
        except SpecError:
            test = load_dataset(cfg.val, "train")  # a spec that is itself the evaluation set
        if test.num_classes != num_classes:
            raise SpecError(f"--val {cfg.val} has {test.num_classes} classes and the training data {num_classes}; "
                            "pass an evaluation set of the same classes")
        return test
    if spec.startswith("python:"):
        reason = "a Python dataset object has no spec to load a test split from"
    else:
        try:
            return load_dataset(spec, "test")
        except SpecError as err:
            reason = str(err)
    warnings.warn(f"training without evaluation (test_top1/test_top5 are NaN): no test split ({reason}); "
                  "pass --val SPEC to evaluate", UserWarning, stacklevel=2)
    return None


def online_teacher(cfg: TrainConfig, batches: CachedLoader | DatasetEpochs, num_classes: int, size, device,
                   hp: dict[str, Any]) -> OnlineTeacher | None:
    """--online-teacher: a live teacher with the store's k, temperatures and correction (all classes when
    the store is dense or sampled); without a store, every class at the loss's temperatures."""
    if not cfg.online_teacher:
        return None
    if isinstance(batches, CachedLoader):
        attrs = batches.teacher_attrs
        # mirror a record of real logits (top-k, dense) at its k; a sampled record against the exact teacher
        k = attrs["k"] if get_layout(attrs["layout"]).train_time_corrections else num_classes
        temps = check_temperatures(attrs["temperatures"])
        correction = attrs.get("correction") or {"name": "none", "args": {}}
        seed = batches.store.attrs["identity"]["seed"]
    else:
        k, temps = num_classes, check_temperatures((1.0, *loss_temperatures(cfg.loss, hp)))
        correction, seed = {"name": "none", "args": {}}, cfg.seed
    if cfg.correction != "none":
        correction = {"name": cfg.correction, "args": cfg.correction_args}
    return OnlineTeacher(cfg.online_teacher, num_classes, seed, size, device, k, temps, correction)


class EpochSettingWarning(UserWarning):
    """A loss setting counted in epochs (DKD's warm-up, SLD's start epoch) that this run's --epochs makes
    moot; milestones scale with --epochs, these do not unless a --recipe scales them."""


def warn_epoch_settings(cfg: TrainConfig, hp: dict[str, Any]) -> None:
    """A 120-epoch SLD run never switches its second target on (start epoch 150): say so, with the fix."""
    if "sld_start_epoch" in hp and hp["sld_start_epoch"] >= cfg.epochs:
        scaled = max(1, round(hp["sld_start_epoch"] * cfg.epochs / 240))
        warnings.warn(f"sld_start_epoch {hp['sld_start_epoch']} >= --epochs {cfg.epochs}: the student's swapped "
                      f"target never switches on; pass --loss-arg sld_start_epoch={scaled} (150/240 of the run) or "
                      "a --recipe, which scales it", EpochSettingWarning, stacklevel=3)
    if "warmup" in hp and hp["warmup"] > cfg.epochs:
        warnings.warn(f"warmup {hp['warmup']} > --epochs {cfg.epochs}: the KD terms never reach full weight; pass "
                      f"--loss-arg warmup=N or a --recipe, which scales it", EpochSettingWarning, stacklevel=3)


def setup(cfg: TrainConfig, ranks: Ranks) -> Run:
    """Check the settings, open the batches, build the student and optimiser, and resume if asked."""
    validate(cfg, ranks.world)
    hp = resolve_hparams(cfg.loss, cfg.loss_args)
    batches, test, size = open_batches(cfg, ranks, hp)
    num_classes = batches.num_classes
    online = online_teacher(cfg, batches, num_classes, size, ranks.device, hp)
    model = build_model(cfg.student, num_classes, seed=cfg.seed).to(ranks.device)
    check_student(model, cfg.student, num_classes, size, ranks.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step_model = model
    if ranks.world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    run = Run(cfg, ranks, batches, test, size, model, step_model, opt, hp, online, Path(cfg.out))
    if cfg.resume:  # every rank loads the same checkpoint (check_run_dir made sure there is one)
        ckpt = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
        check_resume(ckpt.get("config"), comparable_config(cfg), run.checkpoint)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        run.metrics, run.start_epoch = ckpt["metrics"], ckpt["epoch"] + 1
    warn_epoch_settings(cfg, hp)  # after every check: a refused run is one line
    ranks.barrier()  # every rank has checked --out before rank 0 writes to it
    if ranks.main:
        with writing(run.out):
            if cfg.overwrite:
                clear_run(run.out)
            run.out.mkdir(parents=True, exist_ok=True)
            (run.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    return run


def train_epoch(run: Run, epoch: int, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One epoch of SGD over the run's batches; returns this rank's sums (rows, loss, hits, seconds)."""
    cfg, device, loss_fn = run.cfg, run.ranks.device, get_loss(run.cfg.loss).fn
    lr = learning_rate(cfg, epoch)
    for group in run.opt.param_groups:
        group["lr"] = lr
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    run.batches.set_epoch(epoch)
    run.model.train()
    t0, seen, loss_sum, hits, steps = time.perf_counter(), 0, 0.0, 0, len(run.batches)
    for step, (x, y, teacher) in enumerate(run.batches):
        loss, logits, y = step_loss(run, loss_fn, epoch, autocast, x, y, teacher)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        value = loss.item()
        if not all_ranks_finite(run.ranks, math.isfinite(value)):
            raise diverged(run, epoch, f"the loss is {value} at step {step + 1}")
        seen += len(y)
        loss_sum += value * len(y)
        hits += (logits.argmax(1) == hard_labels(y)).sum().item()
        if on_step and run.ranks.main:
            on_step(step + 1, steps)
    return {"epoch": epoch, "lr": lr, "seen": seen, "loss_sum": loss_sum, "hits": hits,
            "seconds": time.perf_counter() - t0}


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class ids of int labels, or the heavier class of mixed (B, classes) targets."""
    return y if y.ndim == 1 else y.argmax(1)


def step_loss(run: Run, loss_fn: Callable[..., torch.Tensor], epoch: int, autocast, x, y, teacher):
    """The step's loss, and the first view group's logits and labels (for the accuracy). A store with view
    groups gives dicts {group: value}: the loss is summed over the groups, each group's student logits against
    that group's teacher record, with one student forward per group (as SLD's ``forward_train`` sums its CE
    and KD terms over the weak and the strong view)."""
    device = run.ranks.device
    if isinstance(x, dict):
        parts = [(x[g], y[g], None if teacher is None else teacher[g]) for g in x]
    else:
        parts = [(x, y, teacher)]
    loss = first = None
    for xg, yg, tg in parts:
        xg, yg = xg.to(device, non_blocking=True), yg.to(device, non_blocking=True)
        if run.online is not None:
            tg = run.online(xg, hard_labels(yg))
        with autocast:
            logits = run.step_model(xg)
        term = loss_fn(logits.float(), tg, yg, epoch=epoch, **run.hp)
        loss = term if loss is None else loss + term
        if first is None:
            first = (logits, yg)
    return loss, *first


def finish_epoch(run: Run, sums: dict[str, Any]) -> dict[str, Any]:
    """Sum the ranks' epoch totals; rank 0 evaluates and checkpoints; every rank gets the metrics row."""
    seen, loss_sum, hits = run.ranks.sum([sums["seen"], sums["loss_sum"], sums["hits"]])
    weights = (t for t in run.model.state_dict().values() if t.is_floating_point())
    if not all_ranks_finite(run.ranks, all(bool(torch.isfinite(t).all()) for t in weights)):
        raise diverged(run, sums["epoch"], "the weights are not finite after its last step")
    row = None
    if run.ranks.main:
        top1 = top5 = math.nan
        if run.test is not None:
            top1, top5 = evaluate(run.model, run.test, run.size, run.ranks.device)
        row = {"epoch": sums["epoch"], "lr": sums["lr"], "train_loss": loss_sum / max(seen, 1),
               "train_top1": hits / max(seen, 1), "test_top1": top1, "test_top5": top5,
               "epoch_seconds": sums["seconds"], "rows_per_s": seen / max(sums["seconds"], 1e-9)}
        run.metrics.append(row)
        save_checkpoint(run, sums["epoch"])
    row = run.ranks.from_main(row)  # the other ranks wait here while rank 0 evaluates and saves
    if not run.ranks.main:
        run.metrics.append(row)
    return row


def all_ranks_finite(ranks: Ranks, finite: bool) -> bool:
    """True when every rank's value is finite: under DDP all ranks stop together, or none does."""
    return finite if ranks.world == 1 else ranks.sum([0.0 if finite else 1.0])[0] == 0


def diverged(run: Run, epoch: int, what: str) -> SpecError:
    """The one-line stop of a run whose loss or weights became NaN/inf: nothing of it is saved."""
    kept = (f"{run.checkpoint} keeps the last good epoch, {run.metrics[-1]['epoch']}" if run.metrics
            else "no epoch had finished, so no checkpoint was written")
    lr = run.opt.param_groups[0]["lr"]
    return SpecError(f"training diverged in epoch {epoch}: {what}; the learning rate ({lr:g} in this epoch, --lr "
                     f"{run.cfg.lr:g}) is likely too high: rerun with a lower --lr and --overwrite ({kept}; "
                     "no student.pt)")


def save_checkpoint(run: Run, epoch: int) -> None:
    """metrics.parquet and checkpoint.pt after an epoch (written atomically: a kill leaves the last one)."""
    with writing(run.out):
        write_metrics(run.metrics, run.out)
        save_atomic({"epoch": epoch, "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                     "torch_rng": torch.get_rng_state(), "metrics": run.metrics,
                     "config": comparable_config(run.cfg)}, run.checkpoint)


def run_train(cfg: TrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None,
              on_step: Callable[[int, int], None] | None = None, *,
              explicit: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Train the student; returns the per-epoch metrics (also in OUT/metrics.parquet).

    Under ``torchrun --nproc-per-node N`` (DDP): ``cfg.batch_size`` is the global batch (each rank
    takes batch_size / N rows of its share of the epoch order), gradients are averaged across ranks,
    and rank 0 alone evaluates and writes metrics, checkpoints and student.pt. With preloaded soft
    labels and a student without cross-sample layers in train mode (no BatchNorm), this trains the
    same student as one process with the same global batch, up to all-reduce rounding.
    ``on_epoch`` / ``on_step`` are called on rank 0 only; every rank returns the same metrics.
    A run never overwrites another (``check_run_dir``), and one whose loss or weights become NaN/inf
    stops with a SpecError, keeping the last good checkpoint and writing no student.pt.
    ``cfg.recipe`` fills the fields not set with a paper's settings (``kdcache.recipes.with_recipe``):
    ``explicit`` names the fields set on purpose (the CLI's flags); None: those that differ from their
    defaults. The recipe is checked against the store (dataset, classes, views) before anything runs.
    """
    check_recipe(cfg)  # before resolving it: a recipe that does not fit is refused without scaling warnings
    cfg = with_recipe(cfg, explicit)
    if cfg.lr is None:
        cfg = replace(cfg, lr=get_loss(cfg.loss).lr)
    ranks = init_ranks(cfg.device)
    run = None
    try:
        run = setup(cfg, ranks)
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            row = finish_epoch(run, train_epoch(run, epoch, on_step))
            if on_epoch and ranks.main:
                on_epoch(row)
        if ranks.main:
            with writing(run.out):
                torch.save(run.model.state_dict(), run.out / "student.pt")
        ranks.barrier()  # student.pt is on disk before any rank returns
        return run.metrics
    finally:
        if run is not None and isinstance(run.batches, CachedLoader):
            run.batches.close()  # also after an error or Ctrl-C: no image workers left behind
        if ranks.owns_group and dist.is_initialized():
            dist.destroy_process_group()
