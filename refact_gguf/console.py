"""The CLI's two consoles (results → stdout, progress and errors → stderr) and its progress bars."""

from __future__ import annotations

import json
import logging
import sys
from typing import Collection, Iterable, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
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

# Results: never through markup (a path `m[x]y` or code `b[red]` is printed as it is) and never
# hard-wrapped or cut, so pipes and files get whole paths and whole table rows.
out = Console(highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, highlight=False)  # messages: markup for style; user text goes in escaped


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
            err.print(f"[green]✓[/] {escape(message)}")


def llama_output(verbose: bool) -> None:
    """What a command shows of llama.cpp: its raw log on stderr only with --verbose, and a
    warning when the installed build is known to crash or run slow on this machine."""
    from .loader import logger
    from .loader import build_problems

    if verbose and not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("llama.cpp: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    for problem in build_problems():
        err.print(f"[yellow]warning:[/] llama.cpp build problem: {escape(problem)}", soft_wrap=True)
        err.print("  → rebuild it: bash scripts/setup.sh", soft_wrap=True)


def server_log(requests: bool) -> None:
    """What `serve` says while it runs, on stderr as plain lines: its warnings (a keys file read
    again, a cache problem, what a Ctrl-C waits for) and, with `requests`, a line per request."""
    for name, level, fmt in (("refact_gguf.server", logging.WARNING, "warning: %(message)s"),
                             ("refact_gguf.requests", logging.INFO, "%(message)s")):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(fmt))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level if name != "refact_gguf.requests" or requests else logging.WARNING)


def show(data, as_json: bool, title: str, columns: Sequence[str], rows: Iterable[Sequence],
         left: Collection[str] = (), stream: Console = out) -> None:
    """A command's result: `data` as JSON on stdout for scripts (`--json`), else a table of `rows`
    for people (numbers right-aligned; the first column and those in `left` left-aligned). A row
    may hold more cells than `columns`: the extra ones are left out."""
    if as_json:
        out.print_json(json.dumps(data))
        return
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 or col in left else "right", min_width=len(col))
    for row in rows:
        table.add_row(*row[: len(columns)])
    stream.print(table)
