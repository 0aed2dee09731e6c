"""llama.vim, unmodified, under a real vim against `refact-gguf serve`: the setup docs/editors.md
gives, actually run. vim runs in a pseudo-terminal and is typed at like a person: open a file,
go to a line, enter insert mode, type; llama.vim asks /infill on its own (auto_fim), shows the
suggestion as ghost text, Tab accepts it, and :wq writes the file. The check: the written file
holds what was typed plus the accepted suggestion, and the server logged llama.vim's requests.

    git clone https://github.com/ggml-org/llama.vim /tmp/llama.vim      # once, anywhere
    python benchmarks/editor_vim.py --plugin /tmp/llama.vim -m MODEL.gguf

Prints one JSON line (what was typed, what the file gained, the requests the server saw) and
exits 1 when no suggestion was accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from replicas import free_port  # benchmarks/ is on the path: this runs as a script

SOURCE = '''import os


def list_python_files(root):
    """Every .py file under root."""
    result = []
    for name in os.listdir(root):
        if name.endswith(".py"):
            result.append(os.path.join(root, name))
    return result


def count_lines(path):
'''
TYPED = "    with open(path) as f"


def drain(fd: int, seconds: float) -> bytes:
    """What vim draws during `seconds` (it must be read, or vim blocks on a full terminal)."""
    out, end = b"", time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", type=Path, required=True, help="a llama.vim checkout")
    ap.add_argument("-m", "--model", type=Path, required=True)
    ap.add_argument("--vim", default=shutil.which("vim") or "vim")
    ap.add_argument("--wait", type=float, default=8.0, help="seconds to wait for the suggestion")
    args = ap.parse_args()

    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="editor_vim_"))
    log = (work / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "refact_gguf", "serve", "-m", str(args.model), "--port", str(port),
                               "--log-requests", "--cache-dir", str(work / "kv")], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.25)
        source = work / "lines.py"
        source.write_text(SOURCE)
        vimrc = work / "vimrc"
        # The setup docs/editors.md gives: the plugin on the runtime path, the endpoint, nothing else.
        vimrc.write_text(f"""set nocompatible
set runtimepath^={args.plugin.resolve()}
let g:llama_config = {{'endpoint_fim': 'http://127.0.0.1:{port}/infill', 'show_info': 0}}
filetype plugin indent off
syntax off
set noswapfile viminfo= noautoindent
""")
        pid, fd = pty.fork()
        if pid == 0:  # the child: vim on a terminal
            os.environ.update(TERM="xterm-256color", LINES="40", COLUMNS="120")
            os.execvp(args.vim, [args.vim, "-N", "-u", str(vimrc), "-i", "NONE", str(source)])
        drain(fd, 1.5)
        os.write(fd, b"Go")  # a new line at the end, in insert mode
        drain(fd, 0.3)
        for ch in TYPED:  # typed, not pasted: llama.vim asks on the cursor's moves
            os.write(fd, ch.encode())
            drain(fd, 0.05)
        screen = drain(fd, args.wait)  # auto_fim asks /infill; the answer is drawn as ghost text
        os.write(fd, b"\t")  # llama.vim's accept-full key
        drain(fd, 0.5)
        os.write(fd, b"\x1b:wq\r")
        drain(fd, 2.0)
        os.waitpid(pid, 0)
    finally:
        server.terminate()
        server.wait(30)
        log.close()

    written = source.read_text()
    tail = written[len(SOURCE):]
    gained = tail[len(TYPED):] if tail.startswith(TYPED) else ""
    requests = [line for line in (work / "server.log").read_text().splitlines() if " /infill " in line]
    ok = bool(gained.strip()) and any(" 200 " in line for line in requests)
    print(json.dumps({
        "ok": ok, "typed": TYPED, "accepted": gained, "infill_requests": len(requests),
        "ghost_text_drawn": bool(re.search(re.escape(gained.strip()[:12]).encode(), screen)) if gained.strip() else False,
        "log_sample": requests[-2:], "vim": subprocess.run([args.vim, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
    }))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
