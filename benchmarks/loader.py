"""Loader benchmark: soft-label serving against a dense float16 memmap, its growth with the store's size,
and a stage-two image epoch (``kdcache.CachedLoader``) against a plain torchvision ImageFolder DataLoader.

1. **Serving vs memmap.** One synthetic store (1000 classes, top-10 + tail at T = 1, 4, float16) and
   the dense float16 logits it was made from in an ``np.memmap``. Each repeat serves one epoch's
   order (same rows, same order, batches of 256 as torch tensors) from the stream
   (``SoftLabels(preload="no")``), from the memmap and from RAM (``preload="yes"``), interleaved;
   the ratio is per repeat (stream rows/s / memmap rows/s of the same order), then median and range.
2. **Growth.** Streamed rows/s and peak RSS above imports (VmHWM minus the RSS right after
   the imports, fresh subprocess per size) at 10k, 100k and 1M rows, two epochs each.
3. **Checks.** What the checked reads cost (``LogitStore.read_block(checked=True)``: every block done and
   matching its crc32, checked whole on first touch): on the largest growth store, one streamed epoch with
   checks against one without, each from a fresh store instance (the first epoch pays for the checks),
   then a second epoch on the same instances (blocks already checked), interleaved; ratio per repeat.
4. **Image epoch.** A JPEG ImageFolder drawn with PIL (made once in the cache dir), cached by
   ``kdcache teach`` (tiny_cnn, rrc-flip, 2 views, 112 px), then epochs 1 (construction included)
   and 2 of ``CachedLoader`` against ImageFolder + RandomResizedCrop(112) + flip + normalise in a
   ``DataLoader`` (same batch, workers, shuffle, persistent workers), interleaved, workers 1 and 2.

    .venv/bin/python benchmarks/loader.py --out benchmarks/loader.json          # ~2.5 min on 2 CPU cores
    .venv/bin/python benchmarks/loader.py --quick --out /tmp/loader-quick.json  # toy sizes, < 60 s
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import finish, machine_info  # benchmarks/machine.py

from kdcache.soft_labels import SoftLabels
from kdcache.sparse import SparseLogits
from kdcache.stores.logit_store import LogitStore

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"stream_over_memmap": 1.0, "preload_rows_per_s": 2_000_000, "image_epoch_ratio": 0.95,
           "checked_over_unchecked": 0.9}
TEMPERATURES = (1.0, 4.0)
FULL = {"serve_rows": 50_000, "growth_rows": [10_000, 100_000, 1_000_000], "repeats": 11, "chunk_rows": 8192,
        "images": 3000, "image_workers": [1, 2], "image_repeats": 3, "checks_repeats": 15}
QUICK = {"serve_rows": 6_000, "growth_rows": [2_000, 8_000], "repeats": 2, "chunk_rows": 1024,
         "images": 300, "image_workers": [1], "image_repeats": 1, "checks_repeats": 2}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)




def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_repeat": values}


# ---------------------------------------------------------------------------------------- stores


def teacher_like_logits(rng: np.random.Generator, labels: np.ndarray, classes: int) -> np.ndarray:
    """(rows, classes) float32: a confident label logit, a few close rivals and a noisy tail."""
    z = rng.standard_normal((len(labels), classes), dtype=np.float32)
    rows = np.arange(len(labels))
    z[rows, labels] += rng.uniform(2.0, 8.0, len(labels)).astype(np.float32)
    rivals = rng.integers(0, classes, (len(labels), 3))
    z[rows[:, None], rivals] += rng.uniform(0.5, 3.0, rivals.shape).astype(np.float32)
    return z


def synthetic_store(path: Path, rows: int, classes: int, k: int, chunk_rows: int, memmap: Path | None = None,
                    seed: int = 0) -> LogitStore:
    """A one-view store written as stage one writes it (records from SparseLogits.from_dense, one
    write_block per shard), reused when a complete one is already at ``path``; ``memmap`` also keeps
    the dense float16 logits the records came from."""
    if path.exists() and (memmap is None or memmap.exists()):
        store = LogitStore.open(path)
        if store.num_rows == rows and store.chunk_rows == min(chunk_rows, rows) and store.done("t").all():
            return store
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows).astype(np.int32)
    manifest = {"dataset_index": np.arange(rows), "sample_id": [str(i) for i in range(rows)], "label": labels}
    store = LogitStore.create(path, labels=labels, views={}, attrs={}, manifest=manifest, num_views=1,
                              chunk_rows=chunk_rows, shard_rows=8 * chunk_rows, overwrite=True)
    store.add_teacher("t", num_classes=classes, k=k, temperatures=TEMPERATURES)
    dense = np.lib.format.open_memmap(memmap, "w+", np.float16, (rows, classes)) if memmap else None
    for shard in range(store.num_shards):
        a, b = store.shard_bounds(shard)
        z = teacher_like_logits(rng, labels[a:b], classes)
        if dense is not None:
            dense[a:b] = z
        rec = SparseLogits.from_dense(torch.from_numpy(z), torch.from_numpy(labels[a:b]).long(), k, TEMPERATURES)
        store.write_block("t", 0, shard, {"values": rec.values.numpy(), "indices": rec.indices.numpy(),
                                          "label_logit": rec.label_logit.numpy(), "tail": rec.tail_lse.numpy()})
    if dense is not None:
        dense.flush()
    return store


# ---------------------------------------------------------------------------------------- serving


def serve_soft(soft: SoftLabels, order, batch_size: int) -> tuple[float, int]:
    """Seconds and rows to serve the order's batches as torch tensors."""
    t0, rows = time.perf_counter(), 0
    for batch in soft.batches(order, batch_size):
        tensors = {key: torch.from_numpy(arr) for key, arr in batch.items()}
        rows += len(tensors["values"])
    return time.perf_counter() - t0, rows


