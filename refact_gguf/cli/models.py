"""Commands that make, fetch, choose and list the model files: convert, pull, recommend, list, rm, version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..console import RichProgress, err, llama_output, out
from .app import CtxSize, QuantList, Threads, Verbose, command


@command()
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
    from ..convert import convert as run_convert
    from ..hub import checkpoint_source

    from ..catalog import load

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


@command()
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
    from .. import measured
    from ..catalog import load
    from ..console import show
    from ..hub import cached_quants
    from ..select import MARGIN, fits, free_memory
    from ..select import recommend as pick

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


@command()
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
    from ..hub import pull as run_pull
    from ..select import recommend

    if name is None:
        name = recommend()[0].name
        err.print(f"recommended for this machine: {escape(name)}")
    from ..loader import inspect

    path = run_pull(name, local_dir=local_dir, force=force, progress=RichProgress(), as_published=as_published)
    err.print(f"[dim]{escape(inspect(path).fidelity_note)}[/]", soft_wrap=True)
    out.print(str(path))


@command("list")
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
    from .. import measured
    from ..catalog import load
    from ..console import show
    from ..hub import cached_quants
    from ..loader import inspect
    from ..select import estimate, fits, free_memory

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


@command()
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

    from ..loader import build_report

    report = build_report()
    if as_json:
        out.print_json(json.dumps(report))
        return
    for key, value in report.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        out.print(f"{key}: {'none' if shown in ('', None) else shown}")


@command("rm")
def remove(name: Annotated[str, typer.Argument(help="Quant name, e.g. Q4_K_M.")]) -> None:
    """Remove a pulled quant from the cache.

    **Examples**

    ```
    refact-gguf rm Q4_K_M
    ```
    """
    from ..hub import remove as run_remove

    for path in run_remove(name):
        out.print(f"removed {path}")
