"""What to generate, as plain data: a `Task` (prompt ids, limits, sampling, stop rules) and the
`Completion` it yields. Pure: no llama.cpp here; the builders take a `tokenize(text) -> ids`.

One stop protocol, `StopRules`, serves every task: stop strings for all; for code (FIM) also the
line rules (newline, blank line, dedent, a repeat of the suffix). As text streams in it says when
to stop and which part is safe to send: text that no later rule can take back.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import chat as chat_prompt
from . import fim as fim_prompt
from .errors import InputError
from .tokens import EMPTY_OUTPUT_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

Tokenize = Callable[[str], list[int]]
OnText = Callable[[str], None]  # receives each piece of a completion's text that is final


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Greedy by default (temperature 0): code completion wants the likeliest tokens. Keyword-only,
    so a new parameter (here, in a request's schema and in llama.Sampler) shifts no caller."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


@dataclass
class Completion:
    text: str
    stop_reason: str  # eos | special | max_tokens | newline | blank line | dedent | repeats suffix | stop string | time | cancelled
    prompt_tokens: int
    tokens_cached: int  # prompt tokens reused from the KV cache
    tokens_evaluated: int  # prompt tokens actually evaluated for this request
    tokens_predicted: int
    prompt_ms: float
    predicted_ms: float
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    short_context: bool = False  # answered from the lines around the cursor, the full prompt being late
    draft_n: int = 0  # tokens drafted from the request's own context
    draft_accepted: int = 0  # of those, kept (what greedy decoding picked too)


# ---------------------------------------------------------------------------------- stop rules

_BLANK_LINE = re.compile(r"\n[ \t]*\n")
# Bounds on a request's stop strings: each is searched for after every generated token, on the
# engine thread every request shares (100k of them held it for 37 s).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 512


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


class StopRules:
    """Decides, as text streams in, where a completion ends.

    Always: the caller's stop strings (the text is cut before the first one). With `code=True`
    (fill-in-the-middle), also:
    - single-line mode: the first newline; multi-line mode: a blank line;
    - a line that dedents below the cursor's block (`indent`, else the cursor line's own);
    - a line that repeats the suffix's first non-empty line (the model re-typing what follows).
    `safe()` is the part that no later rule can cut; `final()` the completion once generation
    ended for any reason. An empty completion is a valid answer.
    """

    def __init__(self, stop: tuple[str, ...] = (), *, code: bool = False, prefix: str = "", suffix: str = "",
                 multiline: bool = True, indent: int | None = None, strip: bool = False):
        self.stop_strings = tuple(dict.fromkeys(s for s in stop if s))
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise InputError(f"stop: {len(self.stop_strings)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop_strings):
            raise InputError(f"stop: a stop string is over {MAX_STOP_CHARS} characters")
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1  # a stop string may still be arriving
        self.code = code
        self.cursor_line = prefix.rsplit("\n", 1)[-1]
        self.block_indent = _indent(self.cursor_line) if indent is None else indent
        self.suffix_line = next((ln.strip() for ln in suffix.splitlines() if ln.strip()), None)
        self.multiline = multiline
        self.strip = strip  # chat replies start after "ASSISTANT" with a space
        self.text = ""
        self.stopped: str | None = None  # why generation should stop, once it should

    def feed(self, piece: str) -> bool:
        """Add generated text; True when generation should stop."""
        if self.stopped:
            return True
        searched = max(0, len(self.text) - self.hold)  # earlier text held no stop string: only one ending in `piece` can be new
        self.text += piece
        if self.strip:
            stripped = self.text.lstrip()
            searched = max(0, searched - (len(self.text) - len(stripped)))
            self.text = stripped
        cut = self._cut(self.text, searched)
        if cut is not None:
            self.text, self.stopped = self.text[: cut[0]], cut[1]
        return self.stopped is not None

    def _cut(self, text: str, start: int = 0) -> tuple[int, str] | None:
        """Where `text` ends and why, or None; stop strings are looked for from `start` on."""
        hits = [i for i in (text.find(s, start) for s in self.stop_strings) if i >= 0]
        if hits:
            return min(hits), "stop string"
        if not self.code:
            return None
        if not self.multiline and "\n" in text:
            return text.index("\n"), "newline"
        blank = _BLANK_LINE.search(text)
        if blank:
            text_end, reason = blank.start(), "blank line"
        else:
            text_end, reason = len(text), None
        lines = text[:text_end].split("\n")
        pos = 0
        for i, line in enumerate(lines):
            complete = i < len(lines) - 1 or reason is not None
            if self.suffix_line and complete and (line if i else self.cursor_line + line).strip() == self.suffix_line and line.strip():
                return max(0, pos - 1), "repeats suffix"
            if i and line.strip() and _indent(line) < self.block_indent:
                return pos - 1, "dedent"
            pos += len(line) + 1
        return (text_end, reason) if reason else None

    def safe(self) -> str:
        """Text no later rule can cut. Code: everything before the last newline (a cut removes a
        line *and* the newline before it, so that newline is not safe yet); stop strings: all
        but the last characters a stop string could still begin with."""
        if self.stopped:
            return self.text
        end = len(self.text) - self.hold
        if self.code:
            end = min(end, self.text.rfind("\n"))
        return self.text[: max(0, end)]

    def final(self) -> str:
        """The completion once generation ended for any reason; drops a dangling suffix repeat."""
        if self.code and not self.stopped:
            cut = self._cut(self.text + "\n")
            if cut is not None and cut[0] < len(self.text):
                return self.text[: cut[0]]
        return self.text.rstrip() if self.strip else self.text


# ---------------------------------------------------------------------------------- tasks


@dataclass(eq=False)
class Task:
    """One generation: the prompt as ids, how much to generate, how to pick and when to stop.
    Used once: its `rules` keep the text generated so far."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    rules: StopRules = field(default_factory=StopRules)
    stop_ids: frozenset[int] = frozenset()  # tokens that end it besides the model's end/control tokens
    prompt_deadline: float | None = None  # time.perf_counter() by which the prompt must be in; else it ends ("time")
    deadline: float | None = None  # time.perf_counter() after which generation ends ("time")
    reuse_cache: bool = True  # False: evaluate the whole prompt (llama-server's cache_prompt: false)
    truncated: bool = False
    notes: tuple[str, ...] = ()
    # Makes the same request on the lines around the cursor, in at most the tokens given (with this
    # one's limits): what the engine answers instead when the cache holds too little of `prompt` to
    # have it in by `prompt_budget` (a time.perf_counter()), evaluating `prompt` in the background
    # meanwhile, for the keystrokes that follow. Made only then: fitting the lines tokenizes, and a
    # warm keystroke would pay for it every time.
    short: Callable[[int], Task] | None = None
    prompt_budget: float | None = None
    short_context: bool = False
    alone: bool = False  # no background prompt rows beside it (the engine decides: engine._answer_short)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise InputError("empty prompt")

    @functools.cached_property
    def ids(self) -> np.ndarray:
        """`prompt` as int32, made once: admission, the saved states and the slot each compare it
        with caches (each made its own, ~0.1 ms a keystroke apiece for a whole file on two cores)."""
        return np.asarray(self.prompt, np.int32)


