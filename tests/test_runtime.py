"""The runtime on a real llama.cpp model (synthetic weights): FIM, completion, chat, KV reuse."""

from __future__ import annotations

import numpy as np
import pytest

from refact_gguf import loader
from refact_gguf.chat import Message
from refact_gguf.llama import Model
from refact_gguf.runtime import Runtime
from refact_gguf.tasks import Sampling


@pytest.fixture(scope="module")
def rt(q4_model):
    with Model(q4_model) as model, Runtime(model, n_ctx=1024, threads=2) as runtime:
        yield runtime


def test_k_quant_runs_without_crash_and_repack_state_is_right(rt):
    """A Q4_K_M loads and runs; extra buffers (repack) are on unless this is an AMX build on an AMX CPU."""
    result = rt.complete("def main():", max_tokens=4)
    assert result.tokens_predicted == 4
    expected = not (loader.cpu_has_amx() and loader.build_has_amx())
    assert loader.model_params().use_extra_bufts is expected


def test_fim_prompt_is_exact_ids_without_injection(rt):
    prefix, suffix = "s = '<fim_suffix>'\n", "\nprint(s)\n"
    seen = {}
    original = rt.run

    def spy(task, *a, **kw):
        seen["prompt"] = task.prompt
        return original(task, *a, **kw)

    rt.run = spy
    try:
        rt.fim(prefix, suffix, max_tokens=2)
    finally:
        del rt.run
    assert seen["prompt"] == [3, *rt.tokenize(suffix), 1, *rt.tokenize(prefix), 2]
    assert seen["prompt"].count(3) == 1  # the text "<fim_suffix>" stayed text


def test_greedy_is_deterministic_and_max_tokens_holds(rt):
    a = rt.fim("def add(a, b):\n    return", "\n", max_tokens=6, multiline=False)
    rt.slot.clear()  # forget the cache: same answer from scratch
    b = rt.fim("def add(a, b):\n    return", "\n", max_tokens=6, multiline=False)
    assert a.text == b.text
    assert a.tokens_predicted <= 6
    assert "\n" not in a.text


def test_kv_cache_reuse_evaluates_only_new_tokens(rt):
    suffix = "\n\nprint(total)\n"
    first = rt.fim("numbers = [1, 2, 3]\ntotal = ", suffix, max_tokens=4)
    second = rt.fim("numbers = [1, 2, 3]\ntotal = sum", suffix, max_tokens=4)
    assert first.tokens_evaluated + first.tokens_cached == first.prompt_tokens
    assert second.tokens_cached >= first.prompt_tokens - 2  # SPM: typing only appends
    assert second.tokens_evaluated <= 3


def test_truncation_is_reported(rt):
    prefix = "".join(f"x{i} = {i}\n" for i in range(2000))
    result = rt.fim(prefix, "", max_tokens=4)
    assert result.truncated and result.prompt_tokens <= 1024 - 4
    assert "kept the last" in result.notes[0]


def test_chat_stops_and_reports_dropped_history(rt):
    history = [Message("system", "be brief")] + [Message("user", "word " * 400), Message("assistant", "ok")] * 3
    history.append(Message("user", "last question"))
    result = rt.chat(history, max_tokens=8, sampling=Sampling(temperature=0.7, seed=1))
    assert result.truncated and "dropped" in result.notes[0]
    assert result.tokens_predicted <= 8


def _lines(n, tag):
    return "".join(f"def {tag}_{i}(x):\n    return x + {i}\n\n" for i in range(n))


def test_removed_text_reuses_the_cache_after_it(rt):
    """Text removed in the middle (a dropped context chunk, deleted lines): the cached run after
    it is shifted back, not evaluated again."""
    before, removed, after = _lines(10, "head"), _lines(4, "gone"), _lines(12, "tail")
    rt.complete(before + removed + after, max_tokens=2)
    second = rt.complete(before + after, max_tokens=2)
    assert second.tokens_evaluated <= 4, (second.tokens_evaluated, second.prompt_tokens)
    assert second.tokens_cached >= second.prompt_tokens - 4
    third = rt.complete(before + after, max_tokens=2)  # the cache holds exactly the new prompt
    assert third.tokens_evaluated == 1


def test_replaced_text_reevaluates_from_the_edit(rt):
    before, after = _lines(10, "head"), _lines(12, "tail")
    rt.complete(before + "VALUE = 40\n" + after, max_tokens=2)
    second = rt.complete(before + "VALUE = 41\n" + after, max_tokens=2)
    assert second.tokens_cached >= len(rt.tokenize(before))
    assert second.tokens_evaluated + second.tokens_cached == second.prompt_tokens


def test_batches_split_anywhere_give_the_same_logits(converted_f32, sample_tokens):
    # Prompts longer than a batch are decoded in slices; positions and output flags are written
    # per slice, so every split must give what one batch gives, up to rounding: the f16 KV cache
    # and attention tiles differ with the batch size (~3e-3 here, f32 weights); a wrong position
    # or a missing output flag is far off (both checked to fail).
    from refact_gguf.llama import Context, Model

    tokens = sample_tokens[:70]
    with Model(converted_f32.base) as model:
        whole = Context(model, n_ctx=128, n_batch=128, threads=2)
        split = Context(model, n_ctx=128, n_batch=16, threads=2)
        try:
            assert np.allclose(whole.eval(tokens), split.eval(tokens), atol=2e-2)
            whole.reset()
            split.reset()
            all_whole, all_split = whole.eval(tokens, all_logits=True), split.eval(tokens, all_logits=True)
            assert all_whole.shape == all_split.shape == (70, model.n_vocab)
            assert np.allclose(all_whole, all_split, atol=2e-2)
            split.decode_one(tokens[0])  # after a batch, the one-token path still has its fields right
            whole.decode_one(tokens[0])
            assert np.allclose(whole.logits_last(), split.logits_last(), atol=2e-2)
        finally:
            whole.close()
            split.close()
