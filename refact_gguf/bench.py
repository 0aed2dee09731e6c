"""Speed: load time, prompt processing (pp) and generation (tg) tokens/s, peak RSS.

The method is llama-bench's, so figures compare: a warm-up run, then `reps` runs of each test on
an emptied KV cache; pp decodes `n_prompt` random tokens as one batch, tg decodes `n_gen` tokens
one at a time; tokens/s is reported as mean ± stdev over the runs. When several models are
measured, each runs in a fresh process, so load time and peak RSS are its own.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import catalog
from .errors import InputError, RefactGGUFError


@dataclass(frozen=True)
class BenchResult:
    model: str
    size_bytes: int
    threads: int
    gpu_layers: int
    repack: bool
    load_s: float
    pp_tps: float
    pp_std: float
    tg_tps: float
    tg_std: float
    gen_tps: float  # generation through the runtime's whole per-token path (sampling, text, stop rules)
    gen_std: float
    peak_rss_mb: float
    n_prompt: int
    n_gen: int
    reps: int
    depth: int = 0  # tokens in the cache before each test

    def as_dict(self) -> dict:
        return asdict(self)


def _bench_in_process(path: str, threads: int, gpu_layers: str | int, n_prompt: int, n_gen: int, reps: int,
                      depth: int = 0) -> BenchResult:
    import faulthandler

    import numpy as np

    from .llama import Context
    from .loader import repack_safe
    from .runtime import Runtime
    from .select import open_model
    from .tasks import Task

    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()  # a crash inside llama.cpp still says where
        except (ValueError, OSError):  # stderr without a file descriptor (e.g. captured by a test runner)
            pass

    t0 = time.perf_counter()
    model = open_model(Path(path), gpu_layers)
    n_gpu = model.n_gpu_layers
    # n_batch ≥ 512: the depth is filled in big batches, as llama-bench fills it (a 16-token test
    # prompt still goes in as one batch of 16)
    ctx = Context(model, n_ctx=depth + n_prompt + n_gen, n_batch=max(n_prompt, 512), threads=threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, model.n_vocab - 100, n_prompt).tolist()
    gen = rng.integers(100, model.n_vocab - 100, n_gen).tolist()
    # llama-bench's -d: every test starts with `depth` tokens already in the cache (not timed), as a
    # server's does: attention then reads them for every new token.
    context = rng.integers(100, model.n_vocab - 100, depth).tolist()

    depth_state: list = []  # the depth's KV, filled once and restored for every test, as llama-bench does

    def fresh() -> None:
        ctx.reset()
        if context and depth_state:
            ctx.seq_restore(0, depth_state[0], depth)
            ctx.n_past = depth
        elif context:
            ctx.decode(context)
            ctx.synchronize()
            depth_state.append(ctx.seq_state(0))

    def run_pp() -> float:
        fresh()
        t = time.perf_counter()
        ctx.decode(prompt)
        ctx.synchronize()
        return n_prompt / (time.perf_counter() - t)

    def run_tg() -> float:
        fresh()
        t = time.perf_counter()
        for tok in gen:
            ctx.decode_one(tok)
        ctx.synchronize()
        return n_gen / (time.perf_counter() - t)

    def mean_std(test) -> tuple[float, float]:
        test()  # warm-up, as llama-bench does
        runs = [test() for _ in range(reps)]
        return statistics.mean(runs), statistics.stdev(runs) if len(runs) > 1 else 0.0

    results = {"pp": mean_std(run_pp), "tg": mean_std(run_tg)}
    ctx.close()
    # What a user gets: greedy generation with detokenization and the FIM stop rules' callback.
    with Runtime(model, n_ctx=depth + n_prompt + n_gen + 16, threads=threads) as rt:
        def run_gen() -> float:
            # the same depth, restored (or none); the run evaluates the prompt after it
            rt.restore(*(depth_state[0], context) if depth_state else ())
            done = rt.run(Task(context + prompt[:16], n_gen))
            return done.tokens_predicted / (done.predicted_ms / 1e3) if done.predicted_ms else 0.0

        results["gen"] = mean_std(run_gen)
    model.close()
    return BenchResult(
        model=Path(path).name, size_bytes=Path(path).stat().st_size, threads=threads, gpu_layers=n_gpu,
        repack=repack_safe(), load_s=load_s, pp_tps=results["pp"][0], pp_std=results["pp"][1],
        tg_tps=results["tg"][0], tg_std=results["tg"][1], gen_tps=results["gen"][0], gen_std=results["gen"][1],
        peak_rss_mb=_peak_rss_mb(),
        n_prompt=n_prompt, n_gen=n_gen, reps=reps, depth=depth,
    )


def _peak_rss_mb() -> float:
    """This process's peak resident memory: getrusage where there is one (Linux reports KiB, macOS
    bytes), else psutil's peak working set (Windows)."""
    try:
        import resource
    except ImportError:
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _check_fits(tokens: int, what: str) -> None:
    """A test longer than the model's context measures nothing a user meets (and 10⁶ tokens would
    run for hours): refused before anything loads."""
    limit = catalog.load().model.n_ctx_train
    if tokens > limit:
        raise InputError(f"{what} = {tokens:,} tokens, more than the model's context ({limit:,})",
                         "lower -p, --n-gen or --depth")


