"""A thin, allocation-free layer over llama.cpp's C API (through llama-cpp-python's ctypes binding).

The high-level `llama_cpp.Llama` cannot turn off the extra buffer types (needed on AMX CPUs) and
does per-token Python work; this keeps the hot path in llama.cpp: one batch per prompt, logits
read in place.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

import llama_cpp
import numpy as np

from .errors import ModelFileError, RefactGGUFError
from .loader import load_model


class TokenCache:
    """A small LRU of text → ids, shared by every slot on a model (thread-safe)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def get(self, text: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._items.pop(text, None)
            if ids is not None:
                self._items[text] = ids  # most recent last
            return ids

    def put(self, text: str, ids: list[int]) -> None:
        with self._lock:
            self._items[text] = tuple(ids)
            while len(self._items) > self.size:
                self._items.pop(next(iter(self._items)))


class Model:
    """A loaded GGUF: vocabulary and weights. Close it (or use `with`) to free the memory."""

    def __init__(self, path: Path, n_gpu_layers: int = 0, vocab_only: bool = False):
        self.ptr = None  # set before anything can fail: __del__ runs on half-built objects too
        self.path = Path(path)
        self.ptr = load_model(self.path, n_gpu_layers, vocab_only)
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self._piece = ctypes.create_string_buffer(256)
        self.token_cache = TokenCache()
        # Tokens that end a completion (end-of-generation and every other control token), as a
        # set: checked per generated token without a call into llama.cpp.
        self.stop_tokens = frozenset(
            t for t in range(self.n_vocab)
            if llama_cpp.llama_vocab_is_eog(self.vocab, t) or llama_cpp.llama_vocab_is_control(self.vocab, t)
        ) if not vocab_only else frozenset()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Text → ids, no BOS. With special=False, "<fim_suffix>" in the text is plain text."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        if n < 0:  # cannot happen for byte-level BPE (≤ 1 token per byte), kept for safety
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, -n, False, special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        return self._piece.raw[:n] if n >= 0 else b""

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Context:
    """An inference context (KV cache) on a Model."""

    def __init__(self, model: Model, n_ctx: int = 2048, n_batch: int = 512, threads: int | None = None):
        self.ptr = None
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        params.no_perf = False
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise RefactGGUFError(f"llama.cpp could not create a context of {n_ctx} tokens", "try a smaller --ctx")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)
        self.n_batch = n_batch
        self._batch = b = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # One sequence, always: its fields are set once. Tokens, positions and output flags are
        # written through numpy views, a slice per batch: item by item through ctypes cost
        # 0.23 ms per 512 tokens, 2% of a GPU's prompt time.
        np.ctypeslib.as_array(b.n_seq_id, shape=(n_batch,))[:] = 1
        for i in range(n_batch):
            b.seq_id[i][0] = 0
        self._tokens = np.ctypeslib.as_array(b.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(n_batch,))
        self._outputs = np.ctypeslib.as_array(b.logits, shape=(n_batch,))
        self._all: list[np.ndarray] = []
        self.n_past = 0

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ptr), True)
        self.n_past = 0

    def keep(self, n: int) -> None:
        """Keep the first `n` cached tokens, drop the rest (the KV-cache reuse primitive)."""
        if n < self.n_past:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ptr), 0, n, -1)
            self.n_past = n

    def remove(self, start: int, stop: int) -> None:
        """Drop the cached positions [start, stop)."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ptr), 0, start, stop)

    def shift(self, start: int, stop: int, delta: int) -> None:
        """Move the cached positions [start, stop) by `delta`. Exact for Refact: ALiBi reads
        positions at attention time, nothing positional is baked into the cached keys."""
        if delta:
            llama_cpp.llama_memory_seq_add(llama_cpp.llama_get_memory(self.ptr), 0, start, stop, delta)

    def decode(self, tokens: list[int], all_logits: bool = False, deadline: float | None = None) -> int:
        """Append tokens to the cache; logits are computed for the last one (or all), not copied.
        Returns how many were decoded: all, unless `deadline` (perf_counter) passed between batches."""
        if self.n_past + len(tokens) > self.n_ctx:
            raise RefactGGUFError(f"{self.n_past + len(tokens)} tokens do not fit the context of {self.n_ctx}", "raise --ctx")
        b = self._batch
        for start in range(0, len(tokens), self.n_batch):
            if deadline is not None and start and time.perf_counter() > deadline:
                return start
            chunk = tokens[start : start + self.n_batch]
            n = b.n_tokens = len(chunk)
            self._tokens[:n] = chunk
            self._pos[:n] = np.arange(self.n_past, self.n_past + n)
            self._outputs[:n] = all_logits
            self._outputs[n - 1] |= start + n == len(tokens)  # the last token's logits, always
            status = llama_cpp.llama_decode(self.ptr, b)
            if status != 0:
                raise RefactGGUFError(f"llama.cpp failed to evaluate the prompt (llama_decode returned {status})")
            self.n_past += len(chunk)
            if all_logits:
                self._all.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ptr), shape=(len(chunk), self.model.n_vocab)).copy())
        return len(tokens)

    def decode_one(self, token: int) -> None:
        """The generation step: one token at the next position, logits on. Only the two fields
        that change are written, so the per-token cost in Python stays a few microseconds."""
        b = self._batch
        if b.n_tokens != 1 or not b.logits[0]:
            b.n_tokens, b.logits[0] = 1, True
        b.token[0] = token
        b.pos[0] = self.n_past
        status = llama_cpp.llama_decode(self.ptr, b)
        if status != 0:
            raise RefactGGUFError(f"llama.cpp failed to decode a token (llama_decode returned {status})")
        self.n_past += 1

    def logits_last(self) -> np.ndarray:
        """A view (no copy) of the last decoded position's logits, valid until the next decode."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ptr, -1), shape=(self.model.n_vocab,))

    def synchronize(self) -> None:
        """Wait for queued GPU work (a no-op on the CPU): timings must include it."""
        llama_cpp.llama_synchronize(self.ptr)

    def eval(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """decode() and return a copy of the logits: of the last token [n_vocab] or all [n, n_vocab]."""
        self._all = []
        self.decode(tokens, all_logits)
        if all_logits:
            return np.concatenate(self._all) if self._all else np.empty((0, self.model.n_vocab), np.float32)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ptr, -1), shape=(self.model.n_vocab,)).copy()

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def sequence_logits(path: Path, tokens: list[int], threads: int | None = None) -> np.ndarray:
    """Logits at every position of one sequence: the check that a GGUF computes what it should."""
    with Model(path) as model, Context(model, n_ctx=max(64, len(tokens)), n_batch=max(32, len(tokens)), threads=threads) as ctx:
        logits = ctx.eval(tokens, all_logits=True)
    if not np.isfinite(logits).all():
        raise ModelFileError(f"{Path(path).name} produced non-finite logits")
    return logits
