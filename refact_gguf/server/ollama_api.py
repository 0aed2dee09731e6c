"""Ollama's API, as Continue, twinny and other Ollama clients use it: `POST /api/generate` (a
`suffix` makes it fill-in-the-middle, through the same engine and stop rules as /infill),
`POST /api/chat`, `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`.

One model is served whatever `model` a request names. Streams are NDJSON (Ollama's default is to
stream); durations are nanoseconds; `prompt_eval_count` counts the prompt tokens evaluated for
this request (cached ones not), as Ollama reports them.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from ..chat import Message
from ..tasks import Completion, Sampling, Task
from .common import _Request, Service, _Body, complete, predict_limit, stream

router = APIRouter()

OLLAMA_VERSION = "0.12.0"  # the Ollama API this server speaks, for clients that check
# What /api/show reports: Ollama clients (Continue) offer fill-in-the-middle when the template
# uses `.Suffix`. Refact's own order, SPM; the server lays prompts out itself either way.
TEMPLATE = ("{{- if .Suffix }}<fim_suffix>{{ .Suffix }}<fim_prefix>{{ .Prompt }}<fim_middle>"
            "{{- else }}{{ .Prompt }}{{- end }}")


class Options(_Body):
    num_predict: int | None = Field(default=None, ge=-2)  # -1: until the context is full; -2: fill it
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stop: str | list[str] | None = None
    num_ctx: int | None = Field(default=None, ge=1)  # accepted: the server's context is set at start

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, default_temperature: float) -> Sampling:
        given = {"top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}
        return Sampling(temperature=default_temperature if self.temperature is None else self.temperature,
                        **{name: value for name, value in given.items() if value is not None})


class _OllamaRequest(_Request):
    model: str = ""
    stream: bool = True
    options: Options = Field(default_factory=Options)
    keep_alive: str | float | None = None  # accepted: the model stays loaded while the server runs


class GenerateRequest(_OllamaRequest):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = ""


class ChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)


class ShowRequest(_Body):
    model: str = ""


# ------------------------------------------------------------------------------------ shapes


def _size_label(n_params: int) -> str:
    """Ollama's parameter_size: 1.6B for the released model, 86M for a small stand-in."""
    return f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"


@functools.cache
def _model_facts(path: Path, n_ctx: int, n_params: int) -> dict[str, Any]:
    from ..prompt_cache import model_fingerprint

    st = path.stat()
    quant = path.stem.rsplit(".", 1)[-1] if "." in path.stem else "unknown"
    return {
        "size": st.st_size,
        "digest": model_fingerprint(path),  # of name, size, time and header: hashing a GiB per start is not worth it
        "modified_at": datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(),
        "details": {"parent_model": "", "format": "gguf", "family": "refact", "families": ["refact"],
                    "parameter_size": _size_label(n_params), "quantization_level": quant},
        "context_length": n_ctx, "parameter_count": n_params,
    }


def _facts(service: Service) -> dict[str, Any]:
    return _model_facts(service.model_path, service.n_ctx, service.n_params)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _stats(c: Completion) -> dict[str, Any]:
    """Ollama's closing fields: durations in nanoseconds."""
    prompt_ns, eval_ns = int(c.prompt_ms * 1e6), int(c.predicted_ms * 1e6)
    return {"done": True, "done_reason": "length" if c.stop_reason == "max_tokens" else "stop",
            "total_duration": prompt_ns + eval_ns, "load_duration": 0,
            "prompt_eval_count": c.tokens_evaluated, "prompt_eval_duration": prompt_ns,
            "eval_count": c.tokens_predicted, "eval_duration": eval_ns}


# ------------------------------------------------------------------------------------ routes


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
async def tags(request: Request):
    service: Service = request.app.state.service
    facts = _facts(service)
    return {"models": [{"name": service.model_name, "model": service.model_name, "modified_at": facts["modified_at"],
                        "size": facts["size"], "digest": facts["digest"], "details": facts["details"]}]}


@router.get("/api/ps")
async def ps(request: Request):
    service: Service = request.app.state.service
    facts = _facts(service)
    return {"models": [{"name": service.model_name, "model": service.model_name, "size": facts["size"],
                        "digest": facts["digest"], "details": facts["details"], "expires_at": "2100-01-01T00:00:00Z",
                        "size_vram": facts["size"] if service.on_gpu else 0, "context_length": facts["context_length"]}]}


@router.post("/api/show")
async def show(body: ShowRequest, request: Request):
    service: Service = request.app.state.service
    facts = _facts(service)
    return {
        "modelfile": f"FROM {service.model_path}\nTEMPLATE \"\"\"{TEMPLATE}\"\"\"\n",
        # Continue reads num_ctx from here, a `key value` line each
        "parameters": f"num_ctx {facts['context_length']}", "template": TEMPLATE, "details": facts["details"], "modified_at": facts["modified_at"],
        "model_info": {"general.architecture": "refact", "general.parameter_count": facts["parameter_count"],
                       "refact.context_length": facts["context_length"], "refact_gguf.fidelity": service.fidelity},
        "capabilities": ["completion", "insert"],
    }


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request):
    service: Service = request.app.state.service
    if not body.prompt and body.suffix is None:  # clients load a model this way: it is loaded
        return {"model": body.model or service.model_name, "created_at": _now(), "response": "", "done": True,
                "done_reason": "load"}
    options = body.options
    code = body.suffix is not None
    max_tokens = predict_limit(service, options.num_predict, 128)
    start = time.perf_counter()
    sampling = options.sampling(0.0 if code else 0.2)
    text = body.prompt if body.raw or not body.system else f"{body.system}\n\n{body.prompt}"

    def build() -> Task:
        if code:  # the prompt and suffix are code: FIM markers inside them stay text
            return service.fim(text, body.suffix, start, max_tokens=max_tokens, sampling=sampling, stop=options.stops())
        return service.complete(text, markers=body.raw, max_tokens=max_tokens, sampling=sampling, stop=options.stops())

    model = body.model or service.model_name
    if body.stream:
        return await stream(request, build, lambda t: {"model": model, "created_at": _now(), "response": t, "done": False},
                            lambda c: [{"model": model, "created_at": _now(), "response": "", **_stats(c)}], ndjson=True)
    c = await complete(request, build)
    return {"model": model, "created_at": _now(), "response": c.text, **_stats(c)}


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request):
    service: Service = request.app.state.service
    model = body.model or service.model_name
    if not body.messages:  # clients load a model this way: it is loaded
        return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": "load"}
    max_tokens = predict_limit(service, body.options.num_predict, min(512, service.limits.max_predict))
    sampling = body.options.sampling(0.2)
    messages = [Message(m.role, m.content) for m in body.messages]

    def build() -> Task:
        return service.chat(messages, max_tokens=max_tokens, sampling=sampling, stop=body.options.stops())

    if body.stream:
        return await stream(
            request, build,
            lambda t: {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": t}, "done": False},
            lambda c: [{"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""}, **_stats(c)}],
            ndjson=True)
    c = await complete(request, build)
    return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": c.text}, **_stats(c)}
