"""The `kdcache` command line: thin typer commands over `pipeline` and `stores`."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import tomllib
import warnings
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer 0.29 vendors click
from typer.core import TyperGroup

from kdcache.progress import EpochProgress, rows_progress
from kdcache.stores.errors import KdcacheError


class OneLineUsageErrors(TyperGroup):
    """Usage mistakes (an unknown option, ``--epochs abc``, a missing ``--teacher``) print one line and exit 2,
    like every other bad input, instead of click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:  # plain `kdcache`: the help, as before
            typer.echo(err.ctx.get_help() if err.ctx else str(err))
            sys.exit(2)
        except UsageError as err:
            where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            typer.echo(f"error: {err.format_message()}{where}", err=True)
            sys.exit(2)
        except typer.Abort:
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
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


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """A warning is one line, `warning: ...` on stderr, not Python's file:line report with a source line."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_args, **_kw: typer.echo(f"warning: {message}", err=True)
        yield


@app.callback()
def app_options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=show_version)] = False,
) -> None:
    """Options that come before the command (`kdcache --version`)."""
    ctx.with_resource(one_line_warnings())


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


def fail(message: str) -> NoReturn:
    """One `error:` line and exit 2, where no KdcacheError can be raised (option callbacks)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


# Keys of a run's OUT/config.json (kdcache.train.TrainConfig fields) that are not option names.
CORRECTION_ARG_OPTIONS = {"alpha": "loca_alpha", "temperature": "loca_temperature"}
NOT_FROM_A_RUN = ("resume", "overwrite")  # what an invocation does, not what the run was: never read from JSON
COMMANDS = ("teach", "train", "inspect", "verify", "repair", "demo", "list")  # tables other commands read


def read_config(path: Path) -> dict[str, Any]:
    """A config file's mapping: JSON by extension (a run's config.json), else TOML."""
    try:
        text = Path(path).read_text()
        data = json.loads(text) if Path(path).suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, TOMLDecodeError are ValueErrors
        fail(f"cannot read config {path}: {err}; pass a TOML file or a run's config.json")
    if not isinstance(data, dict):
        fail(f"config {path} holds a {type(data).__name__}; expected a table of option names")
    return data


def config_defaults(section: dict[str, Any], known: set[str], command: str, path: Path,
                    from_run: bool) -> dict[str, Any]:
    """Option defaults (param name -> value) from a config's keys; an unknown key is refused, naming the closest
    option. TrainConfig's own names map to options: loss_args -> --loss-arg, correction_args -> --loca-*,
    milestones (a list) -> --milestones, source -> the SOURCE argument."""
    import difflib

    out: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if value is None or (from_run and name in NOT_FROM_A_RUN) or isinstance(value, dict) and name in COMMANDS:
            continue  # unset, an action of the invocation, or another command's table
        if name == "loss_args" and "loss_arg" in known and isinstance(value, dict):
            # a list (a run's temperatures=[1.0, 2.0]) goes back as --loss-arg temperatures=1.0,2.0
            out["loss_arg"] = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in value.items()]
        elif name == "correction_args" and isinstance(value, dict):
            for arg, v in value.items():
                if arg not in CORRECTION_ARG_OPTIONS:
                    fail(f"config {path}: unknown correction arg '{arg}' in correction_args; expected "
                         f"{' or '.join(CORRECTION_ARG_OPTIONS)} (--loca-alpha, --loca-temperature)")
                out[CORRECTION_ARG_OPTIONS[arg]] = v
        elif name == "milestones" and isinstance(value, list):
            out[name] = ",".join(str(v) for v in value)
        elif name in known:
            out[name] = value
        elif from_run and name in train_config_fields():
            continue  # a field of the run with no option (documented in README, "Stage two")
        else:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = (f"did you mean '{close[0]}' (--{close[0].replace('_', '-')})?" if close
                    else f"`kdcache {command} --help` lists the options")
            fail(f"config {path}: unknown key '{key}' for `kdcache {command}`; {hint}")
    return out


