"""Pull prebuilt quants from the Hub into the standard HF cache, with real resume and verification.

huggingface_hub does the protocol (endpoint, auth headers, file metadata) and defines the cache
layout (blobs/, snapshots/, refs/) that we write into, so its own tools see our files. It does not
truly resume (it re-requests from byte 0 after a dropped connection, and a killed process leaves
a per-process partial file the next run ignores), so the transfer itself is ours: one stable
`<sha256>.incomplete` per blob, continued with `Range` requests, hashed as it arrives.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

# refact-gguf sends no telemetry: without this, building request headers also fetches the Hub's
# "agent harness" registry (a GET /api/agent-harnesses on the first download of the day).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import httpx2  # noqa: E402  (huggingface_hub's HTTP client)
from filelock import FileLock  # noqa: E402
from huggingface_hub import constants, get_hf_file_metadata, get_token, hf_hub_url  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402
from huggingface_hub.file_download import repo_folder_name  # noqa: E402
from huggingface_hub.utils import build_hf_headers, get_session  # noqa: E402

from . import catalog  # noqa: E402
from .catalog import Quant  # noqa: E402
from .errors import ModelFileError, OutputError, RefactGGUFError  # noqa: E402
from .loader import inspect  # noqa: E402
from .progress import Progress  # noqa: E402

CHUNK = 1 << 20
DISK_MARGIN = 64 << 20


_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
# A checkpoint's weights, in the order looked for: one file, or an index of shards.
_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


class HubError(RefactGGUFError):
    """The Hub refused, could not be reached, or sent something wrong."""


@dataclass(frozen=True)
class HubConfig:
    """Where and how to reach the Hub, read from the environment at call time (HF_ENDPOINT,
    HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), as huggingface_hub
    reads them at import."""

    endpoint: str
    cache_dir: Path
    token: str | None
    offline: bool
    retries: int = 5
    backoff: float = 1.0
    timeout: float = 30.0

    @classmethod
    def from_env(cls, **overrides) -> HubConfig:
        env = os.environ
        if env.get("HF_HUB_CACHE"):
            cache = Path(env["HF_HUB_CACHE"])
        elif env.get("HF_HOME"):
            cache = Path(env["HF_HOME"]) / "hub"
        else:
            cache = Path(constants.HF_HUB_CACHE)
        config = cls(
            endpoint=(env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
            cache_dir=cache.expanduser(),
            token=get_token(),
            # huggingface_hub's rule: either variable (transformers users have the older one set)
            offline=any(env.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")),
        )
        return cls(**{**config.__dict__, **overrides})


class MissingFile(HubError):
    """The repo has no such file (HTTP 404)."""


class Unreachable(HubError):
    """No connection to the endpoint."""


def _repo_dir(config: HubConfig, repo: str | None = None) -> Path:
    return config.cache_dir / repo_folder_name(repo_id=repo or catalog.load().model.gguf_repo, repo_type="model")


def converted_dir() -> Path:
    """Where `convert <repo id>` leaves the files it makes: quants found there come before pulled ones."""
    from .files import cache_root

    return cache_root() / "converted"


def converted_path(quant: Quant) -> Path:
    return converted_dir() / quant.filename(catalog.load().model)


def faithful_path(quant: Quant, sha256: str) -> Path:
    """Where the repaired (LayerNorm-faithful) copy of a published file lives: refact-gguf's own
    cache, by the published file's sha256 (the HF cache keeps the file as the Hub has it)."""
    from .files import cache_root

    return cache_root() / "faithful" / sha256 / quant.filename(catalog.load().model)


def cached_path(quant: Quant, config: HubConfig | None = None, as_published: bool = False) -> Path | None:
    """The complete cached file of `quant`, found without any network request: unless
    `as_published`, the one converted from the checkpoint, else the faithful copy `pull` made; else
    the file as published."""
    if not as_published and (converted := converted_path(quant)).is_file():
        return converted
    config = config or HubConfig.from_env()
    model = catalog.load().model
    repo = _repo_dir(config)
    ref = repo / "refs" / model.revision
    commits = [ref.read_text().strip()] if ref.is_file() else []
    commits += sorted(p.name for p in (repo / "snapshots").glob("*") if p.name not in commits)
    for commit in commits:
        path = repo / "snapshots" / commit / quant.filename(model)
        if path.is_file():
            faithful = faithful_path(quant, path.resolve().name)  # the blob's name is its sha256
            return faithful if not as_published and faithful.is_file() else path
    return None


def cached_quants(config: HubConfig | None = None) -> dict[str, Path]:
    config = config or HubConfig.from_env()
    return {q.name: p for q in catalog.load().quants if (p := cached_path(q, config))}


