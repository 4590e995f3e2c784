"""Stage two: train a student from a store, replaying each cached view, without the teacher.

The store says everything stage one knew (dataset, split, view policy, input size, correction,
temperatures), so the only flags are the student's. A dataset spec instead of a store trains
without a cache (``--loss ce``: how users get a teacher), and ``--online-teacher`` runs a live
teacher on the same replayed views through the same sparse path (the baseline a cache must match).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from kdcache.corrections import apply_correction, get_correction
from kdcache.data import ImageDataset, load_dataset
from kdcache.ensemble import EnsembleRecord, ensemble_attrs, parse_teachers
from kdcache.fidelity import check_store_tail_coverage
from kdcache.losses import LOSSES, get_loss, loss_temperatures, resolve_hparams
from kdcache.models import build_model, build_teacher, check_output_width
from kdcache.replay import ViewedRows, already_batched, default_workers, resolve_device
from kdcache.sampled import SampledLogits
from kdcache.soft_labels import EpochOrder, SoftLabels, epoch_rng
from kdcache.sparse import SparseLogits, check_temperatures
from kdcache.stores.errors import SpecError, StoreError
from kdcache.stores.logit_store import LogitStore
from kdcache.views import get_view_policy, view_policy_from_record


@dataclass
class TrainConfig:
    """One student run. Same config and seed, same result (on the same device)."""

    source: str
    student: str
    out: str
    loss: str = "kd"
    loss_args: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    dataset: str | None = None
    correction: str = "none"
    correction_args: dict[str, Any] = field(default_factory=dict)
    online_teacher: str | None = None
    epochs: int = 240
    batch_size: int = 64
    lr: float | None = None  # None: the loss's paper setting (LossSpec.lr: 0.05, sld 0.025)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: tuple[int, ...] | None = None
    lr_decay: float = 0.1
    view_schedule: str = "cycle"
    view_policy: str = "identity"
    preload: str = "auto"
    image_size: int | None = None
    workers: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    strict: bool = False
    max_steps_per_epoch: int | None = None

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


@dataclass
class Source:
    """Where images, views and soft labels come from for this run."""

    train: ImageDataset
    test: ImageDataset
    size: tuple[int, int]
    store: LogitStore | None = None
    teacher: str | None = None
    teacher_attrs: dict[str, Any] | None = None
    soft: SoftLabels | None = None
    policy: Any = None
    dataset_index: np.ndarray | None = None
    # an ensemble (--teacher a,b): every member's (name, attrs, soft labels); teacher_attrs then
    # stands for the ensemble (kdcache.ensemble.ensemble_attrs) and soft is the first member's
    members: list[tuple[str, dict[str, Any], SoftLabels]] | None = None
    rank: int = 0  # DDP: this process's share of each epoch is rows[rank::world] of the order
    world: int = 1


def open_source(cfg: TrainConfig, rank: int = 0, world: int = 1) -> Source:
    """A store (with its dataset, checked by fingerprint) or a plain dataset spec."""
    if not LogitStore.exists(cfg.source):
        try:
            train = load_dataset(cfg.source, "train")
        except SpecError:
            src = cfg.source  # a path or URL, not a 'name:...' dataset spec
            if src.endswith(".kdc") or "://" in src or (":" not in src and os.path.sep in src):
                raise SpecError(f"no store at {cfg.source} (and it is not a dataset spec either); check the path, "
                                "or make the store with `kdcache teach`") from None
            raise
        size = (cfg.image_size,) * 2 if cfg.image_size else tuple(train.image_size or (224, 224))
        return Source(train, load_dataset(cfg.source, "test"), size, policy=get_view_policy(cfg.view_policy),
                      rank=rank, world=world)
    store = LogitStore.open(cfg.source)
    attrs = store.attrs
    spec = cfg.dataset or attrs["identity"]["dataset"]
    train = load_dataset(spec, attrs["identity"]["split"])
    if train.fingerprint() != attrs["dataset"]["fingerprint"]:
        raise StoreError(f"{cfg.source} was cached from other data than '{spec}' (dataset fingerprint differs); "
                         "pass --dataset with the data the store was made from")
    names = parse_teachers(cfg.teacher) if cfg.teacher else [_only_teacher(store)]
    size = (cfg.image_size,) * 2 if cfg.image_size else tuple(attrs["input_size"])
    if len(names) == 1:
        teacher = names[0]
        tattrs = store.teacher_attrs(teacher)
        soft = SoftLabels(store, teacher, preload=cfg.preload, view_schedule=cfg.view_schedule, seed=cfg.seed,
                          rank=rank, world=world)
        members = None
    else:  # ensemble: one preload decision for all members, so they serve the same epoch order
        member_attrs = [store.teacher_attrs(n) for n in names]
        preload = cfg.preload
        if preload == "auto":
            probes = [SoftLabels(store, n, preload="no", seed=cfg.seed) for n in names]
            preload = "yes" if sum(p.nbytes_decoded() for p in probes) <= 8 << 30 else "no"
        softs = [SoftLabels(store, n, preload=preload, view_schedule=cfg.view_schedule, seed=cfg.seed,
                            rank=rank, world=world) for n in names]
        teacher, tattrs, soft = ",".join(names), ensemble_attrs(names, member_attrs), softs[0]
        members = list(zip(names, member_attrs, softs, strict=True))
    return Source(train, load_dataset(spec, "test"), size, store, teacher, tattrs, soft,
                  view_policy_from_record(attrs["view_policy"]), store.manifest_column("dataset_index"),
                  members, rank, world)


def _only_teacher(store: LogitStore) -> str:
    if len(store.teachers) != 1:
        raise SpecError(f"{store.url} has teachers {store.teachers}; pick one with --teacher NAME")
    return store.teachers[0]


def validate(cfg: TrainConfig, src: Source, hp: dict[str, Any]) -> None:
    """Refuse runs that would silently train on the wrong thing."""
    spec = get_loss(cfg.loss)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise SpecError(f"--epochs and --batch-size must be >= 1; got {cfg.epochs} and {cfg.batch_size}")
    if cfg.batch_size % src.world:
        raise SpecError(f"--batch-size is the global batch and must be divisible by the {src.world} processes "
                        f"(WORLD_SIZE); got {cfg.batch_size}")
    if src.members is not None:
        if cfg.correction != "none" or cfg.loss == "sld":
            what = "--correction" if cfg.correction != "none" else "loss 'sld' (it swaps the teacher's logits)"
            raise SpecError(f"{what} corrects one teacher's logits; an ensemble (--teacher {src.teacher}) has "
                            "none: cache each teacher with `kdcache teach --correction`, or train from one teacher")
        if cfg.online_teacher:
            raise SpecError("--online-teacher replaces the store's teacher; pass a single --teacher NAME with it")
    if cfg.schedule not in ("step", "cosine"):
        raise SpecError(f"--schedule must be step or cosine; got '{cfg.schedule}'")
    get_correction(cfg.correction).args(cfg.correction_args)  # unknown name, argument or value
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {cfg.out} is an existing file; choose a directory for the run")
    has_teacher = src.store is not None or cfg.online_teacher
    if spec.needs_teacher and not has_teacher:
        raise SpecError(f"loss '{cfg.loss}' needs a teacher: pass a store made by `kdcache teach`, "
                        "or --online-teacher SPEC, or use --loss ce")
    if src.teacher_attrs is not None:
        stored = (src.teacher_attrs.get("correction") or {}).get("name", "none")
        if cfg.correction != "none" and stored != "none":
            raise SpecError(f"the store's teacher is already corrected with '{stored}'; a correction is never "
                            "applied twice: drop --correction (or cache an uncorrected store)")
        if src.teacher_attrs.get("layout") == "sampled" and not cfg.online_teacher:
            if not spec.linear_in_teacher:
                unbiased = " or ".join(name for name, sp in LOSSES.items() if sp.linear_in_teacher and sp.needs_teacher)
                raise SpecError(f"loss '{cfg.loss}' is biased on a sampled record (it is not linear in the teacher's "
                                f"probabilities); use --loss {unbiased} on this store, or cache top-k/dense records")
            if cfg.correction != "none":
                raise SpecError(f"--correction {cfg.correction} needs the teacher's logits of every class, which a "
                                f"sampled record does not keep; cache the store with --correction {cfg.correction}")


# Settings a resumed run may change: how long it goes on and where/how it runs, not what it trains.
RESUMABLE_CHANGES = ("epochs", "resume", "out", "workers", "device", "preload", "strict")


def comparable_config(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that decide what a run trains, as JSON values (stored in every checkpoint)."""
    plain = json.loads(json.dumps(asdict(cfg), default=str))
    return {key: value for key, value in plain.items() if key not in RESUMABLE_CHANGES}


