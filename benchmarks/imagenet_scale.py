"""ImageNet-sized stores, simulated: bytes, write, ``kdcache inspect`` / ``verify`` and streamed serving by size.

No teacher runs here: records are **synthetic** (see ``synthetic_records``), drawn directly as top-k + tail
with numpy and written through the store's own write path (``LogitStore.create`` + ``add_teacher`` +
``write_block``, blosc-zstd, checksums, done flags), with ImageNet's shapes: 1 281 167 rows, 1000 classes,
top-10 + label logit + tail log-sum-exp at T = 1, 4, float16 values, rrc-flip view parameters sampled by the
real policy, a manifest of ImageNet-like relative paths, 8 192-row chunks in 65 536-row shards. For growth
the same is written at 100k and 1M rows x 1 view, plus a 21 841-class probe (ImageNet-21k's head, 131 072
rows x 1 view) for its bytes per record and write rate only. Per store:

- bytes on disk per record (teacher arrays, view parameters) and per row (labels, manifest);
- write time: seconds in ``write_block`` per block (encode, compress, write, checksum, done flag), store
  creation (labels, views, manifest) and record generation timed apart;
- ``kdcache inspect --json`` and ``kdcache verify`` (every block's checksum), each run as the real CLI
  (``python -m kdcache.cli``) in a fresh subprocess, timed from outside, next to the CLI's start-up alone
  (``kdcache --version``: Python + torch imports); their peak RSS from VmHWM read at exit;
- stage-two streamed serving (``SoftLabels(preload="no")``, batches of 256 as torch tensors, epochs 1 and 2)
  in a fresh subprocess per measurement: rows/s and peak RSS (VmHWM, not ``ru_maxrss``, which carries the
  forking parent's peak across fork + exec) above the RSS after imports and above a warm start.

Repeats are interleaved (start-up, then each store's inspect, verify, serve). Then the per-record costs are
extrapolated to ImageNet-1k x 10 (when fewer views were written) and x 100 views, and ImageNet-21k x 10 views.

    .venv/bin/python benchmarks/imagenet_scale.py --out benchmarks/imagenet_scale.json   # 7.6 min, 2 loaded cores
    .venv/bin/python benchmarks/imagenet_scale.py --views 2 ...    # 1.28M x 2 views, 10 views extrapolated
    .venv/bin/python benchmarks/imagenet_scale.py --quick --out /tmp/imagenet_scale.json  # toy sizes, ~1 min

Stores go under ``--cache-dir`` (default ``~/.cache/kdcache-bench-imagenet``) and are deleted at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import finish, machine_info  # benchmarks/machine.py

from kdcache.records import get_layout
from kdcache.stores.logit_store import LogitStore
from kdcache.views import get_view_policy

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "synthetic"
K, TEMPERATURES, BATCH = 10, (1.0, 4.0), 256
IMAGENET_1K_ROWS = 1_281_167  # ILSVRC-2012 train
IMAGENET_21K_ROWS = 14_197_122  # the full ImageNet (fall 2011 release): 14 197 122 images, 21 841 synsets
IMAGENET_21K_CLASSES = 21_841
IMAGE_HW = (375, 500)  # the typical ImageNet JPEG (aspect for the rrc-flip boxes)
PROBE = "in21k-probe"  # bytes and write rate only: no inspect / verify / serving runs
LINEAR_TOLERANCE = 1.25  # per-record cost of the largest store within 1.25x the next one's = "linear or better"
TEACH_RATES = (1_000, 3_000, 10_000)  # records/s of stage one assumed for the wall-time extrapolation
FULL = {"stores": [("in1k-100k", 100_000, 1, 1000), ("in1k-1m", 1_000_000, 1, 1000),
                   ("in1k", IMAGENET_1K_ROWS, 10, 1000), (PROBE, 131_072, 1, IMAGENET_21K_CLASSES)],
        "chunk_rows": 8192, "shard_rows": 65536, "repeats": 3}
QUICK = {"stores": [("in1k-1m", 4_000, 1, 1000), ("in1k", 8_192, 2, 1000),
                    (PROBE, 2_048, 1, IMAGENET_21K_CLASSES)],
         "chunk_rows": 1024, "shard_rows": 4096, "repeats": 1}
SYNTHETIC_NOTE = (
    "synthetic records, no teacher: per row, logits z = mu + beta * G with G iid standard Gumbel over the "
    "C - 1 non-label classes (mu ~ N(0, 1), beta = 1.8 * lognormal(0, 0.3)), the label's G shifted by a "
    "margin 9 + 1.5 * t(3); the largest k + 25 non-label values drawn exactly (Renyi's exponential spacings), "
    "the top k's classes uniform and distinct; the tail log-sum-exp at each T is exact over those next 25 "
    "and estimated for the remaining classes from 16 draws (exact in distribution given the (k+25)-th value: "
    "memoryless exponentials). Uniform rival classes are "
    "a worst case for index compression (a trained teacher's rivals cluster by WordNet neighbourhood).")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_repeat": values}


# ---------------------------------------------------------------------------------------- records


def synthetic_records(rng: np.random.Generator, labels: np.ndarray, classes: int, k: int = K,
                      temperatures=TEMPERATURES, exact_tail: int = 24, tail_draws: int = 16) -> dict[str, np.ndarray]:
    """A teacher-like top-k record per row, drawn directly (never a (rows, classes) array): see SYNTHETIC_NOTE.

    Returns ``write_block``'s keys: values (R, k) float32 descending, indices (R, k), label_logit (R,),
    tail (R, T): log-sum-exp of z / T over the classes that are neither in the record nor the label."""
    n, others = len(labels), classes - 1
    mu = rng.standard_normal(n, dtype=np.float32)
    beta = (1.8 * np.exp(rng.normal(0.0, 0.3, n))).astype(np.float32)
    margin = (9.0 + 1.5 * rng.standard_t(3, n)).astype(np.float32)
    # the j smallest of `others` iid Exp(1): E_(j) = sum_{i <= j} X_i / (others - i + 1); G_(j) = -log E_(j)
    exact = min(k + 1 + exact_tail, others)
    spacings = rng.standard_exponential((n, exact), dtype=np.float32)
    e = np.maximum(np.cumsum(spacings / (others - np.arange(exact, dtype=np.float32)), axis=1), 1e-12)
    ordered = mu[:, None] - beta[:, None] * np.log(e)  # (n, exact), descending
    top = ordered[:, : k + 1]
    label_logit = mu + beta * (rng.gumbel(size=n).astype(np.float32) + margin)
    idx = rng.integers(0, others, (n, k + 1))
    while True:  # distinct classes per row (a repeat is rare: redraw those rows)
        dup = (np.diff(np.sort(idx, axis=1), axis=1) == 0).any(axis=1)
        if not dup.any():
            break
        idx[dup] = rng.integers(0, others, (int(dup.sum()), k + 1))
    idx += idx >= labels[:, None]  # skip the label's class
    label_in = label_logit > top[:, k - 1]  # the label displaces the k-th rival into the tail
    cand_v = np.concatenate([top[:, :k], label_logit[:, None]], axis=1)
    cand_i = np.concatenate([idx[:, :k], labels[:, None].astype(idx.dtype)], axis=1)
    order = np.argsort(-cand_v, axis=1, kind="stable")[:, :k]
    # ranks k + 1 .. exact are exact; beyond, given E_(exact) = e the others are e + Exp(1) iid: a sum from draws
    rest_log_e = np.log(e[:, -1:] + rng.standard_exponential((n, tail_draws), dtype=np.float32))
    rest_scale = np.log(max(others - exact, 1) / tail_draws) if others > exact else -np.inf
    tails = []
    for t in temperatures:
        rest = (mu[:, None] - beta[:, None] * rest_log_e) / t + rest_scale
        terms = np.concatenate([ordered[:, k:] / t, rest], axis=1)
        m = terms.max(axis=1)
        lse = m + np.log(np.exp(terms - m[:, None]).sum(axis=1))
        tails.append(np.where(label_in, np.logaddexp(lse, top[:, k - 1] / t), lse))
    return {"values": np.take_along_axis(cand_v, order, axis=1),
            "indices": np.take_along_axis(cand_i, order, axis=1),
            "label_logit": label_logit, "tail": np.stack(tails, axis=1).astype(np.float32)}


def record_stats(rec: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """How teacher-like the draw is: top-1, label in the record, mean p_max and tail mass at T = 1."""
    v = rec["values"].astype(np.float64)
    lse = np.logaddexp(np.log(np.exp(v - v[:, :1]).sum(axis=1)) + v[:, 0], rec["tail"][:, 0])
    in_rec = (rec["indices"] == labels[:, None]).any(axis=1)
    lse = np.where(in_rec, lse, np.logaddexp(lse, rec["label_logit"]))
    return {"top1": float((rec["indices"][:, 0] == labels).mean()), "label_in_record": float(in_rec.mean()),
            "mean_p_max_T1": float(np.exp(v[:, 0] - lse).mean()),
            "mean_tail_mass_T1": float(np.exp(rec["tail"][:, 0] - lse).mean())}


# ---------------------------------------------------------------------------------------- stores


def build_store(path: Path, rows: int, views: int, classes: int, chunk_rows: int, shard_rows: int,
                seed: int = 0) -> dict[str, Any]:
    """Write one synthetic store as stage one would (whole blocks, view-major); timings and bytes."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    labels = rng.integers(0, classes, rows).astype(np.int32)
    policy = get_view_policy("rrc-flip")
    view_params = policy.sample(views, rows, image_size=IMAGE_HW, seed=seed)
    sample_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = {"dataset_index": rng.permutation(rows), "label": labels,
                "sample_id": [f"n{c:08d}/n{c:08d}_{i}.JPEG" for i, c in enumerate(labels.tolist())]}
    manifest_s = time.perf_counter() - t0
    attrs = {"dataset": {"spec": f"synthetic:imagenet-{classes}", "split": "train", "fingerprint": "synthetic",
                         "num_classes": classes},
             "num_classes": classes, "view_policy": {"name": policy.name, "args": policy.args},
             "input_size": [224, 224], "row_seed": seed, "synthetic": SYNTHETIC_NOTE}
    t0 = time.perf_counter()
    store = LogitStore.create(path, labels=labels, views=view_params, attrs=attrs, manifest=manifest,
                              chunk_rows=chunk_rows, shard_rows=shard_rows, overwrite=True)
    store.add_teacher(TEACHER, num_classes=classes, k=K, temperatures=TEMPERATURES,
                      attrs={"spec": "synthetic:gumbel-teacher", "correction": {"name": "none", "args": {}}})
    create_s = time.perf_counter() - t0
    gen_s, write_s, stats = 0.0, [], None
    for v in range(views):
        for s in range(store.num_shards):
            a, b = store.shard_bounds(s)
            t0 = time.perf_counter()
            rec = synthetic_records(np.random.default_rng([seed, v, s]), labels[a:b], classes)
            gen_s += time.perf_counter() - t0
            if stats is None:
                stats = record_stats(rec, labels[a:b])
            t0 = time.perf_counter()
            store.write_block(TEACHER, v, s, rec)
            write_s.append(time.perf_counter() - t0)
    if not store.done(TEACHER).all():
        raise RuntimeError(f"{path}: blocks left undone")
    records = rows * views
    sizes = store.nbytes_stored()
    # teacher = its arrays, as `kdcache inspect` counts them (group metadata goes to "other")
    groups = {"teacher": sum(n for p, n in sizes.items() if p.startswith(f"teachers/{TEACHER}/")),
              "views": sum(n for p, n in sizes.items() if p.startswith("views")),
              "labels": sizes.get("labels", 0), "manifest": sizes.get("manifest.parquet", 0)}
    groups["other"] = sum(sizes.values()) - sum(groups.values())
    per_array = {p.split("/")[-1]: n / records for p, n in sizes.items()
                 if p.startswith(f"teachers/{TEACHER}/") and n > 0}
    block_rows = [store.shard_bounds(s)[1] - store.shard_bounds(s)[0] for s in range(store.num_shards)] * views
    return {
        "rows": rows, "views": views, "classes": classes, "records": records, "k": K,
        "temperatures": list(TEMPERATURES), "encoding": "float16", "chunk_rows": store.chunk_rows,
        "shard_rows": store.shard_rows, "blocks": len(write_s), "synthetic_record_stats": stats,
        "bytes": {**groups, "total": sum(sizes.values())},
        "bytes_per_record": {"teacher": groups["teacher"] / records, "views": groups["views"] / records,
                             "total": sum(sizes.values()) / records, "teacher_arrays": per_array},
        "bytes_per_row": {"labels": groups["labels"] / rows, "manifest": groups["manifest"] / rows},
        "dense_float32_bytes_per_record": 4 * classes,
        "write": {"write_block_s_total": sum(write_s), "records_per_s": records / sum(write_s),
                  "block_records_per_s": spread([r / s for r, s in zip(block_rows, write_s, strict=True)]),
                  "s_per_record": sum(write_s) / records, "create_s": create_s,
                  "sample_views_and_labels_s": sample_s, "manifest_strings_s": manifest_s,
                  "generate_records_s": gen_s},
    }


