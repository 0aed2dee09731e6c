"""OpenAI's API: `GET /v1/models`, `POST /v1/completions` (a `suffix` makes it fill-in-the-middle)
and `POST /v1/chat/completions`."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field

from ..chat import Message
from ..errors import InputError
from ..tasks import Completion, Sampling, Task
from .common import _Request, Service, _Body, complete, predict_limit, stream

router = APIRouter()


class _OpenAIRequest(_Request):
    """The fields OpenAI's completion and chat requests share."""

    model: str | None = None
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    # None or -1 (llama.vscode): as many as the server allows; `max_completion_tokens` is the newer name
    max_tokens: int | None = Field(default=None, ge=-1)
    max_completion_tokens: int | None = Field(default=None, ge=-1)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self) -> Sampling:
        """The request's sampling (`temperature`: each kind of request has its own default)."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def limit(self, service: Service, default: int) -> int:
        """The tokens to generate: what the request asks (0 is refused), else `default`."""
        asked = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if asked == 0:
            raise InputError("max_tokens: must be at least 1 (or -1 for as many as the server allows)")
        return predict_limit(service, asked, default)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = ""
    suffix: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    echo: bool = False
    logprobs: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = ""

    def message(self) -> Message:
        """`developer` is the newer name of `system`; text parts are joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message("system" if self.role == "developer" else self.role, text)


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(default=0.2, ge=0.0, le=5.0)
    logprobs: bool = False


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.tokens_predicted,
            "total_tokens": c.prompt_tokens + c.tokens_predicted}


def finish_reason(c: Completion) -> str:
    return "length" if c.stop_reason == "max_tokens" else "stop"


@router.get("/v1/models")
async def models(request: Request):
    service = request.app.state.service
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0, "owned_by": "refact-gguf",
                                        "fidelity": service.fidelity}]}


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
    if body.echo or body.logprobs:
        raise InputError(f"{'echo' if body.echo else 'logprobs'}: not supported by this server", "leave it out")
    max_tokens = body.limit(service, 16)
    start = time.perf_counter()
    sampling = body.sampling()

    def build() -> Task:
        if body.suffix is not None:
            return service.fim(text, body.suffix, start, max_tokens=max_tokens, sampling=sampling, stop=body.stops())
        return service.complete(text, markers=True, max_tokens=max_tokens, sampling=sampling, stop=body.stops())

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
    if body.logprobs:
        raise InputError("logprobs: not supported by this server", "leave it out")
    max_tokens = body.limit(service, min(512, service.limits.max_predict))
    messages = [m.message() for m in body.messages]
    sampling = body.sampling()

    def build() -> Task:
        return service.chat(messages, max_tokens=max_tokens, sampling=sampling, stop=body.stops())

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