def check_resume(stored: dict[str, Any] | None, current: dict[str, Any], path: Path) -> None:
    """--resume continues the same run; a checkpoint of another student, loss, store, ... is refused."""
    if stored is None:
        return  # a checkpoint from before configs were stored: nothing to compare
    changed = [key for key in sorted(set(stored) | set(current)) if stored.get(key) != current.get(key)]
    if changed:
        key = changed[0]
        raise SpecError(f"--resume: {path} is from a run with another {key} ({stored.get(key)!r} there, "
                        f"{current.get(key)!r} here); resume with the same settings or choose a new --out")


def check_student(model: torch.nn.Module, name: str, num_classes: int, size, device) -> None:
    try:
        check_output_width(model.eval(), name, num_classes, size, device)
    except SpecError:
        raise SpecError(f"student '{name}' does not output {num_classes} logits (the dataset's classes); "
                        "pick a classification architecture built for num_classes") from None


def teacher_record(batch: dict[str, np.ndarray], labels: torch.Tensor, attrs: dict, device
                   ) -> SparseLogits | SampledLogits:
    """A batch of stored records on the device (dense stores become k == C; sampled ones estimate p_T)."""
    temps = tuple(attrs["temperatures"])
    t = {key: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for key, v in batch.items()}
    if attrs["layout"] == "dense":
        return SparseLogits.from_dense(t["values"], labels, attrs["num_classes"], temperatures=temps)
    if attrs["layout"] == "sampled":
        return SampledLogits.from_arrays(batch, labels, attrs, device)
    return SparseLogits(values=t["values"], indices=t["indices"], label_logit=t["label_logit"], labels=labels,
                        tail_lse=t["tail"], temperatures=temps, num_classes=attrs["num_classes"])


