"""HF Refact tensors → llama.cpp `refact` tensors, and the centring that makes them faithful.

llama.cpp's `refact` graph normalises with RMSNorm; the model uses LayerNorm without bias. The
two agree exactly when the residual stream has zero mean over the hidden dimension. LayerNorm
ignores any component along the all-ones direction, so subtracting the mean of every *write* into
the residual stream (token embedding rows; the output dimension of `attn.c_proj` and
`mlp.c_proj`) changes nothing in the model, and afterwards RMSNorm ≡ LayerNorm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import TensorError

from .checkpoint import Checkpoint, LazyTensor, RefactConfig

RowReader = Callable[[int, int], np.ndarray]  # (start, stop) → float32 rows


@dataclass(frozen=True)
class OutTensor:
    """One GGUF tensor: its llama.cpp name, numpy shape (rows = output dim) and a row reader.

    `source` is set when the tensor is the checkpoint's rows unchanged, so a writer whose output
    type equals `source.dtype` can copy the stored bytes instead of converting through float32.
    """

    name: str
    shape: tuple[int, ...]
    read: RowReader
    source: "Slice | None" = None

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def is_vector(self) -> bool:
        return len(self.shape) == 1


_LAYER = re.compile(r"^h\.(\d+)\.(.+)$")
# HF per-layer name → llama.cpp per-layer name, for the tensors that map one to one.
_DIRECT = {
    "ln_1.weight": "attn_norm",
    "attn.q.weight": "attn_q",
    "attn.k.weight": "attn_k",
    "attn.v.weight": "attn_v",
    "attn.c_proj.weight": "attn_output",
    "ln_2.weight": "ffn_norm",
    "mlp.linear_1.weight": "ffn_gate",
    "mlp.linear_3.weight": "ffn_up",
    "mlp.c_proj.weight": "ffn_down",
}
# Fused HF tensors split along the output dimension: (first part, second part).
_FUSED = {"attn.kv.weight": ("attn_k", "attn_v"), "mlp.gate_up_proj.weight": ("ffn_gate", "ffn_up")}
# Tensors whose output is written into the residual stream: centred over their output dimension.
_RESIDUAL_WRITES = {"attn_output", "ffn_down"}


def expected_shapes(cfg: RefactConfig) -> dict[str, tuple[int, ...]]:
    """Numpy shapes (rows = output) of every llama.cpp tensor of a Refact model."""
    e, d, f = cfg.n_embd, cfg.head_dim, cfg.n_ff
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.n_vocab, e)}
    for i in range(cfg.n_layer):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (e,),
            f"blk.{i}.attn_q.weight": (e, e),
            f"blk.{i}.attn_k.weight": (d, e),
            f"blk.{i}.attn_v.weight": (d, e),
            f"blk.{i}.attn_output.weight": (e, e),
            f"blk.{i}.ffn_norm.weight": (e,),
            f"blk.{i}.ffn_gate.weight": (f, e),
            f"blk.{i}.ffn_up.weight": (f, e),
            f"blk.{i}.ffn_down.weight": (e, f),
        })
    shapes["output_norm.weight"] = (e,)
    shapes["output.weight"] = (cfg.n_vocab, e)
    return shapes


@dataclass(frozen=True)
class Slice:
    """Rows [begin, …) of a checkpoint tensor (fused tensors are split by row ranges)."""

    tensor: LazyTensor
    begin: int

    @property
    def dtype(self) -> str:
        return self.tensor.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tensor.read(self.begin + start, self.begin + stop)

    def read_raw(self, start: int, stop: int) -> np.ndarray:
        return self.tensor.read_raw(self.begin + start, self.begin + stop)


def _centre_rows(read: RowReader) -> RowReader:
    def centred(start: int, stop: int) -> np.ndarray:
        rows = read(start, stop)
        rows -= rows.mean(axis=-1, keepdims=True)
        return rows

    return centred


def _centre_columns(read: RowReader, shape: tuple[int, ...]) -> RowReader:
    """Subtract each column's mean over the output dimension. The whole matrix is read once into
    float32 (≤ 46 MB for Refact's c_proj), centred in place, then served chunk by chunk."""
    held: list[np.ndarray] = []

    def centred(start: int, stop: int) -> np.ndarray:
        if not held:
            full = read(0, shape[0])
            full -= full.mean(axis=0, dtype=np.float64).astype(np.float32)
            held.append(full)
        rows = held[0][start:stop]
        if stop >= shape[0]:
            held.clear()  # the writer reads in order: free it after the last chunk
        return rows

    return centred


def plan(ckpt: Checkpoint, centre: bool = True) -> list[OutTensor]:
    """Every GGUF tensor in llama.cpp's order, validated against the config.

    `centre=False` gives the original weights (the reference model), `True` the faithful GGUF.
    Unknown tensors, missing tensors and wrong shapes are errors, never dropped silently.
    """
    cfg = ckpt.config
    shapes = expected_shapes(cfg)
    slices: dict[str, Slice] = {}
    embedding: LazyTensor | None = None

    def put(name: str, piece: Slice, shape: tuple[int, ...], source: str) -> None:
        if shape != shapes[name]:
            raise TensorError(f"tensor {source} has shape {list(shape)}, the config needs {list(shapes[name])}")
        if name in slices:
            raise TensorError(f"tensor {source} maps to {name}, which another tensor already provides")
        slices[name] = piece

    for hf_name, t in ckpt.tensors.items():
        name = hf_name.removeprefix("transformer.")
        if name == "wte.weight":
            embedding = t
            put("token_embd.weight", Slice(t, 0), t.shape, hf_name)
        elif name == "ln_f.weight":
            put("output_norm.weight", Slice(t, 0), t.shape, hf_name)
        elif name == "lm_head.weight":
            put("output.weight", Slice(t, 0), t.shape, hf_name)
        elif (m := _LAYER.match(name)) and int(m[1]) < cfg.n_layer and m[2] in _DIRECT:
            put(f"blk.{m[1]}.{_DIRECT[m[2]]}.weight", Slice(t, 0), t.shape, hf_name)
        elif (m := _LAYER.match(name)) and int(m[1]) < cfg.n_layer and m[2] in _FUSED:
            first, second = (f"blk.{m[1]}.{part}.weight" for part in _FUSED[m[2]])
            split = shapes[first][0]
            if len(t.shape) != 2 or t.shape[0] != split + shapes[second][0]:
                raise TensorError(
                    f"tensor {hf_name} has shape {list(t.shape)}, the config needs "
                    f"{[split + shapes[second][0], cfg.n_embd]}"
                )
            put(first, Slice(t, 0), (split, t.shape[1]), hf_name)
            put(second, Slice(t, split), (t.shape[0] - split, t.shape[1]), hf_name)
        else:
            raise TensorError(
                f"unknown tensor {hf_name} {list(t.shape)} in the checkpoint",
                "refact-gguf knows GPTRefactForCausalLM's tensors only; nothing was written",
            )
    if "output.weight" not in slices and embedding is not None:
        # Tied head: the *uncentred* embedding, since logits read it as a projection.
        slices["output.weight"] = Slice(embedding, 0)
    missing = [n for n in shapes if n not in slices]
    if missing:
        raise TensorError(
            f"checkpoint lacks {len(missing)} tensor(s), first {missing[0]}",
            "is the download complete? (config.json n_layer must match the weights)",
        )

    out = []
    for name, shape in shapes.items():
        piece = slices[name]
        if centre and name == "token_embd.weight":
            out.append(OutTensor(name, shape, _centre_rows(piece.read)))
        elif centre and name.split(".")[-2] in _RESIDUAL_WRITES:
            out.append(OutTensor(name, shape, _centre_columns(piece.read, shape)))
        else:
            out.append(OutTensor(name, shape, piece.read, source=piece))
    return out


def iter_chunks(t: OutTensor, raw: bool = False, max_bytes: int = 16 << 20) -> Iterator[np.ndarray]:
    """A tensor's rows in chunks of at most `max_bytes` as float32 (vectors in one piece);
    with `raw`, the stored values of `t.source` instead."""
    read = t.source.read_raw if raw else t.read
    if t.is_vector:
        yield read(0, t.rows)
        return
    step = max(1, max_bytes // (4 * int(np.prod(t.shape[1:]))))
    for start in range(0, t.rows, step):
        yield read(start, min(t.rows, start + step))
