"""Record fidelity benchmark (docs/architecture.md): bytes per record vs error, on a trained 100-class teacher.

1. Train a teacher: ``small_cnn`` (kdcache.models) on the ``mnist-pairs`` train split (40 000 pairs,
   100 classes), Adam, plain torch loop, seeded; report its top-1 on the 5 000-pair test split.
2. Cache the test split with ``kdcache teach`` (``kdcache.teach.run_teach``, so real ``LogitStore``
   stores on disk) once per record type: top-k (k = 1, 5, 10, 20, 50; tail logsumexp at T = 1 and 4),
   dense float16, dense uint8 (per-row scale), sampled (S = 8, 16, 32 drawn at T_q = 4, and S = 16 at
   T_q = 1), and ``--k auto --max-kl 1e-3`` with temperatures 1,4 and with 1 only (then T = 4 is read
   from the tail's T = 1 mass, as a loss at an undeclared temperature would).
3. For each store: bytes per record on disk (every file of the teacher's group: arrays, checksums,
   done flags, metadata; divided by rows x views) and the error of what stage two reads back:
   mean KL(p_T || record_T) at T = 1 and 4 against the dense float64 teacher (float32 forward,
   promoted), and the KD gradient error ||(sum r) p - r||^2 (``kdcache.fidelity.gradient_error``),
   the only finite metric for sampled records (their KL is infinite: p̂ = 0 off the sample).
4. Students (``--students``, on by default; ``--no-students`` skips): cache a training set
   (``mnist-pairs?n=10000`` train split, identity view) with the same teacher through ``run_teach``
   once per record (top-5/10/20/50 + tail at T = 1, 4; dense float16; dense uint8; sampled S = 8/16/32
   at T_q = 4), then train ``tiny_cnn`` from each store with ``run_train`` (Hinton KD at T = 4,
   w_ce 0.1, w_kd 0.9; SGD lr 0.05 momentum 0.9 wd 5e-4, cosine, batch 128, 8 epochs), plus the
   live-teacher baseline (``online_teacher``: the same teacher on the same replayed views, dense,
   in the float16 store's order) and a no-teacher reference (CE only). Seeds 0, 1, 2 are paired: a
   seed fixes the student's init and the epoch order, the same for every record. Each run is one
   thread in one of ``--student-jobs`` processes. Reported: final top-1 on the test split of the
   same spec (``run_train`` evaluates there: 10 000 pairs of held-out digits, whose first 5 000 are
   the default test split) per record (mean ± std over seeds) and the paired difference to the
   online baseline (mean ± std, and whether the 95 % t interval excludes 0). The 10 000 training
   pairs are the first 10 000 of the teacher's 40 000. Flags: ``--no-students``,
   ``--student-epochs``, ``--student-rows``, ``--student-seeds``, ``--student-jobs``.

    .venv/bin/python benchmarks/fidelity.py --out benchmarks/fidelity.json     # ~7-10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import student_run  # noqa: E402 (benchmarks/machine.py)

from kdcache.data import load_dataset  # noqa: E402
from kdcache.fidelity import gradient_error  # noqa: E402
from kdcache.models import build_model  # noqa: E402
from kdcache.replay import ViewedRows  # noqa: E402
from kdcache.sampled import SampledLogits  # noqa: E402
from kdcache.sparse import SparseLogits, kl_to_dense  # noqa: E402
from kdcache.stores.logit_store import LogitStore  # noqa: E402
from kdcache.teach import TeachConfig, run_teach  # noqa: E402
from kdcache.train import TrainConfig  # noqa: E402
from kdcache.views import get_view_policy  # noqa: E402

TEMPS = (1.0, 4.0)
ARCH = "small_cnn"

RECORDS: list[tuple[str, dict[str, Any]]] = [
    *[(f"top-{k} + tail (T=1,4)", {"k": k}) for k in (1, 5, 10, 20, 50)],
    ("dense float16", {"k": "all"}),
    ("dense uint8 (per-row scale)", {"k": "all", "encoding": "uint8"}),
    *[(f"sampled S={s} (T_q=4)", {"k": f"sampled:{s}"}) for s in (8, 16, 32)],
    ("sampled S=16 (T_q=1)", {"k": "sampled:16", "proposal_temperature": 1.0}),
    ("auto, --max-kl 1e-3", {"k": "auto", "max_kl": 1e-3}),
    ("auto, --max-kl 1e-3, --temperatures 1", {"k": "auto", "max_kl": 1e-3, "temperatures": (1.0,)}),
]

# stage two: the records students are trained from, the live-teacher baseline and a no-teacher reference
STUDENT_RECORDS: list[tuple[str, dict[str, Any]]] = [
    *[(f"top-{k} + tail (T=1,4)", {"k": k}) for k in (5, 10, 20, 50)],
    ("dense float16", {"k": "all"}),
    ("dense uint8 (per-row scale)", {"k": "all", "encoding": "uint8"}),
    *[(f"sampled S={s} (T_q=4)", {"k": f"sampled:{s}"}) for s in (8, 16, 32)],
]
ONLINE = "online teacher (live, dense)"
NO_TEACHER = "no teacher (CE only)"
ONLINE_STORE = "dense float16"  # the online baseline replays this store's views and order (k = C: exact)
STUDENT = "tiny_cnn"
KD_ARGS = {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9}


def images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a split as stage one feeds them (identity view, normalised), float32 (N, 3, H, W)."""
    ds = load_dataset("mnist-pairs", split)
    policy = get_view_policy("identity")
    rows = ViewedRows(ds, policy, policy.sample(1, len(ds)), np.arange(len(ds)), tuple(ds.image_size))
    x = torch.stack([rows[(0, i)][0] for i in range(len(ds))])
    return x, torch.as_tensor(ds.labels, dtype=torch.long)


