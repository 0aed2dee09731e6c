"""Saved KV caches of prompts: many files stay warm within a memory budget, and survive a restart.

Refact-1.6B keeps 8 KiB of KV per token (one KV head): a 1,500-token file is ~12 MB, so dozens
fit in memory and more on disk. The engine saves a sequence's state before it gives the sequence
to another prompt, and restores the saved state sharing the longest prefix with a prompt that
comes back (`best`). Least recently used states leave memory first; those on disk stay there.

On disk, one file a state under `<directory>/<model file name>/`, written atomically by a writer
thread (the engine never waits on a disk): the model's fingerprint, the token ids and the state,
with a digest over all. A file that is corrupt, truncated, or made for another model file (or
another llama.cpp) is deleted when found, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from .errors import OutputError
from .runtime import common_prefix
from .userdirs import cache_root

MAGIC = b"RGGUFKV1"
_HEAD = struct.Struct("<8sI")  # magic, length of the JSON header that follows


def default_directory() -> Path:
    """Where saved states live: the user's cache directory (XDG_CACHE_HOME, else ~/.cache)."""
    return cache_root() / "kv"


def default_memory_mb() -> int:
    """A memory budget for saved states: an eighth of the available RAM, at most 1 GiB (~80 files)."""
    from .select import free_memory

    return min(1024, free_memory().ram_available // 8 >> 20)


def model_fingerprint(path: Path) -> str:
    """What a saved state belongs to: this model file (name, size, time, its first MiB: header and
    metadata) read by this llama.cpp, whose state format may change between versions."""
    st = path.stat()
    h = hashlib.sha256(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{llama_cpp.__version__}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()


@dataclass(eq=False)
class Saved:
    """One saved state: the ids its cache holds, in memory (`state`) and/or on disk (`path`)."""

    tokens: np.ndarray
    size: int
    state: bytearray | None = None
    path: Path | None = None
    used: float = field(default_factory=time.monotonic)


class PromptCache:
    """Saved sequence states, bounded in memory (`memory_bytes`) and on disk (`disk_bytes`; 0 or
    no `directory`: memory only). Thread-safe; the engine thread calls `best`, `load`, `put`."""

    def __init__(self, memory_bytes: int, fingerprint: str = "", directory: Path | None = None, disk_bytes: int = 0,
                 model_name: str = "model"):
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes if directory is not None else 0
        self.fingerprint = fingerprint
        self.directory = Path(directory) / model_name if self.disk_bytes else None
        self._saved: list[Saved] = []
        self._lock = threading.Lock()
        self._writes: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self.rejected = 0  # files found corrupt, truncated or foreign (deleted)
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot keep KV caches in {self.directory}: {e.strerror}",
                                  "choose another --cache-dir, or --cache-disk-mb 0 to keep none on disk") from None
            self._index()
            self._writer = threading.Thread(target=self._write_loop, name="refact-gguf-kv-writer", daemon=True)
            self._writer.start()

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
        """The state's bytes (read and checked from disk if not in memory); None if it is gone or
        its file is bad (which is then deleted)."""
        with self._lock:
            saved.used = time.monotonic()
            state, path = saved.state, saved.path
        if state is None and path is not None:
            state = self._read(path, with_state=True)
            if state is None:
                self._forget(saved)
        return state

    def put(self, tokens: np.ndarray, state: bytearray, memory: bool = True) -> None:
        """Save the state of a cache holding `tokens`: in memory and on disk (`memory=False`: on
        disk only, a snapshot of a cache that is still live). A state that extends a saved one
        replaces it; one that a saved state extends adds nothing."""
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
            saved = Saved(tokens, len(state), state if memory else None)
            if self.directory is None and not memory:
                return
            self._saved.append(saved)
            if self.directory is not None:
                saved.path = self.directory / f"{hashlib.blake2b(tokens.tobytes(), digest_size=12).hexdigest()}.kv"
                self._writes.put((saved.path, tokens, state))
            self._trim()

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
        on_disk = sum(s.size for s in by_age if s.path is not None)
        for saved in by_age:
            if in_memory > self.memory_bytes and saved.state is not None:
                in_memory -= saved.size
                saved.state = None
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

    def _forget(self, saved: Saved) -> None:
        with self._lock:
            if saved in self._saved:
                self._saved.remove(saved)

    # ------------------------------------------------------------------ disk

    def _index(self) -> None:
        """Saved states of earlier runs: read their ids (not their states, read when used)."""
        files = sorted(self.directory.glob("*.kv"), key=lambda p: p.stat().st_mtime)
        for path in files:
            found = self._read(path, with_state=False)
            if found is not None:
                tokens, size = found
                self._saved.append(Saved(tokens, size, None, path, used=-1.0))
        for stale in self.directory.glob("*.kv.partial"):  # a write that a crash interrupted
            stale.unlink(missing_ok=True)
        with self._lock:
            self._trim()

    def _read(self, path: Path, with_state: bool):
        """(ids, state size) from a file's head, or its checked state; None for a bad file, deleted."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # deleted meanwhile, or its write is still queued
            return None
        except OSError:
            self.rejected += 1
            return None
        try:
            with f:
                magic, n_head = _HEAD.unpack(f.read(_HEAD.size))
                if magic != MAGIC or n_head > 4096:
                    raise ValueError("not a saved state")
                head = json.loads(f.read(n_head))
                if head["model"] != self.fingerprint:
                    raise ValueError("another model file")
                n, size = int(head["n_tokens"]), int(head["state_bytes"])
                if os.fstat(f.fileno()).st_size != _HEAD.size + n_head + 4 * n + size:
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
        except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
            self.rejected += 1
            path.unlink(missing_ok=True)
            return None

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            path, tokens, state = item
            try:
                if state is None:
                    path.unlink(missing_ok=True)
                else:
                    self._write(path, tokens, state)
            except OSError:  # a full or read-only disk costs the copy on disk, nothing else
                pass

    def _write(self, path: Path, tokens: np.ndarray, state) -> None:
        ids = tokens.astype("<i4").tobytes()
        digest = hashlib.blake2b(ids)
        digest.update(state)
        head = json.dumps({"model": self.fingerprint, "n_tokens": len(tokens), "state_bytes": len(state),
                           "blake2b": digest.hexdigest()}).encode()
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as f:
                f.write(_HEAD.pack(MAGIC, len(head)))
                f.write(head)
                f.write(ids)
                f.write(state)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
