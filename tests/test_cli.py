"""The CLI: wiring, help texts, one-line errors; once through a real subprocess."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from refact_gguf.cli import app

runner = CliRunner()


def test_every_command_has_help_with_examples():
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Examples" in result.output and "refact-gguf " + name in result.output, name


def test_convert_cli(hf_fused, tmp_path):
    result = runner.invoke(app, ["convert", str(hf_fused), "-o", str(tmp_path), "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "Refact-1_6B-fim.F16.gguf"), str(tmp_path / "Refact-1_6B-fim.Q8_0.gguf")]


def test_error_is_one_line_with_next_step(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"error: {tmp_path / 'nope'} is not a directory"
    assert lines[1].strip().startswith("→ pass the folder")
    assert "Traceback" not in result.output


def test_unknown_quant_names_the_closest(hf_fused, tmp_path):
    result = runner.invoke(app, ["convert", str(hf_fused), "-o", str(tmp_path), "--quant", "Q4KM"])
    assert result.exit_code == 1
    assert "did you mean Q4_K_M?" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_subprocess_console_script(tmp_path):
    """The installed entry point, a real process: exit code and stderr as a user sees them."""
    proc = subprocess.run(
        [sys.executable, "-m", "refact_gguf.cli", "convert", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "refact_gguf.cli", "convert", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "REFACT_GGUF_DEBUG": "1"},
    )
    assert "Traceback" in debug.stderr


def test_help_examples_stay_one_command_a_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    run_help = CliRunner().invoke(app, ["run", "--help"]).output
    assert "<CURSOR>" in run_help and "**Examples**" not in run_help
    assert "printf 'def f(x):\\n    <CURSOR>\\n' | refact-gguf run --fim" in run_help
    lines = [ln.strip() for ln in CliRunner().invoke(app, ["recommend", "--help"]).output.splitlines()]
    assert "refact-gguf recommend --ctx 2048 --json" in lines and "refact-gguf recommend --gpu" in lines


def test_results_on_stdout_are_never_wrapped(capsys):
    """`$(refact-gguf pull Q4_K_M)` must get the whole path, however long, on one line."""
    from refact_gguf.console import out

    path = "/home/someone/.cache/huggingface/hub/" + "models--x/" * 20 + "Refact-1_6B-fim.Q4_K_M.gguf"
    out.print(path)
    assert capsys.readouterr().out == path + "\n"
