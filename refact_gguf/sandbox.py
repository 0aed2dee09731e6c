"""Run programs a model wrote, away from the project's process, each in a fresh child with limits.

`run_programs` hands programs to worker processes (`python -I` on this file; standard library
only). A worker never runs a program itself: for each one it forks a child that, before running
it,
- leaves the network: the worker entered a network namespace of its own when it started (as root
  directly, else inside a user namespace), so no address outside the child is reachable; an audit
  hook also refuses every socket call, where namespaces are not allowed;
- cannot start processes: an audit hook refuses fork, exec, spawn, subprocess, os.system and
  ctypes, and RLIMIT_NPROC 0 refuses fork at the kernel (run as root, the child first imports the
  modules the program names, then becomes `nobody`, since root ignores that limit);
- is limited in memory (RLIMIT_AS), CPU time (RLIMIT_CPU), file size (RLIMIT_FSIZE), wall clock
  (the worker kills it) and works in an empty temporary directory, with stdin, stdout and stderr
  on /dev/null.
A program passes when it runs to its end; an exception, a limit, a signal or a hang is a failure
with its reason, and the run goes on.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock per program
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", an exception ("AssertionError: …"), "timeout", "killed by SIGKILL", …


def run_programs(programs: Sequence[str], limits: Limits = Limits(), parallel: int = 1,
                 on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Run each program in its own sandboxed child, `parallel` at a time; outcomes in order."""
    if not sys.platform.startswith("linux"):  # network namespaces, RLIMIT_NPROC, unshare(2)
        from .errors import RefactGGUFError

        raise RefactGGUFError(f"running the model's code safely needs Linux; this is {sys.platform}",
                              "run eval --humaneval on a Linux machine (or in WSL 2)")
    results: list[Outcome | None] = [None] * len(programs)
    todo = iter(range(len(programs)))
    lock = threading.Lock()

    def lane() -> None:
        with _Worker(limits) as worker:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                results[i] = worker.run(programs[i])
                if on_done is not None:
                    on_done(i, results[i])

    lanes = [threading.Thread(target=lane, daemon=True) for _ in range(max(1, min(parallel, len(programs))))]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    return results  # type: ignore[return-value]


class _Worker:
    """One worker process, restarted if it ever stops answering."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> _Worker:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _start(self) -> subprocess.Popen:
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        return subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), json.dumps(self.limits.__dict__)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                cwd="/", text=True, bufsize=1)

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, program: str) -> Outcome:
        if self.proc is None:
            self.proc = self._start()
        try:
            self.proc.stdin.write(json.dumps(program) + "\n")
            self.proc.stdin.flush()
        except OSError:
            self._stop()
            return Outcome(False, "sandbox worker died")
        # The worker kills a program at its timeout; this only catches the worker itself stuck.
        ready, _, _ = select.select([self.proc.stdout], [], [], self.limits.timeout_s + 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self._stop()
            return Outcome(False, "sandbox worker died" if ready else "sandbox worker hung")
        passed, reason = json.loads(line)
        return Outcome(passed, reason)


# ---------------------------------------------------------------------------------- the worker
# Runs as `python -I sandbox.py LIMITS`: standard library only, no import from the package.

_REFUSED = ("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.kill", "os.killpg",
            "subprocess.Popen", "pty.spawn", "socket.", "ctypes.dlopen", "ctypes.dlsym", "sys.remote_exec")


def _refuse(event: str, args) -> None:
    if event.startswith(_REFUSED):
        raise PermissionError(f"the sandbox refuses {event}")


def _leave_network() -> None:
    """A network namespace of our own: only a loopback that is down. Root can unshare directly;
    others through a user namespace. Where neither is allowed, the audit hook still refuses sockets."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    if os.getuid() == 0 and libc.unshare(clone_newnet) == 0:
        return
    libc.unshare(clone_newuser | clone_newnet)


def _child(program: str, limits: dict, workdir: str, result_fd: int) -> None:
    import resource

    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.chdir(workdir)
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] * mb,) * 2)
    cpu = int(limits["timeout_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    sys.addaudithook(_refuse)
    try:
        code = compile(program, "<program>", "exec")
        if os.getuid() == 0:
            # Root ignores RLIMIT_NPROC: the program runs as nobody, who may not be able to read
            # Python's own library (under /root, say); what it imports is imported first.
            _import_named(program)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        outcome = [True, "passed"]
    except BaseException as e:  # noqa: BLE001 - whatever the program raised is its failure
        outcome = [False, f"{type(e).__name__}: {e}"[:300]]
    os.write(result_fd, json.dumps(outcome).encode())
    os._exit(0)


def _import_named(program: str) -> None:
    """Import the modules `program`'s import statements name (under the audit hook already)."""
    import ast
    import importlib

    for node in ast.walk(ast.parse(program)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the program's own import will say why
                pass


def _run_one(program: str, limits: dict) -> list:
    import shutil
    import tempfile
    import time

    workdir = tempfile.mkdtemp(prefix="refact-gguf-sandbox-")
    if os.getuid() == 0:
        os.chown(workdir, 65534, 65534)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _child(program, limits, workdir, write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    deadline = time.monotonic() + limits["timeout_s"]
    data = b""
    while True:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            outcome = [False, "timeout"]
            break
        chunk = os.read(read_fd, 65536)
        if not chunk:
            outcome = _parse(data)
            break
        data += chunk
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if outcome is None:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            outcome = [False, "CPU time limit" if sig == signal.SIGXCPU else f"killed by {signal.Signals(sig).name}"]
        else:
            outcome = [False, f"exited with status {os.WEXITSTATUS(status)}"]
    shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _parse(data: bytes) -> list | None:
    """The child's [passed, reason], or None when it wrote none (or something else: the program
    wrote into the result pipe)."""
    try:
        outcome = json.loads(data)
    except ValueError:
        return None
    ok = isinstance(outcome, list) and len(outcome) == 2 and isinstance(outcome[0], bool) and isinstance(outcome[1], str)
    return outcome if ok else None


def _worker(limits: dict) -> None:
    _leave_network()
    for line in sys.stdin:
        sys.stdout.write(json.dumps(_run_one(json.loads(line), limits)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
