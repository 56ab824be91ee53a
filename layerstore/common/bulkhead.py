"""Bulkheads: a shared pool of slots in which no single key (a registry host) may hold more
than its share, so a slow or hostile registry cannot starve the others.

The daemon has a few pools that every image draws on: FUSE worker threads for lookups and for
reads, and foreground range requests. A registry that answers slowly (or dribbles a byte now and
then until its deadline) keeps its slots for as long as its requests last; if it could take them
all, images on every other registry would wait behind it. A bulkhead bounds both the pool
(``total``) and each key (``per_key``, see :func:`share_limit`), so a stuck registry can hold at
most ``per_key`` slots and the rest stay free for the others.

- :class:`Bulkhead`: blocking slots for threads (``with bulkhead.slot(host): ...``).
- :class:`KeyedLimiters`: one limiter per key, made by a factory (the FUSE adapter makes
  ``trio.CapacityLimiter``\\ s); a key's limiter lives while someone borrows it.

Neither knows what a key means; callers use the registry host.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

L = TypeVar("L")


def share_limit(total: int, share: float) -> int:
    """Slots one key may hold of a pool of *total*: ``ceil(total * share)``, between 1 and
    *total*."""
    if total < 1:
        raise ValueError("a pool needs at least one slot")
    if not 0 < share <= 1:
        raise ValueError("a share is a fraction in (0, 1]")
    return max(1, min(total, math.ceil(total * share - 1e-9)))


class Bulkhead:
    """At most *total* slots in use, at most *per_key* of them by any one key. Thread-safe.

    A caller waits (FIFO is not promised) until its key is under its limit and a slot of the
    pool is free; the key's limit is checked first, so callers of a key at its limit do not
    hold pool slots while they wait.
    """

    def __init__(self, total: int, per_key: int) -> None:
        if total < 1 or per_key < 1:
            raise ValueError("a bulkhead needs at least one slot per key and in all")
        self.total = total
        self.per_key = min(per_key, total)
        self._cond = threading.Condition()
        self._used: dict[Hashable, int] = {}
        self._in_use = 0

    def acquire(self, key: Hashable, timeout: float | None = None) -> bool:
        """Take a slot for *key*; False when *timeout* seconds passed first."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._used.get(key, 0) < self.per_key and self._in_use < self.total,
                timeout,
            )
            if not ok:
                return False
            self._used[key] = self._used.get(key, 0) + 1
            self._in_use += 1
            return True

    def release(self, key: Hashable) -> None:
        with self._cond:
            n = self._used.get(key, 0)
            if n <= 0:
                raise RuntimeError(f"bulkhead slot of {key!r} released more often than taken")
            if n == 1:
                del self._used[key]
            else:
                self._used[key] = n - 1
            self._in_use -= 1
            self._cond.notify_all()

    def slot(self, key: Hashable) -> _Slot:
        """A reusable context manager holding one slot of *key* while inside it."""
        return _Slot(self, key)

    def in_use(self, key: Hashable | None = None) -> int:
        with self._cond:
            return self._in_use if key is None else self._used.get(key, 0)


class _Slot:
    __slots__ = ("_bulkhead", "key")

    def __init__(self, bulkhead: Bulkhead, key: Hashable) -> None:
        self._bulkhead = bulkhead
        self.key = key

    def __enter__(self) -> _Slot:
        self._bulkhead.acquire(self.key)
        return self

    def __exit__(self, *exc: object) -> None:
        self._bulkhead.release(self.key)


class KeyedLimiters(Generic[L]):
    """One limiter per key, ``factory(per_key)``, kept while borrowed and dropped after (the
    map holds only keys in use, however many keys are seen). Thread-safe."""

    def __init__(self, per_key: int, factory: Callable[[int], L]) -> None:
        if per_key < 1:
            raise ValueError("a limiter needs at least one slot")
        self.per_key = per_key
        self._factory = factory
        self._lock = threading.Lock()
        self._limiters: dict[Hashable, tuple[L, int]] = {}

    @contextlib.contextmanager
    def borrow(self, key: Hashable) -> Iterator[L]:
        """The limiter of *key* (the same object for every borrower while any holds it)."""
        with self._lock:
            limiter, n = self._limiters.get(key) or (self._factory(self.per_key), 0)
            self._limiters[key] = (limiter, n + 1)
        try:
            yield limiter
        finally:
            with self._lock:
                limiter, n = self._limiters[key]
                if n <= 1:
                    del self._limiters[key]
                else:
                    self._limiters[key] = (limiter, n - 1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._limiters)


__all__ = ["Bulkhead", "KeyedLimiters", "share_limit"]
