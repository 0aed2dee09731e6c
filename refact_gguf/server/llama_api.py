"""llama.cpp llama-server's API: `POST /infill` (llama.vim, llama.vscode), `POST /completion`,
`POST /tokenize`, `POST /detokenize`, `GET /props`, `GET /slots`, `GET /metrics` (Prometheus
text) and `GET|HEAD /health`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any, Callable, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import Field

from .. import __version__, tasks
from ..handles import LATENCY_BUCKETS
from ..errors import InputError
from ..tasks import Completion, Sampling, StopRules, Task
from ..tokens import CHAT_TEMPLATE
from .common import _Request, Service, _Body, check_predict, complete, stream

# llama-server separates input_extra chunks this way when the vocab has no FIM_SEP token.
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"
# /tokenize and /detokenize are bounded: a few megabytes of either held a thread for half a minute.
MAX_TOKENIZE_CHARS = 1 << 20
MAX_DETOKENIZE_IDS = 1 << 18

router = APIRouter()


class ExtraChunk(_Body):
    filename: str = "tmp"
    text: str = ""


class _Generation(_Request):
    """What llama-server's /infill and /completion share."""

    n_predict: int = Field(default=-1, ge=-1)
    t_max_prompt_ms: int = Field(default=-1, ge=-1)
    t_max_predict_ms: int = Field(default=-1, ge=-1)
    cache_prompt: bool = True
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    stream: bool = False
    stop: list[str] = Field(default_factory=list)

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)

    def limit(self, task: Task, start: float) -> Task:
        """The request's cache and time limits on `task` (its short version takes them from it)."""
        task.reuse_cache = self.cache_prompt
        task.prompt_deadline = start + self.t_max_prompt_ms / 1e3 if self.t_max_prompt_ms > 0 else None
        task.deadline = start + self.t_max_predict_ms / 1e3 if self.t_max_predict_ms > 0 else None
        return task


class InfillRequest(_Generation):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: str = ""  # text typed on the cursor's line, before the cursor
    n_indent: int = Field(default=0, ge=0)
    fim_order: Literal["spm", "psm"] = "spm"


class CompletionRequest(_Generation):
    prompt: str | list[int]  # special tokens in a string are parsed, as llama-server does


class TokenizeRequest(_Body):
    content: str = Field(max_length=MAX_TOKENIZE_CHARS)
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_IDS)


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
        **({"draft_n": c.draft_n, "draft_n_accepted": c.draft_accepted} if c.draft_n else {}),
    }


def infill_result(c: Completion, model_name: str, content: str | None = None) -> dict[str, Any]:
    """/infill's and /completion's answer (plain JSON types: routes return it as a JSONResponse,
    skipping FastAPI's jsonable_encoder, ~0.1 ms a keystroke on two CPU cores)."""
    return {
        "content": c.text if content is None else content, "model": model_name, "stop": True,
        "stop_type": {"max_tokens": "limit", "eos": "eos", "special": "eos"}.get(c.stop_reason, "word"),
        "stopping_word": "", "tokens_predicted": c.tokens_predicted, "tokens_evaluated": c.prompt_tokens,
        "tokens_cached": c.tokens_cached, "truncated": c.truncated, "short_context": c.short_context,
        "timings": timings(c),
    }


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request):
    engine = request.app.state.service.engine
    cache = engine.cache
    saved = {"entries": len(cache), "memory_mb": round(cache.memory_used / 2**20, 1),
             "disk": str(cache.directory) if cache.directory is not None else None, "problem": cache.problem,
             "files_rejected": cache.rejected} if cache is not None else None
    return {"status": "ok", **engine.load(), "engine": asdict(engine.stats), "prompt_cache": saved}


def extra_ids(tokenize: Callable[[str], list[int]], chunks: list[str]) -> list[int]:
    """`input_extra`'s chunks (other files' snippets), each after llama-server's separator."""
    return [i for text in chunks for i in tokenize(SNIPPET_SEPARATOR + text)]


@router.post("/infill")
async def infill(body: InfillRequest, request: Request):
    service: Service = request.app.state.service
    n_predict = check_predict(service, body.n_predict if body.n_predict >= 0 else 128)
    start = time.perf_counter()

    def build() -> Task:
        extra = extra_ids(service.tokenize, [c.text for c in body.input_extra])
        task = service.fim(
            body.input_prefix, body.input_suffix, start, body.t_max_prompt_ms if body.t_max_prompt_ms > 0 else None,
            body.cache_prompt, order=body.fim_order, max_tokens=n_predict, sampling=body.sampling(), line=body.prompt,
            extra=extra, indent=body.n_indent or None, stop=tuple(body.stop),
        )
        return body.limit(task, start)

    if body.stream:
        return await stream(request, build, lambda text: {"content": text, "stop": False},
                            lambda c: [infill_result(c, service.model_name, content="")], done_marker=False)
    return JSONResponse(infill_result(await complete(request, build), service.model_name))


