"""Single-flight: concurrent calls for one key run the work once and share its outcome.

The first caller for a key runs ``fn`` in its own thread; callers that arrive while it runs
wait for the same result (or exception). Once it finishes the key is forgotten, so a later
call runs ``fn`` again: this de-duplicates concurrent work, it is not a cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[K, Future[V]] = {}

    def do(self, key: K, fn: Callable[[], V], timeout: float | None = None) -> V:
        """``fn()``, or the outcome of the call already running for *key*. A waiter gives up
        after *timeout* seconds with :class:`TimeoutError` (the running call goes on)."""
        with self._lock:
            fut = self._calls.get(key)
            owner = fut is None
            if fut is None:
                fut = Future()
                self._calls[key] = fut
        if not owner:
            try:
                return fut.result(timeout)
            except FutureTimeout:  # a distinct class before Python 3.11
                raise TimeoutError(f"single-flight call for {key!r} still running") from None
        try:
            value = fn()
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            with self._lock:
                self._calls.pop(key, None)

    def running(self, key: K) -> bool:
        with self._lock:
            return key in self._calls

    def __len__(self) -> int:
        with self._lock:
            return len(self._calls)
