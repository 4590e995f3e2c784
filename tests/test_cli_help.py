"""`kdcache COMMAND --help` reads at 80 columns: whole option names, no truncated words, no line wider
than the terminal, options grouped in panels; and train's per-epoch line fits 80 columns too."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.progress import EpochProgress, duration, epoch_line

COMMANDS = sorted(typer.main.get_command(app).commands)
PANELS = {"teach": ("Teacher", "Record", "Views", "Run", "Scale-out"),
          "train": ("Student", "Loss", "Schedule", "Data", "Run")}


def render_help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_whole_option_names_within_80_columns(command):
    text = render_help(command)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "…" not in text, [line for line in lines if "…" in line]  # rich truncates what does not fit
    params = typer.main.get_command(app).commands[command].params
    names = ["--help", "-h"] + [opt for p in params if p.param_type_name == "option"
                                for opt in (*p.opts, *p.secondary_opts)]
    tokens = set(re.findall(r"--?[A-Za-z][\w-]*", text))
    missing = [name for name in names if name not in tokens]
    assert not missing, f"option names broken or missing at 80 columns: {missing}"


@pytest.mark.parametrize("command", sorted(PANELS))
def test_teach_and_train_group_their_options_in_panels(command):
    titles = set(re.findall(r"╭─ ([\w-]+) ─", render_help(command)))
    assert set(PANELS[command]) <= titles, titles


def test_the_top_level_help_fits_80_columns():
    text = render_help()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert all(command in text for command in ("teach", "train", "demo"))


def test_an_epoch_line_fits_80_columns_even_for_long_runs():
    row = {"epoch": 239, "train_loss": 12.3456789, "train_top1": 0.98765, "test_top1": float("nan"),
           "rows_per_s": 12_345_678.9, "epoch_seconds": 3600.0}
    line = epoch_line(row, 240, left=3 * 86400.0)
    assert len(line) <= 80, line
    assert line.startswith("epoch 239/240") and "test -" in line and "72h00m left" in line
    assert duration(59.4) == "59 s" and duration(125) == "2m05s" and duration(3 * 3600 + 60) == "3h01m"


def test_epoch_progress_prints_one_line_per_epoch_with_the_time_left(capsys):
    from rich.console import Console

    console = Console(file=None, stderr=True, force_terminal=False, width=80)
    with EpochProgress(3, console=console) as shown:
        for epoch in (1, 2, 3):
            for step in (1, 2):
                shown.on_step(step, 2)  # no terminal: no bar, only the lines
            shown.on_epoch({"epoch": epoch, "train_loss": 1.0, "train_top1": 0.5, "test_top1": 0.25,
                            "rows_per_s": 100.0, "epoch_seconds": 0.01})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert lines[0].endswith("left") and lines[1].endswith("left") and not lines[2].endswith("left")
    assert "test 25.0%" in lines[0]
