"""Drafting from the prompt (`serve --draft K`): a lone greedy request's next tokens looked up in its
own context (`layout.draft`) and verified in one llama_decode; the drafted tokens greedy decoding
picks too are kept, the rest trimmed from the cache. The text is the one a token a step gives up to
the summation order of llama.cpp's kernels: a step of several rows may sum in another order than a
one-token step, and at a near-tie pick the other token (3 of 219 HumanEval line completions of the
Q8_0 stand-in on a CPU; every k on a GPU, where the engine does not draft: docs/benchmarks.md).

Gated by what it costs here, measured as it runs: a one-token step of a lone sequence, and a verify
step by the number of tokens drafted. A draft goes in only where the tokens the request is expected
to keep pay for the longer step (on 2 CPU cores a 3-token step costs 2.1–2.4× a one-token step:
docs/benchmarks.md); where they do not, one step in 16 still drafts, as what is typed may start
repeating the file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import layout
from .llama import Context
from .runtime import Slot
from .tasks import Completion

PROBE_EVERY = 16


@dataclass
class Verified:
    """One verify step: how many tokens were drafted and kept, the step's size and decode time, and
    the completion when the request ended in it."""

    drafted: int
    kept: int
    batch_tokens: int
    decode_s: float
    done: Completion | None


class Drafter:
    def __init__(self, k: int):
        self.k = k
        self.lone_step_s: float | None = None  # running means, seconds
        self.verify_step_s: dict[int, float] = {}
        self.steps = self.kept = 0  # every request's verify steps, and the tokens they kept

    def lone_step(self, seconds: float) -> None:
        """A lone sequence's one-token step took `seconds` (the engine reports its plain steps)."""
        self.lone_step_s = _mean(self.lone_step_s, seconds)

    def step(self, ctx: Context, slot: Slot) -> Verified | None:
        """A verify step of `slot`'s next token and its draft, if it pays; None: no draft."""
        history = np.append(slot.cached[: slot.n_cached], slot.next_token)
        drafted = layout.draft(history, min(self.k, ctx.n_ctx - 1 - slot.pos))
        if not len(drafted) or not self._pays(slot, len(drafted)):
            return None
        batch = ctx.batch
        t0 = time.perf_counter()
        batch.clear()
        batch.add(slot.seq, history[-1:].tolist() + drafted.tolist(), slot.pos, output_all=True)
        ctx.run(batch)
        seconds = time.perf_counter() - t0
        picks = ctx.logits(batch.n).argmax(axis=1)
        slot.token_done()
        kept, done = 0, None
        for i, token in enumerate(picks.tolist()):
            done = slot.accept(token)
            if done is not None or i == len(drafted) or token != drafted[i]:
                break  # ended, or `token` goes in with the next step
            slot.token_done()  # the drafted token, decoded already at its position
            kept += 1
        ctx.seq_keep(slot.seq, slot.n_cached)
        slot.drafted, slot.kept, slot.draft_steps = slot.drafted + len(drafted), slot.kept + kept, slot.draft_steps + 1
        self.verify_step_s[len(drafted)] = _mean(self.verify_step_s.get(len(drafted)), seconds)
        self.steps, self.kept = self.steps + 1, self.kept + kept
        return Verified(len(drafted), kept, batch.n, seconds, done)

    def _pays(self, slot: Slot, n: int) -> bool:
        """The tokens a step then yields (one, and those kept: this request's mean so far, else every
        request's) against a one-token step's time. Unmeasured costs are measured first."""
        verify, lone = self.verify_step_s.get(n), self.lone_step_s
        if verify is None or lone is None:
            return verify is None  # measure the verify step; then a one-token step
        steps, kept = (slot.draft_steps, slot.kept) if slot.draft_steps else (self.steps, self.kept)
        return (1 + kept / max(1, steps)) * lone >= verify or slot.n_predicted % PROBE_EVERY == PROBE_EVERY - 1


def _mean(mean: float | None, value: float, weight: float = 0.2) -> float:
    """A running mean that follows the machine (other load, thermal limits) within a few dozen steps."""
    return value if mean is None else (1 - weight) * mean + weight * value
