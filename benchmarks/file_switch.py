"""One person switching files: first keystrokes in new files, return visits, and visits after the
editor (and so the server) restarts. Works against any server that speaks llama-server's /infill;
this script starts the server itself (`--server`), so it can restart it.

The person visits `--files` standard-library files in turn (cursor on a new line near line 110,
what llama.vim sends: up to 256 lines before, 64 after, the typed part in `prompt`), types
`--keys` keys per visit with `--pause` seconds between a suggestion and the next key, for
`--rounds` rounds; then the server is stopped (SIGTERM) and started again for one more round.
Every request sends llama.vim's `t_max_prompt_ms: 500` and is greedy (`top_k: 1`,
`samplers: ["top_k"]`), `n_predict` 16. Per keystroke: latency, prompt tokens the server
evaluated, tokens generated, and whether it answered from a short context (refact-gguf's
`short_context`; llama-server has none).

    python benchmarks/file_switch.py --label ours --port 8012 \\
        --server ".venv/bin/refact-gguf serve -m M.gguf -t 2 --port 8012 --cache-dir /tmp/kv"
    python benchmarks/file_switch.py --label llama-server --port 8013 \\
        --server "llama-server -m M.gguf -t 2 -c 4096 --cache-reuse 256 --spm-infill --port 8013"
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from team_replay import files, requests  # noqa: E402  (the same files and request bodies)


def start(command: str, url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(shlex.split(command), stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start in 300 s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # as an editor stops it: the server may save what it keeps
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def visit_round(client: httpx.Client, url: str, plans: list[list[dict]], round_no: int, pause: float, rows: list, out) -> None:
    for f, plan in enumerate(plans):
        arrived = time.perf_counter()
        for k, body in enumerate(plan):
            t0 = time.perf_counter()
            r = client.post(f"{url}/infill", json=body)
            ms = (time.perf_counter() - t0) * 1e3
            data = r.json() if r.status_code == 200 else {}
            timings = data.get("timings", {})
            row = {"round": round_no, "file": f, "key": k + 1, "ms": round(ms, 1), "status": r.status_code,
                   "prompt_n": timings.get("prompt_n"), "predicted_n": timings.get("predicted_n"),
                   "prompt_tokens": data.get("tokens_evaluated"), "short": bool(data.get("short_context")),
                   "non_empty": bool(data.get("content", "").strip()), "since_arrival_s": round(t0 - arrived, 1)}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            if k + 1 < len(plan):
                time.sleep(pause)


def summary(rows: list[dict], rounds: int) -> dict:
    def p50(rs):
        return round(statistics.median(r["ms"] for r in rs)) if rs else None

    def span(rs):
        return [round(min(r["ms"] for r in rs)), round(max(r["ms"] for r in rs))] if rs else None

    first = [r for r in rows if r["round"] == 1 and r["key"] == 1]
    returns = [r for r in rows if 1 < r["round"] <= rounds and r["key"] == 1]
    restart = [r for r in rows if r["round"] == rounds + 1 and r["key"] == 1]
    warm = [r for r in rows if r["key"] > 1 and not r["short"] and (r["prompt_n"] or 0) < 32]
    full_after = []
    for f in sorted({r["file"] for r in rows}):
        visit = [r for r in rows if r["round"] == 1 and r["file"] == f]
        full = next((r for r in visit if not r["short"]), None)
        full_after.append(full["since_arrival_s"] if full else None)
    return {
        "first_key_in_new_file_ms": {"p50": p50(first), "range": span(first),
                                     "non_empty": sum(r["non_empty"] for r in first), "short": sum(r["short"] for r in first),
                                     "prompt_n_mean": round(statistics.mean(r["prompt_n"] or 0 for r in first))},
        "return_visit_first_key_ms": {"p50": p50(returns), "range": span(returns), "short": sum(r["short"] for r in returns),
                                      "prompt_n_mean": round(statistics.mean(r["prompt_n"] or 0 for r in returns)) if returns else None},
        "after_restart_first_key_ms": {"p50": p50(restart), "range": span(restart), "short": sum(r["short"] for r in restart),
                                       "prompt_n_mean": round(statistics.mean(r["prompt_n"] or 0 for r in restart)) if restart else None},
        "warm_key_ms": {"p50": p50(warm), "n": len(warm),
                        "predicted_n_mean": round(statistics.mean(r["predicted_n"] or 0 for r in warm), 1) if warm else None},
        "round1_full_context_after_s": full_after,
        "errors": sum(r["status"] != 200 for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="the command that starts the server")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--keys", type=int, default=5)
    ap.add_argument("--pause", type=float, default=4.0, help="seconds between a suggestion and the next key")
    ap.add_argument("--rounds", type=int, default=2, help="rounds before the restart (one more after it)")
    ap.add_argument("--n-predict", type=int, default=16)
    ap.add_argument("--t-max-prompt-ms", type=int, default=500, help="llama.vim's default")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=Path("file_switch"), help="directory for rows, summary, server log")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    plans = []
    for path in files(args.files):
        plan = requests(path, args.keys - 1, args.n_predict)
        for body in plan:
            body["t_max_prompt_ms"] = args.t_max_prompt_ms
        plans.append(plan)
    rows: list[dict] = []
    log = args.out / f"{args.label or 'server'}.log"
    with (args.out / f"{args.label or 'server'}.rows.jsonl").open("w") as out, httpx.Client(timeout=900) as client:
        proc = start(args.server, url, log)
        try:
            for n in range(1, args.rounds + 1):
                visit_round(client, url, plans, n, args.pause, rows, out)
        finally:
            stop(proc)
        proc = start(args.server, url, log)
        try:
            visit_round(client, url, plans, args.rounds + 1, args.pause, rows, out)
        finally:
            stop(proc)
    result = {"label": args.label, "files": args.files, "keys": args.keys, "pause_s": args.pause,
              "n_predict": args.n_predict, "t_max_prompt_ms": args.t_max_prompt_ms, **summary(rows, args.rounds)}
    (args.out / f"{args.label or 'server'}.summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
