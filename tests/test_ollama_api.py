"""Ollama's API through the official `ollama` Python client, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest

from refact_gguf.llama import Model

from .serving import running
from .test_server import PREFIX, SUFFIX


@pytest.fixture(scope="module")
def url(q4_model):
    with running(q4_model) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return ollama.Client(host=url)


def test_model_listing_shows_a_fim_template_and_the_quant(client, url):
    (listed,) = client.list().models
    assert listed.model.endswith(".gguf") and listed.details.quantization_level == "Q4_K_M" and listed.size > 0
    shown = client.show(listed.model)
    assert "{{ .Suffix }}" in shown.template and "insert" in shown.capabilities  # what Continue checks for FIM
    assert shown.modelinfo["refact.context_length"] == 1024 and shown.parameters == "num_ctx 1024"
    as_continue_asks = httpx.post(f"{url}/api/show", json={"name": listed.model}).json()  # the older field name
    assert ".Suffix" in as_continue_asks["template"]
    assert client.ps().models[0].context_length == 1024
    assert httpx.get(f"{url}/api/version").json()["version"]


def test_generate_with_a_suffix_is_fill_in_the_middle_as_infill_does_it(client, url):
    r = client.generate(model="refact", prompt=PREFIX, suffix=SUFFIX, options={"num_predict": 6, "temperature": 0})
    infill = httpx.post(f"{url}/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 6},
                        timeout=60).json()
    assert r.done and r.response == infill["content"] and r.eval_count == infill["tokens_predicted"]
    assert r.total_duration >= r.eval_duration > 0 and r.prompt_eval_count >= 1


def test_streamed_generate_is_ndjson_pieces_then_the_stats(client):
    options = {"num_predict": 8, "temperature": 0}
    whole = client.generate(model="refact", prompt="def add(a, b):\n", options=options)
    parts = list(client.generate(model="refact", prompt="def add(a, b):\n", options=options, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole.response and parts[-1].eval_count == whole.eval_count


def test_a_raw_prompt_with_refact_fim_markers_is_fim(client, url, q4_model):
    raw = f"<fim_suffix>{SUFFIX}<fim_prefix>{PREFIX}<fim_middle>"
    with Model(q4_model, vocab_only=True) as m:
        fim_ids, text_ids = m.tokenize(raw, special=True), m.tokenize(raw)
    assert len(fim_ids) < len(text_ids)
    completion = openai.OpenAI(base_url=f"{url}/v1", api_key="none").completions.create(
        model="refact", prompt=raw, max_tokens=4, temperature=0)
    assert completion.usage.prompt_tokens == len(fim_ids)  # markers parsed as the special tokens
    r = client.generate(model="refact", prompt=raw, raw=True, options={"num_predict": 6, "temperature": 0})
    infill = httpx.post(f"{url}/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 6},
                        timeout=60).json()
    assert r.response.startswith(infill["content"])  # the same prompt ids; the infill stops at a code boundary


def test_chat_streamed_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    r = client.chat(model="refact", messages=messages, options={"num_predict": 5, "temperature": 0})
    parts = list(client.chat(model="refact", messages=messages, options={"num_predict": 5, "temperature": 0}, stream=True))
    assert r.message.role == "assistant" and r.done and r.eval_count <= 5
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].done


def test_loading_a_model_answers_at_once(client):
    assert client.generate(model="refact").done_reason == "load"
    assert client.chat(model="refact", messages=[]).done_reason == "load"


def test_bad_options_are_a_clear_400(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="refact", prompt="x", options={"num_predict": 10**6})
    assert e.value.status_code == 400 and "limit" in str(e.value)
