"""Cold files: many files' KV caches saved and restored through llama.cpp (synthetic weights),
bounded in memory, written to disk and read back after a restart (bad files deleted, never
loaded); a file too little of which is cached answered from the lines around the cursor while its
full prompt is evaluated in the background, which yields to any keystroke."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from refact_gguf.engine import Engine
from refact_gguf.llama import Context
from refact_gguf.prompt_cache import PromptCache, model_fingerprint
from refact_gguf.runtime import Runtime
from refact_gguf.tasks import Task

N_CTX = 512


@pytest.fixture(scope="module")
def files():
    """Three 'files' (prompts sharing nothing) and a keystroke later in the first."""
    rng = np.random.default_rng(7)
    a, b, c = (rng.integers(100, 40000, 200).tolist() for _ in range(3))
    return a, b, c, a + rng.integers(100, 40000, 3).tolist()


class SlowPrompts(Engine):
    """Prompts measured at 100 tokens a second whatever the machine: a 200-token file is late
    for a 0.5 s budget, as a 1,500-token file is on a laptop."""

    prompt_rate = property(lambda self: 100.0, lambda self, value: None)


def keystroke(prompt, short=None, budget_s=0.5):
    short = short if short is not None else prompt[-30:]  # stands for the lines around the cursor
    return Task(list(prompt), 8, short=lambda tokens: Task(list(short), 8, short_context=True),
                prompt_budget=time.perf_counter() + budget_s)


def until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


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
        until(lambda: list((tmp_path / model.path.name).glob("*.kv")), timeout=10)  # written while it idles


def saved_file(model, files, tmp_path):
    """The one state file an engine leaves, and the layout of the context it came from."""
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model, tmp_path)) as engine:
        engine.start(warmup=False)
        engine.run(Task(files[0], 8))
        layout = engine.ctx.state_layout
    (path,) = (tmp_path / model.path.name).glob("*.kv")
    return path, layout


@pytest.mark.parametrize("damage", ["flip a byte of the state", "truncate", "another model", "not a state"])
def test_bad_saved_states_are_deleted_not_loaded(model, files, tmp_path, damage):
    path, layout = saved_file(model, files, tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip a byte of the state":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "not a state":
        data = bytearray(b"hello" * 100)
    path.write_bytes(bytes(data))
    foreign = "0" * 64 if damage == "another model" else model_fingerprint(model.path)
    cache = PromptCache(64 << 20, foreign, tmp_path, 64 << 20, model.path.name, layout)
    saved, n = cache.best(np.array(files[3]))
    if saved is not None:  # only a damaged state gets past the index: its digest stops it
        assert cache.load(saved) is None
    cache.close()
    assert not path.exists() and cache.rejected == 1


def test_a_changed_model_file_invalidates_saved_states(model, files, tmp_path):
    path, layout = saved_file(model, files, tmp_path)
    copy = tmp_path / "m" / model.path.name
    copy.parent.mkdir()
    shutil.copy2(model.path, copy)
    assert model_fingerprint(copy) == model_fingerprint(model.path)
    os.utime(copy, ns=(0, 10**18))  # the file was replaced (re-pulled, re-converted)
    cache = PromptCache(64 << 20, model_fingerprint(copy), tmp_path, 64 << 20, model.path.name, layout)
    assert len(cache) == 0 and cache.rejected == 1 and not path.exists()


def test_a_cold_file_is_answered_short_then_comes_back_with_its_full_context(model, files):
    a, _, _, a2 = files
    with SlowPrompts(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model)) as engine:
        engine.start(warmup=False)
        first = engine.run(keystroke(a))
        assert first.short_context and first.prompt_tokens == 30 and first.text == fresh(model, a[-30:])
        until(lambda: engine.load()["background"] == 0)  # the full prompt, evaluated meanwhile
        assert engine.stats.background_tokens == len(a) and engine.stats.short_answers == 1
        back = engine.run(keystroke(a2))
    assert not back.short_context and back.tokens_evaluated == 3 and back.text == fresh(model, a2)


def test_a_short_answer_waits_for_little_background_work(model, files):
    """A short answer's steps carry a few tens of ms of the full prompt, at the measured rate (here
    3 tokens), not a ubatch: on two CPU cores with the full-size model a ubatch was ~10 s, paid by
    every generated token, and a first keystroke in a file took a minute."""
    a, *_ = files
    with SlowPrompts(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model)) as engine:
        short = engine.submit(keystroke(a))
        for _ in range(100):
            if short.done:
                break
            engine.tick()
        assert short.wait(0).short_context
        assert 0 < engine.stats.background_tokens <= 3 * engine.stats.steps < len(a), engine.stats


class SlowerPrompts(Engine):
    """Prompts at 50 tokens a second: a 200-token file's rest takes 4 s, as ~2,000 tokens take ~40 s
    with the full-size model on two CPU cores."""

    prompt_rate = property(lambda self: 50.0, lambda self, value: None)


def test_a_files_first_answer_goes_alone_where_its_rest_takes_long(model, files):
    """On a CPU a row beside a lone token is a pass of its own (full-size model, two cores: 70 ms a
    token, 110 with a background row), for progress the file's long rest hardly notices: its first
    answer decodes alone. The next keystroke's short answer carries the background share again."""
    a, _, _, a2 = files
    with SlowerPrompts(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model)) as engine:
        for prompt, alone in ((a, True), (a2, False)):
            short = engine.submit(keystroke(prompt))
            before = engine.stats.background_tokens, engine.stats.fillers
            while not short.done:
                engine.tick()
            assert short.wait(0).short_context and short.task.alone is alone
            assert (engine.stats.background_tokens, engine.stats.fillers) == before if alone else \
                engine.stats.background_tokens > before[0], engine.stats


