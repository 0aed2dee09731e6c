"""refact-gguf's command line: wiring only. Each command calls one library function; `app` holds
what they share, `models`, `use` and `measure` the commands.

Errors are typed in the library and formatted once, in the app's command group: one line, the next
step, and a non-zero exit; the traceback only with REFACT_GGUF_DEBUG=1.
"""

from __future__ import annotations

from . import measure, models, use  # noqa: F401  (each registers its commands on the app)
from .app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
