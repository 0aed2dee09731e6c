"""The rows of one engine step, and what a sequence's cache keeps of a prompt, as pure functions:
which sequence puts how many tokens into the next `llama_decode`, which rows' logits are read, and
which cached runs a prompt reuses. No llama.cpp here, so the rules are unit-tested.

llama.cpp splits a batch of per-sequence KV streams into ubatches of *consecutive* sequence ids
with equally many tokens each. So rows go in sequence order, and an idle sequence between two busy
ones gets a filler token (decoded, then removed from its cache): without it every gap in the ids
costs one more pass over the weights (32 typists ran at 66 ms a step instead of ~8). Beyond one
token, a sequence's prompt tokens go to a ubatch of their own — one more pass for the whole step —
worth it only for a long prompt: the few tokens a keystroke adds go one a step while others share
the batch, and on a GPU alone too (a step of another shape costs CUDA its graph). Background
prompts (a cold file's full context) take a bounded share of a step people wait on, and up to a
ubatch of a step nobody waits on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

DRIBBLE = 32  # prompts up to this many new tokens are fed one token a step when the batch is shared
# On a GPU a lone sequence's prompt up to this many tokens goes one a step too, each row an output,
# so every step keeps the one-token shape. llama.cpp replays a CUDA graph only after two steps of one
# shape: a keystroke's 2-3 token step (4.1 ms, H100, full-size model) cost the next two steps 3.2 and
# 3.3 ms against 1.75, ~7 ms for what takes 1.75 a token one a step.
LONE_DRIBBLE = 4


@dataclass(frozen=True)
class Sequence:
    """What the layout needs to know of one sequence."""

    seq: int
    generating: bool = False  # decodes its next token this step
    todo: int = 0  # prompt tokens still to evaluate (a task whose prompt is not in yet)
    rank: int = 0  # admission order: prompt room goes first come, first served
    background: bool = False  # a prompt evaluated for later keystrokes, nobody waiting on it
    short: bool = False  # someone's first answer in a file: its prompt goes in at once
    full: bool = False  # its cache holds n_ctx tokens: no room even for a filler

    @property
    def busy(self) -> bool:
        return self.generating or self.todo > 0


@dataclass(frozen=True)
class Room:
    """The step's limits."""

    capacity: int  # tokens a batch holds
    n_ubatch: int
    every_row: bool  # while several are busy, a row for every sequence and every row an output (GPU: one graph)
    background: int  # tokens all background prompts together may take in this step (their share)
    people: int | None = None  # with every_row: the first this many sequences (people's slots) have a
    # row whenever two or more are busy; those after them (scratch sequences for short answers, idle
    # nearly always) only up to the last busy one


@dataclass(frozen=True)
class Row:
    seq: int
    kind: Literal["token", "prompt", "filler"]
    n: int  # tokens it adds to the batch
    output: bool  # logits of its last token are computed
    answer: bool  # those logits pick the sequence's next token (a generated one, or a prompt's last chunk)


def plan(sequences: list[Sequence], room: Room) -> list[Row]:
    """The rows of one step, in sequence order; [] when nothing is busy. `sequences` by id, all of them."""
    busy = [s for s in sequences if s.busy]
    if not busy:
        return []
    if room.every_row and len(busy) > 1:
        lo, hi = 0, max((room.people or len(sequences)) - 1, max(s.seq for s in busy))
    else:  # a lone sequence decodes alone, on a GPU too: a filler row costs the step ~40% (1.63 -> 2.31 ms, H200)
        lo, hi = min(s.seq for s in busy), max(s.seq for s in busy)
    left, share = room.capacity - (hi - lo + 1), room.background
    chunk: dict[int, int] = {}
    # Short answers' prompts first (each sized to its share of the budget; behind a file's whole
    # prompt, their few tokens went in one a step and missed the budget), then first come, first served.
    for s in sorted((s for s in busy if not s.generating), key=lambda s: (not s.short, s.rank)):
        alone = len(busy) == 1 and not (room.every_row and s.todo <= LONE_DRIBBLE)
        whole = alone or s.todo > DRIBBLE or s.short
        more = min(s.todo - 1, left) if whole else 0
        if s.background:
            if share <= 0:  # the step's share is spent (oldest job first): a filler this time
                continue
            # one ubatch at most: a step given up keeps the ubatches already done
            more = max(0, min(more, share - 1, room.n_ubatch - 1))
            share -= 1 + more
        chunk[s.seq] = 1 + more
        left -= more
    if not (room.every_row and len(busy) > 1):
        # A background job past the step's share is idle this step: at an end of the run of ids it
        # needs no filler, which would cost a row (on a CPU, a lone answer's step +60%, full-size model).
        rows_of = [s.seq for s in busy if s.generating or s.seq in chunk]
        lo, hi = min(rows_of), max(rows_of)
    rows = []
    for s in sequences[lo : hi + 1]:
        if s.generating:
            rows.append(Row(s.seq, "token", 1, True, True))
        elif s.seq in chunk:
            last = chunk[s.seq] == s.todo
            rows.append(Row(s.seq, "prompt", chunk[s.seq], last or (room.every_row and chunk[s.seq] == 1), last))
        elif not s.full:  # idle (or background work past the step's share): a filler keeps the run of ids unbroken
            rows.append(Row(s.seq, "filler", 1, room.every_row, False))
    return rows


