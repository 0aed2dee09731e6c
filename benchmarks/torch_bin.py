"""`pytorch_model.bin` files written opcode by opcode, no torch needed: the zip layout and the
pickle shape that `torch.save` writes (one FloatStorage per tensor), with any view the caller asks
for, including views torch would never write (past the storage, records missing)."""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class View:
    """One tensor entry: a view (offset, size, stride, in elements) of storage record `key`."""

    key: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    numel: int  # the storage's length as the pickle states it


def _text(x: str) -> bytes:
    data = x.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _ints(xs) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"


def tensor_pickle(views: dict[str, View]) -> bytes:
    """data.pkl: {name: torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})}."""
    items = b""
    for name, v in views.items():
        storage = (b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text(v.key) + _text("cpu")
                   + b"J" + struct.pack("<i", v.numel) + b"tQ")
        items += (_text(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"J" + struct.pack("<i", v.offset)
                  + _ints(v.size) + _ints(v.stride) + b"\x89}tR")
    return b"\x80\x02}(" + items + b"u."


def write(path: Path, tensors: dict[str, np.ndarray], views: dict[str, View] | None = None,
          skip_records: frozenset[str] = frozenset()) -> None:
    """Write `tensors` (as float32) as torch would; `views` overrides an entry's view, and the
    records named in `skip_records` are left out of the zip."""
    views = dict(views or {})
    with zipfile.ZipFile(path, "w") as zf:
        for i, (name, array) in enumerate(tensors.items()):
            key = str(i)
            rows = np.ascontiguousarray(array, dtype=np.float32)
            strides = tuple(s // 4 for s in rows.strides)
            views.setdefault(name, View(key, 0, rows.shape, strides, rows.size))
            if views[name].key not in skip_records:
                zf.writestr(f"archive/data/{views[name].key}", rows.tobytes())
        zf.writestr("archive/data.pkl", tensor_pickle(views))
