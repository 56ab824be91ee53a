"""A daemon-wide budget of bytes that chunk fetches and first-use checks hold in memory.

Without it, memory grows with the number of concurrent readers times the size of what each one
holds: eight readers of eight 255 MiB chunks took the daemon to 3.1 GB. Each holder asks for
its bytes up front (one ``acquire`` per unit of work, never a second one while holding the
first: no deadlock between holders), waits in arrival order until they fit, and gives them back
when done. A request larger than the whole budget waits until nothing else is held, then runs
alone (others wait for it): it is never refused for its size.

Holders never wait for anything else but the network, the disk and the request semaphore while
holding a grant (``docs/CONCURRENCY.md``), so every grant is returned in bounded time and a
waiter's *timeout* is a safety net, not a normal outcome.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from types import TracebackType

from layerstore.errors import CacheError


class Grant:
    """Bytes held from a :class:`MemoryBudget`; ``release`` (idempotent) gives them back."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: MemoryBudget | None, size: int) -> None:
        self._budget = budget
        self.size = size

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.size)

    def __enter__(self) -> Grant:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class MemoryBudget:
    """Thread-safe, first come first served."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the memory budget must be at least one byte")
        self.limit = limit
        self._cond = threading.Condition(threading.Lock())
        self._used = 0
        self._queue: deque[int] = deque()  # tickets of waiters, oldest first
        self._next = 0
        self.peak = 0
        self.waits = 0
        self.granted = 0
        """Bytes granted so far (a counter: whether fetches ran since it was last read)."""

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    def acquire(self, size: int, timeout: float | None = None, what: str = "") -> Grant:
        """Hold *size* bytes; waits (behind earlier waiters) until they fit, or until nothing
        else is held when *size* exceeds the limit. Raises :class:`CacheError` after *timeout*
        seconds."""
        if size <= 0:
            return Grant(None, 0)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if not self._queue and self._fits(size):
                return self._take(size)
            ticket = self._next
            self._next += 1
            self._queue.append(ticket)
            self.waits += 1
            try:
                while not (self._queue[0] == ticket and self._fits(size)):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise CacheError(
                            f"waited {timeout:.0f} s for {size} bytes of decode memory"
                            + (f" ({what})" if what else "")
                            + f": {self._used} of {self.limit} in use"
                        )
                    self._cond.wait(left)
                return self._take(size)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _fits(self, size: int) -> bool:
        return self._used == 0 or self._used + size <= self.limit

    def _take(self, size: int) -> Grant:
        self._used += size
        self.granted += size
        self.peak = max(self.peak, self._used)
        return Grant(self, size)

    def _give_back(self, size: int) -> None:
        with self._cond:
            self._used -= size
            self._cond.notify_all()
