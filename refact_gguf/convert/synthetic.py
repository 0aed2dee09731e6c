"""A synthetic GPTRefactForCausalLM checkpoint: the real architecture and tokenizer, random weights.

Used by the tests, the benchmarks (full size) and the offline quickstart, so everything can run
without the Hub. Weights carry a deliberate mean offset on every write into the residual stream,
so a converter that skips the LayerNorm→RMSNorm centring is caught.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..catalog import ffn_width
from ..files import atomic_output

SYNTHETIC_NAME = "Refact-1_6B-fim-SYNTHETIC-random-weights"
_TORCH_DTYPE = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", None)}


@dataclass(frozen=True)
class SyntheticSpec:
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_vocab: int = 49216
    n_ctx: int = 4096
    fused: bool = True  # attn.kv + mlp.gate_up_proj (released) vs attn.k/v + mlp.linear_1/3
    tied: bool = False  # lm_head tied to transformer.wte
    dtype: str = "float16"  # float32 | float16 | bfloat16
    offset: float = 0.05  # mean offset of residual writes (embedding rows, c_proj outputs)
    seed: int = 0

    @classmethod
    def full_size(cls, **kw) -> SyntheticSpec:
        """The released shape: 32 layers × 2048, 32 heads."""
        return cls(n_layer=32, n_embd=2048, n_head=32, **kw)

    @property
    def n_ff(self) -> int:
        return ffn_width(self.n_embd)


def tokenizer_json() -> str:
    """Refact-1.6B's HF tokenizer.json, rebuilt from llama.cpp's vocab (shipped as package data)."""
    return gzip.decompress(resources.files("refact_gguf").joinpath("data/refact-tokenizer.json.gz").read_bytes()).decode()


def _tensors(spec: SyntheticSpec) -> Iterator[tuple[str, tuple[int, ...], "callable"]]:
    """(name, shape, make) in checkpoint order; `make()` draws the values when written."""
    e, d, f = spec.n_embd, spec.n_embd // spec.n_head, spec.n_ff
    rng = np.random.default_rng(spec.seed)
    std = 0.02

    def normal(shape, offset=0.0, scale=std):
        def make():
            return rng.standard_normal(shape, dtype=np.float32) * scale + offset
        return make

    def norm_weight():
        return lambda: (1.0 + 0.1 * rng.standard_normal(e, dtype=np.float32))

    def residual_write(shape):
        # A per-input-column offset: the mean over the output dimension is far from zero.
        def make():
            return rng.standard_normal(shape, dtype=np.float32) * std + spec.offset * rng.standard_normal(shape[1], dtype=np.float32)
        return make

    yield "transformer.wte.weight", (spec.n_vocab, e), normal((spec.n_vocab, e), spec.offset)
    for i in range(spec.n_layer):
        p = f"transformer.h.{i}."
        yield p + "ln_1.weight", (e,), norm_weight()
        yield p + "attn.q.weight", (e, e), normal((e, e), 0.0, 0.5 / np.sqrt(e))
        if spec.fused:
            yield p + "attn.kv.weight", (2 * d, e), normal((2 * d, e), 0.0, 0.5 / np.sqrt(e))
        else:
            yield p + "attn.k.weight", (d, e), normal((d, e), 0.0, 0.5 / np.sqrt(e))
            yield p + "attn.v.weight", (d, e), normal((d, e), 0.0, 0.5 / np.sqrt(e))
        yield p + "attn.c_proj.weight", (e, e), residual_write((e, e))
        yield p + "ln_2.weight", (e,), norm_weight()
        if spec.fused:
            yield p + "mlp.gate_up_proj.weight", (2 * f, e), normal((2 * f, e), 0.0, 1.0 / np.sqrt(e))
        else:
            yield p + "mlp.linear_1.weight", (f, e), normal((f, e), 0.0, 1.0 / np.sqrt(e))
            yield p + "mlp.linear_3.weight", (f, e), normal((f, e), 0.0, 1.0 / np.sqrt(e))
        yield p + "mlp.c_proj.weight", (e, f), residual_write((e, f))
    yield "transformer.ln_f.weight", (e,), norm_weight()
    if not spec.tied:
        yield "lm_head.weight", (spec.n_vocab, e), normal((spec.n_vocab, e), 0.0, 1.0 / np.sqrt(e))


def _encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        bits = values.astype(np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
    return values.astype(_TORCH_DTYPE[dtype][1]).tobytes()


def write_checkpoint(directory: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write config.json, model.safetensors and the tokenizer files; tensors are streamed."""
    shape = {"n_layer": spec.n_layer, "n_embd": spec.n_embd, "n_head": spec.n_head, "n_positions": spec.n_ctx,
             "vocab_size": spec.n_vocab, "tie_word_embeddings": spec.tied}
    return write_hf_checkpoint(directory, SYNTHETIC_NAME, shape, _tensors(spec), spec.dtype)


def write_hf_checkpoint(directory: Path, name: str, shape: dict, tensors: Iterable[tuple[str, tuple[int, ...], Callable]],
                        dtype: str = "float32") -> Path:
    """A GPTRefactForCausalLM checkpoint as Refact's own: config.json (`shape` gives n_layer, n_embd,
    n_head, n_positions, vocab_size, tie_word_embeddings), model.safetensors from `tensors`
    ((HF name, shape, make) in order, `make()` giving float32 values when written) and the
    tokenizer files. Also used for the trained stand-in (scripts/train_standin.py)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["GPTRefactForCausalLM"],
        "model_type": "gpt_refact",
        "_name_or_path": name,
        **shape,
        "layer_norm_epsilon": 1e-5,
        "multi_query": True,
        "bos_token_id": -1,
        "eos_token_id": 0,
        "torch_dtype": dtype,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "model_max_length": shape["n_positions"], "tokenizer_class": "GPT2Tokenizer",
    }, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }, indent=2))

    st_dtype = _TORCH_DTYPE[dtype][0]
    itemsize = 4 if dtype == "float32" else 2
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_output(directory / "model.safetensors") as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, _, make in tensors:
            f.write(_encode(make(), dtype))
    return directory
