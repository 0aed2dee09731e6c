"""A real HTTP server on 127.0.0.1 that speaks the part of the Hub protocol huggingface_hub uses
for one file: HEAD/GET on /{repo}/resolve/{revision}/{file} answering 302 to a blob URL with
ETag, X-Repo-Commit, X-Linked-Etag and X-Linked-Size, and the blob itself with Range support.
Like the Hub's CDN, blobs are served from another host (127.0.0.2, still loopback). Faults are
injected per test; every request is recorded."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    repo: str
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    status: int | None = None  # force this status on every resolve request (401, 404…)
    drop_after: int | None = None  # close the connection after this many body bytes (once)
    drop_file: str | None = None  # … of this file only (default: whichever is sent first)
    hang_after: int | None = None  # send this many bytes, then hang until `release` (a client killed mid-file)
    corrupt: bool = False  # serve flipped bytes (sha256 mismatch)
    ignore_range: bool = False
    sha_override: dict[str, str] = field(default_factory=dict)
    commit: str | None = None  # X-Repo-Commit to send instead of COMMIT (a hostile mirror)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        for server in (self.server, self.cdn):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.2:{self.cdn.server_address[1]}"

    def add(self, name: str, path: Path) -> str:
        self.files[name] = path.read_bytes()
        return hashlib.sha256(self.files[name]).hexdigest()

    def sha(self, name: str) -> str:
        return self.sha_override.get(name) or hashlib.sha256(self.files[name]).hexdigest()

    def close(self) -> None:
        self.release.set()
        for server in (self.server, self.cdn):
            server.shutdown()
            server.server_close()

    def resolve_requests(self) -> list[Request]:
        return [r for r in self.requests if "/resolve/" in r.path]

    def blob_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.startswith("/blobs/")]

    # ------------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        self.requests.append(Request(h.command, h.path, h.headers.get("Range"), h.headers.get("Authorization")))
        prefix = f"/{self.repo}/resolve/main/"
        if h.path.startswith(prefix):
            name = h.path[len(prefix):]
            if self.status:
                return self._reply(h, self.status, b'{"error": "nope"}')
            if name not in self.files:
                return self._reply(h, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            data = self.files[name]
            return self._reply(h, 302, b"", {
                "Location": f"{self.cdn_url}/blobs/{name}",
                "ETag": '"deadbeef"',
                "X-Repo-Commit": self.commit or COMMIT,
                "X-Linked-Etag": f'"{self.sha(name)}"',
                "X-Linked-Size": str(len(data)),
            })
        if h.path.startswith("/blobs/"):
            name = h.path[len("/blobs/"):]
            data = self.files[name]
            if self.corrupt:
                data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
            start = 0
            rng = h.headers.get("Range")
            if rng and not self.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    return self._reply(h, 416, b"")
            body = data[start:]
            headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
            status = 200
            if start:
                status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            if head:
                return
            limit = len(body)
            if self.drop_after is not None and self.drop_file in (None, name):
                limit, self.drop_after = min(limit, max(0, self.drop_after - start)), None
            hang = self.hang_after is not None and self.hang_after - start < limit
            if hang:
                limit = max(0, self.hang_after - start)
            h.wfile.write(body[:limit])
            h.wfile.flush()
            if hang:
                self.release.wait(60)
                return
            if limit < len(body):
                h.close_connection = True
                h.connection.shutdown(2)
            return
        self._reply(h, 404, b"")

    @staticmethod
    def _reply(h, status: int, body: bytes, headers: dict | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
