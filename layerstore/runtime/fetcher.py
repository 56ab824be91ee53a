"""Fetching the chunks of one blob: single-flight, coalescing, read-ahead and read-behind,
landmark prefetch, background fill.

A :class:`ChunkFetcher` owns the chunk list of one layer (sorted by blob offset), a
:class:`~layerstore.source.RangeSource` for the blob and the shared
:class:`~layerstore.runtime.cache.ChunkCache`. Every chunk goes through ``decode`` (inflate, skip
the
inner offset, check ``chunkDigest``) before it is cached or returned; nothing unverified leaves.

* **Single flight**: each chunk being fetched has a future, keyed by its digest; concurrent
  readers of that chunk wait on it instead of fetching again.
* **Coalescing**: the chunks one call needs are grouped into byte ranges (neighbours closer than
  ``coalesce_gap`` share a range, no range over ``max_range_bytes``) and all ranges go in one
  ``read_ranges`` call (one HTTP request where the registry allows).
* **Read-ahead**: when a small chunk is needed, the following small chunks up to
  ``readahead_bytes`` ride along in the same range, so neighbouring small files do not each cost
  a round trip. Their verification runs on a helper thread: the reader returns as soon as its
  own chunks are verified (a reader of a read-ahead chunk waits on its future meanwhile).
* **Read-behind** and **continuation**: a lone small-file miss also fetches the small chunks
  just before it, and a miss of a multi-chunk file's first chunk the file's next chunks, each in
  a parallel request (python reads ``x/__pycache__/m.pyc`` then ``x/m.py``; an executable being
  mapped is read on).
  Read-ahead, read-behind and continuation are the *speculative* fetches (``speculate``
  below); ``readahead_bytes = 0`` turns all three off.
* **Landmark prefetch**: ``landmark_prefetch(end)`` fetches ``[0, end)`` (the image's
  prioritized files, before ``.prefetch.landmark``) in one request.
* **Background fill** (optional): a thread fetches the rest of the blob in 512 KiB ranges once
  foreground requests have been idle for ``background_idle_seconds`` (1 s, also counted from
  its start): on a thin link, every background byte fetched while a container starts delays
  its reads. A shared semaphore bounds it across layers.
* Foreground range requests are limited by a semaphore (``max_concurrent_requests``).

A chunk that fails verification fails only its own readers (:class:`VerificationError`); a
failed request fails the chunks it carried (:class:`RegistryError`); futures are then forgotten
so a later read tries again.
"""

from __future__ import annotations

import bisect
import threading
import time
from array import array
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import structlog

from layerstore.common.negcache import NegativeCache
from layerstore.common.redact import describe_error, redact
from layerstore.errors import LayerStoreError, RangeError, RegistryError, VerificationError
from layerstore.runtime.cache import ChunkCache
from layerstore.source import RangeSource

log = structlog.get_logger(__name__)

KiB = 1024
MiB = 1024 * KiB


class ChunkLike(Protocol):
    """What the fetcher needs of ``layerstore.estargz.toc.Chunk``."""

    @property
    def offset(self) -> int: ...

    @property
    def compressed_end(self) -> int: ...

    @property
    def chunk_offset(self) -> int: ...

    @property
    def chunk_size(self) -> int: ...

    @property
    def inner_offset(self) -> int: ...

    @property
    def digest(self) -> str: ...


DecodeFn = Callable[[bytes, "ChunkLike"], bytes]