def serve_memmap(dense: np.ndarray, rows: np.ndarray, batch_size: int) -> tuple[float, int]:
    """The baseline: the same rows in the same batches from a dense float16 memmap, as torch tensors."""
    t0, served = time.perf_counter(), 0
    for a in range(0, len(rows) - batch_size + 1, batch_size):
        served += len(torch.from_numpy(dense[rows[a : a + batch_size]]))
    return time.perf_counter() - t0, served


def serving(cfg: dict, work: Path, batch_size: int) -> dict[str, Any]:
    n, classes, k = cfg["serve_rows"], 1000, 10
    path, mm_path = work / f"serve-{n}.kdc", work / f"serve-{n}-dense.npy"
    store = synthetic_store(path, n, classes, k, cfg["chunk_rows"], memmap=mm_path)
    dense = np.load(mm_path, mmap_mode="r")
    stream = SoftLabels(store, "t", preload="no")
    ram = SoftLabels(store, "t", preload="yes")
    serve_soft(stream, stream.order(1), batch_size)  # warm-up: page cache, imports, first reader thread
    serve_memmap(dense, stream.order(1).rows, batch_size)
    serve_soft(ram, ram.order(1), batch_size)
    rates: dict[str, list[float]] = {"stream": [], "memmap": [], "preload": []}
    for rep in range(cfg["repeats"]):
        order = stream.order(rep + 2)
        runs = {"stream": lambda o=order: serve_soft(stream, o, batch_size),
                "memmap": lambda o=order: serve_memmap(dense, o.rows, batch_size),
                "preload": lambda e=rep + 2: serve_soft(ram, ram.order(e), batch_size)}
        names = list(runs) if rep % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for name in names:
            seconds, rows = runs[name]()
            rates[name].append(rows / seconds)
        log(f"  serve repeat {rep}: " + ", ".join(f"{m} {rates[m][-1]:,.0f}" for m in runs) + " rows/s")
    ratio = [s / m for s, m in zip(rates["stream"], rates["memmap"], strict=True)]
    log("  preloaded gather: arr[views, rows] vs arr[v][rows_of_v] vs np.take on flat (view, row) indices")
    return {
        "preload_gather": preload_gather(store, batch_size, cfg["repeats"]),
        "rows": n, "classes": classes, "k": k, "batch_size": batch_size, "chunk_rows": store.chunk_rows,
        "buffer_chunks": stream.buffer_chunks, "repeats": cfg["repeats"],
        "bytes_on_disk": {"store_teacher": sum(v for p, v in store.nbytes_stored().items() if p.startswith("teachers")),
                          "memmap": mm_path.stat().st_size},
        "rows_per_s": {name: spread(v) for name, v in rates.items()},
        "stream_over_memmap": spread(ratio),
    }


