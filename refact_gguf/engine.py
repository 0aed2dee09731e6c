"""Continuous batching: one context, many sequences, one engine thread.

The engine owns a llama.cpp context with `parallel` sequences (a KV stream each) and a `Slot` per
sequence. Each step gathers the next token of every generating slot plus prompt chunks of newly
admitted tasks, up to `n_batch` tokens, runs one `llama_decode`, then picks every slot's token from
its own logits row, applies that task's stop rules and streams its text. Tasks enter and leave
between steps; a cancelled one leaves at the next step. Nothing else touches the context, so a
client that goes away can never race a decode.

Admission: a waiting task goes to the idle slot whose cache shares the longest prefix of its
prompt ids (the same file, one keystroke later), else to the least recently used slot. With a
`PromptCache`, `SlotStates` saves a slot's cache before another file overwrites it and restores a
saved state only where that pays (slot_states.py); when the engine idles, states reach the disk.

Cold files: a request whose prompt cannot be in by its budget (its own tokens and those queued
ahead, at the measured rate) is answered from the lines around the cursor on a scratch sequence
of its own, while its full prompt stays in the person's slot and is evaluated as background work
that takes a share of every step; the next keystroke in that file takes the slot over, with all
the background progress in it. So under steady typing every file reaches its full context.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from . import layout
from .cores import FreeCores
from .drafting import Drafter
from .errors import BusyError, InputError, RefactGGUFError
from .handles import LATENCY_BUCKETS, Handle, Stats
from .llama import Context, Model
from .layout import REUSE_CHUNK
from .prompt_cache import PromptCache
from .slot_states import SlotStates
from .runtime import Slot
from .tasks import Completion, OnText, Task


SNAPSHOT_AFTER_S = 2.0  # idle this long: write the slots' caches to disk
# A step of background prefill nobody waits on lasts about this long, and holds at least 32 tokens
# (~0.7 s with the full-size model on two CPU cores): a request arriving gives it up, losing it (at
# 1 s, a person pausing a second between keystrokes lost nearly every one). llama.cpp's CUDA backend
# ignores the abort callback (only its CPU and Metal backends take one): on a GPU such a step is one
# ubatch at most (layout.plan), 512 tokens, ~35 ms on an H100, the longest a request waits behind it.
BACKGROUND_STEP_S = 0.25
# Background prefill in a step people wait on: about this long (at the measured prompt rate, at least
# a token, at most a ubatch). A GPU's step takes its ubatch; two CPU cores with the full-size model,
# one token: a ubatch there is ~10 s, which every generated token of a short answer would wait for.
BACKGROUND_BESIDE_PEOPLE_S = 0.03
MAX_BACKGROUND = 8  # files whose full prompt waits to be evaluated in the background
SHORT_SHARE = 0.6  # of a prompt budget, what a short prompt may take (the rest: slack, and the first tokens)
# A file answered short this long waits for its full prompt on its next keystroke, if what is left
# of it goes in within WAIT_FOR_FULL_S (else short answers go on, beside its background share).
# Eight files opened together on two CPU cores: their first answers take ~1.5 s, so at 2 s every
# file's next keystroke was answered short again, behind the others' chunks (warm p50 619-777 ms
# against 514-594 at 1 s; llama-server 634-656).
SHORT_FOR_AT_MOST_S = 1.0
WAIT_FOR_FULL_S = 2.0


class Engine:
    """`submit` tasks from any thread; the engine thread runs them, batched."""

    def __init__(self, model: Model, n_ctx: int = 4096, parallel: int = 1, threads: int | None = None,
                 n_batch: int = 512, max_queue: int = 16, full_batches: bool | None = None,
                 cache: PromptCache | None = None, draft: int = 0):
        # Short answers need a cache to keep the full prompt's progress; half as many sequences for
        # them as people, so one person's first answer does not queue behind another's.
        n_scratch = max(1, parallel // 2) if cache is not None else 0
        if parallel + n_scratch > n_batch:
            raise InputError(f"--parallel {parallel} is more than a batch of {n_batch} tokens can serve")
        self.model = model
        # Drafting (a lone greedy request, drafting.py) keeps the greedy text only as far as a verify
        # step's logits equal one-token steps': on CUDA rows of 2+ take other kernels (llama.cpp#27407),
        # and there the stand-in's text changed for every k, with nothing gained: not on a GPU.
        self.drafter = Drafter(draft) if draft and not model.n_gpu_layers else None
        self.ctx = Context(model, n_ctx=n_ctx, n_batch=n_batch, threads=threads, n_seq_max=parallel + n_scratch)
        self._cores = FreeCores(self.ctx.threads) if threads is None else None  # None: as many as are free
        self.n_ctx = self.ctx.n_ctx
        self.slots = [Slot(self.ctx, seq) for seq in range(parallel)]  # one a person at a time
        # Short answers run here, so a cold file's full prompt keeps its slot and its progress.
        self.scratch = [Slot(self.ctx, seq) for seq in range(parallel, parallel + n_scratch)]
        self._sequences = self.slots + self.scratch  # by sequence id
        self.max_queue = max_queue
        # On a GPU a change of batch shape costs a new compute graph: while several are busy every
        # step decodes one row per person's slot (fillers for idle ones) and reads every row's
        # logits, so llama.cpp reuses its graph from step to step; a lone sequence decodes alone (a
        # second row costs a step ~40%: layout.plan). On a CPU each row costs compute: only the
        # gaps between busy slots are filled.
        self.full_batches = model.n_gpu_layers > 0 if full_batches is None else full_batches
        self.stats = Stats()
        self.states = SlotStates(self.ctx, cache, self.stats) if cache is not None else None
        self._waiting: deque[Handle] = deque()
        self._background: deque[Handle] = deque()  # newest last: served first
        self._active: dict[Slot, Handle] = {}  # in admission order: prompts are filled first come, first served
        self.prompt_rate: float | None = None  # prompt tokens a second, measured
        # Files answered short: their full prompt, since when, and the size of their short prompts
        # (kept, so the next short answer in the file finds the last one's tokens on its scratch sequence).
        self._shortened: list[tuple[np.ndarray, float, int]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread

    @property
    def cache(self) -> PromptCache | None:
        """The store of saved states (None: the engine keeps none, and answers nothing short)."""
        return self.states.cache if self.states is not None else None

    def start(self, warmup: bool = True) -> Engine:
        """Start the engine thread, after one decode so the first request pays no one-time setup
        (weights paged in, GPU kernels loaded), as llama-server warms up at start."""
        if warmup:
            batch = self.ctx.batch
            for n in (1, min(32, batch.capacity), min(32, batch.capacity)):  # the last, warm, measures prompts
                batch.clear()
                batch.add(0, [0] * n, 0, output_last=True)
                t0 = time.perf_counter()
                self.ctx.run(batch)
                self.ctx.synchronize()
                self.prompt_rate = n / (time.perf_counter() - t0)
                self.ctx.seq_keep(0, 0)
        self._thread = threading.Thread(target=self._loop, name="refact-gguf-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, task: Task, on_text: OnText | None = None, on_done: Callable[[Handle], None] | None = None) -> Handle:
        """Queue `task`; BusyError when every slot is busy and `max_queue` tasks already wait."""
        handle = Handle(task, on_text, on_done)
        with self._cond:
            if self._closing:
                raise BusyError("the server is shutting down")
            idle = sum(not s.busy for s in self.slots)
            if len(self._waiting) >= idle + self.max_queue:
                raise BusyError(f"server busy: {len(self._waiting)} requests already waiting", "try again shortly")
            self._waiting.append(handle)
            self.stats.requests += 1
            self._cond.notify()
        return handle

    def run(self, task: Task, on_text: OnText | None = None) -> Completion:
        """Submit and wait (for callers that have a thread to spare)."""
        return self.submit(task, on_text).wait()

    @property
    def answers_short(self) -> bool:
        """Whether a late prompt can be answered short (`Task.short`): only with a cache, which keeps
        the full prompt's progress, and once the prompt rate is measured."""
        return self.prompt_rate is not None and self.cache is not None

    def slots_state(self) -> list[dict]:
        """Each slot as llama-server's /slots shows it (read without a lock: a snapshot for people)."""
        background = {slot for slot, handle in self._active.items() if handle.background}
        return [{"id": s.seq, "n_ctx": self.n_ctx, "is_processing": s.busy, "background": s in background,
                 "n_cached": s.n_cached} for s in self.slots]

    def load(self) -> dict:
        """How busy it is now: slots busy, tasks waiting, prompts waiting for background work."""
        with self._cond:
            return {"slots": len(self.slots), "busy": sum(s.busy for s in self.slots), "waiting": len(self._waiting),
                    "threads": self.ctx.threads,
                    "background": len(self._background) + sum(h.background for h in self._active.values())}

    def cancel_all(self) -> int:
        """Cancel every task waiting or running (a second Ctrl-C); how many there were."""
        with self._cond:
            handles = [*self._waiting, *(h for h in self._active.values() if not h.background)]
        for h in handles:
            h.cancel()
        return len(handles)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        if self.states is not None:
            self.states.close(self.slots)  # background work under way included: a restart goes on from there
        for slot in self._sequences:
            slot.close()
        self.ctx.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                idle = False
                if not (self._closing or self._waiting or self._active or self._background):
                    unsaved = self.states is not None and self.states.pending(self.slots)
                    idle = not self._cond.wait(SNAPSHOT_AFTER_S if unsaved else None)
                if self._closing:
                    for h in [*self._waiting, *self._active.values()]:
                        h._finish(error=BusyError("the server is shutting down"))
                    return
                if self._waiting or self._active or self._background:
                    idle = False  # work came in as the wait ended: it goes first
                elif not idle:
                    continue
            try:
                if idle:
                    if self.states is not None:
                        self.states.snapshot(self.slots)
                    continue
                self.tick()
            except Exception as e:  # noqa: BLE001 - our own bug: fail what is under way, keep serving
                error = _library_error(e)
                with self._cond:
                    handles, self._waiting = [*self._waiting, *self._active.values()], deque()
                for slot in self._sequences:
                    slot.release()
                    slot.clear()
                self._active.clear()
                for h in handles:
                    self.stats.errors += 1
                    h._finish(error=error)

    def tick(self) -> None:
        """Admit what waits, then one step. The engine thread's loop body; tests call it directly
        (on an engine that was not started) to replay an exact interleaving."""
        for _ in range(2):  # again when a request became its short version: it waits for a slot
            self._yield_background()
            with self._cond:
                admitted = self._admit()
            shortened = False
            for slot, handle in admitted:
                try:
                    if self.states is not None:
                        self.states.bring(slot, handle.task, self.prompt_rate)
                    slot.start(handle.task, handle.on_text)
                    self._active[slot] = handle
                    short_tokens, first = self._late(slot, handle.task)
                    if short_tokens:
                        self._answer_short(slot, handle, short_tokens, first)
                        shortened = True
                    elif handle.task.short is not None:  # its full prompt goes in now: no longer a short-answered file
                        self._shortened = [f for f in self._shortened if not layout.same_file(f[0], handle.task.ids)]
                except Exception as e:  # noqa: BLE001 - the engine thread must outlive any one task
                    self._fail(slot, handle, _library_error(e))
            if not shortened:
                break
        if self._cores is not None and (free := self._cores.poll()) not in (None, self.ctx.threads):
            self.ctx.set_threads(free)
        try:
            self.step()
        except Exception as e:  # noqa: BLE001 - llama.cpp failed (or we did): the batch's tasks end with it
            for slot, handle in list(self._active.items()):
                slot.clear()  # its KV cache is in an unknown state
                self._fail(slot, handle, _library_error(e))

    # ------------------------------------------------------------------ background prefill

    def _late(self, slot: Slot, task: Task) -> tuple[int, bool]:
        """How many tokens the short version of `task` may take, if its prompt cannot be in by the
        task's budget (what the cache lacks of it, and the prompt tokens of people's requests
        admitted before it, at the measured rate); else 0. And whether it would be its file's first
        short answer.

        A file's first short answer sizes its short prompts from the load at admission: its share of
        the rate over what is left of the budget, beside every other person's request in flight
        (sized when it arrived, the first of eight cold keystrokes together took all the budget, and
        the others' answers came back empty). Later ones keep that size, so each finds the last
        one's tokens on its scratch sequence and evaluates only what was typed.

        A file answered short long enough converges instead: 0, and `task` loses the client's
        prompt limit (`prompt_deadline`), which would otherwise end that wait empty."""
        if task.short is None or task.prompt_budget is None or not self.answers_short:
            return 0, False
        now = time.perf_counter()
        since, size = next(((t, n) for p, t, n in self._shortened if layout.same_file(p, task.ids)), (None, None))
        ahead = sum(len(s.todo) for s, h in self._active.items() if s is not slot and not h.background and not s.generating)
        wait_s = (len(slot.todo) + ahead) / self.prompt_rate
        if since is not None and now - since > SHORT_FOR_AT_MOST_S and len(slot.todo) / self.prompt_rate <= WAIT_FOR_FULL_S:
            # Converge: at saturation the background share alone would take long to finish it. Its
            # own tokens are weighed, not those ahead: files opened together converge together, one
            # slow keystroke each, as llama-server makes them wait for all at once on the first (short
            # answers on every file until the queue was short kept all keystrokes slow: warm p50 1.5-1.8 s
            # against 0.5-0.6, 8 typists, two CPU cores). The engine chose this wait, so the client's
            # prompt limit must not end it empty (llama-server does not enforce t_max_prompt_ms at all).
            task.prompt_deadline = None
            return 0, False
        if now + wait_s <= task.prompt_budget:
            return 0, False
        if size is None:
            # Busy sequences, not `_active`: the requests admitted with this one in this tick are
            # reserved on their slots but not started yet.
            background = {s for s, h in self._active.items() if h.background}
            people = sum(s.busy and s not in background for s in self._sequences) + len(self._waiting)
            left_s = max(0.0, task.prompt_budget - now - ahead / self.prompt_rate)
            size = 1 << max(4, int(self.prompt_rate * left_s * SHORT_SHARE / max(1, people)).bit_length() - 1)
        return (size, since is None) if size < len(task.prompt) else (0, False)  # no shorter than the prompt itself

    def _answer_short(self, slot: Slot, handle: Handle, short_tokens: int, first: bool) -> None:
        """The full prompt goes on evaluating on `slot`, in the background; the person's request
        becomes its short version, in `short_tokens`, first in line for a scratch sequence (`first`:
        its file's first short answer, which sizes the file's later ones)."""
        full = handle.task
        handle.task = full.short(short_tokens)
        # A file's first answer goes alone on a CPU where the rest of the file takes long anyway: a
        # row beside a lone token is a pass of its own there (full-size model, two cores: 70 ms a
        # token, 110 with one background row; the file's ~2,000 tokens take ~40 s whatever the share).
        # Where the rest goes in within seconds (the small model: ~1 s), its background beside the
        # first answer brings the next keystroke its full context.
        handle.task.alone = first and not self.full_batches and len(slot.todo) / self.prompt_rate > WAIT_FOR_FULL_S
        full.prompt_deadline = full.deadline = None  # the client's limits are the short one's now
        full.short = full.prompt_budget = None  # it is background work from now on, never late
        full.max_tokens = 0  # prefill only, also when it resumes from the queue
        if first:
            self._shortened = [*self._shortened[-(MAX_BACKGROUND * 4 - 1):], (full.ids, time.perf_counter(), short_tokens)]
        background = Handle(full, None, None)
        background.background = True
        slot.silence()
        self._active[slot] = background
        self.stats.short_answers += 1
        with self._cond:
            self._waiting.appendleft(handle)
            # One job a file: its newest prompt makes the older ones moot.
            self._background = deque(h for h in self._background if not layout.same_file(h.task.ids, full.ids))

    def _yield_background(self) -> None:
        """A slot doing background work is given up, its progress saved, for each request that
        waits without an idle slot (one of the same file takes the job's slot over in `_admit`);
        the job goes back to the queue."""
        with self._cond:
            full = [h.task.ids for h in self._waiting if not h.task.short_context]
            wanted = len(full) - sum(not s.busy for s in self.slots)
        jobs = [(slot, h) for slot, h in self._active.items() if h.background]
        for slot, handle in jobs:
            if any(layout.same_file(handle.task.ids, p) for p in full):
                wanted -= 1  # taken over, not yielded
        for slot, handle in jobs:
            if wanted <= 0:
                break
            if not any(layout.same_file(handle.task.ids, p) for p in full):
                self.states.save(slot)
                slot.release()
                del self._active[slot]
                with self._cond:
                    self._background.append(handle)
                    while len(self._background) > MAX_BACKGROUND:
                        self._background.popleft()
                wanted -= 1

    # ------------------------------------------------------------------ admission

    def _admit(self) -> list[tuple[Slot, Handle]]:
        """Waiting tasks → idle slots (under the lock), short answers to scratch sequences, a
        keystroke in a file under background work to that job's slot; then background jobs to the
        slots left. The slots start them outside it."""
        admitted = []
        idle = [s for s in self.slots if not s.busy]
        scratch = [s for s in self.scratch if not s.busy]
        jobs = {slot: h for slot, h in self._active.items() if h.background}
        for handle in list(self._waiting):
            if handle.cancelled:
                self._waiting.remove(handle)
                handle._finish(Completion("", "cancelled", len(handle.task.prompt), 0, 0, 0, 0.0, 0.0))
                continue
            if handle.task.short_context:
                pool = scratch
            else:
                # The file's newest keystroke takes over its background job, and all its progress.
                same = [s for s, h in jobs.items() if layout.same_file(h.task.ids, handle.task.ids)]
                for s in same:
                    del self._active[s], jobs[s]
                    s.release()
                pool = same or idle
            if not pool:
                continue
            slot = _best_slot(pool, handle.task.ids)
            pool.remove(slot)
            if slot in idle:
                idle.remove(slot)
            self._waiting.remove(handle)
            slot.reserve(handle.task)
            admitted.append((slot, handle))
        while self._background and idle:
            handle = self._background.pop()
            slot = _best_slot(idle, handle.task.ids)
            idle.remove(slot)
            slot.reserve(handle.task)
            admitted.append((slot, handle))
        return admitted

    def _fail(self, slot: Slot, handle: Handle, error: RefactGGUFError) -> None:
        slot.release()
        self._active.pop(slot, None)
        self.stats.errors += 1
        handle._finish(error=error)

    def _done(self, slot: Slot, completion: Completion) -> None:
        handle = self._active.pop(slot)
        stats = self.stats
        stats.tokens_evaluated += completion.tokens_evaluated
        stats.tokens_predicted += completion.tokens_predicted
        if not handle.background:
            seconds = (completion.prompt_ms + completion.predicted_ms) / 1e3
            stats.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            stats.latency_sum_s += seconds
        handle._finish(completion)

    def step(self) -> None:
        """One llama_decode: a token for each generating slot, prompt chunks for the others, in
        the rows `layout.plan` lays out; then each answering row's token is picked and accepted."""
        now = time.perf_counter()
        self._expire(now)
        if not self._active or self._draft(now):
            return
        people = any(not h.background for h in self._active.values())
        rows = self._plan(people)
        answers, n_outputs = self._lay_out(rows)
        t0 = time.perf_counter()
        # Background work gives its step up the moment a person's request comes in.
        done = self.ctx.run(self.ctx.batch, stop_if=(lambda: bool(self._waiting)) if not people else None)
        decode_s = time.perf_counter() - t0
        self._trim(rows, done)
        if not done:
            self.stats.background_stopped += 1
            return
        self._advance(rows, decode_s)
        self._pick(answers, self.ctx.logits(n_outputs))
        busy = [r for r in rows if r.kind != "filler"]
        if self.drafter and len(busy) == 1 and busy[0].kind == "token":
            self.drafter.lone_step(decode_s)  # a lone sequence's one-token step: what a verify step is weighed against
        self.stats.fillers += len(rows) - len(busy)
        self.stats.count_step(self.ctx.batch.n, decode_s, time.perf_counter() - now)

    def _expire(self, now: float) -> None:
        """Cancelled tasks, and prompts past their time, leave before the step."""
        for slot, handle in list(self._active.items()):
            if handle.cancelled:
                self._done(slot, slot.finish("cancelled"))
            elif slot.prompt_overdue(now):
                self._done(slot, slot.finish("time"))

    def _draft(self, now: float) -> bool:
        """A lone greedy request's verify step instead of a plain one, where the drafter finds it pays."""
        if not self.drafter or len(self._active) != 1 or self._waiting:
            return False
        (slot, handle), = self._active.items()
        if not (slot.generating and slot.greedy and not handle.background and (v := self.drafter.step(self.ctx, slot))):
            return False
        self.stats.draft_tokens += v.drafted
        self.stats.draft_accepted += v.kept
        self.stats.count_step(v.batch_tokens, v.decode_s, time.perf_counter() - now)
        if v.done is not None:
            self._done(slot, v.done)
        return True

    def _plan(self, people: bool) -> list[layout.Row]:
        # Background prompts together: a few tens of ms of a step people wait on (short answers
        # stay short; a file converges by `_late`'s wait for its full prompt), a quarter second of
        # prompt, 32 tokens at least, of a step nobody waits on (given up when a request comes).
        ctx, rate = self.ctx, self.prompt_rate or 0.0
        share = min(ctx.n_ubatch, max(1, int(rate * BACKGROUND_BESIDE_PEOPLE_S))) if people else max(32, int(rate * BACKGROUND_STEP_S))
        if people and any(h.task.alone for h in self._active.values()):
            share = 0
        return layout.plan(self._layout_view(), layout.Room(
            ctx.batch.capacity, ctx.n_ubatch, self.full_batches, share, len(self.slots)))

    def _lay_out(self, rows: list[layout.Row]) -> tuple[list[tuple[Slot, int, int]], int]:
        """The batch from the rows: each answering row's (slot, logits row, batch row), and the outputs."""
        batch = self.ctx.batch
        batch.clear()
        answers, n_outputs = [], 0
        for r in rows:
            slot = self._sequences[r.seq]
            if r.kind == "token":
                row = batch.add(r.seq, (slot.next_token,), slot.pos, output_last=True)
            elif r.kind == "prompt":
                row = batch.add(r.seq, slot.todo[: r.n], slot.pos, output_last=r.output)
            else:
                row = batch.add(r.seq, (0,), slot.n_cached, output_last=r.output)
            if r.answer:
                answers.append((slot, n_outputs, row))
            n_outputs += r.output
        return answers, n_outputs

    def _trim(self, rows: list[layout.Row], done: bool) -> None:
        # Fillers leave no trace. A step given up keeps in the cache the ubatches llama.cpp had
        # finished, which no slot counted: they go too, or the next step's positions would not
        # follow the cache's (llama_decode refuses that batch, failing every task in it).
        for r in rows:
            if r.kind == "filler" or not done:
                self.ctx.seq_keep(r.seq, self._sequences[r.seq].n_cached)

    def _advance(self, rows: list[layout.Row], decode_s: float) -> None:
        """What the step put in the cache is counted by its slots; a prompt step measures the prompt rate."""
        prompts = [(self._sequences[r.seq], r.n) for r in rows if r.kind == "prompt"]
        self.stats.background_tokens += sum(n for slot, n in prompts if self._active[slot].background)
        for r in rows:
            if r.kind == "token":
                self._sequences[r.seq].token_done()
        for slot, n in prompts:
            slot.prompt_done(n)
        if sum(n for _, n in prompts) >= 16:  # a prompt step: how fast prompts go now
            rate = self.ctx.batch.n / decode_s
            self.prompt_rate = rate if self.prompt_rate is None else 0.7 * self.prompt_rate + 0.3 * rate

    def _layout_view(self) -> list[layout.Sequence]:
        """Every sequence as `layout.plan` sees it."""
        rank = {slot: i for i, slot in enumerate(self._active)}
        return [layout.Sequence(
            s.seq, generating=s.generating, todo=len(s.todo) if s in rank and not s.generating else 0,
            rank=rank.get(s, 0), background=s in rank and self._active[s].background,
            short=s.busy and s.task.short_context, full=s.n_cached >= self.n_ctx) for s in self._sequences]

    def _pick(self, answers: list[tuple[Slot, int, int]], logits: np.ndarray) -> None:
        """Each answering slot's next token from its logits row; finished tasks end."""
        # One argmax over every row when all are greedy (the common case: code completion).
        greedy = logits.argmax(axis=1) if all(s.greedy for s, _, _ in answers) else None
        for slot, k, row in answers:
            if slot.max_tokens == 0:
                self._done(slot, slot.finish("max_tokens"))
                continue
            if slot.greedy:
                token = int(greedy[k]) if greedy is not None else int(logits[k].argmax())
            else:
                token = slot.pick(row)
            done = slot.accept(token)
            if done is not None:
                self._done(slot, done)


def _best_slot(slots: list[Slot], prompt: np.ndarray) -> Slot:
    """The slot whose cache shares the most of `prompt`. A handful of shared tokens (the FIM
    marker, an import line) is no reason to overwrite a cache someone else may come back to:
    below that, the least recently used."""

    def affinity(slot: Slot) -> tuple[int, float]:
        shared = slot.common_prefix(prompt)
        return (shared if shared >= min(REUSE_CHUNK, len(prompt) // 2) else 0, -slot.last_used)

    return max(slots, key=affinity)


def _library_error(e: Exception) -> RefactGGUFError:
    if isinstance(e, RefactGGUFError):
        return e
    return RefactGGUFError(f"internal error: {e!r}", "please report it, with the log of REFACT_GGUF_DEBUG=1")
