"""Fault suite: everything a user, a client or a mirror can send, and what the product does with it.

Areas (each case runs the real CLI in a subprocess, or real HTTP against a real server):
  gguf        corrupt GGUFs (truncations, flipped bytes, impossible metadata, broken tensor infos)
              × `run`, `bench` and `serve`
  convert     bad checkpoints (config, safetensors, pytorch .bin, tokenizer) and output faults
              (unwritable output, a file-size limit, Ctrl-C while quantizing)
  http        a fuzzed request set for every endpoint: each field replaced by every bad value,
              raw bodies (not JSON, deep nesting, 20 MB, chunked 20 MB)
  disconnect  streams dropped after their first chunk, each followed at once by a request, on every
              streaming endpoint; stalled bodies; connections that close or send garbage
  hub         `pull` against a hostile loopback Hub (names that escape, wrong hashes, errors, drops)
  args        bad command-line arguments to run, chat, bench, serve, convert, pull
  race        greedy completions while /tokenize (with pieces) and /detokenize run beside them,
              against the same requests alone; /health while one huge request is served
  keys        empty key variables and options, keys with spaces and '#', a BOM, SIGHUP
  cachedir    the on-disk KV cache as untrusted input: planted symlinks, a directory that is a
              file, group-writable or someone else's, FIFOs, crafted states with a recomputed
              digest, states of another --parallel; every case restarts the server over it

Each case ends in one column: clean error (a non-zero exit or an HTTP 4xx/503 with a message),
accepted (exit 0, HTTP 2xx: the input was usable), traceback (a Python traceback, an HTTP 500),
crash (killed by a signal, the server gone, an exit with no message), hang (past its time limit)
or wrong answer (served, but not what the same request gets alone, or a request let in that must
not be); "left behind" counts cases that also left files they should not have (partial outputs,
files outside their directory — a KV cache write outside its directory included —, a corrupt
download under its final name). The target is 0 in the last five.

    python benchmarks/fault_suite.py                     # every area, ~10 minutes on 2 cores
    python benchmarks/fault_suite.py --areas http,disconnect --drops 10
    python benchmarks/fault_suite.py --json results.json # the cases and their outcomes, for scripts

Nothing is downloaded: the models are synthetic (real architecture and tokenizer, random weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # refact_gguf from a checkout

from refact_gguf import catalog  # noqa: E402
from refact_gguf.convert import convert  # noqa: E402
from refact_gguf.convert.checkpoint import Checkpoint  # noqa: E402
from refact_gguf.convert.synthetic import SyntheticSpec, write_checkpoint  # noqa: E402
from benchmarks import torch_bin  # noqa: E402
from benchmarks.fake_hub import FakeHub  # noqa: E402
from benchmarks.replicas import free_port  # noqa: E402

HTTP = httpx.Client()  # one client: a new one per request costs more than a refused request
COLUMNS = ("clean error", "accepted", "traceback", "crash", "hang", "wrong answer")
CLI = [sys.executable, "-m", "refact_gguf.cli"]
SPEC = SyntheticSpec(n_layer=2, n_embd=256, n_head=4, seed=3)
QUANT = "Q4_K_M"  # a K-quant: the kind that crashes AMX builds


@dataclass
class Result:
    area: str
    case: str
    outcome: str  # one of COLUMNS
    detail: str = ""
    left_behind: str = ""


# ------------------------------------------------------------------------------ running things


def classify(rc: int, stderr: str) -> tuple[str, str]:
    """A finished CLI process → (outcome, detail)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1].strip()[:160] if lines else ""
    if "Traceback (most recent call last)" in stderr:
        return "traceback", last
    if rc < 0 or rc in (134, 139):
        return "crash", f"signal {-rc if rc < 0 else rc - 128}: {last}"
    if rc == 0:
        return "accepted", ""
    if rc == 130:  # the case sent Ctrl-C: 130 is the answer, with or without a message
        return "clean error", "interrupted (exit 130)"
    return ("clean error", last) if last else ("crash", f"exit {rc} with no message")


