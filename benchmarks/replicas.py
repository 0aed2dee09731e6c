"""Replicas behind HAProxy with the shipped config (deploy/haproxy.cfg): does each person's
keystroke reach the replica that holds their KV cache, and what happens when a replica dies?

Everything on 127.0.0.1: `--replicas` `refact-gguf serve` processes (each `--parallel` slots,
`--api-key-file` with one key a person, no disk cache so each run starts cold) and HAProxy in
front. `--typists` people, each in a different file with their own key, type through the proxy
(benchmarks/team_replay.py's requests: the first request of each is cold, the rest warm).

  single       one replica with a slot for everyone, no proxy: the reference
  affinity     the shipped config (a person's key is hashed onto a replica)
  round-robin  the same with `balance roundrobin`, for contrast
  failover     affinity, and one replica killed (SIGKILL) a third of the way into the warm
               keystrokes: errors before and after HAProxy marks it down, keystrokes gone cold

The cache-hit measure is prompt tokens evaluated per warm keystroke (what the server reports).

    python benchmarks/replicas.py                               # the quickstart's synthetic model
    python benchmarks/replicas.py --model M.gguf --typists 12 --keystrokes 24 --json out.json

Installs nothing: without `haproxy` on PATH it says what to install and exits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from file_switch import start, stop  # noqa: E402
from team_replay import http_sender, run, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "refact_gguf.cli"]
COLD_TOKENS = 256  # a warm keystroke that evaluated more than this went cold (a whole prompt is ~2,000)


def haproxy_config(front: int, replicas: list[int], balance: str | None = None, stats_socket: Path | None = None) -> str:
    """deploy/haproxy.cfg with these ports (and another balance line, and an admin socket)."""
    lines = []
    for line in (ROOT / "deploy" / "haproxy.cfg").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("bind "):
            line = f"    bind 127.0.0.1:{front}"
        elif stripped.startswith("server "):
            line = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(replicas, 1))
            replicas = []
            if not line:
                continue
        elif balance and stripped.startswith("balance "):
            line = f"    balance {balance}"
        elif stats_socket and stripped == "global":
            line += f"\n    stats socket {stats_socket} mode 600 level admin"
        lines.append(line)
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_states(sock: Path) -> dict[str, str]:
    """HAProxy's view of each replica (UP, DOWN, …) through its admin socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = [ln.split(",") for ln in data.decode().splitlines() if ln and not ln.startswith("#")]
    return {r[1]: r[17] for r in rows if r[0] == "replicas" and r[1].startswith("r")}


class Cluster:
    """Replicas and (optionally) HAProxy, started fresh for one run."""

    def __init__(self, args, workdir: Path, keys: Path, replicas: int, parallel: int, balance: str | None, proxy: bool):
        self.ports = [free_port() for _ in range(replicas)]
        self.procs = []
        for i, port in enumerate(self.ports):
            cmd = [*CLI, "serve", "-m", str(args.model), "--port", str(port), "-t", str(args.threads),
                   "--parallel", str(parallel), "--api-key-file", str(keys), "--cache-disk-mb", "0"]
            self.procs.append(start(" ".join(cmd), f"http://127.0.0.1:{port}", workdir / f"replica{i + 1}.log"))
        self.proxy = None
        self.url = f"http://127.0.0.1:{self.ports[0]}"
        if proxy:
            front, self.sock = free_port(), workdir / "haproxy.sock"
            self.sock.unlink(missing_ok=True)  # the last run's
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(haproxy_config(front, self.ports, balance, self.sock))
            self.proxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                          stderr=(workdir / "haproxy.log").open("ab"))
            self.url = f"http://127.0.0.1:{front}"
            deadline = time.time() + 30
            while not self._all_up():
                if time.time() > deadline or self.proxy.poll() is not None:
                    raise SystemExit(f"HAProxy did not mark the replicas up; see {workdir / 'haproxy.log'}")
                time.sleep(0.2)

    def _all_up(self) -> bool:
        try:
            return set(server_states(self.sock).values()) == {"UP"}
        except OSError:  # not listening yet
            return False

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.terminate()
            self.proxy.wait(10)
        for proc in self.procs:
            if proc.poll() is None:
                stop(proc)


def measure(rows: list[dict], args) -> dict:
    s = summarize(rows, args.typists, args.keystrokes, args.n_predict)
    warm = [r for r in rows if r["k"] > 0 and r["ok"]]
    return {**s, "warm_went_cold": sum(r["prompt_n"] > COLD_TOKENS for r in warm)}