# ---------------------------------------------------------------------------------------- subprocesses

# Runs `python -m kdcache.cli ARGS` as is; its imports first (timed), and at exit it writes to $KDC_BENCH_HWM
# its VmHWM (bytes), the import seconds and the seconds after the imports (the command's own work).
CLI_WRAPPER = """
import atexit, json, os, runpy, sys, time
t0 = time.perf_counter()
import kdcache.cli.main, kdcache.describe, kdcache.verify
t1 = time.perf_counter()
def _report():
    after = time.perf_counter() - t1
    with open('/proc/self/status') as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    with open(os.environ['KDC_BENCH_HWM'], 'w') as f:
        json.dump({'peak_rss': kb * 1024, 'imports_s': t1 - t0, 'after_imports_s': after}, f)
atexit.register(_report)
sys.argv = ['kdcache', *sys.argv[1:]]
runpy.run_module('kdcache.cli', run_name='__main__')
"""


def run_cli(args: list[str], work: Path) -> dict[str, Any]:
    """Wall seconds of one CLI call in a fresh process (start-up included), seconds after its imports, peak RSS."""
    hwm = work / "hwm.txt"
    hwm.unlink(missing_ok=True)
    env = {**os.environ, "KDC_BENCH_HWM": str(hwm)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CLI_WRAPPER, *args], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"kdcache {' '.join(args)} exited {res.returncode}: {res.stderr.strip()[-400:]}")
    inner = json.loads(hwm.read_text())
    return {"s": seconds, "after_imports_s": inner["after_imports_s"], "imports_s": inner["imports_s"],
            "peak_rss_mib": inner["peak_rss"] / 2**20, "stdout": res.stdout}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: this process image's peak RSS (``ru_maxrss`` would start at a forking parent's peak)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def serve_child(path: str, epochs: int = 2) -> dict[str, Any]:
    """In a fresh process: stream ``epochs`` epochs (batches of 256 as torch tensors); rows/s and peak RSS."""
    import torch

    from kdcache.soft_labels import SoftLabels

    after_imports = rss_bytes()
    store = LogitStore.open(path)
    torch.from_numpy(store.read_block(TEACHER, 0, 0, 1)["values"])
    warm = rss_bytes()
    soft = SoftLabels(store, TEACHER, preload="no")
    rates, order_s = [], []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = soft.order(epoch)
        order_s.append(time.perf_counter() - t0)
        t0, rows = time.perf_counter(), 0
        for batch in soft.batches(order, BATCH):
            rows += len({key: torch.from_numpy(arr) for key, arr in batch.items()}["values"])
        rates.append(rows / (time.perf_counter() - t0))
    peak, mib = peak_rss_bytes(), 2**20
    return {"rows_per_s": rates, "order_s": order_s, "rss_after_imports_mib": after_imports / mib,
            "peak_rss_mib": peak / mib, "peak_rss_above_imports_mib": (peak - after_imports) / mib,
            "peak_rss_above_warm_start_mib": max(0, peak - warm) / mib}


