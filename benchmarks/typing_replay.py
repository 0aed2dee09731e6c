"""Replay a typing session against /infill, as llama.vim sends it, and report latency and the
tokens each request evaluated.

The file is the standard library's fnmatch.py (~1500 tokens); the cursor sits on a new line at
line 120 and each request types a few more characters, the line's text in `prompt`.

    python benchmarks/typing_replay.py --model Refact-1_6B-fim.Q4_K_M.gguf [--threads 2] [--order spm]
    python benchmarks/typing_replay.py --url http://127.0.0.1:8080      # any running server, e.g. llama-server
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sysconfig
import threading
import time
from pathlib import Path

import httpx

LINE = "    pattern = translate(os.path.normcase(pat))"


def requests(order: str, keystrokes: int, n_predict: int, n_indent: int) -> list[dict]:
    lines = (Path(sysconfig.get_paths()["stdlib"]) / "fnmatch.py").read_text().splitlines(keepends=True)
    prefix, suffix = "".join(lines[:120]), "\n" + "".join(lines[120:])
    step = max(1, len(LINE) // keystrokes)
    bodies = []
    for k in range(1, keystrokes + 1):
        typed = LINE[: min(len(LINE), k * step)]
        bodies.append({
            "input_prefix": prefix, "input_suffix": suffix, "input_extra": [], "prompt": typed,
            "n_predict": n_predict, "n_indent": n_indent, "top_k": 40, "top_p": 0.90, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
            "t_max_prompt_ms": 60000, "t_max_predict_ms": 60000, "fim_order": order,
        })
    return bodies


def start_server(model: Path, threads: int, n_ctx: int, gpu_layers: str) -> str:
    import uvicorn

    from refact_gguf.engine import Engine
    from refact_gguf.select import open_model
    from refact_gguf.server import create_app

    m = open_model(model, gpu_layers)
    engine = Engine(m, n_ctx=n_ctx, threads=threads).start()  # warmed up, as `refact-gguf serve` does
    app = create_app(engine, model.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--url")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--gpu-layers", default="0")
    ap.add_argument("--order", default="spm", choices=["spm", "psm"])
    ap.add_argument("--keystrokes", type=int, default=20)
    ap.add_argument("--n-predict", type=int, default=16)
    ap.add_argument("--n-indent", type=int, default=4, help="llama.vim sends the cursor line's indent; 0 disables the rule")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    url = args.url or start_server(args.model, args.threads, args.ctx, args.gpu_layers)
    rows = []
    with httpx.Client(timeout=600) as client:
        for body in requests(args.order, args.keystrokes, args.n_predict, args.n_indent):
            t0 = time.perf_counter()
            r = client.post(f"{url}/infill", json=body).json()
            rows.append({"ms": (time.perf_counter() - t0) * 1e3, "prompt_n": r["timings"]["prompt_n"],
                         "predicted_n": r["timings"]["predicted_n"], "cached": r.get("tokens_cached")})
    cold, warm = rows[0], rows[1:]
    summary = {
        "order": args.order, "keystrokes": len(rows), "n_predict": args.n_predict,
        "cold_ms": round(cold["ms"], 1), "cold_prompt_n": cold["prompt_n"],
        "warm_p50_ms": round(statistics.median(r["ms"] for r in warm), 1),
        "warm_mean_prompt_n": round(statistics.mean(r["prompt_n"] for r in warm), 2),
        "warm_mean_predicted_n": round(statistics.mean(r["predicted_n"] for r in warm), 2),
        "warm_over_cold": round(statistics.median(r["ms"] for r in warm) / cold["ms"], 3),
    }
    for i, r in enumerate(rows):
        print(f"{i:2d}  {r['ms']:8.1f} ms  evaluated {r['prompt_n']:5d}  predicted {r['predicted_n']:3d}")
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "requests": rows}, indent=2))


if __name__ == "__main__":
    main()