def train_teacher(epochs: int, seed: int, batch_size: int = 128, lr: float = 1e-3) -> tuple[torch.nn.Module, dict]:
    x, y = images("train")
    torch.manual_seed(seed)
    model = build_model(ARCH, 100, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), {"train_rows": len(x), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                          "train_seconds": time.perf_counter() - t0}


@torch.inference_mode()
def dense_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[a : a + 1000]).float() for a in range(0, len(x), 1000)])


def read_record(store: LogitStore, name: str, labels: torch.Tensor) -> SparseLogits | SampledLogits:
    a = store.teacher_attrs(name)
    blk = store.read_view(name, 0)
    temps = tuple(a["temperatures"])
    if a["layout"] == "sampled":
        return SampledLogits.from_arrays(blk, labels, a)
    if a["layout"] == "dense":
        return SparseLogits.from_dense(torch.from_numpy(blk["values"]), labels, a["num_classes"], temps)
    return SparseLogits(torch.from_numpy(blk["values"]), torch.from_numpy(blk["indices"]),
                        torch.from_numpy(blk["label_logit"]), labels, torch.from_numpy(blk["tail"]), temps,
                        a["num_classes"])


def measure(label: str, opts: dict[str, Any], spec: str, work: Path, z_dataset: torch.Tensor, seed: int) -> dict:
    out = work / f"store{len(list(work.iterdir()))}.kdc"
    cfg = TeachConfig(**{"dataset": "mnist-pairs", "teachers": [spec], "out": str(out), "split": "test",
                         "temperatures": TEMPS, "device": "cpu", "batch_size": 500, "seed": seed, "workers": 0,
                         **opts})
    t0 = time.perf_counter()
    store = run_teach(cfg)
    seconds = time.perf_counter() - t0
    name = store.teachers[0]
    a = store.teacher_attrs(name)
    records = store.num_rows * store.num_views
    sizes = store.nbytes_stored()
    prefix = f"teachers/{name}/"
    on_disk = sum(b for p, b in sizes.items() if p.startswith(prefix))
    payload = sum(b for p, b in sizes.items() if p.startswith(prefix) and p.split("/")[-1] in
                  ("values", "indices", "counts", "label_logit", "tail", "value_offset", "value_scale"))
    # rows are stored in a seeded permutation: the dense reference in store order
    order = torch.from_numpy(store.manifest_column("dataset_index").copy()).long()
    z = z_dataset[order].double()
    labels = torch.from_numpy(store.labels()).long()
    rec = read_record(store, name, labels)
    row: dict[str, Any] = {
        "record": label, "options": opts, "layout": a["layout"], "k": a["k"], "encoding": a["encoding"],
        "bytes_per_record": on_disk / records, "payload_bytes_per_record": payload / records,
        "teach_seconds": seconds,
    }
    for t in TEMPS:
        # JSON null = infinite: a sampled record gives p̂ = 0 to classes it did not draw
        row[f"kl_T{t:g}"] = None if isinstance(rec, SampledLogits) else kl_to_dense(z, rec, t).mean().item()
        row[f"grad_sq_error_T{t:g}"] = gradient_error(z, rec, t).mean().item()
    if isinstance(rec, SampledLogits):
        row["mean_distinct_classes"] = rec.num_unique().double().mean().item()
    if a.get("fidelity"):
        row["auto"] = {key: a["fidelity"][key] for key in ("k", "max_kl", "sample_rows", "kl_by_temperature")}
    shutil.rmtree(out, ignore_errors=True)
    return row


def mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def paired(diffs: list[float]) -> dict[str, Any]:
    """Mean ± std of per-seed differences, and whether the two-sided 95 % t interval excludes 0
    (JSON null / False with a single seed)."""
    out: dict[str, Any] = mean_std(diffs)
    n = len(diffs)
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * out["std"] / np.sqrt(n) if n > 1 else None
    out.update({"ci95_half_width": half, "resolved": half is not None and bool(abs(out["mean"]) > half)})
    return out


def train_students(spec: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Stage one on a training set once per record, then paired-seed students from each store and online.

    The runs go to ``--student-jobs`` single-threaded worker processes, online ones (the slowest) first."""
    dataset = f"mnist-pairs?n={args.student_rows}"
    seeds = [int(s) for s in args.student_seeds.split(",")]
    train_args = {"student": STUDENT, "loss": "kd", "loss_args": dict(KD_ARGS), "epochs": args.student_epochs,
                  "batch_size": 128, "lr": 0.05, "schedule": "cosine", "preload": "yes", "workers": 0,
                  "device": "cpu"}
    stores: dict[str, Path] = {}
    teach_seconds: dict[str, float] = {}
    for i, (label, opts) in enumerate(STUDENT_RECORDS):
        stores[label] = work / f"train{i}.kdc"
        cfg = TeachConfig(**{"dataset": dataset, "teachers": [spec], "out": str(stores[label]), "split": "train",
                             "temperatures": TEMPS, "device": "cpu", "batch_size": 500, "seed": args.seed,
                             "workers": 0, **opts})
        t0 = time.perf_counter()
        run_teach(cfg)
        teach_seconds[label] = time.perf_counter() - t0
    # paired runs need the same rows in the same store order (the teach seed fixes the permutation)
    orders = [LogitStore.open(str(p)).manifest_column("dataset_index") for p in stores.values()]
    if not all(np.array_equal(orders[0], o) for o in orders[1:]):
        raise RuntimeError("the student stores differ in row order: runs would not be paired")

    labels = [label for label, _ in STUDENT_RECORDS] + [ONLINE, NO_TEACHER]
    jobs: dict[tuple[str, int], TrainConfig] = {}
    for label in [ONLINE] + [x for x in labels if x != ONLINE]:
        for seed in seeds:
            extra: dict[str, Any] = {}
            if label == ONLINE:
                extra = {"online_teacher": spec}
            elif label == NO_TEACHER:
                extra = {"loss": "ce", "loss_args": {}}
            source = stores[ONLINE_STORE if label in (ONLINE, NO_TEACHER) else label]
            out = work / f"run-{labels.index(label)}-{seed}"
            jobs[label, seed] = TrainConfig(**{**train_args, "source": str(source), "out": str(out), "seed": seed,
                                               **extra})
    results: dict[tuple[str, int], dict[str, Any]] = {}
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(args.student_jobs,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(student_run, cfg): key for key, cfg in jobs.items()}
        for fut in concurrent.futures.as_completed(futures):
            (label, seed), (metrics, seconds) = futures[fut], fut.result()
            results[label, seed] = {"seed": seed, "test_top1": metrics[-1]["test_top1"],
                                    "test_top5": metrics[-1]["test_top5"],
                                    "test_top1_by_epoch": [m["test_top1"] for m in metrics], "seconds": seconds}
            print(f"student seed {seed} {label:32s} test top-1 {100 * metrics[-1]['test_top1']:.2f}% "
                  f"({seconds:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t0
    runs = {label: [results[label, seed] for seed in seeds] for label in labels}

    base = [r["test_top1"] for r in runs[ONLINE]]
    rows = []
    for label in labels:
        top1 = [r["test_top1"] for r in runs[label]]
        row: dict[str, Any] = {"record": label, "test_top1": mean_std(top1), "runs": runs[label]}
        if label in teach_seconds:
            row["teach_seconds"] = teach_seconds[label]
        if label != ONLINE:
            row["diff_to_online"] = {**paired([a - b for a, b in zip(top1, base, strict=True)]),
                                     "per_seed": [a - b for a, b in zip(top1, base, strict=True)]}
        rows.append(row)
    return {
        "settings": {"dataset": dataset, "split": "train", "rows": args.student_rows, "view_policy": "identity",
                     "teach_seed": args.seed, "seeds": seeds, "teacher": spec.split("@")[0], **train_args,
                     "momentum": 0.9, "weight_decay": 5e-4,
                     # run_train evaluates on the test split of the same spec: n pairs of held-out digits
                     # (the first 5 000 are the default test split the teacher is scored on)
                     "eval": f"{dataset} test split", "eval_rows": len(load_dataset(dataset, "test")),
                     "online_store": ONLINE_STORE, "threads_per_run": 1, "jobs": args.student_jobs},
        "teach_seconds": sum(teach_seconds.values()),
        "train_seconds": train_seconds,
        "records": rows,
    }


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def student_markdown(students: dict) -> str:
    lines = ["| record | test top-1 % (mean ± std) | per seed | − online, paired (mean ± std, pp) "
             "| 95 % CI excludes 0 |", "|---|---|---|---|---|"]
    for r in students["records"]:
        acc = r["test_top1"]
        seeds = " / ".join(pct(x["test_top1"]) for x in r["runs"])
        d = r.get("diff_to_online")
        diff = "(baseline)" if d is None else f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"
        res = "" if d is None else ("yes" if d["resolved"] else "no")
        lines.append(f"| {r['record']} | {pct(acc['mean'])} ± {pct(acc['std'])} | {seeds} | {diff} | {res} |")
    return "\n".join(lines)


def fmt(x: float | None) -> str:
    return "∞" if x is None else f"{x:.1e}"


def markdown(result: dict) -> str:
    lines = [
        "| record | B/record on disk | payload B/record | KL T=1 | KL T=4 | grad err² T=1 | grad err² T=4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        name = r["record"] + (f" → k={r['k']}" if "auto" in r else "")
        extra = f" ({r['mean_distinct_classes']:.1f} distinct)" if "mean_distinct_classes" in r else ""
        lines.append(f"| {name}{extra} | {r['bytes_per_record']:.1f} | {r['payload_bytes_per_record']:.1f} | "
                     f"{fmt(r['kl_T1'])} | {fmt(r['kl_T4'])} | {fmt(r['grad_sq_error_T1'])} | "
                     f"{fmt(r['grad_sq_error_T4'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/fidelity.json")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--students", action=argparse.BooleanOptionalAction, default=True,
                    help="train students from each record and online (step 4)")
    ap.add_argument("--student-epochs", type=int, default=8)
    ap.add_argument("--student-rows", type=int, default=10000, help="mnist-pairs training pairs the students see")
    ap.add_argument("--student-seeds", default="0,1,2", help="comma-separated, paired across records")
    ap.add_argument("--student-jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                    help="student runs at once (one thread each)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    model, train_info = train_teacher(args.epochs, args.seed)
    x_test, y_test = images("test")
    z_test = dense_logits(model, x_test)
    top1 = (z_test.argmax(1) == y_test).double().mean().item()
    print(f"teacher {ARCH}: test top-1 {100 * top1:.2f}% ({train_info['train_seconds']:.0f} s training)", flush=True)

    result: dict[str, Any] = {
        "settings": {"dataset": "mnist-pairs", "train_split": "train", "eval_split": "test",
                     "num_classes": 100, "eval_rows": len(y_test), "temperatures": list(TEMPS),
                     "teacher": ARCH, **train_info, "seed": args.seed},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "teacher_test_top1": top1,
        "dense_float32_bytes_per_record": 4 * 100,
        "records": [],
    }
    with tempfile.TemporaryDirectory(prefix="kdcache-fidelity-") as tmp:
        work = Path(tmp)
        weights = work / "teacher.pt"
        torch.save(model.state_dict(), weights)
        stores = work / "stores"
        stores.mkdir()
        spec = f"{ARCH}@{weights}"
        for label, opts in RECORDS:
            row = measure(label, opts, spec, stores, z_test, args.seed)
            result["records"].append(row)
            print(f"{label:32s} {row['bytes_per_record']:7.1f} B  KL T=1 {fmt(row['kl_T1'])}  "
                  f"T=4 {fmt(row['kl_T4'])}  grad err² T=1 {fmt(row['grad_sq_error_T1'])}  "
                  f"T=4 {fmt(row['grad_sq_error_T4'])}", flush=True)
        if args.students:
            result["students"] = train_students(spec, work, args)
            result["students"]["markdown"] = student_markdown(result["students"])
    result["markdown"] = markdown(result)
    result["total_seconds"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(result["markdown"])
    if args.students:
        print(result["students"]["markdown"])


if __name__ == "__main__":
    main()
