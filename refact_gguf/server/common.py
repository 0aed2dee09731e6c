"""What every API's routes share: the service they serve with, the bridge from the event loop
to the engine (submit, wait or stream, cancel when the client goes away), and errors by type."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, model_validator

from .. import catalog, tasks
from ..engine import Engine
from ..fim import Cuts
from ..handles import Handle
from ..llama import Model
from ..errors import BusyError, InputError, RefactGGUFError
from ..tasks import Completion, Task


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20
    max_predict: int = 1024
    max_queue: int = 16
    body_timeout_s: float = 30.0  # a request body that stops arriving frees its connection after this
    prompt_budget_ms: int = 1000  # for FIM requests that bring no t_max_prompt_ms (0: always the full prompt)
    fim_context: int = field(default_factory=lambda: catalog.load().model.fim_context)  # a FIM prompt + answer, tokens


@dataclass(frozen=True)
class Service:
    """What the routes serve with (kept on `app.state.service`)."""

    engine: Engine
    model_name: str
    limits: Limits
    fidelity: str = "unknown"  # faithful-converted | faithful-repaired | as-published (loader.GGUFInfo)
    cuts: Cuts = field(default_factory=Cuts)  # each file's FIM context as last cut, for its next keystroke

    # What routes know of the model and the engine: these facts, not walks through them.
    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def vocab(self) -> Model:
        """For tokenizing and detokenizing (its tokenize, piece, detokenize and n_vocab)."""
        return self.engine.model

    @property
    def model_path(self) -> Path:
        return self.engine.model.path

    @property
    def n_params(self) -> int:
        return self.engine.model.n_params

    @property
    def on_gpu(self) -> bool:
        return self.engine.model.n_gpu_layers > 0

    @property
    def n_slots(self) -> int:
        return len(self.engine.slots)

    def tokenize(self, text: str) -> list[int]:
        return self.engine.model.tokenize_cached(text)

    def fim(self, prefix: str, suffix: str, start: float, budget_ms: int | None = None, cache: bool = True,
            **options) -> Task:
        """tasks.fim for this engine. When its cache holds too little of the prompt to have it in
        `budget_ms` after `start` (default: the server's budget; 0: no limit), the engine answers
        from the lines around the cursor and evaluates the whole file in the background."""
        budget_ms = self.limits.prompt_budget_ms if budget_ms is None else budget_ms
        shortens = budget_ms > 0 and cache and self.engine.answers_short
        task = tasks.fim(self.tokenize, min(self.limits.fim_context, self.engine.n_ctx), prefix, suffix,
                         shortens=shortens, cuts=self.cuts, **options)
        task.prompt_budget = start + budget_ms / 1e3 if shortens else None
        return task

    def tokenize_special(self, text: str) -> list[int]:
        """Special tokens parsed: for prompts a client laid out itself (its own FIM markers)."""
        return self.engine.model.tokenize(text, special=True)

    def complete(self, text: str, markers: bool = False, **options) -> Task:
        """tasks.complete for this engine; `markers`: Refact's FIM markers in `text` are the special
        tokens (a prompt the client laid out itself)."""
        return tasks.complete(self.tokenize, self.n_ctx, text, specials=self.tokenize_special if markers else None, **options)

    def chat(self, messages, **options) -> Task:
        """tasks.chat for this engine."""
        return tasks.chat(self.tokenize, self.n_ctx, messages, **options)


def _valid_text(value):
    """`value` with lone surrogates ("\\ud800" is valid JSON, not valid text) replaced by U+FFFD,
    in strings at any depth: a field echoed in a response would otherwise fail to encode (500)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_valid_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _valid_text(v) for k, v in value.items()}
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # accept and ignore what we do not implement

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data):
        return _valid_text(data)


# Fields that constrain or restructure the answer (grammars, JSON output, a required tool call):
# silently ignoring them would hand back an answer of another shape than the one asked for.
CONSTRAINTS = ("grammar", "json_schema", "response_format", "tool_choice", "tools", "functions", "format")


class _Request(_Body):
    """A request's top level: refuses, by name, what this server cannot honour."""

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            # Tools offered but not required (agents such as Continue's offer them on every turn): a
            # plain-text answer is one the caller accepts, as from a model that chose not to call any.
            optional = data.get("tool_choice", data.get("function_call")) in (None, "auto", "none")
            for name in CONSTRAINTS:
                value = data.get(name)
                if value in (None, "", [], {}) or (name == "response_format" and value == {"type": "text"}):
                    continue
                if optional and name in ("tools", "functions", "tool_choice"):
                    continue
                raise InputError(f"{name}: not supported by this server (it generates plain text)", "leave it out")
        return data


