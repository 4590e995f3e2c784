"""`kdcache demo`: the whole product on bundled data, in one command, with real seeded numbers.

teacher (ce, crop-flip) -> cache (stage one, 4 crop-flip views, dense) -> the same student trained
with ce, kd from the cache, kd with the live teacher on the same views, and kd + sort from the cache.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdcache.progress import EpochProgress, duration
from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import TeachConfig, run_teach
from kdcache.train import TrainConfig, check_writable, run_train, writing

TEACHER, STUDENT = "small_cnn_wide", "tiny_cnn"
DATASETS = ("mnist5k", "digits")  # bundled with the dependencies: the demo runs offline


def check_demo_options(out: str, dataset: str, epochs: int, teacher_epochs: int) -> None:
    """Every option is checked before the first file is made or the first epoch runs."""
    for flag, value in (("--epochs", epochs), ("--teacher-epochs", teacher_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{flag} must be an integer >= 1; got {value!r}")
    if dataset not in DATASETS:
        raise SpecError(f"demo --dataset must be bundled data, {' or '.join(DATASETS)}; got '{dataset}'")
    check_writable(Path(out), "--out")


def run_demo(out: str = "demo", dataset: str = "mnist5k", epochs: int = 8, teacher_epochs: int = 12, seed: int = 0,
             console: Console | None = None) -> list[dict[str, Any]]:
    """Run the four students and return one result per run (accuracy curve, wall time, cache bytes read).

    Cosine schedules throughout: a short step schedule leaves the teacher undertrained (86 % on mnist5k
    after 4 epochs against 95 % after 12 cosine ones), and KD from a teacher no better than the student
    shows nothing."""
    console = console or Console()
    check_demo_options(out, dataset, epochs, teacher_epochs)
    root = Path(out)
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
    teacher_dir = root / f"teacher-{_slug(dataset)}"
    resume = (teacher_dir / "checkpoint.pt").is_file()  # rerunning the demo reuses its trained teacher
    console.print(f"[bold]1/3[/] training the teacher ({TEACHER}, ce, crop-flip) on {dataset}: {teacher_epochs} "
                  "epochs")  # each epoch's line ends with the time the rest should take
    t0 = time.perf_counter()
    with EpochProgress(teacher_epochs, console=console, indent="    ") as shown:
        teacher_metrics = run_train(
            TrainConfig(source=dataset, student=TEACHER, out=str(teacher_dir), loss="ce", epochs=teacher_epochs,
                        batch_size=64, lr=0.05, schedule="cosine", view_policy="crop-flip", seed=seed,
                        resume=resume, overwrite=not resume),
            on_epoch=shown.on_epoch, on_step=shown.on_step)
    console.print(f"    teacher test top-1 {100 * teacher_metrics[-1]['test_top1']:.2f}% "
                  f"({duration(time.perf_counter() - t0)})")
    store = root / "cache.kdc"
    spec = f"{TEACHER}@{teacher_dir / 'student.pt'}"
    console.print("[bold]2/3[/] caching it: 4 crop-flip views, dense float16 records, T = 1 and 4")
    t0 = time.perf_counter()
    run_teach(TeachConfig(dataset=dataset, teachers=[spec], out=str(store), k="all", views=4,
                          view_policy="crop-flip", seed=seed, overwrite=True))
    cache_seconds = time.perf_counter() - t0
    opened = LogitStore.open(str(store))
    cache_bytes = sum(opened.nbytes_stored().values())
    num_classes = opened.teacher_attrs(opened.teachers[0])["num_classes"]
    dense_f32_bytes = opened.num_rows * opened.num_views * num_classes * 4
    console.print(f"    {cache_bytes / 1e6:.2f} MB in {cache_seconds:.1f} s "
                  f"(dense float32 logits would be {dense_f32_bytes / 1e6:.2f} MB before metadata)")
    runs = [
        ("ce (hard labels)", dict(loss="ce")),
        ("kd from cache", dict(loss="kd")),
        ("kd, live teacher", dict(loss="kd", online_teacher=spec)),
        ("kd + sort from cache", dict(loss="kd", correction="sort")),
    ]
    console.print(f"[bold]3/3[/] training {STUDENT} {len(runs)} ways, {epochs} epochs each, seed {seed}")
    results = []
    for name, kw in runs:
        t0 = time.perf_counter()
        with EpochProgress(epochs, console=console, indent="    ", lines=False) as shown:  # a bar; a line per run
            metrics = run_train(TrainConfig(source=str(store), student=STUDENT, out=str(root / _slug(name)),
                                            epochs=epochs, batch_size=64, lr=0.05, schedule="cosine", seed=seed,
                                            overwrite=True, **kw), on_epoch=shown.on_epoch, on_step=shown.on_step)
        results.append({"run": name, "final_top1": metrics[-1]["test_top1"],
                        "cache_bytes": cache_bytes if "from cache" in name else 0,
                        "best_top1": max(m["test_top1"] for m in metrics), "seconds": time.perf_counter() - t0,
                        "curve": [m["test_top1"] for m in metrics]})
        console.print(f"    {name}: {100 * metrics[-1]['test_top1']:.2f}% ({results[-1]['seconds']:.0f} s)")
    table = Table("student run", "final top-1", "best top-1", "wall time", "cache read",
                  title=f"kdcache demo on {dataset} (teacher {100 * teacher_metrics[-1]['test_top1']:.2f}%)")
    for r in results:
        table.add_row(r["run"], f"{100 * r['final_top1']:.2f}%", f"{100 * r['best_top1']:.2f}%",
                      f"{r['seconds']:.1f} s", f"{r['cache_bytes'] / 1e6:.2f} MB" if r["cache_bytes"] else "-")
    console.print(table)
    console.print(f"cache: {cache_bytes / 1e6:.2f} MB on disk; teacher never loaded by the cached runs")
    report = root / "report.png"
    plot_report(results, teacher_metrics[-1]["test_top1"], cache_bytes, dense_f32_bytes, report)
    console.print(f"report: {report}")
    return results


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def plot_report(results: list[dict[str, Any]], teacher_top1: float, cache_bytes: int, dense_f32_bytes: int,
                path: Path) -> None:
    """Accuracy curves per run, wall time per run, and the cache's size next to dense float32 logits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4), width_ratios=[3, 2, 1.4])
    for r in results:
        ax1.plot(range(1, len(r["curve"]) + 1), [100 * a for a in r["curve"]], marker="o", label=r["run"])
    ax1.axhline(100 * teacher_top1, color="gray", linestyle="--", label="teacher")
    ax1.set(xlabel="epoch", ylabel="test top-1 (%)", title="student accuracy")
    ax1.legend(fontsize=8)
    names = [r["run"] for r in results]
    ax2.barh(names, [r["seconds"] for r in results], color="tab:blue")
    ax2.set(xlabel="wall time (s)", title="student training time")
    sizes = {"kdcache store\n(on disk)": cache_bytes, "dense float32\nlogits": dense_f32_bytes}
    ax3.bar(list(sizes), [b / 1e6 for b in sizes.values()], color=["tab:green", "tab:gray"])
    ax3.set(ylabel="MB", title="cache size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
