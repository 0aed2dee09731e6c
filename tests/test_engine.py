"""The batching engine on a real llama.cpp context (synthetic weights): a task batched with others
gets what it gets alone; tasks enter, leave and are cancelled between steps; nothing leaks."""

from __future__ import annotations

import numpy as np
import pytest

from refact_gguf.engine import Engine
from refact_gguf.errors import BusyError
from refact_gguf.llama import Context
from refact_gguf.runtime import Runtime
from refact_gguf.tasks import Sampling, StopRules, Task

N_CTX = 512


@pytest.fixture(scope="module")
def prompts(model, sample_tokens):
    rng = np.random.default_rng(3)
    return [sample_tokens[: 20 + 9 * i] + rng.integers(100, 40000, 5 + i).tolist() for i in range(5)]


def alone(model, prompt, max_tokens=12, sampling=Sampling()):
    with Runtime(model, n_ctx=N_CTX, threads=2) as rt:
        return rt.run(Task(list(prompt), max_tokens, sampling))


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [alone(model, p).text for p in prompts]


def drive(engine, handles, max_ticks=500, results=True):
    for _ in range(max_ticks):
        if all(h.done for h in handles):
            return [h.wait(0) for h in handles] if results else handles
        engine.tick()
    raise AssertionError("tasks did not finish")


def test_batched_logits_agree_with_single_sequence_logits(model, prompts):
    """Several sequences in one llama_decode read only their own KV and get their own rows. The
    noise of a different batch shape is measured, not assumed: rows of another sequence are
    far further apart than that."""
    singles = []
    with Context(model, n_ctx=N_CTX, threads=2) as one:
        for p in prompts[:3]:
            one.reset()
            singles.append(one.eval(p))
    with Context(model, n_ctx=N_CTX, threads=2, n_seq_max=3) as many:
        b = many.batch
        b.clear()
        for seq, p in enumerate(prompts[:3]):
            b.add(seq, p, 0, output_last=True)
        many.run(b)
        rows = many.logits(3).copy()
    noise = max(np.abs(rows[i] - singles[i]).max() for i in range(3))
    apart = min(np.abs(rows[i] - singles[j]).max() for i in range(3) for j in range(3) if i != j)
    assert noise < 2e-2, noise
    assert apart > 20 * noise, (apart, noise)
    assert all(rows[i].argmax() == singles[i].argmax() for i in range(3))


@pytest.mark.parametrize("full", [False, True], ids=["gaps filled", "full batches"])
@pytest.mark.parametrize("order", ["together", "staggered", "reversed"])
def test_a_batched_task_gets_what_it_gets_alone(model, prompts, expected, order, full):
    # small batches: prompts are chunked; "full batches" is the GPU layout (a row for every slot)
    with Engine(model, n_ctx=N_CTX, parallel=4, threads=2, n_batch=64, full_batches=full) as engine:
        todo = list(range(len(prompts)))[:: -1 if order == "reversed" else 1]
        handles, ticks = {}, 0
        while todo or not all(h.done for h in handles.values()):
            # together/reversed: everything at once; staggered: a newcomer every 3 steps, mid-generation
            while todo and (order != "staggered" or ticks % 3 == 0):
                i = todo.pop(0)
                handles[i] = engine.submit(Task(list(prompts[i]), 12))
                if order == "staggered":
                    break
            engine.tick()
            ticks += 1
        for i, h in handles.items():
            assert h.wait(0).text == expected[i], i
        assert engine.load()["busy"] == 0


def test_cache_reuse_on_and_off_give_the_same_text(model, prompts, expected):
    with Engine(model, n_ctx=N_CTX, parallel=2, threads=2) as engine:
        first = drive(engine, [engine.submit(Task(list(p), 12)) for p in prompts[:2]])
        again = drive(engine, [engine.submit(Task(list(p), 12)) for p in prompts[:2]])
        fresh = [Task(list(p), 12) for p in prompts[:2]]
        for t in fresh:
            t.reuse_cache = False
        cold = drive(engine, [engine.submit(t) for t in fresh])
    assert [c.text for c in first] == [c.text for c in again] == [c.text for c in cold] == expected[:2]
    assert all(c.tokens_evaluated == 1 for c in again)  # each found its own cache (affinity)
    assert all(c.tokens_evaluated == c.prompt_tokens for c in cold)