def preload_gather(store: LogitStore, batch_size: int, repeats: int, views: int = 4) -> dict[str, Any]:
    """How a preloaded batch is best gathered: rows/s of three ways over the same batches, for one view
    per epoch (``cycle``) and a random view per row, with the store's view tiled ``views`` times."""
    one = store.read_view("t", 0)
    n = store.num_rows
    stacked = {key: np.stack([arr] * views) for key, arr in one.items()}  # (views, rows, ...)
    flat = {key: arr.reshape(views * n, *arr.shape[2:]) for key, arr in stacked.items()}
    rng = np.random.default_rng(0)
    rows = rng.permutation(n)
    ways = {
        "arr[views, rows]": lambda v, r: {key: arr[v, r] for key, arr in stacked.items()},
        "arr[v][rows_of_v]": lambda v, r: {key: _per_view(arr, v, r) for key, arr in stacked.items()},
        "np.take(flat, v * N + r)": lambda v, r: {key: np.take(arr, v * n + r, axis=0) for key, arr in flat.items()},
    }
    out: dict[str, Any] = {"views": views, "rows": n, "batch_size": batch_size}
    for schedule, view_of_row in (("cycle", np.full(n, 1)), ("random", rng.integers(0, views, n))):
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, gather in ways.items():
                t0 = time.perf_counter()
                for a in range(0, n - batch_size + 1, batch_size):
                    gather(view_of_row[a : a + batch_size], rows[a : a + batch_size])
                rates[name].append((n - n % batch_size) / (time.perf_counter() - t0))
        out[schedule] = {name: spread(v) for name, v in rates.items()}
    return out


def _per_view(arr: np.ndarray, views: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """arr[v][rows of view v] for each view in the batch, written back in batch order."""
    first = views[0]
    if (views == first).all():
        return arr[first][rows]
    out = np.empty((len(rows), *arr.shape[2:]), dtype=arr.dtype)
    for v in np.unique(views):
        mask = views == v
        out[mask] = arr[v][rows[mask]]
    return out


# ---------------------------------------------------------------------------------------- growth


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process image's peak RSS (VmHWM). ``getrusage().ru_maxrss`` is kept too, but Linux carries
    the forking parent's peak into it across fork + exec, so a child of a big parent starts there."""
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) * 1024


