"""One typist against a running server (team_replay's file and keystrokes, greedy, n_predict 16):
per warm keystroke the wall time and the server's own prompt_ms / predicted_ms, and what lies
outside them (HTTP, parsing, building the prompt). One JSON line:
    python benchmarks/keystroke_split.py http://127.0.0.1:8012 LABEL [--json results.jsonl]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from team_replay import files, http_sender, requests  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n    python")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8012")
    p.add_argument("label", help="what to call it in the output")
    p.add_argument("--json", type=Path, help="append the result line to this file")
    args = p.parse_args()
    url, label = args.url, args.label
    send = http_sender(url)
    rows = []
    for k, body in enumerate(requests(files(1)[0], 8, 16)):
        t0 = time.perf_counter()
        ok, t = send(0, body)
        ms = (time.perf_counter() - t0) * 1e3
        if k and ok:  # the first is the cold one
            rows.append({"ms": ms, **{f: t.get(f, 0) for f in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms")}})

    def p50(f):
        return round(statistics.median(f(r) for r in rows), 1)

    out = {"label": label, "wall_p50": p50(lambda r: r["ms"]), "prompt_ms_p50": p50(lambda r: r["prompt_ms"]),
           "predicted_ms_p50": p50(lambda r: r["predicted_ms"]),
           "per_token_ms": p50(lambda r: r["predicted_ms"] / max(1, r["predicted_n"])),
           "outside_ms_p50": p50(lambda r: r["ms"] - r["prompt_ms"] - r["predicted_ms"]),
           "prompt_n": statistics.mean(r["prompt_n"] for r in rows), "predicted_n": statistics.mean(r["predicted_n"] for r in rows)}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
