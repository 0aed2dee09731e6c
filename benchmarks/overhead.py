"""Overhead of refact-gguf vs raw llama.cpp: `llama-bench` and `refact-gguf bench` on the same
GGUF and thread count, run alternately (A B A B …), each in a fresh process.

On a shared VM the speed drifts by more than the gap being measured (±5–20% between runs minutes
apart), so one run of each tool settles nothing: alternating puts both under the same drift, and
the ratio is taken per round (adjacent runs) before it is averaged. Last, the part of each
generated token that refact-gguf itself costs is measured directly: the time of the tg loop spent
outside `llama_decode` (the one call both tools make per token).

    python benchmarks/overhead.py --llama-bench /tmp/refact-full/lb/bin/llama-bench \\
        --model Q4_K_M.gguf --model Q8_0.gguf --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def llama_bench(exe: Path, model: Path, args) -> dict[str, float]:
    cmd = [str(exe), "-m", str(model), "-t", str(args.threads), "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", str(args.reps), "-ngl", str(args.gpu_layers), "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"pp": next(r["avg_ts"] for r in rows if r["n_prompt"]), "tg": next(r["avg_ts"] for r in rows if r["n_gen"])}


def refact_bench(model: Path, args) -> dict[str, float]:
    cmd = [sys.executable, "-m", "refact_gguf.cli", "bench", "-m", str(model), "-t", str(args.threads),
           "--n-prompt", str(args.n_prompt), "--n-gen", str(args.n_gen), "--reps", str(args.reps),
           "--gpu-layers", str(args.gpu_layers), "--json"]
    row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)[0]
    return {"pp": row["pp_tps"], "tg": row["tg_tps"], "gen": row["gen_tps"]}


def time_outside_decode(model: Path, args) -> float:
    """Seconds per generated token spent outside llama_decode, in refact-gguf's tg loop."""
    import llama_cpp
    import numpy as np

    from refact_gguf import llama

    inside = 0.0
    decode = llama_cpp.llama_decode

    def timed_decode(ctx, batch):
        nonlocal inside
        t = time.perf_counter()
        status = decode(ctx, batch)
        inside += time.perf_counter() - t
        return status

    with llama.Model(model, args.gpu_layers) as m:
        ctx = llama.Context(m, n_ctx=args.n_gen + 8, threads=args.threads)
        tokens = np.random.default_rng(0).integers(100, m.n_vocab - 100, args.n_gen).tolist()
        llama_cpp.llama_decode = timed_decode  # llama.py calls it through the module
        try:
            shares = []
            for _ in range(args.reps + 1):
                ctx.reset()
                inside = 0.0
                t = time.perf_counter()
                for tok in tokens:
                    ctx.decode_one(tok)
                t_sync = time.perf_counter()
                ctx.synchronize()  # a GPU's queued work is llama.cpp's time
                inside += time.perf_counter() - t_sync
                shares.append((time.perf_counter() - t - inside) / args.n_gen)
        finally:
            llama_cpp.llama_decode = decode
            ctx.close()
    return statistics.median(shares[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", type=Path, required=True, help="llama-bench built from the binding's llama.cpp")
    ap.add_argument("--model", type=Path, action="append", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = {}
    for model in args.model:
        rounds = []
        for i in range(args.rounds):
            # Alternate which tool goes first, so neither always runs on a warmer (or hotter) machine.
            first, second = ("lb", "rg") if i % 2 == 0 else ("rg", "lb")
            run = {}
            for tool in (first, second):
                run[tool] = llama_bench(args.llama_bench, model, args) if tool == "lb" else refact_bench(model, args)
            rounds.append(run)
            print(f"{model.name} round {i + 1}: llama-bench pp {run['lb']['pp']:.1f} tg {run['lb']['tg']:.2f} | "
                  f"refact-gguf pp {run['rg']['pp']:.1f} tg {run['rg']['tg']:.2f} gen {run['rg']['gen']:.2f}",
                  file=sys.stderr, flush=True)
        summary = {}
        for test in ("pp", "tg"):
            ratios = [r["rg"][test] / r["lb"][test] for r in rounds]
            summary[test] = {
                "llama_bench": statistics.mean(r["lb"][test] for r in rounds),
                "llama_bench_std": statistics.stdev(r["lb"][test] for r in rounds) if len(rounds) > 1 else 0.0,
                "refact_gguf": statistics.mean(r["rg"][test] for r in rounds),
                "refact_gguf_std": statistics.stdev(r["rg"][test] for r in rounds) if len(rounds) > 1 else 0.0,
                "ratio": statistics.mean(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        summary["gen"] = statistics.mean(r["rg"]["gen"] for r in rounds)
        report[model.name] = {"rounds": rounds, "summary": summary}
    print(f"| model | test | llama-bench | refact-gguf | ratio (mean of {args.rounds} rounds) | ratio range |")
    print("|---|---|---|---|---|---|")
    for name, r in report.items():
        for test in ("pp", "tg"):
            s = r["summary"][test]
            label = f"{test}{args.n_prompt if test == 'pp' else args.n_gen}"
            print(f"| {name} | {label} | {s['llama_bench']:.1f} ± {s['llama_bench_std']:.1f} | "
                  f"{s['refact_gguf']:.1f} ± {s['refact_gguf_std']:.1f} | {s['ratio']:.3f} | "
                  f"{s['ratio_min']:.2f}–{s['ratio_max']:.2f} |")
    print()
    for model in args.model:
        outside = time_outside_decode(model, args)
        tg = report[model.name]["summary"]["tg"]["refact_gguf"]
        report[model.name]["outside_decode_s"] = outside
        print(f"{model.name}: refact-gguf's own time per generated token {outside * 1e6:.1f} µs "
              f"= {outside * tg:.2%} of a token at {tg:.1f} t/s (the rest is llama_decode)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
