"""`--quant all`: the 22 files of the published table, each loadable and sane."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from refact_gguf.convert.imatrix import Imatrix
from refact_gguf.convert.quantize import quantize
from refact_gguf.convert.reference import kl_divergence
from refact_gguf import catalog
from refact_gguf.llama import Model, sequence_logits
from refact_gguf.loader import inspect

pytestmark = pytest.mark.slow
CAT = catalog.load()


def test_all_22_files_named_as_published(all_quants):
    assert list(all_quants.quants) == CAT.names()
    assert len(all_quants.quants) == 22
    for q in CAT.quants:
        assert all_quants.quants[q.name].name == f"Refact-1_6B-fim.{q.name}.gguf"
    leftovers = [p.name for p in all_quants.base.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("name", CAT.names())
def test_quant_loads_with_finite_logits(all_quants, sample_tokens, name):
    path = all_quants.quants[name]
    info = inspect(path)
    assert info.file_type == CAT.get(name).ftype
    logits = sequence_logits(path, sample_tokens)
    assert logits.shape == (len(sample_tokens), CAT.model.n_vocab)
    assert np.isfinite(logits).all()


def test_aliases_are_their_twins(all_quants):
    for q in CAT.quants:
        if q.alias_of:
            assert filecmp.cmp(all_quants.quants[q.name], all_quants.quants[q.alias_of], shallow=False)


def test_imatrix_recorded_in_metadata(all_quants):
    for q in CAT.quants:
        with Model(all_quants.quants[q.name], vocab_only=True) as m:
            if q.imatrix:
                assert m.meta("quantize.imatrix.dataset") == "python-stdlib-sample"
                assert m.meta("quantize.imatrix.entries_count") == str(2 * 7 + 1)
            else:
                assert m.meta("quantize.imatrix.dataset") is None


def test_quality_follows_bits(all_quants, sample_tokens):
    ref = sequence_logits(all_quants.base, sample_tokens)
    kl = {n: kl_divergence(ref, sequence_logits(all_quants.quants[n], sample_tokens)).mean() for n in ("Q2_K", "Q4_K_M", "Q8_0")}
    assert kl["Q8_0"] < kl["Q4_K_M"] < kl["Q2_K"]


@pytest.mark.parametrize("name", ["Q2_K", "IQ3_S", "IQ3_M"])
def test_imatrix_lowers_kl(all_quants, sample_tokens, tmp_path, name):
    """IQ3_XS cannot be made without an imatrix; the others are measurably better with one."""
    quant, imatrix = CAT.get(name), Imatrix.load(all_quants.imatrix)
    quantize(all_quants.base, tmp_path / "plain.gguf", quant, None)
    quantize(all_quants.base, tmp_path / "imatrix.gguf", quant, imatrix)
    ref = sequence_logits(all_quants.base, sample_tokens)
    plain = kl_divergence(ref, sequence_logits(tmp_path / "plain.gguf", sample_tokens)).mean()
    weighted = kl_divergence(ref, sequence_logits(tmp_path / "imatrix.gguf", sample_tokens)).mean()
    assert weighted < plain, (weighted, plain)


def test_imatrix_files_round_trip_in_llama_cpp_formats(all_quants, tmp_path):
    """Our GGUF imatrix reloads identically; llama.cpp's legacy .dat (mean-of-squares × ncall) too."""
    import struct

    import numpy as np

    original = Imatrix.load(all_quants.imatrix)
    again = tmp_path / "again.imatrix.gguf"
    original.save(again)
    reloaded = Imatrix.load(again)
    assert reloaded.sums.keys() == original.sums.keys() and reloaded.chunks == original.chunks
    name = "blk.0.attn_q.weight"
    assert np.allclose(reloaded.mean_sq(name), original.mean_sq(name))
    # legacy: n_entries, then (len, name, ncall, nval, values = mean × ncall), then chunks + dataset
    values = original.mean_sq(name) * 3
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 3, values.size)
    blob += values.astype(np.float32).tobytes() + struct.pack("<ii", 8, 4) + b"code"
    legacy = tmp_path / "imatrix.dat"
    legacy.write_bytes(blob)
    loaded = Imatrix.load(legacy)
    assert np.allclose(loaded.mean_sq(name), original.mean_sq(name), rtol=1e-5)
    assert (loaded.dataset, loaded.chunks) == ("code", 8)


def test_ctrl_c_while_quantizing_exits_130_and_leaves_no_partial_file(tmp_path):
    """The interrupt handler runs inside llama.cpp's log callback and leaves with os._exit, which
    skips atomic_output's cleanup: the partial output (the fault suite found one) goes first."""
    import subprocess
    import sys

    partial = tmp_path / ".Refact-1_6B-fim.Q4_K_M.gguf.1.partial"
    partial.write_bytes(b"GGUF" + b"\0" * 1000)
    code = ("import os, signal, sys, time\n"
            "from pathlib import Path\n"
            "from refact_gguf.convert.quantize import _exit_on_ctrl_c\n"
            "with _exit_on_ctrl_c(Path(sys.argv[1])):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "sys.exit(0)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(partial)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and "interrupted" in proc.stderr
    assert not partial.exists()
