"""The runtime the CLI and the server share: load a model, then FIM, completion and chat.

One `Runtime` owns a llama.cpp context and remembers which tokens its KV cache holds, so a
request that shares a prefix with the previous one evaluates only the new tokens. Sampling runs
in llama.cpp's sampler chain (no logits copied to Python per token).
"""

from __future__ import annotations

import codecs
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import llama_cpp

from . import catalog, chat, fim
from .engine import Context, Model
from .errors import ModelFileError, RefactGGUFError

OnText = Callable[[str], None]
REUSE_CHUNK = 64  # shortest run of cached tokens worth shifting rather than re-evaluating


@dataclass(frozen=True)
class Sampling:
    """Greedy by default (temperature 0): code completion wants the likeliest tokens."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0


@dataclass
class Completion:
    text: str
    stop_reason: str  # eos | special | max_tokens | newline | blank line | dedent | repeats suffix | time
    prompt_tokens: int
    tokens_cached: int  # prompt tokens reused from the KV cache
    tokens_evaluated: int  # prompt tokens actually evaluated for this request
    tokens_predicted: int
    prompt_ms: float
    predicted_ms: float
    truncated: bool = False
    notes: list[str] = field(default_factory=list)


def resolve_model(ref: str | Path | None) -> Path:
    """A path, a quant name (from the cache), or None: the best pulled quant that fits here."""
    if ref is not None and (Path(ref).suffix == ".gguf" or os.sep in str(ref) or Path(ref).exists()):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ModelFileError(f"{path} does not exist", "pass a .gguf file or a quant name (refact-gguf list)")
        return path
    from .hub import cached_path, cached_quants  # only now: a path needs no Hub client
    from .select import estimate, fits, free_memory, recommend

    cat = catalog.load()
    if ref is not None:
        quant = cat.get(str(ref))
        path = cached_path(quant)
        if path is None:
            raise RefactGGUFError(f"{quant.name} is not pulled yet", f"run: refact-gguf pull {quant.name}")
        return path
    cached = cached_quants()
    memory = free_memory()
    usable = [cat.get(n) for n, p in cached.items() if fits(estimate(cat.get(n), size_bytes=p.stat().st_size), memory)]
    if usable:
        best = min(usable, key=lambda q: q.kld)
        return cached[best.name]
    if cached:
        return cached[min(cached, key=lambda n: cat.get(n).size_gib)]
    raise RefactGGUFError("no model pulled yet", f"run: refact-gguf pull {recommend(memory)[0].name}")


def gpu_layers(setting: str | int, model_path: Path) -> int:
    """`auto`: every layer when llama.cpp has a GPU backend and the model fits in free VRAM."""
    if setting != "auto":
        try:
            return int(setting)
        except ValueError:
            raise RefactGGUFError(f"--gpu-layers {setting!r}: give a number or 'auto'") from None
    if not llama_cpp.llama_supports_gpu_offload():
        return 0
    from .select import estimate, free_memory

    vram = free_memory().vram_free
    if vram is None:  # a GPU build, but no NVML to ask (Metal, ROCm, no nvidia-ml-py): llama.cpp says if it does not fit
        return 999
    return 999 if vram > estimate(None, size_bytes=model_path.stat().st_size).total else 0


class Runtime:
    """One inference slot: a context on a model. Pass a path to load (and own) the model, or a
    loaded `Model` to share it between slots (the server's --parallel)."""

    def __init__(self, model: Path | Model, n_ctx: int = 4096, n_gpu_layers: str | int = 0, threads: int | None = None):
        self._owns_model = not isinstance(model, Model)
        if self._owns_model:
            model = Model(Path(model), gpu_layers(n_gpu_layers, Path(model)))
        self.model = model
        self.path = model.path
        self.ctx = Context(self.model, n_ctx=n_ctx, threads=threads)
        self.cached: list[int] = []  # tokens the KV cache holds, in order
        self._sampler = None
        self._sampling: Sampling | None = None

    def close(self) -> None:
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
        self.ctx.close()
        if self._owns_model:
            self.model.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------- plumbing

    def tokenize(self, text: str) -> list[int]:
        """Text → ids (specials not parsed). Recent texts are remembered: between keystrokes an
        editor resends the same prefix and suffix, and re-tokenizing a whole file costs more
        than the few tokens the keystroke adds."""
        ids = self.model.token_cache.get(text)
        if ids is None:
            ids = self.model.tokenize(text, special=False)
            self.model.token_cache.put(text, ids)
        return list(ids)

    def warmup(self) -> None:
        """One decode, then an empty cache: the first real request should not pay one-time setup
        (weights paged in, GPU kernels loaded), just as llama-server warms up at start."""
        self.ctx.keep(0)
        self.ctx.decode([0])
        self.ctx.keep(0)
        self.cached = []

    def _sampler_for(self, s: Sampling):
        if self._sampler is not None and self._sampling == s:
            llama_cpp.llama_sampler_reset(self._sampler)
            return self._sampler
        if self._sampler is not None:
            llama_cpp.llama_sampler_free(self._sampler)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if s.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(s.top_k))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(s.temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(s.seed))
        self._sampler, self._sampling = chain, s
        return chain

    def common_prefix(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` the KV cache already holds."""
        n = 0
        for a, b in zip(self.cached, prompt):
            if a != b:
                break
            n += 1
        return n

    def prefill(self, prompt: list[int], deadline: float | None = None) -> tuple[int, int]:
        """Bring the KV cache to `prompt`, reusing what it holds. Returns (reused, evaluated).

        First the longest common prefix. Then llama-server's --cache-reuse: where text was
        removed (an editor's extra-context chunk dropped, lines deleted), every later run of at
        least `REUSE_CHUNK` cached tokens that continues the prompt is shifted back into place
        instead of being evaluated again. The shift is exact for Refact's ALiBi positions; the
        shifted keys and values still reflect the removed text, as in llama-server. (Text
        *inserted* before cached tokens cannot reuse them: llama.cpp decodes only after the
        last cached position.) With a deadline, stops between batches once it has passed.
        """
        last = len(prompt) - 1  # the last token is always evaluated, for its logits
        head = min(self.common_prefix(prompt), last)
        old, ctx = self.cached, self.ctx
        reused = head
        src = head  # position in the old cache; `head` is the position in the prompt
        while src < len(old) and head < last and len(old) - src >= REUSE_CHUNK:
            n = 0
            while src + n < len(old) and head + n < last and old[src + n] == prompt[head + n]:
                n += 1
            if n >= REUSE_CHUNK:
                ctx.remove(head, src)
                ctx.shift(src, src + n, head - src)
                head, src, reused = head + n, src + n, reused + n
            else:
                src += 1
        ctx.n_past = max(ctx.n_past, head)
        ctx.keep(head)  # whatever was not kept or shifted back
        done = ctx.decode(prompt[head:], deadline=deadline)
        self.cached = list(prompt[: head + done])
        return reused, done

    def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        sampling: Sampling = Sampling(),
        accept: Callable[[str], bool] = lambda text: False,
        stop_ids: Iterable[int] = (),
        deadline: float | None = None,
        prompt_deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Prefill, then sample until an end token, `max_tokens`, `accept(text) → True`, the
        deadline, or `cancel` (a client that went away)."""
        if not prompt:
            raise RefactGGUFError("empty prompt")
        if len(prompt) + max_tokens > self.ctx.n_ctx:
            max_tokens = max(0, self.ctx.n_ctx - len(prompt))
        t0 = time.perf_counter()
        cached, evaluated = self.prefill(prompt, prompt_deadline)
        t1 = time.perf_counter()
        if len(self.cached) < len(prompt):  # the prompt deadline passed mid-prefill
            return Completion("", "time", len(prompt), cached, evaluated, 0, (t1 - t0) * 1e3, 0.0)
        # Greedy needs no sampler: an argmax over a view of the logits is ~10× cheaper per token
        # than llama.cpp's sampler, which first copies every logit into a candidate array.
        greedy = sampling.temperature <= 0
        smpl = None if greedy else self._sampler_for(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = self.model.stop_tokens | set(stop_ids)
        reason, n = "max_tokens", 0
        while n < max_tokens:
            tok = int(self.ctx.logits_last().argmax()) if greedy else llama_cpp.llama_sampler_sample(smpl, self.ctx.ptr, -1)
            if tok in stops:
                reason = "eos" if llama_cpp.llama_vocab_is_eog(self.model.vocab, tok) else "special"
                break
            n += 1
            if accept(decoder.decode(self.model.piece(tok))):
                reason = "rules"
                break
            if n >= max_tokens:
                break
            if deadline is not None and time.perf_counter() > deadline:
                reason = "time"
                break
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            self.ctx.decode_one(tok)
            self.cached.append(tok)
        accept(decoder.decode(b"", final=True))
        t2 = time.perf_counter()
        return Completion("", reason, len(prompt), cached, evaluated, n, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    # -------------------------------------------------------------------------- tasks

    def fim(
        self,
        prefix: str,
        suffix: str = "",
        order: fim.Order = "spm",
        max_tokens: int = 128,
        multiline: bool = True,
        sampling: Sampling = Sampling(),
        on_text: OnText | None = None,
        deadline: float | None = None,
        line: str = "",
        extra: list[int] | tuple[int, ...] = (),
        indent: int | None = None,
        stop: tuple[str, ...] = (),
        prompt_deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Fill in between `prefix` (+ `line`, the text typed on the cursor's line) and `suffix`;
        `on_text` receives the completion as it firms up. See fim.build_prompt for `extra`."""
        prompt = fim.build_prompt(self.tokenize, prefix, suffix, self.ctx.n_ctx - max_tokens, order, line, extra)
        rules = fim.StopRules(prompt.prefix, prompt.suffix, multiline, indent, stop)
        sent = [0]

        def accept(piece: str) -> bool:
            stop = rules.feed(piece)
            if on_text:
                safe = rules.safe()
                if len(safe) > sent[0]:
                    on_text(safe[sent[0]:])
                    sent[0] = len(safe)
            return stop

        result = self.generate(prompt.tokens, max_tokens, sampling, accept, deadline=deadline,
                               prompt_deadline=prompt_deadline, cancel=cancel)
        result.text = rules.final()
        if rules.stopped:
            result.stop_reason = rules.stopped
        if on_text and len(result.text) > sent[0]:
            on_text(result.text[sent[0]:])
        result.truncated = prompt.truncated
        if prompt.truncated:
            result.notes.append(
                f"context full: kept the last {len(prompt.prefix)} chars of the prefix"
                f"{' (cut)' if prompt.prefix_truncated else ''} and the first {len(prompt.suffix)} of the suffix"
                f"{' (cut)' if prompt.suffix_truncated else ''}"
            )
        return result

    def complete(self, text: str, max_tokens: int = 128, sampling: Sampling = Sampling(), on_text: OnText | None = None,
                 stop: tuple[str, ...] = (), cancel: threading.Event | None = None) -> Completion:
        """Plain continuation of `text` (no BOS, special tokens not parsed)."""
        ids = self.tokenize(text)
        if len(ids) > self.ctx.n_ctx - 1:
            raise RefactGGUFError(f"the prompt has {len(ids)} tokens; the context holds {self.ctx.n_ctx}", "raise --ctx")
        collector = _Collector(stop, on_text)
        result = self.generate(ids, max_tokens, sampling, collector.feed, cancel=cancel)
        return collector.finish(result)

    def chat(self, messages: list[chat.Message], max_tokens: int = 512, sampling: Sampling = Sampling(temperature=0.2),
             on_text: OnText | None = None, stop: tuple[str, ...] = (), cancel: threading.Event | None = None) -> Completion:
        """The assistant's reply in Refact's chat format; stops at the next <empty_output>."""
        prompt = chat.build_prompt(self.tokenize, messages, self.ctx.n_ctx - max_tokens)
        collector = _Collector(stop, on_text, strip_leading=True)
        result = self.generate(prompt.tokens, max_tokens, sampling, collector.feed, stop_ids=[chat.EMPTY_OUTPUT_ID], cancel=cancel)
        result = collector.finish(result)
        result.text = result.text.rstrip()
        if prompt.dropped:
            result.truncated = True
            result.notes.append(f"the conversation outgrew the context: dropped the {prompt.dropped} oldest message(s)")
        return result


class _Collector:
    """Collects generated text, cuts at the first stop string, and streams only text that a stop
    string arriving later cannot take back."""

    def __init__(self, stop: tuple[str, ...], on_text: OnText | None, strip_leading: bool = False):
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.on_text = on_text
        self.strip_leading = strip_leading  # chat replies start after "ASSISTANT" with a space
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> bool:
        if self.stopped:
            return True
        self.text += piece
        if self.strip_leading:
            self.text = self.text.lstrip()
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        self._emit(len(self.text) if self.stopped else len(self.text) - self.hold)
        return self.stopped

    def _emit(self, upto: int) -> None:
        if self.on_text and upto > self.sent:
            self.on_text(self.text[self.sent : upto])
            self.sent = upto

    def finish(self, result: Completion) -> Completion:
        self._emit(len(self.text))
        result.text = self.text
        if self.stopped:
            result.stop_reason = "stop string"
        return result
