"""Saved KV caches of prompts: many files stay warm within a memory budget, and survive a restart.

Refact-1.6B keeps 8 KiB of KV per token (one KV head): a 1,500-token file is ~12 MB, so dozens
fit in memory and more on disk. The engine saves a sequence's state before it gives the sequence
to another prompt, and restores the saved state sharing the longest prefix with a prompt that
comes back (`best`). Least recently used states leave memory first; those on disk stay there.

On disk, one file a state under `<directory>/<model file name>/`, written atomically by a writer
thread (the engine never waits on a disk): the model's fingerprint, the token ids and the state,
with a digest over all. A file that is corrupt, truncated, or made for another model file (or
another llama.cpp, or a context of another layout) is deleted when found, never loaded.

The directory is untrusted input: only regular files are opened (no symlink is followed, a FIFO
does not block), partial writes go to fresh files created exclusively, and a directory that
someone else owns or may write is not used. A problem with the disk never stops serving: it is
reported once (`problem`, shown by /health) and the cache goes on in memory.

The disk is written once a file is left alone, not per keystroke: a state saved in memory reaches
the disk when the engine idles (`flush`), when memory evicts it, or at shutdown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .llama import llama_version
from .layout import common_prefix
from .files import cache_root

MAGIC = b"RGGUFKV1"
_HEAD = struct.Struct("<8sI")  # magic, length of the JSON header that follows
MAX_TOKENS = 1 << 20  # more ids than any context holds: a crafted header
log = logging.getLogger("refact_gguf.server")


def default_directory() -> Path:
    """Where saved states live: the user's cache directory (XDG_CACHE_HOME, else ~/.cache)."""
    return cache_root() / "kv"