def test_a_cached_file_is_not_answered_short(model, files):
    a, _, _, a2 = files
    with SlowPrompts(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model)) as engine:
        engine.start(warmup=False)
        engine.run(Task(a, 8))
        assert not engine.run(keystroke(a2)).short_context


def test_background_work_yields_to_a_keystroke_within_one_step(model, files):
    a, b, _, a2 = files
    engine = SlowPrompts(model, n_ctx=N_CTX, parallel=1, threads=2, cache=cache_for(model))
    with engine:
        short = engine.submit(keystroke(a))
        engine.tick()  # the short answer on a scratch sequence, the full prompt beside it in the background
        (slot, job), = [(s, h) for s, h in engine._active.items() if s in engine.slots]
        while slot.n_cached < 64:  # beside the short answer a few tokens a step, then 32 (the least a step nobody waits on takes)
            engine.tick()
        assert engine._active.get(slot) is job and job.background and slot.n_cached < len(a)
        other = engine.submit(Task(b, 8))  # a keystroke in another file
        engine.tick()
        assert engine._active[slot] is other and slot.evaluated > 0  # its prompt went in this very step
        assert engine.load()["background"] == 1
        for _ in range(200):
            if other.done and short.done and not engine.load()["background"]:
                break
            engine.tick()
        assert other.wait(0).text == fresh(model, b)
        assert short.wait(0).short_context
        assert engine.stats.cache_restores >= 1  # the full prompt resumed from where it was saved
        back = engine.submit(Task(a2, 8))
        for _ in range(50):
            if back.done:
                break
            engine.tick()
        assert back.wait(0).tokens_evaluated == 3 and back.wait(0).text == fresh(model, a2)


def test_a_decode_given_up_leaves_no_trace_in_the_cache(model, files):
    """How background work yields: llama.cpp asks `stop_if` between operations and drops the batch."""
    import llama_cpp

    a = files[0]
    with Context(model, n_ctx=N_CTX, threads=2) as ctx, Context(model, n_ctx=N_CTX, threads=2) as ref:
        for c in (ctx, ref):
            c.batch.clear()
            c.batch.add(0, a[:64], 0, output_last=True)
        assert ctx.run(ctx.batch, stop_if=lambda: True) is False
        assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx.ptr), 0) == -1
        assert ctx.run(ctx.batch) and ref.run(ref.batch)  # the same positions go in again
        np.testing.assert_array_equal(ctx.logits(1), ref.logits(1))


def test_a_background_step_given_up_part_way_leaves_slots_and_cache_in_step(model, files):
    """llama.cpp keeps the ubatches it finished before a step is given up. Uncounted, they made the
    next step's positions overlap the cache: llama_decode returned -1 and every task in it failed."""
    import llama_cpp

    from refact_gguf.handles import Handle

    a, b, c, _ = files
    prompts = [a + b, b + c, c + a]  # 400 tokens each: a step of 3 × 127 is three ubatches of 128
    with Engine(model, n_ctx=N_CTX, parallel=3, threads=2, cache=cache_for(model)) as engine:
        engine.prompt_rate = 10_000.0  # a background step may take whole ubatches
        jobs = []
        for p in prompts:
            job = Handle(Task(list(p), 0), None, None)
            job.background = True
            engine._background.append(job)
            jobs.append(job)
        real, calls = engine.ctx.run, []

        def counting(batch, stop_if=None, limit=None):
            n = [0]

            def ask():
                n[0] += 1
                return limit is not None and n[0] > limit

            done = real(batch, stop_if=ask)
            calls.append(n[0])
            return done

        engine.ctx.run = counting
        engine.tick()  # a full step: how often llama.cpp asks, for this shape
        full = calls[-1]
        engine.ctx.run = lambda batch, stop_if=None: counting(batch, stop_if, limit=int(full * 0.6))
        engine.tick()  # given up in its second or third ubatch
        assert engine.stats.background_stopped == 1
        engine.ctx.run = counting
        memory = llama_cpp.llama_get_memory(engine.ctx.ptr)
        for slot in engine.slots:
            assert llama_cpp.llama_memory_seq_pos_max(memory, slot.seq) == slot.n_cached - 1
        for _ in range(20):
            if all(j.done for j in jobs):
                break
            engine.tick()
        assert all(j.wait(0).tokens_evaluated > 0 for j in jobs)  # none failed
        assert engine.stats.errors == 0
