"""bench and eval on the synthetic model: numbers that mean what they say."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from refact_gguf.bench import bench
from refact_gguf.cli import app
from refact_gguf.errors import RefactGGUFError
from refact_gguf.evaluate import evaluate, fim_tasks


def test_bench_reports_speed_and_memory(q4_model):
    r = bench(q4_model, threads=2, n_prompt=32, n_gen=8, reps=2)
    assert r.pp_tps > 0 and r.tg_tps > 0 and r.load_s > 0
    assert r.peak_rss_mb > q4_model.stat().st_size / 2**20  # the weights are in memory
    assert r.n_prompt == 32 and r.n_gen == 8 and r.reps == 2


def test_bench_at_depth_starts_each_test_after_a_filled_cache(q4_model, monkeypatch):
    from refact_gguf import llama

    positions = []
    decode_one = llama.Context.decode_one

    def spy(self, token):
        positions.append(self.n_past)
        decode_one(self, token)

    monkeypatch.setattr(llama.Context, "decode_one", spy)
    r = bench(q4_model, threads=2, n_prompt=16, n_gen=4, reps=1, isolate=False, depth=600)
    assert r.depth == 600 and r.tg_tps > 0 and r.gen_tps > 0
    assert positions and min(positions) == 600  # every tg token sits after the 600 cached ones


def test_eval_reference_against_itself_is_zero(converted_f32):
    (r,) = evaluate(converted_f32.base, [converted_f32.base], n_chunks=1, chunk=128, n_fim=2, threads=2)
    assert r.mean_kl < 1e-3  # only the float16 storage of the reference log-probs
    assert r.top1_agreement == 1.0 and abs(r.delta_ce) < 1e-3


@pytest.mark.slow
def test_eval_orders_quants(all_quants):
    q = all_quants.quants
    results = {r.model: r for r in evaluate(all_quants.base, [q["Q8_0"], q["Q2_K"]], n_chunks=1, chunk=256, n_fim=0, threads=2)}
    assert results[q["Q8_0"].name].mean_kl < results[q["Q2_K"].name].mean_kl
    assert results[q["Q8_0"].name].top1_agreement > results[q["Q2_K"].name].top1_agreement


def test_fim_tasks_are_deterministic_single_lines():
    text = "".join(f"def function_number_{i}(x):\n    return x * {i} + 12345\n\n" for i in range(20))
    a, b = fim_tasks([text], 3), fim_tasks([text], 3)
    assert a == b and len(a) == 2  # two per file
    for t in a:
        assert "\n" not in t.expected and t.expected in text


def test_bench_cli_json(q4_model):
    r = CliRunner().invoke(app, ["bench", "-m", str(q4_model), "-p", "16", "--n-gen", "4", "-r", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["model"] == q4_model.name


def test_bench_isolated_child_error_reaches_the_caller(q4_model):
    # Several models run one process each; a failure there must come back as the child's own
    # one-line error, not a traceback or a broken pool.
    with pytest.raises(RefactGGUFError, match="--gpu-layers 'lots'"):
        bench(q4_model, threads=2, gpu_layers="lots", n_prompt=8, n_gen=2, reps=1, isolate=True)


def test_bench_child_killed_by_a_signal_is_a_one_line_error(q4_model, tmp_path, monkeypatch):
    # What a llama.cpp crash in the child looks like to the caller (a CUDA build with its own
    # libstdc++ did this on the H100 host): the model, the signal, faulthandler's headline.
    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\necho 'Fatal Python error: Segmentation fault' >&2\necho '  File x' >&2\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crashing))
    with pytest.raises(RefactGGUFError, match=rf"{q4_model.name} failed \(signal SIGSEGV\): Fatal Python error: Segmentation fault") as e:
        bench(q4_model, threads=2, n_prompt=8, n_gen=2, reps=1, isolate=True)
    assert "refact-gguf bench -m" in e.value.hint


@pytest.mark.parametrize("kw", [{"n_prompt": 10**6}, {"depth": 4000, "n_prompt": 64, "n_gen": 64}])
def test_bench_longer_than_the_context_is_refused_before_loading(q4_model, kw):
    """-p 1000000 ran for hours (a 10⁶-token context allocated and filled)."""
    from refact_gguf.errors import InputError

    with pytest.raises(InputError, match="more than the model's context"):
        bench(q4_model, threads=1, **kw)
