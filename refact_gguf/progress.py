"""The progress callbacks long library calls accept; the library never prints, the CLI renders."""

from __future__ import annotations


class Progress:
    """Default: report nothing. The CLI subclasses it with rich progress bars."""

    def start(self, label: str, total: float | None = None, unit: str = "") -> None:
        """A new step begins; `unit` is "B" for bytes, "" for items."""

    def advance(self, amount: float = 1) -> None:
        """Some of the current step's total is done."""

    def update(self, completed: float, total: float | None = None) -> None:
        """Absolute position of the current step."""

    def finish(self, message: str = "") -> None:
        """The current step ended; `message` summarises it."""
