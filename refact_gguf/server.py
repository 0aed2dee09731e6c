"""A local completion server IDE plugins use unmodified.

- `POST /infill`: llama.cpp llama-server's endpoint (llama.vim, llama.vscode);
- `POST /v1/completions` (a `suffix` makes it FIM) and `POST /v1/chat/completions`: OpenAI's shape;
- `GET /v1/models`, `GET /health`.

HTTP only: a route validates the request, builds a `Task` (tokenizing off the event loop), submits
it to the engine and returns or streams what comes back; a client that goes away cancels its task.
Scheduling, the KV cache and prompts live in `engine`, `runtime` and `tasks`. Library errors map
to HTTP status by type: a full queue is 503, a client's bad input 400, llama.cpp's failure 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, tasks
from .chat import Message
from .engine import Engine, Handle
from .errors import BusyError, InputError, RefactGGUFError
from .tasks import Completion, Sampling, Task

# llama-server separates input_extra chunks this way when the vocab has no FIM_SEP token.
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20
    max_predict: int = 1024
    max_queue: int = 16
    body_timeout_s: float = 30.0  # a request body that stops arriving frees its connection after this
    prompt_budget_ms: int = 1000  # for /infill clients that send no t_max_prompt_ms (0: always the full prompt)


@dataclass(frozen=True)
class Service:
    """What the routes serve with (kept on `app.state.service`)."""

    engine: Engine
    model_name: str
    limits: Limits

    def tokenize(self, text: str) -> list[int]:
        return self.engine.model.tokenize_cached(text)


# ------------------------------------------------------------------------------------ schemas


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # accept and ignore what we do not implement


class ExtraChunk(_Body):
    filename: str = "tmp"
    text: str = ""


class InfillRequest(_Body):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: str = ""  # text typed on the cursor's line, before the cursor
    n_predict: int = Field(default=-1, ge=-1)
    n_indent: int = Field(default=0, ge=0)
    t_max_prompt_ms: int = Field(default=-1, ge=-1)
    t_max_predict_ms: int = Field(default=-1, ge=-1)
    cache_prompt: bool = True
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    stream: bool = False
    stop: list[str] = Field(default_factory=list)
    fim_order: Literal["spm", "psm"] = "spm"


class _OpenAIRequest(_Body):
    """The fields OpenAI's completion and chat requests share."""

    model: str | None = None
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = ""
    suffix: str | None = None
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.2, ge=0.0, le=5.0)


# ------------------------------------------------------------------------------------ shapes


def timings(c: Completion) -> dict[str, Any]:
    """llama-server's `timings`; `prompt_n` counts only the tokens this request evaluated."""
    return {
        "prompt_n": c.tokens_evaluated, "prompt_ms": round(c.prompt_ms, 3),
        "prompt_per_token_ms": round(c.prompt_ms / c.tokens_evaluated, 3) if c.tokens_evaluated else 0.0,
        "prompt_per_second": round(c.tokens_evaluated / c.prompt_ms * 1e3, 2) if c.prompt_ms else 0.0,
        "predicted_n": c.tokens_predicted, "predicted_ms": round(c.predicted_ms, 3),
        "predicted_per_token_ms": round(c.predicted_ms / c.tokens_predicted, 3) if c.tokens_predicted else 0.0,
        "predicted_per_second": round(c.tokens_predicted / c.predicted_ms * 1e3, 2) if c.predicted_ms else 0.0,
        "cache_n": c.tokens_cached,
    }


def infill_result(c: Completion, model_name: str, content: str | None = None) -> dict[str, Any]:
    return {
        "content": c.text if content is None else content, "model": model_name, "stop": True,
        "stop_type": {"max_tokens": "limit", "eos": "eos", "special": "eos"}.get(c.stop_reason, "word"),
        "stopping_word": "", "tokens_predicted": c.tokens_predicted, "tokens_evaluated": c.prompt_tokens,
        "tokens_cached": c.tokens_cached, "truncated": c.truncated, "short_context": c.short_context,
        "timings": timings(c),
    }


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.tokens_predicted,
            "total_tokens": c.prompt_tokens + c.tokens_predicted}


