"""What the fault probe of issue #30 found, each a test that failed before its fix: wrong text
under concurrent /tokenize and /detokenize, authentication silently off, keys shortened, one
request holding the engine thread or the event loop, and a disk cache that trusted its directory."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from refact_gguf.engine import Engine
from refact_gguf.errors import InputError, RefactGGUFError
from refact_gguf.prompt_cache import MAGIC, _HEAD, PromptCache, model_fingerprint
from refact_gguf.runtime import Runtime
from refact_gguf.server import ApiKeys
from refact_gguf.server.keys import from_options
from refact_gguf.tasks import StopRules, Task

from .serving import running, serve_process

N_CTX = 512


# ------------------------------------------------------------------------------ wrong text


def test_token_pieces_are_right_whatever_other_threads_detokenize(model):
    """Model.piece wrote into one buffer shared by every thread, and llama.cpp's call releases the
    GIL: a completion came back with another token's text (17 of 204 under /detokenize load)."""
    tokens = list(range(1000, 1400))
    expected = {t: model.piece(t) for t in tokens}
    wrong = []

    def reader(offset: int) -> None:
        for _ in range(30):
            for t in tokens[offset::4]:
                if model.piece(t) != expected[t]:
                    wrong.append(t)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not wrong, f"{len(wrong)} pieces came back with another token's bytes"


def test_completions_under_tokenize_load_equal_the_same_requests_alone(q4_model):
    bodies = [{"input_prefix": f"def f{i}(x):\n    return x * {i}\n\ndef g{i}(", "n_predict": 12, "top_k": 1}
              for i in range(6)]
    with running(q4_model, parallel=2) as u:
        alone = [httpx.post(f"{u}/infill", json=b, timeout=120).json()["content"] for b in bodies]
        stop = threading.Event()

        def hammer():
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    c.post(f"{u}/detokenize", json={"tokens": list(range(100, 2100))})
                    c.post(f"{u}/tokenize", json={"content": "def hello(world): return 42\n" * 40, "with_pieces": True})

        with ThreadPoolExecutor(2) as pool:
            noise = [pool.submit(hammer) for _ in range(2)]
            try:  # one at a time, as alone: batched together, near-ties of random weights may flip
                together = [httpx.post(f"{u}/infill", json=b, timeout=120).json()["content"] for b in bodies * 3]
            finally:
                stop.set()
            for f in noise:
                f.result()
    assert together == alone * 3


# ------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("environ", [{"REFACT_GGUF_API_KEY": ""}, {"REFACT_GGUF_API_KEY_FILE": " "}])
def test_an_empty_key_variable_is_an_error_not_open(environ):
    with pytest.raises(InputError, match="set but empty"):
        from_options(None, None, environ)


def test_an_empty_api_key_is_an_error_and_no_key_is_none():
    with pytest.raises(InputError, match="--api-key is empty"):
        from_options("", None, {})
    assert from_options(None, None, {}) is None


