"""A local completion server IDE plugins use unmodified.

- `POST /infill`: llama.cpp llama-server's endpoint (llama.vim, llama.vscode);
- `POST /v1/completions` (a `suffix` makes it FIM) and `POST /v1/chat/completions`: OpenAI's shape;
- `GET /v1/models`, `GET /health`;
- Ollama's `/api/generate` (with `suffix`: FIM), `/api/chat`, `/api/tags`, `/api/show`, `/api/ps`,
  `/api/version` (Continue, twinny).

HTTP only: a route validates the request, builds a `Task` (tokenizing off the event loop), submits
it to the engine and returns or streams what comes back; a client that goes away cancels its task.
Scheduling, the KV cache and prompts live in `engine`, `runtime` and `tasks`. Library errors map
to HTTP status by type: a full queue is 503, a client's bad input 400, llama.cpp's failure 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import h11
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import __version__
from ..engine import Engine
from ..errors import RefactGGUFError
from . import llama_api, ollama_api, openai_api
from .common import Limits, Service, error_body, error_status
from .keys import ApiKeys

log = logging.getLogger("refact_gguf.server")
request_log = logging.getLogger("refact_gguf.requests")
__all__ = ["ApiKeys", "Limits", "Service", "create_app", "serve"]


async def _library_error(request, e: RefactGGUFError):
    status, kind = error_status(e)
    return error_body(status, str(e), kind)


async def _validation_error(request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return error_body(400, f"invalid request: {where}: {first.get('msg', 'bad value')}" if where else "invalid request body",
                      "invalid_request_error")


async def _http_error(request, e: StarletteHTTPException):
    return error_body(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")


def create_app(engine: Engine, model_name: str, keys: ApiKeys | str | None = None, limits: Limits = Limits(),
               cors_origins: list[str] | None = None, log_requests: bool = False) -> FastAPI:
    """The ASGI app over a started engine; `keys` (or one key) required on every endpoint but
    /health; `log_requests`: a line per request on the `refact_gguf.requests` logger."""
    keys = ApiKeys(keys) if isinstance(keys, str) else keys
    app = FastAPI(title="refact-gguf", version=__version__)
    from ..loader import inspect

    app.state.service = Service(engine, model_name, limits, inspect(engine.model.path).fidelity)
    for api in (llama_api, openai_api, ollama_api):
        app.include_router(api.router)
    app.add_exception_handler(RefactGGUFError, _library_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(_Guard, keys=keys, max_body=limits.max_body_bytes, body_timeout=limits.body_timeout_s)
    if cors_origins:  # added last, so outermost: a browser's preflight passes before the key check
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    if log_requests:
        app.add_middleware(_RequestLog)  # outermost: refused requests are logged too
    return app


class _RequestLog:
    """One line per request, as people grep them: time, method, route, status, client, time taken,
    and for generations the tokens evaluated, cached and generated and whether the answer came from
    the lines around the cursor. Never a key, a header or any code."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 0

        async def watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            client = scope.get("client") or ("-", 0)
            line = (f'{time.strftime("%Y-%m-%dT%H:%M:%S%z")} {scope["method"]} {scope["path"]} {status or "-"}'
                    f" client={client[0]}:{client[1]} ms={(time.perf_counter() - t0) * 1e3:.1f}")
            c = scope.get("state", {}).get("completion")
            if c is not None:
                line += (f" prompt={c.prompt_tokens} evaluated={c.tokens_evaluated} cached={c.tokens_cached}"
                         f" generated={c.tokens_predicted} stop={c.stop_reason.replace(' ', '_')}"
                         f" context={'short' if c.short_context else 'full'}")
            request_log.info("%s", line)


class _Guard:
    """API key and body size, checked before anything is read (every body read as JSON), and the
    body's size and pace while it is read (a chunked body has no Content-Length; a stalled one would
    hold its connection). A
    plain ASGI middleware: Starlette's BaseHTTPMiddleware would tell a streaming response that its
    client had disconnected."""

    def __init__(self, app, keys: ApiKeys | None, max_body: int, body_timeout: float):
        self.app, self.keys, self.max_body, self.body_timeout = app, keys, max_body, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            response = None
            if self.keys is not None and scope["path"] != "/health":
                if self.keys.person(headers.get("authorization", "")) is None:
                    response = error_body(401, "invalid or missing API key", "authentication_error")
            length = headers.get("content-length")
            if response is None and length is not None and (not length.isdigit() or int(length) > self.max_body):
                response = error_body(413, f"request body over {self.max_body} bytes", "invalid_request_error")
            if response is not None:
                return await response(scope, receive, send)
            if "json" not in headers.get("content-type", ""):
                # Every body here is JSON, whatever it is labelled: llama-server and Ollama read it so,
                # and `curl -d '{…}'` sends it as a form (FastAPI would refuse it).
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")]}
            receive = self._bounded(receive)
        await self.app(scope, receive, send)

    def _bounded(self, receive):
        """`receive` that refuses a body past `max_body` (413) or stalled for `body_timeout` (408).
        HTTPExceptions, so FastAPI's body reading passes them on as they are."""
        received, reading = 0, True

        async def bounded():
            nonlocal received, reading
            if not reading:  # the body is in: what follows is a disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise StarletteHTTPException(408, f"the request body stalled for {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                reading = message.get("more_body", False)
                if received > self.max_body:
                    raise StarletteHTTPException(413, f"request body over {self.max_body} bytes")
            return message

        return bounded