def model_fingerprint(path: Path) -> str:
    """What a saved state belongs to: this model file (name, size, time, its first MiB: header and
    metadata) read by this llama.cpp, whose state format may change between versions. `bind`
    adds the context's layout."""
    st = path.stat()
    h = hashlib.sha256(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{llama_version()}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()


@dataclass(eq=False)
class Saved:
    """One saved state: the ids its cache holds, in memory (`state`) and/or on disk (`path`)."""

    tokens: np.ndarray
    size: int
    state: bytearray | None = None
    path: Path | None = None  # its file, once written or queued (a state only in memory gets one when it leaves memory, or at a flush)
    used: float = field(default_factory=time.monotonic)


class PromptCache:
    """Saved sequence states, bounded in memory (`memory_bytes`) and on disk (`disk_bytes`; 0 or
    no `directory`: memory only). Thread-safe; the engine thread calls `best`, `load`, `put`."""

    def __init__(self, memory_bytes: int, fingerprint: str = "", directory: Path | None = None, disk_bytes: int = 0,
                 model_name: str = "model", layout: str | None = None):
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes if directory is not None else 0
        self.model_fingerprint = fingerprint
        self.fingerprint = fingerprint
        self._root = Path(directory) if directory is not None else None
        self.directory = self._root / model_name if self.disk_bytes else None
        self._saved: list[Saved] = []
        self._lock = threading.Lock()
        self._writes: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self.layout: str | None = None
        self.rejected = 0  # files found corrupt, truncated, foreign or not regular (deleted where we may)
        self.problem: str | None = None  # why the disk is not used, once it is not
        if layout is not None:
            self.bind(layout)

    def bind(self, layout: str) -> None:
        """Serve a context of `layout` (`Context.state_layout`): states of another layout are
        foreign. The disk is opened here, once the layout is known."""
        if self.layout == layout:
            return
        if self.layout is not None:
            raise ValueError("a prompt cache serves one context layout")
        self.layout = layout
        self.fingerprint = hashlib.sha256(f"{self.model_fingerprint}\0{layout}".encode()).hexdigest()
        if self.directory is None:
            return
        try:
            _own_directory(self._root)
            _own_directory(self.directory)
            self._index()
        except OSError as e:
            self._give_up_disk(f"{self.directory}: {e.strerror or e}")
        if self.directory is not None:
            self._writer = threading.Thread(target=self._write_loop, name="refact-gguf-kv-writer", daemon=True)
            self._writer.start()

    def _give_up_disk(self, why: str) -> None:
        """Serve without the disk cache from now on, saying so once."""
        self.problem = f"KV caches are not kept on disk: {why}"
        log.warning("%s (check --cache-dir, or --cache-disk-mb 0 to keep none)", self.problem)
        with self._lock:
            self.directory, self.disk_bytes = None, 0
            for saved in self._saved:
                saved.path = None
            self._saved = [s for s in self._saved if s.state is not None]

    # ------------------------------------------------------------------ the engine's side

    def best(self, prompt: np.ndarray) -> tuple[Saved | None, int]:
        """The saved state sharing the longest prefix with `prompt`, and that length."""
        with self._lock:
            found, n = None, 0
            for saved in self._saved:
                shared = common_prefix(saved.tokens, prompt)
                if shared > n:
                    found, n = saved, shared
            return found, n

    def load(self, saved: Saved) -> bytearray | None:
        """The state's bytes (read and checked from disk if not in memory, then kept in memory);
        None if it is gone or its file is bad (which is then deleted)."""
        with self._lock:
            saved.used = time.monotonic()
            state, path = saved.state, saved.path
        if state is None and path is not None:
            state = self._read(path, with_state=True)
            with self._lock:
                if state is None:
                    if saved in self._saved:
                        self._saved.remove(saved)
                elif saved in self._saved:
                    saved.state = state
                    self._trim()
        return state

    def discard(self, saved: Saved) -> None:
        """Forget a state llama.cpp would not restore, and delete its file."""
        with self._lock:
            if saved in self._saved:
                self._drop(saved)

    def flush(self) -> None:
        """Queue the states only in memory for the disk."""
        with self._lock:
            for saved in self._saved:
                self._to_disk(saved)

    def put(self, tokens: np.ndarray, state: bytearray, memory: bool = True) -> None:
        """Save the state of a cache holding `tokens`: in memory, reaching the disk later (`flush`,
        eviction) — or, `memory=False`, on disk only, a snapshot of a cache that is still live. A
        state that extends a saved one replaces it; one that a saved state extends adds nothing."""
        tokens = np.array(tokens, np.int32)
        with self._lock:
            for saved in list(self._saved):
                shared = common_prefix(saved.tokens, tokens)
                if shared == len(tokens):  # already there (or more): keep that one
                    saved.used = time.monotonic()
                    if memory and saved.state is None and shared == len(saved.tokens):
                        saved.state = state
                        self._trim()
                    return
                if shared == len(saved.tokens):
                    self._drop(saved)
            if not memory and (self.directory is None or len(state) > self.disk_bytes):
                return
            saved = Saved(tokens, len(state), state)
            self._saved.append(saved)
            if not memory:
                self._to_disk(saved)
                saved.state = None
            self._trim()

    def _to_disk(self, saved: Saved) -> None:
        """Queue `saved` for the writer (under the lock); a state larger than the whole disk budget stays off it."""
        if self.directory is None or saved.path is not None or saved.state is None or saved.size > self.disk_bytes:
            return
        saved.path = self.directory / f"{hashlib.blake2b(saved.tokens.tobytes(), digest_size=12).hexdigest()}.kv"
        self._writes.put((saved.path, saved.tokens, saved.state))

    @property
    def unflushed(self) -> bool:
        """Some state is in memory only, and a disk would keep it."""
        with self._lock:
            return self.directory is not None and any(s.state is not None and s.path is None for s in self._saved)

    @property
    def memory_used(self) -> int:
        with self._lock:
            return sum(s.size for s in self._saved if s.state is not None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._saved)

    def close(self) -> None:
        """Finish the writes under way."""
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join()
            self._writer = None

    # ------------------------------------------------------------------ budgets (under the lock)

    def _trim(self) -> None:
        by_age = sorted(self._saved, key=lambda s: s.used)
        in_memory = sum(s.size for s in by_age if s.state is not None)
        for saved in by_age:
            if in_memory > self.memory_bytes and saved.state is not None:
                in_memory -= saved.size
                self._to_disk(saved)  # leaving memory: the disk keeps it (written once, now)
                saved.state = None
        on_disk = sum(s.size for s in by_age if s.path is not None)
        for saved in by_age:
            if on_disk > self.disk_bytes and saved.path is not None:
                on_disk -= saved.size
                self._writes.put((saved.path, None, None))  # after its own write, if that is queued
                saved.path = None
            if saved.state is None and saved.path is None:
                self._saved.remove(saved)

    def _drop(self, saved: Saved) -> None:
        self._saved.remove(saved)
        if saved.path is not None:
            self._writes.put((saved.path, None, None))

    # ------------------------------------------------------------------ disk

    def _index(self) -> None:
        """Saved states of earlier runs: read their ids (not their states, read when used). Only
        regular files count; a write that a crash interrupted (`*.partial`) is removed."""
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(".partial"):
                    self._remove(Path(entry.path))
                elif entry.name.endswith(".kv"):
                    found.append(Path(entry.path))
        for path in sorted(found, key=lambda p: p.lstat().st_mtime):
            head = self._read(path, with_state=False)
            if head is not None:
                tokens, size = head
                self._saved.append(Saved(tokens, size, None, path, used=-1.0))
        with self._lock:
            self._trim()

    def _remove(self, path: Path) -> None:
        """Delete a file of ours (never what a symlink points to); one we may not delete stays."""
        try:
            if path.is_dir() and not path.is_symlink():
                return
            path.unlink(missing_ok=True)
        except OSError:
            pass

    def _reject(self, path: Path, why: str) -> None:
        self.rejected += 1
        log.warning("KV cache file %s rejected (%s)", path.name, why)
        self._remove(path)

    def _read(self, path: Path, with_state: bool):
        """(ids, state size) from a file's head, or its checked state; None for a bad file, deleted."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:  # deleted meanwhile, or its write is still queued
            return None
        except OSError as e:  # a symlink (ELOOP), no permission, …
            self._reject(path, e.strerror or "cannot open")
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise ValueError("not a regular file")
                magic, n_head = _HEAD.unpack(f.read(_HEAD.size))
                if magic != MAGIC or n_head > 4096:
                    raise ValueError("not a saved state")
                head = json.loads(f.read(n_head))
                if head["model"] != self.fingerprint:
                    raise ValueError("another model file or context layout")
                n, size = int(head["n_tokens"]), int(head["state_bytes"])
                if not (0 < n <= MAX_TOKENS and size > 0):
                    raise ValueError("bad header")
                if st.st_size != _HEAD.size + n_head + 4 * n + size:
                    raise ValueError("truncated")
                tokens = np.frombuffer(f.read(4 * n), "<i4").astype(np.int32)
                if not with_state:
                    return tokens, size
                state = bytearray(size)
                f.readinto(state)
                digest = hashlib.blake2b(tokens.astype("<i4").tobytes())
                digest.update(state)
                if digest.hexdigest() != head["blake2b"]:
                    raise ValueError("corrupt")
                return state
        except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            self._reject(path, str(e) or type(e).__name__)
            return None

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            path, tokens, state = item
            try:
                if state is None:
                    self._remove(path)
                else:
                    self._write(path, tokens, state)
            except OSError as e:  # a full or read-only disk costs the copy on disk, nothing else
                if self.problem is None:
                    self.problem = f"a KV cache could not be written to {path.parent}: {e.strerror or e}"
                    log.warning("%s", self.problem)

    def _write(self, path: Path, tokens: np.ndarray, state) -> None:
        ids = tokens.astype("<i4").tobytes()
        digest = hashlib.blake2b(ids)
        digest.update(state)
        head = json.dumps({"model": self.fingerprint, "n_tokens": len(tokens), "state_bytes": len(state),
                           "blake2b": digest.hexdigest()}).encode()
        # A fresh name, created exclusively and never through a symlink: a name planted in the
        # directory (it is computable from the ids) cannot redirect the write.
        partial = path.with_name(f"{path.name}.{os.urandom(6).hex()}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_HEAD.pack(MAGIC, len(head)))
                f.write(head)
                f.write(ids)
                f.write(state)
            os.replace(partial, path)  # replaces a planted symlink itself, not its target
        finally:
            partial.unlink(missing_ok=True)


def _own_directory(path: Path) -> None:
    """Make `path` (private) or check it: ours, a directory, and nobody else may write it. OSError if not."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(0, "not a directory (a symlink is not followed)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OSError(0, "owned by another user")
    if st.st_mode & 0o022:
        raise OSError(0, "others may write to it")