def _offline_error(quant: Quant, config: HubConfig, why: str) -> HubError:
    cached = ", ".join(cached_quants(config)) or "none"
    return HubError(
        f"{why}, and {quant.name} is not in the cache (cached quants: {cached})",
        "connect and run the pull again, or use a local file: refact-gguf run --model /path/to/model.gguf",
    )


def _http_error(e: HfHubHTTPError | httpx2.HTTPStatusError, repo: str, filename: str) -> HubError:
    status = e.response.status_code if e.response is not None else None
    if status in (401, 403):
        return HubError(f"the Hub refused access to {repo} (HTTP {status})", "set HF_TOKEN to a valid token, or run `hf auth login`")
    if status == 404:
        return MissingFile(f"{filename} was not found in {repo} (HTTP 404): the repo or file is gone",
                           "check the repo id on the Hub, or convert the model from its checkpoint: refact-gguf convert")
    return HubError(f"the Hub answered HTTP {status} for {filename}", "try again later")


def pull(
    name: str,
    local_dir: Path | None = None,
    force: bool = False,
    config: HubConfig | None = None,
    progress: Progress | None = None,
    as_published: bool = False,
) -> Path:
    """Download quant `name` (verified: sha256, then a GGUF of Refact with the right type), and make
    it LayerNorm-faithful where the catalog says repair pays (`as_published`: keep it as it is)."""
    config = config or HubConfig.from_env()
    progress = progress or Progress()
    model = catalog.load().model
    quant = catalog.load().get(name)
    filename = quant.filename(model)

    if local_dir is not None and (Path(local_dir) / filename).is_file() and not force:
        return _faithful(Path(local_dir) / filename, None, quant, as_published, progress, in_place=True)
    if local_dir is None and not force and (found := cached_path(quant, config, as_published=True)):
        # complete, verified when it was pulled: no request at all
        return _faithful(found, found.resolve().name, quant, as_published, progress)
    if config.offline:
        raise _offline_error(quant, config, "HF_HUB_OFFLINE is set")

    try:
        path, sha256 = _fetch(model.gguf_repo, model.revision, filename, config, progress, f"pull {quant.name}",
                              verify=lambda partial: _verify(partial, quant), local_dir=local_dir, force=force)
    except Unreachable as e:
        raise _offline_error(quant, config, e.message) from None
    return _faithful(path, sha256, quant, as_published, progress, in_place=local_dir is not None)


def fetch_checkpoint(repo: str, revision: str = "main", config: HubConfig | None = None,
                     progress: Progress | None = None) -> Path:
    """A Hub checkpoint's config.json, tokenizer.json and weights (safetensors, sharded or not, else
    pytorch_model.bin) in the HF cache: its snapshot directory. Resumed, verified, and with no
    request at all once complete (so offline)."""
    config = config or HubConfig.from_env()
    progress = progress or Progress()
    ref = _repo_dir(config, repo) / "refs" / revision
    if ref.is_file() and _complete_checkpoint(snapshot := _repo_dir(config, repo) / "snapshots" / ref.read_text().strip()):
        return snapshot
    if config.offline:
        raise HubError(f"HF_HUB_OFFLINE is set, and {repo} is not in the cache ({config.cache_dir})",
                       "connect and run the same command again, or pass a local checkpoint directory")

    def fetch(name: str) -> Path:
        return _fetch(repo, revision, name, config, progress, f"download {name}")[0]

    for name in ("config.json", "tokenizer.json"):
        snapshot = fetch(name).parent
    for single, index in _WEIGHTS:
        for name in (single, index):
            try:
                path = fetch(name)
            except MissingFile:
                continue
            if name == index:
                for shard in sorted(set(_weight_map(path).values())):
                    fetch(shard)
            return snapshot
    raise HubError(f"{repo} has no weights this converter reads (model.safetensors or pytorch_model.bin, sharded or not)",
                   "check the repo id: it should be a Refact checkpoint such as smallcloudai/Refact-1_6B-fim")


def checkpoint_source(source: str, progress: Progress | None = None) -> tuple[Path, Path]:
    """What `convert SOURCE` reads and where it writes by default: a checkpoint directory (written
    here), or a Hub repo id, fetched (written where run and serve find quants)."""
    if Path(source).expanduser().exists() or not _REPO_ID.fullmatch(source):
        return Path(source).expanduser(), Path(".")  # a directory (the checkpoint reader says what is wrong with it)
    return fetch_checkpoint(source, progress=progress), converted_dir()


