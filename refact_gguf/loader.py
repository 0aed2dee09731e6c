"""Open a Refact GGUF safely: validate it first, then load it in a way that cannot crash on AMX CPUs.

A truncated or foreign file must be a clear error, never a segfault inside llama.cpp; and a
llama.cpp built with AMX segfaults on AMX CPUs for K-quants (llama.cpp#20824), so such a build
loads with the extra (repacking) buffer types off.

llama.cpp's own log (hundreds of lines per load or quantization) is routed into Python from the
moment the library is loaded: each complete line goes to the `refact_gguf.llama` logger (silent
unless the CLI's --verbose attaches a handler) and to any listener registered with `listen()` —
that is how quantization progress and llama.cpp's error messages reach the user.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import platform
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import llama_cpp
import numpy as np

from .catalog import HYPERPARAMETER_RANGES
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
    centred: bool  # LayerNorm-faithful: converted (or repaired) by refact-gguf
    repaired_from: str | None = None  # sha256 of the published file it was repaired from

    @property
    def fidelity(self) -> str:
        """One word for scripts: faithful-converted, faithful-repaired or as-published."""
        return "as-published" if not self.centred else "faithful-repaired" if self.repaired_from else "faithful-converted"

    @property
    def fidelity_note(self) -> str:
        """What that means, for people."""
        if self.repaired_from:
            return "LayerNorm-faithful (repaired by refact-gguf from the published file)"
        if self.centred:
            return "LayerNorm-faithful (converted by refact-gguf)"
        return ("as published: llama.cpp's converter, RMSNorm over uncentred weights (on trained weights about a "
                "Q6_K quant's error before quantization; `refact-gguf convert` makes a faithful file)")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _HeaderParser:
    """A GGUF header walker that skips big arrays (the 49k-token vocab) instead of decoding them.

    gguf-py's GGUFReader decodes every array element (about 2.5 s for this vocab); validating a
    file before each load must be near-instant.
    """

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the header")
        text = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == _STRING:
                for _ in range(count):
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            elif etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            else:
                raise ValueError(f"unsupported array element type {etype}")
            return None  # arrays are skipped, not decoded
        raise ValueError(f"unknown value type {vtype}")


def inspect(path: Path) -> GGUFInfo:
    """Check magic, version, architecture and that every tensor's data lies inside the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFileError(f"{path.name} is not a GGUF file (bad magic)", "re-download or re-convert it")
        # The header is a few MB at most; read more only if it runs past what was read.
        want = 4 << 20
        while True:
            f.seek(0)
            head = f.read(want)
            try:
                kv, tensors, data_start = _parse(head)
                break
            except (ValueError, struct.error, IndexError, OverflowError) as e:
                if len(head) < want or want >= size:
                    why = e if isinstance(e, ValueError) else "its header is cut short"
                    raise ModelFileError(f"{path.name} is truncated or corrupt: {why}", "re-download or re-convert it") from None
                want *= 4
    arch = kv.get("general.architecture")
    if arch != ARCH:
        raise ModelFileError(f"{path.name} is a {arch or 'unknown'} model, not Refact ({ARCH})")
    _check_hyperparameters(path.name, kv)
    for name, qtype, n_elements, offset in tensors:
        if qtype not in _QUANT_SIZES:
            raise ModelFileError(f"{path.name}: tensor {name} has unknown type {qtype}")
        block, nbytes = _QUANT_SIZES[qtype]
        if data_start + offset + n_elements // block * nbytes > size:
            raise ModelFileError(f"{path.name} is truncated: tensor {name} ends past the end of the file", "re-download or re-convert it")
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=str(kv.get("general.name", path.stem)),
        file_type=int(kv.get("general.file_type", -1)),
        n_tensors=len(tensors),
        size=size,
        centred=bool(kv.get(CENTRED_KEY, False)),
        repaired_from=kv.get(REPAIRED_KEY),
    )


_QUANT_SIZES = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
# What refact-gguf writes into a file it made faithful (convert, repair).
CENTRED_KEY = "refact_gguf.residual_centred"
REPAIRED_KEY = "refact_gguf.repaired_from_sha256"

# The GGUF keys of catalog.HYPERPARAMETER_RANGES: a file is refused before llama.cpp sees a value outside them.
_GGUF_KEYS = {"block_count": "n_layer", "context_length": "n_ctx", "embedding_length": "n_embd",
              "feed_forward_length": "n_ff", "attention.head_count": "n_head", "attention.head_count_kv": "n_head_kv"}