def soft_batches(src: Source, order: EpochOrder, batch_size: int):
    """Per batch, each teacher's stored records (one dict per teacher; one teacher unless an ensemble)."""
    if src.members is None:
        return ([b] for b in src.soft.batches(order, batch_size))
    return zip(*(soft.batches(order, batch_size) for _, _, soft in src.members), strict=False)


def stored_teacher(src: Source, batches: list[dict[str, np.ndarray]], labels: torch.Tensor, device):
    """The batch's teacher record: a SparseLogits, or an EnsembleRecord of the members' records."""
    if src.members is None:
        return teacher_record(batches[0], labels, src.teacher_attrs, device)
    return EnsembleRecord(tuple(teacher_record(b, labels, attrs, device)
                                for b, (_, attrs, _) in zip(batches, src.members, strict=True)))


class OnlineTeacher:
    """A live teacher on the student's replayed batch, through the same sparse record path."""

    def __init__(self, spec: str, num_classes: int, seed: int, size, device, k: int, temperatures):
        self.model, _ = build_teacher(spec, num_classes, seed=seed)
        self.model = self.model.to(device).eval()
        check_output_width(self.model, spec, num_classes, size, device)
        self.k, self.temperatures = k, temperatures

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, labels: torch.Tensor, correction: dict) -> SparseLogits:
        raw = self.model(x).float()
        z = apply_correction(correction["name"], raw, labels, **correction.get("args", {}))
        return SparseLogits.from_dense(z, labels, self.k, temperatures=self.temperatures)


