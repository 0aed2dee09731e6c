"""Where refact-gguf keeps what it writes for the user, and how a file is written: whole or not at all."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def cache_root() -> Path:
    """One cache root for everything refact-gguf keeps: XDG_CACHE_HOME, else ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refact-gguf"


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {path.parent}: {e.strerror}", "choose another -o directory") from None
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"output directory {path.parent} is not writable", "choose another -o directory")
    _remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        # numpy's tofile (gguf-py writes tensors with it) reports a short write without an errno:
        # "4194304 requested and 1168 written". A disk with no room left is what that means here.
        if e.errno == errno.ENOSPC or (e.errno is None and shutil.disk_usage(path.parent).free < FULL):
            raise OutputError(f"disk full while writing {path.name}", f"free space in {path.parent}") from None
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


FULL = 16 << 20  # less free space than this after a short write: the disk is full


def _remove_stale_partials(path: Path) -> None:
    """Temporary files of `path` left by a process that is gone (killed, Ctrl-C): they can be GBs."""
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        pid = stale.name[len(path.name) + 2 : -len(".partial")]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
