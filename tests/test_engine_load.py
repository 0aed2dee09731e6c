"""The engine under load, judged by its counters (tiny synthetic model, CPU): typists in whole
files longer than the context, typing together, first cold and answered short, then the same
typing again over the disk cache the first server left (an editor restarted next morning).

In steady typing a person keeps their live slot: no save, no restore, no state written to disk,
a few prompt tokens a keystroke, and every file reaches its full context."""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import pytest

from refact_gguf import engine as engine_module
from refact_gguf.engine import Engine
from refact_gguf.prompt_cache import PromptCache, model_fingerprint
from refact_gguf.server.common import Limits, Service

N_CTX = 512
TYPISTS = 4
KEYSTROKES = 8
STEADY = 4  # keystrokes from this one on are "after convergence"
LINE = "    result = normalize(value, strict=True)"
# Between a suggestion and the next keystroke, as a quick typist goes (10 keys a second). Sent back to
# back, 8 keystrokes would take a few tens of ms with this tiny model: a second of short answers (the
# engine's rule for converging a file) is never reached, nor any step nobody waits on.
PAUSE_S = 0.1
FILES = ("textwrap.py", "heapq.py", "difflib.py", "argparse.py")


class SlowPrompts(Engine):
    """Prompts measured at 200 tokens a second whatever the machine: a whole file is late for a
    one-second budget, as a 4,000-token file is on a laptop."""

    prompt_rate = property(lambda self: 200.0, lambda self, value: None)


@pytest.fixture(scope="module")
def sources() -> list[tuple[str, str]]:
    """(prefix, suffix) of each typist's file: the cursor on a new line two thirds in."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in FILES:
        lines = (root / name).read_text().splitlines(keepends=True)
        cursor = 2 * len(lines) // 3
        out.append(("".join(lines[:cursor]), "\n" + "".join(lines[cursor:])))
    return out


def type_together(engine: Engine, sources, budget_ms: int = 1000) -> list[list]:
    """Every typist sends keystroke k at once, then waits for all answers; completions [k][typist]."""
    service = Service(engine, "m", Limits(prompt_budget_ms=budget_ms))
    rounds = []
    for k in range(KEYSTROKES):
        typed = LINE[: 4 + 3 * k]
        handles = [engine.submit(service.fim(prefix, suffix, time.perf_counter(), line=typed, max_tokens=16))
                   for prefix, suffix in sources]
        rounds.append([h.wait(120) for h in handles])
        time.sleep(PAUSE_S)
    return rounds


def counters(engine: Engine) -> tuple[int, int, int]:
    s = engine.stats
    return s.cache_saves, s.cache_restores, s.short_answers


def kv_files(directory: Path) -> set[str]:
    return {p.name for p in directory.rglob("*.kv")}


def test_steady_typing_keeps_live_slots_and_converges_fresh_and_after_a_restart(model, sources, tmp_path):
    fingerprint = model_fingerprint(model.path)

    def engine() -> Engine:
        cache = PromptCache(64 << 20, fingerprint, tmp_path, 256 << 20, model.path.name)
        return SlowPrompts(model, n_ctx=N_CTX, parallel=TYPISTS, threads=2, cache=cache).start(warmup=False)

    for day in ("fresh cache", "yesterday's cache"):
        with engine() as eng:
            on_disk = kv_files(tmp_path)
            rounds = type_together(eng, sources)
            saves, restores, shorts = counters(eng)
            # Nobody switched files: nothing to save; each file written to disk only when the server stops.
            assert saves == 0 and kv_files(tmp_path) == on_disk, (day, saves, on_disk, kv_files(tmp_path))
            # Short answers converge: while a file's full prompt goes in (a few tens of ms of each
            # step beside short answers, all of a step nobody waits on), its keystrokes may be
            # answered short; from the STEADY-th on, full context and a few prompt tokens a keystroke.
            assert shorts <= (TYPISTS * STEADY if day == "fresh cache" else 0), (day, shorts)
            later = [c for r in rounds[STEADY:] for c in r]
            assert not any(c.short_context for c in later), day
            assert max(c.tokens_evaluated for c in later) <= 16, (day, [c.tokens_evaluated for c in later])
            # Yesterday's states are restored once per file (its first visit), never over a live slot.
            assert restores == (0 if day == "fresh cache" else TYPISTS), (day, restores)
        if day == "fresh cache":
            assert shorts >= 1  # the test did exercise the cold path


def test_a_files_next_short_answer_evaluates_only_what_was_typed(model, sources):
    """Short answers converge too: while a cold file's full prompt is still going in, its next
    keystroke is answered short again, on the lines its last short answer had (their KV cache on
    the scratch sequence), however many requests are in flight by then — not on a window resized
    to the new load, which shares nothing with the last one and is evaluated again whole."""
    cache = PromptCache(64 << 20, model_fingerprint(model.path), None, 0, model.path.name)
    # Small batches: the background prefill of the file takes many steps, as a whole file's does on a laptop.
    with SlowPrompts(model, n_ctx=N_CTX, parallel=4, threads=2, n_batch=64, cache=cache) as eng:
        service = Service(eng, "m", Limits(prompt_budget_ms=1000))
        (prefix, suffix), *others = sources

        def run(*handles):
            for _ in range(200):
                if all(h.done for h in handles):
                    return [h.wait(0) for h in handles]
                eng.tick()
            raise AssertionError("not done in 200 steps")

        first, = run(eng.submit(service.fim(prefix, suffix, time.perf_counter(), line=LINE[:4], max_tokens=4)))
        assert first.short_context and eng.load()["background"] == 1
        # Two people start typing in other files (no budget: full prompts), then the first types on.
        busy = [eng.submit(service.fim(p, s, time.perf_counter(), budget_ms=0, line=LINE[:4], max_tokens=4))
                for p, s in others[:2]]
        second = eng.submit(service.fim(prefix, suffix, time.perf_counter(), line=LINE[:7], max_tokens=4))
        second, *_ = run(second, *busy)
        assert second.short_context and second.prompt_tokens > 16, second
        assert second.tokens_evaluated <= 8, (second.tokens_evaluated, second.prompt_tokens, first.prompt_tokens)


def ticks_until_done(eng: Engine, *handles, steps: int = 400):
    for _ in range(steps):
        if all(h.done for h in handles):
            return [h.wait(0) for h in handles]
        eng.tick()
    raise AssertionError(f"not done in {steps} steps")


def test_cold_keystrokes_together_share_the_budget(model, sources):
    """Cold files opened at once are answered short from windows sized at admission, beside every
    request in flight: sized as each arrived, the first of eight took the whole budget and the
    others' answers came back empty on their prompt deadline (two CPU cores, small model)."""

    class Prompts(Engine):
        prompt_rate = property(lambda self: 400.0, lambda self, value: None)  # a whole file: late

    cache = PromptCache(64 << 20, model_fingerprint(model.path), None, 0, model.path.name)
    with Prompts(model, n_ctx=N_CTX, parallel=TYPISTS, threads=2, cache=cache) as eng:
        service = Service(eng, "m", Limits(prompt_budget_ms=1000))
        start = time.perf_counter()
        handles = [eng.submit(service.fim(p, s, start, line=LINE[:4], max_tokens=4)) for p, s in sources]
        answers = ticks_until_done(eng, *handles)
        sizes = [n for _, _, n in eng._shortened]  # each file's window, in tokens (its lines fill up to it)
    assert all(a.short_context for a in answers) and len(sizes) == len(sources)
    assert sum(sizes) <= 400 * 1.0 * engine_module.SHORT_SHARE and len(set(sizes)) == 1, sizes