def growth_child(path: str, batch_size: int, epochs: int) -> dict[str, Any]:
    """Run in a fresh process: stream ``epochs`` epochs of a store; rows/s and peak RSS (VmHWM) above imports.

    Also above a warm start (the store opened and one row read and wrapped as a tensor), which leaves
    out code pages of zarr's codecs that the first read faults in, whatever the store's size."""
    after_imports = rss_bytes()
    store = LogitStore.open(path)
    torch.from_numpy(store.read_block("t", 0, 0, 1)["values"])
    warm = rss_bytes()
    soft = SoftLabels(store, "t", preload="no")
    rates, order_s = [], []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = soft.order(epoch)
        order_s.append(time.perf_counter() - t0)
        seconds, rows = serve_soft(soft, order, batch_size)
        rates.append(rows / seconds)
    peak, mib = peak_rss_bytes(), 2**20
    return {"rows": store.num_rows, "rows_per_s": rates, "order_s": order_s,
            "rss_after_imports_mib": after_imports / mib, "peak_rss_above_imports_mib": (peak - after_imports) / mib,
            "peak_rss_above_warm_start_mib": max(0, peak - warm) / mib,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def growth(cfg: dict, work: Path, batch_size: int) -> list[dict[str, Any]]:
    out = []
    for n in cfg["growth_rows"]:
        path = work / f"growth-{n}.kdc"
        t0 = time.perf_counter()
        synthetic_store(path, n, 1000, 10, cfg["chunk_rows"], seed=1)
        built = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--growth-child", str(path), "--batch-size", str(batch_size)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        row = {**json.loads(res.stdout.strip().splitlines()[-1]), "store_build_s": built}
        out.append(row)
        log(f"  growth {n:>9,} rows: {statistics.median(row['rows_per_s']):,.0f} rows/s, peak RSS above imports "
            f"{row['peak_rss_above_imports_mib']:.1f} MiB")
    return out


# ---------------------------------------------------------------------------------------- checks


def checks(cfg: dict, work: Path, batch_size: int) -> dict[str, Any]:
    """Streamed rows/s with and without the checks, first epoch (fresh instance) and second, interleaved.

    Rows per wall second and per CPU second of the process (both threads): on a shared machine the CPU
    rate is the steadier one. The best (least disturbed) repeat of each is kept next to the medians."""
    n = cfg["growth_rows"][-1]
    path = work / f"growth-{n}.kdc"  # built by growth()
    runs = [(ep, clock, how) for ep in ("first", "second") for clock in ("wall", "cpu")
            for how in ("checked", "unchecked")]
    rates: dict[tuple[str, str, str], list[float]] = {run: [] for run in runs}
    for rep in range(cfg["checks_repeats"]):
        for checked in ([True, False] if rep % 2 == 0 else [False, True]):  # alternate who goes first
            soft = SoftLabels(LogitStore.open(path), "t", preload="no", checked=checked)
            how = "checked" if checked else "unchecked"
            for ep, epoch in (("first", 1), ("second", 2)):
                cpu = time.process_time()
                seconds, rows = serve_soft(soft, soft.order(epoch), batch_size)
                rates[ep, "wall", how].append(rows / seconds)
                rates[ep, "cpu", how].append(rows / max(time.process_time() - cpu, 1e-9))
        log(f"  checks repeat {rep}: " + ", ".join(
            f"{ep} epoch cpu rows/s checked {rates[ep, 'cpu', 'checked'][-1]:,.0f} unchecked "
            f"{rates[ep, 'cpu', 'unchecked'][-1]:,.0f}" for ep in ("first", "second")))
    store = LogitStore.open(path)
    out: dict[str, Any] = {"rows": n, "shards": store.num_shards, "shard_rows": store.shard_rows,
                           "chunk_rows": store.chunk_rows, "repeats": cfg["checks_repeats"]}
    for ep in ("first", "second"):
        out[f"{ep}_epoch"] = {}
        for clock in ("wall", "cpu"):
            c, u = rates[ep, clock, "checked"], rates[ep, clock, "unchecked"]
            out[f"{ep}_epoch"][clock] = {
                "rows_per_s": {"checked": spread(c), "unchecked": spread(u)},
                "checked_over_unchecked": spread([a / b for a, b in zip(c, u, strict=True)]),
                "best_over_best": max(c) / max(u)}
    return out


# ---------------------------------------------------------------------------------------- images


def make_image_folder(root: Path, count: int, classes: int = 10, size: tuple[int, int] = (160, 120)) -> Path:
    """``count`` JPEGs of random shapes and colours in ``classes`` folders (made once; reused)."""
    from PIL import Image, ImageDraw

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(count):
        cls = i % classes
        img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(0, size[0] - 10)), int(rng.integers(0, size[1] - 10))
            box = [x0, y0, x0 + int(rng.integers(10, 80)), y0 + int(rng.integers(10, 60))]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if (cls + int(rng.integers(3))) % 2 else draw.rectangle)(box, fill=colour)
        folder = root / f"class{cls:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    done.write_text(str(count))
    return root


