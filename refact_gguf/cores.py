"""How many CPU cores other programs leave free.

llama.cpp's threads wait for each other at every barrier of a decode, so a thread on a core that
another program keeps busy slows every step: on 2 cores with one kept busy, `run --fim` took 59–109 s
with 2 threads and 22–40 s with 1. A laptop is never idle (an editor, a browser, a build), so by
default the runtime decodes with the cores the rest of the machine left free over the last
interval: the system's busy CPU time less this process's own (its llama.cpp threads included).
"""

from __future__ import annotations

import os
import time

import psutil

# How often the thread count follows the load: a decode step on a laptop CPU takes 50-100 ms, so a
# few steps' worth of CPU time per sample, enough to tell a steady job from a burst.
SAMPLE_EVERY_S = 0.5


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class FreeCores:
    """`free()`: cores not kept busy by other programs since the previous call (at least 1)."""

    def __init__(self, total: int | None = None):
        self.total = total or cores()
        self._me = psutil.Process()
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        mine = self._me.cpu_times()
        return time.monotonic(), busy, mine.user + mine.system

    def poll(self) -> int | None:
        """free() once SAMPLE_EVERY_S have passed since the previous sample; None until then."""
        return self.free() if time.monotonic() - self._last[0] >= SAMPLE_EVERY_S else None

    def free(self) -> int:
        now, last = self._sample(), self._last
        self._last = now
        wall = now[0] - last[0]
        if wall <= 0:
            return self.total
        # other programs' share of the machine, in cores (system-wide busy time counts every core)
        others = ((now[1] - last[1]) - (now[2] - last[2])) / wall
        return max(1, min(self.total, self.total - int(others + 0.5)))