def run_serve(path: Path) -> dict[str, Any]:
    res = subprocess.run([sys.executable, __file__, "--serve-child", str(path)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- analysis


def measure(stores: dict[str, dict], paths: dict[str, Path], repeats: int, work: Path) -> dict[str, Any]:
    """Interleaved repeats: CLI start-up, then per store (but the probe) inspect, verify and a serving child."""
    paths = {name: path for name, path in paths.items() if name != PROBE}
    startup: list[dict] = []
    raw: dict[str, dict[str, list]] = {name: {"inspect": [], "verify": [], "serve": []} for name in paths}
    for rep in range(repeats):
        startup.append(run_cli(["--version"], work))
        for name, path in paths.items():
            ins = run_cli(["inspect", "--json", str(path)], work)
            info = json.loads(ins.pop("stdout"))["teachers"][TEACHER]
            if abs(info["bytes_per_record"] - stores[name]["bytes_per_record"]["teacher"]) > 1e-6:
                raise RuntimeError(f"{name}: inspect reports {info['bytes_per_record']} B/record, "
                                   f"measured {stores[name]['bytes_per_record']['teacher']}")
            ver = run_cli(["verify", str(path)], work)
            if "checksums match" not in ver.pop("stdout"):
                raise RuntimeError(f"{name}: verify did not report matching checksums")
            raw[name]["inspect"].append(ins)
            raw[name]["verify"].append(ver)
            raw[name]["serve"].append(run_serve(path))
            log(f"  repeat {rep} {name:12s}: inspect {ins['s']:.2f} s ({ins['after_imports_s']:.2f} after imports), "
                f"verify {ver['s']:.2f} s ({ver['after_imports_s']:.2f}), serve "
                f"{raw[name]['serve'][-1]['rows_per_s'][-1]:,.0f} rows/s (start-up {startup[-1]['s']:.2f} s)")
    base = statistics.median(r["s"] for r in startup)
    out = {"cli_startup": {"s": spread([r["s"] for r in startup]),
                           "imports_s": spread([r["imports_s"] for r in startup]),
                           "peak_rss_mib": spread([r["peak_rss_mib"] for r in startup])}, "stores": {}}
    for name, r in raw.items():
        entry = {}
        for cmd in ("inspect", "verify"):
            s = [x["s"] for x in r[cmd]]
            entry[cmd] = {"s": spread(s), "above_startup_s": max(0.0, statistics.median(s) - base),
                          "after_imports_s": spread([x["after_imports_s"] for x in r[cmd]]),
                          "peak_rss_mib": spread([x["peak_rss_mib"] for x in r[cmd]])}
        entry["verify"]["after_imports_s_per_record"] = (entry["verify"]["after_imports_s"]["median"]
                                                         / stores[name]["records"])
        sv = r["serve"]
        entry["serve"] = {
            "batch_size": BATCH, "epoch1_rows_per_s": spread([x["rows_per_s"][0] for x in sv]),
            "epoch2_rows_per_s": spread([x["rows_per_s"][-1] for x in sv]),
            "order_s": spread([max(x["order_s"]) for x in sv]),
            "peak_rss_above_imports_mib": spread([x["peak_rss_above_imports_mib"] for x in sv]),
            "peak_rss_above_warm_start_mib": spread([x["peak_rss_above_warm_start_mib"] for x in sv]),
            "rss_after_imports_mib": statistics.median(x["rss_after_imports_mib"] for x in sv),
        }
        out["stores"][name] = entry
    return out


def growth(stores: dict[str, dict], measured: dict[str, Any]) -> dict[str, Any]:
    """Per-record costs of the 1000-class stores by size; the largest against the next one."""
    in1k = sorted((n for n in measured["stores"] if stores[n]["classes"] == 1000), key=lambda n: stores[n]["records"])
    rows = []
    for name in in1k:
        s, m = stores[name], measured["stores"][name]
        rows.append({"store": name, "rows": s["rows"], "views": s["views"], "records": s["records"],
                     "teacher_bytes_per_record": s["bytes_per_record"]["teacher"],
                     "total_bytes_per_record": s["bytes_per_record"]["total"],
                     "write_us_per_record": 1e6 * s["write"]["s_per_record"],
                     "verify_us_per_record": 1e6 * m["verify"]["after_imports_s_per_record"],
                     "inspect_after_imports_s": m["inspect"]["after_imports_s"]["median"],
                     "serve_rows_per_s": m["serve"]["epoch2_rows_per_s"]["median"],
                     "serve_peak_rss_above_warm_start_mib": m["serve"]["peak_rss_above_warm_start_mib"]["median"]})
    big, ref = rows[-1], rows[-2]
    per_record = ("teacher_bytes_per_record", "total_bytes_per_record", "write_us_per_record", "verify_us_per_record")
    ratios = {key: big[key] / ref[key] if ref[key] > 0 else None for key in per_record}
    ratios["inspect_after_imports_s_per_record"] = (
        (big["inspect_after_imports_s"] / big["records"]) / (ref["inspect_after_imports_s"] / ref["records"]))
    ratios["serve_s_per_row"] = ref["serve_rows_per_s"] / big["serve_rows_per_s"]
    ratios["serve_peak_rss_per_row"] = ((big["serve_peak_rss_above_warm_start_mib"] / big["rows"])
                                        / max(ref["serve_peak_rss_above_warm_start_mib"] / ref["rows"], 1e-12))
    return {"rows": rows, "largest": big["store"], "reference": ref["store"],
            "per_unit_cost_ratio_largest_over_reference": ratios, "tolerance": LINEAR_TOLERANCE,
            "linear_or_better": {key: (r is None or r <= LINEAR_TOLERANCE) for key, r in ratios.items()}}


def extrapolate(stores: dict[str, dict], measured: dict[str, Any]) -> dict[str, Any]:
    """Disk, write-path CPU, verify, preload RAM and stage-one wall time at given rates, per target dataset."""
    big = stores["in1k"]
    probe = stores[PROBE]
    verify_s = measured["stores"]["in1k"]["verify"]["after_imports_s"]["median"]
    verify_per_teacher_byte = verify_s / big["bytes"]["teacher"]
    serve = measured["stores"]["in1k"]["serve"]["epoch2_rows_per_s"]["median"]
    per_row = big["bytes_per_row"]["labels"] + big["bytes_per_row"]["manifest"]
    decoded = get_layout("topk").decoded_bytes_per_row({"k": K, "temperatures": list(TEMPERATURES)})
    targets = {"imagenet-1k x 10 views": (IMAGENET_1K_ROWS, 10, big),
               "imagenet-1k x 100 views": (IMAGENET_1K_ROWS, 100, big),
               "imagenet-21k x 10 views": (IMAGENET_21K_ROWS, 10, probe)}
    out: dict[str, Any] = {
        "basis": {"bytes_per_record_teacher": {"1000": big["bytes_per_record"]["teacher"],
                                               str(IMAGENET_21K_CLASSES): probe["bytes_per_record"]["teacher"]},
                  "bytes_per_record_views": big["bytes_per_record"]["views"], "bytes_per_row": per_row,
                  "write_s_per_record": {"1000": big["write"]["s_per_record"],
                                         str(IMAGENET_21K_CLASSES): probe["write"]["s_per_record"]},
                  "verify_s_per_teacher_byte": verify_per_teacher_byte, "serve_rows_per_s": serve,
                  "decoded_bytes_per_row": decoded, "epoch_order_bytes_per_row": 16,
                  "teach_rates_records_per_s": list(TEACH_RATES),
                  "imagenet_21k_rows": IMAGENET_21K_ROWS, "imagenet_21k_classes": IMAGENET_21K_CLASSES},
        "targets": {},
    }
    for name, (rows, views, basis) in targets.items():
        records = rows * views
        teacher = records * basis["bytes_per_record"]["teacher"]
        disk = teacher + records * big["bytes_per_record"]["views"] + rows * per_row
        out["targets"][name] = {
            "rows": rows, "views": views, "classes": basis["classes"], "records": records,
            "measured": name == "imagenet-1k x 10 views" and big["views"] == 10 and big["rows"] == IMAGENET_1K_ROWS,
            "disk_bytes": disk, "teacher_bytes": teacher,
            "write_path_cpu_s": records * basis["write"]["s_per_record"],
            "verify_s": teacher * verify_per_teacher_byte,
            "preload_ram_bytes": records * decoded,
            "stream_epoch_order_bytes": 16 * rows,
            "stream_epoch_s": rows / serve,
            "teach_wall_h_at": {str(r): records / r / 3600 for r in TEACH_RATES},
        }
    return out


# ---------------------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    st, ms = res["stores"], res["measured"]
    su = ms["cli_startup"]["s"]
    lines = [
        "| store | rows x views | records | teacher B/record | views B/record | labels + manifest B/row "
        "| write_block records/s (blocks min–max) | `inspect` s (after imports) | `verify` s (after imports) "
        "| streamed rows/s (epoch 2) "
        "| serving peak RSS above warm start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in st.items():
        m, w = ms["stores"].get(name), s["write"]
        measured = (f"| {m['inspect']['s']['median']:.2f} ({m['inspect']['after_imports_s']['median']:.2f}) "
                    f"| {m['verify']['s']['median']:.2f} ({m['verify']['after_imports_s']['median']:.2f}) "
                    f"| {m['serve']['epoch2_rows_per_s']['median']:,.0f} "
                    f"| {m['serve']['peak_rss_above_warm_start_mib']['median']:.1f} MiB |") if m else "| | | | |"
        lines.append(
            f"| `{name}` ({s['classes']} classes) | {s['rows']:,} x {s['views']} | {s['records']:,} "
            f"| {s['bytes_per_record']['teacher']:.2f} | {s['bytes_per_record']['views']:.2f} "
            f"| {s['bytes_per_row']['labels'] + s['bytes_per_row']['manifest']:.2f} "
            f"| {w['records_per_s']:,.0f} "
            f"({w['block_records_per_s']['min']:,.0f}–{w['block_records_per_s']['max']:,.0f}) " + measured)
    imp = ms["cli_startup"]["imports_s"]
    lines += ["", f"CLI start-up alone (`kdcache --version`): median {su['median']:.2f} s (min {su['min']:.2f}, "
                  f"max {su['max']:.2f}), of which imports {imp['median']:.2f} s."]
    g = res["growth"]
    lines += ["", f"Per-unit cost, `{g['largest']}` over `{g['reference']}` (<= {g['tolerance']} = linear or better):",
              "", "| cost | ratio | linear or better |", "|---|---:|---|"]
    for key, r in g["per_unit_cost_ratio_largest_over_reference"].items():
        lines.append(f"| {key} | {'-' if r is None else f'{r:.2f}'} | {g['linear_or_better'][key]} |")
    lines += ["", "| target | records | disk | write path (1 core) | verify | preload RAM | stage one at "
              + " / ".join(f"{r:,}" for r in TEACH_RATES) + " records/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in res["extrapolations"]["targets"].items():
        lines.append(f"| {name}{' (measured)' if t['measured'] else ''} | {t['records']:,} "
                     f"| {t['disk_bytes'] / 1e9:.1f} GB | {t['write_path_cpu_s'] / 60:.1f} min "
                     f"| {t['verify_s'] / 60:.1f} min | {t['preload_ram_bytes'] / 1e9:.1f} GB | "
                     + " / ".join(f"{h:.1f} h" for h in t["teach_wall_h_at"].values()) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes (~1 min): a smoke test, not a measurement")
    p.add_argument("--views", type=int, default=None,
                   help="views of the ImageNet-1k store (default 10; fewer are extrapolated to 10 in the JSON)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved inspect/verify/serve repeats (3; quick 1)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kdcache-bench-imagenet"),
                   help="where the temporary stores are written (outside the repo)")
    p.add_argument("--keep", action="store_true", help="keep the stores in --cache-dir")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)  # internal: one serving measurement
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.serve_child:
        print(json.dumps(serve_child(args.serve_child)))
        return {}
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.views:
        cfg["stores"] = [[n, r, args.views if n == "in1k" else v, c] for n, r, v, c in cfg["stores"]]
    cfg["repeats"] = args.repeats or cfg["repeats"]
    t_start = time.perf_counter()
    work = Path(args.cache_dir) / ("quick" if args.quick else "full")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still removes its stores
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "imagenet_scale", "quick": args.quick, "synthetic": SYNTHETIC_NOTE,
                              "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
                              "machine": machine_info(), "settings": cfg}
    stores, paths = {}, {}
    try:
        for name, rows, views, classes in cfg["stores"]:
            paths[name] = work / f"{name}.kdc"
            log(f"write {name}: {rows:,} rows x {views} views, {classes} classes")
            stores[name] = build_store(paths[name], rows, views, classes, cfg["chunk_rows"], cfg["shard_rows"])
            w = stores[name]["write"]
            log(f"  {stores[name]['bytes_per_record']['teacher']:.2f} teacher B/record, write_block "
                f"{w['records_per_s']:,.0f} records/s ({w['write_block_s_total']:.1f} s; generation "
                f"{w['generate_records_s']:.1f} s, creation {w['create_s']:.1f} s)")
        result["stores"] = stores
        log("inspect / verify (CLI, fresh process each) and streamed serving (fresh process each), interleaved")
        result["measured"] = measure(stores, paths, cfg["repeats"], work)
        result["growth"] = growth(stores, result["measured"])
        result["extrapolations"] = extrapolate(stores, result["measured"])
    finally:
        if not args.keep:
            for path in paths.values():
                shutil.rmtree(path, ignore_errors=True)
            (work / "hwm.txt").unlink(missing_ok=True)
    return finish(result, args.out, markdown, t_start, log)


if __name__ == "__main__":
    main()