def plain_loader(folder: Path, batch_size: int, workers: int):
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResizedCrop(112), v2.RandomHorizontalFlip(), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def time_epochs(make, set_epoch) -> tuple[float, float, int]:
    """Seconds of epoch 1 (construction included) and of epoch 2, and the rows of one epoch."""
    t0 = time.perf_counter()
    loader = make()
    rows = 0
    for epoch in (1, 2):
        set_epoch(loader, epoch)
        for batch in loader:
            rows += len(batch[1]) if epoch == 1 else 0
        if epoch == 1:
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
    second = time.perf_counter() - t0
    del loader
    return first, second, rows


def images(cfg: dict, cache: Path, batch_size: int) -> dict[str, Any]:
    import kdcache

    if not hasattr(kdcache, "CachedLoader"):
        return {"skipped": "kdcache.CachedLoader is not defined"}
    torch.set_num_threads(1)
    folder = make_image_folder(cache / f"imagefolder-{cfg['images']}", cfg["images"])
    store = cache / f"images-{cfg['images']}.kdc"
    t0 = time.perf_counter()  # a finished store: the same command resumes it, i.e. does nothing
    subprocess.run([sys.executable, "-m", "kdcache.cli", "teach", f"imagefolder:{folder}", "--teacher",
                        "kdcache.models:tiny_cnn", "--view-policy", "rrc-flip", "--image-size", "112", "--views", "2",
                    "--out", str(store)], check=True, cwd=ROOT, capture_output=True)
    log(f"  teach (or resume) {cfg['images']} images x 2 views: {time.perf_counter() - t0:.1f} s")

    def cached(workers):
        return lambda: kdcache.CachedLoader(str(store), batch_size=batch_size, workers=workers, seed=0)

    def plain(workers):
        return lambda: plain_loader(folder, batch_size, workers)

    def cached_epoch(loader, epoch):
        loader.set_epoch(epoch)

    def plain_epoch(loader, epoch):
        pass

    out: dict[str, Any] = {"images": cfg["images"], "image_size": [160, 120], "input_size": 112,
                           "batch_size": batch_size, "repeats": cfg["image_repeats"], "by_workers": {}}
    for workers in cfg["image_workers"]:
        seconds: dict[str, list[tuple[float, float, int]]] = {"plain": [], "kdcache": []}
        for rep in range(cfg["image_repeats"]):
            runs = {"plain": (plain(workers), plain_epoch), "kdcache": (cached(workers), cached_epoch)}
            for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
                seconds[name].append(time_epochs(*runs[name]))
        rates = {name: {"epoch1_with_startup": [r / a for a, _, r in v], "epoch2": [r / b for _, b, r in v]}
                 for name, v in seconds.items()}
        ratios = {ep: spread([c / p for c, p in zip(rates["kdcache"][ep], rates["plain"][ep], strict=True)])
                  for ep in ("epoch1_with_startup", "epoch2")}
        out["by_workers"][str(workers)] = {
            "rows_per_s": {name: {ep: spread(v) for ep, v in r.items()} for name, r in rates.items()},
            "kdcache_over_plain": ratios,
        }
        log(f"  images, {workers} worker(s): kdcache/plain epoch 1 (start-up included) "
            f"{ratios['epoch1_with_startup']['median']:.2f}, epoch 2 {ratios['epoch2']['median']:.2f}")
    return out


