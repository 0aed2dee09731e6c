"""convert(): checkpoint → base GGUF → importance matrix → quants. One plain function."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import catalog
from ..catalog import Quant
from ..errors import OutputError
from ..progress import Progress

from . import imatrix as im
from .checkpoint import Checkpoint
from .quantize import quantize
from .refact import plan
from .vocab import load_vocab
from ..files import atomic_output
from .writer import OUTTYPES, expected_size, write_gguf


@dataclass
class ConvertResult:
    base: Path
    quants: dict[str, Path] = field(default_factory=dict)
    imatrix: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def output_name(kind: str) -> str:
    """`Refact-1_6B-fim.<KIND>.gguf`, as in the published table."""
    return catalog.load().model.file_pattern.format(name=kind)


def _check_free_space(out_dir: Path, need: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OutputError(
            f"not enough disk space in {out_dir}: need {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free",
            "free some space or pass -o on another disk",
        )


def _needs_imatrix(quants: list[Quant]) -> bool:
    return any(q.imatrix for q in quants)


def convert(
    hf_dir: Path,
    out_dir: Path,
    outtype: str = "f16",
    quants: list[Quant] | None = None,
    imatrix_file: Path | None = None,
    use_imatrix: bool = True,
    calibration: Path | None = None,
    calibration_tokens: int = 4096,
    threads: int | None = None,
    progress: Progress | None = None,
    centre: bool = True,
) -> ConvertResult:
    """Convert a GPTRefactForCausalLM checkpoint directory, then quantize.

    Writes `Refact-1_6B-fim.<OUTTYPE>.gguf` and one `Refact-1_6B-fim.<QUANT>.gguf` per quant into
    `out_dir`; every file appears under its final name only when complete. `centre=False` writes
    what llama.cpp's own converter writes (RMSNorm over uncentred weights): for measuring what the
    published files cost, never for users.
    """
    if outtype not in OUTTYPES:
        raise OutputError(f"unknown --outtype {outtype!r}", f"choose one of {', '.join(OUTTYPES)}")
    progress = progress or Progress()
    quants = quants or []
    out_dir = Path(out_dir)
    ckpt = Checkpoint.open(Path(hf_dir))  # validates config, weights, tokenizer before any write
    vocab = load_vocab(ckpt.tokenizer_json, ckpt.config.n_vocab)
    tensors = plan(ckpt, centre)
    base_size = expected_size(tensors, outtype)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out_dir}: {e.strerror}", "choose another -o directory") from None
    n_params = sum(int(np.prod(t.shape)) for t in tensors)
    model = catalog.load().model
    _check_free_space(out_dir, base_size + sum(int(n_params * q.bpw(model) / 8) for q in quants))

    result = ConvertResult(base=out_dir / output_name(outtype.upper()))
    t0 = time.perf_counter()
    progress.start(f"convert → {result.base.name}", base_size, "B")
    write_gguf(result.base, ckpt.config, vocab, tensors, outtype, source=str(hf_dir), on_bytes=progress.advance, centred=centre)
    result.seconds["convert"] = time.perf_counter() - t0
    progress.finish(f"{result.base.name} ({base_size / 2**30:.2f} GiB) in {result.seconds['convert']:.1f} s")

    imatrix = None
    if quants and use_imatrix and (_needs_imatrix(quants) or imatrix_file):
        imatrix = _importance_matrix(result, ckpt, imatrix_file, calibration, calibration_tokens, progress)

    # Twins before their aliases, so an alias is a copy; results keep the catalog's order.
    for q in sorted(quants, key=lambda q: q.alias_of is not None):
        out = out_dir / output_name(q.name)
        twin = result.quants.get(q.alias_of or "")
        t0 = time.perf_counter()
        if twin is not None:
            # Q3_K/Q4_K/Q5_K are llama.cpp's aliases of the _M recipes: same bytes, no second run.
            progress.start(f"copy {twin.name} → {out.name}", None)
            with atomic_output(out) as tmp:
                shutil.copyfile(twin, tmp)
        else:
            progress.start(f"quantize {q.name}", None)
            quantize(
                result.base, out, q, imatrix if q.imatrix else None, threads,
                on_tensor=lambda done, total: progress.update(done, total),
            )
        result.quants[q.name] = out
        result.seconds[q.name] = time.perf_counter() - t0
        progress.finish(f"{out.name} ({out.stat().st_size / 2**30:.2f} GiB) in {result.seconds[q.name]:.1f} s")
    result.quants = {q.name: result.quants[q.name] for q in quants}
    return result


def _importance_matrix(result, ckpt, imatrix_file, calibration, calibration_tokens, progress) -> im.Imatrix:
    if imatrix_file is not None:
        return im.Imatrix.load(imatrix_file)
    from ..llama import Model  # llama.cpp's tokenizer of the file just written

    t0 = time.perf_counter()
    files, dataset = im.calibration_files(calibration)
    with Model(result.base, vocab_only=True) as vocab_model:
        chunks = im.calibration_chunks(vocab_model.tokenize, files, calibration_tokens, im.DEFAULT_CHUNK)
    progress.start(f"importance matrix on {dataset} ({chunks.size} tokens)", len(chunks))
    imatrix = im.compute(result.base, ckpt.config, chunks, dataset, on_chunk=progress.advance)
    result.imatrix = result.base.with_name(output_name("imatrix"))
    with atomic_output(result.imatrix) as tmp:
        imatrix.save(tmp)
    result.seconds["imatrix"] = time.perf_counter() - t0
    progress.finish(f"{result.imatrix.name} from {chunks.size} tokens of {dataset} in {result.seconds['imatrix']:.1f} s")
    return imatrix
