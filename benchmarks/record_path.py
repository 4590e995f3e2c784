"""Stage one's record path at 1000 and 21 841 classes, and teach against a bare forward at 1000 classes (issue 12).

Part 1, the record path without a teacher: batches of teacher-like float32 logits (a confident label, a few
rivals, a noisy tail; a pool of batches reused in turn) go through what ``label_blocks`` does after the forward,
``kdcache.teach.RecordPath`` (top-k record, batch stats, the sampled float32 record error) and the ``Writer``
thread into a real ``LogitStore`` on disk, against a plain user-side baseline: ``SparseLogits.from_dense`` (the
same fields), the storage dtypes (values and label logit float16, indices uint16/int32, tail float32) and one
pyarrow Parquet file per block (zstd), written in the same thread. Both sides build the record; the ratio is what
the stats and the store cost on top. Passes alternate (baseline first on even repeats), after one untimed warm-up
of each; the ratio is the median of the per-pair ratios record path / baseline. Target <= 1.25 at both widths.
One more serial pass times the steps one by one (record, stats, block assembly, write_block), and the float64
full-pass stats that stage one used before issue 12 on the same batches, for comparison.

``--device cuda`` runs the logits, records and stats on a GPU (the writer and Parquet sides copy to the host).

Part 2, teach / bare forward at 1000 classes with a random-init torchvision ResNet-18 at 112 x 112 over an
in-memory 1000-class dataset: ``benchmarks/teach.py``'s interleaved bare/teach passes (same loader, device,
inference_mode), median of per-pair ratios. Target >= 0.95 on CPU.

    .venv/bin/python benchmarks/record_path.py --out benchmarks/record_path.json   # ~5 min on 2 loaded CPU cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import teach as teach_bench  # benchmarks/teach.py: the bare-vs-teach machinery
import torch
from loader import teacher_like_logits  # benchmarks/loader.py
from machine import finish, machine_info  # benchmarks/machine.py

from kdcache.data import as_image_dataset
from kdcache.fidelity import record_error, undeclared_probe_temperatures
from kdcache.replay import resolve_device
from kdcache.sparse import SparseLogits
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import (
    LoadedTeacher,
    RecordPath,
    TeachConfig,
    Writer,
    make_record,
    prepare,
    stats_names,
    top1_hits,
)

TEMPS = (1.0, 4.0)
LEGACY_BATCHES = 8  # batches the float64 full-pass stats of before issue 12 are timed on (they are slow)
RECORD_TARGET = 1.25  # record path / Parquet baseline, at most
TEACH_TARGET = 0.95  # teach / bare forward at 1000 classes on CPU, at least


# ---------------------------------------------------------------------------------------- part 1


class Logits:
    """A pool of teacher-like batches, handed out in turn (making 200 000 x 1000 logits would dominate)."""

    def __init__(self, classes: int, batch: int, pool: int, seed: int, device: torch.device):
        rng = np.random.default_rng(seed)
        self.batches = []
        for _ in range(pool):
            y = rng.integers(0, classes, batch)
            self.batches.append((torch.from_numpy(teacher_like_logits(rng, y, classes)).to(device),
                                 torch.from_numpy(y).to(device)))
        self.batch = batch

    def blocks(self, rows: int, views: int, shard_rows: int):
        """(view, shard, start, stop, [(logits, labels, store rows), ...]) over every block, in order."""
        i = 0
        for v in range(views):
            for s, a in enumerate(range(0, rows, shard_rows)):
                b = min(a + shard_rows, rows)
                batches = []
                for lo in range(a, b, self.batch):
                    n = min(self.batch, b - lo)
                    z, y = self.batches[i % len(self.batches)]
                    i += 1
                    batches.append((z[:n], y[:n], torch.arange(lo, lo + n)))
                yield v, s, a, b, batches


def fresh_store(root: Path, name: str, rows: int, views: int, classes: int, k: int, shard_rows: int) -> LogitStore:
    labels = np.zeros(rows, dtype=np.int32)
    manifest = {"dataset_index": np.arange(rows), "sample_id": [str(i) for i in range(rows)], "label": labels}
    store = LogitStore.create(root / name, labels=labels, views={}, attrs={}, manifest=manifest, num_views=views,
                              chunk_rows=min(8192, shard_rows), shard_rows=shard_rows, overwrite=True)
    store.add_teacher("t", num_classes=classes, k=k, temperatures=TEMPS, stats_names=stats_names("topk", TEMPS))
    return store


def bench_teacher(k: int) -> LoadedTeacher:
    return LoadedTeacher("t", "benchmark", torch.nn.Identity(), k, {}, "topk")


def record_path_pass(store: LogitStore, logits: Logits, k: int, rows: int, views: int, shard_rows: int) -> float:
    """label_blocks after the forward: RecordPath per batch, the block to the writer thread; writer flushed."""
    cfg = TeachConfig(dataset="benchmark", teachers=[], out=store.url, k=k, temperatures=TEMPS)
    t0 = time.perf_counter()
    path = RecordPath(store, bench_teacher(k), cfg)
    writer = Writer(store)
    try:
        for v, s, a, _b, batches in logits.blocks(rows, views, shard_rows):
            for z, y, r in batches:
                path.add(z, z, y, torch.full_like(r, v), r, a)
            writer.put(path.result(v, s))
    finally:
        writer.close()
    return time.perf_counter() - t0


def parquet_pass(root: Path, logits: Logits, k: int, classes: int, rows: int, views: int, shard_rows: int) -> float:
    """The user-side baseline: the same fields (from_dense), storage dtypes, one Parquet file per block."""
    root.mkdir(parents=True, exist_ok=True)
    index_dtype = np.uint16 if classes <= 65535 else np.int32
    t0 = time.perf_counter()
    for v, s, _a, _b, batches in logits.blocks(rows, views, shard_rows):
        rec = SparseLogits.concat([SparseLogits.from_dense(z, y, k, TEMPS) for z, y, _r in batches])
        n = len(rec)
        cols = {
            "values": rec.values.cpu().numpy().astype(np.float16),
            "indices": rec.indices.cpu().numpy().astype(index_dtype),
            "tail": rec.tail_lse.cpu().numpy(),
        }
        table = pa.table({
            **{name: pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])
               for name, arr in cols.items()},
            "label_logit": pa.array(rec.label_logit.cpu().numpy().astype(np.float16)),
            "row": pa.array(np.arange(n, dtype=np.int64)),
        })
        pq.write_table(table, root / f"v{v}-s{s}.parquet", compression="zstd")
    return time.perf_counter() - t0


def components(store: LogitStore, logits: Logits, k: int, rows: int, views: int, shard_rows: int) -> dict[str, float]:
    """The record path's steps one after another (``RecordPath.add`` taken apart; serial: the writer's work is not
    overlapped here), and the float64 full-pass stats stage one computed before issue 12, on the same batches."""
    cfg = TeachConfig(dataset="benchmark", teachers=[], out=store.url, k=k, temperatures=TEMPS)
    t = bench_teacher(k)
    device = logits.batches[0][0].device

    def clock() -> float:  # a GPU's queued kernels finish before a step's time is taken
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    path = RecordPath(store, t, cfg)
    acc = dict.fromkeys(("record_s", "batch_stats_s", "error_sample_s", "block_assembly_s", "write_block_s",
                         "legacy_float64_stats_s", "legacy_rows"), 0.0)
    probes = undeclared_probe_temperatures("topk", TEMPS)
    for v, s, a, _b, batches in logits.blocks(rows, views, shard_rows):
        for i, (z, y, r) in enumerate(batches):
            t0 = clock()
            rec = make_record(t, z, y, None, r, cfg)
            t1 = clock()
            path.hits.append(top1_hits(z, z, y, rec))
            path.rows += len(y)
            t2 = clock()
            path.errors.add(z, rec, int(r[0]) - a)
            t3 = clock()
            if v == 0 and s == 0 and i < LEGACY_BATCHES:  # before issue 12: float64 KL on every row at each
                [record_error(z, rec, temp).sum() for temp in TEMPS]  # declared T, probes on a block's first batch
                if i == 0:
                    [record_error(z, rec, temp).sum() for temp in probes]
                acc["legacy_rows"] += len(y)
            t4 = clock()
            path.records.append(rec)
            acc["record_s"] += t1 - t0
            acc["batch_stats_s"] += t2 - t1
            acc["error_sample_s"] += t3 - t2
            acc["legacy_float64_stats_s"] += t4 - t3
        t0 = clock()
        path.errors.flush()  # the block's last sampled rows
        acc["error_sample_s"] += clock() - t0
        t0 = clock()
        result = path.result(v, s)  # concat, to numpy, the stats vector
        t1 = clock()
        store.write_block(result.teacher, result.view, result.shard, result.record, stats=result.stats)
        acc["block_assembly_s"] += t1 - t0
        acc["write_block_s"] += clock() - t1
    acc["records"] = rows * views
    acc["legacy_float64_stats_us_per_record"] = 1e6 * acc["legacy_float64_stats_s"] / max(acc["legacy_rows"], 1)
    acc["stats_us_per_record"] = 1e6 * (acc["batch_stats_s"] + acc["error_sample_s"]) / acc["records"]
    acc["record_us_per_record"] = 1e6 * acc["record_s"] / acc["records"]
    return acc


def record_path_bench(classes: int, rows: int, views: int, k: int, batch: int, shard_rows: int, repeats: int,
                      root: Path, seed: int, device: torch.device, log) -> dict[str, Any]:
    logits = Logits(classes, batch, pool=8, seed=seed, device=device)
    records = rows * views

    def ours(i: int) -> tuple[float, float]:
        store = fresh_store(root, f"c{classes}-{i}.kdc", rows, views, classes, k, shard_rows)  # creation: not timed
        c0 = time.process_time()
        dt = record_path_pass(store, logits, k, rows, views, shard_rows)
        cpu = time.process_time() - c0  # both threads: the writer's work is in it
        if not store.done("t").all():
            raise RuntimeError("record path left blocks undone")
        shutil.rmtree(store.url)
        return dt, cpu

    def theirs(i: int) -> tuple[float, float]:
        out = root / f"pq-c{classes}-{i}"
        c0 = time.process_time()
        dt = parquet_pass(out, logits, k, classes, rows, views, shard_rows)
        cpu = time.process_time() - c0
        shutil.rmtree(out)
        return dt, cpu

    ours(-1), theirs(-1)  # warm-up, untimed
    reps = []
    for i in range(repeats):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if i % 2 == 0:
            (base, base_cpu), (path, path_cpu) = theirs(i), ours(i)
        else:
            (path, path_cpu), (base, base_cpu) = ours(i), theirs(i)
        reps.append({"repeat": i, "record_path_s": path, "parquet_s": base, "ratio": path / base,
                     "record_path_cpu_s": path_cpu, "parquet_cpu_s": base_cpu, "cpu_ratio": path_cpu / base_cpu,
                     "loadavg_1min_before": load})
        log(f"  C={classes} repeat {i}: record path {path:.3f} s ({records / path:,.0f}/s)  parquet {base:.3f} s "
            f"({records / base:,.0f}/s)  ratio {path / base:.3f}  (CPU-time ratio {path_cpu / base_cpu:.3f}, "
            f"load {load if load is None else round(load, 1)})")
    ratios = [r["ratio"] for r in reps]
    store = fresh_store(root, f"c{classes}-components.kdc", rows, views, classes, k, shard_rows)
    comp = components(store, logits, k, rows, views, shard_rows)
    shutil.rmtree(store.url)
    median = statistics.median(ratios)
    return {
        "classes": classes, "rows": rows, "views": views, "records": records, "k": k, "batch_size": batch,
        "shard_rows": shard_rows, "repeats": reps,
        "summary": {
            "median_ratio": median, "min_ratio": min(ratios), "max_ratio": max(ratios),
            "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in reps),
            "min_cpu_ratio": min(r["cpu_ratio"] for r in reps), "max_cpu_ratio": max(r["cpu_ratio"] for r in reps),
            "median_record_path_s": statistics.median(r["record_path_s"] for r in reps),
            "median_parquet_s": statistics.median(r["parquet_s"] for r in reps),
            "median_record_path_records_per_s": statistics.median(records / r["record_path_s"] for r in reps),
            "median_parquet_records_per_s": statistics.median(records / r["parquet_s"] for r in reps),
            "target": RECORD_TARGET, "target_met": median <= RECORD_TARGET,
        },
        "components_serial_s": comp,
    }


# ---------------------------------------------------------------------------------------- part 2


class RandomImages:
    """An in-memory 1000-class dataset: seeded uint8 images, label = index mod classes."""

    def __init__(self, n: int, classes: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.classes = [str(c) for c in range(classes)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i % len(self.classes)


def teach_bench_1000(rows: int, size: int, batch: int, repeats: int, root: Path, seed: int, device: torch.device,
                     log) -> dict[str, Any]:
    data = as_image_dataset(RandomImages(rows, 1000, size, seed), name="random1000")
    cfg = TeachConfig(dataset="", teachers=["torchvision:resnet18:none"], out="", k=10, image_size=size,
                      batch_size=batch, device=str(device), seed=seed)
    job = prepare(cfg, dataset=data)
    stores = teach_bench.Stores(root)
    ref = stores.fresh(job)
    src = teach_bench.Source(job, ref)
    teach_bench.Stores.drop(ref)
    out = teach_bench.throughput(job, src, stores, repeats, 1, log)
    s = out["summary"]
    s["target"], s["target_met"] = TEACH_TARGET, s["median_ratio"] >= TEACH_TARGET
    if s.get("quiet_median_ratio") is not None:
        s["quiet_target_met"] = s["quiet_median_ratio"] >= TEACH_TARGET
    out["settings"] = {"rows": rows, "classes": 1000, "teacher": "torchvision:resnet18:none (random init)",
                       "input_size": [size, size], "batch_size": batch, "k": 10,
                       "temperatures": list(job.cfg.temperatures),
                       "workers": teach_bench.workers_for(job), "repeats": repeats}
    return out


# ---------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000, help="rows per view at 1000 classes")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--wide-rows", type=int, default=4096, help="rows per view at 21 841 classes")
    p.add_argument("--wide-views", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-rows", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=9, help="interleaved (baseline, record path) pairs")
    p.add_argument("--teach-rows", type=int, default=256, help="rows of the 1000-class teach vs bare part (0: skip)")
    p.add_argument("--teach-size", type=int, default=112)
    p.add_argument("--teach-repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (logits, records and stats there)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core box a 2-thread process stalls whenever a neighbour "
                   "holds a core; both sides of every ratio run with the same)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "benchmark": "record_path",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "machine": machine_info(device),
        "settings": vars(args),
    }
    root = Path(tempfile.mkdtemp(prefix="kdcache-bench-record-path-"))
    try:
        log("record path vs Parquet (interleaved):")
        result["record_path"] = [
            record_path_bench(1000, args.rows, args.views, args.k, args.batch_size, args.shard_rows, args.repeats,
                              root, args.seed, device, log),
            record_path_bench(21841, args.wide_rows, args.wide_views, args.k, args.batch_size, args.shard_rows,
                              args.repeats, root, args.seed, device, log),
        ]
        if args.teach_rows:
            log("teach vs bare forward at 1000 classes (ResNet-18, interleaved):")
            result["teach_1000"] = teach_bench_1000(args.teach_rows, args.teach_size, args.batch_size,
                                                    args.teach_repeats, root, args.seed, device, log)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return finish(result, args.out, markdown, t_start, log)


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md tables of this run."""
    m = result["machine"]
    lines = [
        f"{m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), load average "
        f"{m['loadavg_at_start'][0]:.1f} at the start; top-{result['settings']['k']} + tail at T = 1, 4, float16, "
        f"batch {result['settings']['batch_size']}, {result['settings']['repeats']} interleaved pairs.",
        "",
        "| classes | records | record path s | Parquet s | record path / Parquet: median (min–max) "
        "| CPU-time ratio: median (min–max) | target ≤ 1.25 |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["record_path"]:
        s = r["summary"]
        lines.append(f"| {r['classes']} | {r['records']:,} ({r['rows']:,} rows × {r['views']} views) "
                     f"| {s['median_record_path_s']:.2f} | {s['median_parquet_s']:.2f} "
                     f"| **{s['median_ratio']:.3f}** ({s['min_ratio']:.3f}–{s['max_ratio']:.3f}) "
                     f"| {s['median_cpu_ratio']:.3f} ({s['min_cpu_ratio']:.3f}–{s['max_cpu_ratio']:.3f}) "
                     f"| {'met' if s['target_met'] else 'not met'} |")
    lines += ["", "Serial pass, seconds per step (µs per record for the stats):", "",
              "| classes | record | batch stats | error sample | block assembly | write_block "
              "| stats µs/record | float64 full-pass stats before issue 12, µs/record |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["record_path"]:
        c = r["components_serial_s"]
        lines.append(f"| {r['classes']} | {c['record_s']:.2f} | {c['batch_stats_s']:.3f} | {c['error_sample_s']:.3f} "
                     f"| {c['block_assembly_s']:.3f} | {c['write_block_s']:.3f} | {c['stats_us_per_record']:.2f} "
                     f"| {c['legacy_float64_stats_us_per_record']:.0f} |")
    if "teach_1000" in result:
        s, st = result["teach_1000"]["summary"], result["teach_1000"]["settings"]
        lines += ["", f"Teach / bare forward at 1000 classes ({st['teacher']}, {st['input_size'][0]}², "
                  f"{st['rows']} rows, batch {st['batch_size']}, {st['repeats']} interleaved pairs): median "
                  f"**{s['median_ratio']:.3f}** (min {s['min_ratio']:.3f}, max {s['max_ratio']:.3f}), "
                  f"bare {s['median_bare_records_per_s']:.0f} vs teach {s['median_teach_records_per_s']:.0f} rows/s; "
                  f"target ≥ "
                  f"{TEACH_TARGET}: **{'met' if s['target_met'] else 'not met'}**"
                  + (f"; uncontended pairs {s['quiet_repeats']}: median {s['quiet_median_ratio']:.3f}"
                     if s.get("quiet_median_ratio") is not None else "") + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
