"""On trained weights (../shared/standin: a Refact-shaped checkpoint trained on Python sources), what
the synthetic model's deliberate offset only suggests: `convert` is faithful, llama.cpp's own
converter is not (about a Q6_K quant's error before any quantization), and `repair` brings a
published Q8_0 within 2× of a converted one. Skips, saying why, where ../shared is absent."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from refact_gguf import catalog
from refact_gguf.convert import convert
from refact_gguf.convert.checkpoint import Checkpoint
from refact_gguf.convert.refact import plan
from refact_gguf.convert.reference import forward, kl_divergence
from refact_gguf.llama import Model, sequence_logits
from refact_gguf.repair import repair

from .conftest import SHARED

STANDIN = SHARED / "standin"
pytestmark = pytest.mark.skipif(not (STANDIN / "model.safetensors").is_file(),
                                reason=f"the trained stand-in {STANDIN} is not here (it lives in ../shared beside the repo)")


@pytest.fixture(scope="module")
def tokens(vocab_gguf) -> list[int]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    with Model(vocab_gguf, vocab_only=True) as m:
        return m.tokenize(text)[:384]


@pytest.fixture(scope="module")
def reference(tokens) -> np.ndarray:
    ckpt = Checkpoint.open(STANDIN)
    weights = {t.name: t for t in plan(ckpt, centre=False)}
    return forward(lambda n: weights[n].read(0, weights[n].rows), ckpt.config, np.array(tokens))[0]


@pytest.fixture(scope="module")
def standin_q8(tmp_path_factory) -> Path:
    return convert(STANDIN, tmp_path_factory.mktemp("standin"), "f16", catalog.load().select("Q8_0")).quants["Q8_0"]


def score(reference, path, tokens) -> tuple[float, float]:
    got = sequence_logits(path, tokens)
    return float(kl_divergence(reference, got).mean()), float((reference.argmax(-1) == got.argmax(-1)).mean())


def test_convert_is_faithful_on_trained_weights_and_llama_cpps_way_is_not(reference, tokens, tmp_path):
    faithful = convert(STANDIN, tmp_path / "f", "f32").base
    kl, top1 = score(reference, faithful, tokens)
    assert kl < 1e-5 and top1 >= 0.995, (kl, top1)
    uncentred = convert(STANDIN, tmp_path / "u", "f32", centre=False).base
    kl, top1 = score(reference, uncentred, tokens)
    assert kl > 2e-4, kl  # measured 0.94–1.08e-3 on three files: Q6_K's error, before quantizing


def test_a_repaired_published_q8_0_is_within_twice_a_converted_one(reference, tokens, tmp_path):
    q8 = catalog.load().select("Q8_0")
    published = convert(STANDIN, tmp_path / "p", "f16", q8, centre=False).quants["Q8_0"]
    faithful = convert(STANDIN, tmp_path / "f", "f16", q8).quants["Q8_0"]
    repaired = repair(published, tmp_path / "repaired.gguf", "test")
    kl = {name: score(reference, path, tokens)[0] for name, path in
          (("published", published), ("repaired", repaired), ("faithful", faithful))}
    assert kl["repaired"] <= 2 * kl["faithful"], kl
    assert kl["repaired"] < 0.5 * kl["published"], kl


def test_batched_greedy_completions_equal_one_by_one_on_trained_weights(standin_q8):
    """The engine's guard where near-ties are rare: eight FIM prompts cut from standard-library
    files, batched four at a time with the GPU's full-batch layout and the CPU's, each equal to
    the same prompt run alone (on random weights 6 of 8 were)."""
    from refact_gguf import tasks
    from refact_gguf.engine import Engine
    from refact_gguf.runtime import Runtime

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with Model(standin_q8) as model:
        prompts = []
        for name in ("textwrap.py", "heapq.py", "difflib.py", "bisect.py"):
            lines = (stdlib / name).read_text().splitlines(keepends=True)
            for cut in (len(lines) // 3, 2 * len(lines) // 3):
                prefix, suffix = "".join(lines[max(0, cut - 40) : cut]), "".join(lines[cut : cut + 20])
                prompts.append(tasks.fim(model.tokenize_cached, 1024, prefix, suffix, max_tokens=24).prompt)
        with Runtime(model, n_ctx=1024, threads=2) as rt:
            alone = [rt.run(tasks.Task(list(p), 24)).text for p in prompts]
        for full in (False, True):
            with Engine(model, n_ctx=1024, parallel=4, threads=2, full_batches=full) as engine:
                handles = [engine.submit(tasks.Task(list(p), 24)) for p in prompts]
                while not all(h.done for h in handles):
                    engine.tick()
                batched = [h.wait(0).text for h in handles]
            assert batched == alone, [i for i, (a, b) in enumerate(zip(alone, batched)) if a != b]


def test_the_code_stop_rules_hold_on_real_completions(standin_q8):
    """Real code, tokenized as a trained model writes it (newlines merged with indentation, several
    lines a token): every FIM completion obeys the rules it was given, and the rules, not the token
    limit, end nearly every single-line one and some multi-line ones. Cursors at the start of a line inside a function body."""
    from refact_gguf.runtime import Runtime

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cases = []
    for name in ("textwrap.py", "heapq.py", "difflib.py", "bisect.py", "shlex.py", "fnmatch.py"):
        lines = (stdlib / name).read_text().splitlines(keepends=True)
        body = [i for i in range(40, len(lines) - 20) if lines[i].startswith("        ") and lines[i].strip()]
        for i in (body[len(body) // 3], body[2 * len(body) // 3]):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            cases.append(("".join(lines[max(0, i - 60) : i]) + indent, "".join(lines[i + 1 : i + 30])))
    ended_by_rule = {True: 0, False: 0}
    with Model(standin_q8) as model, Runtime(model, n_ctx=2048, threads=2) as rt:
        for prefix, suffix in cases:
            for multiline in (True, False):
                c = rt.fim(prefix, suffix, max_tokens=64, multiline=multiline)
                block = len(prefix.rsplit("\n", 1)[-1])
                suffix_line = next(ln.strip() for ln in suffix.splitlines() if ln.strip())
                lines = c.text.split("\n")
                assert "\n" not in c.text if not multiline else not re.search(r"\n[ \t]*\n", c.text), c
                assert all(len(ln) - len(ln.lstrip()) >= block for ln in lines[1:] if ln.strip()), c  # no dedent
                assert all(ln.strip() != suffix_line for ln in lines[1:]), c  # never re-types what follows
                ended_by_rule[multiline] += c.stop_reason != "max_tokens"
    # Of 12 each; measured 12 and 5: the small model often repeats a line to the limit (docs/quality.md).
    assert ended_by_rule[False] >= 10 and ended_by_rule[True] >= 4, ended_by_rule


def test_drafting_from_the_prompt_keeps_the_greedy_text_on_trained_weights(standin_q8):
    """--draft on a trained model: prompt lookup drafts from the file and the code after the cursor,
    one decode verifies them, and every completion is the one a token a step gives (the issue asks
    exactness where near-ties are rare); the drafts are found and some kept."""
    from benchmarks.draft import fim_cases  # the benchmark's cases: 4 files, 2 cursors each
    from refact_gguf.engine import Engine
    from refact_gguf.runtime import Runtime

    cases = fim_cases(4)
    with Model(standin_q8) as model, Runtime(model, n_ctx=2048, threads=2) as rt:
        expected = [rt.fim(p, s, max_tokens=48).text for p, s in cases]
    with Model(standin_q8) as model, Engine(model, n_ctx=2048, threads=2, draft=4).start() as engine:
        from refact_gguf import tasks

        got = [engine.run(tasks.fim(model.tokenize_cached, 2048, p, s, max_tokens=48)) for p, s in cases]
    assert [c.text for c in got] == expected, [i for i, (c, e) in enumerate(zip(got, expected)) if c.text != e]
    drafted, kept = sum(c.draft_n for c in got), sum(c.draft_accepted for c in got)
    assert drafted > 0 and kept > 0, (drafted, kept)
