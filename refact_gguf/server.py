"""A local completion server IDE plugins use unmodified.

- `POST /infill`: llama.cpp llama-server's endpoint (llama.vim, llama.vscode);
- `POST /v1/completions` (a `suffix` makes it FIM) and `POST /v1/chat/completions`: OpenAI's shape;
- `GET /v1/models`, `GET /health`.

HTTP only: prompts, stop rules and the KV cache live in `runtime`/`fim`/`chat`. Each slot is a
`Runtime` (a context on the one shared model); a request goes to the free slot whose cache shares
the longest prefix with its prompt, so a keystroke re-evaluates only the tokens it changed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .chat import Message
from .errors import RefactGGUFError
from .runtime import Completion, Runtime, Sampling

# llama-server separates input_extra chunks this way when the vocab has no FIM_SEP token.
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20
    max_predict: int = 1024
    max_queue: int = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


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


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


# ------------------------------------------------------------------------------------ slots


class SlotPool:
    """Runtimes handed out one request at a time; waiting requests are bounded (then 503)."""

    def __init__(self, runtimes: list[Runtime], max_queue: int):
        self.free = list(runtimes)
        self.max_queue = max_queue
        self.waiting = 0
        self._cond: asyncio.Condition | None = None

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def acquire(self, prompt_key: Callable[[Runtime], int]) -> Runtime:
        async with self.cond:
            if not self.free and self.waiting >= self.max_queue:
                raise ApiError(503, f"server busy: {self.waiting} requests already waiting", "unavailable_error")
            self.waiting += 1
            try:
                await self.cond.wait_for(lambda: bool(self.free))
            finally:
                self.waiting -= 1
            best = max(self.free, key=prompt_key)  # the slot whose cache fits this prompt best
            self.free.remove(best)
            return best

    async def release(self, rt: Runtime) -> None:
        async with self.cond:
            self.free.append(rt)
            self.cond.notify()


# ------------------------------------------------------------------------------------ app


def create_app(runtimes: list[Runtime], model_name: str, api_key: str | None = None, limits: Limits = Limits(),
               cors_origins: list[str] | None = None) -> FastAPI:
    pool = SlotPool(runtimes, limits.max_queue)
    tokenize = runtimes[0].tokenize
    n_ctx = runtimes[0].ctx.n_ctx

    @asynccontextmanager
    async def lifespan(app):
        yield

    app = FastAPI(title="refact-gguf", version=__version__, lifespan=lifespan)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e.status, e.message, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"invalid request: {where}: {first.get('msg', 'bad value')}" if where else "invalid request body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(RefactGGUFError)
    async def _library(request, e: RefactGGUFError):
        return error(400, str(e))

    app.add_middleware(_Guard, api_key=api_key, max_body=limits.max_body_bytes, error=error)

    # ---------------------------------------------------------------- helpers

    async def run(request: Request, prompt_key: Callable[[Runtime], int], work: Callable[[Runtime, threading.Event], Completion]) -> Completion:
        """Take a slot, run `work` in a thread, cancel it if the client goes away."""
        rt = await pool.acquire(prompt_key)
        cancel = threading.Event()
        try:
            task = asyncio.ensure_future(asyncio.to_thread(work, rt, cancel))
            while not task.done():
                await asyncio.wait({task}, timeout=0.05)
                if not task.done() and await request.is_disconnected():
                    cancel.set()
            return task.result()
        finally:
            await pool.release(rt)

    def stream(request: Request, prompt_key, work: Callable[[Runtime, threading.Event, Callable[[str], None]], Completion],
               chunk: Callable[[str], dict], final: Callable[[Completion], list[dict]], done_marker: bool) -> StreamingResponse:
        async def events():
            rt = await pool.acquire(prompt_key)
            cancel = threading.Event()
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            try:
                task = asyncio.ensure_future(asyncio.to_thread(
                    work, rt, cancel, lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)))
                # A client that goes away makes Starlette close this generator: `finally` cancels.
                while not (task.done() and queue.empty()):
                    try:
                        text = await asyncio.wait_for(queue.get(), timeout=0.05)
                    except asyncio.TimeoutError:
                        continue
                    yield f"data: {json.dumps(chunk(text))}\n\n"
                for event in final(task.result()):
                    yield f"data: {json.dumps(event)}\n\n"
                if done_marker:
                    yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # also when the client disconnected and the response was dropped
                await pool.release(rt)

        return StreamingResponse(events(), media_type="text/event-stream")

    def check_predict(n: int) -> int:
        if n > limits.max_predict:
            raise ApiError(400, f"n_predict/max_tokens {n} is over this server's limit of {limits.max_predict}")
        return n

    def timings(c: Completion) -> dict[str, Any]:
        return {
            "prompt_n": c.tokens_evaluated, "prompt_ms": round(c.prompt_ms, 3),
            "prompt_per_token_ms": round(c.prompt_ms / c.tokens_evaluated, 3) if c.tokens_evaluated else 0.0,
            "prompt_per_second": round(c.tokens_evaluated / c.prompt_ms * 1e3, 2) if c.prompt_ms else 0.0,
            "predicted_n": c.tokens_predicted, "predicted_ms": round(c.predicted_ms, 3),
            "predicted_per_token_ms": round(c.predicted_ms / c.tokens_predicted, 3) if c.tokens_predicted else 0.0,
            "predicted_per_second": round(c.tokens_predicted / c.predicted_ms * 1e3, 2) if c.predicted_ms else 0.0,
            "cache_n": c.tokens_cached,
        }

    def usage(c: Completion) -> dict[str, int]:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.tokens_predicted,
                "total_tokens": c.prompt_tokens + c.tokens_predicted}

    def finish_reason(c: Completion) -> str:
        return "length" if c.stop_reason == "max_tokens" else "stop"

    # ---------------------------------------------------------------- endpoints

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "refact-gguf"}]}

    @app.post("/infill")
    async def infill(body: InfillRequest, request: Request):
        n_predict = check_predict(body.n_predict if body.n_predict >= 0 else 128)
        extra: list[int] = []
        for c in body.input_extra:
            extra += tokenize(SNIPPET_SEPARATOR + c.text)
        sampling = Sampling(body.temperature, body.top_k, body.top_p, body.seed)
        start = time.perf_counter()

        def work(rt: Runtime, cancel: threading.Event, on_text=None) -> Completion:
            if not body.cache_prompt:
                rt.cached = []
            return rt.fim(
                body.input_prefix, body.input_suffix, order=body.fim_order, max_tokens=n_predict, sampling=sampling,
                on_text=on_text, line=body.prompt, extra=extra, indent=body.n_indent or None, stop=tuple(body.stop),
                deadline=start + body.t_max_predict_ms / 1e3 if body.t_max_predict_ms > 0 else None,
                prompt_deadline=start + body.t_max_prompt_ms / 1e3 if body.t_max_prompt_ms > 0 else None,
                cancel=cancel,
            )

        key = _fim_key(tokenize, body.input_suffix, body.input_prefix)

        def result(c: Completion, content: str | None = None) -> dict[str, Any]:
            return {
                "content": c.text if content is None else content, "model": model_name, "stop": True,
                "stop_type": {"max_tokens": "limit", "eos": "eos", "special": "eos"}.get(c.stop_reason, "word"),
                "stopping_word": "", "tokens_predicted": c.tokens_predicted, "tokens_evaluated": c.prompt_tokens,
                "tokens_cached": c.tokens_cached, "truncated": c.truncated, "timings": timings(c),
            }

        if body.stream:
            return stream(request, key, work, lambda text: {"content": text, "stop": False},
                          lambda c: [result(c, content="")], done_marker=False)
        return result(await run(request, key, work))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "prompt: exactly one prompt per request")
            text = body.prompt[0]
        else:
            text = body.prompt
        max_tokens = check_predict(body.max_tokens)
        sampling = Sampling(body.temperature, 40, body.top_p, body.seed)
        stops = _stops(body.stop)
        if body.suffix is not None:
            key = _fim_key(tokenize, body.suffix, text)

            def work(rt, cancel, on_text=None):
                return rt.fim(text, body.suffix, max_tokens=max_tokens, sampling=sampling, on_text=on_text, stop=stops, cancel=cancel)
        else:
            if not text:
                raise ApiError(400, "prompt: empty (give a prompt, or a suffix for fill-in-the-middle)")
            ids = tokenize(text)
            if len(ids) >= n_ctx:
                raise ApiError(400, f"prompt: {len(ids)} tokens, the context holds {n_ctx}")

            def key(rt):
                return rt.common_prefix(ids)

            def work(rt, cancel, on_text=None):
                return rt.complete(text, max_tokens=max_tokens, sampling=sampling, on_text=on_text, stop=stops, cancel=cancel)

        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(choice: dict, extra: dict | None = None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": [choice], **(extra or {})}

        if body.stream:
            return stream(request, key, work,
                          lambda t: envelope({"text": t, "index": 0, "logprobs": None, "finish_reason": None}),
                          lambda c: [envelope({"text": "", "index": 0, "logprobs": None, "finish_reason": finish_reason(c)}, {"usage": usage(c)})],
                          done_marker=True)
        c = await run(request, key, work)
        return envelope({"text": c.text, "index": 0, "logprobs": None, "finish_reason": finish_reason(c)}, {"usage": usage(c)})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        max_tokens = check_predict(body.max_tokens or min(512, limits.max_predict))
        messages = [Message(m.role, m.content) for m in body.messages]
        sampling = Sampling(body.temperature, 40, body.top_p, body.seed)
        stops = _stops(body.stop)

        def work(rt, cancel, on_text=None):
            return rt.chat(messages, max_tokens=max_tokens, sampling=sampling, on_text=on_text, stop=stops, cancel=cancel)

        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(choice: dict, kind: str, extra: dict | None = None) -> dict:
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice], **(extra or {})}

        def key(rt):
            return 0  # any free slot: chat turns are not worth routing

        if body.stream:
            return stream(request, key, work,
                          lambda t: envelope({"index": 0, "delta": {"role": "assistant", "content": t}, "finish_reason": None}, "chat.completion.chunk"),
                          lambda c: [envelope({"index": 0, "delta": {}, "finish_reason": finish_reason(c)}, "chat.completion.chunk", {"usage": usage(c)})],
                          done_marker=True)
        c = await run(request, key, work)
        return envelope({"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": finish_reason(c)},
                        "chat.completion", {"usage": usage(c)})

    return app


class _Guard:
    """API key and body size, checked before anything is read. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would tell a streaming response that its client had disconnected."""

    def __init__(self, app, api_key: str | None, max_body: int, error: Callable[..., JSONResponse]):
        self.app, self.api_key, self.max_body, self.error = app, api_key, max_body, error

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            response = None
            if self.api_key is not None and scope["path"] != "/health":
                given = headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    response = self.error(401, "invalid or missing API key", "authentication_error")
            length = headers.get("content-length")
            if response is None and length is not None and (not length.isdigit() or int(length) > self.max_body):
                response = self.error(413, f"request body over {self.max_body} bytes")
            if response is not None:
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _fim_key(tokenize, suffix: str, prefix: str) -> Callable[[Runtime], int]:
    """Slot affinity for a FIM request: how much of an SPM prompt's head (suffix, then prefix)
    the slot's cache already holds."""
    head = [3, *tokenize(suffix)[:256]]

    def key(rt: Runtime) -> int:
        return rt.common_prefix(head)

    return key


def serve(model_path, host: str = "127.0.0.1", port: int = 8012, api_key: str | None = None, parallel: int = 1,
          n_ctx: int = 4096, threads: int | None = None, gpu_layers: str | int = 0, limits: Limits = Limits(),
          cors_origins: list[str] | None = None, on_ready: Callable[[str], None] = lambda url: None) -> None:
    """Load the model once, open `parallel` slots on it, and serve until interrupted."""
    import uvicorn

    from .engine import Model
    from .runtime import gpu_layers as resolve_gpu_layers

    model = Model(model_path, resolve_gpu_layers(gpu_layers, model_path))
    runtimes = [Runtime(model, n_ctx=n_ctx, threads=threads) for _ in range(parallel)]
    for rt in runtimes:
        rt.warmup()
    try:
        app = create_app(runtimes, model_path.name, api_key, limits, cors_origins)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        on_ready(f"http://{host}:{port}")
        server.run()
    finally:
        for rt in runtimes:
            rt.close()
        model.close()