def fim(tokenize: Tokenize, n_ctx: int, prefix: str, suffix: str = "", *, order: fim_prompt.Order = "spm",
        max_tokens: int = 128, multiline: bool = True, sampling: Sampling = Sampling(), line: str = "",
        extra: list[int] | tuple[int, ...] = (), indent: int | None = None, stop: tuple[str, ...] = (),
        shortens: bool = False, cuts: fim_prompt.Cuts | None = None) -> Task:
    """Fill in between `prefix` (+ `line`, the text typed on the cursor's line) and `suffix`.
    See fim.build_prompt for the layout, `extra` and truncation. With `shortens`, the task can
    make its short version (`Task.short`): the lines around the cursor in a given number of tokens.
    `cuts`: the last files' cuts, kept for their next keystrokes (one `Cuts` per tokenizer)."""
    prompt = fim_prompt.build_prompt(tokenize, prefix, suffix, n_ctx - max_tokens, order, line, extra, cuts)
    notes = ()
    if prompt.truncated:
        notes = (f"context full: kept the last {len(prompt.prefix)} chars of the prefix"
                 f"{' (cut)' if prompt.prefix_truncated else ''} and the first {len(prompt.suffix)} of the suffix"
                 f"{' (cut)' if prompt.suffix_truncated else ''}",)
    rules = StopRules(stop, code=True, prefix=prompt.prefix, suffix=prompt.suffix, multiline=multiline, indent=indent)
    task = Task(prompt.tokens, max_tokens, sampling, rules, truncated=prompt.truncated, notes=notes)
    if shortens:
        def short_version(short_tokens: int) -> Task:
            # Whole lines near the cursor, a few times the budget's worth of characters, so fitting
            # them tokenizes a few lines, not the file.
            span = 8 * short_tokens
            near_prefix = prefix if len(prefix) <= span else prefix[-span:].partition("\n")[2]
            head = prompt.suffix[:span]
            near_suffix = head if len(prompt.suffix) <= span else head[: head.rfind("\n") + 1]
            near = fim_prompt.build_prompt(tokenize, near_prefix, near_suffix, short_tokens, order, line, cuts=cuts)
            # One line: what a few lines of context can tell (the full context comes with later keys).
            return Task(
                near.tokens, max_tokens, sampling,
                StopRules(stop, code=True, prefix=near.prefix, suffix=near.suffix, multiline=False, indent=indent),
                prompt_deadline=task.prompt_deadline, deadline=task.deadline, reuse_cache=task.reuse_cache,
                truncated=True, short_context=True,
                notes=(f"short context: answered from the {len(near.tokens)} tokens around the cursor while the"
                       f" full prompt ({len(prompt.tokens)} tokens) is evaluated for the next keystrokes",))
        task.short = short_version
    return task