@router.post("/completion")
async def completion(body: CompletionRequest, request: Request):
    service: Service = request.app.state.service
    n_predict = check_predict(service, body.n_predict if body.n_predict >= 0 else 128)
    start = time.perf_counter()

    def build() -> Task:
        if isinstance(body.prompt, list):
            bad = [t for t in body.prompt if not 0 <= t < service.vocab.n_vocab]
            if bad:
                raise InputError(f"prompt: token id {bad[0]} is not in the vocabulary of {service.vocab.n_vocab}")
            if len(body.prompt) >= service.n_ctx:
                raise InputError(f"the prompt has {len(body.prompt)} tokens; the context holds {service.n_ctx}")
            task = Task(list(body.prompt), n_predict, body.sampling(), StopRules(tuple(body.stop)))
        else:
            task = tasks.complete(service.tokenize_special, service.n_ctx, body.prompt, max_tokens=n_predict,
                                  sampling=body.sampling(), stop=tuple(body.stop))
        return body.limit(task, start)

    if body.stream:
        return await stream(request, build, lambda text: {"content": text, "stop": False},
                            lambda c: [infill_result(c, service.model_name, content="")])
    return JSONResponse(infill_result(await complete(request, build), service.model_name))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    model = request.app.state.service.vocab

    def run():  # off the event loop: every other route, /health included, goes on meanwhile
        ids = model.tokenize(body.content, body.parse_special)
        if body.with_pieces:
            return [{"id": t, "piece": model.piece(t, special=True).decode("utf-8", errors="replace")} for t in ids]
        return ids

    return {"tokens": await asyncio.to_thread(run)}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    model = request.app.state.service.vocab
    if any(not 0 <= t < model.n_vocab for t in body.tokens):
        raise InputError(f"tokens: ids must be in [0, {model.n_vocab})")
    return {"content": await asyncio.to_thread(model.detokenize, body.tokens, True)}


@router.get("/props")
async def props(request: Request):
    service: Service = request.app.state.service
    return {
        "default_generation_settings": {"n_ctx": service.n_ctx, "model": service.model_name,
                                        "params": {"n_predict": -1, "temperature": 0.0, "top_k": 40, "top_p": 0.95}},
        "total_slots": service.n_slots, "model_path": str(service.model_path), "chat_template": CHAT_TEMPLATE,
        "build_info": f"refact-gguf {__version__}", "fidelity": service.fidelity,
    }


@router.get("/slots")
async def slots(request: Request):
    return request.app.state.service.engine.slots_state()


@router.get("/metrics")
async def metrics(request: Request):
    engine = request.app.state.service.engine
    stats, load = engine.stats, engine.load()
    lines = []

    def metric(name: str, kind: str, help: str, value) -> None:
        lines.extend([f"# HELP refact_gguf_{name} {help}", f"# TYPE refact_gguf_{name} {kind}", f"refact_gguf_{name} {value}"])

    metric("requests_total", "counter", "Requests submitted to the engine.", stats.requests)
    metric("errors_total", "counter", "Requests that ended in an error.", stats.errors)
    metric("prompt_tokens_total", "counter", "Prompt tokens evaluated (cached ones not).", stats.tokens_evaluated)
    metric("tokens_predicted_total", "counter", "Tokens generated.", stats.tokens_predicted)
    metric("short_answers_total", "counter", "Requests answered from the lines around the cursor.", stats.short_answers)
    metric("background_tokens_total", "counter", "Prompt tokens evaluated in the background.", stats.background_tokens)
    metric("draft_tokens_total", "counter", "Tokens drafted from requests' own context (--draft).", stats.draft_tokens)
    metric("draft_accepted_total", "counter", "Drafted tokens kept: greedy decoding picked them too.", stats.draft_accepted)
    metric("requests_waiting", "gauge", "Requests waiting for a slot.", load["waiting"])
    metric("slots_busy", "gauge", "Slots running a request or background work.", load["busy"])
    metric("slots", "gauge", "Slots (sequences) of the engine.", load["slots"])
    lines += ["# HELP refact_gguf_request_seconds Time from a request's start in a slot to its end.",
              "# TYPE refact_gguf_request_seconds histogram"]
    total = 0
    for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), stats.latency_counts):
        total += count
        lines.append(f'refact_gguf_request_seconds_bucket{{le="{bound}"}} {total}')
    lines += [f"refact_gguf_request_seconds_sum {stats.latency_sum_s:.6f}", f"refact_gguf_request_seconds_count {total}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
