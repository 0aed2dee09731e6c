"""Importance matrix: the mean squared activation entering each weight column, on code.

Computed as llama.cpp's imatrix tool does (Σx²/n per input column of every matrix), but from our
numpy forward pass over the converted base GGUF, layer by layer. Default calibration: a fixed
sample of the Python standard library's own source, present on every machine. llama.cpp's imatrix
files (GGUF `*.in_sum2`/`*.counts`, or the legacy `.dat`) are read and written too.
"""

from __future__ import annotations

import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ..errors import CheckpointError, ModelFileError

from .checkpoint import RefactConfig
from .reference import ActivationStats, forward

# A fixed, varied sample of the standard library (parsers, numerics, text, OS glue, classes).
STDLIB_SAMPLE = (
    "fnmatch.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "heapq.py", "bisect.py",
    "shlex.py", "difflib.py", "argparse.py", "functools.py", "statistics.py", "fractions.py",
    "dataclasses.py", "pathlib.py", "csv.py", "configparser.py", "string.py", "calendar.py",
)
DEFAULT_CHUNK = 512


@dataclass
class Imatrix:
    """Per-tensor Σx² per input column and the number of rows seen (llama.cpp's raw form)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    dataset: str = ""
    chunks: int = 0
    chunk_size: int = DEFAULT_CHUNK

    def mean_sq(self, name: str) -> np.ndarray:
        return (self.sums[name] / max(self.counts[name], 1)).astype(np.float32)

    # ------------------------------------------------------------------ llama.cpp file formats

    def save(self, path: Path) -> None:
        """Write llama.cpp's GGUF imatrix format (readable by llama-quantize --imatrix)."""
        w = gguf.GGUFWriter(path, arch="imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # imatrix files carry none
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [self.dataset or "unknown"])
        w.add_uint32("imatrix.chunk_count", self.chunks)
        w.add_uint32("imatrix.chunk_size", self.chunk_size)
        for name in sorted(self.sums):
            w.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[float(self.counts[name])]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    @classmethod
    def load(cls, path: Path) -> Imatrix:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"imatrix file {path} not found")
        with open(path, "rb") as f:
            magic = f.read(4)
        try:
            return cls._load_gguf(path) if magic == b"GGUF" else cls._load_legacy(path)
        except (ValueError, struct.error, KeyError, IndexError) as e:
            raise CheckpointError(f"{path.name} is not a readable llama.cpp imatrix file: {e}") from None

    @classmethod
    def _load_gguf(cls, path: Path) -> Imatrix:
        r = gguf.GGUFReader(path)
        sums, counts = {}, {}
        for t in r.tensors:
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float64).reshape(-1)
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = int(round(float(np.array(t.data).reshape(-1)[0])))
        datasets = r.fields.get("imatrix.datasets")
        chunks = r.fields.get("imatrix.chunk_count")
        return cls(
            sums, counts,
            dataset=str(datasets.contents()[0]) if datasets else path.name,
            chunks=int(chunks.contents()) if chunks else 0,
        )

    @classmethod
    def _load_legacy(cls, path: Path) -> Imatrix:
        # int32 n; n × (int32 len, name, int32 ncall, int32 nval, float[nval]); optional int32 chunks,
        # int32 len, dataset. Values are mean-of-squares × ncall.
        data = path.read_bytes()
        (n,), pos = struct.unpack_from("<i", data), 4
        sums, counts = {}, {}
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", data, pos)
            name = data[pos + 4 : pos + 4 + ln].decode()
            pos += 4 + ln
            ncall, nval = struct.unpack_from("<ii", data, pos)
            pos += 8
            values = np.frombuffer(data, dtype=np.float32, count=nval, offset=pos).astype(np.float64)
            pos += 4 * nval
            sums[name], counts[name] = values, max(ncall, 1)
        chunks, dataset = 0, path.name
        if pos + 8 <= len(data):
            (chunks, ln) = struct.unpack_from("<ii", data, pos)
            dataset = data[pos + 8 : pos + 8 + ln].decode(errors="replace")
        return cls(sums, counts, dataset=dataset, chunks=chunks)


def calibration_files(directory: Path | None) -> tuple[list[Path], str]:
    """Source files to calibrate on, and a label recorded in the GGUF metadata."""
    if directory is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = [stdlib / name for name in STDLIB_SAMPLE if (stdlib / name).is_file()]
        return files, "python-stdlib-sample"
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"calibration directory {directory} not found")
    suffixes = {".py", ".js", ".ts", ".go", ".rs", ".c", ".h", ".cpp", ".java", ".rb", ".php", ".cs", ".kt", ".swift", ".sh"}
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise CheckpointError(f"no source files in {directory}", f"expected files ending in {', '.join(sorted(suffixes))}")
    return files, directory.name


def calibration_chunks(tokenize: Callable[[str], list[int]], files: list[Path], n_tokens: int, chunk: int) -> np.ndarray:
    """Token ids [n_chunks, chunk] taken file by file until `n_tokens` are collected."""
    ids: list[int] = []
    for path in files:
        ids += tokenize(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= n_tokens:
            break
    n = min(len(ids), n_tokens) // chunk
    if n == 0:
        raise CheckpointError(f"calibration text has {len(ids)} tokens, fewer than one chunk of {chunk}")
    return np.array(ids[: n * chunk], dtype=np.int64).reshape(n, chunk)


def compute(
    base_gguf: Path,
    cfg: RefactConfig,
    chunks: np.ndarray,
    dataset: str,
    batch: int = 4,
    on_chunk: Callable[[int], None] = lambda n: None,
) -> Imatrix:
    """Run the calibration chunks through the base GGUF's weights and collect Σx² per column."""
    try:
        reader = gguf.GGUFReader(base_gguf)
    except (ValueError, OSError) as e:
        raise ModelFileError(f"cannot read {base_gguf}: {e}") from None
    tensors = {t.name: t for t in reader.tensors}

    def weights(name: str) -> np.ndarray:
        t = tensors[name]
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            return gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(t.data, dtype=np.float32)

    stats = ActivationStats()
    for start in range(0, len(chunks), batch):
        forward(weights, cfg, chunks[start : start + batch], dtype=np.float32, stats=stats, logits=False)
        on_chunk(min(batch, len(chunks) - start))
    return Imatrix(stats.sum_sq, stats.count, dataset=dataset, chunks=len(chunks), chunk_size=chunks.shape[1])
