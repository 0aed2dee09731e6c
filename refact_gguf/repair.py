"""Make a published Refact GGUF faithful without its checkpoint.

llama.cpp's converter writes Refact's weights as they are, and its `refact` graph normalises with
RMSNorm where the model uses LayerNorm (without bias). The difference is the mean of the residual
stream; `convert` removes it at the source by centring every write into that stream, after which
RMSNorm ≡ LayerNorm. The same can be done to a published file: the token embedding's rows and the
output dimension of every `attn_output` and `ffn_down` are dequantized, centred as `convert` centres
them, and quantized again in the type each was stored in, by ggml's own quantizer. The other tensors
are copied byte for byte. What it cannot undo is the published file's rounding of those tensors.

The result carries the centring mark and the published file's sha256 (`loader.REPAIRED_KEY`).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from .files import atomic_output
from .errors import ModelFileError
from .llama import quantize_rows
from .loader import CENTRED_KEY, REPAIRED_KEY, inspect
from .progress import Progress

_RESIDUAL_WRITE = re.compile(r"blk\.\d+\.(attn_output|ffn_down)\.(weight|bias)")
_FLOATS = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


def repair(src: Path, dst: Path, published_sha256: str = "", progress: Progress | None = None) -> Path:
    """Write `dst`: `src` with its residual writes centred. `src` must be an uncentred Refact GGUF."""
    progress = progress or Progress()
    if inspect(src).centred:
        raise ModelFileError(f"{Path(src).name} is faithful already (its residual writes are centred)")
    reader = gguf.GGUFReader(src)
    tensors = {t.name: t for t in reader.tensors}
    writer_arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.REFACT]
    progress.start(f"repair {Path(src).name}", len(tensors))
    with atomic_output(Path(dst)) as tmp:
        w = gguf.GGUFWriter(tmp, writer_arch)
        try:
            for field in reader.fields.values():
                if field.name.startswith("GGUF.") or field.name in ("general.architecture", CENTRED_KEY, REPAIRED_KEY):
                    continue
                vtype = field.types[0]
                w.add_key_value(field.name, field.contents(), vtype,
                                sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
            w.add_bool(CENTRED_KEY, True)
            w.add_string(REPAIRED_KEY, published_sha256 or "unknown")
            if "output.weight" not in tensors:  # a tied head reads the embedding as it was: keep a copy for it
                _add_raw(w, "output.weight", tensors["token_embd.weight"])
            for name, t in tensors.items():
                if name == "token_embd.weight":
                    _add(w, name, t, lambda x: x - x.mean(axis=-1, keepdims=True))  # each row
                elif _RESIDUAL_WRITE.fullmatch(name):
                    # a weight: each column over the output dimension (its rows); a bias: its one column
                    axis = 0 if name.endswith(".weight") else -1
                    _add(w, name, t, lambda x, a=axis: x - x.mean(axis=a, keepdims=True, dtype=np.float64).astype(np.float32))
                else:
                    _add_raw(w, name, t)
                progress.advance()
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    progress.finish(f"{Path(dst).name}: residual writes centred")
    return Path(dst)


def _add_raw(w: gguf.GGUFWriter, name: str, t) -> None:
    """Copy a tensor as stored (its bytes, its type)."""
    w.add_tensor(name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)


def _add(w: gguf.GGUFWriter, name: str, t, centre) -> None:
    """Dequantize, centre, store again in the tensor's own type."""
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    x = centre(np.asarray(dequantize(t.data, qtype), dtype=np.float32).reshape(-1, int(t.shape[0])))
    data = x.astype(_FLOATS[qtype]) if qtype in _FLOATS else quantize_rows(x, int(qtype))
    w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
