"""The CLI's two consoles (results → stdout, progress and errors → stderr) and its progress bars."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress as RichBar,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .progress import Progress

out = Console(highlight=False, soft_wrap=True)  # results: never hard-wrapped, so pipes get whole paths
err = Console(stderr=True, highlight=False)


class RichProgress(Progress):
    """One bar per step on stderr; a finished step leaves a ✓ line with its summary."""

    def __init__(self) -> None:
        self._bar: RichBar | None = None
        self._task = None

    def start(self, label: str, total: float | None = None, unit: str = "") -> None:
        self.finish()
        if not err.is_terminal:  # logs and pipes get the ✓ summary lines only
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        if unit == "B":
            columns += [DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn()]
        else:
            columns += [MofNCompleteColumn(), TimeElapsedColumn()]
        self._bar = RichBar(*columns, console=err, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)

    def advance(self, amount: float = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def update(self, completed: float, total: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total)

    def finish(self, message: str = "") -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if message:
            err.print(f"[green]✓[/] {message}")


def llama_output(verbose: bool) -> None:
    """What a command shows of llama.cpp: its raw log on stderr only with --verbose, and a
    warning when the installed build is known to crash or run slow on this machine."""
    from rich.markup import escape

    from .llama_log import logger
    from .loader import build_problems

    if verbose and not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("llama.cpp: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    for problem in build_problems():
        err.print(f"[yellow]warning:[/] llama.cpp build problem: {escape(problem)}", soft_wrap=True)
        err.print("  → rebuild it: bash scripts/setup.sh", soft_wrap=True)


def humaneval_table(scores):
    """`eval --humaneval`'s table: one row per model and task set."""
    from rich.table import Table

    table = Table(title="HumanEval, greedy, through the server's own task builders and stop rules")
    for col in ("model", "task set", "FIM", "n", "pass@1", "exact", "tokens", "s/task", "stopped by"):
        table.add_column(col, justify="left" if col in ("model", "task set", "FIM", "stopped by") else "right")
    for s in scores:
        stops = ", ".join(f"{k} {v}" for k, v in list(s.stops.items())[:3])
        table.add_row(s.model.removesuffix(".gguf"), s.kind, s.order or "—", str(s.tasks), f"{s.pass1:.1%}",
                      "—" if s.exact is None else f"{s.exact:.1%}", f"{s.mean_tokens:.1f}", f"{s.s_per_task:.2f}", stops)
    return table
