"""`convert <repo id>`: the checkpoint through the loopback Hub (a real download, resumed after a
dropped connection), converted into the place `run` and `serve` look first, and offline once cached."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from refact_gguf import catalog
from refact_gguf.cli import app
from refact_gguf.hub import converted_path
from refact_gguf.select import resolve_model

from benchmarks.fake_hub import FakeHub

REPO = catalog.load().model.source_repo


@pytest.fixture
def checkpoint_hub(hf_fused, tmp_path, monkeypatch):
    server = FakeHub(REPO)
    for path in sorted(hf_fused.iterdir()):
        if path.is_file():
            server.add(path.name, path)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    yield server
    server.close()


def test_convert_a_repo_id_downloads_resumes_and_lands_where_run_looks(checkpoint_hub, monkeypatch):
    weights = next(n for n in checkpoint_hub.files if n.endswith((".safetensors", ".bin")))
    checkpoint_hub.drop_file, checkpoint_hub.drop_after = weights, len(checkpoint_hub.files[weights]) // 2  # it drops midway
    r = CliRunner().invoke(app, ["convert", REPO, "--quant", "Q8_0", "--no-imatrix"])
    assert r.exit_code == 0, r.output
    q8 = catalog.load().get("Q8_0")
    assert converted_path(q8).is_file() and resolve_model("Q8_0") == converted_path(q8)
    ranges = [q.range for q in checkpoint_hub.blob_requests() if q.path.endswith(weights) and q.method == "GET"]
    assert ranges[0] is None and ranges[-1] == f"bytes={len(checkpoint_hub.files[weights]) // 2}-"  # resumed, not restarted

    # Offline once cached: no request at all.
    seen = len(checkpoint_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(app, ["convert", REPO, "--quant", "Q8_0", "--no-imatrix"])
    assert r.exit_code == 0, r.output
    assert len(checkpoint_hub.requests) == seen


def test_convert_an_unknown_source_is_one_line(checkpoint_hub, monkeypatch):
    r = CliRunner().invoke(app, ["convert", "no/such-repo", "--quant", "Q8_0"])
    assert r.exit_code == 1 and "config.json was not found in no/such-repo" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["convert", "./not here", "--quant", "Q8_0"])
    assert r.exit_code == 1 and "not here is not a directory" in r.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(app, ["convert", REPO])
    assert r.exit_code == 1 and "HF_HUB_OFFLINE is set" in r.output
