"""Full-size conversion benchmark: synthetic checkpoint of the released shape → f16 GGUF → 22 quants.

Prints wall time and peak RSS of the conversion (measured in a child process, so the checkpoint
generation does not count), quantize time per type, and each file's size against the published
table. Takes ~25 minutes on 2 cores and ~12 GB of disk.

    python benchmarks/convert_full.py --work /tmp/refact-full [--quant all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from refact_gguf import catalog
from refact_gguf.convert.synthetic import SyntheticSpec, write_checkpoint

CHILD = """
import sys, time, json
from pathlib import Path
from refact_gguf.convert import convert
from refact_gguf import catalog
hf, out, quants = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
r = convert(hf, out, "f16", catalog.load().select(quants) if quants else [])
print(json.dumps({k: round(v, 2) for k, v in r.seconds.items()}))
"""


def run_child(*args: str) -> tuple[dict, float, float]:
    """(seconds by step, wall s, peak RSS MB) of one conversion in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("warning: peak RSS of an earlier child was larger; run the steps separately", file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/refact-full"))
    ap.add_argument("--quant", default="all")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hf, out = args.work / "hf", args.work / "gguf"
    if not (hf / "model.safetensors").is_file():
        t0 = time.perf_counter()
        write_checkpoint(hf, SyntheticSpec.full_size(dtype="float16"))
        print(f"synthetic full-size f16 checkpoint written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    seconds, wall, rss = run_child(str(hf), str(out), "")
    report = {"machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
              "convert_f16": {"wall_s": round(wall, 1), "convert_s": seconds["convert"], "peak_rss_mb": round(rss)}}
    print(f"convert → f16: {seconds['convert']:.1f} s (process wall {wall:.1f} s), peak RSS {rss:.0f} MB")

    if args.quant:
        seconds, wall, rss = run_child(str(hf), str(out / "q"), args.quant)
        cat = catalog.load()
        rows = []
        for q in cat.select(args.quant):
            size = (out / "q" / q.filename(cat.model)).stat().st_size / 2**30
            rows.append({"quant": q.name, "seconds": seconds[q.name], "size_gib": round(size, 3),
                         "published_gib": q.size_gib, "delta_gib": round(size - q.size_gib, 3)})
        report["quantize"] = {"total_s": round(sum(r["seconds"] for r in rows) + seconds.get("imatrix", 0), 1),
                              "imatrix_s": seconds.get("imatrix"), "convert_s": seconds["convert"], "types": rows}
        print("\n| quant | seconds | size GiB | published GiB | Δ |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['quant']} | {r['seconds']:.1f} | {r['size_gib']:.3f} | {r['published_gib']:.2f} | {r['delta_gib']:+.3f} |")
        print(f"\nimatrix {seconds.get('imatrix', 0):.1f} s; all quants {report['quantize']['total_s']:.0f} s in total")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
