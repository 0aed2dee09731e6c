"""Validate `recommend`'s memory estimate: peak RSS of loading each quant and running one FIM
whose prompt fills the context (the worst case the estimate is for), each in a fresh process,
against the estimate for the same file and context.

    python benchmarks/memory.py --dir /tmp/refact-full/gguf/q [--ctx 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from refact_gguf import catalog
from refact_gguf.select import estimate

CHILD = """
import resource, sys, sysconfig
from pathlib import Path
from refact_gguf.runtime import Runtime
from refact_gguf.select import open_model
text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
with open_model(Path(sys.argv[1]), 0) as model, Runtime(model, n_ctx=int(sys.argv[2]), threads=int(sys.argv[3])) as rt:
    result = rt.fim(text[:20000], text[20000:24000], max_tokens=16)  # truncated to fill the context
    assert result.prompt_tokens > int(sys.argv[2]) - 200, result.prompt_tokens
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quant", default="all")
    args = ap.parse_args()
    cat = catalog.load()
    rows = []
    print("| quant | file MiB | estimate MiB | measured peak RSS MiB | error |\n|---|---|---|---|---|")
    for q in cat.select(args.quant):
        path = args.dir / q.filename(cat.model)
        if not path.is_file() or q.alias_of:
            continue
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.ctx), str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        measured = int(out.strip().splitlines()[-1])
        est = estimate(q, n_ctx=args.ctx, size_bytes=path.stat().st_size).total
        err = est / measured - 1
        rows.append({"quant": q.name, "file": path.stat().st_size, "estimate": est, "measured": measured, "error": err})
        print(f"| {q.name} | {path.stat().st_size / 2**20:.0f} | {est / 2**20:.0f} | {measured / 2**20:.0f} | {err:+.1%} |", flush=True)
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"\nworst: {worst['quant']} {worst['error']:+.1%} (target: within ±15%)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