def failover(cluster: Cluster, args, keys: list[str]) -> dict:
    """Affinity with replica r2 killed a third of the way in; errors before and after it is marked down."""
    events: dict[str, float] = {}
    expected_s = args.keystrokes * (args.pause_ms / 1e3 + 0.1)

    def killer() -> None:
        while "warm" not in events:
            time.sleep(0.01)
        time.sleep(expected_s / 3)
        cluster.procs[1].send_signal(signal.SIGKILL)
        events["killed"] = time.perf_counter()
        while not server_states(cluster.sock).get("r2", "").startswith("DOWN"):  # "UP 1/2" while checks fail
            time.sleep(0.05)
        events["marked_down"] = time.perf_counter()

    send = http_sender(cluster.url, keys)

    def watched(who: int, body: dict):
        if body["prompt"]:  # a warm keystroke: the kill may begin
            events.setdefault("warm", time.perf_counter())
        return send(who, body)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    rows = run(watched, args.typists, args.keystrokes, args.n_predict, args.pause_ms / 1e3)
    thread.join(30)
    killed, down = events.get("killed", float("inf")), events.get("marked_down", float("inf"))
    after_kill = [r for r in rows if r["k"] > 0 and r["start"] >= killed]
    return {
        **measure(rows, args),
        "marked_down_after_s": round(down - killed, 2),
        "errors_before_marked_down": sum(not r["ok"] for r in rows if r["end"] < down),
        "errors_after_marked_down": sum(not r["ok"] for r in rows if r["start"] >= down),
        "keystrokes_after_kill": len(after_kill),
        "went_cold_after_kill": sum(r["ok"] and r["prompt_n"] > COLD_TOKENS for r in after_kill),
        "people_moved": len({r["who"] for r in after_kill if r["ok"] and r["prompt_n"] > COLD_TOKENS}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF (default: the quickstart's synthetic Q4_K_M, built once)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--typists", type=int, default=12)
    ap.add_argument("--keystrokes", type=int, default=24)
    ap.add_argument("--n-predict", type=int, default=8)
    ap.add_argument("--pause-ms", type=int, default=150, help="between a person's keystrokes")
    ap.add_argument("--threads", type=int, default=1, help="per replica")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="single,affinity,round-robin,failover")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    args = ap.parse_args()
    if shutil.which("haproxy") is None:
        raise SystemExit("haproxy is not installed: `apt-get install haproxy` (Debian, Ubuntu), `dnf install haproxy`"
                         " or `brew install haproxy`, then run this again")
    if args.model is None:
        from refact_gguf.quickstart import synthetic_model

        args.model = synthetic_model()
    workdir = Path(tempfile.mkdtemp(prefix="replicas-"))
    keys = [f"sk-bench-{i:02d}-{'%08x' % (i * 2654435761 % 2**32)}" for i in range(args.typists)]
    keys_file = workdir / "keys"
    keys_file.write_text("".join(f"{k}  # person{i}\n" for i, k in enumerate(keys)))
    per_replica = -(-args.typists // args.replicas)
    setups = {  # replicas, slots each, balance, through the proxy
        "single": (1, args.typists, None, False),
        "affinity": (args.replicas, per_replica, None, True),
        "round-robin": (args.replicas, per_replica, "roundrobin", True),
        "failover": (args.replicas, per_replica, None, True),
    }
    results = []
    print(f"{args.model.name}: {args.replicas} replicas × {per_replica} slots, {args.typists} typists × "
          f"{args.keystrokes} warm keystrokes, {args.pause_ms} ms apart, n_predict {args.n_predict}; workdir {workdir}")
    for round_ in range(1, args.rounds + 1):
        for mode in args.modes.split(","):
            cluster = Cluster(args, workdir, keys_file, *setups[mode])
            try:
                if mode == "failover":
                    figures = failover(cluster, args, keys)
                else:
                    rows = run(http_sender(cluster.url, keys), args.typists, args.keystrokes, args.n_predict, args.pause_ms / 1e3)
                    figures = measure(rows, args)
            finally:
                cluster.close()
            results.append({"mode": mode, "round": round_, **figures})
            print(json.dumps(results[-1]), flush=True)
    print("\n| mode | prompt tokens / warm keystroke | warm p50 / p95 ms | errors | warm keystrokes gone cold |")
    print("|---|---|---|---|---|")
    for mode in args.modes.split(","):
        rs = [r for r in results if r["mode"] == mode]
        print(f"| {mode} | {' / '.join(str(r['warm_mean_prompt_n']) for r in rs)} | "
              f"{', '.join('%.0f / %.0f' % (r['warm_p50_ms'], r['warm_p95_ms']) for r in rs)} | "
              f"{' / '.join(str(r['errors']) for r in rs)} | {' / '.join(str(r['warm_went_cold']) for r in rs)} |")
    for r in (r for r in results if r["mode"] == "failover"):
        print(f"failover round {r['round']}: marked down {r['marked_down_after_s']} s after the kill; errors "
              f"{r['errors_before_marked_down']} before, {r['errors_after_marked_down']} after; "
              f"{r['went_cold_after_kill']} of {r['keystrokes_after_kill']} keystrokes after the kill went cold "
              f"({r['people_moved']} people moved)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
