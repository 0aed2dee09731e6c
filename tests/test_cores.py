"""Threads follow the cores other programs leave free (a real busy process, real CPU times)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from refact_gguf.cores import FreeCores
from refact_gguf.engine import Engine
from refact_gguf.tasks import Task


@pytest.fixture
def busy_core():
    """Another program keeping one core busy."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    yield
    hog.kill()
    hog.wait()


def test_a_core_another_program_keeps_busy_is_not_free(busy_core):
    cores = FreeCores()
    if cores.total < 2:
        pytest.skip("one core: nothing to leave free")
    time.sleep(1.0)
    assert cores.free() == cores.total - 1 or cores.total > 2 and cores.free() <= cores.total - 1


def test_the_engine_decodes_with_the_free_cores(model, busy_core):
    with Engine(model, n_ctx=256, parallel=1) as engine:  # no threads given: as many as are free
        if engine.ctx.threads < 2:
            pytest.skip("one core: nothing to leave free")
        total = engine.ctx.threads
        engine.start(warmup=False)
        for _ in range(3):
            time.sleep(0.4)
            engine.run(Task(list(range(100, 140)), 2))
        assert engine.load()["threads"] == total - 1