def evaluate(model: torch.nn.Module, dataset: ImageDataset, size, device, batch_size: int = 512) -> tuple[float, float]:
    """Top-1 / top-5 on the plain (identity) view of the held-out split."""
    policy = get_view_policy("identity")
    rows = ViewedRows(dataset, policy, policy.sample(1, len(dataset)), np.arange(len(dataset)), size)
    model.eval()
    hits1 = hits5 = 0
    with torch.inference_mode():
        for a in range(0, len(dataset), batch_size):
            x, y, _, _ = rows.__getitems__([(0, r) for r in range(a, min(a + batch_size, len(dataset)))])
            x, y = x.to(device), y.to(device)
            top = model(x).float().topk(min(5, dataset.num_classes), dim=1).indices
            hits1 += (top[:, 0] == y).sum().item()
            hits5 += (top == y[:, None]).any(1).sum().item()
    return hits1 / len(dataset), hits5 / len(dataset)


def epoch_inputs(cfg: TrainConfig, src: Source, epoch: int) -> tuple[EpochOrder, ViewedRows]:
    """The epoch's (view, row) order and the dataset that renders those rows' replayed views."""
    if src.store is not None:
        order = src.soft.order(epoch)
        return order, ViewedRows(src.train, src.policy, src.store.views(), src.dataset_index, src.size)
    n = len(src.train)
    rng = epoch_rng(cfg.seed, epoch)
    params = src.policy.sample(1, n, src.train.image_size, seed=int(rng.integers(2**31)))
    rows = rng.permutation(n)[src.rank :: src.world]
    order = EpochOrder(rows, np.zeros(len(rows), dtype=np.int64))
    return order, ViewedRows(src.train, src.policy, params, np.arange(n), src.size)


