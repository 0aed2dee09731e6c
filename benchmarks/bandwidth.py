"""Memory bandwidth of this machine (a large numpy copy) and what it allows for generation:
tg ≤ bandwidth / bytes read per token (≈ the weights).

    python benchmarks/bandwidth.py [--tg Q4_K_M=18.0 --tg Q8_0=12.0 --dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def copy_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes/s moved by np.copyto (read + write counted), best of `reps`."""
    src = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tg", action="append", default=[], help="QUANT=tokens/s measured by bench")
    ap.add_argument("--dir", type=Path, help="directory of the GGUF files (their size = bytes read per token)")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)")
    for item in args.tg:
        name, tg = item.split("=")
        size = (args.dir / f"Refact-1_6B-fim.{name}.gguf").stat().st_size
        print(f"{name}: {float(tg):.1f} t/s × {size / 1e9:.2f} GB/token = {float(tg) * size / 1e9:.1f} GB/s "
              f"= {float(tg) * size / bw:.0%} of the measured bandwidth; bound {bw / size:.1f} t/s")


if __name__ == "__main__":
    main()
