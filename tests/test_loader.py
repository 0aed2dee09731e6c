"""Corrupt and foreign GGUFs are clear errors, never a crash of the process."""

from __future__ import annotations

import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

from refact_gguf import loader
from refact_gguf.llama import Model
from refact_gguf.errors import ModelFileError
from refact_gguf.loader import inspect


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.05, 0.5, 0.999])
def test_truncated_file(q4_model, tmp_path, fraction):
    data = q4_model.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelFileError, match="truncated"):
        Model(bad)


def test_bad_magic(q4_model, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + q4_model.read_bytes()[4:])
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        Model(bad)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("x.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="is a llama model, not Refact"):
        inspect(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Model(tmp_path / "nope.gguf")


def test_cli_on_corrupt_file_exits_cleanly(q4_model, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(q4_model.read_bytes()[: q4_model.stat().st_size // 3])
    proc = subprocess.run([sys.executable, "-m", "refact_gguf.cli", "run", "x", "-m", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "truncated" in proc.stderr and "Traceback" not in proc.stderr


CXX_USING_REGEX = '#include <regex>\nextern "C" int f(const char *s) { return std::regex_match(s, std::regex("[a-z]+")); }\n'


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_detects_a_backend_that_carries_its_own_libstdcxx(tmp_path):
    # The CUDA 13 build that crashed in std::regex exported libstdc++'s locale machinery from
    # libggml-cuda.so; --exclude-libs,ALL (what setup.sh adds to CUDA builds) hides it.
    src = tmp_path / "x.cpp"
    src.write_text(CXX_USING_REGEX)
    built = {}
    for name, flags in {"static": ["-static-libstdc++"], "hidden": ["-static-libstdc++", "-Wl,--exclude-libs,ALL"], "shared": []}.items():
        built[name] = tmp_path / f"libggml-{name}.so"
        subprocess.run(["g++", "-shared", "-fPIC", *flags, str(src), "-o", str(built[name])], check=True)
    assert loader._exports_libstdcxx(built["static"])
    assert not loader._exports_libstdcxx(built["hidden"])
    assert not loader._exports_libstdcxx(built["shared"])
    assert not loader._exports_libstdcxx(src)  # not ELF: nothing to report


def test_installed_llama_cpp_has_no_build_problem():
    # What setup.sh checks after installing: this build suits this machine.
    libs = loader._backend_libraries()
    assert any(p.name.startswith("libggml-base") for p in libs)
    assert loader.build_problems() == []


@pytest.mark.parametrize("key,value,adder", [
    ("block_count", 0, "add_uint32"), ("block_count", 4096, "add_uint32"),
    ("attention.layer_norm_rms_epsilon", float("nan"), "add_float32"),
    ("attention.layer_norm_rms_epsilon", -1e-5, "add_float32"),
])
def test_impossible_hyperparameters_are_refused_before_llama_cpp(tmp_path, key, value, adder):
    """Values that passed the header check and then aborted llama.cpp."""
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(path, "refact")
    getattr(w, adder)(f"refact.{key}", value)
    w.add_tensor("x.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match=f"refact.{key} = .* is not a possible value"):
        Model(path)


def test_llama_cpp_s_own_reason_reaches_the_error(tmp_path):
    """llama.cpp ends with a generic "failed to load model"; the line that says why comes first."""
    path = tmp_path / "novocab.gguf"
    w = gguf.GGUFWriter(path, "refact")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((3, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="error loading model .*key not found in model") as e:
        Model(path)
    assert "failed to load model" not in str(e.value)
