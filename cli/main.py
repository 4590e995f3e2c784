"""The `kdcache` command line: thin typer commands over `pipeline` and `stores`."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from kdcache.stores.errors import KdcacheError

app = typer.Typer(
    name="kdcache",
    help="Cache teacher logits once (stage one: `teach`), train many students from the cache "
    "(stage two: `train`). Run `kdcache COMMAND --help` for each command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)


def user_errors(fn: Callable) -> Callable:
    """A user mistake is one line on stderr and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdcacheError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def load_config(ctx: typer.Context, param: typer.CallbackParam, path: Path | None) -> Path | None:
    """`--config FILE.toml` fills option defaults; flags on the command line still win."""
    if path is None:
        return None
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise typer.BadParameter(f"cannot read config {path}: {err}") from None
    section = data.get(ctx.info_name, data)
    ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in section.items()}}
    return path


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML file whose keys (option names, or a \\[teach] or \\[train] table) "
                 "become defaults.", is_eager=True, callback=load_config),
]


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} rows/s" if task.speed else "- rows/s", style="cyan")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


@contextmanager
def rows_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rows/s progress bar that appears only once work starts, so early errors stay one line."""
    bar = progress_bar()
    task = None

    def report(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield report
    except BaseException:
        if task is not None:  # work had begun: clear the bar so the error still reads as one line
            bar.live.transient = True
        raise
    finally:
        if task is not None:
            bar.stop()


def parse_k(value: str) -> int | str:
    if value in ("all", "auto") or value.startswith("sampled:"):
        return value  # sampled:S is checked (1 <= S <= 255) with the rest of the config
    return _int(value, "--k", "an integer, 'all', 'auto' or 'sampled:S'")


def parse_views(value: str) -> int | str:
    return value if value == "all" else _int(value, "--views", "an integer or 'all'")


def parse_floats(value: str, flag: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        numbers = ()
    if not numbers:
        raise KdcacheError(f"{flag} takes comma-separated numbers like 1,4; got '{value}'")
    return numbers


def _int(value: str, flag: str, expected: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise KdcacheError(f"{flag} must be {expected}; got '{value}'") from None


@app.command()
@user_errors
def teach(
    dataset: Annotated[str, typer.Argument(help="digits | mnist5k | mnist-pairs | torchvision:<Name>[?root=..&download=1] | imagefolder:PATH")],
    teacher: Annotated[list[str], typer.Option("--teacher", "-t", help="torchvision:<arch>[:<WEIGHTS>|none], <arch>@state_dict.pt, or package.module:factory. Repeat for several teachers over the same views.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Store: a directory path (created) or an fsspec URL (file://, s3://, gs://; memory:// in-process only).")],
    config: ConfigOption = None,
    split: Annotated[str, typer.Option(help="Dataset split to cache.")] = "train",
    k: Annotated[str, typer.Option("--k", help="Record per row: an integer N (top-N logits + label logit + tail logsumexp at each T), 'all' (dense), 'auto' (smallest N with mean KL(dense||record) <= --max-kl at every --temperatures, measured on the first 4096 rows of view 0; else dense), or 'sampled:S' (S classes drawn from the teacher at --proposal-temperature, stored with counts: unbiased, 1 <= S <= 255).")] = "10",
    temperatures: Annotated[str, typer.Option(help="Temperatures students will train at; the tail statistics are exact at each.")] = "1,4",
    max_kl: Annotated[float, typer.Option("--max-kl", help="--k auto: error budget, mean KL(dense || record) in nats per row, met at every declared temperature.")] = 1e-3,
    proposal_temperature: Annotated[float | None, typer.Option(help="--k sampled:S: the declared temperature whose teacher distribution the classes are drawn from (default: the largest of --temperatures).")] = None,
    encoding: Annotated[str, typer.Option(help="float16, or uint8 quantised per row (offset + scale): 1 byte per value plus 8 per row, so smaller only for dense or large-k records (benchmarks/RESULTS.md).")] = "float16",
    views: Annotated[str, typer.Option(help="Augmented views per row, or 'all' (crop-flip: 162).")] = "1",
    view_policy: Annotated[str, typer.Option(help="identity | crop-flip | rrc-flip.")] = "identity",
    image_size: Annotated[int | None, typer.Option(help="Teacher input size (default: the dataset's, 224 for imagefolder).")] = None,
    correction: Annotated[str, typer.Option(help="none | swap (SLD) | sort (SortKD) | loca (LoCa, unverified: no official code, see README): label-aware teacher correction applied before caching.")] = "none",
    loca_alpha: Annotated[float | None, typer.Option(help="LoCa alpha in (0, 1).")] = None,
    loca_temperature: Annotated[float | None, typer.Option(help="Temperature LoCa calibrates at.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the row order, the views and random (:none) teacher weights.")] = 0,
    shard_rows: Annotated[int, typer.Option(help="Rows per shard: the unit of writing and resuming.")] = 65536,
    chunk_rows: Annotated[int, typer.Option(help="Rows per chunk: the unit of reading.")] = 8192,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size.")] = 256,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: 0 for in-memory data, else cores-1).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    amp: Annotated[bool, typer.Option(help="bf16 autocast on GPU (logits are taken in fp32).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store made by a different command.")] = False,
    cluster: Annotated[str | None, typer.Option(help="Run on dask: local:N starts N worker processes here, one per GPU (LocalCUDACluster when dask-cuda is installed), one block per task.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Run on an existing dask cluster, e.g. tcp://HOST:8786; every worker must reach --out (shared disk or s3://, gs://). See docs/scaling.md.")] = None,
    break_lock: Annotated[bool, typer.Option(help="Remove another driver's lock on --out first. Only when that driver is gone (a stale lock from this host is taken over automatically).")] = False,
) -> None:
    """Stage one: run teacher(s) over views of DATASET and cache compact records in a Zarr store.

    Re-running the same command resumes: finished shards are skipped, unfinished ones redone.
    --out may be a path or an fsspec URL (file://, s3://, gs://, memory:// in-process only). One
    driver at a time per store: a second one is refused, naming the holder of <out>/kdcache.lock.
    """
    from kdcache.teach import TeachConfig, run_teach

    corr_args: dict[str, Any] = {}
    if loca_alpha is not None:
        corr_args["alpha"] = loca_alpha
    if loca_temperature is not None:
        corr_args["temperature"] = loca_temperature
    cfg = TeachConfig(
        dataset=dataset, teachers=list(teacher), out=out, split=split, k=parse_k(k),
        temperatures=parse_floats(temperatures, "--temperatures"), encoding=encoding,
        max_kl=max_kl, proposal_temperature=proposal_temperature, views=parse_views(views), view_policy=view_policy, image_size=image_size, correction=correction,
        correction_args=corr_args, seed=seed, shard_rows=shard_rows, chunk_rows=chunk_rows,
        batch_size=batch_size, workers=workers, device=device, amp=amp, overwrite=overwrite,
        break_lock=break_lock,
    )
    if cluster is not None or scheduler is not None:
        from kdcache.distributed import run_teach_distributed

        with rows_progress("teach (dask)") as report:
            store = run_teach_distributed(cfg, cluster=cluster, scheduler=scheduler, progress=report,
                                          log=console.print)
    else:
        with rows_progress("teach") as report:
            store = run_teach(cfg, progress=report)
    from kdcache.describe import describe

    info = describe(store)
    for name, t in info["teachers"].items():
        console.print(f"[green]cached[/] {name}: blocks {t['blocks_done']}, k={t['k']}, "
                      f"top-1 {_pct(t['teacher_top1'])}, {t['bytes_per_record']:.1f} B/record -> {out}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


@app.command()
@user_errors
def inspect(
    store: Annotated[str, typer.Argument(help="Store path or fsspec URL (file://, s3://, gs://, memory://).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Rows, views, teachers, k, encodings, bytes on disk and per record, accuracy, record error."""
    from kdcache.describe import describe
    from kdcache.stores.logit_store import LogitStore

    info = describe(LogitStore.open(store))
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    out = Console()
    out.print(f"[bold]{info['url']}[/]  format {info['format']}  dataset {info['dataset']['spec']} "
              f"({info['dataset']['split']})  rows {info['rows']}  views {info['views']} "
              f"({info['view_policy']['name']})  shards {info['shards']}  {info['bytes_total'] / 1e6:.2f} MB")
    for name, t in info["teachers"].items():
        table = Table("field", "value", title=f"teacher {name}", show_header=False, title_justify="left")
        kl = t["kl_by_temperature"] or {}
        correction = t["correction"] or {}
        rows = {
            "spec": t["spec"],
            "record": f"{t['layout']}, k={t['k']}, {t['encoding']}, tail exact at T={t['temperatures']}",
            "blocks done": t["blocks_done"],
            "bytes per record": f"{t['bytes_per_record']:.1f} (dense float32: {t['dense_float32_bytes_per_record']})",
            "teacher top-1 (cached views)": _pct(t["teacher_top1"]),
            "correction": f"{correction.get('name', 'none')} {correction.get('args') or ''} "
                          f"(changed {_pct(t['changed_by_correction'])} of rows)",
            "record error, mean KL(dense||record)": "  ".join(f"T={temp}: {v:.2e}" for temp, v in kl.items()) or "-",
        }
        other = t.get("kl_at_other_temperatures") or {}
        if other:  # what a loss at an undeclared T reads (warned about by `kdcache train`)
            rows["KL at undeclared T (uniform tail)"] = "  ".join(f"T={temp}: {v:.2e}" for temp, v in other.items())
        grad = t.get("grad_sq_error_by_temperature") or {}
        if grad:  # sampled: KL is infinite (p̂ = 0 off the sample); the KD gradient error instead
            rows["record error, KD grad err²"] = "  ".join(f"T={temp}: {v:.2e}" for temp, v in grad.items())
        fid, smp = t.get("fidelity") or {}, t.get("sampling") or {}
        if fid.get("mode") == "auto":
            measured = "  ".join(f"T={temp}: {v:.2e}" for temp, v in fid["kl_by_temperature"].items())
            rows["--k auto"] = (f"chose k={fid['k']} for --max-kl {fid['max_kl']:g} on {fid['sample_rows']} rows "
                                f"of view 0; measured KL {measured}")
        if smp:
            rows["sampled"] = f"S={smp['samples']} draws from T_q={smp['proposal_temperature']:g}, seed {smp['seed']}"
        for key, value in rows.items():
            table.add_row(key, str(value))
        out.print(table)


@app.command()
@user_errors
def verify(
    store: Annotated[str, typer.Argument(help="Store path or fsspec URL (file://, s3://, gs://, memory://).")],
    teacher: Annotated[list[str] | None, typer.Option("--teacher", "-t", help="Also recompute a sample through this teacher spec and compare.")] = None,
    samples: Annotated[int, typer.Option(help="(view, row) pairs to recompute per teacher.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for the sample.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
) -> None:
    """Check structure, done flags and per-shard checksums; with --teacher, replay and recompute."""
    from kdcache.stores.errors import CorruptionError
    from kdcache.stores.logit_store import LogitStore
    from kdcache.verify import replay_check

    st = LogitStore.open(store)
    problems = st.verify()
    for p in problems:
        typer.echo(f"problem: {p}", err=True)
    if problems:
        raise CorruptionError(f"{len(problems)} problem(s) in {store}; rerun `kdcache teach` with "
                              "--overwrite (or delete the listed shards' done flags) to rewrite them")
    for name in st.teachers:
        done = st.done(name)
        typer.echo(f"ok: teacher {name}: {int(done.sum())}/{done.size} blocks done, checksums match")
    for spec in teacher or []:
        rep = replay_check(st, spec, samples=samples, seed=seed, device=device)
        typer.echo(f"replay {rep.teacher}: {rep.samples} samples, max |dlogit| {rep.max_abs_diff:.2e}, "
                   f"top-1 agreement {100 * rep.top1_agreement:.1f}%")
        if not rep.ok:
            raise CorruptionError(f"the cache does not reproduce teacher '{rep.teacher}' (excess over "
                                  f"tolerance {rep.max_excess:.2e}); was it cached with another teacher "
                                  "or dataset? re-teach with --overwrite")


def parse_kv(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KdcacheError(f"{flag} takes KEY=VALUE (e.g. {flag} T=4); got '{item}'")
        out[key.strip()] = value.strip()
    return out


@app.command()
@user_errors
def train(
    source: Annotated[str, typer.Argument(help="A store made by `kdcache teach`, or a dataset spec (then --loss ce, or --online-teacher).")],
    student: Annotated[str, typer.Option(help="Student architecture: resnet8x4, resnet32x4, wrn_16_2, wrn_40_2 (and the other CIFAR ResNets/WRNs), small_cnn, tiny_cnn, tiny_cnn_nobn, any torchvision classification model name, or package.module:factory.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Run directory: metrics.parquet, checkpoint.pt, student.pt, config.json.")],
    config: ConfigOption = None,
    loss: Annotated[str, typer.Option(help="ce | kd | dkd | ttm | wttm | clkd | sld (defaults: the papers' CIFAR-100 settings).")] = "kd",
    loss_arg: Annotated[list[str] | None, typer.Option("--loss-arg", help="Override a loss hyperparameter, KEY=VALUE (e.g. T=4, w_kd=0.9, beta=8); repeatable.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Which teacher of the store (needed when it holds several); a,b trains from the ensemble (the mean of their probabilities).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset spec to read images from (default: the one the store records); checked by fingerprint.")] = None,
    correction: Annotated[str, typer.Option(help="none | swap | sort | loca, applied at train time to an uncorrected store.")] = "none",
    loca_alpha: Annotated[float | None, typer.Option(help="LoCa alpha in (0, 1).")] = None,
    loca_temperature: Annotated[float | None, typer.Option(help="Temperature LoCa calibrates at (must be one the store declares).")] = None,
    online_teacher: Annotated[str | None, typer.Option(help="Run this teacher live on the same replayed views instead of reading the cache (baseline).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 240,
    batch_size: Annotated[int, typer.Option(help="Batch size (global: under torchrun each of the N processes takes batch-size / N).")] = 64,
    lr: Annotated[float | None, typer.Option(help="Base learning rate (SGD); default: the loss's CIFAR-100 setting (0.05; sld 0.025).")] = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="step (x0.1 after each milestone) or cosine.")] = "step",
    milestones: Annotated[str | None, typer.Option(help="Step-decay epochs, e.g. 150,180,210 (default: 62.5/75/87.5% of --epochs).")] = None,
    view_schedule: Annotated[str, typer.Option(help="cycle (epoch e reads view e mod V) or random.")] = "cycle",
    view_policy: Annotated[str, typer.Option(help="Augmentation when training from a dataset spec (a store replays its own views).")] = "identity",
    preload: Annotated[str, typer.Option(help="auto | yes | no: soft labels in RAM, or streamed chunk-shuffled from the store.")] = "auto",
    image_size: Annotated[int | None, typer.Option(help="Student input size (default: the store's / dataset's).")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers for images (spawned).")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the student's init and the epoch orders: same seed, paired runs.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    amp: Annotated[bool, typer.Option(help="bf16 autocast on GPU.")] = True,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt.")] = False,
    strict: Annotated[bool, typer.Option(help="Refuse (instead of warn) when the loss needs a temperature the store's tail does not cover.")] = False,
    max_steps_per_epoch: Annotated[int | None, typer.Option(help="Cap steps per epoch (smoke tests, benchmarks).")] = None,
) -> None:
    """Stage two: train a student from a store (no teacher in memory), or from a dataset with --loss ce.

    Several GPUs (DDP): `torchrun --nproc-per-node N -m kdcache.cli train ...`; --batch-size stays the
    global batch, rank 0 prints and writes the run directory.
    """
    from kdcache.train import TrainConfig, run_train

    corr_args: dict[str, Any] = {}
    if loca_alpha is not None:
        corr_args["alpha"] = loca_alpha
    if loca_temperature is not None:
        corr_args["temperature"] = loca_temperature
    cfg = TrainConfig(
        source=source, student=student, out=out, loss=loss, loss_args=parse_kv(loss_arg, "--loss-arg"),
        teacher=teacher, dataset=dataset, correction=correction, correction_args=corr_args,
        online_teacher=online_teacher, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule,
        milestones=tuple(int(m) for m in parse_floats(milestones, "--milestones")) if milestones else None,
        view_schedule=view_schedule, view_policy=view_policy, preload=preload, image_size=image_size,
        workers=workers, seed=seed, device=device, amp=amp, resume=resume, strict=strict,
        max_steps_per_epoch=max_steps_per_epoch,
    )

    def show(row: dict[str, Any]) -> None:
        console.print(f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f}  "
                      f"train {_pct(row['train_top1'])}  test top-1 {_pct(row['test_top1'])}  "
                      f"top-5 {_pct(row['test_top5'])}  {row['rows_per_s']:,.0f} rows/s")

    metrics = run_train(cfg, on_epoch=show)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    table = Table("epoch", "lr", "loss", "test top-1", "test top-5", "rows/s", title=f"{loss} -> {out}")
    for row in metrics[-10:]:
        table.add_row(str(row["epoch"]), f"{row['lr']:.4g}", f"{row['train_loss']:.4f}", _pct(row["test_top1"]),
                      _pct(row["test_top5"]), f"{row['rows_per_s']:,.0f}")
    Console().print(table)


@app.command()
@user_errors
def demo(
    out: Annotated[str, typer.Option(help="Directory for the demo's runs, store and report.png.")] = "demo",
    dataset: Annotated[str, typer.Option(help="Bundled dataset: mnist5k or digits.")] = "mnist5k",
    epochs: Annotated[int, typer.Option(help="Student epochs (cosine schedule).")] = 8,
    teacher_epochs: Annotated[int, typer.Option(help="Teacher epochs (cosine schedule; 12 reach about 95% on mnist5k).")] = 12,
    seed: Annotated[int, typer.Option(help="Seed for every run (paired comparisons).")] = 0,
) -> None:
    """End to end on bundled data: train a teacher, cache it with views, train students from the cache."""
    from kdcache.demo import run_demo

    run_demo(out=out, dataset=dataset, epochs=epochs, teacher_epochs=teacher_epochs, seed=seed, console=Console())


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    sys.exit(app())