def _weight_map(index: Path) -> dict[str, str]:
    import json

    try:
        shards = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise HubError(f"{index.name} is not a weight index (no weight_map)") from None
    if not isinstance(shards, dict) or not all(isinstance(v, str) and "/" not in v and v.strip(".") for v in shards.values()):
        raise HubError(f"{index.name} names shards this converter will not fetch")
    return shards


def _complete_checkpoint(snapshot: Path) -> bool:
    if not ((snapshot / "config.json").is_file() and (snapshot / "tokenizer.json").is_file()):
        return False
    for single, index in _WEIGHTS:
        if (snapshot / single).is_file():
            return True
        if (snapshot / index).is_file():
            try:
                return all((snapshot / shard).is_file() for shard in _weight_map(snapshot / index).values())
            except HubError:
                return False
    return False


def _fetch(repo: str, revision: str, filename: str, config: HubConfig, progress: Progress, label: str,
           verify=None, local_dir: Path | None = None, force: bool = False) -> tuple[Path, str]:
    """One file of a Hub repo, downloaded (resumed), its sha256 checked and `verify` passed, into
    the HF cache's layout (or `local_dir`): (its path, its sha256)."""
    url = hf_hub_url(repo, filename, revision=revision, endpoint=config.endpoint)
    try:
        meta = get_hf_file_metadata(url, token=config.token, timeout=config.timeout, endpoint=config.endpoint)
    except HfHubHTTPError as e:
        raise _http_error(e, repo, filename) from None
    except (httpx2.TransportError, OSError) as e:
        raise Unreachable(f"cannot reach {config.endpoint} ({type(e).__name__})",
                          "check the connection (HF_ENDPOINT), or work offline from the cache: HF_HUB_OFFLINE=1") from None
    if not meta.etag or meta.size is None or not meta.commit_hash:
        raise HubError(f"the Hub sent incomplete metadata for {filename}", "try again later")
    # Both name files here (blobs/<sha256>, snapshots/<commit>/): a mirror or a broken endpoint must
    # not choose where we write, nor skip the hash check with an ETag that is not a sha256.
    if not _HEX64.fullmatch(meta.etag) or not _HEX40.fullmatch(meta.commit_hash):
        raise HubError(f"{config.endpoint} sent an unusable file id for {filename} (ETag {meta.etag[:80]!r}, "
                       f"commit {meta.commit_hash[:80]!r}): expected a sha256 and a commit hash",
                       "check HF_ENDPOINT; nothing was written")

    # Locks where huggingface_hub keeps its own, so a `hf download` of the same file waits for us
    # (and nothing but files lives in blobs/).
    if local_dir is not None:
        final = Path(local_dir) / filename
        partial = final.with_name(final.name + ".incomplete")
        lock = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.lock"
    else:
        folder = _repo_dir(config, repo)
        final = folder / "blobs" / meta.etag
        partial = final.with_name(f"{meta.etag}.incomplete")
        lock = config.cache_dir / ".locks" / folder.name / f"{meta.etag}.lock"
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        lock.parent.mkdir(parents=True, exist_ok=True)
        # A place that cannot hold a file (read-only, /proc) would make the lock below wait forever.
        tempfile.TemporaryFile(dir=partial.parent).close()
    except OSError as e:
        raise OutputError(f"cannot write in {partial.parent}: {e.strerror or e}", "choose another --local-dir") from None

    with FileLock(str(lock)):
        if not final.is_file() or force:
            have = partial.stat().st_size if partial.is_file() else 0
            free = shutil.disk_usage(partial.parent).free
            if free < meta.size - have + DISK_MARGIN:
                raise OutputError(
                    f"not enough disk space for {filename}: need {(meta.size - have) / 2**30:.2f} GiB, "
                    f"{free / 2**30:.2f} GiB free in {partial.parent}",
                    "free some space, or pull a smaller quant (refact-gguf list)",
                )
            _download(meta.location, partial, meta.size, meta.etag, label, repo, filename, config, progress)
            if verify is not None:
                verify(partial)
            os.replace(partial, final)
    if local_dir is not None:
        return final, meta.etag
    return _link_snapshot(final, meta.commit_hash, filename, config, repo, revision), meta.etag