def complete(tokenize: Tokenize, n_ctx: int, text: str, *, max_tokens: int = 128, sampling: Sampling = Sampling(),
             stop: tuple[str, ...] = (), specials: Tokenize | None = None) -> Task:
    """Plain continuation of `text` (no BOS). A prompt a client laid out with Refact's FIM markers
    (PSM or SPM) is fill-in-the-middle: with `specials` (a tokenizer that parses special tokens),
    its markers become the special tokens, not text."""
    uses_markers = specials is not None and any(m in text for m in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    ids = specials(text) if uses_markers else tokenize(text)
    if len(ids) > n_ctx - 1:
        raise InputError(f"the prompt has {len(ids)} tokens; the context holds {n_ctx}", "raise --ctx")
    return Task(ids, max_tokens, sampling, StopRules(stop))


def chat(tokenize: Tokenize, n_ctx: int, messages: list[chat_prompt.Message], *, max_tokens: int = 512,
         sampling: Sampling = Sampling(temperature=0.2), stop: tuple[str, ...] = ()) -> Task:
    """The assistant's reply in Refact's chat format; it ends at the next <empty_output>."""
    prompt = chat_prompt.build_prompt(tokenize, messages, n_ctx - max_tokens)
    notes = (f"the conversation outgrew the context: dropped the {prompt.dropped} oldest message(s)",) if prompt.dropped else ()
    return Task(prompt.tokens, max_tokens, sampling, StopRules(stop, strip=True), frozenset({EMPTY_OUTPUT_ID}),
                truncated=bool(prompt.dropped), notes=notes)
