"""Head start: the first bytes of a blob, fetched before the layer's TOC is parsed.

Why: on an image written with prioritized files, the landmark prefetch (everything before the
``.prefetch.landmark`` entry) can only start once the layer's TOC has arrived and been parsed,
which takes round trips and a parse after the manifest (on the 173 MB python image: ~170 ms
from the manifest to the first landmark request). When the manifest already says how long that
region is (:data:`~layerstore.estargz.constants.PREFETCH_SIZE_ANNOTATION`, written by our
converter), its bytes can be on their way while the TOC is inflated and indexed. The layer
manager starts the head (:meth:`HeadStartSource.start`) once the TOC's own bytes are in:
started with the manifest, its transfer shared the link with the TOC's and slowed the TOC
as much as it saved.

:class:`HeadStartSource` wraps the layer's blob source: one thread reads ``[0, head)`` with a
single streamed request into a buffer of that size, and reads of ranges inside it are answered
from the buffer as its bytes arrive (progressively, like
:meth:`~layerstore.registry.blobsource.BlobSource.read_at_progressive`); everything else goes to
the wrapped source. The bytes are raw blob bytes from the same source the layer reads anyway:
nothing is trusted because of this, every chunk is decoded and checked against its TOC digest
by the fetcher as always. The annotation is a hint only: capped (:class:`HeadStartBudget`), a
wrong value costs bytes, never correctness.

The buffer is dropped (:meth:`HeadStartSource.release_head`) when the layer's landmark prefetch has
run, or when the head's fetch fails (ranges then go to the wrapped source). Readers waiting for
bytes that stop arriving fall back to the wrapped source after ``stall_seconds``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from layerstore.common.redact import describe_error
from layerstore.source import RangeSource

log = structlog.get_logger(__name__)

MiB = 1024 * 1024


class HeadStartBudget:
    """Bytes all head buffers of a manager may hold at once (thread-safe)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._used = 0
        self._lock = threading.Lock()

    def take(self, wanted: int) -> int:
        """Up to *wanted* bytes of the budget (0 when none is left)."""
        with self._lock:
            got = max(0, min(wanted, self.limit - self._used))
            self._used += got
            return got

    def give(self, n: int) -> None:
        with self._lock:
            self._used = max(0, self._used - n)

    @property
    def used(self) -> int:
        with self._lock:
            return self._used


