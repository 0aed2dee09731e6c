"""Memory estimates and the quant choice, with faked memory figures."""

from __future__ import annotations

import pytest

from refact_gguf import catalog
from refact_gguf.errors import RefactGGUFError
from refact_gguf.select import Memory, estimate, recommend

GIB = 2**30


def test_kv_cache_formula():
    e = estimate(catalog.load().get("Q4_K_M"), n_ctx=4096)
    assert e.kv_cache == 4096 * 32 * 2 * 1 * 64 * 2  # n_ctx × n_layer × (K, V) × 1 KV head × 64 × f16
    assert e.weights == catalog.load().get("Q4_K_M").size_bytes
    # on a CPU flash attention is off (models.toml): the scores of a 128-token ubatch over the context
    assert e.compute == 128 * 4096 * 32 * 4 + 128 * (3 * 5632 + 8 * 2048) * 4
    assert estimate(catalog.load().get("Q4_K_M"), n_ctx=4096, gpu=True).compute == 512 * (3 * 5632 + 8 * 2048) * 4


def test_plenty_of_memory_gets_the_best_quality():
    best, estimates = recommend(Memory(64 * GIB, None))
    assert best.name == "Q8_0" and len(estimates) == 19  # aliases are not candidates


def test_tight_memory_gets_the_best_that_fits():
    best, estimates = recommend(Memory(int(1.6 * GIB), None))
    budget = 1.6 * GIB * 0.85
    fitting = [e for e in estimates if e.total <= budget]
    assert best in {e.quant for e in fitting}
    assert best.kld == min(e.quant.kld for e in fitting)
    assert best.name != "Q8_0"


def test_too_little_memory_is_a_clear_error():
    with pytest.raises(RefactGGUFError, match="no quant fits"):
        recommend(Memory(512 * 2**20, None))


def test_gpu_sizing_uses_vram():
    best, _ = recommend(Memory(64 * GIB, int(1.7 * GIB)), gpu=True)
    assert best.name != "Q8_0"
    with pytest.raises(RefactGGUFError, match="no NVIDIA GPU"):
        recommend(Memory(64 * GIB, None), gpu=True)
