"""llama.cpp's C API (through llama-cpp-python's ctypes binding): Model, Context, Batch.

The only module that calls `llama_decode`. The high-level `llama_cpp.Llama` cannot turn off the
extra buffer types (needed on AMX CPUs), knows one sequence only and does per-token Python work;
this keeps the hot path in llama.cpp: batches filled through numpy, logits read in place.
"""

from __future__ import annotations

import array
import ctypes
import functools
import os
import threading
from pathlib import Path
from typing import Callable

import gguf
import llama_cpp
import numpy as np

from . import catalog
from .errors import InputError, LlamaError, ModelFileError
from .loader import load_model
from .lru import TextLRU
from .tasks import Sampling


class TokenCache(TextLRU[array.array]):
    """Text → ids, shared by every slot on a model. Bounded by text (lru.py): a keystroke's prompt
    looks up ~11 texts of its file (prefix, suffix, the candidate cuts that fit them), so a count
    sized for a few files made a team's lookups miss (8 typists in whole files, 24 entries: 82 of 96
    missed, ~40 ms a keystroke of tokenizing; held whole: 2 missed, 0.3 ms). Ids as int32 arrays: a
    token costs 4 bytes, not a Python int's 36."""

    def __init__(self, max_chars: int = 16 << 20):  # 16 Mi characters: ~35 MB with their ids, a team's open files many times over
        super().__init__(max_chars)

    def get(self, text: str) -> list[int] | None:
        ids = super().get(text)
        return ids.tolist() if ids is not None else None

    def put(self, text: str, ids: list[int]) -> None:
        super().put(text, array.array("i", ids), len(text))


class Model:
    """A loaded GGUF: vocabulary and weights. Close it (or use `with`) to free the memory."""

    def __init__(self, path: Path, n_gpu_layers: int = 0, vocab_only: bool = False):
        self.ptr = None  # set before anything can fail: __del__ runs on half-built objects too
        self.path = Path(path)
        self.ptr = load_model(self.path, n_gpu_layers, vocab_only)
        self.n_gpu_layers = n_gpu_layers
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self.n_params = llama_cpp.llama_model_n_params(self.ptr)
        # One piece buffer per thread: llama_token_to_piece releases the GIL, and the engine thread
        # detokenizes generated tokens while /tokenize and /detokenize run on others. With one
        # shared buffer a completion came back with another request's token text.
        self._buffers = threading.local()
        self.token_cache = TokenCache()
        # Tokens that end a completion (end-of-generation and every other control token), as a
        # set: checked per generated token without a call into llama.cpp.
        self.stop_tokens = frozenset(
            t for t in range(self.n_vocab)
            if llama_cpp.llama_vocab_is_eog(self.vocab, t) or llama_cpp.llama_vocab_is_control(self.vocab, t)
        ) if not vocab_only else frozenset()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Text → ids, no BOS. With special=False, "<fim_suffix>" in the text is plain text.
        A lone surrogate (valid JSON, not valid text) becomes U+FFFD instead of failing."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            data = text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace").encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, False, special)
        if n < 0:  # cannot happen for byte-level BPE (≤ 1 token per byte), kept for safety
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, -n, False, special)
        return list(buf[:n])

    def tokenize_cached(self, text: str) -> list[int]:
        """tokenize(text) through the model's small LRU (editors resend the same file text)."""
        ids = self.token_cache.get(text)
        if ids is None:
            ids = self.tokenize(text)
            self.token_cache.put(text, ids)
        return ids

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (thread-safe)."""
        buf = getattr(self._buffers, "piece", None)
        if buf is None:
            buf = self._buffers.piece = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n] if n >= 0 else b""

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """An end of generation (end of text, and the like), not just any control token."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

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


