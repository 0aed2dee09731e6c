"""One sequence: a `Slot` runs tasks on one sequence of a context, reusing what its KV cache
holds; a `Runtime` drives one slot synchronously for `run`, `chat`, `bench` and `eval`.

The engine (`engine.py`) drives many slots on one context in batched steps; both drive the same
`Slot`, so cache reuse, sampling, stopping and timings are one code path.
"""

from __future__ import annotations

import codecs
import time

import numpy as np

from . import catalog, tasks
from .cores import FreeCores
from .errors import InputError
from .layout import REUSE_CHUNK, common_prefix, reuse_plan
from .llama import Context, Model, Sampler
from .tasks import Completion, OnText, Task

class Slot:
    """One sequence of a context: the ids its KV cache holds, and the task it runs.

    A task's life: `start` (reuse the cache, plan the prompt), `prompt_done` after each chunk of
    `todo` is decoded, then per generated token `pick` + `accept` (the driver decodes
    `next_token` at `pos` in between), until `accept` or the driver calls `finish`.
    """

    def __init__(self, ctx: Context, seq: int):
        self.ctx, self.seq, self.model = ctx, seq, ctx.model
        self.cached = np.zeros(ctx.n_ctx, np.int32)  # ids in the KV cache, positions 0..n_cached-1
        self.n_cached = 0
        self.last_used = 0.0
        self.edits = 0  # changes to the cache, counted: a save records the count it saw
        self.saved_edits = 0
        self._sampler: Sampler | None = None
        # The task under way (set by `start`, cleared by `finish` and `release`).
        self.task: Task | None = None
        self.on_text: OnText | None = None
        self.t_start = 0.0
        self.t_prompt: float | None = None  # when its prompt was all in
        self.reused = 0  # prompt tokens the cache already held
        self.todo = np.zeros(0, np.int32)  # prompt tokens still to evaluate
        self.evaluated = 0
        self.prompt_len = 0
        self.max_tokens = 0
        self.n_predicted = 0
        self.sent = 0  # characters of text handed to on_text
        self.next_token: int | None = None  # the last token picked, decoded next
        self.drafted = 0  # tokens drafted for this task (Engine(draft=…)), of those kept, in how many steps
        self.kept = 0
        self.draft_steps = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops: frozenset[int] = frozenset()
        self.greedy = True

    @property
    def busy(self) -> bool:
        return self.task is not None

    @property
    def unsaved(self) -> bool:
        """The cache holds enough to be worth keeping and changed since it was last saved."""
        return self.n_cached >= REUSE_CHUNK and self.edits != self.saved_edits

    def clear(self) -> None:
        self.ctx.seq_keep(self.seq, 0)
        self.n_cached = 0
        self.edits += 1

    def holds(self, tokens: np.ndarray) -> None:
        """The KV cache now holds `tokens` (a saved state was restored into it)."""
        self.cached[: len(tokens)] = tokens
        self.n_cached = len(tokens)
        self.edits += 1
        self.saved_edits = self.edits  # it came from the cache: saved already

    def common_prefix(self, prompt: np.ndarray) -> int:
        return common_prefix(self.cached[: self.n_cached], prompt)

    def reserve(self, task: Task) -> None:
        """Hold the slot for `task` (busy from now on) until it starts here."""
        self.task = task

    def release(self) -> None:
        """Let go of the task without finishing it (it failed, or moves elsewhere); the cache stays."""
        self.task = self.on_text = None

    def silence(self) -> None:
        """The task goes on with no one to hear it and nothing to generate: its prompt only."""
        self.on_text, self.max_tokens = None, 0

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None

    # ------------------------------------------------------------------ a task's life

    def start(self, task: Task, on_text: OnText | None = None) -> None:
        """Take `task`: keep what the cache shares with its prompt, plan the rest (`todo`)."""
        prompt = task.ids
        if len(prompt) > self.ctx.n_ctx:
            raise InputError(f"the prompt has {len(prompt)} tokens; the context holds {self.ctx.n_ctx}", "raise --ctx")
        if not task.reuse_cache:
            self.clear()
        self.t_start = time.perf_counter()
        self.task, self.on_text = task, on_text
        self.reused = self._reuse(prompt)
        self.todo = prompt[self.n_cached :]
        self.evaluated = 0
        self.prompt_len = len(prompt)
        self.max_tokens = max(0, min(task.max_tokens, self.ctx.n_ctx - len(prompt)))
        self.n_predicted, self.sent = 0, 0
        self.drafted = self.kept = self.draft_steps = 0
        self.next_token: int | None = None
        self.t_prompt = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = self.model.stop_tokens | task.stop_ids
        self.greedy = task.sampling.greedy
        if not self.greedy:
            if self._sampler is not None and self._sampler.sampling == task.sampling:
                self._sampler.reset()
            else:
                self.close()
                self._sampler = Sampler(task.sampling)

    @property
    def pos(self) -> int:
        """The position of the next token to decode."""
        return self.n_cached

    @property
    def generating(self) -> bool:
        return self.task is not None and self.t_prompt is not None

    def reusable(self, prompt: np.ndarray) -> int:
        """How many of `prompt`'s tokens `start` would keep from the cache (nothing changes)."""
        return reuse_plan(self.cached[: self.n_cached], prompt)[0]

    def _reuse(self, prompt: np.ndarray) -> int:
        """Bring the cache as close to `prompt` as `reuse_plan` allows, without evaluating;
        returns the count of prompt tokens it reused."""
        head, moves = reuse_plan(self.cached[: self.n_cached], prompt)
        for src, dst, n in moves:
            self.ctx.seq_remove(self.seq, dst, src)
            self.ctx.seq_shift(self.seq, src, src + n, dst - src)
        self.ctx.seq_keep(self.seq, head)  # whatever was not kept or shifted back
        if head != self.n_cached:
            self.edits += 1
        self.cached[:head] = prompt[:head]
        self.n_cached = head
        return head

    def prompt_overdue(self, now: float) -> bool:
        """The task's prompt deadline passed before its prompt was in (at least one chunk is)."""
        deadline = self.task.prompt_deadline
        return deadline is not None and self.t_prompt is None and self.evaluated > 0 and now > deadline

    def prompt_done(self, n: int) -> None:
        """The next `n` tokens of `todo` were decoded at `pos`."""
        self.cached[self.n_cached : self.n_cached + n] = self.todo[:n]
        self.n_cached += n
        self.edits += 1
        self.evaluated += n
        self.todo = self.todo[n:]
        if not len(self.todo):
            self.t_prompt = time.perf_counter()

    def token_done(self) -> None:
        """`next_token` was decoded at `pos`."""
        self.cached[self.n_cached] = self.next_token
        self.n_cached += 1
        self.edits += 1

    def pick(self, row: int) -> int:
        """A token from the logits of batch row `row` (sampled requests; greedy ones are picked
        by the driver, an argmax over all rows at once)."""
        return self._sampler.sample(self.ctx, row)

    def accept(self, token: int) -> Completion | None:
        """Take a generated token; the Completion when the task is finished."""
        if token in self.stops:
            return self.finish("eos" if self.model.is_eog(token) else "special")
        self.n_predicted += 1
        rules = self.task.rules
        stopped = rules.feed(self.decoder.decode(self.model.piece(token)))
        self._emit(rules.safe())
        if stopped:
            return self.finish(rules.stopped)
        if self.n_predicted >= self.max_tokens:
            return self.finish("max_tokens")
        if self.task.deadline is not None and time.perf_counter() > self.task.deadline:
            return self.finish("time")
        self.next_token = token
        return None

    def finish(self, reason: str) -> Completion:
        """End the task (for `reason`) and free the slot; the cache stays for the next one."""
        task, rules = self.task, self.task.rules
        now = time.perf_counter()
        if self.t_prompt is None:  # ended before its prompt was in: no text
            self.t_prompt = now
        else:
            rules.feed(self.decoder.decode(b"", final=True))
        text = rules.final()
        self._emit(text)
        done = Completion(
            text, rules.stopped or reason, self.prompt_len, self.reused, self.evaluated, self.n_predicted,
            (self.t_prompt - self.t_start) * 1e3, (now - self.t_prompt) * 1e3, task.truncated, list(task.notes),
            task.short_context, self.drafted, self.kept,
        )
        self.task = self.on_text = None
        self.last_used = now
        return done

    def _emit(self, text: str) -> None:
        if self.on_text is not None and len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)


