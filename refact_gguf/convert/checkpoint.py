"""Read a GPTRefactForCausalLM checkpoint directory lazily: config, tensors, tokenizer files.

Tensors are read on demand, row range by row range, with plain `pread` rather than a memory map:
a mapped file's touched pages count in the process's RSS until it exits, a read buffer is freed
as soon as the tensor is written. That keeps a full-size conversion's peak RSS near the size of
the largest single tensor in float32.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..catalog import HYPERPARAMETER_RANGES, ffn_width
from ..errors import CheckpointError

ARCHITECTURE = "GPTRefactForCausalLM"
# safetensors / torch dtype name → (numpy storage dtype, itemsize)
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass(frozen=True)
class RefactConfig:
    """The hyperparameters of config.json that the GGUF and the forward pass need."""

    n_layer: int
    n_embd: int
    n_head: int
    n_ctx: int
    n_vocab: int
    eps: float
    name: str = "Refact-1_6B-fim"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_ff(self) -> int:
        return ffn_width(self.n_embd)

    @classmethod
    def from_json(cls, path: Path) -> RefactConfig:
        if not path.is_file():
            raise CheckpointError(f"no config.json in {path.parent}", "is this a Hugging Face checkpoint directory?")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"config.json is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError("config.json is not a JSON object")
        archs = cfg.get("architectures") or []
        if ARCHITECTURE not in archs:
            found = ", ".join(archs) or cfg.get("model_type") or "none"
            raise CheckpointError(
                f"config.json describes {found}, not {ARCHITECTURE}",
                "refact-gguf converts only Refact checkpoints such as smallcloudai/Refact-1_6B-fim",
            )
        try:
            config = cls(
                n_layer=int(cfg["n_layer"]),
                n_embd=int(cfg["n_embd"]),
                n_head=int(cfg["n_head"]),
                n_ctx=int(cfg.get("n_positions", 4096)),
                n_vocab=int(cfg["vocab_size"]),
                eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                name=str(cfg.get("_name_or_path") or "Refact-1_6B-fim").rstrip("/").split("/")[-1],
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json has a bad value: {e}") from None
        for field_name in ("n_layer", "n_embd", "n_head", "n_ctx", "n_vocab"):  # what the loader will accept
            value, (least, most) = getattr(config, field_name), HYPERPARAMETER_RANGES[field_name]
            if not least <= value <= most:
                raise CheckpointError(f"config.json: {field_name} is {value}, it must be between {least} and {most}")
        if not 0 < config.eps < 1:
            raise CheckpointError(f"config.json: layer_norm_epsilon {config.eps} is not a usable epsilon")
        if config.n_embd % config.n_head:
            raise CheckpointError(f"config.json: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        if config.n_head & (config.n_head - 1):
            # llama.cpp interpolates ALiBi slopes for non-power-of-two head counts; Refact does not.
            raise CheckpointError(
                f"n_head {config.n_head} is not a power of two: llama.cpp's ALiBi slopes would differ from the model's"
            )
        return config


@dataclass
class LazyTensor:
    """A tensor in a file, read only when asked; `read()` returns float32, shape as stored."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # F32 / F16 / BF16 / F64
    _read_rows: Callable[[int, int], np.ndarray] = field(repr=False)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return _to_f32(self.read_raw(start, stop), self.dtype)

    def read_raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows as stored (float16, float32, or bfloat16 bits as uint16): for byte-exact copies."""
        return self._read_rows(start, self.rows if stop is None else stop)


def _to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # numpy has no bfloat16: widen the bits
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------- safetensors


def _safetensors_tensors(path: Path) -> Iterator[LazyTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is truncated (no safetensors header)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path.name} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a corrupt safetensors header (not a JSON object)")
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = _header_entry(info) if isinstance(info, dict) else (None, None, None)
        if shape is None or offsets is None:
            raise CheckpointError(f"{path.name} has a corrupt safetensors header (entry {name[:80]!r})")
        begin, end = offsets
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != numel * itemsize or base + end > size:
            raise CheckpointError(
                f"{path.name} is truncated or corrupt: tensor {name} needs bytes {base + begin}..{base + end}, file has {size}",
                "download the checkpoint again",
            )
        yield LazyTensor(name, shape, dtype, _pread_rows(path, base + begin, shape, _DTYPES[dtype]))


def _header_entry(info: dict) -> tuple:
    """(dtype, shape, (begin, end)) of one safetensors header entry; None for a part that is malformed."""
    shape, offsets = info.get("shape", []), info.get("data_offsets")
    ok_ints = lambda xs, n=None: isinstance(xs, list) and (n is None or len(xs) == n) and all(  # noqa: E731
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    return (info.get("dtype"), tuple(shape) if ok_ints(shape) else None,
            tuple(offsets) if ok_ints(offsets, 2) and offsets[0] <= offsets[1] else None)


def _pread_rows(path: Path, offset: int, shape: tuple[int, ...], np_dtype) -> Callable[[int, int], np.ndarray]:
    row_items = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = row_items * np.dtype(np_dtype).itemsize

    def read(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *shape[1:]) if shape else (), dtype=np_dtype)
        fd = os.open(path, os.O_RDONLY)
        try:
            view, pos, done = memoryview(out.reshape(-1).view(np.uint8)), offset + start * row_bytes, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], pos + done)
                if got <= 0:
                    raise CheckpointError(f"{path.name} is truncated")
                done += got
        finally:
            os.close(fd)
        return out

    return read


# ---------------------------------------------------------------------------------- pytorch_model.bin


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's data.pkl without torch and without running any code.

    Only the handful of globals a state dict needs are resolved, to inert stand-ins; anything
    else (os.system, eval, …) is refused.
    """

    _STORAGES = {"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64"}

    def __init__(self, fileobj, load_storage: Callable[[str, str], np.ndarray]):
        super().__init__(fileobj)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in self._STORAGES:
            return self._STORAGES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickle")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or dtype not in _DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
        return (dtype, key, self._load_storage)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    dtype, key, load = storage
    shape, stride = tuple(size), tuple(stride)
    if not all(isinstance(v, int) and v >= 0 for v in (offset, *shape, *stride)) or len(shape) != len(stride):
        raise pickle.UnpicklingError(f"tensor view with offset {offset!r}, size {shape!r}, stride {stride!r}")

    def read(start: int, stop: int) -> np.ndarray:
        flat = load(key, dtype)
        # The view must lie inside its storage: as_strided reads whatever memory the numbers say.
        last = offset + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else offset - 1
        if last >= len(flat):
            raise CheckpointError(f"a tensor's view (offset {offset}, size {shape}, stride {stride}) runs past its "
                                  f"storage of {len(flat)} elements: the checkpoint is corrupt")
        item = flat.itemsize
        full = np.lib.stride_tricks.as_strided(flat[offset:], shape=shape, strides=[st * item for st in stride])
        return np.array(full[start:stop] if shape else full)  # a copy: the storage is a read-only zip buffer

    return LazyTensor("", shape, dtype, read)