def finish_reason(c: Completion) -> str:
    return "length" if c.stop_reason == "max_tokens" else "stop"


def error_body(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status_code=status)


def error_status(e: RefactGGUFError) -> tuple[int, str]:
    """HTTP status and OpenAI error type of a library error, by its type."""
    if isinstance(e, BusyError):
        return 503, "unavailable_error"
    if isinstance(e, InputError):
        return 400, "invalid_request_error"
    return 500, "server_error"  # llama.cpp's own failure, or ours: never the client's fault


# ------------------------------------------------------------------------------------ engine bridge


class _Submitted:
    """A task on the engine, seen from the event loop: its text pieces and its end, as a queue."""

    _END = object()

    def __init__(self, engine: Engine, task: Task, stream: bool):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        put = self.queue.put_nowait
        self.handle: Handle = engine.submit(
            task,
            on_text=(lambda text: loop.call_soon_threadsafe(put, text)) if stream else None,
            on_done=lambda h: loop.call_soon_threadsafe(put, self._END),
        )

    async def pieces(self) -> AsyncIterator[str]:
        while (item := await self.queue.get()) is not self._END:
            yield item

    def result(self) -> Completion:
        return self.handle.wait(0)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(request: Request, build: Callable[[], Task]) -> Completion:
    """Build the task off the loop, run it, cancel it if the client goes away first."""
    service: Service = request.app.state.service
    task = await asyncio.to_thread(build)
    submitted = _Submitted(service.engine, task, stream=False)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    drain = asyncio.ensure_future(submitted.queue.get())
    try:
        await asyncio.wait({drain, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            submitted.handle.cancel()
            await drain
    finally:
        watcher.cancel()
    return submitted.result()


async def stream(request: Request, build: Callable[[], Task], chunk: Callable[[str], dict],
                 final: Callable[[Completion], list[dict]], done_marker: bool) -> StreamingResponse:
    """Server-sent events: a chunk per piece of final text, then the closing event(s). A client
    that goes away makes Starlette close the generator; `finally` cancels the task."""
    service: Service = request.app.state.service
    task = await asyncio.to_thread(build)
    submitted = _Submitted(service.engine, task, stream=True)  # queue full: 503 before the stream opens

    async def events():
        try:
            async for text in submitted.pieces():
                yield f"data: {json.dumps(chunk(text))}\n\n"
            try:
                completion = submitted.result()
            except RefactGGUFError as e:
                status, kind = error_status(e)
                yield f"data: {json.dumps({'error': {'code': status, 'message': str(e), 'type': kind}})}\n\n"
                return
            for event in final(completion):
                yield f"data: {json.dumps(event)}\n\n"
            if done_marker:
                yield "data: [DONE]\n\n"
        finally:
            submitted.handle.cancel()  # a no-op once it has finished

    return StreamingResponse(events(), media_type="text/event-stream")


def check_predict(service: Service, n: int) -> int:
    if n > service.limits.max_predict:
        raise InputError(f"n_predict/max_tokens {n} is over this server's limit of {service.limits.max_predict}")
    return n


# ------------------------------------------------------------------------------------ routes

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    engine = request.app.state.service.engine
    cache = engine.cache
    saved = {"entries": len(cache), "memory_mb": round(cache.memory_used / 2**20, 1)} if cache is not None else None
    return {"status": "ok", **engine.load(), "engine": asdict(engine.stats), "prompt_cache": saved}


@router.get("/v1/models")
async def models(request: Request):
    name = request.app.state.service.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "refact-gguf"}]}


