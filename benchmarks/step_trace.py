"""`refact-gguf serve` with a trace of every engine step, then the trace read keystroke by keystroke.

    python benchmarks/step_trace.py TRACE.json serve -m MODEL.gguf --gpu-layers 99 ...   # until SIGTERM
    python benchmarks/step_trace.py TRACE.json                                           # the last keystrokes

A step: when it began, how long it took, its batch's tokens, and the time in `llama_decode` (on a
GPU its launch; a step whose compute graph changed pays here) and in reading the logits (the wait).
Steps less than 3 ms apart are one keystroke's (one typist: `team_replay --typists 1`).
"""

from __future__ import annotations

import atexit
import json
import signal
import statistics
import sys
import time


def trace(path: str, argv: list[str]) -> None:
    from engine_steps import timed  # beside this script
    from refact_gguf import engine, llama
    from refact_gguf.cli import main

    steps, current = [], {}
    timed(llama.Context, "run", current)
    timed(llama.Context, "logits", current)
    step = engine.Engine.step

    def traced(self):
        current.clear()
        t = time.perf_counter()
        step(self)
        steps.append((t, time.perf_counter() - t, self.ctx.batch.n, current.get("run", 0.0), current.get("logits", 0.0)))

    engine.Engine.step = traced
    atexit.register(lambda: json.dump(steps, open(path, "w")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.argv = ["refact-gguf", *argv]
    main()


def show(path: str, last: int = 4) -> None:
    keystrokes, current = [], []
    for step in json.load(open(path)):
        if current and step[0] - (current[-1][0] + current[-1][1]) > 0.003:
            keystrokes.append(current)
            current = []
        current.append(step)
    keystrokes.append(current)
    for k in keystrokes[-last:]:
        print(f"{len(k)} steps, {sum(s[1] for s in k) * 1e3:.1f} ms: "
              + " ".join(f"{n}:{d * 1e3:.2f}/{r * 1e3:.2f}" for _, d, n, r, _ in k) + "   (tokens:ms/of it in llama_decode)")
    # Over the warm keystrokes (all but the first): the step's parts, and the time between steps.
    warm = [s for k in keystrokes[1:] for s in k]
    gaps = [b[0] - (a[0] + a[1]) for k in keystrokes[1:] for a, b in zip(k, k[1:])]
    if warm:
        median = lambda xs: statistics.median(xs) * 1e3
        print(f"median a warm step: {median([s[1] for s in warm]):.3f} ms; llama_decode {median([s[3] for s in warm]):.3f},"
              f" logits {median([s[4] for s in warm]):.3f}, the rest {median([s[1] - s[3] - s[4] for s in warm]):.3f};"
              f" between steps {median(gaps) if gaps else 0:.3f}")


if __name__ == "__main__":
    trace(sys.argv[1], sys.argv[2:]) if len(sys.argv) > 2 else show(sys.argv[1])
