"""`pull` against a real HTTP server on 127.0.0.1 speaking the Hub's protocol. Nothing leaves
the machine: HF_ENDPOINT points at the fake hub."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refact_gguf.convert import convert
from refact_gguf import catalog, hub
from refact_gguf.errors import OutputError
from refact_gguf.hub import HubConfig, HubError

from benchmarks.fake_hub import FakeHub

CAT = catalog.load()
REPO = CAT.model.gguf_repo
Q8 = "Refact-1_6B-fim.Q8_0.gguf"


@pytest.fixture(scope="session")
def small_quants(hf_fused, tmp_path_factory):
    return convert(hf_fused, tmp_path_factory.mktemp("pullsrc"), "f16", CAT.select("Q8_0,Q4_K_M")).quants


@pytest.fixture
def fake_hub(small_quants):
    server = FakeHub(REPO)
    for name, path in small_quants.items():
        server.add(path.name, path)
    yield server
    server.close()


@pytest.fixture
def env(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return tmp_path


def config(**kw) -> HubConfig:
    return HubConfig.from_env(backoff=0.01, timeout=5, **kw)


def test_fresh_pull_into_hf_cache_layout(env, fake_hub, small_quants):
    path = hub.pull("q8_0", config=config())
    assert path.read_bytes() == small_quants["Q8_0"].read_bytes()
    repo = env / "cache" / "models--RichardErkhov--smallcloudai_-_Refact-1_6B-fim-gguf"
    assert path == repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567" / Q8
    assert path.is_symlink() and path.resolve() == repo / "blobs" / fake_hub.sha(Q8)
    assert (repo / "refs" / "main").read_text() == "0123456789abcdef0123456789abcdef01234567"
    # huggingface_hub finds it where it expects it
    from huggingface_hub import try_to_load_from_cache

    assert try_to_load_from_cache(REPO, Q8, cache_dir=env / "cache") == str(path)
    # the token went to the Hub's resolve endpoint, never to the CDN
    assert fake_hub.resolve_requests()[0].authorization == "Bearer hf_test_token"
    assert {r.authorization for r in fake_hub.blob_requests()} == {None}


def test_cached_pull_makes_no_request(env, fake_hub):
    hub.pull("Q8_0", config=config())
    before = len(fake_hub.requests)
    t0 = time.perf_counter()
    hub.pull("Q8_0", config=config())
    assert len(fake_hub.requests) == before
    assert time.perf_counter() - t0 < 0.5


def test_offline_cached_pull_works_and_uncached_explains(env, fake_hub, monkeypatch):
    hub.pull("Q8_0", config=config())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(fake_hub.requests)
    assert hub.pull("Q8_0", config=config()).is_file()
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set, and Q4_K_M is not in the cache \(cached quants: Q8_0\)") as e:
        hub.pull("Q4_K_M", config=config())
    assert "--model /path/to/model.gguf" in e.value.hint
    assert len(fake_hub.requests) == before


def test_dropped_connection_resumes_with_range(env, fake_hub, small_quants):
    fake_hub.drop_after = 300_000
    path = hub.pull("Q8_0", config=config())
    assert path.read_bytes() == small_quants["Q8_0"].read_bytes()
    ranges = [r.range for r in fake_hub.blob_requests()]
    assert ranges == [None, "bytes=300000-"]


def test_killed_process_resumes_from_partial_file(env, fake_hub, small_quants):
    fake_hub.hang_after = 1_000_000
    proc = subprocess.Popen([sys.executable, "-m", "refact_gguf.cli", "pull", "Q8_0"], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = env / "cache" / "models--RichardErkhov--smallcloudai_-_Refact-1_6B-fim-gguf" / "blobs" / f"{fake_hub.sha(Q8)}.incomplete"
    deadline = time.time() + 60
    while not (partial.is_file() and partial.stat().st_size == 1_000_000):
        assert time.time() < deadline, "the subprocess never wrote the first megabyte"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fake_hub.hang_after = None
    fake_hub.release.set()
    path = hub.pull("Q8_0", config=config())
    assert path.read_bytes() == small_quants["Q8_0"].read_bytes()
    assert fake_hub.blob_requests()[-1].range == "bytes=1000000-"
    assert not partial.exists()


def test_corrupted_bytes_detected_and_removed(env, fake_hub):
    fake_hub.corrupt = True
    with pytest.raises(HubError, match="sha256 .* is not the Hub's .*; the corrupt file was removed"):
        hub.pull("Q8_0", config=config())
    blobs = env / "cache" / "models--RichardErkhov--smallcloudai_-_Refact-1_6B-fim-gguf" / "blobs"
    assert list(blobs.iterdir()) == []  # the lock lives where huggingface_hub keeps its own
    assert (env / "cache" / ".locks" / blobs.parent.name / f"{fake_hub.sha(Q8)}.lock").exists()
    assert hub.cached_path(CAT.get("Q8_0"), config()) is None


def test_wrong_quant_type_on_the_hub_is_refused(env, fake_hub, small_quants):
    # the Hub serves a Q4_K_M under the Q8_0 name: the sha matches, the GGUF check does not
    fake_hub.files[Q8] = small_quants["Q4_K_M"].read_bytes()
    with pytest.raises(HubError, match="quant type 15, not 7; removed it"):
        hub.pull("Q8_0", config=config())


def test_not_enough_disk_refused_before_downloading(env, fake_hub, monkeypatch):
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(OutputError, match="not enough disk space for Refact-1_6B-fim.Q8_0.gguf"):
        hub.pull("Q8_0", config=config())
    assert fake_hub.blob_requests() == []


def test_unknown_name(env, fake_hub):
    with pytest.raises(catalog.UnknownQuantError) as e:
        hub.pull("Q9_9", config=config())
    assert fake_hub.requests == []
    assert "Q2_K" in e.value.message


@pytest.mark.parametrize("status,message", [(404, "was not found in .* \\(HTTP 404\\)"), (401, "refused access .* \\(HTTP 401\\)")])
def test_http_errors(env, fake_hub, status, message):
    fake_hub.status = status
    with pytest.raises(HubError, match=message):
        hub.pull("Q8_0", config=config())


def test_unreachable_hub(env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(HubError, match="cannot reach http://127.0.0.1:9"):
        hub.pull("Q8_0", config=config())


def test_local_dir_and_rm(env, fake_hub, small_quants):
    path = hub.pull("Q8_0", local_dir=env / "models", config=config())
    assert path == env / "models" / Q8 and path.read_bytes() == small_quants["Q8_0"].read_bytes()
    hub.pull("Q8_0", config=config())
    removed = hub.remove("q8_0", config=config())
    assert hub.cached_path(CAT.get("Q8_0"), config()) is None
    assert len(removed) == 2


@pytest.mark.parametrize("etag,commit", [
    ("../../escaped", None), ("/tmp/refact-gguf-escaped", None), ("deadbeef", None),
    (None, "../../../escaped"), (None, "main"),
])
def test_a_hostile_endpoint_cannot_choose_where_pull_writes(env, fake_hub, tmp_path, etag, commit):
    """Names from the network (the blob's ETag, the snapshot's commit) must be plain hashes."""
    if etag is not None:
        fake_hub.sha_override[Q8] = etag
    fake_hub.commit = commit
    before = {p for p in tmp_path.rglob("*")} | set(Path("/tmp").glob("refact-gguf-escaped*"))
    try:
        with pytest.raises(HubError, match="unusable file id"):
            hub.pull("Q8_0", config=config())
    finally:
        fake_hub.sha_override.pop(Q8, None)
        fake_hub.commit = None
    assert fake_hub.blob_requests() == []  # refused before any download
    after = {p for p in tmp_path.rglob("*")} | set(Path("/tmp").glob("refact-gguf-escaped*"))
    assert not any("escaped" in str(p) for p in after - before)


@pytest.mark.timeout(30)
def test_a_local_dir_that_cannot_hold_files_is_an_error_not_a_hang(env, fake_hub):
    from refact_gguf.errors import OutputError

    with pytest.raises(OutputError, match="cannot write in /proc/self"):
        hub.pull("Q8_0", local_dir=Path("/proc/self"), config=config())


# ------------------------------------------------------------------------------ repair (issue #26)


@pytest.fixture(scope="session")
def published_q8(hf_fused, tmp_path_factory):
    """What the Hub serves: a Q8_0 made as llama.cpp's converter makes it (uncentred)."""
    return convert(hf_fused, tmp_path_factory.mktemp("published"), "f16", CAT.select("Q8_0"), centre=False).quants["Q8_0"]


