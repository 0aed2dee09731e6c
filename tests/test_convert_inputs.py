"""Checkpoint layouts the converter reads, and every bad input: a clear error, nothing left behind."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from refact_gguf.convert import convert, writer
from refact_gguf.convert.checkpoint import Checkpoint
from refact_gguf.errors import CheckpointError, OutputError, TensorError

from benchmarks import torch_bin



def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists() or list(out_dir.iterdir()) == [], list(out_dir.iterdir())


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_safetensors(path: Path, header: dict, tensors: dict[str, bytes]) -> None:
    offset, meta = 0, {}
    for name, blob in tensors.items():
        meta[name] = {**header[name], "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    text = json.dumps(meta).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(tensors.values()))


def _tensor_bytes(header: dict, data: bytes) -> dict[str, bytes]:
    return {n: data[h["data_offsets"][0] : h["data_offsets"][1]] for n, h in header.items() if n != "__metadata__"}


def _all_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    return {n: t.read() for n, t in Checkpoint.open(hf_dir).tensors.items()}


# ------------------------------------------------------------------------------- layouts


def test_sharded_safetensors_with_index(hf_fused, tmp_path):
    hf = _copy(hf_fused, tmp_path / "hf")
    header, data = _read_safetensors(hf / "model.safetensors")
    blobs = _tensor_bytes(header, data)
    names = list(blobs)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, part in shards.items():
        _write_safetensors(hf / shard, header, {n: blobs[n] for n in part})
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: s for s, part in shards.items() for n in part}}))
    original, sharded = _all_weights(hf_fused), _all_weights(hf)
    assert original.keys() == sharded.keys()
    assert all(np.array_equal(original[n], sharded[n]) for n in original)


def test_pytorch_bin_read_without_torch_code(hf_fused, tmp_path, sample_tokens):
    torch = pytest.importorskip("torch")
    hf = _copy(hf_fused, tmp_path / "hf")
    state = {n: torch.from_numpy(a).to(torch.float16) for n, a in _all_weights(hf_fused).items()}
    # a non-contiguous view too, as torch checkpoints hold them
    state["transformer.h.0.attn.q.weight"] = state["transformer.h.0.attn.q.weight"].t().contiguous().t()
    torch.save(state, hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    original, from_bin = _all_weights(hf_fused), _all_weights(hf)
    assert all(np.array_equal(original[n], from_bin[n]) for n in original)
    result = convert(hf, tmp_path / "out", "f32")
    assert result.base.is_file()


def test_pytorch_bin_as_torch_writes_it(hf_fused, tmp_path):
    """The same check where torch is not installed: the file written opcode by opcode, one tensor
    stored transposed (a non-contiguous view of its storage)."""
    hf = _copy(hf_fused, tmp_path / "hf")
    weights = _all_weights(hf_fused)
    q = "transformer.h.0.attn.q.weight"
    tensors = {**weights, q: weights[q].T}  # stored transposed; the view below turns it back
    rows, cols = weights[q].shape
    key = str(list(tensors).index(q))
    torch_bin.write(hf / "pytorch_model.bin", tensors, {q: torch_bin.View(key, 0, (rows, cols), (1, rows), rows * cols)})
    (hf / "model.safetensors").unlink()
    from_bin = _all_weights(hf)
    assert all(np.array_equal(weights[n].astype(np.float32), from_bin[n]) for n in weights)
    assert convert(hf, tmp_path / "out", "f32").base.is_file()


def test_malicious_pickle_is_refused_not_run(hf_fused, tmp_path):
    hf = _copy(hf_fused, tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (shutil.copy, (str(hf / "config.json"), str(marker)))

    buf = io.BytesIO()
    pickle.dump({"transformer.wte.weight": Evil()}, buf, protocol=2)
    with zipfile.ZipFile(hf / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
    with pytest.raises(CheckpointError, match="refusing to load shutil.copy"):
        convert(hf, tmp_path / "out")
    assert not marker.exists()
    _assert_nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------- bad input


def _broken(hf_fused, tmp_path, mutate) -> tuple[Path, Path]:
    hf = _copy(hf_fused, tmp_path / "hf")
    mutate(hf)
    return hf, tmp_path / "out"


def _raw_header(hf: Path, header: bytes) -> None:
    (hf / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)


CASES = {
    "missing config": (lambda hf: (hf / "config.json").unlink(), CheckpointError, "no config.json"),
    "invalid config": (lambda hf: (hf / "config.json").write_text("{not json"), CheckpointError, "not valid JSON"),
    "wrong architecture": (
        lambda hf: (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "n_layer": 2})),
        CheckpointError, "describes LlamaForCausalLM, not GPTRefactForCausalLM",
    ),
    "missing tokenizer": (lambda hf: (hf / "tokenizer.json").unlink(), CheckpointError, "no tokenizer.json"),
    "missing weights": (lambda hf: (hf / "model.safetensors").unlink(), CheckpointError, "no weights"),
    "truncated safetensors": (
        lambda hf: (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:-1000]),
        CheckpointError, "truncated or corrupt: tensor",
    ),
    "corrupt safetensors header": (
        lambda hf: (hf / "model.safetensors").write_bytes(
            (raw := (hf / "model.safetensors").read_bytes())[:8] + b"\xff" * 64 + raw[72:]
        ),
        CheckpointError, "corrupt safetensors header",
    ),
    "n_head 0": (
        lambda hf: (hf / "config.json").write_text((hf / "config.json").read_text().replace('"n_head": 4', '"n_head": 0')),
        CheckpointError, "n_head is 0, it must be between 1 and",
    ),
    "n_layer 10**12 (ran for ever)": (
        lambda hf: (hf / "config.json").write_text((hf / "config.json").read_text().replace('"n_layer": 2', '"n_layer": 1000000000000')),
        CheckpointError, "n_layer is 1000000000000, it must be between 1 and 512",
    ),
    "n_positions 10**12 (a traceback)": (
        lambda hf: (hf / "config.json").write_text((hf / "config.json").read_text().replace('"n_positions": 4096', '"n_positions": 1000000000000')),
        CheckpointError, "n_ctx is 1000000000000, it must be between",
    ),
    "safetensors header a list": (lambda hf: _raw_header(hf, b"[1, 2]"), CheckpointError, "not a JSON object"),
    "safetensors entry a number": (lambda hf: _raw_header(hf, b'{"transformer.wte.weight": 5}'), CheckpointError, "entry"),
    "one-element data_offsets": (
        lambda hf: _raw_header(hf, b'{"transformer.wte.weight": {"dtype": "F16", "shape": [2], "data_offsets": [0]}}'),
        CheckpointError, "entry",
    ),
    "non-integer shape": (
        lambda hf: _raw_header(hf, b'{"transformer.wte.weight": {"dtype": "F16", "shape": ["a"], "data_offsets": [0, 4]}}'),
        CheckpointError, "entry",
    ),
    "layer count mismatch": (
        lambda hf: (hf / "config.json").write_text((hf / "config.json").read_text().replace('"n_layer": 2', '"n_layer": 3')),
        TensorError, "lacks",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint(hf_fused, tmp_path, case):
    mutate, error, message = CASES[case]
    hf, out = _broken(hf_fused, tmp_path, mutate)
    with pytest.raises(error, match=message):
        convert(hf, out, quants=[])
    _assert_nothing_written(out)


def test_unknown_tensor_is_named(hf_fused, tmp_path):
    def add_bias(hf):
        header, data = _read_safetensors(hf / "model.safetensors")
        blobs = _tensor_bytes(header, data)
        header["transformer.h.0.attn.q.bias"] = {"dtype": "F16", "shape": [256]}
        blobs["transformer.h.0.attn.q.bias"] = np.zeros(256, np.float16).tobytes()
        _write_safetensors(hf / "model.safetensors", header, blobs)

    hf, out = _broken(hf_fused, tmp_path, add_bias)
    with pytest.raises(TensorError, match=r"unknown tensor transformer\.h\.0\.attn\.q\.bias"):
        convert(hf, out)
    _assert_nothing_written(out)


def test_wrong_shape_is_named(hf_fused, tmp_path):
    def reshape(hf):
        header, data = _read_safetensors(hf / "model.safetensors")
        header["transformer.h.1.attn.c_proj.weight"]["shape"] = [128, 512]
        _write_safetensors(hf / "model.safetensors", header, _tensor_bytes(header, data))

    hf, out = _broken(hf_fused, tmp_path, reshape)
    with pytest.raises(TensorError, match=r"transformer\.h\.1\.attn\.c_proj\.weight has shape \[128, 512\]"):
        convert(hf, out)
    _assert_nothing_written(out)


def test_output_not_writable(hf_fused, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot create"):
        convert(hf_fused, blocker / "out")


def test_not_enough_disk_refused_before_writing(hf_fused, tmp_path, monkeypatch):
    from refact_gguf.convert import pipeline

    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10, 10))
    with pytest.raises(OutputError, match="not enough disk space"):
        convert(hf_fused, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_disk_full_mid_write_leaves_nothing(hf_fused, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writer._encode

    def failing(rows, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(rows, qtype)

    monkeypatch.setattr(writer, "_encode", failing)
    with pytest.raises(OutputError, match="disk full while writing Refact-1_6B-fim.F16.gguf"):
        convert(hf_fused, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_failed_quantization_leaves_no_partial_file(hf_fused, tmp_path):
    from refact_gguf import catalog
    from refact_gguf.errors import QuantizeError

    with pytest.raises(QuantizeError, match="imatrix"):
        convert(hf_fused, tmp_path / "out", "f16", [catalog.load().get("IQ3_XS")], use_imatrix=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Refact-1_6B-fim.F16.gguf"]


@pytest.mark.parametrize("offset,size,stride", [(0, (4, 4), (4, 1)), (3, (2, 2), (1, 1)), (0, (2, 3), (100, 1))])
def test_a_tensor_view_past_its_storage_is_refused(tmp_path, offset, size, stride):
    from refact_gguf.convert.checkpoint import _torch_bin_tensors

    path = tmp_path / "pytorch_model.bin"
    torch_bin.write(path, {"w": np.arange(4, dtype=np.float32)}, {"w": torch_bin.View("0", offset, size, stride, 4)})
    (tensor,) = _torch_bin_tensors(path)
    with pytest.raises(CheckpointError, match="runs past its storage"):
        tensor.read()


def test_a_float32_bin_tensor_reads_as_a_writable_copy(tmp_path):
    from refact_gguf.convert.checkpoint import _torch_bin_tensors

    path = tmp_path / "pytorch_model.bin"
    torch_bin.write(path, {"w": np.arange(4, dtype=np.float32).reshape(2, 2)})
    (tensor,) = _torch_bin_tensors(path)
    rows = tensor.read()
    rows -= rows.mean(axis=1, keepdims=True)  # the converter centres in place
    assert rows.tolist() == [[-0.5, 0.5], [-0.5, 0.5]]


def test_partial_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    from refact_gguf.files import atomic_output

    target = tmp_path / "Refact-1_6B-fim.Q4_K_M.gguf"
    dead = _dead_pid()
    stale = tmp_path / f".{target.name}.{dead}.partial"
    live = tmp_path / f".{target.name}.{os.getppid()}.partial"  # a running convert's: left alone
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"GGUF")
    assert target.read_bytes() == b"GGUF" and not stale.exists() and live.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_malformed_pickle_is_one_error(tmp_path):
    from refact_gguf.convert.checkpoint import _torch_bin_tensors

    path = tmp_path / "pytorch_model.bin"
    # OrderedDict() then BUILD with a state: the unpickler maps OrderedDict to dict, which has no __setstate__
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb.")
    with pytest.raises(CheckpointError, match="cannot read safely"):
        list(_torch_bin_tensors(path))


def test_a_short_write_on_a_full_disk_says_disk_full(tmp_path, monkeypatch):
    """numpy's tofile reports a full disk as "N requested and M written", with no errno (seen on a
    3 MB tmpfs); the user should read "disk full"."""
    from refact_gguf import files

    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OutputError, match="disk full while writing x.gguf"):
        with files.atomic_output(tmp_path / "x.gguf") as tmp:
            tmp.write_bytes(b"GGUF")
            raise OSError("4194304 requested and 1168 written")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