def test_greedy_and_sampled_tasks_share_a_step(model, prompts, expected):
    sampled = Sampling(temperature=0.8, top_k=40, top_p=0.95, seed=5)
    want = alone(model, prompts[1], sampling=sampled).text
    with Engine(model, n_ctx=N_CTX, parallel=2, threads=2) as engine:
        greedy, hot = drive(engine, [engine.submit(Task(list(prompts[0]), 12)),
                                     engine.submit(Task(list(prompts[1]), 12, sampled))])
    assert greedy.text == expected[0] and hot.text == want


@pytest.mark.parametrize("full", [False, True], ids=["gaps filled", "full batches"])
def test_cancel_mid_batch_leaves_the_others_untouched(model, prompts, expected, full):
    with Engine(model, n_ctx=N_CTX, parallel=3, threads=2, full_batches=full) as engine:
        handles = [engine.submit(Task(list(p), 12)) for p in prompts[:3]]
        for _ in range(4):
            engine.tick()
        handles[1].cancel()
        done = drive(engine, handles)
        assert done[1].stop_reason == "cancelled" and done[1].tokens_predicted < 12
        assert done[0].text == expected[0] and done[2].text == expected[2]
        assert engine.load() == {"slots": 3, "busy": 0, "waiting": 0, "threads": 2, "background": 0}


def test_full_queue_is_busy(model, prompts):
    with Engine(model, n_ctx=N_CTX, parallel=1, threads=2, max_queue=1) as engine:
        engine.submit(Task(list(prompts[0]), 4))  # takes the slot
        engine.submit(Task(list(prompts[1]), 4))  # waits
        with pytest.raises(BusyError):
            engine.submit(Task(list(prompts[2]), 4))


def test_one_sequence_at_the_context_limit_while_others_go_on(model, prompts, expected):
    with Engine(model, n_ctx=256, parallel=2, threads=2) as engine:
        assert engine.n_ctx == 256
        long = (list(prompts[4]) * 5)[:240]  # 16 tokens left to generate in
        assert 200 < len(long) < 256
        full, other = drive(engine, [engine.submit(Task(long, 1000)), engine.submit(Task(list(prompts[0]), 12))])
    assert full.stop_reason == "max_tokens" and full.tokens_predicted == 256 - len(long)
    assert other.text == expected[0]


def test_a_prompt_longer_than_the_context_fails_alone(model, prompts, expected):
    with Engine(model, n_ctx=256, parallel=2, threads=2) as engine:
        bad, good = engine.submit(Task(list(prompts[0]) * 20, 4)), engine.submit(Task(list(prompts[0]), 12))
        drive(engine, [bad, good], results=False)
        with pytest.raises(Exception, match="context holds 256"):
            bad.wait(0)
        assert good.wait(0).text == expected[0]


def test_stop_rules_and_streaming_per_task(model, prompts, expected):
    """Each task streams its own text, and what it streamed is what it returns."""
    pieces: dict[int, list[str]] = {0: [], 1: []}
    with Engine(model, n_ctx=N_CTX, parallel=2, threads=2) as engine:
        cut = expected[1][3:6]
        handles = [engine.submit(Task(list(prompts[0]), 12), on_text=pieces[0].append),
                   engine.submit(Task(list(prompts[1]), 12, rules=StopRules((cut,))), on_text=pieces[1].append)]
        a, b = drive(engine, handles)
    assert "".join(pieces[0]) == a.text == expected[0]
    assert "".join(pieces[1]) == b.text == expected[1][: expected[1].index(cut)] and b.stop_reason == "stop string"


def test_the_engine_thread_serves_many_submitters(model, prompts, expected):
    from concurrent.futures import ThreadPoolExecutor

    with Engine(model, n_ctx=N_CTX, parallel=4, threads=2).start() as engine:
        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(lambda i: engine.run(Task(list(prompts[i % 5]), 12)).text, range(16)))
        assert texts == [expected[i % 5] for i in range(16)]
        assert engine.load() == {"slots": 4, "busy": 0, "waiting": 0, "threads": 2, "background": 0}


def test_an_idle_slot_between_busy_ones_keeps_its_cache(model, prompts, expected):
    """Busy slots 0 and 2 with slot 1 idle: the batch fills the gap with a token for slot 1 (so
    llama.cpp runs one ubatch, not two), which must leave slot 1's cache as it was."""
    with Engine(model, n_ctx=N_CTX, parallel=3, threads=2) as engine:
        drive(engine, [engine.submit(Task(list(p), 12)) for p in prompts[:3]])
        fillers = engine.stats.fillers
        outer = drive(engine, [engine.submit(Task(list(prompts[i]), 12)) for i in (0, 2)])
        assert engine.stats.fillers > fillers
        (middle,) = drive(engine, [engine.submit(Task(list(prompts[1]), 12))])
    assert [c.text for c in outer] == [expected[0], expected[2]]
    assert middle.tokens_evaluated == 1 and middle.text == expected[1]