def train_config_fields() -> set[str]:
    from dataclasses import fields

    from kdcache.train import TrainConfig

    return {f.name for f in fields(TrainConfig)}


def load_config(ctx: typer.Context, param: typer.CallbackParam, path: Path | None) -> Path | None:
    """`--config FILE` (TOML, or JSON such as a run's OUT/config.json) fills option defaults; flags on the
    command line still win. A `[teach]` / `[train]` table, when present, is used for that command."""
    if path is None:
        return None
    data = read_config(path)
    section = data.get(ctx.info_name, data)
    if not isinstance(section, dict):
        fail(f"config {path}: '{ctx.info_name}' must be a table of option names")
    known = {p.name for p in ctx.command.params if p.name and p.name != "config"}
    from_run = Path(path).suffix.lower() == ".json"
    defaults = config_defaults(section, known, ctx.info_name or "", Path(path), from_run)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML, or a run's config.json: keys are option names (or a \\[teach] / "
                 "\\[train] table); flags win.", is_eager=True, callback=load_config, rich_help_panel="Run",
                 show_default=False),
]


def parse_k(value: str) -> int | str:
    from kdcache.records import k_choices, names_layout  # lazy, like this module's other pipeline imports

    if names_layout(value):
        return value  # sampled:S is checked (1 <= S <= 255) with the rest of the config
    return _int(value, "--k", k_choices())


def parse_views(value: str) -> int | str:
    return value if value == "all" else _int(value, "--views", "an integer or 'all'")


