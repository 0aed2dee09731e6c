"""The command line's app: the error formatting every command shares, the options several take,
and the small helpers between a command and the library."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..console import err, out
from ..errors import RefactGGUFError


# typer exports BadParameter but not its base, the usage error every bad command line raises.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


ORDER = ("convert", "run", "chat", "recommend", "quickstart", "serve", "bench", "eval", "pull", "list", "version", "rm")


def _flag(option):
    """--help without the `<bool>` typer prints after a flag (our own flags set metavar="")."""
    if option is not None:
        option.metavar = ""
    return option


class _Command(TyperCommand):
    def get_help_option(self, ctx):
        return _flag(super().get_help_option(ctx))


class _FormattedErrors(TyperGroup):
    """Formats errors once for every command: one line, the next step, exit 1 (2 for a bad
    command line, as Click's own boxes did)."""

    def get_help_option(self, ctx):
        return _flag(super().get_help_option(ctx))

    def list_commands(self, ctx) -> list[str]:
        """In the order of a user's day, not the order the modules register them."""
        return sorted(super().list_commands(ctx), key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

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


def command(name: str | None = None, **kw):
    """`app.command`, for a command whose help is formatted as the others'."""
    return app.command(name, cls=_Command, **kw)

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
    from ..loader import inspect
    from ..runtime import Runtime
    from ..select import open_model, resolve_model

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


QuantDir = Annotated[Optional[Path], typer.Option("--dir", help="Find --quant files in this directory (e.g. convert's output) instead of the HF cache.")]


def _models(model: Optional[str], quant: Optional[str], directory: Optional[Path]) -> list[Path]:
    from ..catalog import load
    from ..select import resolve_model

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


def _choices(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    picked = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        raise typer.BadParameter(f"{value!r}: choose from {', '.join(allowed)}", param_hint=option)
    return picked


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
