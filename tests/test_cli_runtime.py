"""run / chat / recommend / list through the CLI (typer's CliRunner), on the synthetic model."""

from __future__ import annotations

import io
import json

import pytest
from typer.testing import CliRunner

from refact_gguf.cli import app
from refact_gguf.errors import RefactGGUFError
from refact_gguf.fimsource import read_fim_input, split_at

runner = CliRunner()


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_run_fim_with_prefix_and_suffix(q4_model):
    r = runner.invoke(app, ["run", "--fim", "--prefix", "def f(x):\n    ", "--suffix", "\n", "-m", str(q4_model), "-n", "5", "-t", "2"])
    assert r.exit_code == 0, r.output
    assert "prompt tokens evaluated" in r.stderr


def test_run_fim_from_file_position(q4_model, tmp_path):
    src = tmp_path / "app.py"
    src.write_text("import os\ndef main():\n    pass\n")
    r = runner.invoke(app, ["run", "--fim", "--file", str(src), "--line", "3", "--col", "5", "-m", str(q4_model), "-n", "3"])
    assert r.exit_code == 0, r.output


def test_run_fim_from_stdin_marker(q4_model):
    r = runner.invoke(app, ["run", "--fim", "-m", str(q4_model), "-n", "3"], input="def f():\n    <CURSOR>\n")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", "--fim", "-m", str(q4_model)], input="no marker here")
    assert r.exit_code == 1 and "no <CURSOR> marker" in r.stderr


def test_plain_completion_and_chat(q4_model):
    r = runner.invoke(app, ["run", "import os", "-m", str(q4_model), "-n", "3"])
    assert r.exit_code == 0 and r.stdout.strip()
    r = runner.invoke(app, ["chat", "--message", "hello", "-m", str(q4_model), "-n", "4"])
    assert r.exit_code == 0, r.output


def test_no_model_pulled_names_the_pull_command():
    r = runner.invoke(app, ["run", "--fim", "--prefix", "x"])
    assert r.exit_code == 1
    assert "no model pulled yet" in r.stderr and "refact-gguf pull" in r.stderr


def test_quant_name_not_pulled():
    r = runner.invoke(app, ["run", "x", "-m", "q4_k_m"])
    assert r.exit_code == 1 and "run: refact-gguf pull Q4_K_M" in r.stderr


def test_recommend_and_list_json():
    r = runner.invoke(app, ["recommend", "--json"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["recommended"] in {q["name"] for q in data["quants"]}
    r = runner.invoke(app, ["list", "--json"])
    rows = json.loads(r.stdout)
    assert len(rows) == 22 and all(row["path"] is None for row in rows)


def test_split_at_cursor():
    text = "a = 1\nbb = 2\n"
    assert split_at(text, 2, 3) == ("a = 1\nbb", " = 2\n")
    assert split_at(text, 3, 1) == (text, "")
    with pytest.raises(RefactGGUFError, match="past the end of line 1"):
        split_at(text, 1, 99)
    with pytest.raises(RefactGGUFError, match="--file needs --line"):
        read_fim_input(None, None, None, None, "x.py", None, 1)
    assert read_fim_input(None, None, None, None, None, None, 1, stdin=io.StringIO("ab<CURSOR>cd")) == ("ab", "cd")


def test_a_known_bad_llama_build_is_named_before_it_can_crash(q4_model, monkeypatch):
    # e.g. a CUDA build exporting its own libstdc++, or AMX on an AMX CPU: the user is told
    # what is wrong and how to fix it; the command still runs.
    from refact_gguf import loader

    monkeypatch.setattr(loader, "build_problems", lambda: ["libggml-cuda.so exports its own copy of libstdc++"])
    r = runner.invoke(app, ["run", "--fim", "--prefix", "x = ", "--suffix", "\n", "-m", str(q4_model), "-n", "2"])
    assert r.exit_code == 0, r.output
    assert "warning: llama.cpp build problem: libggml-cuda.so exports its own copy of libstdc++" in r.stderr
    assert "bash scripts/setup.sh" in r.stderr


def test_non_utf8_input_is_one_line(tmp_path, q4_model):
    src = tmp_path / "latin1.py"
    src.write_bytes("s = 'café'\n".encode("latin-1"))
    r = runner.invoke(app, ["run", "--fim", "--file", str(src), "--line", "1", "-m", str(q4_model)])
    assert r.exit_code == 1 and "not UTF-8 text" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["run", "--fim", "--fim-order", "xyz", "--prefix", "a", "-m", str(q4_model)])
    assert r.exit_code == 1 and "unknown FIM order" in r.output and "Traceback" not in r.output
