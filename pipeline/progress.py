"""Progress of long work, shared by the CLI, the demo and the API: the rows/s bar of stage one
(``rows_progress``) and stage two's bar within each epoch plus one line per epoch (``EpochProgress``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} rows/s" if task.speed else "- rows/s", style="cyan")


@contextmanager
def rows_progress(description: str, enabled: bool = True, console: Console | None = None
                  ) -> Iterator[Callable[[int, int], None] | None]:
    """``report(done, total)`` drives a bar on stderr that appears only once work starts, so an early
    error stays one line; an error after that clears the bar for the same reason. Disabled: None."""
    if not enabled:
        yield None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                   TimeRemainingColumn(), console=console or Console(stderr=True), transient=False)
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
        if task is not None:
            bar.live.transient = True
        raise
    finally:
        if task is not None:
            bar.stop()


def duration(seconds: float) -> str:
    """12 s, 3m05s, 1h02m: short enough for an 80-column epoch line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def epoch_line(row: dict[str, Any], epochs: int, left: float | None = None) -> str:
    """One epoch of ``run_train``'s metrics in at most 80 columns (test is '-' without an evaluation set)."""
    width = len(str(epochs))
    line = (f"epoch {row['epoch']:>{width}}/{epochs}  loss {row['train_loss']:.4f}  train {_pct(row['train_top1'])}"
            f"  test {_pct(row['test_top1'])}  {row['rows_per_s']:,.0f} rows/s")
    return line if left is None else f"{line}  {duration(left)} left"


class EpochProgress:
    """``run_train``'s ``on_step`` / ``on_epoch`` for a terminal: a transient bar within each epoch (steps,
    time left) and one compact line per epoch with the time the remaining epochs should take (the mean
    wall time of the epochs seen so far, evaluation and checkpoint included; the bar only on a terminal).
    Use it as a context manager, so an error or Ctrl-C clears the bar and the message below it stays readable."""

    def __init__(self, epochs: int, console: Console | None = None, enabled: bool = True, indent: str = "",
                 lines: bool = True):
        self.epochs, self.enabled, self.indent, self.lines = epochs, enabled, indent, lines
        self.console = console or Console(stderr=True)
        self.bar: Progress | None = None
        self.task = None
        self.epoch: int | None = None  # the epoch in progress, once one line was printed
        self.started: float | None = None  # wall clock at the first step of the current epoch
        self.walls: list[float] = []

    def on_step(self, step: int, steps: int) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        if not self.enabled or not self.console.is_terminal:  # a log file gets the epoch lines only
            return
        if self.bar is None:
            name = f"{self.indent}epoch" if self.epoch is None else f"{self.indent}epoch {self.epoch}/{self.epochs}"
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(name, total=steps)
        self.bar.update(self.task, completed=step, total=steps)

    def on_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.close()
        now = time.perf_counter()
        self.walls.append(now - (self.started if self.started is not None else now - row["epoch_seconds"]))
        self.started, self.epoch = now, row["epoch"] + 1
        left = (self.epochs - row["epoch"]) * sum(self.walls) / len(self.walls)
        if self.lines:
            line = epoch_line(row, self.epochs, left if row["epoch"] < self.epochs else None)
            self.console.print(self.indent + line, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
