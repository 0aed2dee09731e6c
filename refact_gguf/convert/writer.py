"""Write a Refact GGUF with gguf-py: metadata first, then tensor data streamed chunk by chunk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .. import __version__
from ..loader import CENTRED_KEY
from .. import tokens as special
from ..files import atomic_output

from .checkpoint import RefactConfig
from .refact import OutTensor, iter_chunks
from .vocab import Vocab

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_SOURCE_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16}
ALIBI_MAX_BIAS = 8.0  # Refact's; llama.cpp hard-codes it for this architecture too


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _encode(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return rows.astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        return rows.astype(np.float16)
    return gguf.quants.quantize(rows, qtype)


def write_metadata(w: gguf.GGUFWriter, cfg: RefactConfig, vocab: Vocab, file_type: int, source: str,
                   centred: bool = True) -> None:
    ids = vocab.special_ids
    w.add_name(cfg.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_license("bigscience-openrail-m")
    w.add_source_repo_url(source)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(cfg.eps)
    w.add_max_alibi_bias(ALIBI_MAX_BIAS)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("refact")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(ids["eos"])
    w.add_eos_token_id(ids["eos"])
    w.add_unk_token_id(ids["eos"])
    w.add_eot_token_id(ids["eos"])
    w.add_pad_token_id(ids["fim_pad"])
    w.add_add_bos_token(False)
    w.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, ids["fim_pre"])
    w.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, ids["fim_suf"])
    w.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, ids["fim_mid"])
    w.add_uint32(gguf.Keys.Tokenizer.FIM_PAD_ID, ids["fim_pad"])
    w.add_chat_template(special.CHAT_TEMPLATE)
    if centred:
        w.add_bool(CENTRED_KEY, True)
    w.add_string("refact_gguf.version", __version__)


def write_gguf(
    path: Path,
    cfg: RefactConfig,
    vocab: Vocab,
    tensors: list[OutTensor],
    outtype: str,
    source: str,
    on_bytes: Callable[[int], None] = lambda n: None,
    centred: bool = True,
) -> None:
    """Write the GGUF atomically; `on_bytes` reports progress in bytes of output written. `centred`:
    whether `tensors` are (the mark a faithful file carries)."""
    qtype, file_type = OUTTYPES[outtype]
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.REFACT])
        try:
            write_metadata(w, cfg, vocab, int(file_type), source, centred)
            types = {}
            for t in tensors:
                # Norm vectors stay f32, as in llama.cpp's converter.
                types[t.name] = gguf.GGMLQuantizationType.F32 if t.is_vector else qtype
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, types[t.name]), raw_dtype=types[t.name])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]
            for t in tensors:
                # Stream: align, write row chunks, pad (what GGUFWriter.write_tensor_data does in one piece).
                w.write_padding(fout, fout.tell())
                written = 0
                # Unchanged tensors already stored in the output type are copied byte for byte.
                raw = t.source is not None and _SOURCE_TYPES.get(t.source.dtype) == types[t.name]
                for rows in iter_chunks(t, raw=raw):
                    data = rows if raw else _encode(rows, types[t.name])
                    data.tofile(fout)
                    written += data.nbytes
                    on_bytes(data.nbytes)
                w.write_padding(fout, written)
            fout.flush()
            os.fsync(fout.fileno())
        finally:
            w.close()


def expected_size(tensors: list[OutTensor], outtype: str) -> int:
    qtype, _ = OUTTYPES[outtype]
    return sum(_nbytes(t.shape, gguf.GGMLQuantizationType.F32 if t.is_vector else qtype) for t in tensors)
