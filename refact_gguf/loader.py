"""Open a Refact GGUF safely: validate it first, then load it in a way that cannot crash on AMX CPUs.

A truncated or foreign file must be a clear error, never a segfault inside llama.cpp; and a
llama.cpp built with AMX segfaults on AMX CPUs for K-quants (llama.cpp#20824), so such a build
loads with the extra (repacking) buffer types off.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp

from . import llama_log
from .errors import ModelFileError

ARCH = "refact"


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    name: str
    file_type: int
    n_tensors: int
    size: int
    centred: bool  # converted by refact-gguf (LayerNorm-faithful)


def inspect(path: Path) -> GGUFInfo:
    """Check magic, version, architecture and that every tensor's data lies inside the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path.name} is not a GGUF file (bad magic {magic!r})", "re-download or re-convert it")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors… on damaged headers
        raise ModelFileError(f"{path.name} is truncated or corrupt ({type(e).__name__}: {e})", "re-download or re-convert it") from None
    fields = reader.fields

    def value(key: str, default=None):
        f = fields.get(key)
        return f.contents() if f is not None else default

    arch = value("general.architecture", "")
    if arch != ARCH:
        raise ModelFileError(f"{path.name} is a {arch or 'unknown'} model, not Refact ({ARCH})")
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{path.name} is truncated: tensor {t.name} ends past the end of the file", "re-download or re-convert it")
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=str(value("general.name", path.stem)),
        file_type=int(value("general.file_type", -1)),
        n_tensors=len(reader.tensors),
        size=size,
        centred=bool(value("refact_gguf.residual_centred", False)),
    )


@functools.cache
def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode(errors="replace")


@functools.cache
def cpu_has_amx() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_int8" in flags or "amx_tile" in flags


def build_has_amx() -> bool:
    return "AMX_INT8 = 1" in system_info()


def repack_safe() -> bool:
    """Whether llama.cpp's extra buffer types (weight repacking) can be used on this machine."""
    return not (cpu_has_amx() and build_has_amx())


def model_params(n_gpu_layers: int = 0, vocab_only: bool = False) -> llama_cpp.llama_model_params:
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.vocab_only = vocab_only
    # An AMX build on an AMX CPU crashes in ggml_backend_amx_mul_mat; without the extra buffers
    # it runs (slower). Builds without AMX keep the repacked kernels.
    params.use_extra_bufts = repack_safe()
    return params


def load_model(path: Path, n_gpu_layers: int = 0, vocab_only: bool = False) -> ctypes.c_void_p:
    """Validate, then load; returns llama.cpp's model pointer (free with llama_model_free)."""
    inspect(path)
    llama_cpp.llama_backend_init()
    with llama_log.capture_errors() as errors:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params(n_gpu_layers, vocab_only))
    if not model:
        raise ModelFileError(f"llama.cpp could not load {Path(path).name}: {errors[-1] if errors else 'unknown error'}")
    return model
