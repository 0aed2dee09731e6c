"""The converted GGUF, run through llama.cpp, computes what the HF model computes."""

from __future__ import annotations

import gguf
import llama_cpp
import numpy as np
import pytest

from refact_gguf.convert import convert
from refact_gguf.convert.checkpoint import Checkpoint
from refact_gguf.convert.reference import kl_divergence
from refact_gguf.convert.refact import plan
from refact_gguf.convert.vocab import load_vocab
from refact_gguf.convert.writer import write_gguf
from refact_gguf.llama import Model, sequence_logits
from refact_gguf.tokens import CHAT_TEMPLATE

from .conftest import reference_logits


def _compare(hf_dir, gguf_path, tokens):
    ref = reference_logits(hf_dir, tokens)
    got = sequence_logits(gguf_path, tokens)
    return kl_divergence(ref, got), ref.argmax(-1), got.argmax(-1)


def _same_decided_top1(hf_dir, gguf_path, tokens) -> None:
    """An f32 GGUF: KL < 1e-5, and the reference's top-1 wherever no error as large as the largest
    one seen could flip it (its best two logits more than twice that apart). llama.cpp keeps K and V
    in f16, so its logits differ by ~0.001 and a closer tie may go either way."""
    ref = reference_logits(hf_dir, tokens)
    got = sequence_logits(gguf_path, tokens)
    assert kl_divergence(ref, got).mean() < 1e-5
    error = np.abs(ref - got).max()
    assert error < 0.005, error
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * error
    assert decided.mean() > 0.75  # the random weights' logits lie close together, yet most are decided
    assert (ref.argmax(-1) == got.argmax(-1))[decided].all()


def test_f32_matches_reference_fused_untied(hf_fused, converted_f32, sample_tokens):
    _same_decided_top1(hf_fused, converted_f32.base, sample_tokens)


def test_f32_matches_reference_split_tied(hf_split_tied, tmp_path, sample_tokens):
    result = convert(hf_split_tied, tmp_path, "f32")
    _same_decided_top1(hf_split_tied, result.base, sample_tokens)
    # tied head: output.weight is the uncentred embedding, token_embd the centred one
    tensors = {t.name: t for t in gguf.GGUFReader(result.base).tensors}
    emb, out = np.asarray(tensors["token_embd.weight"].data), np.asarray(tensors["output.weight"].data)
    assert abs(emb.mean(axis=1)).max() < 1e-6
    assert abs(out.mean(axis=1)).mean() > 1e-2


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_half_precision_close(hf_fused, tmp_path, sample_tokens, outtype):
    result = convert(hf_fused, tmp_path, outtype)
    kl, ref_top, top = _compare(hf_fused, result.base, sample_tokens)
    assert kl.mean() < 1e-3, kl.mean()
    assert (ref_top == top).mean() >= 0.9


def test_uncentred_conversion_is_wrong(hf_fused, tmp_path, sample_tokens):
    """What llama.cpp's own converter does (no centring) is measurably unfaithful: the fix matters."""
    ckpt = Checkpoint.open(hf_fused)
    naive = tmp_path / "naive.gguf"
    write_gguf(naive, ckpt.config, load_vocab(ckpt.tokenizer_json, ckpt.config.n_vocab), plan(ckpt, centre=False), "f32", "test")
    kl, ref_top, top = _compare(hf_fused, naive, sample_tokens)
    assert kl.mean() > 1e-2, kl.mean()


def test_metadata_for_llama_cpp_tools(converted_f32):
    """FIM tokens, EOT, chat template, hyperparameters: what llama-server /infill and chat need."""
    with Model(converted_f32.base, vocab_only=True) as m:
        v = m.vocab
        assert (llama_cpp.llama_vocab_fim_pre(v), llama_cpp.llama_vocab_fim_suf(v), llama_cpp.llama_vocab_fim_mid(v)) == (1, 3, 2)
        assert llama_cpp.llama_vocab_fim_pad(v) == 4
        assert llama_cpp.llama_vocab_eot(v) == 0
        assert not llama_cpp.llama_vocab_get_add_bos(v)
        assert m.meta("general.architecture") == "refact"
        assert m.meta("tokenizer.chat_template") == CHAT_TEMPLATE
        assert m.meta("refact.attention.head_count_kv") == "1"
        assert m.meta("general.file_type") == "0"
        assert m.meta("refact_gguf.residual_centred") == "true"
    assert converted_f32.base.name == "Refact-1_6B-fim.F32.gguf"


def test_chat_template_renders_refact_format():
    import jinja2

    text = jinja2.Template(CHAT_TEMPLATE).render(
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                  {"role": "user", "content": "Q2"}],
        add_generation_prompt=True,
    )
    assert text == "<empty_output>SYSTEM S\n<empty_output>USER Q\n<empty_output>ASSISTANT A\n<empty_output>USER Q2\n<empty_output>ASSISTANT"