def bench(path: Path, threads: int | None = None, gpu_layers: str | int = 0, n_prompt: int = 512, n_gen: int = 128,
          reps: int = 5, isolate: bool = True, depth: int = 0) -> BenchResult:
    """Benchmark one GGUF; `isolate` runs it in a fresh process (clean load time and RSS); `depth`
    tokens in the cache before each test, like llama-bench's -d."""
    from .loader import inspect

    _check_fits(depth + n_prompt + n_gen, f"--depth {depth} + -p {n_prompt} + --n-gen {n_gen}")
    threads = threads or os.cpu_count() or 1
    args = (str(path), threads, gpu_layers, n_prompt, n_gen, reps, depth)
    if not isolate:
        return _bench_in_process(*args)  # its load validates the file
    inspect(path)  # a bad file is a clear error here, before a child is started
    # A fresh interpreter; if llama.cpp crashes in it, the caller gets a one-line error naming the
    # model and the signal instead of a broken process pool.
    proc = subprocess.run([sys.executable, "-m", "refact_gguf.bench", json.dumps(args)], capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or [""])[-1]  # anything llama.cpp printed comes before
    reply = json.loads(last) if last.startswith("{") else {}
    if "error" in reply:  # the child's own one-line error, passed on as it is
        raise RefactGGUFError(reply["error"], reply["hint"])
    if proc.returncode != 0 or not reply:
        signame = next((sig.name for sig in signal.Signals if sig == -proc.returncode), str(-proc.returncode))
        how = f"signal {signame}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        lines = proc.stderr.strip().splitlines()
        # faulthandler's dump ends in a stack; its first line says what happened
        why = next((ln for ln in lines if ln.startswith("Fatal Python error")), lines[-1] if lines else "")
        raise RefactGGUFError(f"benchmarking {path.name} failed ({how}){': ' + why if why else ''}",
                              f"run it alone for the full log: refact-gguf bench -m {path} --verbose")
    return BenchResult(**reply)


if __name__ == "__main__":  # the isolated child of bench(): one JSON object on stdout
    try:
        print(json.dumps(_bench_in_process(*json.loads(sys.argv[1])).as_dict()))
    except RefactGGUFError as e:
        print(json.dumps({"error": e.message, "hint": e.hint}))
        sys.exit(1)


@dataclass(frozen=True)
class BatchedResult:
    """One row of llama-batched-bench's table, measured through the engine."""

    parallel: int
    n_prompt: int
    n_gen: int
    prompt_s: float  # every sequence's prompt in, batched
    gen_s: float  # then n_gen tokens for every sequence, one step each
    generated: int  # tokens actually generated (a sequence may end early at an end token)

    @property
    def pp_tps(self) -> float:
        return self.parallel * self.n_prompt / self.prompt_s

    @property
    def tg_tps(self) -> float:
        return self.generated / self.gen_s

    def as_dict(self) -> dict:
        return {**asdict(self), "pp_tps": self.pp_tps, "tg_tps": self.tg_tps}


def batched(path: Path, parallel: list[int], n_prompt: int = 1500, n_gen: int = 16, threads: int | None = None,
            gpu_layers: str | int = 0, n_ctx: int | None = None) -> list[BatchedResult]:
    """llama-batched-bench's measure (`-npp n_prompt -ntg n_gen -npl parallel`, a KV stream per
    sequence) through the serving engine: B different random prompts enter at once (each a
    1-token task, so the cache keeps them), then the same B prompts generate `n_gen` tokens each,
    every step one batched decode. Greedy; the engine's whole per-token path is timed."""
    import numpy as np

    from .engine import Engine
    from .select import open_model
    from .tasks import Task

    _check_fits(n_prompt + n_gen, f"-p {n_prompt} + --n-gen {n_gen}")
    rows = []
    with open_model(Path(path), gpu_layers) as model:
        rng = np.random.default_rng(0)
        for b in parallel:
            prompts = [rng.integers(100, model.n_vocab - 100, n_prompt).tolist() for _ in range(b)]
            with Engine(model, n_ctx=n_ctx or n_prompt + n_gen + 8, parallel=b, threads=threads).start() as engine:
                t0 = time.perf_counter()
                for h in [engine.submit(Task(p, 1)) for p in prompts]:
                    h.wait()
                t1 = time.perf_counter()
                done = [h.wait() for h in [engine.submit(Task(p, n_gen + 1)) for p in prompts]]
                t2 = time.perf_counter()
            # n_gen + 1 steps of B tokens: the prompt's last token again (its logits were not kept), then n_gen
            rows.append(BatchedResult(b, n_prompt, n_gen, t1 - t0, t2 - t1, sum(c.tokens_predicted for c in done)))
    return rows
