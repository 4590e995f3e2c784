"""Stage-two benchmark: student steps from the cache vs hard labels vs a live teacher; soft-label serving.

Ratios are measured side by side in one run (interleaved repeats, medians): these machines are noisy.

    .venv/bin/python benchmarks/train.py --out benchmarks/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.soft_labels import SoftLabels  # noqa: E402
from kdcache.stores.logit_store import LogitStore  # noqa: E402
from kdcache.teach import TeachConfig, run_teach  # noqa: E402
from kdcache.train import TrainConfig, run_train  # noqa: E402


def student_throughput(args, work: Path) -> dict:
    """rows/s of the same student step with ce (no soft labels), kd from the cache, kd with a live teacher."""
    store = work / "bench.kdc"
    k = int(args.k) if args.k.isdigit() else args.k  # "all", "auto", "sampled:S" stay strings
    run_teach(TeachConfig(dataset=args.dataset, teachers=[args.teacher], out=str(store), k=k, views=2,
                          view_policy="crop-flip", device=args.device, overwrite=True, image_size=args.image_size))
    runs = {"ce": dict(loss="ce"), "kd_cache": dict(loss="kd"),
            "kd_online": dict(loss="kd", online_teacher=args.teacher)}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.repeats):
        for name, kw in runs.items():
            cfg = TrainConfig(source=str(store), student=args.student, out=str(work / f"{name}-{rep}"), epochs=1,
                              batch_size=args.batch_size, max_steps_per_epoch=args.steps, device=args.device,
                              seed=rep, **kw)
            rates[name].append(run_train(cfg)[-1]["rows_per_s"])
    med = {name: statistics.median(v) for name, v in rates.items()}
    pairs = [c / h for c, h in zip(rates["kd_cache"], rates["ce"], strict=True)]
    online = [c / o for c, o in zip(rates["kd_cache"], rates["kd_online"], strict=True)]
    return {
        "rows_per_s": rates,
        "median_rows_per_s": med,
        "cache_over_hard_label_per_repeat": pairs,
        "cache_over_hard_label": statistics.median(pairs),
        "cache_speedup_over_online_per_repeat": online,
        "cache_speedup_over_online": statistics.median(online),
        "target_cache_over_hard_label": 0.95,
    }


def serving(args, work: Path) -> dict:
    """Soft-label rows/s from RAM and streamed (chunk-shuffled) on one core, from a synthetic store."""
    torch.set_num_threads(1)
    n, c, k = args.serve_rows, 100, 10
    rng = np.random.default_rng(0)
    labels = rng.integers(0, c, n).astype(np.int32)
    store = LogitStore.create(work / "serve.kdc", labels=labels, views={}, attrs={}, num_views=1,
                              manifest={"dataset_index": np.arange(n), "sample_id": [str(i) for i in range(n)],
                                        "label": labels}, chunk_rows=8192, shard_rows=65536)
    store.add_teacher("t", num_classes=c, k=k, temperatures=(1.0, 4.0))
    for s in range(store.num_shards):
        a, b = store.shard_bounds(s)
        z = np.sort(rng.normal(size=(b - a, k)).astype(np.float32), axis=1)[:, ::-1]
        store.write_block("t", 0, s, {"values": z, "indices": rng.integers(0, c, (b - a, k)),
                                      "label_logit": z[:, 0], "tail": rng.normal(size=(b - a, 2))})
    out = {}
    for mode in ("yes", "no"):
        rates = []
        for rep in range(args.repeats):
            soft = SoftLabels(LogitStore.open(work / "serve.kdc"), "t", preload=mode, seed=rep)
            order = soft.order(epoch=1)
            t0 = time.perf_counter()
            rows = sum(len(batch["values"]) for batch in soft.batches(order, 256))
            rates.append(rows / (time.perf_counter() - t0))
        out["ram" if mode == "yes" else "streamed"] = {"rows_per_s": rates, "median": statistics.median(rates)}
    out["targets"] = {"ram": 1_000_000, "streamed": 200_000}
    out["rows"], out["classes"], out["k"] = n, c, k
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/train.json")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--teacher", default="torchvision:resnet18:none")
    p.add_argument("--student", default="small_cnn")
    p.add_argument("--k", default="all")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serve-rows", type=int, default=262_144)
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the dataset's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the student runs: on a shared 2-core box a 2-thread process stalls "
                        "whenever a neighbour holds a core, so 1 gives ratios that measure kdcache")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "settings": vars(args),
            "student_steps": student_throughput(args, work),
            "serving": serving(args, work),
        }
    Path(args.out).write_text(json.dumps(result, indent=2))
    s, v = result["student_steps"], result["serving"]
    print(f"cache / hard-label step throughput: {s['cache_over_hard_label']:.3f} (target >= 0.95)")
    print(f"cache speed-up over live teacher:   {s['cache_speedup_over_online']:.2f}x")
    print(f"serving: RAM {v['ram']['median']:,.0f} rows/s, streamed {v['streamed']['median']:,.0f} rows/s (one core)")


if __name__ == "__main__":
    main()