@dataclass(frozen=True)
class FetcherSettings:
    max_concurrent_requests: int = 8
    """Foreground range requests in flight at once (across all layers of a LayerManager)."""
    coalesce_gap: int = 64 * KiB
    """Chunks separated by at most this many bytes are fetched in one range."""
    max_range_bytes: int = 32 * MiB
    """No single coalesced range grows beyond this (a lone larger chunk is still fetched)."""
    readahead_bytes: int = 512 * KiB
    """Budget of following small chunks fetched along with a small chunk (0 disables)."""
    small_chunk_bytes: int = 256 * KiB
    """A chunk whose compressed size is at most this is 'small' for read-ahead."""
    readahead_inline_bytes: int = 1 * MiB
    """At most this much of the read-ahead rides in the reader's own request (it delays that
    reader by its transfer time); the rest of the budget is fetched in a parallel request."""
    readbehind_bytes: int = 512 * KiB
    """When a small chunk misses, the small chunks up to this far before it are fetched in a
    parallel request (0 disables): files of one directory are adjacent in the blob but are not
    read in blob order (``foo/__pycache__/x.pyc`` sorts before ``foo/x.py``, ``etc/passwd``
    after ``etc/group``)."""
    continuation_bytes: int = 4 * MiB
    """When the first chunk of a multi-chunk file misses, its following chunks up to this many
    compressed bytes are fetched in a parallel request (0 disables): an executable or library
    being mapped is read on, and its next chunk should not cost another round trip."""
    background_fill: bool = False
    """Fetch the whole layer in the background after first use (the layer starts it when this
    or ``LayerSettings.background_fill`` is set; the config key is ``[fetch]
    background_fetch``)."""
    background_range_bytes: int = 512 * KiB
    """Span of one background request. Small enough that a reader that needs a chunk of a
    request in flight does not wait long for it, nor a foreground miss behind it (512 KiB is
    ~30 ms at 150 Mbit/s; 2 MiB made a container start measurably slower)."""
    background_idle_seconds: float = 1.0
    """The background fill waits until foreground requests (reads that missed, the dependency
    fetch, the landmark prefetch) have been idle this long (also after it is started: a
    container that just started reads in bursts, with gaps of its own CPU work between them,
    and on a thin link every background byte delays those reads)."""
    background_share: float = 0.5
    """Fraction of wall time the background fill may spend fetching (it sleeps the rest)."""
    background_busy_share: float = 0.1
    """... at most this fraction while foreground fetching happened in the last
    ``background_calm_seconds``: a container start that computes between its reads (Python
    compiling modules) leaves idle gaps the fill would otherwise fill, and each of its misses
    then shares the link with the fill."""
    background_calm_seconds: float = 10.0
    failed_chunk_ttl: float = 5.0
    """Seconds a chunk that failed verification is answered with its error without refetching
    (a corrupt blob must not turn every read into a download); then it is tried again."""


@dataclass
class FetchStats:
    requests: int = 0
    ranges: int = 0
    bytes_fetched: int = 0
    chunks_fetched: int = 0
    verification_failures: int = 0
    background_chunks: int = 0


def chunk_key(c: ChunkLike) -> str:
    """The single-flight key: the chunk digest, or the blob offset when there is none."""
    return c.digest if c.digest.startswith("sha256:") else f"@{c.offset}"


def plan_ranges(
    chunks: Sequence[ChunkLike], gap: int, max_bytes: int
) -> list[tuple[int, int, list[ChunkLike]]]:
    """Group chunks (any order) into ``(start, end, chunks)`` byte ranges."""
    ordered = sorted(chunks, key=lambda c: c.offset)
    out: list[tuple[int, int, list[ChunkLike]]] = []
    for c in ordered:
        if out:
            start, end, members = out[-1]
            new_end = max(end, c.compressed_end)
            if c.offset - end <= gap and new_end - start <= max_bytes:
                out[-1] = (start, new_end, [*members, c])
                continue
        out.append((c.offset, c.compressed_end, [c]))
    return out