def test_a_keys_file_keeps_whole_keys(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes("\ufeffsk-first\ncorrect horse battery staple   # bob, laptop\nsk-abc#def\n# a comment\n\n".encode())
    keys = ApiKeys(path=path)
    assert keys.person("Bearer sk-first") == "line 1"  # a BOM is not part of the first key
    assert keys.person("Bearer correct horse battery staple") == "bob, laptop"
    assert keys.person("Bearer correct") is None
    assert keys.person("Bearer sk-abc#def") == "line 3" and keys.person("Bearer sk-abc") is None


def test_an_edit_that_keeps_size_and_time_is_noticed(tmp_path, monkeypatch):
    from refact_gguf.server import keys as keys_module

    monkeypatch.setattr(keys_module, "CHECK_EVERY_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("sk-aaaa\n")
    st = path.stat()
    keys = ApiKeys(path=path)
    assert keys.person("Bearer sk-aaaa")
    path.write_text("sk-bbbb\n")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same time, as `cp -p` leaves it
    assert keys.person("Bearer sk-aaaa") is None and keys.person("Bearer sk-bbbb")


def test_a_keys_file_without_keys_is_refused(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nobody yet\n")
    with pytest.raises(RefactGGUFError, match="holds no key"):
        ApiKeys(path=path)


# ------------------------------------------------------------------------------ one request, everyone's time


def test_stop_strings_are_bounded_and_searched_only_where_new_text_can_complete_them():
    with pytest.raises(InputError, match="stop strings"):
        StopRules(tuple(f"s{i}" for i in range(100_000)))
    rules = StopRules(tuple(f"never{i}" for i in range(63)) + ("END",))
    t0 = time.perf_counter()
    for _ in range(2000):
        assert not rules.feed("x = 1\n")
    assert time.perf_counter() - t0 < 2.0  # a rescan of the whole text per token was quadratic
    assert rules.feed("E") is False and rules.feed("ND tail") and rules.text.endswith("x = 1\n")


def test_stop_string_split_over_pieces_is_still_found():
    rules = StopRules(("</code>",))
    for piece in ("a = 1 <", "/co", "de> more"):
        if rules.feed(piece):
            break
    assert rules.stopped == "stop string" and rules.text == "a = 1 "


def test_a_huge_stop_list_is_a_400(url_small):
    r = httpx.post(f"{url_small}/completion", json={"prompt": "x", "n_predict": 1, "stop": [f"s{i}" for i in range(1000)]})
    assert r.status_code == 400 and "stop strings" in r.json()["error"]["message"]


def test_health_answers_while_a_huge_tokenize_runs(url_small):
    text = "def f(x):\n    return [x for x in range(10)]\n" * 20_000  # ~0.9 MB
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(httpx.post, f"{url_small}/tokenize", json={"content": text, "with_pieces": True}, timeout=120)
        time.sleep(0.3)  # it is being tokenized now
        t0 = time.perf_counter()
        assert httpx.get(f"{url_small}/health", timeout=10).status_code == 200
        waited = time.perf_counter() - t0
        assert big.result().status_code == 200
    assert waited < 0.5, f"/health waited {waited:.2f} s behind /tokenize"
    r = httpx.post(f"{url_small}/tokenize", json={"content": "x" * (1 << 21)})
    assert r.status_code == 400


@pytest.mark.parametrize("field, value", [("grammar", "root ::= \"x\""), ("json_schema", {"type": "object"}),
                                           ("response_format", {"type": "json_object"}), ("tool_choice", "required")])
def test_constraints_this_server_cannot_honour_are_refused_by_name(url_small, field, value):
    for path, body in (("/completion", {"prompt": "x", "n_predict": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})):
        r = httpx.post(f"{url_small}{path}", json={**body, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (path, r.text)
    ok = httpx.post(f"{url_small}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                                             "response_format": {"type": "text"}, "tools": []})
    assert ok.status_code == 200


def test_tools_offered_but_not_required_get_a_plain_text_answer(url_small):
    """Agents (Continue's among them) offer tools on every turn; the model may answer in text, as
    one that chose to call none. Required (`tool_choice: required` or a named function): refused."""
    tool = {"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                             "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [tool]}
    for extra in ({}, {"tool_choice": "auto"}, {"tool_choice": "none"}):
        r = httpx.post(f"{url_small}/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"], r.text
    r = httpx.post(f"{url_small}/api/chat", json={"model": "m", "messages": chat["messages"], "tools": [tool], "stream": False,
                                                  "options": {"num_predict": 2}})
    assert r.status_code == 200, r.text
    named = {"type": "function", "function": {"name": "read_file"}}
    r = httpx.post(f"{url_small}/v1/chat/completions", json={**chat, "tool_choice": named})
    assert r.status_code == 400 and "tool_choice" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def url_small(q4_model):
    with running(q4_model, parallel=1) as u:
        yield u


# ------------------------------------------------------------------------------ the disk cache


def engine_with(model, tmp_path, parallel=1, disk_mb=64):
    cache = PromptCache(64 << 20, model_fingerprint(model.path), tmp_path, disk_mb << 20, model.path.name)
    return Engine(model, n_ctx=N_CTX, parallel=parallel, threads=2, cache=cache)


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(5).integers(100, 40000, 150).tolist()


def test_a_planted_symlink_never_redirects_a_write(model, prompt, tmp_path):
    outside = tmp_path / "victim"
    outside.write_text("precious")
    cache_dir = tmp_path / "kv"
    model_dir = cache_dir / model.path.name
    with engine_with(model, cache_dir) as engine:
        engine.start(warmup=False)
        engine.run(Task(list(prompt), 4))
        slot = engine.slots[0]  # its cache is written at close, under a name computable from its ids
        name = hashlib.blake2b(slot.cached[: slot.n_cached].tobytes(), digest_size=12).hexdigest()
        for planted in (f"{name}.kv.partial", f"{name}.kv"):
            (model_dir / planted).symlink_to(outside)
    assert outside.read_text() == "precious"
    assert (model_dir / f"{name}.kv").is_file() and not (model_dir / f"{name}.kv").is_symlink()


@pytest.mark.parametrize("trouble", ["group-writable", "a file", "a symlink"])
def test_a_cache_directory_not_ours_alone_is_not_used_and_serving_goes_on(model, prompt, tmp_path, trouble):
    cache_dir = tmp_path / "kv"
    if trouble == "group-writable":
        cache_dir.mkdir(mode=0o775)
        cache_dir.chmod(0o775)
    elif trouble == "a file":
        cache_dir.write_text("x")
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        cache_dir.symlink_to(tmp_path / "elsewhere")
    with engine_with(model, cache_dir) as engine:
        assert engine.cache.directory is None and "not kept on disk" in engine.cache.problem
        engine.start(warmup=False)
        assert engine.run(Task(list(prompt), 4)).tokens_predicted >= 0  # served, from memory
    assert not list(tmp_path.rglob("*.kv"))


def test_odd_entries_in_the_cache_directory_neither_stop_nor_hang_the_start(model, prompt, tmp_path):
    model_dir = tmp_path / model.path.name
    model_dir.mkdir(parents=True, mode=0o700)
    (model_dir / "dangling.kv").symlink_to(tmp_path / "gone")
    (model_dir / "dir.kv.partial").mkdir()
    (model_dir / "dir.kv").mkdir()
    os.mkfifo(model_dir / "fifo.kv")
    t0 = time.perf_counter()
    with engine_with(model, tmp_path) as engine:
        assert time.perf_counter() - t0 < 30 and engine.cache.directory is not None
        engine.start(warmup=False)
        engine.run(Task(list(prompt), 4))
    assert engine.cache.rejected >= 2 and list(model_dir.glob("*.kv"))


def test_states_of_another_parallel_are_foreign_not_retried(model, prompt, tmp_path):
    with engine_with(model, tmp_path, parallel=1) as engine:
        engine.start(warmup=False)
        engine.run(Task(list(prompt), 4))
    (written,) = (tmp_path / model.path.name).glob("*.kv")
    with engine_with(model, tmp_path, parallel=2) as engine:
        engine.start(warmup=False)
        for _ in range(3):
            assert engine.run(Task(list(prompt) + [7, 8], 4)).tokens_evaluated > 0
        assert engine.stats.cache_restores == 0
    assert not written.exists()  # dropped once, not kept and retried on every visit


def _recraft(path: Path, claim: list[int]) -> None:
    """Rewrite a state file to claim other ids, its digest recomputed (anyone who may write the directory can)."""
    data = path.read_bytes()
    n_head = _HEAD.unpack(data[: _HEAD.size])[1]
    head = json.loads(data[_HEAD.size : _HEAD.size + n_head])
    state = data[_HEAD.size + n_head + 4 * head["n_tokens"] :]
    ids = np.asarray(claim, "<i4").tobytes()
    digest = hashlib.blake2b(ids)
    digest.update(state)
    head.update(n_tokens=len(claim), blake2b=digest.hexdigest())
    raw = json.dumps(head).encode()
    path.write_bytes(_HEAD.pack(MAGIC, len(raw)) + raw + ids + state)


def test_a_crafted_state_that_claims_more_tokens_than_it_holds_is_refused(model, prompt, tmp_path):
    short = list(prompt[:80])
    with engine_with(model, tmp_path) as engine:
        engine.start(warmup=False)
        engine.run(Task(short, 4))
    (path,) = (tmp_path / model.path.name).glob("*.kv")
    _recraft(path, list(prompt))  # claims 150 ids; its state holds ~84 positions
    with Runtime(model, n_ctx=N_CTX, threads=2) as rt:
        expected = rt.run(Task(list(prompt) + [9], 6)).text
    with engine_with(model, tmp_path) as engine:
        engine.start(warmup=False)
        got = engine.run(Task(list(prompt) + [9], 6))
        assert engine.stats.cache_restores == 0 and engine.stats.cache_refused == 1
    assert got.text == expected and got.tokens_evaluated == len(prompt) + 1
    assert not path.exists()


def test_a_state_larger_than_the_disk_budget_is_not_written(model, prompt, tmp_path):
    with engine_with(model, tmp_path, disk_mb=0):
        pass
    cache = PromptCache(64 << 20, "fp", tmp_path, 1000, "m", layout="x")
    cache.put(np.arange(100, dtype=np.int32), bytearray(5000))
    cache.flush()
    cache.close()
    assert not list((tmp_path / "m").glob("*"))


def test_sighup_without_a_keys_file_does_not_kill_the_server(q4_model):
    with serve_process(q4_model, "--ctx", "256", "--cache-disk-mb", "0") as (proc, url):
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None and httpx.get(f"{url}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "no keys file" in proc.stderr.read().decode()
