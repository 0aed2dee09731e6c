"""Fill-in-the-middle: prompt layout as token ids, and truncation (the stop rules for code are in `tasks`).

Pure functions over a `tokenize(text) -> ids` callable, so they are tested without a model.

Order. SPM (`<fim_suffix>S<fim_prefix>P<fim_middle>`) is the default: it is what smallcloudai's
own IDE client sends for this model, and it puts the text being typed (the end of the prefix) at
the end of the prompt, so each keystroke only appends tokens and everything before them stays
valid in the KV cache. PSM (`<fim_prefix>P<fim_suffix>S<fim_middle>`, the model card's example)
is available with `order="psm"`.

Truncation. When prefix + suffix exceed the budget, the text nearest the cursor is kept: the tail
of the prefix and the head of the suffix, cut at line boundaries. The suffix gets at most
`SUFFIX_SHARE` of the budget (the prefix matters more for what comes next); whatever one side
does not use goes to the other. Cuts are reported, never silent.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Callable, Literal

from .errors import InputError
from .lru import TextLRU
from .tokens import FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID

Tokenize = Callable[[str], list[int]]
Order = Literal["spm", "psm"]

SUFFIX_SHARE = 0.25


@dataclass(frozen=True)
class FimPrompt:
    tokens: list[int]
    prefix: str  # the prefix text actually used (its tail, if truncated)
    suffix: str  # the suffix text actually used (its head, if truncated)
    prefix_truncated: bool
    suffix_truncated: bool

    @property
    def truncated(self) -> bool:
        return self.prefix_truncated or self.suffix_truncated


def _fit(tokenize: Tokenize, text: str, budget: int, keep: Literal["head", "tail"],
         ids: list[int] | None = None) -> tuple[str, list[int], bool]:
    """The most whole lines of `text` (from its head or tail) whose tokens fit `budget`.

    The search starts where the text's own characters per token put the cut and steps out from
    there, so it tokenizes a few budget-sized texts, not halves of the file (a whole file sent on
    every keystroke made a binary search over it most of a keystroke's time on a CPU)."""
    ids = tokenize(text) if ids is None else ids
    if len(ids) <= budget:
        return text, ids, False
    lines = text.splitlines(keepends=True)
    pick = (lambda k: "".join(lines[-k:]) if k else "") if keep == "tail" else (lambda k: "".join(lines[:k]))
    counted: dict[int, list[int]] = {}

    def fits(k: int) -> bool:
        if k not in counted:
            counted[k] = tokenize(pick(k))
        return len(counted[k]) <= budget

    # The largest k with fits(k); k = len(lines) does not fit. First guess: the lines holding
    # `budget` tokens' worth of characters at the text's density.
    ordered = lines[::-1] if keep == "tail" else lines
    chars, room, guess = 0, budget * len(text) / len(ids), 0
    while guess < len(lines) - 1 and chars + len(ordered[guess]) <= room:
        chars += len(ordered[guess])
        guess += 1
    if fits(guess):  # gallop up from the guess to the first k that does not fit
        lo, step = guess, 1
        while lo + step < len(lines) and fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = min(lo + step, len(lines))
    else:  # gallop down to one that fits
        hi, step = guess, 1
        while hi - step > 0 and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(hi - step, 0)
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if lo == 0 and keep == "tail" and lines:
        # Even the cursor's own line is too long: keep its end, character-wise.
        line = lines[-1]
        cut = len(line)
        while cut > 0 and len(tokenize(line[len(line) - cut :])) > budget:
            cut = cut * 3 // 4
        kept = line[len(line) - cut :]
        return kept, tokenize(kept), True
    return pick(lo), counted[lo] if lo in counted else tokenize(pick(lo)), True


def _last_line_break(text: str) -> int:
    """Where the text's last line break after a non-space character is (0: none). Refact's
    pre-tokenizer (llama.cpp's `refact` regex) never joins a non-space character to the whitespace
    after it, so there tokenize(text + more) == tokenize(text[:i]) + tokenize(text[i:] + more)."""
    i = text.rfind("\n")
    while i > 0 and text[i - 1].isspace():
        i = text.rfind("\n", 0, i)
    return max(i, 0)


@dataclass(frozen=True)
class Cut:
    """A file's prefix and suffix cut to fit a room: what a keystroke on the cursor's line leaves
    as it was (an editor sends the whole file again each time; only the typed line changes)."""

    prefix: str
    prefix_ids: array.array  # ids as int32 arrays: 4 bytes a token, not a Python int's 36
    head_ids: array.array  # the ids of prefix[:line_break], which the typed line cannot merge into
    line_break: int  # _last_line_break(prefix)
    suffix: str
    suffix_ids: array.array
    prefix_truncated: bool
    suffix_truncated: bool


def cut(tokenize: Tokenize, prefix: str, suffix: str, room: int) -> Cut:
    """`prefix` and `suffix` cut to `room` tokens: the suffix gets at most `SUFFIX_SHARE` of it,
    and what one side does not use goes to the other."""
    suffix_ids_full = tokenize(suffix)
    prefix_ids_full = tokenize(prefix)
    suffix_budget = min(len(suffix_ids_full), max(int(room * SUFFIX_SHARE), room - len(prefix_ids_full)))
    suffix_text, suffix_ids, suffix_cut = _fit(tokenize, suffix, suffix_budget, "head", suffix_ids_full)
    prefix_text, prefix_ids, prefix_cut = _fit(tokenize, prefix, room - len(suffix_ids), "tail", prefix_ids_full)
    # The line can merge only with what follows the prefix's last line break: before it the
    # tokens are the prefix's own, the same text every keystroke.
    line_break = _last_line_break(prefix_text)
    head_ids = tokenize(prefix_text[:line_break]) if line_break else []
    return Cut(prefix_text, array.array("i", prefix_ids), array.array("i", head_ids), line_break, suffix_text,
               array.array("i", suffix_ids), prefix_cut, suffix_cut)


class Cuts(TextLRU[Cut]):
    """`cut` for one tokenizer, the last files' cuts kept (lru.py). Cutting a whole file's prompt
    again took ~1.1 ms a keystroke on two CPU cores though its texts' ids came from the token cache:
    fitting them walks the file's lines and copies its ids."""

    def __init__(self, max_chars: int = 8 << 20):  # ~8 Mi characters of prefix and suffix: a team's files several times over
        super().__init__(max_chars)

    def __call__(self, tokenize: Tokenize, prefix: str, suffix: str, room: int) -> Cut:
        key = (prefix, suffix, room)
        held = self.get(key)
        if held is None:
            held = cut(tokenize, prefix, suffix, room)
            self.put(key, held, len(prefix) + len(suffix))
        return held


LINE_RESERVE = 64  # tokens kept free for the line being typed, so typing never moves the prefix cut


def build_prompt(
    tokenize: Tokenize,
    prefix: str,
    suffix: str,
    budget: int,
    order: Order = "spm",
    line: str = "",
    extra: list[int] | tuple[int, ...] = (),
    cuts: Cuts | None = None,
) -> FimPrompt:
    """Token ids of a FIM prompt within `budget` tokens (specials included). No BOS.

    `line` is the text typed on the cursor's line (llama.vim's `prompt`): it follows the prefix
    and is never cut, and the prefix and suffix budgets do not depend on it (up to
    `LINE_RESERVE` tokens of it, empty or not), so a keystroke changes only the last tokens of
    an SPM prompt, the first one on a new line included. `extra` (ids of other files' snippets) goes
    first and gets what prefix and suffix leave. `tokenize` must not parse special tokens:
    source code containing "<fim_suffix>" stays text. `cuts`: where the cut of the last files'
    prefix and suffix is kept for their next keystrokes.
    """
    if order not in ("spm", "psm"):
        raise InputError(f"unknown FIM order {order!r}", "use 'spm' or 'psm'")
    line_ids = tokenize(line) if line else []
    reserve = min(LINE_RESERVE, budget // 4)  # depends on the budget alone: typing never moves it
    room = max(0, budget - 3 - max(len(line_ids), reserve))
    c = (cuts or cut)(tokenize, prefix, suffix, room)
    prefix_ids = c.prefix_ids
    if line:
        prefix_ids = [*c.head_ids, *tokenize(c.prefix[c.line_break:] + line)]
    suffix_ids = c.suffix_ids
    spare = max(0, budget - 3 - len(prefix_ids) - len(suffix_ids))
    extra_ids = list(extra[len(extra) - spare :]) if spare and extra else []
    if order == "spm":
        tokens = [*extra_ids, FIM_SUFFIX_ID, *suffix_ids, FIM_PREFIX_ID, *prefix_ids, FIM_MIDDLE_ID]
    else:
        tokens = [*extra_ids, FIM_PREFIX_ID, *prefix_ids, FIM_SUFFIX_ID, *suffix_ids, FIM_MIDDLE_ID]
    return FimPrompt(tokens, c.prefix + line, c.suffix, c.prefix_truncated, c.suffix_truncated)
