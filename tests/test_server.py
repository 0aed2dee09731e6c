"""The server over real HTTP on 127.0.0.1, with the synthetic model behind it."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refact_gguf import tasks
from refact_gguf.engine import Engine
from refact_gguf.llama import Model
from refact_gguf.prompt_cache import PromptCache
from refact_gguf.server import Limits

from .serving import running, serve_process

PREFIX = "import os\n\n\ndef list_python_files(root):\n    result = []\n    for name in os.listdir(root):\n"
SUFFIX = "\n    return result\n\n\nprint(list_python_files('.'))\n"


class SlowEngine(Engine):
    """Takes at least 20 ms a step and remembers why each task ended."""

    stops: list[str] = []

    def step(self):
        time.sleep(0.02)
        super().step()

    def _done(self, slot, completion):
        SlowEngine.stops.append(completion.stop_reason)
        super()._done(slot, completion)


class SlowPromptsCached(Engine):
    """With a prompt cache, and prompts measured at 100 tokens a second whatever the machine."""

    prompt_rate = property(lambda self: 100.0, lambda self, value: None)

    def __init__(self, model, **options):
        super().__init__(model, cache=PromptCache(64 << 20), **options)


@pytest.fixture(scope="module")
def url(q4_model):
    with running(q4_model) as u:
        yield u


def test_served_connections_send_at_once():
    """Nagle is off on the connections `serve` accepts: with it on, a response's body waited for the
    client's delayed ACK of its head, 40 ms on every request."""
    import asyncio

    from refact_gguf.server import _listen

    nodelay = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            nodelay.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def connect_once():
        sock = _listen("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        await reader.read()  # the probe closes it
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(connect_once())
    assert nodelay and nodelay[0] != 0


def test_health_and_models(url):
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    data = httpx.get(f"{url}/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"].endswith(".gguf")


def test_infill_reuses_the_cache_while_typing(url):
    base = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, "cache_prompt": True}
    first = httpx.post(f"{url}/infill", json={**base, "prompt": "        if"}, timeout=60).json()
    second = httpx.post(f"{url}/infill", json={**base, "prompt": "        if name"}, timeout=60).json()
    third = httpx.post(f"{url}/infill", json={**base, "prompt": "        if name."}, timeout=60).json()
    for r in (first, second, third):
        assert set(r) >= {"content", "stop", "tokens_predicted", "tokens_evaluated", "tokens_cached", "truncated", "timings"}
        assert set(r["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms"}
    assert second["timings"]["prompt_n"] <= 3 and third["timings"]["prompt_n"] <= 3
    assert second["tokens_cached"] >= first["tokens_evaluated"] - 3


def test_llama_vim_request_verbatim(url):
    """The body llama.vim sends, unknown fields and all."""
    body = {
        "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": [{"filename": "util.py", "text": "def helper():\n    pass\n"}],
        "prompt": "        ", "n_predict": 16, "n_indent": 8, "top_k": 40, "top_p": 0.90, "stream": False,
        "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
        "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/predicted_n", "timings/predicted_ms",
                            "truncated", "tokens_cached"],
    }
    r = httpx.post(f"{url}/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["content"], str)


def test_infill_stream(url):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "        ", "n_predict": 8, "stream": True}
    with httpx.stream("POST", f"{url}/infill", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and "timings" in events[-1]
    assert all(e["stop"] is False for e in events[:-1])


def test_openai_client_completions_and_chat(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    fim = client.completions.create(model="refact", prompt=PREFIX, suffix=SUFFIX, max_tokens=8)
    assert fim.choices[0].finish_reason in ("stop", "length") and fim.usage.completion_tokens <= 8
    plain = client.completions.create(model="refact", prompt="def main():", max_tokens=5)
    assert plain.usage.completion_tokens == 5 and plain.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="refact", prompt="def main():", max_tokens=5, stream=True))
    assert streamed == plain.choices[0].text  # greedy: the same text either way
    chat = client.chat.completions.create(model="refact", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="refact", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True)]
    assert "".join(pieces) == chat.choices[0].message.content


def test_time_limit_returns_what_it_has(url):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "        ", "n_predict": 60, "t_max_predict_ms": 1}
    r = httpx.post(f"{url}/infill", json=body, timeout=60).json()
    assert r["tokens_predicted"] < 60 and r["stop"] is True