def run_cli(args: list[str], timeout: float, env: dict | None = None, stdin: bytes | None = None,
            interrupt_after: float | None = None, max_file_bytes: int | None = None) -> tuple[str, str]:
    """Run `refact-gguf ARGS` in its own process group; SIGINT it after `interrupt_after` seconds;
    `max_file_bytes` makes a larger write fail with EFBIG, as a full disk or a quota would."""
    def limit() -> None:
        if max_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    proc = subprocess.Popen(CLI + args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT, preexec_fn=limit)
    try:
        if interrupt_after is not None:
            try:
                proc.wait(interrupt_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "hang", f"still running after {timeout:.0f} s"
    return classify(proc.returncode, err.decode(errors="replace"))


class Server:
    """`refact-gguf serve` in a subprocess; `alive` says whether it is still running."""

    def __init__(self, model: Path, workdir: Path, timeout: float = 120, extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            CLI + ["serve", "-m", str(model), "--port", str(self.port), "-t", "1", "--ctx", "1024", "--parallel", "2",
                   "--max-predict", "64", "--cache-dir", str(workdir / "kv"), *extra],
            stdout=subprocess.DEVNULL, stderr=self.log.open("wb"), start_new_session=True, cwd=ROOT)
        deadline = time.time() + timeout
        while time.time() < deadline and self.alive:
            try:
                if HTTP.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def ready(self) -> bool:
        try:
            return self.alive and HTTP.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback (most recent call last)")

    def stop(self) -> tuple[int | None, str]:
        """SIGTERM, as an editor stops it; the exit status and the log's last line."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None, "ignored SIGTERM for 30 s"
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return self.proc.returncode, lines[-1] if lines else ""


def leftovers(directory: Path, allowed: Callable[[Path], bool] = lambda p: False) -> str:
    """Files under `directory` a failed run should not have left, named."""
    if not directory.exists():
        return ""
    found = [p for p in directory.rglob("*") if (p.is_file() or p.is_symlink()) and not allowed(p)]
    return ", ".join(str(p.relative_to(directory)) for p in found[:3]) + (" …" if len(found) > 3 else "")


# ------------------------------------------------------------------------------ inputs


def build_inputs(workdir: Path) -> tuple[Path, Path]:
    """The synthetic checkpoint and its K-quant GGUF (made once per workdir)."""
    hf = workdir / "hf"
    if not (hf / "config.json").exists():
        write_checkpoint(hf, SPEC)
    quant = workdir / "quant" / f"Refact-1_6B-fim.{QUANT}.gguf"
    if not quant.exists():
        convert(hf, workdir / "quant", "f16", catalog.load().select(QUANT), use_imatrix=False)
    return hf, quant


def gguf_variants(base: Path, out: Path) -> Iterator[tuple[str, Path]]:
    """Corrupt copies of `base`: truncations, flipped bytes, impossible metadata, broken tensor infos."""
    out.mkdir(parents=True, exist_ok=True)
    data = base.read_bytes()
    reader = gguf.GGUFReader(base)
    kv_end = min(t.field.offset for t in reader.tensors)
    info_end = reader.data_offset

    def write(name: str, blob: bytes) -> tuple[str, Path]:
        path = out / f"{name}.gguf"
        path.write_bytes(blob)
        return name, path

    for cut in (0, 3, 4, 8, 16, 24, 100, 4096, len(data) // 100, len(data) // 4, len(data) // 2, len(data) - 1):
        yield write(f"truncated at {cut}", data[:cut])
    offsets = [0, 4, 8, 15, 16, 23] + [int(x) for x in np.linspace(24, kv_end - 1, 14)] \
        + [int(x) for x in np.linspace(kv_end, info_end - 1, 8)] + [info_end, len(data) // 2, len(data) - 1]
    for off in offsets:
        yield write(f"byte {off} flipped", data[:off] + bytes([data[off] ^ 0xFF]) + data[off + 1:])

    def patched(name: str, edit: Callable[[gguf.GGUFReader], None]) -> tuple[str, Path]:
        path = out / f"{name}.gguf"
        shutil.copyfile(base, path)
        edit(gguf.GGUFReader(path, "r+"))  # the reader's arrays are views of the file: edits land in place
        return name, path

    def set_value(key: str, value):
        def edit(r: gguf.GGUFReader) -> None:
            field = r.fields[key]
            field.parts[field.data[0]][0] = value
        return edit

    scalar_types = {gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.FLOAT32}
    for key, field in reader.fields.items():
        if not (key.startswith("refact.") or key.endswith("token_id")) or field.types[:1] and field.types[0] not in scalar_types:
            continue
        kind = field.types[0]
        if key.endswith("token_id"):
            values = [2**31 - 1]  # far past the vocabulary
        elif kind == gguf.GGUFValueType.FLOAT32:
            values = [0.0, -1.0, float("nan"), float("inf")]
        else:
            values = [0, 3, 2**31 - 1]
        for value in values:
            yield patched(f"{key} = {value}", set_value(key, value))
    yield patched("general.architecture = 'llama!'", lambda r: _set_string(r, "general.architecture", b"llama!"))
    for index in (0, len(reader.tensors) // 2, len(reader.tensors) - 1):
        tensor = reader.tensors[index]
        for what, part, value in (("n_dims = 0", 2, 0), ("n_dims = 5", 2, 5), ("dim 0 = 0", 3, 0),
                                  ("dim 0 = 2**40", 3, 2**40), ("type = 99", 4, 99), ("type = F32", 4, 0),
                                  ("offset past the end", 5, 2**40), ("offset misaligned", 5, 1)):
            def edit(r, index=index, part=part, value=value):
                r.tensors[index].field.parts[part][0] = value
            yield patched(f"tensor {tensor.name}: {what}", edit)


def _set_string(reader: gguf.GGUFReader, key: str, value: bytes) -> None:
    field = reader.fields[key]
    target = field.parts[field.data[0]]
    target[: len(value)] = np.frombuffer(value[: len(target)], dtype=np.uint8)


# ------------------------------------------------------------------------------ areas


def area_gguf(workdir: Path, quant: Path, args) -> Iterator[Result]:
    for name, path in gguf_variants(quant, workdir / "gguf"):
        yield Result("gguf", f"run · {name}", *run_cli(["run", "-m", str(path), "-n", "4", "-t", "1", "def f("], 120))
        yield Result("gguf", f"bench · {name}", *run_cli(["bench", "-m", str(path), "-p", "8", "--n-gen", "4", "-r", "1",
                                                          "-t", "1"], 180))
        yield serve_once("gguf", f"serve · {name}", path, workdir)
        path.unlink()


def serve_once(area: str, case: str, model: Path, workdir: Path, extra: list[str] = ()) -> Result:
    """Start a server on `model` (options `extra` last); if it comes up, one /infill, then SIGTERM."""
    server = Server(model, workdir, 60, extra)
    if not server.alive:
        out, detail = classify(server.proc.returncode, server.log.read_text(errors="replace"))
        return Result(area, case, out, detail)
    if not server.ready:
        server.stop()
        return Result(area, case, "hang", "never answered /health")
    try:
        r = HTTP.post(f"{server.url}/infill", json={"input_prefix": "def f(", "n_predict": 4}, timeout=60)
        outcome, detail = response_outcome(r)
    except httpx.TimeoutException:
        outcome, detail = "hang", "/infill did not answer in 60 s"
    rc, last = server.stop()
    if server.tracebacks():
        return Result(area, case, "traceback", last)
    if rc is None:
        return Result(area, case, "hang", last)
    if rc != 0:
        return Result(area, case, "crash", f"exit {rc} at SIGTERM: {last}")
    return Result(area, case, outcome, detail)


def response_outcome(r: httpx.Response) -> tuple[str, str]:
    if r.status_code < 300:
        return "accepted", ""
    text = r.text[:160].replace("\n", " ")
    if r.status_code >= 500 and r.status_code != 503:
        return "traceback", f"HTTP {r.status_code}: {text}"
    return "clean error", f"HTTP {r.status_code}: {text}"


def checkpoint_variants(hf: Path, out: Path) -> Iterator[tuple[str, Path]]:
    """Broken copies of the checkpoint `hf`."""
    config = json.loads((hf / "config.json").read_text())
    weights = {n: t.read() for n, t in Checkpoint.open(hf).tensors.items()}
    raw = (hf / "model.safetensors").read_bytes()
    n_header = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n_header])

    def variant(name: str, edit: Callable[[Path], None]) -> tuple[str, Path]:
        d = out / name.replace("/", "_").replace(" ", "_")[:80]
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(hf, d)
        edit(d)
        return name, d

    def with_config(**changes):
        def edit(d: Path) -> None:
            c = {**config, **changes}
            (d / "config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not _DROP}))
        return edit

    def with_header(mutate: Callable[[dict], object], data: bytes | None = None):
        def edit(d: Path) -> None:
            h = json.loads(json.dumps(header))
            text = mutate(h)
            blob = text if isinstance(text, bytes) else json.dumps(h).encode()
            (d / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + (raw[8 + n_header:] if data is None else data))
        return edit

    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "layer_norm_epsilon"):
        for value in (_DROP, 0, -1, 3, 10**12, "x", None, [], 1.5):
            yield variant(f"config {key} = {value!r}", with_config(**{key: value}))
    yield variant("config.json missing", lambda d: (d / "config.json").unlink())
    for text in ("", "{", "[]", "null", "\xff"):
        yield variant(f"config.json is {text!r}", lambda d, text=text: (d / "config.json").write_text(text, errors="surrogateescape"))
    yield variant("architectures = ['LlamaForCausalLM']", with_config(architectures=["LlamaForCausalLM"], model_type="llama"))
    size = len(raw)
    for cut in (0, 7, 8, 100, n_header + 8, size // 2, size - 1):
        yield variant(f"safetensors truncated at {cut}", lambda d, cut=cut: (d / "model.safetensors").write_bytes(raw[:cut]))
    first = next(n for n in header if n != "__metadata__")
    yield variant("safetensors header length 2**62", lambda d: (d / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + raw[8:]))
    for name, mutate in {
        "header not JSON": lambda h: b"{not json" + b" " * 7,
        "header a list": lambda h: b"[1, 2, 3]",
        "header entry a number": lambda h: h.__setitem__(first, 5),
        "dtype 'X9'": lambda h: h[first].__setitem__("dtype", "X9"),
        "shape doubled": lambda h: h[first].__setitem__("shape", [2 * s for s in h[first]["shape"]]),
        "shape negative": lambda h: h[first].__setitem__("shape", [-1, 4]),
        "shape ['a']": lambda h: h[first].__setitem__("shape", ["a"]),
        "data_offsets reversed": lambda h: h[first].__setitem__("data_offsets", h[first]["data_offsets"][::-1]),
        "data_offsets past the end": lambda h: h[first].__setitem__("data_offsets", [0, 2**40]),
        "data_offsets one element": lambda h: h[first].__setitem__("data_offsets", [0]),
        "a tensor missing": lambda h: h.pop(first),
        "an unknown tensor": lambda h: h.__setitem__("transformer.h.0.extra.weight", dict(h[first])),
    }.items():
        yield variant(f"safetensors {name}", with_header(mutate))
    yield variant("weights all NaN", with_header(lambda h: None, np.full(size - 8 - n_header, 0x7E, np.uint8).tobytes()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        yield variant(f"{name} missing", lambda d, name=name: (d / name).unlink())
        yield variant(f"{name} not JSON", lambda d, name=name: (d / name).write_text("{"))

    def as_bin(views=None, skip=frozenset(), blob: bytes | None = None):
        def edit(d: Path) -> None:
            (d / "model.safetensors").unlink()
            if blob is not None:
                (d / "pytorch_model.bin").write_bytes(blob)
            else:
                torch_bin.write(d / "pytorch_model.bin", weights, views, skip)
        return edit

    rows, cols = weights[first].shape
    yield variant("pytorch .bin (valid, float32)", as_bin())
    for what, view in (("offset past storage", torch_bin.View("0", rows * cols, (rows, cols), (cols, 1), rows * cols)),
                       ("stride past storage", torch_bin.View("0", 0, (rows, cols), (cols * 100, 1), rows * cols)),
                       ("numel larger than the record", torch_bin.View("0", 0, (rows * 2, cols), (cols, 1), rows * cols * 2))):
        yield variant(f"pytorch .bin {what}", as_bin({first: view}))
    yield variant("pytorch .bin record missing", as_bin(skip=frozenset({"0"})))
    yield variant("pytorch .bin not a zip", as_bin(blob=b"PK\x03\x04" + b"\0" * 100))
    yield variant("pytorch .bin OrderedDict BUILD", as_bin(blob=_zip({"archive/data.pkl": b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb."})))
    yield variant("pytorch .bin runs code", as_bin(blob=_zip({"archive/data.pkl": b"cos\nsystem\n(S'touch /tmp/fault-suite-pwned'\ntR."})))


_DROP = object()


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def area_convert(workdir: Path, hf: Path, args) -> Iterator[Result]:
    base = ["--outtype", "f16", "--quant", QUANT, "--no-imatrix", "-t", "2"]

    def case(name: str, src: Path, out: Path, extra=(), **kw) -> Result:
        shutil.rmtree(out, ignore_errors=True)
        outcome, detail = run_cli(["convert", str(src), "-o", str(out), *base, *extra], 300, **kw)
        # a failed convert leaves nothing; a good one only its GGUFs (no .partial, no temp files)
        left = leftovers(out, lambda p: outcome == "accepted" and p.suffix == ".gguf" and not p.name.startswith("."))
        return Result("convert", name, outcome, detail, left)

    for name, src in checkpoint_variants(hf, workdir / "ckpt"):
        yield case(name, src, workdir / "out")
        shutil.rmtree(src)
    if Path("/tmp/fault-suite-pwned").exists():
        yield Result("convert", "a pickle ran code", "crash", "/tmp/fault-suite-pwned exists", "/tmp/fault-suite-pwned")
    blocker = workdir / "a-file"
    blocker.write_text("x")
    yield Result("convert", "output is a file", *run_cli(["convert", str(hf), "-o", str(blocker), *base], 120))
    yield Result("convert", "output under /proc", *run_cli(["convert", str(hf), "-o", "/proc/self/out", *base], 120))
    yield case("file-size limit: EFBIG mid-write", hf, workdir / "out", max_file_bytes=5_000_000)
    for after in (1.0, 3.0, 6.0):
        yield case(f"Ctrl-C after {after:.0f} s", hf, workdir / "out", interrupt_after=after)


def area_args(workdir: Path, quant: Path, hf: Path, args) -> Iterator[Result]:
    binary = workdir / "binary.py"
    binary.write_bytes(bytes(range(256)) * 4)
    latin = workdir / "latin.py"
    latin.write_bytes("café = 1\n".encode("latin-1"))
    m = ["-m", str(quant), "-t", "1"]
    cases = {
        "run --ctx 0": ["run", *m, "--ctx", "0", "x"], "run --ctx 64 long prompt": ["run", *m, "--ctx", "64", "x " * 500],
        "run --ctx 10**9": ["run", *m, "--ctx", "1000000000", "x"], "run -n 0": ["run", *m, "-n", "0", "x"],
        "run -n 10**9": ["run", *m, "-n", "1000000000", "--ctx", "128", "x"], "run --temperature -1": ["run", *m, "--temperature", "-1", "x"],
        "run --temperature nan": ["run", *m, "--temperature", "nan", "x"], "run --temperature inf": ["run", *m, "--temperature", "inf", "x"],
        "run -t 0": ["run", "-m", str(quant), "-t", "0", "x"], "run -t 10000": ["run", "-m", str(quant), "-t", "10000", "-n", "2", "x"],
        "run --gpu-layers x": ["run", *m, "--gpu-layers", "x", "x"], "run --gpu-layers -5": ["run", *m, "--gpu-layers", "-5", "x"],
        "run --fim-order xyz": ["run", *m, "--fim", "--prefix", "a", "--fim-order", "xyz"],
        "run --fim-order PSM": ["run", *m, "--fim", "--prefix", "a", "--fim-order", "PSM", "-n", "2"],
        "run --file missing": ["run", *m, "--fim", "--file", str(workdir / "nope.py"), "--line", "1", "--col", "1"],
        "run --file a directory": ["run", *m, "--fim", "--file", str(workdir), "--line", "1", "--col", "1"],
        "run --file binary": ["run", *m, "--fim", "--file", str(binary), "--line", "1", "--col", "1"],
        "run --file latin-1": ["run", *m, "--fim", "--file", str(latin), "--line", "1", "--col", "1"],
        "run --line past the end": ["run", *m, "--fim", "--file", str(latin), "--line", "99", "--col", "1"],
        "run --col 0": ["run", *m, "--fim", "--file", str(latin), "--line", "1", "--col", "0"],
        "run --line without --file": ["run", *m, "--fim", "--line", "3"],
        "run -m missing.gguf": ["run", "-m", str(workdir / "missing.gguf"), "x"], "run -m a directory": ["run", "-m", str(workdir), "x"],
        "run -m /dev/null": ["run", "-m", "/dev/null", "x"], "run -m Q9_Z": ["run", "-m", "Q9_Z", "x"],
        "run -m not pulled": ["run", "-m", "Q2_K", "x"], "run --prefix-file missing": ["run", *m, "--fim", "--prefix-file", "/nope"],
        "run no prompt, empty stdin": ["run", *m], "run --unknown": ["run", *m, "--unknown", "x"],
        "chat --ctx 64 long message": ["chat", *m, "--ctx", "64", "--message", "x " * 500],
        "chat --message ''": ["chat", *m, "--message", "", "-n", "2"], "chat --system huge": ["chat", *m, "--system", "y " * 5000, "--message", "hi"],
        "bench -p 0": ["bench", *m, "-p", "0"], "bench -p 10**6": ["bench", *m, "-p", "1000000", "--n-gen", "1", "-r", "1"],
        "bench --depth 10**6": ["bench", *m, "--depth", "1000000", "-r", "1"], "bench --parallel x": ["bench", *m, "--parallel", "x"],
        "bench --parallel 0": ["bench", *m, "--parallel", "0"], "bench --parallel 1000": ["bench", *m, "--parallel", "1000", "-p", "8", "--n-gen", "2"],
        "bench --quant Q9": ["bench", "--quant", "Q9", "--dir", str(workdir)], "bench --quant Q8_0 --dir empty": ["bench", "--quant", "Q8_0", "--dir", str(workdir / "empty")],
        "convert missing dir": ["convert", str(workdir / "nope")], "convert a file": ["convert", str(latin)],
        "convert --outtype q5": ["convert", str(hf), "--outtype", "q5", "-o", str(workdir / "o")],
        "convert --quant Q9": ["convert", str(hf), "--quant", "Q9", "-o", str(workdir / "o")],
        "convert --imatrix missing": ["convert", str(hf), "--imatrix", "/nope.dat", "-o", str(workdir / "o")],
        "convert --calibration missing": ["convert", str(hf), "--calibration", "/nope", "-o", str(workdir / "o")],
        "pull Q9_Z": ["pull", "Q9_Z"], "pull offline": ["pull", "Q4_K_M"],
        "pull --local-dir /proc/self": ["pull", "Q4_K_M", "--local-dir", "/proc/self"],
        "recommend --ctx -1": ["recommend", "--ctx", "-1"], "recommend --ctx 10**9": ["recommend", "--ctx", "1000000000"],
        "rm Q9_Z": ["rm", "Q9_Z"], "unknown command": ["frobnicate"],
    }
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(workdir / "hub-empty")}
    for name, argv in cases.items():
        yield Result("args", name, *run_cli(argv, 120, env=offline, stdin=b""))
    for name, extra in {"--port 70000": ["--port", "70000"], "--host nowhere.invalid": ["--host", "nowhere.invalid"],
                        "--host 10.255.255.1": ["--host", "10.255.255.1"], "--parallel 0": ["--parallel", "0"],
                        "--ctx 64 --parallel 64": ["--ctx", "64", "--parallel", "64"], "--queue -1": ["--queue", "-1"],
                        "--cache-dir a file": ["--cache-dir", str(latin)], "--cache-mb 10**9": ["--cache-mb", str(10**9)],
                        "--prompt-budget-ms 0": ["--prompt-budget-ms", "0"], "--gpu-layers x": ["--gpu-layers", "x"],
                        "--api-key ''": ["--api-key", ""], "--cors-origin '*'": ["--cors-origin", "*"]}.items():
        yield serve_once("args", f"serve {name}", quant, workdir, extra)
    for name, data in (("stdin not UTF-8", b"\xff\xfe<CURSOR>\x00"), ("stdin binary", bytes(range(256)))):
        yield Result("args", f"run {name}", *run_cli(["run", *m, "--fim", "-n", "2"], 120, env=offline, stdin=data))


# ------------------------------------------------------------------------------ HTTP


BAD_VALUES = [None, True, -1, 0, 2**31, 2**64, -(2**63), 1e308, "", "x", "\ud800", "A" * 200_000, [], [None], {}, {"a": [{}]}]

ENDPOINTS: dict[str, dict] = {
    "/infill": {"input_prefix": "def f(", "input_suffix": "\n", "input_extra": [{"filename": "a.py", "text": "x = 1\n"}],
                "prompt": "", "n_predict": 4, "t_max_prompt_ms": 500, "temperature": 0, "samplers": ["top_k"],
                "stop": ["\n\n"], "n_indent": 0, "fim_order": "spm", "cache_prompt": True, "stream": False},
    "/completion": {"prompt": "def f(", "n_predict": 4, "temperature": 0, "top_k": 40, "top_p": 0.9, "seed": 1,
                    "stop": ["\n"], "stream": False},
    "/tokenize": {"content": "def f", "parse_special": True, "with_pieces": True},
    "/detokenize": {"tokens": [1, 2, 3]},
    "/v1/completions": {"model": "m", "prompt": "def f(", "suffix": "\n", "max_tokens": 4, "temperature": 0,
                        "stop": ["\n"], "stream": False, "top_p": 1, "seed": 1},
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "temperature": 0, "stream": False, "stop": "\n"},
    "/api/generate": {"model": "m", "prompt": "def f(", "suffix": "\n", "stream": False, "raw": False,
                      "options": {"num_predict": 4, "temperature": 0, "stop": ["\n"], "num_ctx": 2048}},
    "/api/chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                  "options": {"num_predict": 4}},
    "/api/show": {"model": "m"},
}
STREAMING = {"/completion": {**ENDPOINTS["/completion"], "stream": True, "n_predict": 32},
             "/infill": {**ENDPOINTS["/infill"], "stream": True, "n_predict": 32},
             "/v1/completions": {**ENDPOINTS["/v1/completions"], "stream": True, "max_tokens": 32},
             "/v1/chat/completions": {**ENDPOINTS["/v1/chat/completions"], "stream": True, "max_tokens": 32},
             "/api/generate": {**ENDPOINTS["/api/generate"], "stream": True, "options": {"num_predict": 32}},
             "/api/chat": {**ENDPOINTS["/api/chat"], "stream": True, "options": {"num_predict": 32}}}
JSON = {"content-type": "application/json"}
GETS = ["/health", "/props", "/slots", "/metrics", "/v1/models", "/api/tags", "/api/ps", "/api/version", "/nope"]


def mutations(body: dict) -> Iterator[tuple[str, dict]]:
    """The body with one field (top level, or one level into a list or object) removed or replaced."""
    def paths(value, prefix=()):
        if isinstance(value, dict):
            for k, v in value.items():
                yield prefix + (k,)
                yield from paths(v, prefix + (k,))
        elif isinstance(value, list) and value:
            yield prefix + (0,)
            yield from paths(value[0], prefix + (0,))

    def replaced(path, value):
        copy = json.loads(json.dumps(body))
        target = copy
        for step in path[:-1]:
            target = target[step]
        if value is _DROP:
            target.pop(path[-1]) if isinstance(target, dict) else target.clear()
        else:
            target[path[-1]] = value
        return copy

    for path in paths(body):
        for value in [_DROP] + BAD_VALUES:
            label = "removed" if value is _DROP else (repr(value) if len(repr(value)) < 24 else f"<{type(value).__name__} of {len(value)}>")
            yield ".".join(map(str, path)) + " = " + label, replaced(path, value)


def raw_bodies() -> Iterator[tuple[str, bytes, dict]]:
    yield "empty body", b"", {}
    for text in (b"{", b"[]", b"null", b"1", b'"x"', b"\xff\xfe{}", b"{'a': 1}", b'{"a": NaN}'):
        yield f"body {text!r}", text, {}
    yield "nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, {}
    yield "nested object 20,000 deep", b'{"a":' * 20_000 + b"1" + b"}" * 20_000, {}
    yield "text/plain", b'{"prompt": "x"}', {"content-type": "text/plain"}
    yield "20 MB body", b'{"prompt": "' + b"x" * 20_000_000 + b'"}', {}


def http_cases(server: Server) -> Iterator[Result]:
    for path, body in ENDPOINTS.items():
        yield from _requests(server, "http", path, [("valid", body)] + list(mutations(body)))
        for name, data, headers in raw_bodies():
            yield _one(server, "http", f"POST {path} · {name}", lambda: HTTP.post(server.url + path, content=data, headers={**JSON, **headers}, timeout=60))
        yield _one(server, "http", f"POST {path} · chunked 20 MB", lambda: HTTP.post(server.url + path, content=_chunks(20), headers=JSON, timeout=60))
        yield _one(server, "http", f"GET {path}", lambda: HTTP.get(server.url + path, timeout=30))
    for path in GETS:
        for method in ("GET", "HEAD", "POST", "DELETE"):
            yield _one(server, "http", f"{method} {path}", lambda: HTTP.request(method, server.url + path, timeout=30))
    yield _one(server, "http", "GET /../../etc/passwd", lambda: HTTP.get(server.url + "/%2e%2e/%2e%2e/etc/passwd", timeout=30))
    yield _one(server, "http", "header 64 KB", lambda: HTTP.get(server.url + "/health", headers={"x-big": "a" * 65536}, timeout=30))


def _chunks(mb: int) -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(mb):
        yield b"x" * 1_000_000


def _requests(server: Server, area: str, path: str, bodies) -> Iterator[Result]:
    for name, body in bodies:
        yield _one(server, area, f"POST {path} · {name}",
                   lambda: HTTP.post(server.url + path, content=json.dumps(body).encode(), headers=JSON, timeout=60))


def _one(server: Server, area: str, case: str, send: Callable[[], httpx.Response]) -> Result:
    before = server.tracebacks()
    try:
        outcome, detail = response_outcome(send())
    except httpx.TimeoutException:
        outcome, detail = "hang", "no answer in time"
    except httpx.HTTPError as e:
        outcome, detail = ("clean error", f"connection closed: {type(e).__name__}") if server.alive else ("crash", "server gone")
    if not server.alive:
        outcome, detail = "crash", f"server exited {server.proc.returncode}"
    elif server.tracebacks() > before:
        outcome, detail = "traceback", f"in the server log ({detail})"
    return Result(area, case, outcome, detail)


def disconnect_cases(server: Server, drops: int) -> Iterator[Result]:
    for path, body in STREAMING.items():
        follow = {**ENDPOINTS[path], "stream": False}
        for i in range(drops):
            def drop_then_ask():
                with HTTP.stream("POST", server.url + path, json=body, timeout=60) as r:
                    next(r.iter_raw())  # the first chunk, then the client goes away
                return HTTP.post(server.url + path, json=follow, timeout=60)
            result = _one(server, "disconnect", f"{path} · drop {i + 1} then a request", drop_then_ask)
            yield result
            if result.outcome == "crash":
                return
    for name, data in (("close before a request", b""), ("garbage", b"\x00\xff" * 1000 + b"\r\n\r\n"),
                       ("half a request line", b"POST /infill HT"), ("stalled body", b"POST /infill HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input_prefix\""),
                       ("stalled chunked body", b"POST /infill HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":")):
        yield _raw_socket(server, name, data)


def _raw_socket(server: Server, name: str, data: bytes) -> Result:
    """Send `data` and stop sending; the server must answer or close within its read timeout."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=90) as s:
        s.sendall(data)
        if not data:
            s.close()
            return _one(server, "disconnect", name, lambda: HTTP.get(server.url + "/health", timeout=30))
        start = time.time()
        try:
            reply = s.recv(200)
        except socket.timeout:
            return Result("disconnect", name, "hang", "connection held 90 s")
    status = reply.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
    alive = _one(server, "disconnect", name, lambda: HTTP.get(server.url + "/health", timeout=30))
    if alive.outcome != "accepted":
        return alive
    return Result("disconnect", name, "clean error", f"{status} after {time.time() - start:.0f} s")


# ------------------------------------------------------------------------------ race, keys, cachedir


def area_race(workdir: Path, quant: Path, args) -> Iterator[Result]:
    """Greedy completions beside /tokenize and /detokenize load must equal the same requests alone
    (a shared piece buffer gave 17 of 204 another token's text); /health must answer within
    100 ms while one huge request is served."""
    bodies = [{"input_prefix": f"def f{i}(x):\n    return x * {i}\n\ndef g{i}(", "n_predict": 16, "top_k": 1,
               "samplers": ["top_k"]} for i in range(args.race_prompts)]
    server = Server(quant, workdir)
    try:
        alone = [HTTP.post(f"{server.url}/infill", json=b, timeout=120).json()["content"] for b in bodies]
        stop = False

        def hammer() -> None:
            with httpx.Client(timeout=60) as c:
                while not stop:
                    c.post(f"{server.url}/detokenize", json={"tokens": list(range(100, 3100))})
                    c.post(f"{server.url}/tokenize", json={"content": "def hello(w): return 42\n" * 60, "with_pieces": True})

        from concurrent.futures import ThreadPoolExecutor

        # One completion at a time, as alone: batched with each other their greedy near-ties on random
        # weights may flip with the batch's shape, which is not what this measures.
        with ThreadPoolExecutor(3) as pool:
            noise = [pool.submit(hammer) for _ in range(3)]
            together = [HTTP.post(f"{server.url}/infill", json=b, timeout=120).json()["content"]
                        for b in bodies * args.race_rounds]
            stop = True
            for f in noise:
                f.result()
        for i, (got, want) in enumerate(zip(together, alone * args.race_rounds)):
            yield Result("race", f"greedy /infill {i % len(bodies)} beside /tokenize load",
                         "accepted" if got == want else "wrong answer", "" if got == want else f"{got!r} != {want!r}")
        for name, path, body in (("/tokenize 0.9 MB with pieces", "/tokenize", {"content": "x = [i for i in y]\n" * 50_000, "with_pieces": True}),
                                 ("/detokenize 200k ids", "/detokenize", {"tokens": [1000] * 200_000}),
                                 ("/completion with 64 stop strings", "/completion", {"prompt": "x", "n_predict": 64, "stop": [f"zz{i}" for i in range(64)]})):
            with ThreadPoolExecutor(1) as pool:
                big = pool.submit(HTTP.post, server.url + path, json=body, timeout=120)
                time.sleep(0.2)
                t0 = time.perf_counter()
                ok = HTTP.get(f"{server.url}/health", timeout=30).status_code == 200
                waited = time.perf_counter() - t0
                big.result()
            yield Result("race", f"/health while {name}", "accepted" if ok and waited < 0.1 else "hang", f"{waited * 1e3:.0f} ms")
        yield _one(server, "race", "100,000 stop strings", lambda: HTTP.post(
            f"{server.url}/completion", json={"prompt": "x", "n_predict": 4, "stop": [f"s{i}" for i in range(100_000)]}, timeout=60))
    finally:
        server.stop()


def area_keys(workdir: Path, quant: Path, args) -> Iterator[Result]:
    """Empty is never "open"; a key is the whole line; SIGHUP never kills."""
    serve = ["serve", "-m", str(quant), "--port", str(free_port()), "-t", "1", "--ctx", "256", "--cache-disk-mb", "0"]
    for name, env, extra in (("REFACT_GGUF_API_KEY=''", {"REFACT_GGUF_API_KEY": ""}, []),
                             ("REFACT_GGUF_API_KEY_FILE=''", {"REFACT_GGUF_API_KEY_FILE": ""}, []),
                             ("--api-key ''", {}, ["--api-key", ""]),
                             ("a keys file of comments only", {}, ["--api-key-file", str(_text(workdir / "keys-empty", "# later\n"))])):
        outcome, detail = run_cli(serve + extra, 60, env=env, interrupt_after=20)
        # an empty key must stop it at start: running until interrupted means it served, open or locked
        yield Result("keys", f"serve with {name}", "wrong answer" if "interrupted" in detail else outcome, detail)
    keys = _text(workdir / "keys", "\ufeffsk-first\ncorrect horse battery staple  # bob\nsk-abc#def\n")
    server = Server(quant, workdir, extra=["--api-key-file", str(keys)])
    try:
        for key, allowed in (("sk-first", True), ("correct horse battery staple", True), ("correct", False),
                             ("sk-abc#def", True), ("sk-abc", False)):
            r = HTTP.get(f"{server.url}/props", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            yield Result("keys", f"key {key!r}", "accepted" if (r.status_code == 200) == allowed else "wrong answer", str(r.status_code))
    finally:
        server.stop()
    server = Server(quant, workdir)
    try:
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        yield _one(server, "keys", "SIGHUP without a keys file", lambda: HTTP.get(f"{server.url}/health", timeout=30))
    finally:
        server.stop()


def _text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def area_cachedir(workdir: Path, quant: Path, args) -> Iterator[Result]:
    """Each case: a server fills a cache directory, the case damages it, a second server starts
    over it and answers the same greedy request, which must equal the answer of a cold server."""
    body = {"input_prefix": "def f(x):\n    return x + 1\n" * 30, "n_predict": 8, "top_k": 1, "samplers": ["top_k"]}
    victim = _text(workdir / "victim", "precious")
    cold = _cache_case_server(quant, workdir / "cold", body, ["--cache-disk-mb", "0"])[1]

    def planted_symlinks(d: Path) -> None:
        for p in list(d.rglob("*.kv")):
            p.unlink()
            p.symlink_to(victim)
            (p.parent / (p.name + ".partial")).symlink_to(victim)

    def crafted(claim_more: bool) -> Callable[[Path], None]:
        def edit(d: Path) -> None:
            for p in d.rglob("*.kv"):
                data = p.read_bytes()
                n_head = int.from_bytes(data[8:12], "little")
                head = json.loads(data[12 : 12 + n_head])
                ids = np.frombuffer(data[12 + n_head : 12 + n_head + 4 * head["n_tokens"]], "<i4")
                state = bytearray(data[12 + n_head + 4 * head["n_tokens"] :])
                if claim_more:
                    ids = np.concatenate([ids, ids[-40:]])
                else:
                    state[len(state) // 2 :] = bytes(len(state) - len(state) // 2)  # half the cells zeroed
                digest = hashlib.blake2b(ids.astype("<i4").tobytes())
                digest.update(state)
                head.update(n_tokens=len(ids), blake2b=digest.hexdigest())
                raw = json.dumps(head).encode()
                p.write_bytes(data[:8] + len(raw).to_bytes(4, "little") + raw + ids.astype("<i4").tobytes() + bytes(state))
        return edit

    cases: dict[str, tuple[Callable[[Path], None], list[str]]] = {
        "planted symlinks to a file outside": (planted_symlinks, []),
        "a FIFO and a dangling symlink named *.kv": (lambda d: (os.mkfifo(next(d.iterdir()) / "f.kv"),
                                                              (next(d.iterdir()) / "g.kv").symlink_to(workdir / "gone")), []),
        "a directory named *.kv.partial": (lambda d: (next(d.iterdir()) / "x.kv.partial").mkdir(), []),
        "the cache directory group-writable": (lambda d: d.chmod(0o777), []),
        "the cache directory is a file": (lambda d: (shutil.rmtree(d), d.write_text("x")), []),
        "a state claiming 40 more tokens (digest recomputed)": (crafted(True), []),
        "a state with half its cells zeroed (digest recomputed)": (crafted(False), []),
        "restarted with --parallel 3": (lambda d: None, ["--parallel", "3"]),
        "--cache-disk-mb 1": (lambda d: None, ["--cache-disk-mb", "1"]),
    }
    for name, (damage, extra) in cases.items():
        case_dir = workdir / "cachedir" / re.sub(r"\W+", "-", name)
        _cache_case_server(quant, case_dir, body, [])
        damage(case_dir / "kv")
        result, answer = _cache_case_server(quant, case_dir, body, extra)
        if result.outcome == "accepted" and answer != cold:
            result = Result("cachedir", name, "wrong answer", f"{answer!r} != {cold!r}")
        left = "outside the cache: the victim file was overwritten" if victim.read_text() != "precious" else ""
        yield Result("cachedir", name, result.outcome, result.detail, left)
        _text(victim, "precious")


def _cache_case_server(quant: Path, case_dir: Path, body: dict, extra: list[str]) -> tuple[Result, str | None]:
    case_dir.mkdir(parents=True, exist_ok=True)
    server = Server(quant, case_dir, 60, extra)
    answer = None
    try:
        if not server.ready:
            return Result("cachedir", "", *classify(server.proc.returncode or 1, server.log.read_text(errors="replace"))), None
        r = HTTP.post(f"{server.url}/infill", json=body, timeout=120)
        outcome, detail = response_outcome(r)
        answer = r.json().get("content") if r.status_code == 200 else None
    except httpx.TimeoutException:
        outcome, detail = "hang", "no answer in 120 s"
    rc, last = server.stop()
    if server.tracebacks():
        outcome, detail = "traceback", last
    elif rc != 0:
        outcome, detail = ("hang" if rc is None else "crash"), last
    return Result("cachedir", "", outcome, detail), answer


# ------------------------------------------------------------------------------ hub


def area_hub(workdir: Path, quant: Path, args) -> Iterator[Result]:
    cat = catalog.load()
    filename = quant.name
    other = workdir / "other.gguf"  # the same file, another architecture
    shutil.copyfile(quant, other)
    _set_string(gguf.GGUFReader(other, "r+"), "general.architecture", b"llama!")
    cases: dict[str, Callable[[FakeHub], None]] = {
        "a good file (control)": lambda h: None,
        "ETag '../../x'": lambda h: h.sha_override.__setitem__(filename, "../../x"),
        "ETag an absolute path": lambda h: h.sha_override.__setitem__(filename, str(workdir / "escaped")),
        "ETag not a sha256": lambda h: h.sha_override.__setitem__(filename, "abc"),
        "ETag another file's sha256": lambda h: h.sha_override.__setitem__(filename, "0" * 64),
        "X-Repo-Commit '../../evil'": lambda h: setattr(h, "commit", "../../evil"),
        "X-Repo-Commit absolute": lambda h: setattr(h, "commit", str(workdir / "evil")),
        "corrupt bytes": lambda h: setattr(h, "corrupt", True),
        "HTTP 401": lambda h: setattr(h, "status", 401), "HTTP 404": lambda h: setattr(h, "status", 404),
        "HTTP 429": lambda h: setattr(h, "status", 429), "HTTP 500": lambda h: setattr(h, "status", 500),
        "connection drops mid-file": lambda h: setattr(h, "drop_after", 1000),
        "Range ignored after a drop": lambda h: (setattr(h, "drop_after", 1000), setattr(h, "ignore_range", True)),
        "not a GGUF (right sha256)": lambda h: h.files.__setitem__(filename, b"hello" * 1000),
        "another architecture's GGUF (right sha256)": lambda h: h.files.__setitem__(filename, other.read_bytes()),
        "an empty file": lambda h: h.files.__setitem__(filename, b""),
        "file missing on the Hub": lambda h: h.files.pop(filename),
    }
    for name, fault in cases.items():
        case_dir = workdir / "hub-case"
        shutil.rmtree(case_dir, ignore_errors=True)
        cache = case_dir / "cache"
        hub = FakeHub(cat.model.gguf_repo)
        hub.add(filename, quant)
        fault(hub)
        try:
            env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_x"}
            outcome, detail = run_cli(["pull", QUANT], 180, env=env)
        finally:
            hub.close()
        yield Result("hub", name, outcome, detail, _hub_leftovers(case_dir, cache, outcome) + leftovers(workdir, _expected_in(workdir)))


def _expected_in(workdir: Path) -> Callable[[Path], bool]:
    """What the suite itself keeps in its workdir: anything else there came from an escape."""
    def allowed(p: Path) -> bool:
        top = p.relative_to(workdir).parts[0]
        return top in {"hf", "quant", "hub-case", "other.gguf", "kv", "gguf", "ckpt", "out", "a-file",
                       "binary.py", "latin.py", "hub-empty", "xdg", "o"} or top.startswith("serve-")
    return allowed


HUB_LAYOUT = re.compile(r"(\.locks/.*|models--[^/]+/(blobs/[0-9a-f]{64}(\.incomplete|\.lock)?|refs/main"
                        r"|snapshots/[0-9a-f]{40}/[^/]+\.gguf))")


def _hub_leftovers(case_dir: Path, cache: Path, outcome: str) -> str:
    """Files only where the HF cache layout puts them (a name from the network cannot add others),
    no blob whose content is not its name's sha256 (an `.incomplete` download may stay, to be
    resumed), and no snapshot link after a failure."""
    bad = []
    for p in case_dir.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(cache).as_posix() if cache in p.parents else None
        if rel is None or not HUB_LAYOUT.fullmatch(rel):
            bad.append(p)
        elif "/blobs/" in f"/{rel}" and not rel.endswith((".incomplete", ".lock")) \
                and hashlib.sha256(p.read_bytes()).hexdigest() != p.name:
            bad.append(p)
        elif "/snapshots/" in f"/{rel}" and outcome != "accepted":
            bad.append(p)
    return ", ".join(str(p.relative_to(case_dir)) for p in bad[:3])


# ------------------------------------------------------------------------------ report


def table(results: list[Result]) -> str:
    areas = list(dict.fromkeys(r.area for r in results))
    head = "| area | tried | " + " | ".join(COLUMNS) + " | left behind |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for area in areas + ["all"]:
        rows = [r for r in results if area in (r.area, "all")]
        counts = Counter(r.outcome for r in rows)
        lines.append(f"| {area} | {len(rows)} | " + " | ".join(str(counts[c]) for c in COLUMNS)
                     + f" | {sum(bool(r.left_behind) for r in rows)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--areas", default="gguf,convert,http,disconnect,hub,args,race,keys,cachedir")
    p.add_argument("--race-prompts", type=int, default=8, help="distinct greedy requests in the race area")
    p.add_argument("--race-rounds", type=int, default=25, help="times each is sent beside the load (8 × 25 = 200)")
    p.add_argument("--drops", type=int, default=50, help="dropped streams per streaming endpoint")
    p.add_argument("--workdir", type=Path, help="keep inputs here (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="write every case and its outcome here")
    args = p.parse_args()
    areas = args.areas.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fault-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(workdir / "xdg")  # servers' KV caches stay in the workdir
    hf, quant = build_inputs(workdir)
    results: list[Result] = []

    def record(results_iter: Iterator[Result]) -> None:
        for r in results_iter:
            results.append(r)
            if len(results) % 250 == 0:
                print(f"  … {len(results)} cases", flush=True)
            if r.outcome not in ("clean error", "accepted") or r.left_behind:
                print(f"  {r.area:10} {r.outcome:11} {r.case}: {r.detail}" + (f" [left: {r.left_behind}]" if r.left_behind else ""), flush=True)

    started = time.time()
    for area in areas:
        t0 = time.time()
        print(f"{area} …", flush=True)
        if area == "gguf":
            record(area_gguf(workdir, quant, args))
        elif area == "convert":
            record(area_convert(workdir, hf, args))
        elif area == "args":
            record(area_args(workdir, quant, hf, args))
        elif area == "hub":
            record(area_hub(workdir, quant, args))
        elif area in ("race", "keys", "cachedir"):
            record({"race": area_race, "keys": area_keys, "cachedir": area_cachedir}[area](workdir, quant, args))
        elif area in ("http", "disconnect"):
            server = Server(quant, workdir)
            try:
                record(http_cases(server) if area == "http" else disconnect_cases(server, args.drops))
                rc, last = server.stop()
                if rc != 0:
                    record(iter([Result(area, "SIGTERM after the cases", "hang" if rc is None else "crash", last)]))
            finally:
                if server.alive:
                    os.killpg(server.proc.pid, signal.SIGKILL)
        else:
            raise SystemExit(f"unknown area {area!r}; choose from gguf,convert,http,disconnect,hub,args,race,keys,cachedir")
        print(f"{area}: {sum(r.area == area for r in results)} cases in {time.time() - t0:.0f} s", flush=True)
    print(f"\n{len(results)} cases in {time.time() - started:.0f} s; workdir {workdir}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
