"""Many files' KV caches: saved and restored through llama.cpp (synthetic weights), bounded in
memory, written to disk and read back after a restart; bad files are deleted, never loaded."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from refact_gguf.engine import Engine
from refact_gguf.llama import Model
from refact_gguf.prompt_cache import PromptCache, model_fingerprint
from refact_gguf.runtime import Runtime
from refact_gguf.tasks import Task

N_CTX = 512


@pytest.fixture(scope="module")
def model(converted_f32):
    with Model(converted_f32.base) as m:
        yield m


@pytest.fixture(scope="module")
def files():
    """Three 'files' (prompts sharing nothing) and a keystroke later in the first."""
    rng = np.random.default_rng(7)
    a, b, c = (rng.integers(100, 40000, 200).tolist() for _ in range(3))
    return a, b, c, a + rng.integers(100, 40000, 3).tolist()


def fresh(model, prompt):
    with Runtime(model, n_ctx=N_CTX, threads=2) as rt:
        return rt.run(Task(list(prompt), 8)).text


def cache_for(model, tmp_path=None, memory=64 << 20):
    fp = model_fingerprint(model.path)
    return PromptCache(memory, fp, tmp_path, 64 << 20 if tmp_path else 0, model.path.name)


def test_a_file_comes_back_warm_from_the_cache_with_the_output_it_would_have(model, files):
    a, b, _, a2 = files
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model)) as engine:
        engine.start(warmup=False)
        engine.run(Task(a, 8))
        engine.run(Task(b, 8))  # the one slot now holds b; a was saved
        back = engine.run(Task(a2, 8))
        assert engine.stats.cache_saves >= 1 and engine.stats.cache_restores == 1
    assert back.tokens_cached == len(a) and back.tokens_evaluated == 3
    assert back.text == fresh(model, a2)  # restored cache == recomputed cache


def test_without_the_cache_the_same_visit_is_cold(model, files):
    a, b, _, a2 = files
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2) as engine:
        engine.start(warmup=False)
        for p in (a, b):
            engine.run(Task(p, 8))
        assert engine.run(Task(a2, 8)).tokens_evaluated == len(a2)


def test_memory_budget_evicts_the_least_recently_used(model, files):
    a, b, c, _ = files
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2) as engine:
        states = []
        for p in (a, b, c):
            engine.ctx.seq_keep(0, 0)
            engine.ctx.batch.clear()
            engine.ctx.batch.add(0, p, 0, output_last=True)
            engine.ctx.run(engine.ctx.batch)
            states.append(engine.ctx.seq_state(0))
    cache = PromptCache(int(2.5 * len(states[0])))
    for p, state in zip((a, b, c), states):
        cache.put(np.array(p), state)
    assert len(cache) == 2 and cache.memory_used <= int(2.5 * len(states[0]))
    assert cache.best(np.array(a))[1] == 0 and cache.best(np.array(c))[1] == len(c)
    # a state that extends a saved one replaces it; one a saved state extends adds nothing
    cache.put(np.array(c[:100]), states[2][:10])
    assert len(cache) == 2


def test_caches_survive_a_restart(model, files, tmp_path):
    a, _, _, a2 = files
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model, tmp_path)) as engine:
        engine.start(warmup=False)
        engine.run(Task(a, 8))
    assert len(list((tmp_path / model.path.name).glob("*.kv"))) == 1  # written when it closed
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model, tmp_path)) as engine:
        engine.start(warmup=False)
        back = engine.run(Task(a2, 8))
        assert engine.stats.cache_restores == 1
    assert back.tokens_evaluated == 3 and back.text == fresh(model, a2)


def test_idle_engine_writes_its_caches_to_disk(model, files, tmp_path, monkeypatch):
    import refact_gguf.engine as engine_module

    monkeypatch.setattr(engine_module, "SNAPSHOT_AFTER_S", 0.05)
    cache = cache_for(model, tmp_path)
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache) as engine:
        engine.start(warmup=False)
        engine.run(Task(files[0], 8))
        for _ in range(200):
            if list((tmp_path / model.path.name).glob("*.kv")):
                break
            import time

            time.sleep(0.02)
        else:
            raise AssertionError("the idle engine did not write its cache")


def saved_file(model, files, tmp_path):
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model, tmp_path)) as engine:
        engine.start(warmup=False)
        engine.run(Task(files[0], 8))
    (path,) = (tmp_path / model.path.name).glob("*.kv")
    return path


@pytest.mark.parametrize("damage", ["flip a byte of the state", "truncate", "another model", "not a state"])
def test_bad_saved_states_are_deleted_not_loaded(model, files, tmp_path, damage):
    path = saved_file(model, files, tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip a byte of the state":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "not a state":
        data = bytearray(b"hello" * 100)
    path.write_bytes(bytes(data))
    foreign = "0" * 64 if damage == "another model" else model_fingerprint(model.path)
    cache = PromptCache(64 << 20, foreign, tmp_path, 64 << 20, model.path.name)
    saved, n = cache.best(np.array(files[3]))
    if saved is not None:  # only a damaged state gets past the index: its digest stops it
        assert cache.load(saved) is None
    cache.close()
    assert not path.exists() and cache.rejected == 1


def test_a_changed_model_file_invalidates_saved_states(model, files, tmp_path):
    path = saved_file(model, files, tmp_path)
    copy = tmp_path / "m" / model.path.name
    copy.parent.mkdir()
    shutil.copy2(model.path, copy)
    assert model_fingerprint(copy) == model_fingerprint(model.path)
    os.utime(copy, ns=(0, 10**18))  # the file was replaced (re-pulled, re-converted)
    cache = PromptCache(64 << 20, model_fingerprint(copy), tmp_path, 64 << 20, model.path.name)
    assert len(cache) == 0 and cache.rejected == 1 and not path.exists()