class Runtime:
    """One slot on a context of a loaded model (`select.open_model`), driven synchronously."""

    def __init__(self, model: Model, n_ctx: int = 4096, threads: int | None = None):
        self.model = model
        self.ctx = Context(self.model, n_ctx=n_ctx, threads=threads)
        self._cores = FreeCores(self.ctx.threads) if threads is None else None  # None: as many as are free
        self.n_ctx = self.ctx.n_ctx
        self.slot = Slot(self.ctx, 0)

    def close(self) -> None:
        self.slot.close()
        self.ctx.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str) -> list[int]:
        """Text → ids (specials not parsed). Recent texts are remembered: between keystrokes an
        editor resends the same prefix and suffix, and re-tokenizing a whole file costs more
        than the few tokens the keystroke adds."""
        return self.model.tokenize_cached(text)

    def restore(self, state: bytearray | None = None, tokens: list[int] | None = None) -> None:
        """The cache holds `tokens` again, from their saved `state`; with neither, nothing."""
        self.slot.clear()
        if state is not None and tokens:
            self.ctx.seq_restore(self.slot.seq, state, len(tokens))
            self.slot.holds(np.asarray(tokens, np.int32))

    def logits_of(self, tokens: list[int]) -> np.ndarray:
        """The logits at every position of `tokens`, evaluated from an empty cache (which then holds them)."""
        self.slot.clear()
        self.ctx.reset()
        logits = self.ctx.eval(tokens, all_logits=True)
        self.slot.holds(np.asarray(tokens, np.int32))
        return logits

    def run(self, task: Task, on_text: OnText | None = None) -> Completion:
        """Prefill (reusing the cache), then generate until the task's rules or its limits end it."""
        slot, ctx, batch = self.slot, self.ctx, self.ctx.batch
        if self._cores is not None and (free := self._cores.poll()) not in (None, ctx.threads):
            ctx.set_threads(free)
        slot.start(task, on_text)
        while len(slot.todo):
            if slot.prompt_overdue(time.perf_counter()):
                return slot.finish("time")
            chunk = slot.todo[: ctx.n_batch]
            batch.clear()
            batch.add(slot.seq, chunk, slot.pos, output_last=len(chunk) == len(slot.todo))
            ctx.run(batch)
            slot.prompt_done(len(chunk))
        if slot.max_tokens == 0:
            return slot.finish("max_tokens")
        # Greedy needs no sampler: an argmax over a view of the logits is ~10× cheaper per token
        # than llama.cpp's sampler, which first copies every logit into a candidate array.
        row = batch.n - 1
        while True:
            token = int(ctx.logits_last().argmax()) if slot.greedy else slot.pick(row)
            done = slot.accept(token)
            if done is not None:
                return done
            batch.one(slot.seq, slot.next_token, slot.pos)
            row = 0
            ctx.run(batch)
            slot.token_done()

    def fim(self, prefix: str, suffix: str = "", on_text: OnText | None = None, **options) -> Completion:
        """Fill in between `prefix` and `suffix` in at most the model's FIM context; `options` are those of `tasks.fim`."""
        budget = min(catalog.load().model.fim_context, self.n_ctx)
        return self.run(tasks.fim(self.tokenize, budget, prefix, suffix, **options), on_text)

    def complete(self, text: str, on_text: OnText | None = None, **options) -> Completion:
        """Plain continuation of `text`; `options` are those of `tasks.complete`."""
        return self.run(tasks.complete(self.tokenize, self.n_ctx, text, **options), on_text)

    def chat(self, messages, on_text: OnText | None = None, **options) -> Completion:
        """The assistant's reply; `options` are those of `tasks.chat`."""
        return self.run(tasks.chat(self.tokenize, self.n_ctx, messages, **options), on_text)
