"""A bounded, expiring map of recent failures ("negative cache").

Remembers that a key failed (and the value that says how) for a time-to-live, so a burst of
identical lookups of something that does not exist costs one real attempt. Bounded: when full,
expired entries go first, then the oldest. Thread-safe. The clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class NegativeCache(Generic[K, V]):
    def __init__(
        self, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = 0

    def get(self, key: K) -> V | None:
        """The remembered value for *key*, or None if there is none or it expired."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if hit[0] <= self._clock():
                del self._entries[key]
                return None
            self.hits += 1
            return hit[1]

    def expires_in(self, key: K) -> float:
        """Seconds until *key*'s entry expires (0 if there is none)."""
        with self._lock:
            hit = self._entries.get(key)
            return 0.0 if hit is None else max(0.0, hit[0] - self._clock())

    def put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            now = self._clock()
            self._entries.pop(key, None)
            if len(self._entries) >= self._max:
                for k in [k for k, (exp, _) in self._entries.items() if exp <= now]:
                    del self._entries[k]
                while len(self._entries) >= self._max:
                    self._entries.popitem(last=False)
            self._entries[key] = (now + ttl, value)

    def discard(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def discard_if(self, predicate: Callable[[K, V], bool]) -> list[K]:
        """Forget every entry for which ``predicate(key, value)`` is true (expired ones too);
        returns their keys. *predicate* runs under the lock: it must be pure and quick."""
        with self._lock:
            gone = [k for k, (_, v) in self._entries.items() if predicate(k, v)]
            for k in gone:
                del self._entries[k]
        return gone

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
