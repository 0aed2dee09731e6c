"""What the engine hands out: a `Handle` for each submitted task (cancel it, wait for it, its text
streamed to a callback) and `Stats`, the counters /health and /metrics read."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import RefactGGUFError
from .tasks import Completion, OnText, Task

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds, for /metrics


class Handle:
    """A submitted task: `cancel()` it, `wait()` for its Completion. Callbacks run on the
    engine thread: `on_text` with each piece of text that is final, `on_done` once at the end."""

    def __init__(self, task: Task, on_text: OnText | None, on_done: Callable[[Handle], None] | None):
        self.task, self._on_text, self.on_done = task, on_text, on_done
        self.on_text = self._text if on_text is not None else None
        self.completion: Completion | None = None
        self.error: RefactGGUFError | None = None
        self.cancelled = False
        self.background = False  # a prompt evaluated for later keystrokes, with nobody waiting
        self._done = threading.Event()

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError("the task did not finish in time")
        if self.error is not None:
            raise self.error
        return self.completion

    def _text(self, text: str) -> None:
        try:
            self._on_text(text)
        except Exception:  # noqa: BLE001 - the consumer is gone (e.g. its event loop closed): stop its task
            self.cancelled = True

    def _finish(self, completion: Completion | None = None, error: RefactGGUFError | None = None) -> None:
        self.completion, self.error = completion, error
        self._done.set()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # noqa: BLE001 - a consumer's failure must not stop the engine thread
                pass


@dataclass
class Stats:
    """Counters since start, for /health and /metrics."""

    requests: int = 0
    errors: int = 0
    tokens_evaluated: int = 0
    tokens_predicted: int = 0
    steps: int = 0
    batch_tokens: int = 0  # tokens decoded, over all steps
    fillers: int = 0  # of those, fillers for idle slots between busy ones
    decode_s: float = 0.0  # in llama_decode
    step_s: float = 0.0  # in whole steps (decode + picking, stopping, streaming)
    cache_saves: int = 0  # slot caches saved to the prompt cache
    cache_restores: int = 0  # saved caches restored into a slot
    short_answers: int = 0  # requests answered from the lines around the cursor, their full prompt being late
    background_tokens: int = 0  # prompt tokens evaluated in the background
    cache_refused: int = 0  # saved states llama.cpp would not restore, or restored wrong (dropped)
    background_stopped: int = 0  # background steps given up for a person's request
    draft_tokens: int = 0  # tokens drafted from a request's own context (--draft)
    draft_accepted: int = 0  # of those, what greedy decoding would have generated: kept
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # per bucket, +Inf last
    latency_sum_s: float = 0.0
    started: float = field(default_factory=time.time)

    def count_step(self, tokens: int, decode_s: float, step_s: float) -> None:
        self.steps += 1
        self.batch_tokens += tokens
        self.decode_s += decode_s
        self.step_s += step_s
