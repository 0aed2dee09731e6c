"""Commands that run the model: run, chat, quickstart, serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..console import RichProgress, err, llama_output, out, server_log
from .app import (CtxSize, GpuLayers, MaxTokens, ModelRef, Temperature, Threads, Verbose, _loopback, _report,
                  _runtime, command)


@command()
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
    from ..fimsource import read_fim_input
    from ..tasks import Sampling

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


@command()
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
    from ..chat import Message
    from ..tasks import Sampling

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


@command()
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
    from ..chat import Message
    from ..quickstart import EXAMPLE_PREFIX, EXAMPLE_QUESTION, EXAMPLE_SUFFIX, choose_model
    from ..runtime import Runtime
    from ..select import open_model

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


@command()
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
    draft: Annotated[int, typer.Option("--draft", min=0, max=16, help="Draft this many tokens a step from the request's own context (the code after the cursor, the file) and keep those greedy decoding picks too: the greedy text in fewer passes when one greedy request runs, on a CPU (up to llama.cpp's summation order: at a near-tie it can differ). 0 (default): off, until measured to pay here (docs/benchmarks.md).")] = 0,
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
    from ..loader import inspect
    from ..select import resolve_model
    from ..server import Limits
    from ..server import serve as run_server
    from ..server.keys import from_options

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
