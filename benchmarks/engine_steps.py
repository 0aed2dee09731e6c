"""What a generation step costs: a plain decode loop (one token a sequence a step, greedy from the
logits) against the engine's `tick` doing the same for P sequences, and where the engine's extra
time goes. No HTTP: the engine's own overhead.

    python benchmarks/engine_steps.py MODEL.gguf --gpu-layers 99 -t 16 --parallel 1 8 32 --depth 2000

On a GPU `llama_decode` returns before the step is done: `run` is its launch, `logits` the wait.
"""

from __future__ import annotations

import argparse
import statistics
import time

from refact_gguf import engine as E, llama as L
from refact_gguf.llama import Context, Model
from refact_gguf.prompt_cache import PromptCache
from refact_gguf.tasks import Task

STEPS = 64
PARTS: dict[str, float] = {}  # seconds in each wrapped method since the last clear


def timed(cls, name: str, parts: dict[str, float]) -> None:
    """`cls.name` from now on adds the seconds of each call to `parts[name]`."""
    f = getattr(cls, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t

    setattr(cls, name, wrapper)


def prompts(p: int, depth: int) -> list[list[int]]:
    return [[1 + (7 * s + j) % 40000 for j in range(depth)] for s in range(p)]


def plain_loop(model: Model, p: int, depth: int, threads: int) -> float:
    """Median ms of a step of p one-token rows, as llama-batched-bench decodes them."""
    with Context(model, n_ctx=4096, n_batch=512, threads=threads, n_seq_max=p + max(1, p // 2)) as ctx:
        batch, last = ctx.batch, []
        for s, prompt in enumerate(prompts(p, depth)):
            for i in range(0, depth, 512):
                batch.clear()
                batch.add(s, prompt[i : i + 512], i, output_last=True)
                ctx.run(batch)
            last.append(int(ctx.logits(1)[0].argmax()))
        times = []
        for k in range(STEPS):
            t = time.perf_counter()
            batch.clear()
            for s in range(p):
                batch.add(s, (last[s],), depth + k, output_last=True)
            ctx.run(batch)
            last = ctx.logits(p).argmax(axis=1).tolist()
            times.append(time.perf_counter() - t)
    return statistics.median(times[4:]) * 1e3


def engine_ticks(model: Model, p: int, depth: int, threads: int) -> tuple[float, dict[str, float]]:
    """Median ms of an engine tick with p requests generating, and ms a tick in each part."""
    engine = E.Engine(model, n_ctx=4096, parallel=p, threads=threads, cache=PromptCache(1 << 30))
    try:
        for round_ in range(3):  # the last round's figures: warm caches, steady steps
            for prompt in prompts(p, depth):
                engine.submit(Task(prompt + [5 + round_], STEPS, stop_ids=frozenset()))
            ticks = []
            while engine._active or engine._waiting:
                if len(ticks) == 8:  # past the prompts
                    PARTS.clear()
                t = time.perf_counter()
                engine.tick()
                ticks.append(time.perf_counter() - t)
        n = max(1, len(ticks) - 8)
        return statistics.median(ticks[8:]) * 1e3, {k: v * 1e3 / n for k, v in PARTS.items()}
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--depth", type=int, default=1500, help="tokens in each sequence's cache")
    args = ap.parse_args()
    for name in ("_plan", "_lay_out", "_advance", "_pick", "_admit", "_yield_background"):
        timed(E.Engine, name, PARTS)
    for name in ("run", "logits"):
        timed(L.Context, name, PARTS)
    model = Model(args.model, args.gpu_layers)
    for p in args.parallel:
        plain = min(plain_loop(model, p, args.depth, args.threads) for _ in range(2))
        tick, parts = engine_ticks(model, p, args.depth, args.threads)
        print(f"P={p} depth {args.depth}: plain step {plain:.3f} ms; engine tick {tick:.3f} ms; "
              + ", ".join(f"{k} {v:.3f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])), flush=True)


if __name__ == "__main__":
    main()