def make_loader(rows: ViewedRows, order: EpochOrder, batch_size: int, workers: int, steps: int | None):
    """Images in exactly the order the soft labels are served (full batches only)."""
    pairs = list(zip(order.views.tolist(), order.rows.tolist(), strict=True))
    batches = [pairs[a : a + batch_size] for a in range(0, len(pairs) - batch_size + 1, batch_size)]
    if not batches:  # fewer rows than a batch: one short batch
        batches = [pairs]
    if steps is not None:
        batches = batches[:steps]
    return torch.utils.data.DataLoader(rows, batch_sampler=batches, num_workers=workers, collate_fn=already_batched,
                                       multiprocessing_context="spawn" if workers > 0 else None)


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

    def steps(self, rows: int, batch_size: int, cap: int | None) -> int | None:
        """Batches every rank can take this epoch (ranks' shares differ by a row or a chunk; DDP needs
        the same number of steps on each)."""
        if self.world == 1:
            return cap
        t = torch.tensor([max(rows // batch_size, 1 if rows else 0)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item()) if cap is None else min(cap, int(t.item()))

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


def run_train(cfg: TrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None,
              on_step: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Train the student; returns the per-epoch metrics (also in OUT/metrics.parquet).

    Under ``torchrun --nproc-per-node N`` (DDP): ``cfg.batch_size`` is the global batch (each rank
    takes batch_size / N rows of its share rows[rank::N] of the epoch order), gradients are averaged
    across ranks, and rank 0 alone evaluates and writes metrics, checkpoints and student.pt. With
    preloaded soft labels and a student without cross-sample layers in train mode (no BatchNorm), this
    trains the same student as one process with the same global batch, up to all-reduce rounding.
    ``on_epoch`` / ``on_step`` are called on rank 0 only; every rank returns the same metrics.
    """
    if cfg.lr is None:
        cfg = replace(cfg, lr=get_loss(cfg.loss).lr)
    ranks = init_ranks(cfg.device)
    try:
        return _run_train(cfg, ranks, on_epoch, on_step)
    finally:
        if ranks.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run_train(cfg: TrainConfig, ranks: Ranks, on_epoch: Callable[[dict[str, Any]], None] | None,
               on_step: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
    hp = resolve_hparams(cfg.loss, cfg.loss_args)
    src = open_source(cfg, ranks.rank, ranks.world)
    validate(cfg, src, hp)
    corr_args = get_correction(cfg.correction).args(cfg.correction_args)
    loss_fn = get_loss(cfg.loss).fn
    device = ranks.device
    num_classes = src.train.num_classes
    temps = check_temperatures(src.teacher_attrs["temperatures"] if src.teacher_attrs
                               else (1.0, *loss_temperatures(cfg.loss, hp)))
    if src.teacher_attrs is not None:
        check_store_tail_coverage(src.teacher_attrs, loss_temperatures(cfg.loss, hp), cfg.strict)
    stored_correction = (src.teacher_attrs or {}).get("correction") or {"name": "none", "args": {}}
    online = None
    if cfg.online_teacher:
        topk = src.teacher_attrs is not None and src.teacher_attrs["layout"] == "topk"
        k = src.teacher_attrs["k"] if topk else num_classes  # dense (or sampled: compare with the exact teacher)
        seed = src.store.attrs["identity"]["seed"] if src.store is not None else cfg.seed
        online = OnlineTeacher(cfg.online_teacher, num_classes, seed, src.size, device, k, temps)
    model = build_model(cfg.student, num_classes, seed=cfg.seed).to(device)
    check_student(model, cfg.student, num_classes, src.size, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    metrics: list[dict[str, Any]] = []
    start_epoch = 1
    ckpt_path = out / "checkpoint.pt"
    run_config = comparable_config(cfg)
    if cfg.resume and ckpt_path.exists():  # every rank loads the same checkpoint
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        check_resume(ckpt.get("config"), run_config, ckpt_path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        metrics, start_epoch = ckpt["metrics"], ckpt["epoch"] + 1
    # the forward/backward goes through DDP (gradient all-reduce); eval and state dicts use the bare model
    step_model = model
    if ranks.world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    batch_size = cfg.batch_size // ranks.world  # per rank; validate() checked divisibility
    workers = default_workers(src.train) if cfg.workers is None else cfg.workers
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs + 1):
        lr = learning_rate(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        order, rows = epoch_inputs(cfg, src, epoch)
        loader = make_loader(rows, order, batch_size, workers, ranks.steps(len(order), batch_size,
                                                                            cfg.max_steps_per_epoch))
        soft = soft_batches(src, order, batch_size) if src.soft is not None and online is None else None
        model.train()
        t0, seen, loss_sum, hits, steps = time.perf_counter(), 0, 0.0, 0, len(loader)
        for step, (x, y, _views, _rows) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            teacher = None
            if online is not None:
                teacher = online(x, y, stored_correction)
            elif soft is not None:
                teacher = stored_teacher(src, next(soft), y, device)
            if teacher is not None and cfg.correction != "none":
                teacher = apply_correction(cfg.correction, teacher, **corr_args)
            with autocast:
                logits = step_model(x)
            loss = loss_fn(logits.float(), teacher, y, epoch=epoch, **hp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            hits += (logits.argmax(1) == y).sum().item()
            if on_step and ranks.main:
                on_step(step + 1, steps)
        train_time = time.perf_counter() - t0
        seen, loss_sum, hits = ranks.sum([seen, loss_sum, hits])  # the global batch's totals
        row = None
        if ranks.main:
            top1, top5 = evaluate(model, src.test, src.size, device)
            row = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / max(seen, 1),
                   "train_top1": hits / max(seen, 1), "test_top1": top1, "test_top5": top5,
                   "epoch_seconds": train_time, "rows_per_s": seen / max(train_time, 1e-9)}
            metrics.append(row)
            write_metrics(metrics, out)
            save_atomic({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "torch_rng": torch.get_rng_state(), "metrics": metrics, "config": run_config}, ckpt_path)
            if on_epoch:
                on_epoch(row)
        row = ranks.from_main(row)  # the other ranks wait here while rank 0 evaluates and saves
        if not ranks.main:
            metrics.append(row)
    if ranks.main:
        torch.save(model.state_dict(), out / "student.pt")
    ranks.barrier()  # student.pt is on disk before any rank returns
    return metrics