def error_body(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status_code=status)


def error_status(e: RefactGGUFError) -> tuple[int, str]:
    """HTTP status and OpenAI error type of a library error, by its type."""
    if isinstance(e, BusyError):
        return 503, "unavailable_error"
    if isinstance(e, InputError):
        return 400, "invalid_request_error"
    return 500, "server_error"  # llama.cpp's own failure, or ours: never the client's fault


class _Submitted:
    """A task on the engine, seen from the event loop: its text pieces and its end, as a queue.
    Made on the loop; `submit` runs where the task is built, off the loop: the engine starts on it
    while the loop is still busy with the build's return (from the loop, the engine thread waited
    ~0.8 ms a request on two CPU cores for the loop to hand the task over and let go of the GIL)."""

    _END = object()

    def __init__(self, stream: bool):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stream = stream
        self.handle: Handle | None = None
        self.abandoned = False  # the request went away while its task was being built

    def submit(self, engine: Engine, task: Task) -> None:
        """Any thread: the task to the engine (BusyError when its queue is full)."""
        loop, put = self.loop, self.queue.put_nowait
        self.handle = engine.submit(
            task,
            on_text=(lambda text: loop.call_soon_threadsafe(put, text)) if self.stream else None,
            on_done=lambda h: loop.call_soon_threadsafe(put, self._END),
        )
        if self.abandoned:
            self.handle.cancel()

    def abandon(self) -> None:
        """From the loop: the task, submitted or yet to be, is cancelled."""
        self.abandoned = True
        if self.handle is not None:
            self.handle.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        while (item := await self.queue.get()) is not self._END:
            yield item

    def result(self) -> Completion:
        return self.handle.wait(0)


async def _submit(request: Request, build: Callable[[], Task], stream: bool) -> _Submitted:
    """Build the task and submit it, off the loop."""
    engine: Engine = request.app.state.service.engine
    submitted = _Submitted(stream)
    try:
        await asyncio.to_thread(lambda: submitted.submit(engine, build()))
    except asyncio.CancelledError:  # the thread goes on: what it submits ends at once
        submitted.abandon()
        raise
    return submitted


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(request: Request, build: Callable[[], Task]) -> Completion:
    """Build the task off the loop, run it, cancel it if the client goes away first."""
    submitted = await _submit(request, build, stream=False)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    drain = asyncio.ensure_future(submitted.queue.get())
    try:
        await asyncio.wait({drain, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            submitted.handle.cancel()
            await drain
    finally:
        watcher.cancel()
    completion = request.state.completion = submitted.result()  # for the request log
    return completion


async def stream(request: Request, build: Callable[[], Task], chunk: Callable[[str], dict],
                 final: Callable[[Completion], list[dict]], done_marker: bool = False,
                 ndjson: bool = False) -> StreamingResponse:
    """Server-sent events (or, `ndjson`, a JSON object a line, as Ollama streams): a chunk per
    piece of final text, then the closing event(s). A client that goes away makes Starlette close
    the generator; `finally` cancels the task."""
    submitted = await _submit(request, build, stream=True)  # queue full: 503 before the stream opens

    def frame(event: dict) -> str:
        return json.dumps(event) + "\n" if ndjson else f"data: {json.dumps(event)}\n\n"

    async def events():
        try:
            async for text in submitted.pieces():
                yield frame(chunk(text))
            try:
                completion = request.state.completion = submitted.result()
            except RefactGGUFError as e:
                status, kind = error_status(e)
                yield frame({"error": str(e)} if ndjson else {"error": {"code": status, "message": str(e), "type": kind}})
                return
            for event in final(completion):
                yield frame(event)
            if done_marker:
                yield "data: [DONE]\n\n"
        finally:
            submitted.handle.cancel()  # a no-op once it has finished

    return StreamingResponse(events(), media_type="application/x-ndjson" if ndjson else "text/event-stream")


def check_predict(service: Service, n: int) -> int:
    if n > service.limits.max_predict:
        raise InputError(f"n_predict/max_tokens {n} is over this server's limit of {service.limits.max_predict}")
    return n


def predict_limit(service: Service, asked: int | None, default: int) -> int:
    """Tokens to generate: `default` when the request asks nothing, the server's limit when it asks
    for a negative count (Ollama's -1/-2, llama.vscode's -1: as many as allowed), else what it asks."""
    if asked is None:
        return check_predict(service, default)
    return service.limits.max_predict if asked < 0 else check_predict(service, asked)
