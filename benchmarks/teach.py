"""Stage-one benchmark: `kdcache teach` throughput against a bare teacher-forward loop, and bytes per record.

Part 1 (docs/architecture.md, stage one overhead): the same ``ViewedRows`` + ``make_loader`` (same blocks,
batches, workers, device, autocast, inference_mode, channels_last on CUDA) drive
(a) a bare loop that only runs the teacher forward and discards the output, and
(b) ``label_blocks`` (records, stats, writer thread, zarr writes; the writer's flush included).
They run interleaved (bare, teach, bare, teach, ...) after one untimed warm-up of each; every teach
repeat writes a fresh store whose creation is not timed. The reported ratio is the median over
repeats of teach rows/s / bare rows/s of the same pair. Targets: >= 0.90 on CPU, >= 0.95 on GPU.
One extra teach pass under cProfile (not in the ratio) shows where stage one's time goes; the
writer thread's work is timed separately (cProfile sees only the main thread).

Part 2 (docs/architecture.md, storage): bytes per (row, view) record at k for random-init torchvision
resnet18 heads with 10, 100 and 1000 classes over the same mnist5k views, written through a real
``LogitStore`` on disk (float16 and uint8 value encodings), next to dense float32 (4 * C bytes) and
the uncompressed record size. Random-init logits are not a trained teacher's; a trained 100-class
measurement comes from ``benchmarks/fidelity.py``.

    .venv/bin/python benchmarks/teach.py --out benchmarks/teach.json
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import finish, machine_info  # benchmarks/machine.py

from kdcache.corrections import apply_correction
from kdcache.models import build_teacher
from kdcache.replay import BlockBatches, ViewedRows, default_workers, replay_loader
from kdcache.sparse import SparseLogits
from kdcache.stores import format as fmt
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import (
    Job,
    RecordPath,
    TeachConfig,
    Writer,
    label_blocks,
    make_record,
    open_store_for,
    pending_blocks,
    prepare,
    record_layout,
    record_to_numpy,
    stats_names,
    teacher_name,
    top1_hits,
)

teach_mod = importlib.import_module("kdcache.teach")  # the module (kdcache.teach is also the function)

TARGETS = {"cpu": 0.90, "cuda": 0.95}
# A pass ran uncontended when its CPU use (CPU s / wall s / cores) is at least QUIET x the highest
# CPU use of any timed pass in the run (relative: small inputs never fill every core).
QUIET = 0.9
NCPU = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




def workers_for(job: Job) -> int:
    """The worker count label_blocks will use, so the bare loop reads the same way."""
    return default_workers(job.dataset) if job.cfg.workers is None else job.cfg.workers


def autocast_for(job: Job):
    """The autocast context label_blocks uses (bf16 on CUDA when amp, disabled on CPU)."""
    dev = job.device
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=job.cfg.amp and dev.type == "cuda")


class Source:
    """The loader inputs, read once from a reference store made with the same settings: the
    view parameters and row order are seeded, so every fresh store of a repeat holds the same."""

    def __init__(self, job: Job, store: LogitStore):
        todo = pending_blocks(store, [t.name for t in job.teachers])
        self.todo = todo
        self.blocks = [(v, *store.shard_bounds(s)) for v, s in todo]
        self.records = sum(b - a for _, a, b in self.blocks)
        self.views = store.views()
        self.dataset_index = store.manifest_column("dataset_index")

    def loader(self, job: Job):
        rows = ViewedRows(job.dataset, job.policy, self.views, self.dataset_index, job.size)
        return replay_loader(rows, BlockBatches(self.blocks, job.cfg.batch_size), workers_for(job), job.device)


def bare_pass(job: Job, src: Source) -> tuple[float, float, int]:
    """The reference: the same loader and device path as label_blocks, teacher forward only.
    Returns (wall s, process CPU s, records)."""
    device, autocast = job.device, autocast_for(job)
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    seen = 0
    for x, y, *_ in src.loader(job):
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for t in job.teachers:
                with autocast:
                    t.model(x)  # output discarded
        seen += len(y)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, seen


class Stores:
    """Fresh store paths under one work directory (removed as soon as they are measured)."""

    def __init__(self, root: Path):
        self.root = root
        self.n = 0

    def fresh(self, job: Job) -> LogitStore:
        self.n += 1
        job.cfg.out = str(self.root / f"teach-{self.n}.kdc")
        return open_store_for(job)  # store creation: not timed

    @staticmethod
    def drop(store: LogitStore) -> None:
        shutil.rmtree(store.url, ignore_errors=True)


def teach_pass(job: Job, stores: Stores, profiler: cProfile.Profile | None = None) -> tuple[float, float, int]:
    """label_blocks over a fresh store; timed from the call to its return (writer flushed).
    Returns (wall s, process CPU s incl. the writer thread, records)."""
    store = stores.fresh(job)
    todo = pending_blocks(store, [t.name for t in job.teachers])
    sync(job.device)
    if profiler is not None:
        profiler.enable()
    c0, t0 = time.process_time(), time.perf_counter()
    seen = label_blocks(job, store, todo)
    sync(job.device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler is not None:
        profiler.disable()
    for t in job.teachers:  # sanity, untimed: every block written
        if not store.done(t.name).all():
            raise RuntimeError(f"teach pass left blocks undone for teacher {t.name}")
    stores.drop(store)
    return dt, cpu, seen


# ---------------------------------------------------------------------------------------- part 1


def throughput(job: Job, src: Source, stores: Stores, repeats: int, warmup: int, log) -> dict[str, Any]:
    for _ in range(warmup):
        bare_pass(job, src)
        teach_pass(job, stores)
    reps = []
    for i in range(repeats):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        bare_s, bare_cpu, n_bare = bare_pass(job, src)
        teach_s, teach_cpu, n_teach = teach_pass(job, stores)
        if n_bare != n_teach or n_bare != src.records:
            raise RuntimeError(f"bare loop saw {n_bare} records, teach {n_teach}, expected {src.records}")
        rep = {
            "repeat": i,
            "bare_s": bare_s,
            "teach_s": teach_s,
            "bare_records_per_s": n_bare / bare_s,
            "teach_records_per_s": n_teach / teach_s,
            "ratio": bare_s / teach_s,  # = teach throughput / bare throughput
            "bare_cpu_s": bare_cpu,
            "teach_cpu_s": teach_cpu,
            "cpu_ratio": bare_cpu / teach_cpu,
            # process CPU s / (wall s x cores): ~1 on an idle CPU machine, far lower when other
            # processes compete for the cores (then wall-clock numbers are contention, not kdcache)
            "bare_cpu_utilisation": bare_cpu / bare_s / NCPU,
            "teach_cpu_utilisation": teach_cpu / teach_s / NCPU,
            "loadavg_1min_before": load,
        }
        reps.append(rep)
        log(f"  repeat {i}: bare {bare_s:.3f} s ({rep['bare_records_per_s']:.0f}/s)  "
            f"teach {teach_s:.3f} s ({rep['teach_records_per_s']:.0f}/s)  ratio {rep['ratio']:.3f}  "
            f"(CPU-time ratio {rep['cpu_ratio']:.3f}, CPU use {rep['bare_cpu_utilisation']:.2f}/"
            f"{rep['teach_cpu_utilisation']:.2f}, load {load if load is None else round(load, 1)})")
    ratios = [r["ratio"] for r in reps]
    target = TARGETS.get(job.device.type, TARGETS["cuda"])
    median_ratio = statistics.median(ratios)
    summary = {
        "records_per_pass": src.records,
        "median_ratio": median_ratio,
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_bare_s": statistics.median(r["bare_s"] for r in reps),
        "median_teach_s": statistics.median(r["teach_s"] for r in reps),
        "median_bare_records_per_s": statistics.median(r["bare_records_per_s"] for r in reps),
        "median_teach_records_per_s": statistics.median(r["teach_records_per_s"] for r in reps),
        "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in reps),
        "min_cpu_utilisation": min(min(r["bare_cpu_utilisation"], r["teach_cpu_utilisation"]) for r in reps),
        "target": target,
        "target_met": median_ratio >= target,
    }
    summary["median_overhead_s"] = summary["median_teach_s"] - summary["median_bare_s"]
    if job.device.type == "cpu":
        # Pairs where neither pass shared the cores with another process: on a shared machine these
        # are the kdcache-only numbers; the median over all pairs above stays the headline.
        use = [(r["bare_cpu_utilisation"], r["teach_cpu_utilisation"]) for r in reps]
        threshold = QUIET * max(max(u) for u in use)
        quiet = [r for r, u in zip(reps, use, strict=True) if min(u) >= threshold]
        summary["quiet_threshold"] = threshold
        summary["quiet_repeats"] = [r["repeat"] for r in quiet]
        summary["quiet_median_ratio"] = statistics.median(r["ratio"] for r in quiet) if quiet else None
        summary["quiet_target_met"] = summary["quiet_median_ratio"] >= target if quiet else None
    return {"repeats": reps, "summary": summary}


def loader_only_pass(job: Job, src: Source) -> float:
    """Context: the loader alone (no forward), once."""
    t0 = time.perf_counter()
    for _ in src.loader(job):
        pass
    return time.perf_counter() - t0


def _cum(stats: pstats.Stats, code) -> tuple[float, int]:
    """Cumulative seconds and primitive calls of one function in a cProfile run (0 if never called)."""
    key = (code.co_filename, code.co_firstlineno, code.co_name)
    entry = stats.stats.get(key)  # type: ignore[attr-defined]
    return (float(entry[3]), int(entry[0])) if entry else (0.0, 0)


def overhead_profile(job: Job, src: Source, stores: Stores, top: int) -> dict[str, Any]:
    """Where a teach pass spends its time: cProfile over label_blocks (main thread only; the writer
    thread's work is in ``component_timers``)."""
    prof = cProfile.Profile()
    total, _cpu, _n = teach_pass(job, stores, prof)
    stats = pstats.Stats(prof)
    model = job.teachers[0].model
    parts = {
        "teacher_forward": type(model).forward,
        "loader_next": torch.utils.data.dataloader._BaseDataLoaderIter.__next__,
        "replay_loader": getattr(teach_mod, "replay_loader", None),
        "make_record": getattr(teach_mod, "make_record", None),
        "sparse_record": getattr(teach_mod, "sparse_record", None),
        "apply_correction": getattr(teach_mod, "apply_correction", None),
        "top1_hits": getattr(teach_mod, "top1_hits", None),
        "RecordPath.add (record + stats)": getattr(getattr(teach_mod, "RecordPath", None), "add", None),
        "RecordPath.result (block + error flush)": getattr(getattr(teach_mod, "RecordPath", None), "result", None),
        "SparseLogits.concat": SparseLogits.concat,
        "record_to_numpy": getattr(teach_mod, "record_to_numpy", None),
        "bind_teacher": getattr(teach_mod, "bind_teacher", None),
        "Writer.__init__": Writer.__init__,
        "Writer.put (queue full waits)": Writer.put,
        "Writer.close (flush tail)": Writer.close,
        "LogitStore.done": LogitStore.done,
        "LogitStore.views": LogitStore.views,
        "LogitStore.manifest_column": LogitStore.manifest_column,
    }
    breakdown = {}
    for name, fn in parts.items():
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is None:
            continue
        seconds, calls = _cum(stats, code)
        breakdown[name] = {"s": seconds, "calls": calls, "share": seconds / total if total else 0.0}
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    top_tottime = [
        {"function": f"{Path(f).name}:{line}({fn})", "tottime_s": float(v[2]), "cumtime_s": float(v[3]),
         "calls": int(v[0])}
        for (f, line, fn), v in rows
    ]
    return {"profiled_teach_s": total, "main_thread": breakdown, "top_tottime": top_tottime}


def component_timers(job: Job, src: Source, stores: Stores) -> dict[str, Any]:
    """label_blocks' steps one after another with plain timers (no profiler inflation; the device is
    synchronised around each step, so on a GPU the parts add up to more than a real pass):
    loader, forward, record, stats on the main thread; per block the concat + copy to numpy (main
    thread) and what the writer thread does (encode, compress, write, checksum, done flag)."""
    cfg, t, dev = job.cfg, job.teachers[0], job.device
    store = stores.fresh(job)
    bind = getattr(teach_mod, "bind_teacher", None)  # label_blocks takes k / layout from the store
    if bind is not None:
        bind(store, t)
    corr_args = cfg.resolved_correction_args()
    acc = dict.fromkeys(("loader_s", "forward_s", "correction_s", "record_s", "stats_s"), 0.0)
    paths: dict[tuple[int, int], RecordPath] = {}  # one per block: label_blocks' record path, taken apart

    def tick(key: str, t0: float) -> float:
        sync(dev)
        now = time.perf_counter()
        acc[key] += now - t0
        return now

    autocast = autocast_for(job)
    with torch.inference_mode():
        it = iter(src.loader(job))
        t0 = time.perf_counter()
        for x, y, view, row in it:
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = tick("loader_s", t0)
            with autocast:
                raw = t.model(x)
            raw = raw.float()
            t0 = tick("forward_s", t0)
            corrected = apply_correction(cfg.correction, raw, y, **corr_args)
            t0 = tick("correction_s", t0)
            rec = make_record(t, corrected, y, view, row, cfg)
            t0 = tick("record_s", t0)
            shard = int(row[0]) // store.shard_rows
            path = paths.setdefault((int(view[0]), shard), RecordPath(store, t, cfg))
            path.hits.append(top1_hits(raw, corrected, y, rec))  # RecordPath.add after the record
            path.rows += len(y)
            if corrected is not raw:
                path.changed.append((corrected != raw).any(1).sum())
            path.errors.add(corrected, rec, int(row[0]) - store.shard_bounds(shard)[0])
            path.records.append(rec)
            t0 = tick("stats_s", t0)
            t0 = time.perf_counter()
    to_numpy, write = [], []
    for v, s in src.todo:
        t0 = time.perf_counter()
        result = paths[(v, s)].result(v, s)  # concat, copy to numpy, the error sample's last flush
        t1 = time.perf_counter()
        store.write_block(t.name, v, s, result.record, stats=result.stats)
        to_numpy.append(t1 - t0)
        write.append(time.perf_counter() - t1)
    stores.drop(store)
    acc["concat_to_numpy_s"] = sum(to_numpy)
    acc["writer_write_block_s"] = sum(write)
    acc["write_block_s_per_block"] = write
    acc["rows_per_block"] = [b - a for _, a, b in src.blocks]
    return acc


# ---------------------------------------------------------------------------------------- part 2


def record_logits(model: torch.nn.Module, job: Job, src: Source) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """view -> (fp32 logits, labels) of every row, in row order, as label_blocks computes them."""
    out: dict[int, tuple[list, list]] = {}
    with torch.inference_mode():
        for x, y, view, _row in src.loader(job):
            x = x.to(job.device)
            if job.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(job):
                z = model(x)
            lz, ly = out.setdefault(int(view[0]), ([], []))
            lz.append(z.float().cpu())
            ly.append(y)
    return {v: (torch.cat(lz), torch.cat(ly)) for v, (lz, ly) in out.items()}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bytes_per_record(job: Job, src: Source, stores: Stores, classes: list[int], encodings: list[str],
                     log) -> list[dict[str, Any]]:
    cfg = job.cfg
    spec = cfg.teachers[0]
    out = []
    for c in classes:
        model, _prov = build_teacher(spec, c, seed=cfg.seed)
        model = model.to(job.device).eval()
        if job.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        by_view = record_logits(model, job, src)
        k = int(cfg.k)
        if not 1 <= k <= c:
            raise SystemExit(f"--k {k} does not fit a {c}-class head")
        _, layout = record_layout(k, c)  # topk, or dense when k == C
        for enc in encodings:
            job.cfg.out = str(stores.root / f"bytes-c{c}-{enc}.kdc")
            store = _base_store(job)
            name = f"{teacher_name(spec)}_c{c}"
            store.add_teacher(name, num_classes=c, k=k, encoding=enc, layout=layout,
                              temperatures=tuple(cfg.temperatures), stats_names=stats_names(layout, cfg.temperatures))
            for v, s in src.todo:
                a, b = store.shard_bounds(s)
                z, y = by_view[v]
                rec = SparseLogits.from_dense(z[a:b], y[a:b], k, temperatures=cfg.temperatures)
                store.write_block(name, v, s, record_to_numpy(rec, layout))
            records = store.num_views * store.num_rows
            prefix = f"{fmt.TEACHERS}/{name}"
            sizes = store.nbytes_stored()
            teacher_bytes = sum(n for node, n in sizes.items() if node == prefix or node.startswith(prefix + "/"))
            schema = fmt.teacher_schema(c, k, enc, layout, len(cfg.temperatures))
            tdir = Path(store.url) / fmt.TEACHERS / name
            payload = sum(dir_bytes(tdir / arr / "c") for arr in schema if (tdir / arr / "c").exists())
            raw = sum(int(np.prod(trail, dtype=np.int64)) * np.dtype(dt).itemsize for trail, dt in schema.values())
            per_array = {arr: sizes.get(f"{prefix}/{arr}", 0) / records for arr in schema}
            row = {
                "num_classes": c,
                "k": k,
                "layout": layout,
                "encoding": enc,
                "records": records,
                "bytes_per_record": teacher_bytes / records,
                "payload_bytes_per_record": payload / records,
                "raw_bytes_per_record": raw,
                "dense_float32_bytes": 4 * c,
                "dense_float32_over_stored": 4 * c / (teacher_bytes / records),
                "per_array_bytes_per_record": per_array,
                "teacher_bytes_total": teacher_bytes,
            }
            out.append(row)
            log(f"  C={c:5d} {enc:7s} {layout:5s}: {row['bytes_per_record']:.2f} B/record "
                f"(chunk payload {row['payload_bytes_per_record']:.2f}, raw {raw}, dense f32 {4 * c})")
            Stores.drop(store)
    return out


def _base_store(job: Job) -> LogitStore:
    """A store with labels, views and manifest but no teacher (the teacher is added by hand, as its
    head width differs from the dataset's)."""
    from kdcache.teach import open_or_create

    return open_or_create(job.cfg, job.dataset, job.policy)


# ---------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--split", default="train")
    p.add_argument("--views", default="2", help="views per row (int or 'all')")
    p.add_argument("--view-policy", default="crop-flip")
    p.add_argument("--teacher", default="torchvision:resnet18:none")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--encoding", default="float16", choices=("float16", "uint8"), help="encoding of the timed store")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the dataset's; imagefolder 224)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: what teach picks)")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA (both loops)")
    p.add_argument("--repeats", type=int, default=11, help="interleaved (bare, teach) pairs")
    p.add_argument("--warmup", type=int, default=1, help="untimed (bare, teach) pairs first")
    p.add_argument("--classes", default="10,100,1000", help="head widths for bytes per record ('' to skip)")
    p.add_argument("--bytes-encodings", default="float16,uint8")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile overhead breakdown")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where stores are written (default: a temp dir, removed)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    views: int | str = args.views if args.views == "all" else int(args.views)
    cfg = TeachConfig(dataset=args.dataset, split=args.split, teachers=[args.teacher], out="", k=args.k,
                      encoding=args.encoding, views=views, view_policy=args.view_policy, seed=args.seed,
                      batch_size=args.batch_size, workers=args.workers, device=args.device, amp=not args.no_amp,
                      image_size=args.image_size)
    job = prepare(cfg)  # validates cfg (temperatures become the stored tuple), loads data and teacher
    tmp = None
    if args.workdir:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="kdcache-bench-teach-")
        root = Path(tmp)
    stores = Stores(root)
    try:
        ref = stores.fresh(job)
        src = Source(job, ref)
        settings = {
            "dataset": cfg.dataset, "split": cfg.split, "rows": ref.num_rows, "views": ref.num_views,
            "view_policy": cfg.view_policy, "teacher": args.teacher, "k": cfg.k, "encoding": cfg.encoding,
            "temperatures": list(cfg.temperatures), "batch_size": cfg.batch_size, "workers": workers_for(job),
            "amp": cfg.amp, "input_size": list(job.size), "shard_rows": ref.shard_rows,
            "chunk_rows": ref.chunk_rows, "blocks": len(src.blocks), "repeats": args.repeats,
            "warmup": args.warmup, "seed": cfg.seed,
        }
        Stores.drop(ref)
        log(f"teach benchmark on {job.device}: {settings['rows']} rows x {settings['views']} views, "
            f"{args.teacher}, k={cfg.k}, batch {cfg.batch_size}, workers {settings['workers']}")
        log("throughput (interleaved bare/teach):")
        result: dict[str, Any] = {
            "benchmark": "teach",
            "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
            "machine": machine_info(job.device),
            "settings": settings,
        }
        result["throughput"] = throughput(job, src, stores, args.repeats, args.warmup, log)
        result["throughput"]["loader_only_s"] = loader_only_pass(job, src)
        s = result["throughput"]["summary"]
        log(f"median ratio {s['median_ratio']:.3f} (min {s['min_ratio']:.3f}, max {s['max_ratio']:.3f}); "
            f"target {s['target']:.2f} on {job.device.type}: {'met' if s['target_met'] else 'NOT met'}")
        if s.get("quiet_median_ratio") is not None:
            log(f"uncontended pairs {s['quiet_repeats']}: median ratio {s['quiet_median_ratio']:.3f}")
        if not args.no_profile:
            log("overhead profile (one extra teach pass under cProfile):")
            prof = overhead_profile(job, src, stores, args.profile_top)
            result["overhead"] = prof
            for name, v in prof["main_thread"].items():
                log(f"  {name:32s} {v['s']:.3f} s ({100 * v['share']:.1f}%)  calls {v['calls']}")
            log("component timers (one more pass, steps timed one by one, no profiler):")
            comp = component_timers(job, src, stores)
            result["components"] = comp
            for name, v in comp.items():
                if name.endswith("_s"):
                    log(f"  {name:32s} {v:.3f} s")
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
        if classes:
            log("bytes per record (random-init heads):")
            encs = [e.strip() for e in args.bytes_encodings.split(",") if e.strip()]
            result["bytes_per_record"] = {
                "note": "random-init torchvision heads over the benchmark's views; not a trained teacher",
                "rows": bytes_per_record(job, src, stores, classes, encs, log),
            }
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish(result, args.out, markdown, t_start, log)


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md tables for this run."""
    s, st, m = result["throughput"]["summary"], result["settings"], result["machine"]
    lines = [
        f"Device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, {m['cpu_count']} CPUs, "
        f"torch {m['torch']}; "
        f"{st['dataset']} {st['split']} {st['rows']} rows x {st['views']} {st['view_policy']} views, "
        f"{st['teacher']}, k={st['k']}, batch {st['batch_size']}, {st['repeats']} interleaved repeats.",
        "",
        "| loop | median s / pass | median records/s |",
        "|---|---:|---:|",
        f"| bare teacher forward | {s['median_bare_s']:.3f} | {s['median_bare_records_per_s']:.0f} |",
        f"| `label_blocks` (teach) | {s['median_teach_s']:.3f} | {s['median_teach_records_per_s']:.0f} |",
        "",
        f"Median ratio teach/bare **{s['median_ratio']:.3f}** (min {s['min_ratio']:.3f}, max {s['max_ratio']:.3f}); "
        f"target >= {s['target']:.2f}: **{'met' if s['target_met'] else 'not met'}**. "
        f"Median CPU-time ratio (process CPU s, bare/teach) {s['median_cpu_ratio']:.3f}; "
        f"lowest CPU use of a timed pass {s['min_cpu_utilisation']:.2f} of {m.get('cpu_affinity') or m['cpu_count']} "
        "cores (well below 1 on CPU means other processes competed for the cores).",
    ]
    if s.get("quiet_repeats") is not None:
        q = s["quiet_median_ratio"]
        lines[-1] += (f" Uncontended pairs (both passes at CPU use >= {s['quiet_threshold']:.2f}, {QUIET:g}x the run's "
                      f"highest): {len(s['quiet_repeats'])} of "
                      f"{st['repeats']}" + (f", median ratio **{q:.3f}**." if q is not None else "."))
    if "bytes_per_record" in result:
        lines += [
            "",
            "| classes | k | layout | encoding | stored B/record | chunk payload B/record | raw B/record "
            "| dense f32 B | dense f32 / stored |",
            "|---:|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in result["bytes_per_record"]["rows"]:
            lines.append(
                f"| {r['num_classes']} | {r['k']} | {r['layout']} | {r['encoding']} | {r['bytes_per_record']:.2f} "
                f"| {r['payload_bytes_per_record']:.2f} | {r['raw_bytes_per_record']} | {r['dense_float32_bytes']} "
                f"| {r['dense_float32_over_stored']:.1f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
