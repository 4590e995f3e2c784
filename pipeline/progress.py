"""The rows/s progress bar of long work (stage one, stage two epochs), shared by the CLI and the API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
