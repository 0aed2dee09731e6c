"""How much memory each quant needs here, and which one to use."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from . import catalog
from .catalog import Catalog, Quant
from .errors import RefactGGUFError

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


def estimate(quant: Quant | None, n_ctx: int = 4096, n_ubatch: int = 512, flash_attn: bool = True,
             size_bytes: int | None = None, cat: Catalog | None = None) -> Estimate:
    """Weights + KV cache + llama.cpp's compute buffer + runtime, in bytes. The weights are the
    file's size: `size_bytes` when given (a file on disk), else the quant's published size."""
    m = (cat or catalog.load()).model
    kv = n_ctx * m.n_layer * 2 * m.n_head_kv * m.head_dim * 2  # K and V, f16, one KV head
    # The compute buffer holds the live intermediates of one ubatch: the FFN activations (gate,
    # up, product), a few residual-width tensors, and, without flash attention (llama.cpp turns
    # it on by default where it can), the attention scores of every head over the context.
    scores = 0 if flash_attn else n_ubatch * n_ctx * m.n_head * 4
    compute = scores + n_ubatch * (3 * m.n_ff + 8 * m.n_embd) * 4
    weights = size_bytes if size_bytes is not None else quant.size_bytes
    return Estimate(quant, weights, kv, compute, RUNTIME_OVERHEAD)


@dataclass(frozen=True)
class Memory:
    ram_available: int
    vram_free: int | None  # None: no NVIDIA GPU (or no NVML)

    @property
    def budget(self) -> int:
        return int(max(self.ram_available, self.vram_free or 0) * MARGIN)


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


def fits(est: Estimate, memory: Memory) -> bool:
    return est.total <= memory.budget


def recommend(memory: Memory | None = None, n_ctx: int = 4096, gpu: bool = False) -> tuple[Quant, list[Estimate]]:
    """The best-quality quant that fits with a margin; and every estimate, to explain the choice."""
    memory = memory or free_memory()
    cat = catalog.load()
    if gpu and memory.vram_free is None:
        raise RefactGGUFError("--gpu: no NVIDIA GPU found (NVML)", "drop --gpu to size for RAM")
    budget = int((memory.vram_free if gpu else memory.ram_available) * MARGIN)
    candidates = [q for q in cat.quants if q.alias_of is None]
    estimates = [estimate(q, n_ctx) for q in candidates]
    fitting = [e for e in estimates if e.total <= budget]
    if not fitting:
        smallest = min(estimates, key=lambda e: e.total)
        raise RefactGGUFError(
            f"no quant fits: the smallest ({smallest.quant.name}) needs {smallest.total / 2**30:.2f} GiB, "
            f"{budget / 2**30:.2f} GiB is usable",
            "free memory, or lower --ctx",
        )
    best = min(fitting, key=lambda e: (e.quant.kld, e.total))
    return best.quant, estimates
