"""A real server on 127.0.0.1 over the synthetic model, for the tests of every API."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from refact_gguf.engine import Engine
from refact_gguf.llama import Model
from refact_gguf.server import Limits, _listen, create_app, uvicorn_config


@contextmanager
def running(q4_model, parallel=2, keys=None, limits=Limits(max_predict=64), engine=Engine, cors_origins=None,
            log_requests=False):
    model = Model(q4_model)
    eng = engine(model, n_ctx=1024, parallel=parallel, threads=1, max_queue=limits.max_queue).start()
    app = create_app(eng, q4_model.name, keys, limits, cors_origins, log_requests)
    sock = _listen("127.0.0.1", 0)  # the socket `serve` listens on, not one uvicorn would make
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        eng.close()
        model.close()


@contextmanager
def serve_process(q4_model, *options: str):
    """`refact-gguf serve` in a process of its own, as a user starts it: (the process, its URL) once
    /health answers; killed afterwards if the test left it running."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "refact_gguf.cli", "serve", "-m", str(q4_model), "--port", str(port),
                             "-t", "1", *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-500:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield proc, url
    finally:
        proc.kill()
