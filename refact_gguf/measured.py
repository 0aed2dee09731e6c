"""Quality the user measured with `eval --humaneval`, kept per GGUF file, so `list` and
`recommend` can show it beside size and the choice of quant is by measured quality.

A figure belongs to one file (its path, size and modification time): a file replaced or pulled
again shows none until it is measured again. Kept in the user's cache as quality.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from filelock import FileLock

from .files import cache_root


def store() -> Path:
    return cache_root() / "quality.json"


def _identity(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read() -> dict:
    try:
        data = json.loads(store().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(path: Path, pass1: dict[str, float]) -> None:
    """Keep `pass1` (task set → share passed, e.g. {"complete": 0.31, "line spm": 0.7}) for `path`."""
    from .files import atomic_output  # not at import: list and recommend only read

    path = Path(path).resolve()
    target = store()
    target.parent.mkdir(parents=True, exist_ok=True)  # for the lock, before atomic_output would make it
    with FileLock(str(target) + ".lock"):
        data = _read()
        data[str(path)] = {**_identity(path), "humaneval_pass1": pass1, "measured": time.strftime("%Y-%m-%d")}
        with atomic_output(target) as tmp:
            tmp.write_text(json.dumps(data, indent=1))


def lookup(path: Path | None) -> dict[str, float] | None:
    """HumanEval pass@1 per task set measured on this very file, or None."""
    if path is None or not Path(path).is_file():
        return None
    path = Path(path).resolve()
    entry = _read().get(str(path))
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in _identity(path).items()):
        return None
    figures = entry.get("humaneval_pass1")
    return figures if isinstance(figures, dict) else None


def summary(figures: dict[str, float] | None) -> str:
    """'complete 31.7% · line spm 70.2%', or '—'."""
    return " · ".join(f"{k} {v:.1%}" for k, v in figures.items()) if figures else "—"