def parse_ints(value: str | None, flag: str) -> tuple[int, ...] | None:
    """Comma-separated integers (--milestones 150,180,210); None stays None (the default)."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip()) or None
    except ValueError:
        raise KdcacheError(f"{flag} takes comma-separated integers like 150,180,210; got '{value}'") from None


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


def parse_view_groups(items: list[str]) -> tuple[tuple[str, str], ...]:
    """--view-group NAME=POLICY, repeated -> ((name, policy), ...)."""
    groups = []
    for item in items:
        name, eq, spec = item.partition("=")
        if not eq or not name.strip() or not spec.strip():
            raise KdcacheError(f"--view-group must be NAME=POLICY, e.g. weak=crop-flip; got '{item}'")
        groups.append((name.strip(), spec.strip()))
    return tuple(groups)


@app.command()
@user_errors
def teach(
    dataset: Annotated[str, typer.Argument(help="digits | mnist5k | mnist-pairs | torchvision:NAME | imagefolder:PATH (`kdcache list datasets`).", show_default=False)],
    *,
    teacher: Annotated[list[str], typer.Option("--teacher", "-t", metavar="SPEC", help="torchvision:ARCH[:WEIGHTS] (:none: random), timm:NAME, ARCH@weights.pt or module:factory; repeat for several.", rich_help_panel="Teacher", show_default=False)],
    image_size: Annotated[int | None, typer.Option(help="Teacher input size, 1..4096 (default: the dataset's; imagefolder 224).", rich_help_panel="Teacher", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size.", rich_help_panel="Teacher")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.", rich_help_panel="Teacher")] = "auto",
    amp: Annotated[bool, typer.Option(help="bf16 autocast on GPU (logits are taken in fp32).", rich_help_panel="Teacher")] = True,
    k: Annotated[str, typer.Option("--k", help="Record per row: N (top-N + tail), all (dense), auto (smallest N within --max-kl) or sampled:S. README: Choosing a record.", rich_help_panel="Record")] = "10",
    temperatures: Annotated[str, typer.Option(help="Temperatures students will train at (the tail is exact at each).", rich_help_panel="Record")] = "1,4",
    max_kl: Annotated[float, typer.Option("--max-kl", help="--k auto: the error budget, mean KL(dense || record) per row in nats.", rich_help_panel="Record")] = 1e-3,
    proposal_temperature: Annotated[float | None, typer.Option(help="--k sampled:S: the temperature classes are drawn at (default: the largest).", rich_help_panel="Record", show_default=False)] = None,
    encoding: Annotated[str, typer.Option(help="float16, or uint8 (quantised per row: offset + scale).", rich_help_panel="Record")] = "float16",
    correction: Annotated[str, typer.Option(help="none | swap | sort | loca: a label-aware correction applied before caching.", rich_help_panel="Record")] = "none",
    loca_alpha: Annotated[float | None, typer.Option(help="LoCa alpha in (0, 1).", rich_help_panel="Record", show_default=False)] = None,
    loca_temperature: Annotated[float | None, typer.Option(help="Temperature LoCa calibrates at.", rich_help_panel="Record", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="Dataset split to cache.", rich_help_panel="Views")] = "train",
    views: Annotated[str, typer.Option(help="Augmented views per row (at most 10000), or all (crop-flip: 162).", rich_help_panel="Views")] = "1",
    view_policy: Annotated[str, typer.Option(metavar="POLICY", help="Ops joined by |, e.g. 'crop-flip | randaugment:n=2 | cutout:0.5' or 'rrc-flip | trivialaugment | cutmix:p=0.5 | mixup' (`kdcache list policies`, docs/views.md).", rich_help_panel="Views")] = "identity",
    view_group: Annotated[list[str] | None, typer.Option("--view-group", metavar="NAME=POLICY", help="Linked views instead of --view-policy: repeat, e.g. weak=crop-flip and strong='crop-flip | randaugment'; --views per group, served together in training.", rich_help_panel="Views", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seeds the row order, the views and random (:none) teacher weights.", rich_help_panel="Views")] = 0,
    out: Annotated[str, typer.Option("--out", "-o", help="Store: a directory (created) or an fsspec URL (s3://, gs://, file://).", rich_help_panel="Run", show_default=False)],
    config: ConfigOption = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: 0 for in-memory data, else cores-1).", rich_help_panel="Run", show_default=False)] = None,
    shard_rows: Annotated[int, typer.Option(help="Rows per shard: the unit of writing and resuming.", rich_help_panel="Run")] = 65536,
    chunk_rows: Annotated[int, typer.Option(help="Rows per chunk: the unit of reading.", rich_help_panel="Run")] = 8192,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a store made by a different command.", rich_help_panel="Run")] = False,
    cluster: Annotated[str | None, typer.Option(help="local:N: N dask worker processes here, one per GPU.", rich_help_panel="Scale-out", show_default=False)] = None,
    scheduler: Annotated[str | None, typer.Option(help="A running dask cluster, e.g. tcp://HOST:8786 (docs/scaling.md).", rich_help_panel="Scale-out", show_default=False)] = None,
    break_lock: Annotated[bool, typer.Option("--break-lock", help="Remove another driver's lock on --out first (only when it is gone).", rich_help_panel="Scale-out")] = False,
    profile: Annotated[Path | None, typer.Option("--profile", metavar="FILE.json", help="Also write rows/s and the time waiting for the loader, teacher and writer as JSON (single-process runs).", rich_help_panel="Run", show_default=False)] = None,
) -> None:
    """Stage one: run teacher(s) over views of DATASET and cache compact records in a Zarr store.

    Re-running the same command resumes (also after Ctrl-C): finished shards are skipped, unfinished ones redone. One driver at a time per store: a second one is refused, naming the holder of OUT/kdcache.lock.
    """
    from kdcache.teach import TeachConfig, Throughput, report_throughput, run_teach

    if profile is not None and (cluster is not None or scheduler is not None):
        raise KdcacheError("--profile measures a single-process run; drop it, or --cluster/--scheduler")
    corr_args: dict[str, Any] = {}
    if loca_alpha is not None:
        corr_args["alpha"] = loca_alpha
    if loca_temperature is not None:
        corr_args["temperature"] = loca_temperature
    cfg = TeachConfig(
        dataset=dataset, teachers=list(teacher), out=out, split=split, k=parse_k(k),
        temperatures=parse_floats(temperatures, "--temperatures"), encoding=encoding,
        max_kl=max_kl, proposal_temperature=proposal_temperature, views=parse_views(views), view_policy=view_policy,
        view_groups=parse_view_groups(view_group or []), image_size=image_size, correction=correction,
        correction_args=corr_args, seed=seed, shard_rows=shard_rows, chunk_rows=chunk_rows,
        batch_size=batch_size, workers=workers, device=device, amp=amp, overwrite=overwrite,
        break_lock=break_lock,
    )
    with interrupted("interrupted; finished blocks are kept: the same command resumes", again()):
        if cluster is not None or scheduler is not None:
            from kdcache.distributed import run_teach_distributed

            with rows_progress("teach (dask)") as report:
                store = run_teach_distributed(cfg, cluster=cluster, scheduler=scheduler, progress=report,
                                              log=console.print)
        else:
            throughput = Throughput()
            with rows_progress("teach") as report:
                store = run_teach(cfg, progress=report, throughput=throughput)
            report_throughput(throughput, cfg, profile, echo=console.print)
    from kdcache.describe import describe

    info = describe(store)
    for name, t in info["teachers"].items():
        console.print(f"[green]cached[/] {name}: blocks {t['blocks_done']}, k={t['k']}, "
                      f"top-1 {_pct(t['teacher_top1'])}, {t['bytes_per_record']:.1f} B/record -> {out}")


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}%"  # x != x: NaN, a run without evaluation


def again(drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    """This command line as typed (`kdcache ...`), without the flags in ``drop``, plus those in ``add``."""
    args = [a for a in sys.argv[1:] if a not in drop]
    return shlex.join(["kdcache", *args, *add])


@contextlib.contextmanager
def interrupted(message: str, command: str | Callable[[], str]) -> Iterator[None]:
    """Ctrl-C: say how to continue (the command that resumes) and exit 130, without a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"\n{message}:\n  {command() if callable(command) else command}", err=True)
        raise typer.Exit(130) from None