def serve(model_path, host: str = "127.0.0.1", port: int = 8012, keys: ApiKeys | None = None, parallel: int = 1,
          n_ctx: int = 4096, threads: int | None = None, gpu_layers: str | int = 0, limits: Limits = Limits(),
          cors_origins: list[str] | None = None, cache_mb: int | None = None, cache_disk_mb: int = 2048,
          cache_dir: Path | None = None, on_ready: Callable[[str], None] = lambda url: None,
          log_requests: bool = False, draft: int = 0) -> None:
    """Load the model once, start an engine of `parallel` sequences on it, and serve until
    interrupted. Files' KV caches are kept in `cache_mb` of memory (default: from free RAM) and
    `cache_disk_mb` under `cache_dir` (default: the user's cache directory; 0 MB: none). A keys
    file behind `keys` is read again on SIGHUP."""
    from ..prompt_cache import PromptCache, default_directory, model_fingerprint
    from ..select import kv_cache_mb, open_model

    sock = _listen(host, port)  # before the model loads: a port in use is a one-line error at once
    cache_mb = kv_cache_mb() if cache_mb is None else cache_mb
    cache = PromptCache(cache_mb << 20, model_fingerprint(model_path), cache_dir or default_directory(),
                        cache_disk_mb << 20, model_path.name) if cache_mb or cache_disk_mb else None
    with sock, open_model(model_path, gpu_layers) as model, \
            Engine(model, n_ctx=n_ctx, parallel=parallel, threads=threads, max_queue=limits.max_queue, draft=draft,
                   cache=cache).start() as engine:
        if draft and engine.drafter is None:
            log.warning("--draft is off on a GPU: there it changed the greedy text and gained nothing (docs/benchmarks.md)")
        app = create_app(engine, model_path.name, keys, limits, cors_origins, log_requests)
        server = _GracefulServer(uvicorn_config(app, limits), engine)
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            # SIGHUP reads a keys file again; without one it is answered, not the default "terminate".
            signal.signal(signal.SIGHUP, lambda *_: keys.reload() if keys is not None and keys.path is not None
                          else log.warning("SIGHUP: no keys file to read again"))
        on_ready(f"http://{host}:{port}")
        server.run(sockets=[sock])


def uvicorn_config(app: FastAPI, limits: Limits, **kw) -> uvicorn.Config:
    """How `serve` runs the app: quiet, and a request's head held to the body's time limit."""
    http = functools.partial(_HeadTimeout, head_timeout_s=limits.body_timeout_s)
    return uvicorn.Config(app, http=http, log_level="warning", access_log=False, **kw)


class _HeadTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed when a request's head (its line and headers) has not
    all arrived `head_timeout_s` after the connection opened or the head began: uvicorn waits for
    one forever, so a client that stops mid-line would hold its connection for good."""

    def __init__(self, *args, head_timeout_s: float, **kw):
        super().__init__(*args, **kw)
        self.head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch_head()

    def _unsupported_upgrade_warning(self) -> None:
        """No WebSocket here: an upgrade request is answered as plain HTTP (401, 404), not logged
        twice per request (anyone could fill the log with them)."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        if self.conn.their_state is not h11.IDLE:  # the head is in: the body has its own limit (_Guard)
            self._stop_watching()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self.timeout_keep_alive_handler)

    def _stop_watching(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class _GracefulServer(uvicorn.Server):
    """SIGINT and SIGTERM only stop serving. uvicorn re-raises the signal after its shutdown, and
    the default SIGTERM action ends the process before the engine closes: the slots' KV caches never
    reach the disk, and a service manager sees a kill instead of exit 0.

    The first signal lets requests in flight finish, saying so; a second cancels them, so the
    shutdown is quick and quiet (uvicorn's own "force exit" printed tracebacks)."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            cancelled = self.engine.cancel_all()
            log.warning("stopping now: %d request(s) cancelled", cancelled)
            return
        load = self.engine.load()
        if load["busy"] or load["waiting"]:
            log.warning("stopping: waiting for %d request(s) in flight to finish (Ctrl-C again to cancel them)",
                        load["busy"] + load["waiting"])
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle off (TCP_NODELAY) only on connections whose
    # socket says TCP, and accepted ones copy the listener's. With Nagle on, a response's body waited
    # for the client's delayed ACK of its head: 40 ms on every request (44 ms against 0.8 for a GET).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening now, not when uvicorn starts after the model loads: with SO_REUSEADDR two
        # sockets may bind one port until one listens, so two servers started together both got
        # past here and the second died in uvicorn with tracebacks.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = ("choose another --port, or stop what is serving there" if e.errno == errno.EADDRINUSE
                else "choose another --host: an address of this machine (127.0.0.1, 0.0.0.0, …)"
                if isinstance(e, socket.gaierror) or e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) else None)
        raise RefactGGUFError(f"cannot listen on {host}:{port}: {e.strerror}", hint) from None
    return sock