class HeadStartSource:
    """A :class:`~layerstore.source.RangeSource` over *inner* whose first *head* bytes are
    fetched at once, by :meth:`start`. Thread-safe."""

    def __init__(
        self,
        inner: RangeSource,
        head: int,
        budget: HeadStartBudget | None = None,
        stall_seconds: float = 15.0,
        name: str = "",
    ) -> None:
        self._inner = inner
        self._head = max(0, min(head, inner.size()))
        self._budget = budget
        self._stall = stall_seconds
        self._name = name
        self._cond = threading.Condition()
        self._buf: bytearray | None = bytearray(self._head) if self._head else None
        self._have = 0  # bytes of the head received so far
        self._failed = False
        self._done = False
        self._started = False
        self.served = 0  # bytes answered from the head (stats, tests)

    # --- the wrapped source's other attributes (registry_host, round_trip, digest, ...) ------
    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"HeadStartSource({self._inner!r}, head={self._head})"

    @property
    def inner(self) -> RangeSource:
        return self._inner

    @property
    def head(self) -> int:
        return self._head

    def size(self) -> int:
        return self._inner.size()

    # --- the head's fetch ---------------------------------------------------------------------
    def start(self) -> bool:
        """Start fetching the head on a thread of its own (once). False when there is nothing
        to fetch or no thread could be started (then every range goes to the wrapped source)."""
        with self._cond:
            if self._started or self._buf is None:
                return False
            self._started = True
        try:
            threading.Thread(
                target=self._fetch, name="stargz-landmark-prefetch-head", daemon=True
            ).start()
        except RuntimeError:
            self._finish(failed=True)
            return False
        return True

    def _fetch(self) -> None:
        t0 = time.monotonic()
        progressive = getattr(self._inner, "read_at_progressive", None)
        try:
            if progressive is not None:
                body = progressive(0, self._head, self._progress)
            else:
                body = self._inner.read_at(0, self._head)
            if len(body) != self._head:
                raise ValueError(f"asked for {self._head} bytes, got {len(body)}")
            self._progress(body)
        except Exception as e:  # the ranges go to the wrapped source
            log.info("head_start_failed", blob=self._name, error=describe_error(e))
            self._finish(failed=True)
            return
        self._finish(failed=False)
        log.debug(
            "head_start_fetched",
            blob=self._name,
            bytes=self._head,
            seconds=round(time.monotonic() - t0, 3),
        )

    def _progress(self, body: bytes | bytearray) -> None:
        n = min(len(body), self._head)
        with self._cond:
            if self._buf is None or n <= self._have:
                return
            self._buf[self._have : n] = body[self._have : n]
            self._have = n
            self._cond.notify_all()

    def _finish(self, *, failed: bool) -> None:
        with self._cond:
            self._done = True
            if failed:
                self._failed = True
                self._drop_locked()
            self._cond.notify_all()

    def release_head(self) -> None:
        """Drop the buffer (the landmark prefetch is over): ranges go to the wrapped source
        from now on. A fetch still running stops keeping what it receives."""
        with self._cond:
            self._drop_locked()
            self._cond.notify_all()

    def _drop_locked(self) -> None:
        if self._buf is not None:
            self._buf = None
            if self._budget is not None:
                self._budget.give(self._head)

    # --- reads -------------------------------------------------------------------------------
    def _inside(self, offset: int, length: int) -> bool:
        # (before start, nothing is on its way: the wrapped source answers)
        return (
            length > 0
            and self._started
            and self._buf is not None
            and 0 <= offset <= self._head - length
        )

    def _wait(self, seen: int) -> tuple[int, bool]:
        """Wait (a while) for the head to grow past *seen* bytes: ``(have, over)``, where
        *over* says no more will come (fetched, failed, released or stalled)."""
        deadline = time.monotonic() + self._stall
        with self._cond:
            while True:
                if self._buf is None:
                    return self._have, True
                if self._have > seen or self._done:
                    return self._have, self._done
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._have, True
                self._cond.wait(min(0.5, left))

    def _copy(self, start: int, end: int) -> bytes | None:
        with self._cond:
            if self._buf is None or self._have < end:
                return None
            return bytes(self._buf[start:end])

    def _from_head(
        self, offset: int, length: int, progress: Callable[[bytearray], None] | None = None
    ) -> bytes | None:
        """Bytes ``[offset, offset + length)`` of the head, waiting for them; *progress* sees
        the range's bytes received so far (one growing buffer, called outside the lock). None
        when the head will not have them: the caller asks the wrapped source."""
        end = offset + length
        acc = bytearray()
        seen = 0
        while True:
            have, over = self._wait(seen)
            if have > seen:
                seen = have
                if progress is not None and have > offset:
                    piece = self._copy(offset + len(acc), min(have, end))
                    if piece is None:
                        return None
                    acc += piece
                    progress(acc)
            if have >= end:
                break
            if over:
                return None
        got = bytes(acc) if progress is not None else self._copy(offset, end)
        if got is not None and len(got) == length:
            with self._cond:
                self.served += length
            return got
        return None

    def read_at(self, offset: int, length: int) -> bytes:
        if self._inside(offset, length):
            got = self._from_head(offset, length)
            if got is not None:
                return got
        return self._inner.read_at(offset, length)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if ranges and all(self._inside(o, n) for o, n in ranges):
            out = [self._from_head(o, n) for o, n in ranges]
            if all(b is not None for b in out):
                return [b for b in out if b is not None]
        return self._inner.read_ranges(ranges)

    def read_ranges_progressive(
        self,
        ranges: Sequence[tuple[int, int]],
        progress: Callable[[int, bytearray | memoryview], None],
    ) -> list[bytes]:
        """Like the wrapped source's: ``progress(offset, data)`` sees each range's bytes
        received so far."""
        if ranges and all(self._inside(o, n) for o, n in ranges):
            out: list[bytes] = []
            for o, n in ranges:
                got = self._from_head(o, n, lambda acc, o=o: progress(o, acc))  # type: ignore[misc]
                if got is None:
                    break
                out.append(got)
            else:
                return out
        inner = getattr(self._inner, "read_ranges_progressive", None)
        if inner is None:
            return self._inner.read_ranges(ranges)
        return inner(ranges, progress)  # type: ignore[no-any-return]

    def read_at_progressive(
        self, offset: int, length: int, progress: Callable[[bytearray], None]
    ) -> bytes:
        """Like the wrapped source's: *progress* sees the range's bytes received so far."""
        if self._inside(offset, length):
            got = self._from_head(offset, length, progress)
            if got is not None:
                return got
        inner = getattr(self._inner, "read_at_progressive", None)
        if inner is None:
            return self._inner.read_at(offset, length)
        return inner(offset, length, progress)  # type: ignore[no-any-return]