def test_a_file_converging_waits_for_its_full_prompt_past_the_clients_prompt_limit(model, sources, monkeypatch):
    """Once a file has been answered short long enough, its next keystroke waits for what is left
    of its full prompt, if that is little. The engine chose that wait: the client's
    t_max_prompt_ms must not end it with an empty answer."""
    monkeypatch.setattr(engine_module, "SHORT_FOR_AT_MOST_S", 0.0)
    cache = PromptCache(64 << 20, model_fingerprint(model.path), None, 0, model.path.name)
    with SlowPrompts(model, n_ctx=N_CTX, parallel=1, threads=2, n_batch=32, cache=cache) as eng:
        service = Service(eng, "m", Limits(prompt_budget_ms=1000))
        (prefix, suffix), *_ = sources
        first, = ticks_until_done(eng, eng.submit(service.fim(prefix, suffix, time.perf_counter(), line=LINE[:4], max_tokens=4)))
        assert first.short_context
        slot = eng.slots[0]
        while len(slot.todo) > 200 * engine_module.WAIT_FOR_FULL_S or slot.n_cached < 64:  # little left: converge
            eng.tick()
        task = service.fim(prefix, suffix, time.perf_counter(), line=LINE[:5], max_tokens=4)
        task.prompt_deadline = time.perf_counter()  # already past, as llama.vim's 500 ms would be here
        second, = ticks_until_done(eng, eng.submit(task))
    assert not second.short_context and second.tokens_evaluated > 32 and second.stop_reason != "time", second


def test_files_opened_together_converge_together(model, sources, monkeypatch):
    """Each file converging weighs what is left of its own prompt, not the queue ahead of it: one
    slow keystroke each, as llama-server's first one is for all. Weighing the queue, one file in
    turn converged and the others went on with short answers, every keystroke slow."""
    monkeypatch.setattr(engine_module, "SHORT_FOR_AT_MOST_S", 0.0)
    cache = PromptCache(64 << 20, model_fingerprint(model.path), None, 0, model.path.name)
    with SlowPrompts(model, n_ctx=N_CTX, parallel=TYPISTS, threads=2, n_batch=64, cache=cache) as eng:
        service = Service(eng, "m", Limits(prompt_budget_ms=1000))
        first = ticks_until_done(eng, *[eng.submit(service.fim(p, s, time.perf_counter(), line=LINE[:4], max_tokens=4))
                                        for p, s in sources])
        assert all(c.short_context for c in first)
        left = 200 * engine_module.WAIT_FOR_FULL_S  # tokens each file may have left to converge
        while any(len(s.todo) > left for s in eng.slots):
            eng.tick()
        assert sum(len(s.todo) for s in eng.slots) > left  # together, more than one file's wait
        second = ticks_until_done(eng, *[eng.submit(service.fim(p, s, time.perf_counter(), line=LINE[:5], max_tokens=4))
                                         for p, s in sources])
    assert not any(c.short_context for c in second), [c.tokens_evaluated for c in second]