@router.post("/infill")
async def infill(body: InfillRequest, request: Request):
    service: Service = request.app.state.service
    n_predict = check_predict(service, body.n_predict if body.n_predict >= 0 else 128)
    start = time.perf_counter()

    # When the cache holds too little of the prompt to have it in within the budget, the engine
    # answers from the lines around the cursor (the task's `short` version) and evaluates the
    # full prompt in the background.
    budget_ms = body.t_max_prompt_ms if body.t_max_prompt_ms > 0 else service.limits.prompt_budget_ms
    short_tokens = service.engine.short_tokens(budget_ms / 1e3) if budget_ms > 0 and body.cache_prompt else None

    def build() -> Task:
        extra: list[int] = []
        for c in body.input_extra:
            extra += service.tokenize(SNIPPET_SEPARATOR + c.text)
        task = tasks.fim(
            service.tokenize, service.engine.n_ctx, body.input_prefix, body.input_suffix, order=body.fim_order,
            max_tokens=n_predict, sampling=Sampling(body.temperature, body.top_k, body.top_p, body.seed),
            line=body.prompt, extra=extra, indent=body.n_indent or None, stop=tuple(body.stop),
            short_tokens=short_tokens,
        )
        task.reuse_cache = body.cache_prompt
        task.prompt_budget = start + budget_ms / 1e3 if short_tokens is not None else None
        for t in (task, task.short):
            if t is not None:
                t.prompt_deadline = start + body.t_max_prompt_ms / 1e3 if body.t_max_prompt_ms > 0 else None
                t.deadline = start + body.t_max_predict_ms / 1e3 if body.t_max_predict_ms > 0 else None
        return task

    if body.stream:
        return await stream(request, build, lambda text: {"content": text, "stop": False},
                            lambda c: [infill_result(c, service.model_name, content="")], done_marker=False)
    return infill_result(await complete(request, build), service.model_name)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    service: Service = request.app.state.service
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise InputError("prompt: exactly one prompt per request")
        text = body.prompt[0]
    else:
        text = body.prompt
    if body.suffix is None and not text:
        raise InputError("prompt: empty (give a prompt, or a suffix for fill-in-the-middle)")
    max_tokens = check_predict(service, body.max_tokens)
    sampling = Sampling(body.temperature, 40, body.top_p, body.seed)

    def build() -> Task:
        if body.suffix is not None:
            return tasks.fim(service.tokenize, service.engine.n_ctx, text, body.suffix, max_tokens=max_tokens,
                             sampling=sampling, stop=body.stops())
        return tasks.complete(service.tokenize, service.engine.n_ctx, text, max_tokens=max_tokens, sampling=sampling,
                              stop=body.stops())

    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def envelope(choice: dict, extra: dict | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": service.model_name,
                "choices": [choice], **(extra or {})}

    if body.stream:
        return await stream(
            request, build, lambda t: envelope({"text": t, "index": 0, "logprobs": None, "finish_reason": None}),
            lambda c: [envelope({"text": "", "index": 0, "logprobs": None, "finish_reason": finish_reason(c)}, {"usage": usage(c)})],
            done_marker=True)
    c = await complete(request, build)
    return envelope({"text": c.text, "index": 0, "logprobs": None, "finish_reason": finish_reason(c)}, {"usage": usage(c)})


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    service: Service = request.app.state.service
    max_tokens = check_predict(service, body.max_tokens or min(512, service.limits.max_predict))
    messages = [Message(m.role, m.content) for m in body.messages]
    sampling = Sampling(body.temperature, 40, body.top_p, body.seed)

    def build() -> Task:
        return tasks.chat(service.tokenize, service.engine.n_ctx, messages, max_tokens=max_tokens, sampling=sampling,
                          stop=body.stops())

    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def envelope(choice: dict, kind: str, extra: dict | None = None) -> dict:
        return {"id": rid, "object": kind, "created": created, "model": service.model_name, "choices": [choice], **(extra or {})}

    if body.stream:
        return await stream(
            request, build,
            lambda t: envelope({"index": 0, "delta": {"role": "assistant", "content": t}, "finish_reason": None}, "chat.completion.chunk"),
            lambda c: [envelope({"index": 0, "delta": {}, "finish_reason": finish_reason(c)}, "chat.completion.chunk", {"usage": usage(c)})],
            done_marker=True)
    c = await complete(request, build)
    return envelope({"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": finish_reason(c)},
                    "chat.completion", {"usage": usage(c)})