# ---------------------------------------------------------------------------------- what a cache keeps

REUSE_CHUNK = 64  # shortest run of cached tokens worth shifting rather than re-evaluating


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids two arrays share (vectorised: slots compare 1,500-token prompts)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def reuse_plan(cached: np.ndarray, prompt: np.ndarray) -> tuple[int, list[tuple[int, int, int]]]:
    """What a cache holding `cached` can keep of `prompt`: the count, and the runs to shift
    (source position, destination, length), in order.

    First the longest common prefix. Then llama-server's --cache-reuse: where text was removed
    (an editor's extra-context chunk dropped, lines deleted, the head of a long file cut as it
    grows), every later run of at least `REUSE_CHUNK` cached tokens that continues the prompt is
    shifted back into place instead of being evaluated again. The shift is exact for Refact's
    ALiBi positions; the shifted keys and values still reflect the removed text, as in
    llama-server. (Text *inserted* before cached tokens cannot reuse them: llama.cpp decodes only
    after the last cached position.) The prompt's last token is always evaluated, for its logits.
    """
    last = len(prompt) - 1
    head = min(common_prefix(cached, prompt), last)
    src, end = head, len(cached)
    moves = []
    if end - src >= REUSE_CHUNK and head < last:
        old, new = cached.tolist(), prompt.tolist()
        while src < end and head < last and end - src >= REUSE_CHUNK:
            n = 0
            while src + n < end and head + n < last and old[src + n] == new[head + n]:
                n += 1
            if n >= REUSE_CHUNK:
                moves.append((src, head, n))
                head, src = head + n, src + n
            else:
                src += 1
    return head, moves


def same_file(a: np.ndarray | list[int], b: np.ndarray | list[int]) -> bool:
    """Two prompts of one file: they share half of the shorter one up front, or the run of
    REUSE_CHUNK ids at its middle appears in the other (a long file's prefix loses its head as the
    cursor's line grows, shifting what follows). A byte search: this runs per request and per step,
    on the tasks' int32 ids (`Task.ids`), which it then uses without a copy."""
    a, b = np.asarray(a, np.int32), np.asarray(b, np.int32)
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    if common_prefix(a, b) >= len(short) // 2:
        return True
    if len(short) < 2 * REUSE_CHUNK:
        return False
    run, haystack = short[len(short) // 2 :][:REUSE_CHUNK].tobytes(), long.tobytes()
    at = haystack.find(run)
    while at > 0 and at % 4:  # a match must start on an id, not inside one
        at = haystack.find(run, at + 1)
    return at >= 0


# ---------------------------------------------------------------------------------- drafts

def draft(history: np.ndarray, k: int, longest: int = 4, shortest: int = 2) -> np.ndarray:
    """Up to `k` ids that followed the latest earlier occurrence of the history's last n ids, the
    longest n from `longest` down to `shortest` that occurs (prompt lookup: a FIM prompt holds the
    code after the cursor and the rest of the file, which what is typed often repeats); [] if none."""
    # Where the last id occurred before, then which of those runs match further back: a few dozen
    # candidates, not a window per position (this runs every generated token of a lone request).
    ends = np.flatnonzero(history[:-1] == history[-1]) + 1  # a run ending at `end` (exclusive)
    for n in range(min(longest, len(history) - 1), shortest - 1, -1):
        hits = ends[ends >= n]
        for back in range(1, n):
            hits = hits[history[hits - 1 - back] == history[-1 - back]]
        if hits.size:
            return history[hits[-1] : hits[-1] + k]
    return history[:0]
