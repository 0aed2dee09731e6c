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

from refact_gguf.errors import TensorError

from .checkpoint import Checkpoint, LazyTensor, RefactConfig

RowReader = Callable[[int, int], np.ndarray]  # (start, stop) → float32 rows


@dataclass(frozen=True)
class OutTensor:
    """One GGUF tensor: its llama.cpp name, numpy shape (rows = output dim) and a row reader."""

    name: str
    shape: tuple[int, ...]
    read: RowReader

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


def _rows_of(t: LazyTensor, begin: int) -> RowReader:
    return lambda start, stop: t.read(begin + start, begin + stop)


def _centre_rows(read: RowReader) -> RowReader:
    def centred(start: int, stop: int) -> np.ndarray:
        rows = read(start, stop)
        return rows - rows.mean(axis=-1, keepdims=True)

    return centred


def _centre_columns(read: RowReader, n_rows: int) -> RowReader:
    # The mean over the output dimension needs every row; these matrices are small (≤ 46 MB f32).
    def centred(start: int, stop: int) -> np.ndarray:
        full = read(0, n_rows)
        return (full - full.mean(axis=0, keepdims=True))[start:stop]

    return centred


def plan(ckpt: Checkpoint, centre: bool = True) -> list[OutTensor]:
    """Every GGUF tensor in llama.cpp's order, validated against the config.

    `centre=False` gives the original weights (the reference model), `True` the faithful GGUF.
    Unknown tensors, missing tensors and wrong shapes are errors, never dropped silently.
    """
    cfg = ckpt.config
    shapes = expected_shapes(cfg)
    readers: dict[str, RowReader] = {}
    embedding: LazyTensor | None = None

    def put(name: str, read: RowReader, shape: tuple[int, ...], source: str) -> None:
        if shape != shapes[name]:
            raise TensorError(f"tensor {source} has shape {list(shape)}, the config needs {list(shapes[name])}")
        if name in readers:
            raise TensorError(f"tensor {source} maps to {name}, which another tensor already provides")
        readers[name] = read

    for hf_name, t in ckpt.tensors.items():
        name = hf_name.removeprefix("transformer.")
        if name == "wte.weight":
            embedding = t
            put("token_embd.weight", _rows_of(t, 0), t.shape, hf_name)
        elif name == "ln_f.weight":
            put("output_norm.weight", _rows_of(t, 0), t.shape, hf_name)
        elif name == "lm_head.weight":
            put("output.weight", _rows_of(t, 0), t.shape, hf_name)
        elif (m := _LAYER.match(name)) and int(m[1]) < cfg.n_layer and m[2] in _DIRECT:
            put(f"blk.{m[1]}.{_DIRECT[m[2]]}.weight", _rows_of(t, 0), t.shape, hf_name)
        elif (m := _LAYER.match(name)) and int(m[1]) < cfg.n_layer and m[2] in _FUSED:
            first, second = (f"blk.{m[1]}.{part}.weight" for part in _FUSED[m[2]])
            split = shapes[first][0]
            if len(t.shape) != 2 or t.shape[0] != split + shapes[second][0]:
                raise TensorError(
                    f"tensor {hf_name} has shape {list(t.shape)}, the config needs "
                    f"{[split + shapes[second][0], cfg.n_embd]}"
                )
            put(first, _rows_of(t, 0), (split, t.shape[1]), hf_name)
            put(second, _rows_of(t, split), (t.shape[0] - split, t.shape[1]), hf_name)
        else:
            raise TensorError(
                f"unknown tensor {hf_name} {list(t.shape)} in the checkpoint",
                "refact-gguf knows GPTRefactForCausalLM's tensors only; nothing was written",
            )
    if "output.weight" not in readers and embedding is not None:
        # Tied head: the *uncentred* embedding, since logits read it as a projection.
        readers["output.weight"] = _rows_of(embedding, 0)
    missing = [n for n in shapes if n not in readers]
    if missing:
        raise TensorError(
            f"checkpoint lacks {len(missing)} tensor(s), first {missing[0]}",
            "is the download complete? (config.json n_layer must match the weights)",
        )

    out = []
    for name, shape in shapes.items():
        read = readers[name]
        if centre and name == "token_embd.weight":
            read = _centre_rows(read)
        elif centre and name.split(".")[-2] in _RESIDUAL_WRITES:
            read = _centre_columns(read, shape[0])
        out.append(OutTensor(name, shape, read))
    return out


def iter_chunks(t: OutTensor, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """A tensor's float32 rows in chunks of at most `max_bytes` (vectors in one piece)."""
    row_bytes = 4 * (int(np.prod(t.shape[1:])) if not t.is_vector else t.shape[0])
    if t.is_vector:
        yield t.read(0, t.rows)
        return
    step = max(1, max_bytes // row_bytes)
    for start in range(0, t.rows, step):
        yield t.read(start, min(t.rows, start + step))