def _torch_bin_tensors(path: Path) -> Iterator[LazyTensor]:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path.name} is not a zip-format torch checkpoint (truncated, or saved by torch < 1.6)",
            "convert it to safetensors, or re-save it with a current torch",
        )
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        raise CheckpointError(f"{path.name} has no data.pkl: not a torch checkpoint")
    prefix = pkl[: -len("data.pkl")]

    def load_storage(key: str, dtype: str) -> np.ndarray:
        try:
            data = zf.read(f"{prefix}data/{key}")
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path.name}: storage {key!r} cannot be read ({e})", "the checkpoint is incomplete or corrupt") from None
        if len(data) % np.dtype(_DTYPES[dtype]).itemsize:
            raise CheckpointError(f"{path.name}: storage {key!r} is not a whole number of {dtype} values")
        return np.frombuffer(data, dtype=_DTYPES[dtype])

    try:
        state = _RestrictedUnpickler(zf.open(pkl), load_storage).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle (a BUILD on a dict, a bad opcode…) is one error
        raise CheckpointError(f"{path.name}: cannot read safely: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    for name, value in state.items():
        if isinstance(value, LazyTensor):
            value.name = name
            yield value


# ---------------------------------------------------------------------------------- directory


@dataclass
class Checkpoint:
    directory: Path
    config: RefactConfig
    tensors: dict[str, LazyTensor]
    tokenizer_json: Path

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a directory", "pass the folder that holds config.json")
        config = RefactConfig.from_json(directory / "config.json")
        tokenizer = directory / "tokenizer.json"
        if not tokenizer.is_file():
            raise CheckpointError(
                f"no tokenizer.json in {directory}", "copy it from the model's Hub repo next to config.json"
            )
        tensors: dict[str, LazyTensor] = {}
        for t in _weight_tensors(directory):
            tensors[t.name] = t
        return cls(directory, config, tensors, tokenizer)


def _weight_tensors(directory: Path) -> Iterator[LazyTensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index.name} is corrupt") from None
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"shard {shard} listed in {index.name} is missing")
            yield from _safetensors_tensors(directory / shard)
        return
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        for shard in shards:
            yield from _safetensors_tensors(shard)
        return
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        for b in bins:
            yield from _torch_bin_tensors(b)
        return
    raise CheckpointError(
        f"no weights in {directory}", "expected model.safetensors, model-0000K-of-0000N.safetensors or pytorch_model.bin"
    )