def _check_hyperparameters(name: str, kv: dict) -> None:
    def bad(key: str, value) -> ModelFileError:
        return ModelFileError(f"{name} is corrupt: {ARCH}.{key} = {value!r} is not a possible value", "re-download or re-convert it")

    for key, hyperparameter in _GGUF_KEYS.items():
        lo, hi = HYPERPARAMETER_RANGES[hyperparameter]
        value = kv.get(f"{ARCH}.{key}")
        if value is not None and (not isinstance(value, int) or not lo <= value <= hi):
            raise bad(key, value)
    eps = kv.get(f"{ARCH}.attention.layer_norm_rms_epsilon")
    if eps is not None and not (isinstance(eps, float) and math.isfinite(eps) and 0 < eps < 1):
        raise bad("attention.layer_norm_rms_epsilon", eps)
    heads, embd = kv.get(f"{ARCH}.attention.head_count"), kv.get(f"{ARCH}.embedding_length")
    if heads and embd and embd % heads:
        raise bad("attention.head_count", heads)


def _parse(buf: bytes):
    p = _HeaderParser(buf)
    p.pos = 4
    version = p.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = p.scalar("<Q"), p.scalar("<Q")
    kv = {}
    for _ in range(n_kv):
        key = p.string()
        kv[key] = p.value(p.scalar("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = p.string()
        dims = [p.scalar("<Q") for _ in range(p.scalar("<I"))]
        qtype, offset = p.scalar("<I"), p.scalar("<Q")
        tensors.append((name, qtype, int(np.prod(dims, dtype=np.int64)), offset))
    align = kv.get("general.alignment") or 32
    return kv, tensors, (p.pos + align - 1) // align * align


@functools.cache
def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode(errors="replace")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux x86; empty elsewhere, where nothing below applies)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_has_amx() -> bool:
    return "amx_int8" in cpu_flags() or "amx_tile" in cpu_flags()


def build_has_amx() -> bool:
    return "AMX_INT8 = 1" in system_info()


# llama.cpp's system-info feature → the /proc/cpuinfo flag it needs.
_FEATURE_FLAGS = {
    "AVX": "avx", "AVX2": "avx2", "AVX_VNNI": "avx_vnni", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
    "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}


def build_problems() -> list[str]:
    """Why this llama.cpp build is wrong for this machine: instructions the CPU lacks (a wheel built
    elsewhere, reused from pip's cache), AMX on an AMX CPU (llama.cpp#20824), or a backend library
    carrying its own copy of the C++ runtime."""
    problems = [f"{lib.name} exports its own copy of libstdc++ (std::locale): models can crash while loading, "
                "in std::regex (rebuild with -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL)"
                for lib in _backend_libraries() if _exports_libstdcxx(lib)]
    flags = cpu_flags()
    if not flags:
        return problems
    info = system_info()
    problems += [f"built with {feat} but this CPU lacks it" for feat, flag in _FEATURE_FLAGS.items()
                 if f" {feat} = 1" in f" {info}" and flag not in flags]
    if cpu_has_amx() and build_has_amx():
        problems.append("built with AMX on an AMX CPU: K-quants crash in ggml_backend_amx_mul_mat")
    return problems


def _backend_libraries() -> list[Path]:
    """ggml's shared libraries beside the libllama that llama_cpp loaded."""
    libllama = Path(getattr(llama_cpp.llama_cpp._lib, "_name", "") or "")
    if not libllama.is_file():
        return []
    return sorted({p.resolve() for p in libllama.parent.glob("libggml*.so")})


# Members of libstdc++'s locale machinery: only libstdc++ itself defines them. A CUDA build linked
# against CUDA's static runtime can carry (and export) a second copy; libllama's std::regex then
# mixes the two copies' facet tables and crashes (seen on CUDA 13, H100 host: SIGSEGV in
# _BracketMatcher::_M_ready during vocabulary load, depending on import order).
_LIBSTDCXX_PREFIXES = ("_ZNSt6locale", "_ZNKSt6locale", "_ZNSt7codecvt", "_ZNKSt7codecvt", "_ZNKSt19__codecvt_utf8_base")


def _exports_libstdcxx(path: Path) -> bool:
    return any(name.startswith(_LIBSTDCXX_PREFIXES) for name in _defined_dynamic_symbols(path))


def _defined_dynamic_symbols(path: Path) -> Iterator[str]:
    """Names of the symbols an ELF64 little-endian shared library defines in .dynsym (none for
    any other format): its section headers and two sections are read, not the whole file."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:6] != b"\x7fELF\x02\x01":
            return
        (shoff,) = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(len(table) // shentsize)]
        for _, sh_type, _, _, offset, size, link, *_ in sections:
            if sh_type != 11 or link >= len(sections):  # SHT_DYNSYM, and its string table
                continue
            f.seek(sections[link][4])
            names = f.read(sections[link][5])
            f.seek(offset)
            symbols = f.read(size)
            for at in range(0, len(symbols) - 23, 24):  # Elf64_Sym: name, info, other, shndx, value, size
                name_at, _, _, shndx = struct.unpack_from("<IBBH", symbols, at)
                if shndx and name_at:  # SHN_UNDEF (0) = imported, not defined here
                    yield names[name_at:names.find(b"\0", name_at)].decode(errors="replace")


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
    if params.use_extra_bufts and n_gpu_layers == 0 and not vocab_only:
        # Repacked weights are copies: with a memory map the file's pages they were read from stay
        # mapped too, and resident memory is twice the weights (measured: Q4_K_M 1711 MiB for a
        # 923 MiB file). Read the file instead; every weight is then in memory once.
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    return params


def load_model(path: Path, n_gpu_layers: int = 0, vocab_only: bool = False) -> ctypes.c_void_p:
    """Validate, then load; returns llama.cpp's model pointer (free with llama_model_free)."""
    inspect(path)
    llama_cpp.llama_backend_init()
    with capture_errors() as errors:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params(n_gpu_layers, vocab_only))
    if not model:
        # llama.cpp's last line is a generic "failed to load model"; the reason came earlier
        reason = next((e.split("error loading model:", 1)[1].strip() for e in errors if "error loading model:" in e),
                      errors[-1] if errors else "unknown error")
        raise ModelFileError(f"llama.cpp could not load {Path(path).name}: {reason}", "re-download or re-convert it")
    return model


def build_report() -> dict:
    """What runs here, for `refact-gguf version` and bug reports: the packages, llama.cpp's library
    and what it was built with, the GPU backend, AMX on the CPU and in the build, known problems."""
    from . import __version__

    info = system_info()
    return {
        "refact_gguf": __version__, "llama_cpp_python": llama_cpp.__version__,
        "libllama": str(getattr(llama_cpp.llama_cpp._lib, "_name", "") or "unknown"),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "backends": sorted({lib.name.removeprefix("libggml-").split(".")[0] for lib in _backend_libraries()
                            if lib.name.startswith("libggml-") and not lib.name.startswith("libggml-base")}),
        "system_info": " ".join(info.split()),
        "cpu_amx": cpu_has_amx(), "build_amx": build_has_amx(), "repack": repack_safe(),
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "problems": build_problems(),
    }


if __name__ == "__main__":
    # `python -m refact_gguf.loader`: the install script's check of what pip actually built.
    import sys

    issues = build_problems()
    print(system_info())
    for issue in issues:
        print(f"llama.cpp build problem: {issue}", file=sys.stderr)
    sys.exit(3 if issues else 0)


# ---------------------------------------------------------------------------------- llama.cpp's log

logger = logging.getLogger("refact_gguf.llama")
logger.addHandler(logging.NullHandler())
logger.propagate = False

# enum ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the
# previous line). llama-cpp-python's own table predates DEBUG and is off by one.
_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
Listener = Callable[[int, str], None]  # (logging level, line without newline)

_lock = threading.Lock()
_listeners: list[Listener] = []
_pending = {"level": logging.INFO, "text": ""}


def _emit(level: int, line: str) -> None:
    logger.log(level, line)
    for listener in list(_listeners):
        listener(level, line)


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    with _lock:
        if level != 5:
            _pending["level"] = _LEVELS.get(level, logging.INFO)
        _pending["text"] += text.decode("utf-8", errors="replace")
        *lines, _pending["text"] = _pending["text"].split("\n")
        lvl = _pending["level"]
    for line in lines:
        _emit(lvl, line)


def install() -> None:
    """Take llama.cpp's log over (replaces llama-cpp-python's stderr printer). Idempotent."""
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Call `listener(level, line)` for each llama.cpp log line inside the block."""
    install()
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


@contextmanager
def capture_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's warning and error lines, to put in our own error messages."""
    lines: list[str] = []
    with listen(lambda level, line: lines.append(line.strip()) if level >= logging.WARNING and line.strip() else None):
        yield lines


install()
