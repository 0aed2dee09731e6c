"""Several servers behind a proxy: a keys file (one key a person) the proxy can hash on, and the
shipped HAProxy config keeping each person on one replica."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from refact_gguf.server import ApiKeys
from refact_gguf.server import keys as keys_module

from benchmarks.replicas import free_port, haproxy_config

from .serving import running

ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB, CAROL = "sk-alice-4f1e9c", "sk-bob-77ab21", "sk-carol-0d3e58"


def _write(path: Path, text: str) -> None:
    """Replace the file as editors save it: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_key_in_the_file_is_accepted_and_a_removed_one_is_refused_after_the_change(q4_model, tmp_path, monkeypatch):
    monkeypatch.setattr(keys_module, "CHECK_EVERY_S", 0.0)
    path = tmp_path / "keys"
    _write(path, f"# the team\n{ALICE}  # alice\n{BOB}   # bob\n\n")
    with running(q4_model, parallel=1, keys=ApiKeys(path=path)) as u:
        body = {"input_prefix": "def f(", "n_predict": 2}
        assert [httpx.post(f"{u}/infill", json=body, headers=_auth(k)).status_code for k in (ALICE, BOB, CAROL)] == [200, 200, 401]
        assert httpx.post(f"{u}/infill", json=body).status_code == 401
        assert httpx.post(f"{u}/infill", json=body, headers={"Authorization": "Bearer"}).status_code == 401  # llama.vim with no key set
        assert httpx.get(f"{u}/health").status_code == 200  # a proxy's health check carries no key
        _write(path, f"{ALICE}  # alice\n{CAROL}  # carol\n")
        assert [httpx.post(f"{u}/infill", json=body, headers=_auth(k)).status_code for k in (ALICE, BOB, CAROL)] == [200, 401, 200]


def test_sighup_reads_the_file_again_and_a_broken_file_keeps_the_keys(tmp_path, caplog):
    path = tmp_path / "keys"
    _write(path, f"{ALICE}  # alice\n")
    keys = ApiKeys(path=path)
    keys._checked = float("inf")  # only an explicit reload (SIGHUP) reads it
    _write(path, f"{BOB}  # bob\n")
    assert keys.person(f"Bearer {BOB}") is None
    signal.signal(signal.SIGHUP, lambda *_: keys.reload())
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)
        assert keys.person(f"Bearer {BOB}") == "bob" and keys.person(f"Bearer {ALICE}") is None
        path.write_bytes(b"\xff\xfe not text")
        with caplog.at_level(logging.WARNING):
            keys.reload()
        assert keys.person(f"Bearer {BOB}") == "bob"  # the keys read before stay
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    assert "cannot read the keys file" in caplog.text


def test_no_key_is_ever_logged(q4_model, tmp_path, caplog, capfd, monkeypatch):
    monkeypatch.setattr(keys_module, "CHECK_EVERY_S", 0.0)
    path = tmp_path / "keys"
    _write(path, f"{ALICE}  # alice\n{BOB}  # bob\n")
    with caplog.at_level(logging.DEBUG), running(q4_model, parallel=1, keys=ApiKeys(path=path)) as u:
        httpx.post(f"{u}/infill", json={"input_prefix": "x", "n_predict": 1}, headers=_auth(ALICE))
        httpx.post(f"{u}/infill", json={"input_prefix": "x", "n_predict": 1}, headers=_auth(CAROL))
        _write(path, f"{BOB}  # bob\n")
        httpx.get(f"{u}/props", headers=_auth(BOB))
        path.write_bytes(b"\xff")
        httpx.get(f"{u}/props", headers=_auth(BOB))
    out = capfd.readouterr()
    seen = caplog.text + out.out + out.err
    assert "read again" in seen and "cannot read the keys file" in seen  # the log did speak
    assert not any(k in seen for k in (ALICE, BOB, CAROL)), seen


def test_serve_refuses_a_keys_file_it_cannot_read(q4_model, tmp_path):
    from typer.testing import CliRunner

    from refact_gguf.cli import app

    r = CliRunner().invoke(app, ["serve", "-m", str(q4_model), "--api-key-file", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "cannot read the keys file" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["serve", "-m", str(q4_model), "--api-key", "x", "--api-key-file", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "--api-key and --api-key-file both given" in r.output


# ------------------------------------------------------------------------------ the shipped proxy config


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_the_shipped_haproxy_config_keeps_each_key_on_one_replica(q4_model, tmp_path):
    path = tmp_path / "keys"
    people = [f"sk-person-{i:02d}" for i in range(8)]
    _write(path, "".join(f"{k}  # p{i}\n" for i, k in enumerate(people)))
    with running(q4_model, parallel=1, keys=ApiKeys(path=path)) as a, running(q4_model, parallel=1, keys=ApiKeys(path=path)) as b:
        front = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(front, [int(u.rsplit(":", 1)[1]) for u in (a, b)]))
        assert subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True).returncode == 0
        proxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{front}"
            deadline = time.time() + 20
            while True:  # both replicas marked up by the health check
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline and proxy.poll() is None
                time.sleep(0.1)
            time.sleep(2.5)

            def served_by(key: str) -> str:
                before = {u: httpx.get(f"{u}/health").json()["engine"]["requests"] for u in (a, b)}
                r = httpx.post(f"{url}/infill", json={"input_prefix": "def f(", "n_predict": 1}, headers=_auth(key), timeout=30)
                assert r.status_code == 200, r.text
                after = {u: httpx.get(f"{u}/health").json()["engine"]["requests"] for u in (a, b)}
                (which,) = [u for u in (a, b) if after[u] > before[u]]
                return which

            first = {k: served_by(k) for k in people}
            assert all(served_by(k) == first[k] for k in people for _ in range(3))
            assert len(set(first.values())) == 2  # 8 people on 2 replicas: both used
        finally:
            proxy.terminate()
            proxy.wait(10)
