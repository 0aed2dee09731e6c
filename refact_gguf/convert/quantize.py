"""Quantize a base GGUF through llama-cpp-python's binding of `llama_model_quantize`."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import llama_cpp
import numpy as np

from .. import llama_log
from ..catalog import Quant
from ..errors import QuantizeError

from .imatrix import Imatrix
from .writer import atomic_output

# llama.cpp logs "[  12/ 291]   blk.1.attn_q.weight - ..." once per tensor.
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def _imatrix_array(imatrix: Imatrix) -> ctypes.Array:
    """The NULL-terminated `llama_model_imatrix_data` array; buffers are kept alive on the Imatrix."""
    names = sorted(imatrix.sums)
    arr = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    keep = []
    for i, name in enumerate(names):
        values = np.ascontiguousarray(imatrix.mean_sq(name), dtype=np.float32)
        keep += [values, name.encode()]
        arr[i].name = keep[-1]
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(names)].name = None
    imatrix._keep[:] = keep
    return arr


def _kv_overrides(items: dict[str, int | str]) -> ctypes.Array:
    """llama-quantize's way of recording the imatrix in the output's metadata."""
    arr = (llama_cpp.llama_model_kv_override * (len(items) + 1))()
    for i, (key, value) in enumerate(items.items()):
        arr[i].key = key.encode()
        if isinstance(value, int):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = value
        else:
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = value.encode()[:127]
    arr[len(items)].key = b""
    return arr


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
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = quant.ftype
    if imatrix is not None:
        params.imatrix = ctypes.cast(_imatrix_array(imatrix), ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        overrides = _kv_overrides({
            "quantize.imatrix.file": imatrix.dataset + ".imatrix",
            "quantize.imatrix.dataset": imatrix.dataset,
            "quantize.imatrix.entries_count": len(imatrix.sums),
            "quantize.imatrix.chunks_count": imatrix.chunks,
        })
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))

    def progress(_level: int, line: str) -> None:
        if m := _TENSOR_LINE.match(line):
            on_tensor(int(m[1]), int(m[2]))

    with atomic_output(out) as tmp, llama_log.capture_errors() as errors, llama_log.listen(progress):
        with _exit_on_ctrl_c(tmp):
            status = llama_cpp.llama_model_quantize(str(base).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            reason = next((e for e in reversed(errors) if "error" in e.lower() or "requires" in e.lower()), None)
            raise QuantizeError(
                f"llama.cpp could not quantize {quant.name}: {reason or 'see --verbose for its log'}",
                "pass --imatrix or let convert compute one" if reason and "imatrix" in reason else None,
            )
