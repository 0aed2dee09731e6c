"""The engine's slots and their saved states (`PromptCache`). A slot's cache is saved before a
prompt of another file overwrites it (its person may come back to that file), and a saved state is
restored into a slot only when that pays: the prompt tokens it spares, at the measured prompt rate,
take longer than moving its bytes at the measured restore rate (from memory or from disk). A person
typing on in one file keeps their live slot: no save, no restore. Idle slots reach the disk once
per file and idle period, and at shutdown, so they survive a restart."""

from __future__ import annotations

import time

from .handles import Stats
from .layout import REUSE_CHUNK
from .llama import Context
from .prompt_cache import PromptCache, Saved
from .runtime import Slot
from .tasks import Task

RESTORE_RATE = {True: 2e9, False: 3e8}  # bytes a second of a restore from memory / from disk, until measured


class SlotStates:
    def __init__(self, ctx: Context, cache: PromptCache, stats: Stats):
        self.ctx, self.cache, self.stats = ctx, cache, stats
        self.restore_rate = dict(RESTORE_RATE)
        cache.bind(ctx.state_layout)

    def pending(self, slots: list[Slot]) -> bool:
        """Something to write to disk at the next idle moment."""
        return bool(self._unsaved(slots)) or self.cache.unflushed

    def snapshot(self, slots: list[Slot], idle: bool = True) -> None:
        """Write (idle) slots' caches to disk (they stay live too), and the states saved in memory
        since the last time: a restart finds them there."""
        for slot in self._unsaved(slots, idle):
            self.save(slot, memory=False)
        self.cache.flush()

    def close(self, slots: list[Slot]) -> None:
        self.snapshot(slots, idle=False)
        self.cache.close()

    def save(self, slot: Slot, memory: bool = True) -> None:
        if slot.unsaved:
            self.cache.put(slot.cached[: slot.n_cached], self.ctx.seq_state(slot.seq), memory)
            slot.saved_edits = slot.edits
            self.stats.cache_saves += 1

    def bring(self, slot: Slot, task: Task, prompt_rate: float | None) -> None:
        """Before `slot` takes `task`: if the prompt will overwrite much of the slot's cache, save
        that first; if a saved state spares more prompt time than restoring it costs, restore it."""
        if not task.reuse_cache or task.short_context:
            return
        prompt = task.ids
        kept = slot.reusable(prompt)  # what the slot keeps by itself, shifted runs included
        saved, n = self.cache.best(prompt)
        restore = saved is not None and n - kept >= REUSE_CHUNK and self._pays(saved, n - kept, prompt_rate)
        if restore or slot.n_cached - kept >= REUSE_CHUNK:
            self.save(slot)
        if not restore:
            return
        in_memory, t0 = saved.state is not None, time.perf_counter()
        state = self.cache.load(saved)
        if state is not None and self.ctx.seq_restore(slot.seq, state, len(saved.tokens)):
            slot.holds(saved.tokens)
            self.stats.cache_restores += 1
            rate = len(state) / max(time.perf_counter() - t0, 1e-6)
            self.restore_rate[in_memory] = 0.7 * self.restore_rate[in_memory] + 0.3 * rate
        else:
            slot.clear()
            if state is not None:  # llama.cpp refused it, or it restored something else: never again
                self.cache.discard(saved)
                self.stats.cache_refused += 1

    def _pays(self, saved: Saved, tokens: int, prompt_rate: float | None) -> bool:
        """Restoring `saved` takes less time than evaluating the `tokens` it would spare."""
        if prompt_rate is None:
            return True
        return tokens / prompt_rate > saved.size / self.restore_rate[saved.state is not None]

    def _unsaved(self, slots: list[Slot], idle: bool = True) -> list[Slot]:
        """(Idle) slots whose cache changed since it was last saved."""
        if self.cache.directory is None:
            return []
        return [s for s in slots if not (idle and s.busy) and s.unsaved]
