"""What a person using it every day runs into (issue #27): code and paths printed as they are,
one-line usage errors, two servers on one port, a request log, `version`."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from typer.testing import CliRunner

from refact_gguf.cli import app
from refact_gguf.console import out
from refact_gguf.errors import InputError, RefactGGUFError
from refact_gguf.fimsource import read_fim_input
from refact_gguf.server import _listen

from .serving import running

runner = CliRunner()


@pytest.mark.parametrize("text", ["return a[i] + b[red]", "m[x]y/a[/]b", "[bold]not bold[/]"])
def test_results_are_printed_as_they_are(text):
    with out.capture() as captured:
        out.print(text)
    assert captured.get() == text + "\n"


def test_a_usage_error_is_one_line_and_the_help_to_read():
    r = runner.invoke(app, ["serve", "--parallel", "x"])
    assert r.exit_code == 2 and "╭" not in r.output
    assert r.output.splitlines()[0].startswith("error: Invalid value for '--parallel'")
    assert "refact-gguf serve --help" in r.output


def test_help_shows_no_metavar_after_flags():
    for args in (["serve", "--help"], ["--help"], ["eval", "--help"]):
        r = runner.invoke(app, args, env={"COLUMNS": "160"})
        flagged = [ln for ln in r.output.splitlines() if "<bool>" in ln]  # --help's own line too
        assert r.exit_code == 0 and not flagged, (args, flagged)


def test_bench_and_eval_quant_options_say_use_not_make():
    for command in ("bench", "eval"):
        r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "Quants to use" in r.output and "Quants to make" not in r.output, command


def test_two_code_sources_are_an_error_not_one_ignored(tmp_path):
    src = tmp_path / "a.py"
    src.write_text("x = 1\n")
    with pytest.raises(InputError, match="--file and --prefix both given"):
        read_fim_input("def f(", None, None, None, src, 1, 1)
    with pytest.raises(InputError, match="--prefix and --prefix-file both given"):
        read_fim_input("a", None, src, None, None, None, 1)


def test_a_context_below_what_llama_cpp_allocates_is_refused():
    r = runner.invoke(app, ["run", "--ctx", "64", "x"])
    assert r.exit_code == 2 and "--ctx" in r.output


def test_eval_on_a_folder_without_quants_is_an_error(tmp_path):
    r = runner.invoke(app, ["eval", "--dir", str(tmp_path)])
    assert r.exit_code == 1 and "no quant of the table" in r.output


def test_version_reports_the_build():
    r = runner.invoke(app, ["version", "--json"])
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["llama_cpp_python"] and "cpu_amx" in report and "system_info" in report


def test_the_second_server_on_a_port_is_refused_at_once():
    first = _listen("127.0.0.1", 0)
    try:
        with pytest.raises(RefactGGUFError, match="cannot listen") as e:
            _listen("127.0.0.1", first.getsockname()[1])
        assert "--port" in e.value.hint
    finally:
        first.close()
    with pytest.raises(RefactGGUFError) as e:
        _listen("203.0.113.7", 0)  # an address this machine does not have (TEST-NET-3)
    assert "--host" in e.value.hint


def test_a_request_log_line_says_what_was_done_and_no_secret(q4_model, caplog):
    with caplog.at_level(logging.INFO, logger="refact_gguf.requests"), \
            running(q4_model, parallel=1, keys="sk-secret", log_requests=True) as u:
        auth = {"Authorization": "Bearer sk-secret"}
        httpx.post(f"{u}/infill", json={"input_prefix": "def secret_code(", "n_predict": 3}, headers=auth)
        httpx.get(f"{u}/props")
    lines = [r.getMessage() for r in caplog.records if r.name == "refact_gguf.requests"]
    infill = next(ln for ln in lines if "POST /infill 200" in ln)
    assert "client=127.0.0.1:" in infill and "evaluated=" in infill and "generated=" in infill and "context=full" in infill
    assert any("GET /props 401" in ln for ln in lines)
    assert not any("sk-secret" in ln or "secret_code" in ln for ln in lines)


def test_ollama_reports_the_size_of_the_model_it_serves(q4_model):
    with running(q4_model, parallel=1) as u:
        details = httpx.get(f"{u}/api/tags").json()["models"][0]["details"]
    assert details["parameter_size"] != "1.6B" and details["parameter_size"].endswith("M")


def test_a_websocket_upgrade_is_answered_not_logged(q4_model, caplog):
    with caplog.at_level(logging.WARNING), running(q4_model, parallel=1, keys="k") as u:
        r = httpx.get(f"{u}/v1/models", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"})
    assert r.status_code == 401
    assert not [rec for rec in caplog.records if "upgrade" in rec.getMessage().lower() or "WebSocket" in rec.getMessage()]


@pytest.mark.parametrize("command", [["convert/convert_hf_to_gguf.py"], ["-m", "refact_gguf.convert"]])
def test_the_converter_runs_as_a_script_and_as_a_module(command, hf_fused, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, *command, str(hf_fused), "-o", str(tmp_path), "--outtype", "f16"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-500:]
    assert r.stdout.strip() == str(tmp_path / "Refact-1_6B-fim.F16.gguf")


def test_off_linux_the_humaneval_sandbox_says_so_in_one_line(monkeypatch):
    from refact_gguf import sandbox

    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    with pytest.raises(RefactGGUFError, match="needs Linux; this is darwin") as e:
        sandbox.run_programs(["print(1)"])
    assert "WSL" in e.value.hint


def test_the_service_files_run_the_same_server():
    """deploy/: the systemd unit and the launchd agent start the same command, and both parse."""
    import configparser
    import plistlib
    import shlex
    from pathlib import Path

    deploy = Path(__file__).parent.parent / "deploy"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(deploy / "refact-gguf.service")
    systemd = shlex.split(unit["Service"]["ExecStart"])
    launchd = plistlib.loads((deploy / "dev.refact-gguf.serve.plist").read_bytes())
    assert launchd["ProgramArguments"][1:] == systemd[1:] and launchd["ProgramArguments"][0].endswith(".venv/bin/refact-gguf")
    assert launchd["ExitTimeOut"] == int(unit["Service"]["TimeoutStopSec"])  # time to write the KV caches at SIGTERM
