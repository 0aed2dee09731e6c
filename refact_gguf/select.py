"""How much memory each quant needs here, and which one to use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from . import catalog
from .catalog import Catalog, Quant
from .errors import ModelFileError, RefactGGUFError
from .files import cache_root

if TYPE_CHECKING:
    from .llama import Model

MIB = 1 << 20
# Python, numpy, llama.cpp's runtime and the 49k-token vocabulary, fitted to the peak RSS of a
# full-context FIM on the full-size model (docs/benchmarks.md, "estimate vs measured").
RUNTIME_OVERHEAD = 56 * MIB
MARGIN = 0.85  # use at most this share of what is free


@dataclass(frozen=True)
class Estimate:
    quant: Quant | None
    weights: int
    kv_cache: int
    compute: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


def estimate(quant: Quant | None, n_ctx: int = 4096, gpu: bool = False,
             size_bytes: int | None = None, cat: Catalog | None = None) -> Estimate:
    """Weights + KV cache + llama.cpp's compute buffer + runtime, in bytes, on a CPU or (`gpu`) a
    GPU. The weights are the file's size: `size_bytes` when given (a file on disk), else the
    quant's published size."""
    m = (cat or catalog.load()).model
    kv = n_ctx * m.n_layer * 2 * m.n_head_kv * m.head_dim * 2  # K and V, f16, one KV head
    # The compute buffer holds the live intermediates of one ubatch: the FFN activations (gate,
    # up, product), a few residual-width tensors, and, without flash attention (off on a CPU,
    # llama.cpp's choice on a GPU: on where it can), the attention scores of every head.
    flash_attn, n_ubatch = m.attention(gpu)
    scores = 0 if flash_attn is not False else n_ubatch * n_ctx * m.n_head * 4
    compute = scores + n_ubatch * (3 * m.n_ff + 8 * m.n_embd) * 4
    weights = size_bytes if size_bytes is not None else quant.size_bytes
    return Estimate(quant, weights, kv, compute, RUNTIME_OVERHEAD)


@dataclass(frozen=True)
class Memory:
    ram_available: int
    vram_free: int | None  # None: no NVIDIA GPU (or no NVML)

    def usable(self, gpu: bool = False) -> int:
        """What a model may take here: `MARGIN` of the free VRAM (gpu) or of the available RAM."""
        return int(((self.vram_free or 0) if gpu else self.ram_available) * MARGIN)


def free_memory() -> Memory:
    vram = None
    try:
        import pynvml  # nvidia-ml-py: optional

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            vram = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no module, no driver, no GPU: all mean "no VRAM to count"
        vram = None
    return Memory(psutil.virtual_memory().available, vram)


def kv_cache_mb() -> int:
    """A memory budget for a server's saved KV states: an eighth of the available RAM, at most
    1 GiB (~80 files)."""
    return min(1024, free_memory().ram_available // 8 >> 20)


def fits(est: Estimate, memory: Memory, gpu: bool = False) -> bool:
    """The one "fits in memory" rule, for `list`, `recommend` and choosing a pulled quant."""
    return est.total <= memory.usable(gpu)


def recommend(memory: Memory | None = None, n_ctx: int = 4096, gpu: bool = False) -> tuple[Quant, list[Estimate]]:
    """The best-quality quant that fits with a margin; and every estimate, to explain the choice."""
    memory = memory or free_memory()
    cat = catalog.load()
    if gpu and memory.vram_free is None:
        raise RefactGGUFError("--gpu: no NVIDIA GPU found (NVML)", "drop --gpu to size for RAM")
    budget = memory.usable(gpu)
    candidates = [q for q in cat.quants if q.alias_of is None]
    estimates = [estimate(q, n_ctx, gpu) for q in candidates]
    fitting = [e for e in estimates if fits(e, memory, gpu)]
    if not fitting:
        smallest = min(estimates, key=lambda e: e.total)
        raise RefactGGUFError(
            f"no quant fits: the smallest ({smallest.quant.name}) needs {smallest.total / 2**30:.2f} GiB, "
            f"{budget / 2**30:.2f} GiB is usable",
            "free memory, or lower --ctx",
        )
    best = min(fitting, key=lambda e: (e.quant.kld, e.total))
    return best.quant, estimates


# ---------------------------------------------------------------------------------- which file, where


def resolve_model(ref: str | Path | None) -> Path:
    """A path, a quant name (from the cache), or None: the best pulled quant that fits here."""
    if ref is not None and (Path(ref).suffix == ".gguf" or os.sep in str(ref) or Path(ref).exists()):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ModelFileError(f"{path} does not exist", "pass a .gguf file or a quant name (refact-gguf list)")
        return path
    from .hub import cached_path, cached_quants  # only now: a path needs no Hub client

    cat = catalog.load()
    if ref is not None:
        quant = cat.get(str(ref))
        path = cached_path(quant)
        if path is None:
            raise RefactGGUFError(f"{quant.name} is not pulled yet", f"run: refact-gguf pull {quant.name}")
        return path
    cached = cached_quants()
    memory = free_memory()
    usable = [cat.get(n) for n, p in cached.items() if fits(estimate(cat.get(n), size_bytes=p.stat().st_size), memory)]
    if usable:
        best = min(usable, key=lambda q: q.kld)
        return cached[best.name]
    if cached:
        return cached[min(cached, key=lambda n: cat.get(n).size_gib)]
    hint = f"run: refact-gguf pull {recommend(memory)[0].name}"
    if synthetic_path().is_file():  # offline after quickstart: the labelled synthetic model is there
        hint += f" (offline, the synthetic model quickstart built: -m {synthetic_path()})"
    raise RefactGGUFError("no model pulled yet", hint)


def synthetic_path() -> Path:
    """Where quickstart builds its synthetic model when the Hub is out of reach."""
    cat = catalog.load()
    return cache_root() / "synthetic" / cat.get("Q4_K_M").filename(cat.model)


def open_model(path: Path, gpu_layers_setting: str | int = "auto") -> Model:
    """The one door to a loaded model: `path` opened where it should run (`gpu_layers`). Close it,
    or use `with`."""
    from .llama import Model  # only now: a quant name or `list` needs no llama.cpp

    path = Path(path)
    return Model(path, gpu_layers(gpu_layers_setting, path))


def gpu_layers(setting: str | int, model_path: Path) -> int:
    """`auto`: every layer when llama.cpp has a GPU backend and the model fits in free VRAM."""
    if setting != "auto":
        try:
            return int(setting)
        except ValueError:
            raise RefactGGUFError(f"--gpu-layers {setting!r}: give a number or 'auto'") from None
    from .llama import supports_gpu_offload  # only now: a quant name or `list` needs no llama.cpp

    if not supports_gpu_offload():
        return 0

    vram = free_memory().vram_free
    if vram is None:  # a GPU build, but no NVML to ask (Metal, ROCm, no nvidia-ml-py): llama.cpp says if it does not fit
        return 999
    return 999 if vram > estimate(None, gpu=True, size_bytes=model_path.stat().st_size).total else 0