# ---------------------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    s = res["serving"]
    r = s["rows_per_s"]
    lines = [
        f"Serving ({s['rows']:,} rows, {s['classes']} classes, top-{s['k']}, batch {s['batch_size']}, "
        f"{s['repeats']} interleaved repeats):",
        "",
        "| reader | median rows/s | min–max |",
        "|---|---:|---:|",
        *(f"| {name} | {r[name]['median']:,.0f} | {r[name]['min']:,.0f}–{r[name]['max']:,.0f} |"
          for name in ("stream", "memmap", "preload")),
        "",
        f"stream / memmap: median {s['stream_over_memmap']['median']:.2f} "
        f"(min {s['stream_over_memmap']['min']:.2f}, max {s['stream_over_memmap']['max']:.2f})",
        "",
        "| preloaded gather | cycle rows/s | random views rows/s |",
        "|---|---:|---:|",
        *(f"| `{name}` | {s['preload_gather']['cycle'][name]['median']:,.0f} | "
          f"{s['preload_gather']['random'][name]['median']:,.0f} |" for name in s["preload_gather"]["cycle"]),
        "",
        f"| checks ({res['checks']['rows']:,} rows, {res['checks']['shards']} shards) | clock | checked rows/s "
        "| unchecked rows/s | checked / unchecked: median (min–max) | best / best |",
        "|---|---|---:|---:|---:|---:|",
        *(f"| {ep} epoch | {clock} | {c['rows_per_s']['checked']['median']:,.0f} | "
          f"{c['rows_per_s']['unchecked']['median']:,.0f} | {c['checked_over_unchecked']['median']:.2f} "
          f"({c['checked_over_unchecked']['min']:.2f}–{c['checked_over_unchecked']['max']:.2f}) | "
          f"{c['best_over_best']:.2f} |"
          for ep in ("first", "second") for clock in ("wall", "cpu")
          for c in [res["checks"][f"{ep}_epoch"][clock]]),
        "",
        "| rows | streamed rows/s (epoch 1, 2) | peak RSS above imports | above a warm start |",
        "|---:|---:|---:|---:|",
        *(f"| {g['rows']:,} | {g['rows_per_s'][0]:,.0f}, {g['rows_per_s'][1]:,.0f} | "
          f"{g['peak_rss_above_imports_mib']:.1f} MiB | {g['peak_rss_above_warm_start_mib']:.1f} MiB |"
          for g in res["growth"]),
    ]
    img = res.get("images", {})
    if "by_workers" in img:
        lines += ["", "| workers | epoch | plain rows/s | kdcache rows/s | kdcache / plain (min–max) |",
                  "|---:|---|---:|---:|---:|"]
        for w, v in img["by_workers"].items():
            for ep in ("epoch1_with_startup", "epoch2"):
                q = v["kdcache_over_plain"][ep]
                lines.append(f"| {w} | {ep} | {v['rows_per_s']['plain'][ep]['median']:,.0f} | "
                             f"{v['rows_per_s']['kdcache'][ep]['median']:,.0f} | {q['median']:.2f} "
                             f"({q['min']:.2f}–{q['max']:.2f}) |")
    elif img:
        lines += ["", f"images: {img.get('skipped')}"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes (< 60 s): a smoke test, not a measurement")
    p.add_argument("--repeats", type=int, default=None, help="interleaved serving repeats (default 11; quick 2)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-images", action="store_true", help="skip the image-epoch part")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kdcache-bench-loader"),
                   help="where the ImageFolder and the synthetic stores are kept between runs")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--growth-child", default=None, help=argparse.SUPPRESS)  # internal: one growth measurement
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.growth_child:
        print(json.dumps(growth_child(args.growth_child, args.batch_size, epochs=2)))
        return {}
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg["repeats"] = args.repeats
    t_start = time.perf_counter()
    cache = Path(args.cache_dir) / ("quick" if args.quick else "full")
    cache.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "loader", "quick": args.quick, "machine": machine_info(),
                              "settings": cfg, "targets": TARGETS}
    log("serving: stream vs memmap vs preload (interleaved)")
    result["serving"] = serving(cfg, cache, args.batch_size)
    log("growth: streamed serving by store size (fresh process each)")
    result["growth"] = growth(cfg, cache, args.batch_size)
    log("checks: streamed serving with and without the block checks (interleaved)")
    result["checks"] = checks(cfg, cache, args.batch_size)
    if not args.no_images:
        log("images: CachedLoader vs torchvision ImageFolder DataLoader (interleaved)")
        result["images"] = images(cfg, cache, args.batch_size)
    return finish(result, args.out, markdown, t_start, log)


if __name__ == "__main__":
    main()
