"""An LRU bounded by the text its keys hold, for what editors send again on every keystroke."""

from __future__ import annotations

import threading
from typing import Generic, Hashable, TypeVar

V = TypeVar("V")


class TextLRU(Generic[V]):
    """key → value, least recently used out first once the keys' text passes `max_chars`
    (thread-safe). Bounded by text, not by a count: a team's whole files are few entries and much
    text, a keystroke's candidate cuts many entries and little; a count sized for either misses
    the other. An entry over a quarter of the bound is not kept (it would push out all the rest)."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self._items: dict[Hashable, tuple[V, int]] = {}
        self._chars = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._items[key] = item  # most recent last
        return item[0]

    def put(self, key: Hashable, value: V, chars: int) -> None:
        if chars > self.max_chars // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._chars += chars - (old[1] if old is not None else 0)
            self._items[key] = (value, chars)
            while self._chars > self.max_chars:
                oldest = next(iter(self._items))
                self._chars -= self._items.pop(oldest)[1]
