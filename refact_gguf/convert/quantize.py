"""Quantize a base GGUF with llama.cpp (`llama.quantize`): progress, Ctrl-C, a clear error."""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .. import llama
from ..loader import capture_errors, listen
from ..catalog import Quant
from ..errors import QuantizeError

from .imatrix import Imatrix
from ..files import atomic_output

# llama.cpp logs "[  12/ 291]   blk.1.attn_q.weight - ..." once per tensor.
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


@contextmanager
def _exit_on_ctrl_c(partial: Path) -> Iterator[None]:
    """Ctrl-C while llama.cpp quantizes: Python raises KeyboardInterrupt inside the log callback,
    where ctypes swallows it, and quantizing went on. Exit at once instead (130, as for SIGINT),
    removing the `partial` output first (an exit this abrupt skips atomic_output's own cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        partial.unlink(missing_ok=True)  # llama.cpp may still hold it open: the name goes, the space with the process
        os.write(2, b"\ninterrupted\n")
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def quantize(
    base: Path,
    out: Path,
    quant: Quant,
    imatrix: Imatrix | None = None,
    threads: int | None = None,
    on_tensor: Callable[[int, int], None] = lambda done, total: None,
) -> None:
    """Write `out` (atomically) as `quant` of `base`; `on_tensor(done, total)` reports progress."""
    importance = metadata = None
    if imatrix is not None:
        importance = {name: imatrix.mean_sq(name) for name in imatrix.sums}
        metadata = {
            "quantize.imatrix.file": imatrix.dataset + ".imatrix",
            "quantize.imatrix.dataset": imatrix.dataset,
            "quantize.imatrix.entries_count": len(imatrix.sums),
            "quantize.imatrix.chunks_count": imatrix.chunks,
        }

    def progress(_level: int, line: str) -> None:
        if m := _TENSOR_LINE.match(line):
            on_tensor(int(m[1]), int(m[2]))

    with atomic_output(out) as tmp, capture_errors() as errors, listen(progress):
        with _exit_on_ctrl_c(tmp):
            done = llama.quantize(base, tmp, quant.ftype, threads or os.cpu_count() or 1, importance, metadata)
        if not done:
            reason = next((e for e in reversed(errors) if "error" in e.lower() or "requires" in e.lower()), None)
            raise QuantizeError(
                f"llama.cpp could not quantize {quant.name}: {reason or 'see --verbose for its log'}",
                "pass --imatrix or let convert compute one" if reason and "imatrix" in reason else None,
            )