class Sampler:
    """llama.cpp's sampler chain for one `Sampling` (top-k, top-p, temperature, then a seeded draw),
    kept for the next task that asks the same and reset, not rebuilt."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.ptr = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for stage in (llama_cpp.llama_sampler_init_top_k(sampling.top_k),
                      llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
                      llama_cpp.llama_sampler_init_temp(sampling.temperature),
                      llama_cpp.llama_sampler_init_dist(sampling.seed)):
            llama_cpp.llama_sampler_chain_add(self.ptr, stage)

    def reset(self) -> None:
        llama_cpp.llama_sampler_reset(self.ptr)

    def sample(self, ctx: Context, row: int) -> int:
        """A token from the logits of batch row `row` of the last decode."""
        return llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, row)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()


def llama_version() -> str:
    """The llama.cpp binding's version (part of a saved state's fingerprint)."""
    return llama_cpp.__version__


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


class Batch:
    """Tokens of one or many sequences for one `llama_decode`, in numpy-owned memory.

    llama.cpp's own `llama_batch_init` allocates a seq-id array per token, which can only be
    written item by item through ctypes (0.23 ms per 512 tokens, 2% of a GPU's prompt time).
    Here every field is a numpy array and each token's seq-id pointer points into one of them,
    so a run of tokens is a slice assignment.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.output = np.zeros(capacity, np.int8)
        self._n_seq_id = np.ones(capacity, np.int32)
        seq_t = ctypes.POINTER(llama_cpp.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_t * capacity)(*(ctypes.cast(base + 4 * i, seq_t) for i in range(capacity)))
        self.raw = llama_cpp.llama_batch(
            0,
            self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            None,
            self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            self._seq_ptrs,
            self.output.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.n = 0
        self.n_outputs = 0

    def clear(self) -> None:
        self.n = self.n_outputs = 0

    def one(self, seq: int, token: int, pos: int) -> None:
        """The batch of one generated token (logits on): only the fields that change are written,
        so a generation step costs a few microseconds of Python."""
        if self.n != 1 or self.n_outputs != 1 or self.seq[0] != seq:
            self.clear()
            self.add(seq, (token,), pos, output_last=True)
        self.token[0] = token
        self.pos[0] = pos

    def add(self, seq: int, tokens, pos: int, output_last: bool = False, output_all: bool = False) -> int:
        """Append `tokens` of sequence `seq` at positions pos, pos+1, …; returns the batch row of
        the last one (where its logits are read, when it is an output)."""
        n, i = len(tokens), self.n
        if i + n > self.capacity:
            raise ValueError(f"batch overflow: {i} + {n} > {self.capacity}")
        self.token[i : i + n] = tokens
        self.pos[i : i + n] = np.arange(pos, pos + n)
        self.seq[i : i + n] = seq
        self.output[i : i + n] = output_all
        if output_last:
            self.output[i + n - 1] = 1
        self.n = i + n
        self.n_outputs += n if output_all else int(output_last)
        return i + n - 1


class Context:
    """An inference context on a Model: a KV cache of `n_seq_max` sequences, each `n_ctx` long.

    With several sequences each gets its own KV stream (`kv_unified = false`): attention then
    reads only that sequence's cells, which llama-batched-bench measures as 2–3× faster than one
    shared stream when the sequences share nothing. The sequence-0 helpers (`decode`,
    `decode_one`, `eval`, `reset`, `n_past`) serve the one-sequence callers: bench, eval.
    """

    def __init__(self, model: Model, n_ctx: int = 2048, n_batch: int = 512, threads: int | None = None, n_seq_max: int = 1):
        self.ptr = None
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq_max
        params.n_seq_max = n_seq_max
        params.kv_unified = False
        flash_attn, ubatch = catalog.load().model.attention(gpu=model.n_gpu_layers > 0)  # measured per backend
        params.flash_attn_type = {None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, ubatch)
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        params.no_perf = False
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not create a context of {n_seq_max} × {n_ctx} tokens", "try a smaller --ctx or --parallel")
        self.n_seq_max = n_seq_max
        self.threads = params.n_threads
        # What a saved sequence state depends on besides the model: llama.cpp refuses a state of
        # another stream count, and the V layout follows flash attention; GPU or CPU for good measure.
        self.state_layout = f"seqs={n_seq_max};flash_attn={flash_attn};gpu={model.n_gpu_layers > 0}"
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ptr)  # per sequence; llama.cpp pads it to 256
        # llama.cpp caps n_batch at the (padded) context: a larger batch would abort in llama_decode.
        self.n_batch = llama_cpp.llama_n_batch(self.ptr)
        self.n_ubatch = llama_cpp.llama_n_ubatch(self.ptr)
        self._memory = llama_cpp.llama_get_memory(self.ptr)
        self.batch = Batch(self.n_batch)
        self._all: list[np.ndarray] = []
        self._views: dict[tuple[int, int], np.ndarray] = {}
        self.n_past = 0

    # ------------------------------------------------------------ sequences and batches

    def run(self, batch: Batch, stop_if: Callable[[], bool] | None = None) -> bool:
        """One `llama_decode` of everything in `batch`. With `stop_if`, llama.cpp asks it between
        the graph's operations (on a CPU) and gives the batch up when it says so: False then; the
        ubatch under way is gone from the cache, the ubatches finished before it stay."""
        raw = batch.raw
        raw.n_tokens = batch.n
        if stop_if is None:
            status = llama_cpp.llama_decode(self.ptr, raw)
        else:
            check = llama_cpp.ggml_abort_callback(lambda _: stop_if())
            llama_cpp.llama_set_abort_callback(self.ptr, check, None)
            try:
                status = llama_cpp.llama_decode(self.ptr, raw)
            finally:  # off again: asked at every operation, it would cost a generated token time
                llama_cpp.llama_set_abort_callback(self.ptr, llama_cpp.ggml_abort_callback(), None)
            if status == 2:
                return False
        if status != 0:
            raise LlamaError(f"llama.cpp failed to decode a batch of {batch.n} tokens (llama_decode returned {status})")
        return True

    def logits(self, n_outputs: int) -> np.ndarray:
        """A view (no copy) of the last batch's output rows, [n_outputs, n_vocab], in batch order;
        valid until the next decode."""
        return self._view(llama_cpp.llama_get_logits(self.ptr), n_outputs)

    def _view(self, pointer, rows: int) -> np.ndarray:
        """float32 [rows, n_vocab] over llama.cpp's logits buffer. Views are kept by address: the
        buffer moves only when llama.cpp grows it, and building one costs ~20 µs, per token."""
        key = (ctypes.addressof(pointer.contents), rows)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 64:
                self._views.clear()
            view = self._views[key] = np.ctypeslib.as_array(pointer, shape=(rows, self.model.n_vocab))
        return view

    def seq_keep(self, seq: int, n: int) -> None:
        """Keep the first `n` cached positions of `seq`, drop the rest."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq, n, -1)

    def seq_remove(self, seq: int, start: int, stop: int) -> None:
        """Drop the cached positions [start, stop) of `seq`."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq, start, stop)

    def seq_shift(self, seq: int, start: int, stop: int, delta: int) -> None:
        """Move the cached positions [start, stop) of `seq` by `delta`. Exact for Refact: ALiBi
        reads positions at attention time, nothing positional is baked into the cached keys."""
        if delta:
            llama_cpp.llama_memory_seq_add(self._memory, seq, start, stop, delta)

    def set_threads(self, n: int) -> None:
        """Decode with `n` threads from the next batch on."""
        llama_cpp.llama_set_n_threads(self.ptr, n, n)
        self.threads = n

    def seq_state(self, seq: int) -> bytearray:
        """A copy of what the KV cache holds for `seq` (llama_state_seq_get_data)."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq)
        state = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data(self.ptr, (ctypes.c_uint8 * size).from_buffer(state), size, seq)
        if written != size:
            raise LlamaError(f"llama.cpp saved {written} of {size} bytes of sequence {seq}'s state")
        return state

    def seq_restore(self, seq: int, state: bytearray, n_tokens: int) -> bool:
        """Replace `seq`'s cache with a saved state of `n_tokens` positions; False (and `seq`
        empty) if llama.cpp refuses it or what it restored is not positions 0..n_tokens-1 (a state
        file is untrusted: a cell at a wild position would wedge the sequence)."""
        self.seq_keep(seq, 0)
        buf = (ctypes.c_uint8 * len(state)).from_buffer(state)
        if llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(state), seq) == 0 or \
                (llama_cpp.llama_memory_seq_pos_min(self._memory, seq),
                 llama_cpp.llama_memory_seq_pos_max(self._memory, seq)) != (0, n_tokens - 1):
            self.seq_keep(seq, 0)
            return False
        return True

    # ------------------------------------------------------------ sequence 0

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)
        self.n_past = 0

    def decode(self, tokens: list[int], all_logits: bool = False) -> None:
        """Append tokens to sequence 0, a batch at a time; logits for the last one (or all)."""
        if self.n_past + len(tokens) > self.n_ctx:
            raise InputError(f"{self.n_past + len(tokens)} tokens do not fit the context of {self.n_ctx}", "raise --ctx")
        b = self.batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            b.clear()
            b.add(0, chunk, self.n_past, output_last=start + len(chunk) == len(tokens), output_all=all_logits)
            self.run(b)
            self.n_past += len(chunk)
            if all_logits:
                self._all.append(self.logits(len(chunk)).copy())

    def decode_one(self, token: int) -> None:
        """The generation step of sequence 0: one token at the next position, logits on."""
        self.batch.one(0, token, self.n_past)
        self.run(self.batch)
        self.n_past += 1

    def logits_last(self) -> np.ndarray:
        """A view (no copy) of the last decoded position's logits, valid until the next decode."""
        return self._view(llama_cpp.llama_get_logits_ith(self.ptr, -1), 1)[0]

    def synchronize(self) -> None:
        """Wait for queued GPU work (a no-op on the CPU): timings must include it."""
        llama_cpp.llama_synchronize(self.ptr)

    def eval(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """decode() and return a copy of the logits: of the last token [n_vocab] or all [n, n_vocab]."""
        self._all = []
        self.decode(tokens, all_logits)
        if all_logits:
            return np.concatenate(self._all) if self._all else np.empty((0, self.model.n_vocab), np.float32)
        return self.logits_last().copy()

    def close(self) -> None:
        if self.ptr:
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


@functools.cache
def _ggml_quantize_chunk():
    """ggml_quantize_chunk from the libggml-base beside the libllama that was loaded
    (LLAMA_CPP_LIB_PATH or the package's lib/)."""
    fn = ctypes.CDLL(str(Path(llama_cpp.llama_cpp._lib._name).parent / "libggml-base.so")).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return fn


def quantize_rows(rows: np.ndarray, qtype: int, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows [n, n_per_row] → their bytes in ggml type `qtype`, through ggml's own quantizer
    (ggml_quantize_chunk: the code llama-quantize runs, K- and IQ-quants included)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, per_row = rows.shape
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    out = np.empty(n * per_row // block * nbytes, np.uint8)
    fn = _ggml_quantize_chunk()
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    written = fn(qtype, rows.ctypes.data, out.ctypes.data, 0, n, per_row, None if weights is None else weights.ctypes.data)
    if written != out.size:
        raise LlamaError(f"ggml quantized {written} of {out.size} bytes")
    return out.reshape(n, -1)


def quantize(base: Path, out: Path, ftype: int, threads: int, importance: dict[str, np.ndarray] | None = None,
             metadata: dict[str, int | str] | None = None) -> bool:
    """llama_model_quantize: write `out` as `ftype` of `base`; False where llama.cpp refused (it
    logged why). `importance`: per tensor, the mean squared activation of each input column (an
    imatrix); `metadata`: keys to write into `out` (how llama-quantize records the imatrix)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    keep = []  # the arrays and names the C entries point into (each loop rebinds them), alive until the call returns
    if importance:
        arr = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, values) in enumerate(sorted(importance.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep += [values, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        arr[len(importance)].name = None
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if metadata:
        kv = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()
        for i, (key, value) in enumerate(metadata.items()):
            kv[i].key = key.encode()
            if isinstance(value, int):
                kv[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                kv[i].value.val_i64 = value
            else:
                kv[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                kv[i].value.val_str = value.encode()[:127]
        kv[len(metadata)].key = b""
        params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    return llama_cpp.llama_model_quantize(str(base).encode(), str(out).encode(), ctypes.byref(params)) == 0