# ------------------------------------------------------------------------------------ app


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


def create_app(engine: Engine, model_name: str, api_key: str | None = None, limits: Limits = Limits(),
               cors_origins: list[str] | None = None) -> FastAPI:
    """The ASGI app over a started engine."""
    app = FastAPI(title="refact-gguf", version=__version__)
    app.state.service = Service(engine, model_name, limits)
    app.include_router(router)
    app.add_exception_handler(RefactGGUFError, _library_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(_Guard, api_key=api_key, max_body=limits.max_body_bytes, body_timeout=limits.body_timeout_s)
    if cors_origins:  # added last, so outermost: a browser's preflight passes before the key check
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    return app


class _Guard:
    """API key and body size, checked before anything is read, and the body's size and pace while
    it is read (a chunked body has no Content-Length; a stalled one would hold its connection). A
    plain ASGI middleware: Starlette's BaseHTTPMiddleware would tell a streaming response that its
    client had disconnected."""

    def __init__(self, app, api_key: str | None, max_body: int, body_timeout: float):
        self.app, self.api_key, self.max_body, self.body_timeout = app, api_key, max_body, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            response = None
            if self.api_key is not None and scope["path"] != "/health":
                given = headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    response = error_body(401, "invalid or missing API key", "authentication_error")
            length = headers.get("content-length")
            if response is None and length is not None and (not length.isdigit() or int(length) > self.max_body):
                response = error_body(413, f"request body over {self.max_body} bytes", "invalid_request_error")
            if response is not None:
                return await response(scope, receive, send)
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


def serve(model_path, host: str = "127.0.0.1", port: int = 8012, api_key: str | None = None, parallel: int = 1,
          n_ctx: int = 4096, threads: int | None = None, gpu_layers: str | int = 0, limits: Limits = Limits(),
          cors_origins: list[str] | None = None, cache_mb: int | None = None, cache_disk_mb: int = 2048,
          cache_dir: Path | None = None, on_ready: Callable[[str], None] = lambda url: None) -> None:
    """Load the model once, start an engine of `parallel` sequences on it, and serve until
    interrupted. Files' KV caches are kept in `cache_mb` of memory (default: from free RAM) and
    `cache_disk_mb` under `cache_dir` (default: the user's cache directory; 0 MB: none)."""
    import uvicorn

    from .llama import Model
    from .prompt_cache import PromptCache, default_directory, default_memory_mb, model_fingerprint
    from .select import gpu_layers as resolve_gpu_layers

    sock = _listen(host, port)  # before the model loads: a port in use is a one-line error at once
    cache_mb = default_memory_mb() if cache_mb is None else cache_mb
    cache = PromptCache(cache_mb << 20, model_fingerprint(model_path), cache_dir or default_directory(),
                        cache_disk_mb << 20, model_path.name) if cache_mb or cache_disk_mb else None
    with sock, Model(model_path, resolve_gpu_layers(gpu_layers, model_path)) as model, \
            Engine(model, n_ctx=n_ctx, parallel=parallel, threads=threads, max_queue=limits.max_queue,
                   cache=cache).start() as engine:
        app = create_app(engine, model_path.name, api_key, limits, cors_origins)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        on_ready(f"http://{host}:{port}")
        server.run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RefactGGUFError(f"cannot listen on {host}:{port}: {e.strerror}",
                              "choose another --port, or stop what is serving there") from None
    return sock