@app.command()
@user_errors
def inspect(
    store: Annotated[str, typer.Argument(help="Store path or fsspec URL (file://, s3://, gs://, memory://).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Rows, views, teachers, k, encodings, bytes on disk and per record, accuracy, record error."""
    from kdcache.describe import describe, format_error
    from kdcache.stores.logit_store import LogitStore

    info = describe(LogitStore.open(store))
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    out = Console()
    out.print(f"[bold]{info['url']}[/]  format {info['format']}  dataset {info['dataset']['spec']} "
              f"({info['dataset']['split']})  rows {info['rows']}  views {info['views']} "
              f"({info['view_policy'].get('spec', info['view_policy']['name'])})  shards {info['shards']}  {info['bytes_total'] / 1e6:.2f} MB")
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
            f"record error, mean KL(dense||record) ± SE on {t.get('error_rows')} rows":
                format_error(kl, t.get("kl_by_temperature_se")),
        }
        other = t.get("kl_at_other_temperatures") or {}
        if other:  # what a loss at an undeclared T reads (warned about by `kdcache train`)
            probed = f", {t['probe_rows']} rows" if t.get("probe_rows") else ""
            rows[f"KL at undeclared T (uniform tail){probed}"] = format_error(
                other, t.get("kl_at_other_temperatures_se"))
        grad = t.get("grad_sq_error_by_temperature") or {}
        if grad:  # sampled: KL is infinite (p̂ = 0 off the sample); the KD gradient error instead
            rows["record error, KD grad err² ± SE"] = format_error(grad, t.get("grad_sq_error_by_temperature_se"))
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
    """Check structure, done flags and per-block checksums (data and block stats); with --teacher, replay and
    recompute.

    Exit 0: complete and ok. Exit 3: undamaged but unfinished (it prints how many blocks, and the command).

    Exit 2: damaged (blocks: `kdcache repair STORE`; labels, views, manifest: re-teach --overwrite), or a user error.
    """
    from kdcache.verify import verify as verify_store

    report = verify_store(store, teacher=teacher, samples=samples, seed=seed, device=device)
    for p in report.problems:
        typer.echo(f"problem: {p}", err=True)
    for name, (done, total) in report.blocks_done.items():
        state = "ok" if done == total else f"incomplete ({total - done} unfinished)"
        typer.echo(f"{state}: teacher {name}: {done}/{total} blocks done, checksums match")
    for rep in report.replays:
        typer.echo(f"replay {rep.teacher}: {rep.samples} samples, max |dlogit| {rep.max_abs_diff:.2e}, "
                   f"top-1 agreement {100 * rep.top1_agreement:.1f}%")
    report.raise_for_problems()
    if not report.complete:
        what = ("its creation has not finished" if report.creating else "it has no teacher yet"
                if not report.blocks_done else f"{report.unfinished} block(s) unfinished")
        typer.echo(f"incomplete: {store}: {what}; finish it with: {report.finish_command()}", err=True)
        raise typer.Exit(EXIT_INCOMPLETE)


EXIT_INCOMPLETE = 3  # `kdcache verify`: undamaged, but not finished (2 is damage or a user error)


@app.command()
@user_errors
def repair(
    store: Annotated[str, typer.Argument(help="Store path or fsspec URL (file://, s3://, gs://).")],
    batch_size: Annotated[int | None, typer.Option(help="Teacher batch size (default: the one the store was made with; the block stats depend on it).")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: 0 for in-memory data, else cores-1).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    break_lock: Annotated[bool, typer.Option(help="Remove another driver's lock on STORE first (only when that driver is gone).")] = False,
) -> None:
    """Recompute damaged and unfinished blocks with the store's own recorded settings and teachers.

    Clears the done flags of blocks that fail their checksum or whose done byte is not 0 or 1.

    Redoes them and the unfinished blocks as a rerun of the `kdcache teach` command that made STORE would.

    Damaged labels, views or manifest cannot be recomputed block by block: refused (exit 2); re-teach.
    """
    from kdcache.repair import repair as repair_store

    with rows_progress("repair") as report:
        result = repair_store(store, batch_size=batch_size, workers=workers, device=device, break_lock=break_lock,
                              progress=report)
    for name, bad in result.cleared.items():
        typer.echo(f"damaged: teacher {name}: {len(bad)} block(s) failed their checks (first: {bad[0]})")
    for name, count in result.recomputed.items():
        typer.echo(f"repaired: teacher {name}: {count} block(s) recomputed" if count
                   else f"ok: teacher {name}: nothing to repair")


# train options whose TrainConfig field has another name
OPTION_FIELDS = {"loss_arg": "loss_args", "loca_alpha": "correction_args", "loca_temperature": "correction_args"}


def explicit_fields(ctx: typer.Context) -> set[str]:
    """The TrainConfig fields set on purpose: flags typed or keys of --config, not defaults (they win over
    --recipe, also where they equal the default)."""
    from typer._click.core import ParameterSource

    return {OPTION_FIELDS.get(p.name, p.name) for p in ctx.command.params
            if p.name and ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT)}


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
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="A store made by `kdcache teach`, or a dataset spec (then --loss ce).", show_default=False)],
    *,
    student: Annotated[str, typer.Option(help="resnet8x4, wrn_16_2, small_cnn, tiny_cnn, ..., a torchvision name, timm:NAME or module:factory (`kdcache list models`).", rich_help_panel="Student", show_default=False)],
    image_size: Annotated[int | None, typer.Option(help="Student input size, >= 1 (default: the store's / dataset's).", rich_help_panel="Student", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seeds the student's init and the epoch orders (paired runs).", rich_help_panel="Student")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.", rich_help_panel="Student")] = "auto",
    amp: Annotated[bool, typer.Option(help="bf16 autocast on GPU.", rich_help_panel="Student")] = True,
    recipe: Annotated[str | None, typer.Option(metavar="NAME", help="Paper settings (loss args, LR, epochs, milestones, ...) from `kdcache recipes`; flags you pass win.", rich_help_panel="Loss", show_default=False)] = None,
    loss: Annotated[str, typer.Option(help="ce | kd | dkd | ttm | wttm | clkd | sld (the papers' CIFAR-100 defaults).", rich_help_panel="Loss")] = "kd",
    loss_arg: Annotated[list[str] | None, typer.Option("--loss-arg", metavar="KEY=VALUE", help="Override a loss hyperparameter, e.g. T=4; repeatable.", rich_help_panel="Loss", show_default=False)] = None,
    teacher: Annotated[str | None, typer.Option(help="Which teacher of the store; a,b trains from their ensemble.", rich_help_panel="Loss", show_default=False)] = None,
    correction: Annotated[str, typer.Option(help="none | swap | sort | loca, at train time on an uncorrected store.", rich_help_panel="Loss")] = "none",
    loca_alpha: Annotated[float | None, typer.Option(help="LoCa alpha in (0, 1).", rich_help_panel="Loss", show_default=False)] = None,
    loca_temperature: Annotated[float | None, typer.Option(help="Temperature LoCa calibrates at (one the store declares).", rich_help_panel="Loss", show_default=False)] = None,
    online_teacher: Annotated[str | None, typer.Option(help="Run this teacher live on the same views instead of the cache (the baseline).", rich_help_panel="Loss", show_default=False)] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse, not warn, when the loss reads a T the tail lacks.", rich_help_panel="Loss")] = False,
    epochs: Annotated[int, typer.Option(help="Epochs, >= 1.", rich_help_panel="Schedule")] = 240,
    batch_size: Annotated[int, typer.Option(help="Global batch size, >= 1 (under torchrun each of N processes takes 1/N).", rich_help_panel="Schedule")] = 64,
    lr: Annotated[float | None, typer.Option(help="Base SGD learning rate, > 0 (default: the loss's paper setting, 0.05; sld 0.025).", rich_help_panel="Schedule", show_default=False)] = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum, in [0, 1).", rich_help_panel="Schedule")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay, >= 0.", rich_help_panel="Schedule")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="step (x --lr-decay after each milestone) or cosine.", rich_help_panel="Schedule")] = "step",
    milestones: Annotated[str | None, typer.Option(help="Step-decay epochs, ascending, e.g. 150,180,210 (default: 62.5/75/87.5% of --epochs).", rich_help_panel="Schedule", show_default=False)] = None,
    lr_decay: Annotated[float, typer.Option(help="LR factor at each step milestone, > 0.", rich_help_panel="Schedule")] = 0.1,
    max_steps_per_epoch: Annotated[int | None, typer.Option(help="Cap steps per epoch, >= 1 (smoke tests, benchmarks).", rich_help_panel="Schedule", show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option(help="Where the images are (default: the store's spec); checked by fingerprint.", rich_help_panel="Data", show_default=False)] = None,
    val: Annotated[str | None, typer.Option(help="Evaluation set, a dataset spec (default: the data's test split; with none, no evaluation).", rich_help_panel="Data", show_default=False)] = None,
    view_schedule: Annotated[str, typer.Option(help="cycle (epoch e reads view e mod V; with view groups, slot e mod V of every group) or random.", rich_help_panel="Data")] = "cycle",
    view_policy: Annotated[str, typer.Option(help="Augmentation when training from a dataset spec.", rich_help_panel="Data")] = "identity",
    preload: Annotated[str, typer.Option(help="auto | yes | no: soft labels in RAM, or streamed from the store.", rich_help_panel="Data")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Image DataLoader workers, >= 0 (default: 0 for in-memory data, else cores-1).", rich_help_panel="Data", show_default=False)] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Train on an unfinished store (a stopped `kdcache teach`): only the rows of the shards done in every view, with a warning. Without it such a store is refused.", rich_help_panel="Data")] = False,
    out: Annotated[str, typer.Option("--out", "-o", help="Run directory: config.json, checkpoint.pt, metrics.parquet, student.pt.", rich_help_panel="Run", show_default=False)],
    config: ConfigOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.pt.", rich_help_panel="Run")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --out (its files are deleted first).", rich_help_panel="Run")] = False,
) -> None:
    """Stage two: train a student from a store (no teacher in memory), or from a dataset with --loss ce.

    An existing run in --out needs --resume or --overwrite; Ctrl-C prints the command that resumes.

    Several GPUs: `torchrun --nproc-per-node N -m kdcache.cli train ...` (--batch-size stays global).
    """
    from kdcache.recipes import RecipeViewsWarning, check_recipe, with_recipe
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
        weight_decay=weight_decay, schedule=schedule, milestones=parse_ints(milestones, "--milestones"),
        lr_decay=lr_decay, view_schedule=view_schedule, view_policy=view_policy, preload=preload,
        image_size=image_size, workers=workers, seed=seed, device=device, amp=amp, resume=resume, overwrite=overwrite,
        strict=strict, allow_partial=allow_partial, val=val, max_steps_per_epoch=max_steps_per_epoch, recipe=recipe,
    )
    explicit = explicit_fields(ctx)
    with warnings.catch_warnings():  # refusals first, here; run_train checks again and warns once
        warnings.simplefilter("ignore", RecipeViewsWarning)
        check_recipe(cfg)
    cfg = with_recipe(cfg, explicit)  # resolved here too: the progress and the summary show the recipe's settings

    def resume_command() -> str:  # resumable once an epoch is checkpointed; before that, start again
        if (Path(out) / "checkpoint.pt").is_file():
            return again(drop=("--resume", "--overwrite"), add=("--resume",))
        return again(drop=("--resume", "--overwrite"), add=("--overwrite",)) + "   (no epoch had finished)"

    with interrupted("interrupted; resume with", resume_command), EpochProgress(cfg.epochs, console=console) as shown:
        metrics = run_train(cfg, on_epoch=shown.on_epoch, on_step=shown.on_step, explicit=explicit)
    if os.environ.get("RANK", "0") != "0" or not metrics:  # under torchrun, rank 0 reports
        return
    last = metrics[-1]
    tested = "not evaluated" if last["test_top1"] != last["test_top1"] else f"test top-1 {_pct(last['test_top1'])}"
    console.print(f"[green]trained[/] {student} ({cfg.loss}), {last['epoch']} epochs, {tested} -> {Path(out) / 'student.pt'}")


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
        from kdcache.views import VIEW_OPS

        return [(name, first_doc_line(cls)) for name, cls in VIEW_OPS.items()]
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


@app.command()
@user_errors
def recipes(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="One recipe in full, with the `kdcache teach` flags of a store that fits it.", show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option(help="Only the recipes for this dataset: cifar100 | imagenet.", show_default=False)] = None,
    method: Annotated[str | None, typer.Option(help="Only this method: kd | dkd | kd+sort | dkd+sort | sld | ttm.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """The papers' settings per teacher-student pair and dataset, each from an official config file.

    `kdcache train STORE --recipe NAME` trains with one; the flags you pass win. docs/recipes.md.
    """
    from kdcache.recipes import describe_lines, get_recipe, select, table_lines

    if name is not None:
        recipe = get_recipe(name)
        lines = [json.dumps(recipe.as_dict(), indent=2)] if as_json else describe_lines(recipe)
    else:
        chosen = select(dataset=dataset, method=method)
        if not chosen:
            raise KdcacheError(f"no recipe is for --method {method} on --dataset {dataset}; "
                               "`kdcache recipes` lists them all")
        lines = [json.dumps([r.as_dict() for r in chosen], indent=2)] if as_json else table_lines(chosen)
    for line in lines:
        typer.echo(line)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    sys.exit(app())