def test_eight_concurrent_clients(url):
    def one(i):
        return httpx.post(f"{url}/v1/completions", json={"prompt": f"x{i} = ", "max_tokens": 4}, timeout=120).status_code

    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(8))) == [200] * 8


@pytest.mark.parametrize("body,status,message", [
    ({"input_prefix": "x", "n_predict": 100000}, 400, "over this server's limit"),
    ({"input_prefix": 5}, 400, "input_prefix"),
    ({"n_predict": "many"}, 400, "n_predict"),
])
def test_bad_input_is_4xx_json(url, body, status, message):
    r = httpx.post(f"{url}/infill", json=body)
    assert r.status_code == status and message in r.json()["error"]["message"]


def test_malformed_json_and_oversized_body(url):
    r = httpx.post(f"{url}/infill", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(f"{url}/infill", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_auth_required_except_health(q4_model):
    with running(q4_model, parallel=1, keys="s3cret") as u:
        assert httpx.get(f"{u}/health").status_code == 200
        assert httpx.get(f"{u}/v1/models").status_code == 401
        assert httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_full_queue_is_503_and_disconnect_cancels(q4_model):
    SlowEngine.stops.clear()
    with running(q4_model, parallel=1, limits=Limits(max_predict=4000, max_queue=0), engine=SlowEngine) as u:
        long = {"prompt": "def f():", "max_tokens": 900, "stream": True}
        with httpx.stream("POST", f"{u}/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
            next(lines)  # generation is under way (≥ 18 s of it), the only slot is taken
            busy = httpx.post(f"{u}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 503 and busy.json()["error"]["type"] == "unavailable_error"
            assert SlowEngine.stops == []
        # the client went away: its generation is cancelled and the slot comes back quickly
        t0 = time.time()
        while True:
            again = httpx.post(f"{u}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            if again.status_code == 200:
                break
            assert time.time() - t0 < 5, "the abandoned generation kept the slot"
            time.sleep(0.1)
        assert SlowEngine.stops[0] == "cancelled" and time.time() - t0 < 5


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
fields = ["input_prefix", "input_suffix", "input_extra", "prompt", "n_predict", "n_indent", "t_max_prompt_ms",
          "t_max_predict_ms", "temperature", "top_k", "top_p", "stream", "stop", "messages", "max_tokens", "suffix", "model"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/infill", "/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(st.sampled_from(fields), json_values, max_size=6))
def test_fuzzed_bodies_never_5xx(url, path, body):
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code < 500, (path, body, r.text)
    if body.get("stream") is not True:
        r.json()


STREAMS = [
    ("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "        ", "n_predict": 60, "stream": True}),
    ("/v1/completions", {"prompt": "def f():", "max_tokens": 60, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True}),
]


@pytest.mark.parametrize("path,body", STREAMS, ids=[p for p, _ in STREAMS])
def test_dropped_streams_followed_at_once_by_a_request(q4_model, path, body):
    """A streaming client that disconnects mid-generation, and at once another request: 50 times.
    (The per-slot server crashed here: the stream released its slot while still decoding in it.)"""
    with running(q4_model, parallel=2, limits=Limits(max_predict=64, max_queue=64)) as u, httpx.Client(timeout=60) as client:
        for _ in range(50):
            with client.stream("POST", f"{u}{path}", json=body) as r:
                assert r.status_code == 200
                next(r.iter_lines())
            # leaving the block closed the connection mid-stream
            after = client.post(f"{u}/v1/completions", json={"prompt": "x = ", "max_tokens": 2})
            assert after.status_code == 200, after.text
        deadline = time.time() + 10
        while httpx.get(f"{u}/health").json()["busy"]:  # every dropped stream is cancelled
            assert time.time() < deadline
            time.sleep(0.05)


def test_sixteen_concurrent_clients_of_every_kind(q4_model):
    jobs = [("/infill", {"input_prefix": PREFIX + f"# {i}\n", "input_suffix": SUFFIX, "n_predict": 6}) for i in range(6)]
    jobs += [("/v1/completions", {"prompt": f"x{i} = ", "max_tokens": 6, "temperature": 0.7, "seed": i}) for i in range(5)]
    jobs += [("/v1/chat/completions", {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 6}) for i in range(5)]
    with running(q4_model, parallel=4, limits=Limits(max_predict=64, max_queue=16)) as u:
        def one(job):
            return httpx.post(f"{u}{job[0]}", json=job[1], timeout=120).status_code

        with ThreadPoolExecutor(16) as ex:
            assert list(ex.map(one, jobs)) == [200] * 16
        health = httpx.get(f"{u}/health").json()
        assert health["busy"] == 0 and health["waiting"] == 0 and health["slots"] == 4


def test_cors_preflight_passes_before_the_key_check(q4_model):
    with running(q4_model, parallel=1, keys="s3cret", cors_origins=["http://localhost:5173"]) as u:
        pre = httpx.options(f"{u}/v1/completions", headers={
            "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:5173"
        denied = httpx.post(f"{u}/v1/completions", json={"prompt": "x"}, headers={"Origin": "http://localhost:5173"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://localhost:5173"


@pytest.mark.parametrize("path,body", [
    ("/infill", {"input_prefix": "x = '\ud800'", "input_suffix": "\ud800", "prompt": "\udfff", "n_predict": 2}),
    ("/v1/completions", {"prompt": "s = '\ud800", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800?"}], "max_tokens": 2}),
    ("/api/generate", {"model": "\ud800", "prompt": "x", "stream": False, "options": {"num_predict": 2}}),  # echoed back
    ("/api/chat", {"model": "m\ud800", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                   "options": {"num_predict": 2, "stop": ["\udfff"]}}),
])
def test_a_lone_surrogate_is_text_not_a_500(url, path, body):
    r = httpx.post(f"{url}{path}", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_context_under_256_tokens_takes_a_long_prompt(q4_model):
    """llama.cpp pads such a context to 256 and caps its batch there; a longer batch aborted."""
    model = Model(q4_model)
    try:
        with Engine(model, n_ctx=128, parallel=1, threads=1).start() as eng:
            task = tasks.fim(model.tokenize_cached, eng.n_ctx, PREFIX * 20, SUFFIX, max_tokens=8)
            assert len(task.prompt) > 128 and eng.run(task).tokens_predicted <= 8
    finally:
        model.close()


def test_a_chunked_body_is_bounded_too(url):
    def chunks():
        for _ in range(10):
            yield b" " * (1 << 20)  # 10 MiB without a Content-Length

    r = httpx.post(f"{url}/infill", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]


def test_a_stalled_body_frees_its_connection(q4_model):
    with running(q4_model, parallel=1, limits=Limits(max_predict=64, body_timeout_s=0.5)) as u:
        host, port = u.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /infill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inp")
            reply = s.recv(4096).decode()  # no more bytes come: the server answers and closes
        assert reply.startswith("HTTP/1.1 408"), reply[:80]
        assert httpx.get(f"{u}/health").status_code == 200


def test_serve_on_a_port_in_use_is_one_line_before_loading(q4_model):
    from typer.testing import CliRunner

    from refact_gguf.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "-m", str(q4_model), "--port", str(port)])
    assert r.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in r.output and " on http" not in r.output


def test_a_cold_file_is_answered_from_the_lines_around_the_cursor_and_says_so(q4_model):
    with running(q4_model, parallel=1, engine=SlowPromptsCached) as u:
        body = {"input_prefix": PREFIX * 12, "input_suffix": SUFFIX, "n_predict": 4, "t_max_prompt_ms": 500}
        first = httpx.post(f"{u}/infill", json=body, timeout=60).json()
        assert first["short_context"] and first["truncated"] and first["tokens_evaluated"] <= 30
        deadline = time.time() + 60
        while httpx.get(f"{u}/health").json()["background"]:  # the full prompt, in the background
            assert time.time() < deadline
            time.sleep(0.05)
        again = httpx.post(f"{u}/infill", json={**body, "prompt": "x"}, timeout=60).json()
        assert not again["short_context"] and again["tokens_cached"] > 300 and again["timings"]["prompt_n"] < 10


@pytest.mark.parametrize("path, body, evaluated", [
    ("/v1/completions", {"prompt": PREFIX * 12, "suffix": SUFFIX, "max_tokens": 4}, lambda r: r["usage"]["prompt_tokens"]),
    ("/api/generate", {"prompt": PREFIX * 12, "suffix": SUFFIX, "options": {"num_predict": 4}, "stream": False},
     lambda r: r["prompt_eval_count"]),
])
def test_fim_through_openai_and_ollama_on_a_cold_file_is_answered_short_too(q4_model, path, body, evaluated):
    """They bring no time budget: the server's (--prompt-budget-ms) holds for them."""
    with running(q4_model, parallel=1, engine=SlowPromptsCached, limits=Limits(max_predict=64, prompt_budget_ms=500)) as u:
        first = httpx.post(f"{u}{path}", json=body, timeout=60)
        assert first.status_code == 200 and evaluated(first.json()) <= 30
        assert httpx.get(f"{u}/health").json()["engine"]["short_answers"] == 1


def test_llama_server_endpoints_tools_call(url):
    c = httpx.post(f"{url}/completion", json={"prompt": "def f():", "n_predict": 4}, timeout=60).json()
    assert c["tokens_predicted"] <= 4 and isinstance(c["content"], str) and c["timings"]["predicted_n"] == c["tokens_predicted"]
    ids = httpx.post(f"{url}/tokenize", json={"content": "<fim_prefix>x = 1"}).json()["tokens"]
    assert ids[0] == 1  # special tokens parsed, as llama-server does
    assert httpx.post(f"{url}/tokenize", json={"content": "<fim_prefix>x = 1", "parse_special": False}).json()["tokens"][0] != 1
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["content"] == "<fim_prefix>x = 1"
    by_ids = httpx.post(f"{url}/completion", json={"prompt": ids, "n_predict": 2}, timeout=60).json()
    assert by_ids["tokens_evaluated"] == len(ids)
    bad = httpx.post(f"{url}/completion", json={"prompt": [10**7], "n_predict": 2})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    props = httpx.get(f"{url}/props").json()
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 1024
    slots = httpx.get(f"{url}/slots").json()
    assert [s["id"] for s in slots] == [0, 1] and all(not s["is_processing"] for s in slots)
    assert httpx.head(f"{url}/health").status_code == 200


def test_metrics_are_prometheus_text_that_counts(url):
    def value(text: str, name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    before = httpx.get(f"{url}/metrics").text
    httpx.post(f"{url}/completion", json={"prompt": "x = ", "n_predict": 2}, timeout=60)
    after = httpx.get(f"{url}/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    assert value(after.text, "refact_gguf_requests_total") == value(before, "refact_gguf_requests_total") + 1
    assert value(after.text, "refact_gguf_request_seconds_count") == value(before, "refact_gguf_request_seconds_count") + 1
    assert '# TYPE refact_gguf_request_seconds histogram' in after.text and 'le="+Inf"' in after.text


def test_openai_details_clients_send(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    chat = client.chat.completions.create(
        model="refact", max_completion_tokens=5, temperature=0,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert 1 <= chat.usage.completion_tokens <= 5
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "def f():", "max_completion_tokens": 3}, timeout=60).json()
    assert r["usage"]["completion_tokens"] <= 3
    vscode = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={  # llama.vscode's chat request
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1, "samplers": "edkypmxt", "stream": False})
    assert vscode.status_code == 200
    for field, body in [("n", {"prompt": "x", "n": 2}), ("echo", {"prompt": "x", "echo": True}),
                        ("logprobs", {"prompt": "x", "logprobs": 2})]:
        refused = httpx.post(f"{url}/v1/completions", json=body)
        assert refused.status_code == 400 and f"{field}:" in refused.json()["error"]["message"], refused.text


def test_sigterm_stops_serving_and_writes_the_caches(q4_model, tmp_path):
    """As systemd or an editor stops it: exit 0, and the slot's KV cache reaches the disk even
    when the signal comes before the idle write (uvicorn re-raised SIGTERM and the process died)."""
    import signal

    with serve_process(q4_model, "--ctx", "512", "--cache-dir", str(tmp_path / "kv")) as (proc, url):
        r = httpx.post(f"{url}/infill", json={"input_prefix": "def f(x):\n    return x + 1\n" * 20, "n_predict": 2})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)  # at once: the 2-second idle write has not happened
        assert proc.wait(60) == 0, proc.stderr.read().decode()[-500:]
    assert list((tmp_path / "kv").rglob("*.kv")), "the slot's cache was not written at shutdown"


def test_a_cache_dir_that_cannot_be_one_is_reported_and_serving_goes_on(q4_model, tmp_path):
    """A cache problem never stops serving (issue #30): said once, shown by /health, memory only."""
    from refact_gguf.prompt_cache import model_fingerprint

    a_file = tmp_path / "a-file"
    a_file.write_text("x")

    class OnAFile(Engine):
        def __init__(self, model, **options):
            cache = PromptCache(64 << 20, model_fingerprint(model.path), a_file, 64 << 20, model.path.name)
            super().__init__(model, cache=cache, **options)

    with running(q4_model, parallel=1, engine=OnAFile) as u:
        health = httpx.get(f"{u}/health").json()["prompt_cache"]
        assert health["disk"] is None and "not kept on disk" in health["problem"], health
        assert httpx.post(f"{u}/infill", json={"input_prefix": PREFIX, "n_predict": 4}).status_code == 200
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("sent", [b"", b"POST /infill HT", b"GET /health HTTP/1.1\r\nHost: x\r\n"])
def test_a_connection_that_never_finishes_its_request_head_is_closed(q4_model, sent):
    """uvicorn waited forever for a request line or headers that stopped coming (the fault suite
    held one 90 s); through `serve` the head has the body's time limit."""
    with running(q4_model, parallel=1, limits=Limits(max_predict=64, body_timeout_s=0.5)) as u:
        host, port = u.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as c:
            c.sendall(sent)
            t0 = time.time()
            assert c.recv(100) == b""  # closed by the server
            assert time.time() - t0 < 5
        with socket.create_connection((host, int(port)), timeout=10) as c:  # a whole head is served
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_label(q4_model, content_type):
    """`curl -d '{…}'` labels the body a form, and some clients send no Content-Type; llama-server
    and Ollama read the JSON all the same (FastAPI refused it: 400)."""
    headers = {"content-type": content_type} if content_type else {}
    with running(q4_model, parallel=1) as u:
        for path, body in (("/infill", b'{"input_prefix": "def f(", "n_predict": 2}'),
                           ("/v1/completions", b'{"prompt": "def f(", "max_tokens": 2}'),
                           ("/api/generate", b'{"prompt": "def f(", "stream": false, "options": {"num_predict": 2}}')):
            r = httpx.post(f"{u}{path}", content=body, headers=headers, timeout=60)
            assert r.status_code == 200, (path, r.text)


def test_a_fim_prompt_keeps_the_lines_nearest_the_cursor_within_the_fim_context(q4_model):
    # A whole file either side of the cursor: the prompt stops at --fim-context, not at the context.
    body = {"input_prefix": PREFIX * 30, "input_suffix": SUFFIX * 60, "n_predict": 4, "t_max_prompt_ms": 0}
    with running(q4_model, parallel=1, limits=Limits(max_predict=64, fim_context=400)) as u:
        narrow = httpx.post(f"{u}/infill", json=body, timeout=60).json()
    with running(q4_model, parallel=1) as u:  # the model's default (2,048) is past this context (1,024)
        wide = httpx.post(f"{u}/infill", json=body, timeout=60).json()
    assert narrow["truncated"] and 300 < narrow["tokens_evaluated"] <= 400 - 4
    assert wide["truncated"] and 900 < wide["tokens_evaluated"] <= 1024 - 4


def test_a_request_gone_while_its_task_is_built_cancels_what_the_build_submits(q4_model):
    """The task is built and submitted off the loop; a request cancelled meanwhile (its client gone,
    the server stopping) must not leave the thread's task generating for nobody."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from refact_gguf.server.common import _submit

    handles = []

    class Recording(Engine):
        def submit(self, *a, **k):
            handles.append(super().submit(*a, **k))
            return handles[-1]

    building = threading.Event()
    release = threading.Event()

    def build():
        building.set()
        release.wait(10)
        return tasks.Task([1, 2, 3], 200, tasks.Sampling(), tasks.StopRules())

    with Model(q4_model) as model, Recording(model, n_ctx=512, parallel=1, threads=1).start() as engine:
        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=SimpleNamespace(engine=engine))))

        async def gone():
            submitting = asyncio.ensure_future(_submit(request, build, stream=False))
            await asyncio.to_thread(building.wait, 10)
            submitting.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await submitting

        asyncio.run(gone())
        deadline = time.time() + 10
        while not handles:
            assert time.time() < deadline, "the build thread never submitted"
            time.sleep(0.01)
        assert handles[0].wait(10).stop_reason == "cancelled"