def _faithful(published: Path, sha256: str | None, quant: Quant, as_published: bool, progress: Progress,
              in_place: bool = False) -> Path:
    """The file to run: `published` repaired (once: the copy is kept), or as it is where repair does
    not pay, was declined, or the file is faithful already. `in_place` (a --local-dir): the repaired
    file takes the published one's name, its sha256 kept inside as provenance."""
    if as_published or not quant.repair or inspect(published).centred:
        return published
    from .repair import repair  # llama.cpp and numpy work: loaded only when there is some

    if in_place:
        sha256 = sha256 or _sha256(published)
        with tempfile.TemporaryDirectory(dir=published.parent) as tmp:
            repaired = repair(published, Path(tmp) / published.name, sha256, progress)
            os.replace(repaired, published)
        return published
    target = faithful_path(quant, sha256)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        repair(published, target, sha256, progress)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _auth_headers(location: str, config: HubConfig) -> dict[str, str]:
    # The token goes to the Hub only, never to the CDN a file redirects to.
    same_host = urlparse(location).netloc == urlparse(config.endpoint).netloc
    return build_hf_headers(token=config.token if same_host else False)


def _download(location: str, partial: Path, size: int, etag: str, label: str, repo: str, filename: str,
              config: HubConfig, progress: Progress) -> None:
    """Fetch into `partial`, continuing from its bytes; retry dropped connections with Range."""
    digest = hashlib.sha256()
    have = 0
    if partial.is_file():
        with open(partial, "rb") as f:  # hash what a previous run left, then continue after it
            while block := f.read(CHUNK):
                digest.update(block)
                have += len(block)
    if have > size:
        partial.unlink()
        digest, have = hashlib.sha256(), 0
    progress.start(label, size, "B")
    progress.update(have, size)
    session = get_session()
    failures = 0
    while have < size:
        headers = {**_auth_headers(location, config), "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with session.stream("GET", location, headers=headers, timeout=config.timeout, follow_redirects=True) as r:
                if r.status_code == 416 and have == size:
                    break
                r.raise_for_status()
                if have and r.status_code != 206:  # server ignored Range: start over
                    digest, have = hashlib.sha256(), 0
                with open(partial, "r+b" if have else "wb") as f:
                    f.seek(have)
                    f.truncate()
                    for block in r.iter_bytes():  # as received: a drop loses nothing already read
                        f.write(block)
                        digest.update(block)
                        have += len(block)
                        progress.advance(len(block))
                        failures = 0  # progress was made: the retry budget is per stall
            if have >= size:
                break
            reason = "the connection closed early"
        except httpx2.HTTPStatusError as e:
            raise _http_error(e, repo, filename) from None
        except (httpx2.TransportError, httpx2.StreamError) as e:
            reason = type(e).__name__
        failures += 1
        if failures > config.retries:
            raise HubError(
                f"download of {filename} kept failing ({reason}); {have / 2**20:.0f} MiB kept",
                "run the same command again to continue from there",
            )
        time.sleep(config.backoff * 2 ** (failures - 1))
    progress.finish(f"downloaded {filename} ({size / 2**30:.2f} GiB)")
    if digest.hexdigest() != etag:  # the ETag was checked to be a sha256 before anything was downloaded
        partial.unlink(missing_ok=True)
        raise HubError(
            f"{filename}: the downloaded file's sha256 {digest.hexdigest()[:12]}… is not the Hub's {etag[:12]}…;"
            " the corrupt file was removed",
            "run the same command again",
        )


def _verify(partial: Path, quant: Quant) -> None:
    """A Refact GGUF of the promised quant type, or the file goes."""
    try:
        info = inspect(partial)
    except ModelFileError as e:
        partial.unlink(missing_ok=True)
        raise HubError(f"{quant.name}: the download is not a usable GGUF ({e.message}); removed it", "run the pull again") from None
    if info.file_type != quant.ftype:
        partial.unlink(missing_ok=True)
        raise HubError(f"{quant.name}: the file on the Hub has quant type {info.file_type}, not {quant.ftype}; removed it")


def _link_snapshot(blob: Path, commit: str, filename: str, config: HubConfig, repo: str, revision: str) -> Path:
    """snapshots/<commit>/<file> → ../../blobs/<sha>, refs/<revision> = commit: HF's cache layout."""
    folder = _repo_dir(config, repo)
    link = folder / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{filename}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks (Windows without developer mode): keep the bytes in the snapshot
        shutil.copyfile(blob, tmp)
    os.replace(tmp, link)
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return link


def remove(name: str, config: HubConfig | None = None) -> list[Path]:
    """Delete a pulled quant (snapshot link, blob, partial download). Returns what was removed."""
    config = config or HubConfig.from_env()
    quant = catalog.load().get(name)
    removed = []
    while (path := cached_path(quant, config)) is not None:
        blob = path.resolve()
        for p in {path, blob}:
            p.unlink(missing_ok=True)
            removed.append(p)
    if not removed:
        raise RefactGGUFError(f"{quant.name} is not in the cache", "refact-gguf list shows what is")
    return removed