@pytest.fixture
def published_hub(published_q8, env, monkeypatch):
    server = FakeHub(REPO)
    server.add(published_q8.name, published_q8)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


def test_pull_repairs_a_published_file_into_a_faithful_copy(published_hub, small_quants, sample_tokens):
    from refact_gguf.convert.reference import kl_divergence
    from refact_gguf.llama import sequence_logits
    from refact_gguf.loader import inspect

    path = hub.pull("Q8_0", config=config())
    info = inspect(path)
    assert info.fidelity == "faithful-repaired" and info.repaired_from == published_hub.sha(Q8)
    assert hub.cached_path(CAT.get("Q8_0")) == path  # what run and serve find
    published = hub.cached_path(CAT.get("Q8_0"), as_published=True)
    assert inspect(published).fidelity == "as-published" and published.read_bytes() == published_hub.files[Q8]
    # The synthetic weights carry a deliberate mean offset: uncentred they are far off; repaired,
    # they compute what the faithful conversion computes, up to Q8_0's rounding.
    faithful = sequence_logits(small_quants["Q8_0"], sample_tokens)
    assert kl_divergence(faithful, sequence_logits(path, sample_tokens)).mean() < 0.02
    assert kl_divergence(faithful, sequence_logits(published, sample_tokens)).mean() > 0.1
    before = len(published_hub.requests)
    assert hub.pull("Q8_0", config=config()) == path and len(published_hub.requests) == before  # once


def test_as_published_keeps_the_file_untouched(published_hub):
    from refact_gguf.loader import inspect

    path = hub.pull("Q8_0", config=config(), as_published=True)
    assert inspect(path).fidelity == "as-published" and path.read_bytes() == published_hub.files[Q8]


def test_a_local_dir_pull_is_repaired_in_place(published_hub, tmp_path):
    from refact_gguf.loader import inspect

    path = hub.pull("Q8_0", local_dir=tmp_path / "models", config=config())
    assert path == tmp_path / "models" / Q8 and inspect(path).repaired_from == published_hub.sha(Q8)
    assert not [p for p in path.parent.iterdir() if p.name != Q8 and p.name != ".cache"]  # nothing half-written beside it
