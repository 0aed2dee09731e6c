"""refact-gguf's command line: wiring only. Each command calls one library function.

Errors are typed in the library and formatted once, in `main()`: one line, the next step, and a
non-zero exit; the traceback only with REFACT_GGUF_DEBUG=1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from . import __version__
from .console import RichProgress, err, out, show_llama_log
from .errors import RefactGGUFError


class _FormattedErrors(TyperGroup):
    """Formats library errors once for every command: one line, the next step, exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
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

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Also show llama.cpp's own log on stderr.")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads (default: all cores).")]
OutDir = Annotated[Path, typer.Option("--output", "-o", help="Directory for the GGUF files.")]
QuantList = Annotated[
    Optional[str],
    typer.Option("--quant", "-q", help="Quants to make: a comma-separated list (Q4_K_M,Q8_0) or 'all' for the 22 of the table."),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"refact-gguf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Run smallcloudai/Refact-1_6B-fim as GGUF quants, fully offline."""


# ---------------------------------------------------------------------------- commands


@app.command()
def convert(
    hf_dir: Annotated[Path, typer.Argument(help="HF checkpoint directory (config.json, *.safetensors or pytorch_model.bin, tokenizer.json).")],
    output: OutDir = Path("."),
    outtype: Annotated[str, typer.Option("--outtype", help="Base GGUF precision: f32, f16 or bf16.")] = "f16",
    quant: QuantList = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Use this llama.cpp imatrix file (GGUF or legacy .dat) instead of computing one.")] = None,
    no_imatrix: Annotated[bool, typer.Option("--no-imatrix", help="Quantize without an importance matrix (IQ3_XS then fails).")] = False,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Directory of your own source code to compute the imatrix on (default: a sample of Python's standard library).")] = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens", min=512, help="Tokens of calibration text for the imatrix.")] = 4096,
    threads: Threads = None,
    verbose: Verbose = False,
) -> None:
    """Convert a Refact HF checkpoint to GGUF, faithfully, then quantize.

    Writes Refact-1_6B-fim.OUTTYPE.gguf, then one Refact-1_6B-fim.QUANT.gguf per quant.
    The model's LayerNorm stays exact under llama.cpp's RMSNorm (the residual writes are centred).
    The IQ and 3-bit-or-less quants use an importance matrix computed on code.

    **Examples**

        refact-gguf convert ./Refact-1_6B-fim -o out
        refact-gguf convert ./Refact-1_6B-fim -o out --quant Q4_K_M,Q8_0
        refact-gguf convert ./Refact-1_6B-fim -o out --outtype f32 --quant all --calibration ~/src/app
    """
    from convert import convert as run_convert

    from .catalog import load

    show_llama_log(verbose)
    quants = load().select(quant) if quant else []
    result = run_convert(
        hf_dir, output, outtype, quants,
        imatrix_file=imatrix, use_imatrix=not no_imatrix, calibration=calibration,
        calibration_tokens=calibration_tokens, threads=threads, progress=RichProgress(),
    )
    for path in [result.base, *result.quants.values()]:
        out.print(str(path))


@app.command()
def pull(
    name: Annotated[Optional[str], typer.Argument(help="Quant name (case-insensitive), e.g. Q4_K_M. Default: what `recommend` picks here.")] = None,
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Download into this directory instead of the HF cache.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if the file is already there.")] = False,
) -> None:
    """Download a prebuilt quant from the Hub, verified, resumable.

    Goes into the standard Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_TOKEN, HF_ENDPOINT and
    HF_HUB_OFFLINE are honoured). An interrupted download continues where it stopped; the file is
    checked against the Hub's sha256 and as a Refact GGUF of the right type. Pulling a file that is
    already complete makes no network request.

    **Examples**

        refact-gguf pull Q4_K_M
        refact-gguf pull                       # the quant recommended for this machine
        refact-gguf pull q8_0 --local-dir ./models
    """
    from .hub import pull as run_pull
    from .select import recommend

    if name is None:
        name = recommend()[0].name
        err.print(f"recommended for this machine: {name}")
    out.print(str(run_pull(name, local_dir=local_dir, force=force, progress=RichProgress())))


@app.command("list")
def list_quants(
    ctx_size: Annotated[int, typer.Option("--ctx", min=64, help="Context length the fit is judged for.")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every quant of the table: size, bits per weight, quality, pulled or not, fits here or not.

    **Examples**

        refact-gguf list
        refact-gguf list --json --ctx 2048
    """
    import json

    from rich.table import Table

    from .catalog import load
    from .hub import cached_quants
    from .select import estimate, fits, free_memory

    cat, memory, cached = load(), free_memory(), cached_quants()
    rows = []
    for q in cat.quants:
        est = estimate(q, ctx_size)
        rows.append({
            "name": q.name, "file": q.filename(cat.model), "size_gib": q.size_gib, "bpw": round(q.bpw(cat.model), 2),
            "quality_rank": cat.quality_rank(q), "needs_gib": round(est.total / 2**30, 2),
            "fits": fits(est, memory), "path": str(cached[q.name]) if q.name in cached else None,
        })
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"{cat.model.name} quants ({cat.model.gguf_repo})")
    for col in ("name", "size", "bits/w", "quality", "needs", "fits", "pulled"):
        table.add_column(col, justify="right" if col in ("size", "bits/w", "quality", "needs") else "left")
    for r in rows:
        table.add_row(r["name"], f"{r['size_gib']:.2f} GiB", f"{r['bpw']:.2f}", str(r["quality_rank"]), f"{r['needs_gib']:.2f} GiB",
                      "[green]yes[/]" if r["fits"] else "[red]no[/]", r["path"] or "—")
    out.print(table)


@app.command("rm")
def remove(name: Annotated[str, typer.Argument(help="Quant name, e.g. Q4_K_M.")]) -> None:
    """Remove a pulled quant from the cache.

    **Examples**

        refact-gguf rm Q4_K_M
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
