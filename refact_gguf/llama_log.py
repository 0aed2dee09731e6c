"""Route llama.cpp's own log (hundreds of lines per load or quantization) into Python.

llama.cpp writes everything to stderr unless a callback is set. We set one for the process: each
complete line goes to the `refact_gguf.llama` logger (silent unless the CLI's --verbose attaches a
handler) and to any listener registered with `listen()` — that is how quantization progress and
llama.cpp's error messages reach the user.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import llama_cpp

logger = logging.getLogger("refact_gguf.llama")
logger.addHandler(logging.NullHandler())
logger.propagate = False

# enum ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the
# previous line). llama-cpp-python's own table predates DEBUG and is off by one.
_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
Listener = Callable[[int, str], None]  # (logging level, line without newline)

_lock = threading.Lock()
_listeners: list[Listener] = []
_pending = {"level": logging.INFO, "text": ""}


def _emit(level: int, line: str) -> None:
    logger.log(level, line)
    for listener in list(_listeners):
        listener(level, line)


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    with _lock:
        if level != 5:
            _pending["level"] = _LEVELS.get(level, logging.INFO)
        _pending["text"] += text.decode("utf-8", errors="replace")
        *lines, _pending["text"] = _pending["text"].split("\n")
        lvl = _pending["level"]
    for line in lines:
        _emit(lvl, line)


def install() -> None:
    """Take llama.cpp's log over (replaces llama-cpp-python's stderr printer). Idempotent."""
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Call `listener(level, line)` for each llama.cpp log line inside the block."""
    install()
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


@contextmanager
def capture_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's warning and error lines, to put in our own error messages."""
    lines: list[str] = []
    with listen(lambda level, line: lines.append(line.strip()) if level >= logging.WARNING and line.strip() else None):
        yield lines


install()
