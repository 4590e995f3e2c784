"""The `kdcache` command line: thin typer commands over `pipeline` and `stores`."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kdcache.progress import rows_progress
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


def show_version(value: bool) -> None:
    if value:
        from kdcache._version import __version__

        typer.echo(f"kdcache {__version__}")
        raise typer.Exit()


@app.callback()
def app_options(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=show_version)] = False,
) -> None:
    """Options that come before the command (`kdcache --version`)."""


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


def parse_k(value: str) -> int | str:
    from kdcache.records import k_choices, names_layout  # lazy, like this module's other pipeline imports

    if names_layout(value):
        return value  # sampled:S is checked (1 <= S <= 255) with the rest of the config
    return _int(value, "--k", k_choices())


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
    teacher: Annotated[list[str], typer.Option("--teacher", "-t", help="torchvision:<arch>[:<WEIGHTS>|none], timm:<name>[:pretrained] (pip install kdcache[timm]), <arch>@state_dict.pt, or package.module:factory. Repeat for several teachers over the same views.")],
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
    from kdcache.verify import verify as verify_store

    report = verify_store(store, teacher=teacher, samples=samples, seed=seed, device=device)
    for p in report.problems:
        typer.echo(f"problem: {p}", err=True)
    for name, (done, total) in report.blocks_done.items():
        typer.echo(f"ok: teacher {name}: {done}/{total} blocks done, checksums match")
    for rep in report.replays:
        typer.echo(f"replay {rep.teacher}: {rep.samples} samples, max |dlogit| {rep.max_abs_diff:.2e}, "
                   f"top-1 agreement {100 * rep.top1_agreement:.1f}%")
    report.raise_for_problems()


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
    student: Annotated[str, typer.Option(help="Student architecture: resnet8x4, resnet32x4, wrn_16_2, wrn_40_2 (and the other CIFAR ResNets/WRNs), small_cnn, tiny_cnn, tiny_cnn_nobn, any torchvision classification model name, timm:<name>[:pretrained] (pip install kdcache[timm]), or package.module:factory; `kdcache list models` names them.")],
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


LIST_KINDS = ("models", "losses", "datasets", "corrections", "policies")


def first_doc_line(obj: Any) -> str:
    """A registry entry's one-line description: the first line of its docstring."""
    return ((getattr(obj, "__doc__", None) or "").strip().splitlines() or [""])[0].replace("``", "")


def with_defaults(summary: str, defaults: Any) -> str:
    """Append a registry entry's default arguments (what `--loss-arg` / `--loca-*` override)."""
    if not defaults:
        return summary
    shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in defaults.items())
    return f"{summary} Defaults: {shown}."


def doc_bullets(doc: str) -> list[tuple[str, str]]:
    """``- ``form``: text`` bullets of a module docstring (pipeline/data.py lists its spec forms so)."""
    items: list[tuple[str, str]] = []
    for line in doc.splitlines():
        head = line.strip()
        if head.startswith("- ``") and "``" in head[4:]:
            form, _, text = head[4:].partition("``")
            items.append((form, text.lstrip(": ")))
        elif items and line.startswith("  ") and head:  # continuation of the bullet above
            items[-1] = (items[-1][0], f"{items[-1][1]} {head}")
        elif not head:
            continue
        elif items:
            break
    return [(form, text.replace("``", "")) for form, text in items]


def catalog(kind: str, pattern: str = "*") -> list[tuple[str, str]]:
    """(name, one-line summary) for everything a spec of this kind may name, filtered by a glob."""
    import fnmatch

    if kind == "models":  # list_model_specs matches timm names with and without their timm: prefix
        from kdcache.models import list_model_specs

        return [(name, "") for name in list_model_specs(pattern)]
    return [(name, text) for name, text in _summaries(kind) if fnmatch.fnmatch(name, pattern)]


def _summaries(kind: str) -> list[tuple[str, str]]:
    if kind == "losses":
        from kdcache.losses import LOSSES

        return [(name, with_defaults(first_doc_line(spec.fn), spec.defaults)) for name, spec in LOSSES.items()]
    if kind == "datasets":
        import kdcache.data

        return doc_bullets(kdcache.data.__doc__ or "")
    if kind == "corrections":
        from kdcache.corrections import CORRECTIONS

        return [(name, with_defaults(first_doc_line(c.fn), c.defaults)) for name, c in CORRECTIONS.items()]
    if kind == "policies":
        from kdcache.views import VIEW_POLICIES

        return [(name, first_doc_line(cls)) for name, cls in VIEW_POLICIES.items()]
    raise KdcacheError(f"unknown kind '{kind}' for `kdcache list`; expected one of {', '.join(LIST_KINDS)}")


def format_catalog(entries: list[tuple[str, str]], width: int = 80, name_width: int = 14) -> list[str]:
    """Names in a column, summaries wrapped beside them; a long name puts its summary on the next line."""
    import textwrap

    lines: list[str] = []
    indent = " " * (name_width + 2)
    for name, summary in entries:
        if not summary:
            lines.append(name)
            continue
        wrapped = textwrap.wrap(summary, width - len(indent)) or [""]
        if len(name) > name_width:
            lines.append(name)
            lines.extend(indent + part for part in wrapped)
        else:
            lines.append(f"{name:<{name_width}}  {wrapped[0]}")
            lines.extend(indent + part for part in wrapped[1:])
    return lines


@app.command("list")
@user_errors
def list_names(
    kind: Annotated[str, typer.Argument(help="models | losses | datasets | corrections | policies")],
    pattern: Annotated[str, typer.Argument(help="Glob on the names, e.g. 'resnet*' (timm models match with or without timm:).")] = "*",
) -> None:
    """What a spec may name, one per line: models, losses, datasets, corrections or view policies."""
    entries = catalog(kind, pattern)
    if not entries:
        raise KdcacheError(f"no {kind} match '{pattern}'; run `kdcache list {kind}` for all of them")
    for line in format_catalog(entries):
        typer.echo(line)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    sys.exit(app())
