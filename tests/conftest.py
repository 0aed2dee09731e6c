"""Session fixtures: synthetic Refact checkpoints (real architecture and tokenizer, random weights)
and their conversions, built once per test run. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refact_gguf.convert import convert
from refact_gguf.convert.checkpoint import Checkpoint
from refact_gguf.convert.reference import forward
from refact_gguf.convert.refact import plan
from refact_gguf import catalog
from refact_gguf.convert.synthetic import SyntheticSpec, write_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOCAB_GGUF = SHARED / "refact-vocab" / "ggml-vocab-refact.gguf"

# A short piece of code: the sequence the converted models are compared on.
SAMPLE_CODE = '''def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
    print([fibonacci(i) for i in range(10)])
'''


@pytest.fixture(scope="session", autouse=True)
def private_environment(tmp_path_factory):
    """Every test starts from the same environment, whatever the user's shell exported: saved KV
    caches and anything else written to the user's cache go to a temporary one, and the offline
    switches are off (a test that wants offline sets them). huggingface_hub reads HF_HUB_OFFLINE
    and TRANSFORMERS_OFFLINE once, at import: its constant is reset too."""
    from huggingface_hub import constants

    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache_home")))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.delenv(name, raising=False)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def vocab_gguf() -> Path:
    if not VOCAB_GGUF.is_file():
        pytest.skip(f"llama.cpp's reference tokenizer {VOCAB_GGUF} is not here (it lives in ../shared beside the repo)")
    return VOCAB_GGUF


@pytest.fixture(scope="session")
def hf_fused(tmp_path_factory) -> Path:
    """Released tensor names (attn.kv, mlp.gate_up_proj), separate lm_head, f16."""
    return write_checkpoint(tmp_path_factory.mktemp("hf_fused"), SyntheticSpec(fused=True, tied=False, dtype="float16"))


@pytest.fixture(scope="session")
def hf_split_tied(tmp_path_factory) -> Path:
    """Older names (attn.k/v, mlp.linear_1/3), lm_head tied to wte, bf16."""
    return write_checkpoint(
        tmp_path_factory.mktemp("hf_split"), SyntheticSpec(fused=False, tied=True, dtype="bfloat16", seed=1)
    )


def reference_logits(hf_dir: Path, tokens: list[int]) -> np.ndarray:
    """The float64 reference model's logits, from the original (uncentred) HF weights."""
    ckpt = Checkpoint.open(hf_dir)
    weights = {t.name: t for t in plan(ckpt, centre=False)}
    return forward(lambda n: weights[n].read(0, weights[n].rows), ckpt.config, np.array(tokens))[0]


@pytest.fixture(scope="session")
def converted_f32(hf_fused, tmp_path_factory):
    return convert(hf_fused, tmp_path_factory.mktemp("f32"), "f32")


@pytest.fixture(scope="session")
def model(converted_f32):
    """The f32 synthetic model, loaded: batched and single decodes then differ only by accumulation
    order, so a greedy near-tie flipping is not what a failing comparison means."""
    from refact_gguf.llama import Model

    with Model(converted_f32.base) as m:
        yield m


@pytest.fixture(scope="session")
def sample_tokens(converted_f32) -> list[int]:
    from refact_gguf.llama import Model

    with Model(converted_f32.base, vocab_only=True) as m:
        return m.tokenize(SAMPLE_CODE)


@pytest.fixture(scope="session")
def all_quants(hf_fused, tmp_path_factory):
    """`convert --outtype f32 --quant all`: the 22 files of the table."""
    return convert(hf_fused, tmp_path_factory.mktemp("all"), "f32", catalog.load().select("all"))


@pytest.fixture(scope="session")
def q4_model(hf_fused, tmp_path_factory) -> Path:
    """A quantized K-quant (the kind that crashes AMX builds), loaded through our loader."""
    return convert(hf_fused, tmp_path_factory.mktemp("q4"), "f16", catalog.load().select("Q4_K_M")).quants["Q4_K_M"]