class Activity:
    """Foreground work (reads that miss, landmark prefetches) in flight, and when it last
    ended. Shared by the fetchers of all layers (the manager passes one), so that no layer's
    background fill competes with another layer's readers or landmark prefetch for the
    link."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = 0
        self.last = 0.0

    def enter(self) -> None:
        with self.cond:
            self.active += 1

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            self.last = time.monotonic()
            self.cond.notify_all()

    def touch(self) -> None:
        """Count idle time from now."""
        with self.cond:
            self.last = max(self.last, time.monotonic())

    def wait_idle(self, idle: float, stop: threading.Event) -> bool:
        """Block until nothing has been active for *idle* seconds; False when *stop* is set."""
        with self.cond:
            while not stop.is_set():
                quiet = time.monotonic() - self.last
                if self.active == 0 and quiet >= idle:
                    return True
                self.cond.wait(timeout=min(max(idle - quiet, 0.01), 0.5))
        return False

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


class ChunkFetcher:
    """Thread-safe chunk fetcher for one blob."""

    def __init__(
        self,
        source: RangeSource,
        cache: ChunkCache,
        chunks: Sequence[ChunkLike],
        decode: DecodeFn,
        settings: FetcherSettings | None = None,
        *,
        fill_slots: threading.Semaphore | None = None,
        request_slots: threading.Semaphore | None = None,
        activity: Activity | None = None,
        name: str = "",
    ) -> None:
        self._source = source
        self._cache = cache
        self._decode = decode
        self.settings = settings or FetcherSettings()
        # The chunks in blob order. The index's own (lazy, compact) sequence is kept as is when
        # it is already ordered, as eStargz writers produce it; otherwise a sorted copy.
        offsets = array("q", (c.offset for c in chunks))
        if any(offsets[i] > offsets[i + 1] for i in range(len(offsets) - 1)):
            chunks = sorted(chunks, key=lambda c: (c.offset, c.chunk_offset))
            offsets = array("q", (c.offset for c in chunks))
        self._chunks: Sequence[ChunkLike] = chunks
        self._offsets = offsets
        self._lock = threading.Lock()
        # Chunk key -> the future of the fetch that carries it. Not a SingleFlight: one
        # fetch (one coalesced request) resolves many keys, each as soon as its own bytes are
        # verified; keys are claimed together with the read-ahead planning under this lock;
        # and read-ahead chunks are claimed by a thread that no caller asked for them.
        self._inflight: dict[str, Future[bytes]] = {}
        # Chunks that failed verification: answered with their error for failed_chunk_ttl.
        self._failed: NegativeCache[str, VerificationError] = NegativeCache(10_000)
        # Shared across layers when the manager passes one; else per fetcher.
        self._requests = request_slots or threading.Semaphore(
            max(1, self.settings.max_concurrent_requests)
        )
        self._activity = activity or Activity()
        self._fill_slots = fill_slots or threading.Semaphore(1)
        self._fill_thread: threading.Thread | None = None
        self._ahead: ThreadPoolExecutor | None = None
        self._closed = threading.Event()
        self.stats = FetchStats()
        self._log = log.bind(digest=name) if name else log

    # --- public ----------------------------------------------------------------------------
    @property
    def chunks(self) -> Sequence[ChunkLike]:
        return self._chunks

    def get_chunk(self, chunk: ChunkLike) -> bytes:
        return self.get_chunks([chunk])[0]

    def get_chunks(
        self, chunks: Sequence[ChunkLike], *, speculate: bool = True, reason: str = "read"
    ) -> list[bytes]:
        """The verified decompressed bytes of each chunk (cache, in-flight fetch, or fetched now).

        *speculate*: a miss also fetches neighbours (read-ahead, read-behind, continuation);
        the dependency fetch, which knows what it wants, turns that off. *reason* is logged
        with the wait (``chunks_missed``): ``"read"`` for a reader, else the mechanism.

        Raises the first chunk's error (:class:`VerificationError`, :class:`RegistryError`).
        """
        results: list[bytes | None] = [None] * len(chunks)
        missing: list[int] = []
        for i, c in enumerate(chunks):
            data = self._cached(c)
            if data is not None:
                results[i] = data
            else:
                missing.append(i)
        if missing and len(self._failed):
            for i in missing:
                bad = self._failed.get(chunk_key(chunks[i]))
                if bad is not None:
                    raise bad.with_traceback(None)
        if missing:
            t0 = time.monotonic()
            futures = self._claim_and_fetch(
                [chunks[i] for i in missing], foreground=True, speculate=speculate
            )
            for i, fut in zip(missing, futures):
                results[i] = fut.result()
            self._log.debug(
                "chunks_missed",
                reason=reason,
                chunks=len(missing),
                offset=chunks[missing[0]].offset,
                seconds=round(time.monotonic() - t0, 4),
            )
        return [r if r is not None else b"" for r in results]

    def _cached(self, c: ChunkLike) -> bytes | None:
        return self._cache.get(c.digest) if c.digest.startswith("sha256:") else None

    def fetch_async(self, chunks: Sequence[ChunkLike]) -> int:
        """Fetch *chunks* (those not cached nor in flight) on a helper thread, for readers
        expected soon (the layer's sequential read-ahead in large files; the read-behind and
        continuation companions of a miss). Returns how many were queued."""
        with self._lock:
            if self._closed.is_set():
                return 0
            todo = [
                c
                for c in chunks
                if chunk_key(c) not in self._inflight and c.digest not in self._cache
            ]
            if not todo:
                return 0
            if self._ahead is None:
                self._ahead = ThreadPoolExecutor(2, thread_name_prefix="stargz-readahead")
            ahead = self._ahead
        try:
            ahead.submit(self._fetch_ahead, todo)
        except RuntimeError:  # shutting down
            return 0
        return len(todo)

    def _fetch_ahead(self, chunks: Sequence[ChunkLike]) -> None:
        try:
            self._claim_and_fetch(chunks, foreground=True, speculate=False)
        except Exception as e:  # readers that need these chunks see the error themselves
            self._log.warning("readahead_failed", error=describe_error(e))

    def landmark_prefetch(self, end: int) -> int:
        """Fetch, verify and cache every chunk starting before *end* (the prioritized files
        before the ``.prefetch.landmark`` entry), in one range request.

        Returns the number of chunks fetched. Errors are logged, not raised.
        """
        n = bisect.bisect_left(self._offsets, end)
        wanted = [c for c in self._chunks[:n] if c.digest not in self._cache]
        if not wanted:
            return 0
        t0 = time.monotonic()
        # Background fills (of every layer) hold back while a landmark prefetch runs.
        self._activity.enter()
        try:
            futures = self._claim_and_fetch(
                wanted, foreground=False, gap=1 << 62, max_bytes=1 << 62, speculate=False
            )
            failed = sum(1 for f in futures if f.exception() is not None)
        finally:
            self._activity.leave()
        self._log.info(
            "landmark_prefetched",
            chunks=len(wanted),
            failed=failed,
            end=end,
            seconds=round(time.monotonic() - t0, 3),
        )
        return len(wanted) - failed

    def start_background_fill(self) -> bool:
        """Start the background fill of the whole blob (once). Returns whether a thread was
        started."""
        total = sum(c.chunk_size for c in self._chunks)
        if total > self._cache.max_bytes // 2:
            # It would only evict itself (and everything else) from the cache.
            self._log.info(
                "background_fill_skipped", bytes=total, cache_max_bytes=self._cache.max_bytes
            )
            return False
        with self._lock:
            if self._fill_thread is not None or self._closed.is_set():
                return False
            t = threading.Thread(
                target=self._background_fill, name="stargz-background-fill", daemon=True
            )
            self._fill_thread = t
        # Idle is counted from now: the first user's reads are about to start.
        self._activity.touch()
        t.start()
        return True

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.shutdown(wait=False)
        self._activity.wake()

    def join_background_fill(self, timeout: float | None = None) -> None:
        t = self._fill_thread
        if t is not None:
            t.join(timeout)

    # --- planning and fetching ------------------------------------------------------------
    def _readahead(self, needed: Sequence[ChunkLike], taken: set[str]) -> list[ChunkLike]:
        budget = self.settings.readahead_bytes
        small = self.settings.small_chunk_bytes
        if budget <= 0 or not needed:
            return []
        last = max(needed, key=lambda c: c.offset)
        if last.compressed_end - last.offset > small:
            return []
        i = bisect.bisect_right(self._offsets, last.offset)
        extra: list[ChunkLike] = []
        limit = last.compressed_end + budget
        while i < len(self._chunks):
            c = self._chunks[i]
            i += 1
            if c.compressed_end - c.offset > small or c.compressed_end > limit:
                break
            k = chunk_key(c)
            if k in taken or k in self._inflight or c.digest in self._cache:
                continue
            taken.add(k)
            extra.append(c)
        return extra

    def _around(self, needed: Sequence[ChunkLike], taken: set[str]) -> list[list[ChunkLike]]:
        """Parallel companions of a miss: small chunks just before it (read-behind) and the
        continuation chunks of a multi-chunk file whose first chunk misses. Caller holds the
        lock; the chunks are not claimed here (``fetch_async`` does)."""
        out: list[list[ChunkLike]] = []
        if self.settings.readahead_bytes <= 0:  # speculation off altogether
            return out
        small = self.settings.small_chunk_bytes
        behind = self.settings.readbehind_bytes
        first = min(needed, key=lambda c: c.offset)
        # Only for the small-file pattern: one whole small file missing (a read spanning
        # chunks is a sequential reader of a larger file).
        lone = len(needed) == 1 and first.chunk_offset == 0
        if behind > 0 and lone and first.compressed_end - first.offset <= small:
            i = bisect.bisect_left(self._offsets, first.offset) - 1
            floor = first.offset - behind
            back: list[ChunkLike] = []
            while i >= 0:
                c = self._chunks[i]
                i -= 1
                if c.offset < floor or c.compressed_end - c.offset > small:
                    break
                k = chunk_key(c)
                if k in taken or k in self._inflight or c.digest in self._cache:
                    continue
                taken.add(k)
                back.append(c)
            if back:
                out.append(back)
        budget = self.settings.continuation_bytes
        if budget > 0:
            cont: list[ChunkLike] = []
            for c in needed:
                if c.chunk_offset != 0:
                    continue
                i = bisect.bisect_right(self._offsets, c.offset)
                limit = c.compressed_end + budget
                while i < len(self._chunks):
                    nxt = self._chunks[i]
                    i += 1
                    # Chunks of one file are adjacent; a chunk_offset of 0 starts another file.
                    if nxt.chunk_offset == 0 or nxt.compressed_end > limit:
                        break
                    k = chunk_key(nxt)
                    if k in taken or k in self._inflight or nxt.digest in self._cache:
                        continue
                    taken.add(k)
                    cont.append(nxt)
            if cont:
                out.append(cont)
        return out

    def _claim_and_fetch(
        self,
        chunks: Sequence[ChunkLike],
        *,
        foreground: bool,
        gap: int | None = None,
        max_bytes: int | None = None,
        speculate: bool = True,
    ) -> list[Future[bytes]]:
        """Futures for *chunks*; the ones nobody is fetching yet are fetched by this thread,
        with read-ahead, read-behind and continuation when *speculate*."""
        futures: list[Future[bytes]] = []
        mine: list[ChunkLike] = []
        owned: list[tuple[str, Future[bytes]]] = []
        with self._lock:
            taken: set[str] = set()
            for c in chunks:
                k = chunk_key(c)
                fut = self._inflight.get(k)
                if fut is None:
                    fut = Future()
                    self._inflight[k] = fut
                    owned.append((k, fut))
                    taken.add(k)
                    mine.append(c)
                futures.append(fut)
            extra = self._readahead(mine, taken) if (speculate and mine) else []
            later: list[ChunkLike] = []
            if extra:
                inline_end = max(c.compressed_end for c in mine) + max(
                    0, self.settings.readahead_inline_bytes
                )
                later = [c for c in extra if c.compressed_end > inline_end]
                extra = [c for c in extra if c.compressed_end <= inline_end]
            for c in extra:
                fut = Future()
                self._inflight[chunk_key(c)] = fut
                owned.append((chunk_key(c), fut))
            companions = self._around(mine, taken) if (speculate and mine) else []
        if later:
            self.fetch_async(later)
        for group in companions:
            self.fetch_async(group)
        handed: set[str] = set()
        if mine:
            if foreground:
                self._activity.enter()
            try:
                # A chunk may have landed in the cache between our lookup and the claim.
                todo: list[ChunkLike] = []
                for c in mine:
                    data = self._cached(c)
                    if data is not None:
                        self._resolve(chunk_key(c), data, None)
                    else:
                        todo.append(c)
                deferred = self._fetch(
                    todo + extra,
                    gap=self.settings.coalesce_gap if gap is None else gap,
                    max_bytes=self.settings.max_range_bytes if max_bytes is None else max_bytes,
                    foreground=foreground,
                    urgent={chunk_key(c) for c in todo} if extra else None,
                )
                if deferred:
                    handed = self._defer(deferred, background=not foreground)
            finally:
                # Safety net: no claimed future may stay pending (its waiters would hang).
                for k, fut in owned:
                    if not fut.done() and k not in handed:
                        with self._lock:
                            if self._inflight.get(k) is fut:
                                del self._inflight[k]
                        fut.set_exception(RegistryError("chunk fetch was interrupted"))
                if foreground:
                    self._activity.leave()
        return futures

    def _resolve(self, key: str, data: bytes | None, exc: BaseException | None) -> None:
        with self._lock:
            fut = self._inflight.pop(key, None)
        if fut is None or fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(data if data is not None else b"")

    def _defer(self, items: list[tuple[ChunkLike, bytes]], *, background: bool) -> set[str]:
        """Verify and deliver read-ahead chunks on a helper thread, so that the reader whose
        request carried them returns as soon as its own chunks are verified. Returns the keys
        handed over (none when no helper is available: then they are delivered here)."""
        keys = {chunk_key(c) for c, _ in items}

        def run() -> None:
            for c, compressed in items:
                try:
                    self._deliver(c, compressed, background=background)
                except BaseException as e:  # never leave a future pending
                    self._resolve(chunk_key(c), None, RegistryError(describe_error(e)))

        with self._lock:
            if self._ahead is None and not self._closed.is_set():
                self._ahead = ThreadPoolExecutor(2, thread_name_prefix="stargz-readahead")
            ahead = self._ahead
        if ahead is not None:
            try:
                ahead.submit(run)
                return keys
            except RuntimeError:  # shutting down
                pass
        run()
        return keys

    def _fetch(
        self,
        chunks: Sequence[ChunkLike],
        *,
        gap: int,
        max_bytes: int,
        foreground: bool,
        urgent: set[str] | None = None,
    ) -> list[tuple[ChunkLike, bytes]]:
        """Fetch, verify, cache and resolve *chunks* (all claimed by this thread).

        With *urgent*, only those chunks are delivered here; the others' bytes are returned
        (still to be verified and delivered by the caller)."""
        deferred: list[tuple[ChunkLike, bytes]] = []
        if not chunks:
            return deferred
        plan = plan_ranges(chunks, gap, max_bytes)
        ranges = [(start, end - start) for start, end, _ in plan]
        t0 = time.monotonic()
        try:
            if foreground:
                with self._requests:
                    bodies = self._source.read_ranges(ranges)
            else:
                bodies = self._source.read_ranges(ranges)
            if len(bodies) != len(ranges):
                raise RangeError(f"asked for {len(ranges)} ranges, got {len(bodies)}")
            for (_off, length), body in zip(ranges, bodies):
                if len(body) != length:
                    raise RangeError(f"range of {length} bytes answered with {len(body)}")
        except BaseException as e:
            err: BaseException = e
            if not isinstance(e, LayerStoreError):
                err = RegistryError(f"fetching {len(ranges)} range(s) failed: {describe_error(e)}")
            self._log.warning(
                "chunk_fetch_failed",
                ranges=len(ranges),
                chunks=len(chunks),
                error=redact(str(err)),
            )
            for c in chunks:
                self._resolve(chunk_key(c), None, err)
            if not isinstance(e, Exception):
                raise
            return deferred
        total = sum(length for _, length in ranges)
        self._log.debug(
            "chunks_fetched",
            foreground=foreground,
            chunks=len(chunks),
            ranges=len(ranges),
            bytes=total,
            start=ranges[0][0],
            seconds=round(time.monotonic() - t0, 4),
        )
        with self._lock:
            self.stats.requests += 1
            self.stats.ranges += len(ranges)
            self.stats.bytes_fetched += total
        for (start, _end, members), body in zip(plan, bodies):
            for c in members:
                compressed = body[c.offset - start : c.compressed_end - start]
                if urgent is not None and chunk_key(c) not in urgent:
                    deferred.append((c, compressed))
                else:
                    self._deliver(c, compressed, background=not foreground)
        return deferred

    def _deliver(self, c: ChunkLike, compressed: bytes, *, background: bool) -> None:
        try:
            data = self._decode(compressed, c)
        except VerificationError as e:
            self._verification_failed(c, e)
            return
        except Exception as e:
            err = VerificationError(
                f"chunk at blob offset {c.offset} did not decode: {describe_error(e)}"
            )
            self._verification_failed(c, err)
            return
        if c.digest.startswith("sha256:"):
            self._cache.put_async(c.digest, data, verified=True)
        with self._lock:
            self.stats.chunks_fetched += 1
            if background:
                self.stats.background_chunks += 1
        self._resolve(chunk_key(c), data, None)

    def _verification_failed(self, c: ChunkLike, err: VerificationError) -> None:
        with self._lock:
            self.stats.verification_failures += 1
        self._failed.put(chunk_key(c), err, self.settings.failed_chunk_ttl)
        self._log.error(
            "chunk_verification_failed",
            chunk_digest=c.digest,
            offset=c.offset,
            error=str(err),
        )
        self._resolve(chunk_key(c), None, err)

    # --- background fill ------------------------------------------------------------------
    def _wait_foreground_idle(self) -> bool:
        return self._activity.wait_idle(self.settings.background_idle_seconds, self._closed)

    def _background_fill(self) -> None:
        t0 = time.monotonic()
        step = max(1, self.settings.background_range_bytes)
        fetched = 0
        failed = 0
        i = 0
        try:
            while i < len(self._chunks) and not self._closed.is_set():
                # Next batch: uncached chunks from i whose span stays within one large range.
                batch: list[ChunkLike] = []
                start = -1
                while i < len(self._chunks):
                    c = self._chunks[i]
                    if start >= 0 and c.compressed_end - start > step and batch:
                        break
                    i += 1
                    if c.digest in self._cache:
                        continue
                    if start < 0:
                        start = c.offset
                    batch.append(c)
                if not batch:
                    continue
                if not self._wait_foreground_idle():
                    break
                with self._fill_slots:
                    if self._closed.is_set():
                        break
                    t_req = time.monotonic()
                    futures = self._claim_and_fetch(
                        batch, foreground=False, gap=step, max_bytes=step, speculate=False
                    )
                    spent = time.monotonic() - t_req
                share = self.settings.background_share
                if time.monotonic() - self._activity.last < self.settings.background_calm_seconds:
                    # a container is starting: its next miss may come any moment
                    share = min(share, self.settings.background_busy_share)
                share = min(max(share, 0.01), 1.0)
                if share < 1.0:
                    self._closed.wait(min(spent * (1.0 - share) / share, 5.0))
                for f in futures:
                    try:
                        f.result()
                        fetched += 1
                    except LayerStoreError:
                        failed += 1
        except Exception as e:  # never let the thread die silently
            self._log.error("background_fill_crashed", error=describe_error(e))
        self._log.info(
            "background_fill_done",
            chunks=fetched,
            failed=failed,
            stopped=self._closed.is_set(),
            seconds=round(time.monotonic() - t0, 3),
        )
