"""llama.cpp llama-server's API: `POST /infill` (llama.vim, llama.vscode) and `GET /health`."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from .. import tasks
from ..tasks import Completion, Sampling, Task
from .common import Service, _Body, check_predict, complete, stream

# llama-server separates input_extra chunks this way when the vocab has no FIM_SEP token.
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"

router = APIRouter()


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


@router.get("/health")
async def health(request: Request):
    engine = request.app.state.service.engine
    cache = engine.cache
    saved = {"entries": len(cache), "memory_mb": round(cache.memory_used / 2**20, 1)} if cache is not None else None
    return {"status": "ok", **engine.load(), "engine": asdict(engine.stats), "prompt_cache": saved}


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