def test_a_consumer_that_fails_stops_its_task_not_the_engine(model, prompts, expected):
    def broken(text):
        raise RuntimeError("event loop is closed")

    with Engine(model, n_ctx=N_CTX, parallel=2, threads=2).start() as engine:
        gone = engine.submit(Task(list(prompts[0]), 12), on_text=broken, on_done=lambda h: 1 / 0)
        assert gone.wait(30).stop_reason in ("cancelled", "max_tokens", "eos", "special")
        assert engine.run(Task(list(prompts[1]), 12)).text == expected[1]  # the engine thread lives on


def test_drafted_tokens_leave_the_greedy_text_as_it_is(model, sample_tokens, monkeypatch):
    """--draft: drafted tokens are verified in one decode and only those greedy decoding picks are
    kept, the rest trimmed from the cache. Random weights repeat nothing for a prompt lookup to
    find, so the drafts here come from an oracle that knows the greedy tokens and gets the third
    of every three wrong: each step keeps two and throws one away."""
    from refact_gguf import layout

    prompt = sample_tokens[:60]
    with Engine(model, n_ctx=N_CTX, threads=2) as plain:
        expected = drive(plain, [plain.submit(Task(list(prompt), 24))])[0]
        slot = plain.slots[0]
        greedy = slot.cached[len(prompt) : slot.n_cached].tolist()  # what it generated, in order
        plain_steps = plain.stats.steps

    def oracle(history, k):
        j = len(history) - len(prompt)  # the next generated token's index
        right = greedy[j : j + 2]
        return np.array(right + [(greedy[j + 2] + 1) % 1000 + 100] if j + 2 < len(greedy) else right, np.int32)[:k]

    monkeypatch.setattr(layout, "draft", oracle)
    with Engine(model, n_ctx=N_CTX, threads=2, draft=4) as drafting:
        got = drive(drafting, [drafting.submit(Task(list(prompt), 24))])[0]
        again = drive(drafting, [drafting.submit(Task(list(prompt), 24))])[0]  # over the cache the first one left
        stats = drafting.stats
    assert got.text == expected.text and again.text == expected.text
    assert got.tokens_predicted == expected.tokens_predicted and got.draft_accepted >= 10
    assert got.draft_n - got.draft_accepted >= 5  # wrong drafts were thrown away, not kept
    assert stats.steps < plain_steps + plain_steps // 2  # two prompts in fewer steps than 1.5 of one


def test_a_lone_request_decodes_alone_in_the_gpu_layout_and_its_steps_are_measured(model, sample_tokens):
    """On a GPU every sequence gets a row while several are busy; a lone request's step carries no
    filler for the others (here the scratch sequence short answers use): a filler row costs the
    step ~40% on an H200. Its one-token steps are what the draft gate measures verify steps against."""
    from refact_gguf.prompt_cache import PromptCache

    with Engine(model, n_ctx=N_CTX, parallel=3, threads=2, full_batches=True, cache=PromptCache(1 << 20),
                draft=4) as engine:
        drive(engine, [engine.submit(Task(list(sample_tokens[:30]), 8))])
        assert engine.stats.fillers == 0 and engine.drafter.lone_step_s is not None
        # The next keystroke's 3 new tokens go one a step: every step one token (CUDA keeps its graph).
        steps, tokens = engine.stats.steps, engine.stats.batch_tokens
        got = drive(engine, [engine.submit(Task(list(sample_tokens[:33]), 8))])[0]
        assert got.text == alone(model, sample_tokens[:33], 8).text
        assert engine.stats.steps - steps == engine.stats.batch_tokens - tokens == 3 + 7
        drive(engine, [engine.submit(Task(list(sample_tokens[:20]), 8)), engine.submit(Task(list(sample_tokens[40:60]), 8))])
        assert engine.stats.fillers > 0  # two at once: a row for every person's slot, the idle third too


def test_drafting_is_off_where_layers_are_offloaded(converted_f32):
    """On a GPU a verify step's rows take other kernels than a one-token step's, so drafting could
    change the greedy text (llama.cpp#27407): an engine on an offloaded model does not draft."""
    from refact_gguf.llama import Model

    with Model(converted_f32.base, n_gpu_layers=1) as offloaded, Engine(offloaded, n_ctx=N_CTX, threads=2, draft=4) as engine:
        assert engine.drafter is None
    with Model(converted_f32.base) as on_cpu, Engine(on_cpu, n_ctx=N_CTX, threads=2, draft=4) as engine:
        assert engine.drafter is not None
