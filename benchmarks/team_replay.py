"""A team typing at once: N people, each in a different standard-library file, one /infill per
keystroke, the next keystroke sent when the suggestion arrives. Works against any server that
speaks llama-server's /infill (refact-gguf serve, llama-server).

Each person's cursor is on a new line near line 110 of their file; the request carries what
llama.vim sends (up to 256 lines before the cursor, 64 after, the typed part of the line in
`prompt`), or with `--whole-files` everything before the cursor and the rest of the file (prompts up
to the context limit, cut by the server); with `--extra-chunks N`, also what llama.vim's ring buffer
adds (`input_extra`: N chunks of 64 lines from other files, the same each keystroke). Phase 1:
everyone's first (cold) request at once. Phase 2, after all have answered: `--keystrokes` warm
keystrokes each, together or `--stagger-ms` apart. Greedy for every server alike (`top_k: 1`,
`samplers: ["top_k"]`, temperature 0); tokens evaluated and generated are reported beside latency,
and against refact-gguf the engine's own counters over the warm phase (saves, restores, short
answers, background tokens).

    python benchmarks/team_replay.py --url http://127.0.0.1:8012 --typists 8
    python benchmarks/team_replay.py --url http://127.0.0.1:8080 --typists 8 --label llama-server --json out.json
    python benchmarks/team_replay.py --model M.gguf --gpu-layers 99 --typists 8   # the engine in-process, no HTTP
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import threading
import time
from pathlib import Path

import httpx

LINE = "    result = normalize(value, strict=True)"


def files(n: int, offset: int = 0) -> list[Path]:
    """n different standard-library modules of a few hundred lines, spread over the alphabet from
    the `offset`-th."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pool = sorted(p for p in root.glob("*.py") if 200 <= p.read_text(errors="replace").count("\n") and p.stat().st_size < 120_000)
    pool = pool[offset % len(pool):] + pool[: offset % len(pool)]
    step = max(1, len(pool) // n)
    return (pool[::step] * n)[:n]  # more people than modules: some share a file, as a team does


def requests(path: Path, keystrokes: int, n_predict: int, whole: bool = False, budget_ms: int = 600000,
             retype: bool = False, extra: list[dict] | None = None) -> list[dict]:
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    cursor = min(110, len(lines) - 65)
    typed = LINE
    if retype:  # the file's own line, typed again: a trained model can suggest what the file holds
        cursor = next((i for i in range(cursor, len(lines) - 65) if len(lines[i].strip()) >= 24), cursor)
        typed = lines.pop(cursor).rstrip("\n")
    prefix = "".join(lines[0 if whole else max(0, cursor - 256) : cursor])
    suffix = "\n" + "".join(lines[cursor : None if whole else cursor + 64])
    step = max(1, len(typed) // (keystrokes + 1))
    return [{
        "input_prefix": prefix, "input_suffix": suffix, "input_extra": extra or [], "prompt": typed[: k * step],
        "n_predict": n_predict, "n_indent": 0, "top_k": 1, "samplers": ["top_k"], "temperature": 0.0,
        "stream": False, "cache_prompt": True, "t_max_prompt_ms": budget_ms, "t_max_predict_ms": 600000,
    } for k in range(keystrokes + 1)]


def ring_chunks(n: int, offset: int) -> list[dict]:
    """llama.vim's ring buffer (its defaults: 16 chunks of 64 lines): n chunks of other files."""
    return [{"filename": p.name, "text": "".join(p.read_text(errors="replace").splitlines(keepends=True)[40:104])}
            for p in files(n, offset)]


def server_counters(url: str) -> dict | None:
    """refact-gguf's engine counters (None from a server without them, e.g. llama-server)."""
    try:
        engine = httpx.get(f"{url}/health", timeout=30).json().get("engine")
    except (httpx.HTTPError, ValueError):
        return None
    # steps, decode_s and step_s: where the engine thread's time went (the rest of the warm phase's
    # wall time is spent outside its steps: admission, waiting for requests)
    return {k: engine[k] for k in ("cache_saves", "cache_restores", "short_answers", "background_tokens",
                                   "tokens_evaluated", "steps", "batch_tokens", "decode_s", "step_s")} if engine else None


def http_sender(url: str, keys: list[str] | None = None):
    """One request over HTTP for person `who` (with their API key, if `keys`): (ok, timings)."""
    local = threading.local()

    def send(who: int, body: dict) -> tuple[bool, dict]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=900)
        headers = {"Authorization": f"Bearer {keys[who]}"} if keys else {}
        try:
            r = local.client.post(f"{url}/infill", json=body, headers=headers)
        except httpx.HTTPError:
            return False, {}
        return r.status_code == 200, r.json().get("timings", {}) if r.status_code == 200 else {}

    return send


def engine_sender(engine):
    """One request straight to refact-gguf's engine, built as the server builds it."""
    from refact_gguf.server import Limits, Service
    from refact_gguf.server.llama_api import extra_ids

    service = Service(engine, "replay", Limits(prompt_budget_ms=0))

    def send(who: int, body: dict) -> tuple[bool, dict]:
        task = service.fim(body["input_prefix"], body["input_suffix"], time.perf_counter(),
                           max_tokens=body["n_predict"], line=body["prompt"],
                           extra=extra_ids(service.tokenize, [c["text"] for c in body["input_extra"]]))
        c = engine.run(task)
        return True, {"prompt_n": c.tokens_evaluated, "predicted_n": c.tokens_predicted, "draft_n": c.draft_n,
                      "draft_n_accepted": c.draft_accepted, "prompt_ms": c.prompt_ms, "predicted_ms": c.predicted_ms}

    return send


def replay(send, typists: int, keystrokes: int, n_predict: int, counters=lambda: None, **options) -> dict:
    marks: list = []
    rows = run(send, typists, keystrokes, n_predict, on_warm=lambda: marks.append(counters()), **options)
    summary = summarize(rows, typists, keystrokes, n_predict)
    before, after = marks[0] if marks else None, counters()
    if before and after:  # per warm keystroke, what the engine did besides answering
        n = max(1, sum(r["k"] > 0 for r in rows))
        summary["per_warm_keystroke"] = {k: round((after[k] - before[k]) / n, 3) for k in before}
    return summary


def run(send, typists: int, keystrokes: int, n_predict: int, pause_s: float = 0.0, whole: bool = False,
        budget_ms: int = 600000, stagger_ms: float = 0.0, retype: bool = False, file_offset: int = 0,
        extra_chunks: int = 0, on_warm=lambda: None) -> list[dict]:
    """Phase 1 (every first, cold request at once), then phase 2 (warm keystrokes, `pause_s`
    apart, typist i starting `i * stagger_ms` late): one row a request, `end` and `start` on
    time.perf_counter()'s clock. `on_warm` runs once between the phases."""
    # The ring's chunks come from files half the pool away from the typists' own.
    extra = ring_chunks(extra_chunks, file_offset + 50) if extra_chunks else None
    plans = [requests(p, keystrokes, n_predict, whole, budget_ms, retype, extra) for p in files(typists, file_offset)]
    rows: list[dict] = []
    lock = threading.Lock()
    cold_done = threading.Barrier(typists + 1)
    warm_go = threading.Event()

    def one(who: int, k: int, body: dict) -> None:
        t0 = time.perf_counter()
        ok, t = send(who, body)
        with lock:
            rows.append({"who": who, "k": k, "start": t0, "ms": (time.perf_counter() - t0) * 1e3, "ok": ok,
                         "prompt_n": t.get("prompt_n", 0), "predicted_n": t.get("predicted_n", 0),
                         "draft_n": t.get("draft_n", 0), "draft_n_accepted": t.get("draft_n_accepted", 0),
                         "server_ms": t.get("prompt_ms", 0.0) + t.get("predicted_ms", 0.0), "end": time.perf_counter()})

    def typist(who: int) -> None:
        one(who, 0, plans[who][0])
        cold_done.wait()
        warm_go.wait()
        time.sleep(who * stagger_ms / 1e3)
        for k, body in enumerate(plans[who][1:], 1):
            time.sleep(pause_s)
            one(who, k, body)

    threads = [threading.Thread(target=typist, args=(i,)) for i in range(typists)]
    for t in threads:
        t.start()
    cold_done.wait()
    on_warm()
    warm_go.set()
    for t in threads:
        t.join()
    return rows


def summarize(rows: list[dict], typists: int, keystrokes: int, n_predict: int) -> dict:
    t_warm = min((r["start"] for r in rows if r["k"] > 0), default=0.0)
    cold = [r for r in rows if r["k"] == 0]
    warm = [r for r in rows if r["k"] > 0]
    warm_ok = [r for r in warm if r["ok"]]
    warm_wall = max(r["end"] for r in warm) - t_warm if warm else 0.0
    ms = sorted(r["ms"] for r in warm_ok)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 1) if ms else float("nan")

    return {
        "typists": typists, "keystrokes": keystrokes, "n_predict": n_predict,
        "cold_p50_ms": round(statistics.median(r["ms"] for r in cold), 1),
        "cold_mean_prompt_n": round(statistics.mean(r["prompt_n"] for r in cold), 1),
        "warm_p50_ms": pct(0.5), "warm_p95_ms": pct(0.95),
        "warm_tokens_per_s": round(sum(r["predicted_n"] for r in warm_ok) / warm_wall, 1) if warm_wall else 0.0,
        # Servers stop at different places (ours at the FIM stop rules, llama-server at n_predict or
        # EOS): the time a generated token took, beside the keystroke's.
        "warm_ms_per_token": round(sum(r["ms"] for r in warm_ok) / max(1, sum(r["predicted_n"] for r in warm_ok)), 2),
        # What a keystroke spent outside the server's own prompt and generation time (both servers
        # report it alike, from the slot's start): HTTP, building the prompt, waiting for a slot.
        "warm_outside_p50_ms": round(statistics.median(r["ms"] - r["server_ms"] for r in warm_ok), 1) if warm_ok else float("nan"),
        "warm_mean_prompt_n": round(statistics.mean(r["prompt_n"] for r in warm_ok), 2) if warm_ok else 0.0,
        "warm_mean_predicted_n": round(statistics.mean(r["predicted_n"] for r in warm_ok), 2) if warm_ok else 0.0,
        # Speculation (ours: --draft; llama-server: --spec-type), summed over the warm keystrokes.
        "warm_drafted": sum(r["draft_n"] for r in warm_ok), "warm_draft_accepted": sum(r["draft_n_accepted"] for r in warm_ok),
        "errors": sum(not r["ok"] for r in rows),
        # From everyone's first keystroke to the last answer: what front-loading a cold file's
        # prompt (or spreading it over the next keystrokes) costs a person in all.
        "session_s": round(max(r["end"] for r in rows) - min(r["start"] for r in rows), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--model", type=Path, help="run refact-gguf's engine in this process instead (no HTTP)")
    ap.add_argument("--gpu-layers", default="0")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--typists", type=int, default=8)
    ap.add_argument("--keystrokes", type=int, default=6)
    ap.add_argument("--n-predict", type=int, default=16)
    ap.add_argument("--whole-files", action="store_true", help="the whole file around the cursor, not 256/64 lines")
    ap.add_argument("--stagger-ms", type=float, default=0.0, help="typist i starts typing i × this late")
    ap.add_argument("--pause-ms", type=float, default=0.0, help="between an answer and the next keystroke (0: back to back)")
    ap.add_argument("--budget-ms", type=int, default=600000, help="t_max_prompt_ms sent (llama.vim: 500)")
    ap.add_argument("--retype", action="store_true",
                    help="type the file's own line at the cursor (it leaves the suffix), not a made-up one: what a trained model can predict")
    ap.add_argument("--file-offset", type=int, default=0, help="start the pool of files this many files on (other files, same sizes)")
    ap.add_argument("--extra-chunks", type=int, default=0, help="input_extra chunks a request carries, as llama.vim's ring buffer (its default: 16)")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path, help="append the summary as one JSON line")
    args = ap.parse_args()
    options = {"whole": args.whole_files, "stagger_ms": args.stagger_ms, "budget_ms": args.budget_ms,
               "pause_s": args.pause_ms / 1e3, "retype": args.retype,
               "file_offset": args.file_offset, "extra_chunks": args.extra_chunks}
    if args.url:
        url = args.url.rstrip("/")
        summary = replay(http_sender(url), args.typists, args.keystrokes, args.n_predict, lambda: server_counters(url), **options)
    else:
        from refact_gguf.engine import Engine
        from refact_gguf.select import open_model

        with open_model(args.model, args.gpu_layers) as model, \
                Engine(model, parallel=args.typists, threads=args.threads).start() as engine:
            summary = replay(engine_sender(engine), args.typists, args.keystrokes, args.n_predict, **options)
            summary["engine"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(engine.stats).items()}
    summary = {"label": args.label, **summary}
    print(json.dumps(summary))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
