"""Where `run --fim` gets its prefix and suffix: options, files, a cursor position, or stdin."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import InputError, RefactGGUFError

CURSOR = "<CURSOR>"


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                         "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def _read(path: Path) -> str:
    try:
        return _utf8(Path(path).read_bytes(), str(path))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None


def split_at(text: str, line: int, col: int) -> tuple[str, str]:
    """Split `text` at 1-based line/column; the column may sit just past the line's end."""
    lines = text.splitlines(keepends=True) or [""]
    if line > len(lines) + (1 if text.endswith("\n") else 0):
        raise RefactGGUFError(f"--line {line} is past the end of the file ({len(lines)} lines)")
    before = "".join(lines[: line - 1])
    current = lines[line - 1] if line - 1 < len(lines) else ""
    body = current.rstrip("\r\n")
    if col - 1 > len(body):
        raise RefactGGUFError(f"--col {col} is past the end of line {line} ({len(body)} characters)")
    return before + current[: col - 1], current[col - 1 :] + "".join(lines[line:])


def read_fim_input(prefix, suffix, prefix_file, suffix_file, file, line, col, stdin=None) -> tuple[str, str]:
    """(prefix, suffix) from exactly one source; two sources given is an error, never one ignored."""
    given = [name for name, value in (("--prefix", prefix), ("--suffix", suffix), ("--prefix-file", prefix_file),
                                      ("--suffix-file", suffix_file)) if value is not None]
    for a, b in (("--prefix", "--prefix-file"), ("--suffix", "--suffix-file")):
        if a in given and b in given:
            raise InputError(f"{a} and {b} both given", "use one of them")
    if file is not None:
        if given:
            raise InputError(f"--file and {given[0]} both given", "--file with --line/--col places the cursor in the file; leave out "
                             + ", ".join(given))
        if line is None:
            raise RefactGGUFError("--file needs --line (and optionally --col) to place the cursor")
        return split_at(_read(file), line, col)
    if given:
        before = _read(prefix_file) if prefix_file else (prefix or "")
        after = _read(suffix_file) if suffix_file else (suffix or "")
        return before, after
    stream = stdin or sys.stdin
    if stream.isatty():
        raise RefactGGUFError("no code given", f"pass --prefix/--suffix, --file with --line, or pipe code containing {CURSOR}")
    text = _utf8(stream.buffer.read(), "standard input") if hasattr(stream, "buffer") else stream.read()
    if CURSOR not in text:
        raise RefactGGUFError(f"standard input has no {CURSOR} marker", f"put {CURSOR} where the completion goes")
    before, _, after = text.partition(CURSOR)
    return before, after
