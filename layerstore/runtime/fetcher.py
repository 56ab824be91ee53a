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
  below); ``readahead_bytes = 0`` turns all three off. Read-ahead and read-behind are skipped
  where a round trip costs less than decoding them (:class:`SpeculationCosts`).
* **Progressive delivery**: a request of one range carrying several chunks, on a source that
  reads progressively, delivers each chunk as its bytes arrive; a miss whose range carries
  read-ahead is fetched on a thread of its own, so that its reader waits for its own bytes.
* **Landmark prefetch**: ``landmark_prefetch(end)`` fetches ``[0, end)`` (the image's
  prioritized files, before ``.prefetch.landmark``) in 2 MiB ranges, four at a time, in blob
  order (one request for the whole region made a container's first read wait for all of it).
* **Background fill** (optional): a thread fetches the rest of the blob in 512 KiB ranges once
  foreground requests and reads (cached ones too: :meth:`ChunkFetcher.reader_seen`) have been
  idle for ``background_idle_seconds`` (1 s, also counted from its start): on a thin link,
  every background byte fetched while a container starts delays its reads, and on a small
  node its decoding and hashing take CPU from a container still starting from the cache. A
  shared semaphore bounds it across layers. Given a *tap*, it fetches every byte of the blob
  in order instead (cached chunks and the bytes between payloads too) and feeds
  the tap, which verifies the blob digest and the DiffID when the fill completes.
* Foreground range requests are limited by a semaphore (``max_concurrent_requests``), or by
  the manager's per-registry-host bulkhead slot when it passes one.
* **Bounded memory**: a chunk larger than ``stream_chunk_bytes`` decoded is inflated in pieces
  straight into a cache file (``ChunkCache.store_stream``; its future resolves to None: read
  it from the cache), never held whole; smaller ones are decoded in memory. Every request
  first takes its bytes (the compressed ranges plus the largest in-memory decode) from the
  cache's daemon-wide :class:`~layerstore.runtime.membudget.MemoryBudget`, and a request
  larger than half the budget is split into several.

A chunk that fails verification fails only its own readers (:class:`VerificationError`); a
failed request fails the chunks it carried (:class:`RegistryError`); futures are then forgotten
so a later read tries again.
"""

from __future__ import annotations

import bisect
import operator
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Protocol, cast

import structlog

from layerstore.common.negcache import NegativeCache
from layerstore.common.redact import describe_error, redact
from layerstore.errors import (
    CacheError,
    LayerStoreError,
    RangeError,
    RegistryError,
    VerificationError,
)
from layerstore.estargz.reader import DECODE_PIECE, decode_chunk_into
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.meter import FetchMeter
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
DecodeIntoFn = Callable[[bytes, "ChunkLike", Callable[[bytes], object]], None]
"""Inflate and verify a chunk piece by piece into a sink; raise when it does not match
(``layerstore.estargz.reader.decode_chunk_into``)."""


class FillTap(Protocol):
    """Receives the blob's bytes in order from a streaming background fill (the layer's
    :class:`~layerstore.runtime.blobcheck.BlobVerifier`)."""

    def feed(self, offset: int, data: bytes) -> None: ...

    def finish(self, complete: bool) -> None:
        """Called once: *complete* when every byte up to the blob's end was fed."""
        ...


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
    landmark_range_bytes: int = 2 * MiB
    """The landmark prefetch fetches its region in ranges of about this many compressed bytes,
    ``landmark_parallel`` at a time, in blob order: a container's first reads (the first
    prioritized files) wait for the first ranges, not for the whole region, and no more than
    those ranges are held in memory at once."""
    landmark_parallel: int = 4
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
    stream_chunk_bytes: int = 8 * MiB
    """A chunk larger than this (decoded) is inflated in pieces straight into the cache and
    read back from there; smaller ones are decoded in memory (the fast path)."""


@dataclass
class FetchStats:
    requests: int = 0
    ranges: int = 0
    bytes_fetched: int = 0
    chunks_fetched: int = 0
    verification_failures: int = 0
    background_chunks: int = 0
    speculation_skipped: int = 0  # misses without read-ahead/read-behind (SpeculationCosts)


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


class SpeculationCosts:
    """What a round trip and decoding a byte cost, as one fetcher measures them.

    Read-ahead and read-behind fetch the neighbours of a small-file miss in case they are read
    next: each neighbour read later saves a round trip, and every speculative byte costs its
    decoding and verification (CPU the container needs too: on 2 cores the daemon's decoding
    competes with the workload). Where a round trip costs less than decoding the speculative
    budget (a registry on the same machine or LAN), they are not worth it: measured on
    loopback, 500 random small files read at 44 files/s with them (26 ms of daemon CPU per
    file) (``benchmarks/walk_bench.py``). Over a WAN a round trip is tens of milliseconds and
    they pay. Continuation (the rest of a file being read) is not speculative and not gated.

    ``rtt``: the source's own figure where it has one (``BlobSource.round_trip``: the
    shortest time to response headers of its last requests; while speculating, every miss's
    request is large, so only the source can tell), else the shortest of the last
    ``RTT_WINDOW`` small foreground requests (at most ``SMALL_REQUEST`` bytes: their time is
    the round trip). The shortest, not an average: a request's time includes waiting for the
    interpreter while other threads decode, and the speculation's own decoding would then
    make round trips look long enough to justify it (measured on loopback: small requests
    took 5-30 ms, median 10 ms, with read-ahead on).

    ``decode``: thread CPU seconds per compressed byte of verified decoding, over the last
    few MiB decoded. Until both are measured, speculation is on. Updated from several threads
    without a lock: a lost update only delays the figures."""

    SMALL_REQUEST = 64 * KiB
    RTT_WINDOW = 16
    HITS = 2
    """Round trips one speculation is assumed to save. Measured: decoding small-file chunks
    costs 40-55 ns per compressed byte (45 ms for the 1 MiB of read-ahead and read-behind);
    a round trip is 6 ms to a docker-registry on loopback and 43 ms through the 20 ms WAN
    proxy: any value from 1.1 to 7 switches speculation off on the first and on on the
    second."""
    DECODE_MIN = 64 * KiB
    DECODE_WINDOW = 8 * MiB

    def __init__(self, round_trip: Callable[[], float | None] | None = None) -> None:
        self._round_trip = round_trip
        self.rtt: float | None = None
        self.decode: float | None = None
        self._rtts: deque[float] = deque(maxlen=self.RTT_WINDOW)
        self._cpu = 0.0
        self._bytes = 0

    def request(self, seconds: float, nbytes: int) -> None:
        if 0 < nbytes <= self.SMALL_REQUEST:
            self._rtts.append(seconds)
            self.rtt = min(self._rtts)

    def decoded(self, cpu_seconds: float, nbytes: int) -> None:
        # byte-weighted, per-chunk overheads included (small chunks cost more per byte); the
        # sums are halved every DECODE_WINDOW bytes so that the figure follows the machine
        self._cpu += cpu_seconds
        self._bytes += nbytes
        if self._bytes > self.DECODE_WINDOW:
            self._cpu /= 2
            self._bytes //= 2
        if self._bytes >= self.DECODE_MIN:
            self.decode = self._cpu / self._bytes

    def pays(self, speculative_bytes: int) -> bool:
        """Whether a round trip costs more than decoding *speculative_bytes*."""
        if self._round_trip is not None:
            rtt = self._round_trip()
            if rtt is not None:
                self.rtt = rtt
        if self.rtt is None or self.decode is None:
            return True
        return self.HITS * self.rtt > speculative_bytes * self.decode


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
        decode_into: DecodeIntoFn | None = None,
        fill_slots: threading.Semaphore | None = None,
        request_slots: AbstractContextManager[Any] | None = None,
        activity: Activity | None = None,
        name: str = "",
        meter: FetchMeter | None = None,
    ) -> None:
        self._source = source
        self._cache = cache
        self._decode = decode
        self._decode_into: DecodeIntoFn = decode_into or cast(DecodeIntoFn, decode_chunk_into)
        self.settings = settings or FetcherSettings()
        self._budget = cache.memory_budget
        # The chunks in blob order. The index's own (lazy, compact) sequence is kept as is when
        # it is already ordered, as eStargz writers produce it; otherwise a sorted copy.
        # (a TOCIndex's chunk view gives its offsets without building every chunk)
        offsets_of = getattr(chunks, "offsets", None)
        offsets = offsets_of() if offsets_of is not None else array("q", (c.offset for c in chunks))
        if not all(map(operator.le, offsets, offsets[1:])):
            chunks = sorted(chunks, key=lambda c: (c.offset, c.chunk_offset))
            offsets = array("q", (c.offset for c in chunks))
        self._chunks: Sequence[ChunkLike] = chunks
        self._offsets = offsets
        self._lock = threading.Lock()
        # Chunk key -> the future of the fetch that carries it. Not a SingleFlight: one
        # fetch (one coalesced request) resolves many keys, each as soon as its own bytes are
        # verified; keys are claimed together with the read-ahead planning under this lock;
        # and read-ahead chunks are claimed by a thread that no caller asked for them.
        # A future's result is the chunk's verified bytes, or None for a streamed chunk
        # (in the cache now, unless the cache cannot hold it).
        self._inflight: dict[str, Future[bytes | None]] = {}
        # Chunks that failed verification: answered with their error for failed_chunk_ttl.
        self._failed: NegativeCache[str, VerificationError] = NegativeCache(10_000)
        # Shared across layers when the manager passes one; else per fetcher.
        # A semaphore, or one registry host's slot of the manager's bulkhead.
        self._requests: AbstractContextManager[Any] = request_slots or threading.Semaphore(
            max(1, self.settings.max_concurrent_requests)
        )
        self._activity = activity or Activity()
        self._fill_slots = fill_slots or threading.Semaphore(1)
        self._fill_thread: threading.Thread | None = None
        self._ahead: ThreadPoolExecutor | None = None
        self._closed = threading.Event()
        self.stats = FetchStats()
        self._meter = meter  # totals per mechanism, shared by the manager's fetchers
        self.costs = SpeculationCosts(getattr(source, "round_trip", None))
        self._log = log.bind(digest=name) if name else log

    # --- public ----------------------------------------------------------------------------
    @property
    def chunks(self) -> Sequence[ChunkLike]:
        return self._chunks

    def reader_seen(self) -> None:
        """A reader was served (from the cache too): the background fill counts its idle
        time from now, so that it does not take the CPU (decoding, hashing) and the link from
        a container that is still reading its way through its start."""
        self._activity.touch()

    def streamed(self, c: ChunkLike) -> bool:
        """Whether *c* is decoded in pieces into the cache rather than in memory."""
        return c.chunk_size > self.settings.stream_chunk_bytes and c.digest.startswith("sha256:")

    def get_chunk(self, chunk: ChunkLike) -> bytes:
        return self.get_chunks([chunk])[0]

    def get_chunks(
        self, chunks: Sequence[ChunkLike], *, speculate: bool = True, reason: str = "read"
    ) -> list[bytes]:
        """The verified decompressed bytes of each chunk (cache, in-flight fetch, or fetched now).
        ``speculate=False`` fetches exactly these chunks (no read-ahead, read-behind or
        continuation): for callers that know what will be read (the profile prefetch, the
        dependency fetch). *reason* is logged with the wait (``chunks_missed``): ``"read"``
        for a reader, else the mechanism.

        Holds every chunk whole, large ones too (read back from the cache): for callers that
        need whole files of modest size (the dependency prefetch). ``Layer.read`` uses
        :meth:`fetch_chunks` and reads large chunks' slices from the cache.
        Raises the first chunk's error (:class:`VerificationError`, :class:`RegistryError`).
        """
        out: list[bytes] = []
        for c, data in zip(chunks, self.fetch_chunks(chunks, speculate=speculate, reason=reason)):
            if data is None:
                data = self._cache.get(c.digest)
                if data is None:  # not cacheable (or evicted meanwhile): decode it here
                    data = self.read_slice(c, 0, c.chunk_size)
            out.append(data)
        return out

    def fetch_chunks(
        self, chunks: Sequence[ChunkLike], *, speculate: bool = True, reason: str = "read"
    ) -> list[bytes | None]:
        """The verified decompressed bytes of each chunk decoded in memory; None for each
        chunk that is :meth:`streamed`: it is in the cache now (read slices with
        ``ChunkCache.read``), or, when the cache cannot hold it, nowhere (:meth:`read_slice`).

        *speculate*, *reason*: as for :meth:`get_chunks`.

        Raises the first chunk's error (:class:`VerificationError`, :class:`RegistryError`).
        """
        results: list[bytes | None] = [None] * len(chunks)
        missing: list[int] = []
        for i, c in enumerate(chunks):
            found, data = self._cached(c)
            if found:
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
                rtt_ms=None if self.costs.rtt is None else round(self.costs.rtt * 1e3, 2),
                decode_ns_per_byte=(
                    None if self.costs.decode is None else round(self.costs.decode * 1e9, 1)
                ),
            )
        return results

    def _cached(self, c: ChunkLike) -> tuple[bool, bytes | None]:
        """``(True, bytes)`` for a chunk in the cache (``(True, None)`` for a streamed one,
        which stays on disk), ``(False, None)`` otherwise."""
        if not c.digest.startswith("sha256:"):
            return False, None
        if self.streamed(c):
            return c.digest in self._cache, None
        data = self._cache.get(c.digest)
        return data is not None, data

    def read_slice(self, c: ChunkLike, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of chunk *c*, fetched and inflated whole (the digest covers all
        of it) but keeping only that slice: for a streamed chunk the cache cannot hold. No
        single flight and nothing cached: slow by design, bounded in memory."""
        lo, hi = max(0, lo), min(hi, c.chunk_size)
        if hi <= lo:
            return b""
        size = c.compressed_end - c.offset
        kept: list[bytes] = []
        pos = 0

        def keep(piece: bytes) -> object:
            nonlocal pos
            end = pos + len(piece)
            if end > lo and pos < hi:
                kept.append(piece[max(lo - pos, 0) : min(hi, end) - pos])
            pos = end
            return None

        with self._budget.acquire(
            size + DECODE_PIECE + (hi - lo), self._cache.memory_wait_seconds, "chunk slice"
        ):
            try:
                with self._requests:
                    compressed = self._source.read_at(c.offset, size)
            except LayerStoreError:
                raise
            except Exception as e:
                raise RegistryError(f"fetching a chunk failed: {describe_error(e)}") from None
            if len(compressed) != size:
                raise RangeError(f"range of {size} bytes answered with {len(compressed)}")
            try:
                self._decode_into(compressed, c, keep)
            except VerificationError as e:
                self._verification_failed(c, e)
                raise
            except LayerStoreError:
                raise
            except Exception as e:
                err = VerificationError(
                    f"chunk at blob offset {c.offset} did not decode: {describe_error(e)}"
                )
                self._verification_failed(c, err)
                raise err from None
        return b"".join(kept)

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
        step = max(1, self.settings.landmark_range_bytes)
        groups: list[list[ChunkLike]] = []
        for c in wanted:
            if groups and c.compressed_end - groups[-1][0].offset <= step:
                groups[-1].append(c)
            else:
                groups.append([c])

        def fetch(group: list[ChunkLike]) -> list[Future[bytes | None]]:
            futures = self._claim_and_fetch(
                group, foreground=False, gap=1 << 62, max_bytes=1 << 62, speculate=False
            )
            # Only what is still to be counted: a finished future holds its chunk's decoded
            # bytes, and keeping every group's until the whole region is in held all of it in
            # memory at once (the benchmark's prioritized pandas image: ~150 MB of RSS). The
            # chunks are in the cache (or its write queue, which bounds itself) by now.
            return [f for f in futures if not f.done() or f.exception() is not None]

        # Background fills (of every layer) hold back while a landmark prefetch runs.
        self._activity.enter()
        try:
            workers = max(1, min(self.settings.landmark_parallel, len(groups)))
            if workers == 1:
                futures = [f for g in groups for f in fetch(g)]
            else:
                # Named like the caller's thread: the meter counts these requests as the
                # landmark prefetch's.
                with ThreadPoolExecutor(
                    workers, thread_name_prefix=threading.current_thread().name
                ) as pool:
                    futures = [f for fs in pool.map(fetch, groups) for f in fs]
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

    def start_background_fill(self, tap: FillTap | None = None) -> bool:
        """Start the background fill of the whole blob (once). Returns whether a thread was
        started.

        With *tap*, the fill fetches every byte of the blob in order (not only the chunks not
        cached yet) and hands each range to ``tap.feed`` as it completes, then calls
        ``tap.finish(complete)``: that is how the layer verifies the blob digest and the DiffID
        (:mod:`layerstore.runtime.blobcheck`). ``tap.finish(False)`` is also called when no
        thread is started."""
        total = sum(c.chunk_size for c in self._chunks)
        if total > self._cache.max_bytes // 2:
            # It would only evict itself (and everything else) from the cache.
            self._log.info(
                "background_fill_skipped", bytes=total, cache_max_bytes=self._cache.max_bytes
            )
            if tap is not None:
                tap.finish(False)
            return False
        with self._lock:
            if self._fill_thread is not None or self._closed.is_set():
                started = False
            else:
                started = True
                t = threading.Thread(
                    target=self._background_fill,
                    args=(tap,),
                    name="stargz-background-fill",
                    daemon=True,
                )
                self._fill_thread = t
        if not started:
            if tap is not None:
                tap.finish(False)
            return False
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

    def _neighbours_pay(self) -> bool:
        """Read-ahead and read-behind are worth their bytes here (:class:`SpeculationCosts`).
        Caller holds the lock."""
        spec = max(0, self.settings.readahead_bytes) + max(0, self.settings.readbehind_bytes)
        pays = self.costs.pays(spec)
        if not pays:
            self.stats.speculation_skipped += 1
        return pays

    def _around(
        self, needed: Sequence[ChunkLike], taken: set[str], *, behind: bool = True
    ) -> list[list[ChunkLike]]:
        """Parallel companions of a miss: small chunks just before it (read-behind, unless
        *behind* is false) and the continuation chunks of a multi-chunk file whose first chunk
        misses. Caller holds the lock; the chunks are not claimed here (``fetch_async``
        does)."""
        out: list[list[ChunkLike]] = []
        if self.settings.readahead_bytes <= 0:  # speculation off altogether
            return out
        small = self.settings.small_chunk_bytes
        behind_bytes = self.settings.readbehind_bytes if behind else 0
        first = min(needed, key=lambda c: c.offset)
        # Only for the small-file pattern: one whole small file missing (a read spanning
        # chunks is a sequential reader of a larger file).
        lone = len(needed) == 1 and first.chunk_offset == 0
        if behind_bytes > 0 and lone and first.compressed_end - first.offset <= small:
            i = bisect.bisect_left(self._offsets, first.offset) - 1
            floor = first.offset - behind_bytes
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
    ) -> list[Future[bytes | None]]:
        """Futures for *chunks*; the ones nobody is fetching yet are fetched by this thread,
        with read-ahead, read-behind and continuation when *speculate*."""
        futures: list[Future[bytes | None]] = []
        mine: list[ChunkLike] = []
        owned: list[tuple[str, Future[bytes | None]]] = []
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
            neighbours = speculate and bool(mine) and self._neighbours_pay()
            extra = self._readahead(mine, taken) if neighbours else []
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
            companions = (
                self._around(mine, taken, behind=neighbours) if (speculate and mine) else []
            )
        if later:
            self.fetch_async(later)
        for group in companions:
            self.fetch_async(group)
        if mine:
            if foreground and extra and self._progressive():
                # The reader's chunks lead a range that carries read-ahead: a thread of its
                # own fetches it and delivers each chunk as its bytes arrive, so that this
                # reader waits for its own bytes only, not for the read-ahead's transfer.
                try:
                    threading.Thread(
                        target=self._work,
                        args=(mine, extra, owned, gap, max_bytes, foreground, False),
                        name="stargz-miss",
                        daemon=True,
                    ).start()
                    return futures
                except RuntimeError:  # no thread to be had: fetch it here
                    pass
            self._work(mine, extra, owned, gap, max_bytes, foreground, True)
        return futures

    def _progressive(self) -> bool:
        return (
            getattr(self._source, "read_at_progressive", None) is not None
            and not self._closed.is_set()
        )

    def _work(
        self,
        mine: list[ChunkLike],
        extra: list[ChunkLike],
        owned: list[tuple[str, Future[bytes | None]]],
        gap: int | None,
        max_bytes: int | None,
        foreground: bool,
        defer_extra: bool,
    ) -> None:
        """Fetch the claimed chunks *mine* and *extra* (*owned*: every claimed future).
        *defer_extra*: the caller waits on this thread, so *extra* is verified on a helper
        after *mine*; else everything is delivered here as it arrives."""
        handed: set[str] = set()
        if foreground:
            self._activity.enter()
        try:
            # A chunk may have landed in the cache between our lookup and the claim.
            todo: list[ChunkLike] = []
            for c in mine:
                found, data = self._cached(c)
                if found:
                    self._resolve(chunk_key(c), data, None)
                else:
                    todo.append(c)
            deferred = self._fetch(
                todo + extra,
                gap=self.settings.coalesce_gap if gap is None else gap,
                max_bytes=self.settings.max_range_bytes if max_bytes is None else max_bytes,
                foreground=foreground,
                urgent={chunk_key(c) for c in todo} if (extra and defer_extra) else None,
            )
            if deferred:
                handed = self._defer(deferred, background=not foreground)
        except Exception as e:  # on a thread of its own: log, the futures say the rest
            if defer_extra:
                raise
            self._log.warning("chunk_fetch_failed", error=describe_error(e))
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

    def _resolve(self, key: str, data: bytes | None, exc: BaseException | None) -> None:
        with self._lock:
            fut = self._inflight.pop(key, None)
        if fut is None or fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(data)

    def _defer(self, items: list[tuple[ChunkLike, bytes]], *, background: bool) -> set[str]:
        """Verify and deliver read-ahead chunks on a helper thread, so that the reader whose
        request carried them returns as soon as its own chunks are verified. Returns the keys
        handed over (none when no helper is available: then they are delivered here)."""
        keys = {chunk_key(c) for c, _ in items}

        def run() -> None:
            try:
                # The request's grant was returned: these bytes take their own (the helper
                # holds nothing else while it waits).
                grant = self._budget.acquire(
                    sum(len(b) for _, b in items) + self._decode_charge(c for c, _ in items),
                    self._cache.memory_wait_seconds,
                    "read-ahead chunks",
                )
            except CacheError as e:
                for c, _ in items:
                    self._resolve(chunk_key(c), None, e)
                return
            with grant:
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

    def _decode_charge(self, chunks: Iterable[ChunkLike]) -> int:
        """Decoded bytes a fetch holds at once: chunks are delivered one after another, each
        whole when decoded in memory, a piece at a time when streamed."""
        return max((DECODE_PIECE if self.streamed(c) else c.chunk_size for c in chunks), default=0)

    def _batches(
        self, chunks: Sequence[ChunkLike], gap: int, max_bytes: int
    ) -> list[list[tuple[int, int, list[ChunkLike]]]]:
        """The range plan of *chunks*, in requests of at most half the memory budget each
        (a single range larger than that is a request alone)."""
        half = max(1, self._budget.limit // 2)
        plan = plan_ranges(chunks, gap, max_bytes)
        if sum(end - start for start, end, _ in plan) <= half:
            return [plan]
        plan = plan_ranges(chunks, gap, min(max_bytes, half))
        out: list[list[tuple[int, int, list[ChunkLike]]]] = [[]]
        total = 0
        for r in plan:
            size = r[1] - r[0]
            if out[-1] and total + size > half:
                out.append([])
                total = 0
            out[-1].append(r)
            total += size
        return out

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
        for plan in self._batches(chunks, gap, max_bytes):
            members = [c for _, _, cs in plan for c in cs]
            charge = sum(end - start for start, end, _ in plan) + self._decode_charge(members)
            try:
                grant = self._budget.acquire(
                    charge, self._cache.memory_wait_seconds, f"{len(plan)} range(s)"
                )
            except CacheError as e:
                self._log.warning("chunk_fetch_failed", chunks=len(members), error=str(e))
                for c in members:
                    self._resolve(chunk_key(c), None, e)
                continue
            with grant:
                self._fetch_plan(plan, members, foreground, urgent, deferred)
        return deferred

    def _fetch_plan(
        self,
        plan: list[tuple[int, int, list[ChunkLike]]],
        chunks: list[ChunkLike],
        foreground: bool,
        urgent: set[str] | None,
        deferred: list[tuple[ChunkLike, bytes]],
    ) -> None:
        """One request for *plan*: the caller holds its memory grant.

        A plan of one range of several chunks is read progressively where the source can
        (``BlobSource.read_at_progressive``): each chunk to deliver here is verified and
        delivered as soon as its bytes have arrived, not when the whole range has (a landmark
        range of 2 MiB, or a miss with its read-ahead, holds the first file's reader for the
        transfer time of the rest otherwise)."""
        ranges = [(start, end - start) for start, end, _ in plan]
        delivered: set[str] = set()
        read = self._progressive_reader(plan, urgent, foreground, delivered)
        t0 = time.monotonic()
        sent = t0
        try:
            if foreground:
                with self._requests:
                    sent = time.monotonic()
                    bodies = read(ranges)
            else:
                bodies = read(ranges)
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
            if self._meter is not None:
                self._meter.failed()
            if not isinstance(e, Exception):
                raise
            return
        total = sum(length for _, length in ranges)
        if foreground:
            self.costs.request(time.monotonic() - sent, total)
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
        if self._meter is not None:
            self._meter.observe(total, len(chunks), time.monotonic() - t0)
        for (start, _end, members), body in zip(plan, bodies):
            for c in members:
                if delivered and chunk_key(c) in delivered:
                    continue
                compressed = body[c.offset - start : c.compressed_end - start]
                if urgent is not None and chunk_key(c) not in urgent:
                    deferred.append((c, compressed))
                else:
                    self._deliver(c, compressed, background=not foreground)

    def _progressive_reader(
        self,
        plan: list[tuple[int, int, list[ChunkLike]]],
        urgent: set[str] | None,
        foreground: bool,
        delivered: set[str],
    ) -> Callable[[list[tuple[int, int]]], list[bytes]]:
        """``read_ranges`` for *plan*, delivering chunks (the *urgent* ones, or all) as their
        bytes arrive when the plan holds several chunks and the source reads progressively
        (one range: ``read_at_progressive``; several: ``read_ranges_progressive``, where a
        multi-range answer's parts are followed as they arrive); their keys go into
        *delivered*. Each chunk is verified by :meth:`_deliver` as always."""
        members = [c for _, _, cs in plan for c in cs]
        if len(members) < 2:
            return self._source.read_ranges
        if len(plan) == 1:
            progressive = getattr(self._source, "read_at_progressive", None)
            if progressive is None:
                return self._source.read_ranges
        elif getattr(self._source, "read_ranges_progressive", None) is None:
            return self._source.read_ranges
        todo = sorted(
            (c for c in members if urgent is None or chunk_key(c) in urgent),
            key=lambda c: (c.compressed_end, c.offset),
        )
        if not todo or (len(plan) == 1 and todo[0].compressed_end >= plan[0][1]):
            return self._source.read_ranges
        ends = [c.compressed_end for c in todo]
        cursor: dict[int, int] = {}  # part start -> first chunk of it not delivered yet

        def progress(lo: int, buf: bytearray | memoryview) -> None:
            hi = lo + len(buf)
            i = cursor.get(lo)
            if i is None:
                i = bisect.bisect_right(ends, lo)
            while i < len(todo) and todo[i].compressed_end <= hi:
                c = todo[i]
                i += 1
                if c.offset < lo:
                    continue
                k = chunk_key(c)
                if k in delivered:
                    continue
                delivered.add(k)
                self._deliver(
                    c, bytes(buf[c.offset - lo : c.compressed_end - lo]), background=not foreground
                )
            cursor[lo] = i

        if len(plan) == 1:
            start, end, _ = plan[0]

            def read_one(ranges: list[tuple[int, int]]) -> list[bytes]:
                # (a retried request starts a new buffer: the chunks delivered are skipped)
                return [
                    self._source.read_at_progressive(  # type: ignore[attr-defined]
                        start, end - start, lambda buf: progress(start, buf)
                    )
                ]

            return read_one

        def read_many(ranges: list[tuple[int, int]]) -> list[bytes]:
            return self._source.read_ranges_progressive(ranges, progress)  # type: ignore[attr-defined,no-any-return]

        return read_many

    def _deliver(self, c: ChunkLike, compressed: bytes, *, background: bool) -> None:
        data: bytes | None = None
        try:
            if self.streamed(c):
                self._stream_to_cache(c, compressed)
            else:
                cpu0 = time.thread_time()
                data = self._decode(compressed, c)
                self.costs.decoded(time.thread_time() - cpu0, len(compressed))
        except VerificationError as e:
            self._verification_failed(c, e)
            return
        except Exception as e:
            err = VerificationError(
                f"chunk at blob offset {c.offset} did not decode: {describe_error(e)}"
            )
            self._verification_failed(c, err)
            return
        if data is not None and c.digest.startswith("sha256:"):
            self._cache.put_async(c.digest, data, verified=True)
        with self._lock:
            self.stats.chunks_fetched += 1
            if background:
                self.stats.background_chunks += 1
        self._resolve(chunk_key(c), data, None)

    def _stream_to_cache(self, c: ChunkLike, compressed: bytes) -> None:
        """Inflate, verify and write a large chunk into the cache piece by piece. Raises what
        the decoder raises (nothing is stored then). When the cache cannot take it (too large,
        disk error), nothing is decoded now: readers decode the slices they need
        (:meth:`ChunkFetcher.read_slice`)."""
        try:
            stored = self._cache.store_stream(
                c.digest, c.chunk_size, lambda write: self._decode_into(compressed, c, write)
            )
        except OSError as e:
            self._log.warning(
                "chunk_cache_write_failed", chunk_digest=c.digest, error=describe_error(e)
            )
            return
        if not stored:
            self._log.info(
                "chunk_not_cacheable",
                chunk_digest=c.digest,
                size=c.chunk_size,
                cache_max_bytes=self._cache.max_bytes,
            )

    def _verification_failed(self, c: ChunkLike, err: VerificationError) -> None:
        with self._lock:
            self.stats.verification_failures += 1
        if self._meter is not None:
            self._meter.verification_failed()
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

    def _background_fill(self, tap: FillTap | None = None) -> None:
        t0 = time.monotonic()
        counts = [0, 0]  # chunks fetched, failed
        complete = False
        try:
            if tap is None:
                self._fill_chunks(counts)
            else:
                complete = self._fill_stream(tap, counts)
        except Exception as e:  # never let the thread die silently
            self._log.error("background_fill_crashed", error=describe_error(e))
        finally:
            if tap is not None:
                try:
                    tap.finish(complete)
                except Exception as e:
                    self._log.error("background_fill_crashed", error=describe_error(e))
        self._log.info(
            "background_fill_done",
            chunks=counts[0],
            failed=counts[1],
            stopped=self._closed.is_set(),
            streamed=tap is not None,
            seconds=round(time.monotonic() - t0, 3),
        )

    def _pace(self, spent: float) -> None:
        share = self.settings.background_share
        if time.monotonic() - self._activity.last < self.settings.background_calm_seconds:
            # a container is starting: its next miss may come any moment
            share = min(share, self.settings.background_busy_share)
        share = min(max(share, 0.01), 1.0)
        if share < 1.0:
            self._closed.wait(min(spent * (1.0 - share) / share, 5.0))

    def _fill_chunks(self, counts: list[int]) -> None:
        """The chunks not cached yet, in blob order, in batches of about one range."""
        step = max(1, self.settings.background_range_bytes)
        i = 0
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
            self._pace(spent)
            for f in futures:
                try:
                    f.result()
                    counts[0] += 1
                except LayerStoreError:
                    counts[1] += 1

    def _fill_stream(self, tap: FillTap, counts: list[int]) -> bool:
        """Every byte of the blob in order, in ranges of about ``background_range_bytes`` that
        end at member boundaries; the chunks in a range that are neither cached nor in flight
        are delivered from it, and each range goes to *tap*. Returns whether the end of the
        blob was reached."""
        step = max(1, self.settings.background_range_bytes)
        size = self._source.size()
        chunks = self._chunks
        pos = 0
        i = 0
        while pos < size:
            if self._closed.is_set():
                return False
            while i < len(chunks) and chunks[i].offset < pos:
                i += 1  # overlapping entries of an odd TOC: left to readers
            end = pos
            j = i
            if j < len(chunks) and chunks[j].offset - pos >= step:
                end = chunks[j].offset  # a long stretch without payload
            else:
                while j < len(chunks):
                    c = chunks[j]
                    if c.compressed_end - pos > step and end > pos:
                        break
                    end = max(end, c.compressed_end)
                    j += 1
            if end <= pos:
                end = min(size, pos + step)
            end = min(end, size)
            members = [c for c in chunks[i:j] if c.compressed_end <= end]
            i = j
            body: bytes | None = None
            for attempt in range(3):
                if not self._wait_foreground_idle():
                    return False
                with self._fill_slots:
                    if self._closed.is_set():
                        return False
                    t_req = time.monotonic()
                    try:
                        # The range and one decode at a time, from the daemon-wide budget.
                        with self._budget.acquire(
                            end - pos + self._decode_charge(members),
                            self._cache.memory_wait_seconds,
                            "background fill range",
                        ):
                            body = self._fill_window(pos, end, members, counts)
                    except LayerStoreError as e:
                        self._log.warning(
                            "background_fill_range_failed",
                            offset=pos,
                            attempt=attempt + 1,
                            error=describe_error(e),
                        )
                    spent = time.monotonic() - t_req
                self._pace(spent)
                if body is not None:
                    break
                self._closed.wait(1.0 + attempt)
            if body is None:
                return False
            tap.feed(pos, body)
            pos = end
        return True

    def _fill_window(
        self, start: int, end: int, members: Sequence[ChunkLike], counts: list[int]
    ) -> bytes:
        """Fetch ``[start, end)`` and deliver the chunks of *members* nobody else has."""
        owned: list[tuple[ChunkLike, Future[bytes | None]]] = []
        with self._lock:
            for c in members:
                k = chunk_key(c)
                if k in self._inflight or c.digest in self._cache:
                    continue
                fut: Future[bytes | None] = Future()
                self._inflight[k] = fut
                owned.append((c, fut))
        try:
            t0 = time.monotonic()
            try:
                (body,) = self._source.read_ranges([(start, end - start)])
            except LayerStoreError:
                if self._meter is not None:
                    self._meter.failed()
                raise
            except Exception as e:
                if self._meter is not None:
                    self._meter.failed()
                raise RegistryError(f"background fill range failed: {describe_error(e)}") from None
            if len(body) != end - start:
                raise RangeError(f"range of {end - start} bytes answered with {len(body)}")
            with self._lock:
                self.stats.requests += 1
                self.stats.ranges += 1
                self.stats.bytes_fetched += len(body)
            if self._meter is not None:
                self._meter.observe(len(body), len(owned), time.monotonic() - t0)
            for c, _ in owned:
                self._deliver(c, body[c.offset - start : c.compressed_end - start], background=True)
            return body
        finally:
            # Every claimed future is resolved: delivered above, or failed here.
            for c, fut in owned:
                if fut.done():
                    if fut.exception() is None:
                        counts[0] += 1
                    else:
                        counts[1] += 1
                    continue
                with self._lock:
                    if self._inflight.get(chunk_key(c)) is fut:
                        del self._inflight[chunk_key(c)]
                fut.set_exception(RegistryError("background fill range failed"))
                counts[1] += 1

    # --- snapshot (stargz-store status, metrics) --------------------------------------------
    def snapshot(self) -> FetcherSnapshot:
        """A copy of this fetcher's counters and what it has in flight (cheap: one lock)."""
        with self._lock:
            fill = self._fill_thread
            return FetcherSnapshot(
                stats=FetchStats(**vars(self.stats)),
                chunks=len(self._chunks),
                chunks_in_flight=len(self._inflight),
                background_fill_running=fill is not None and fill.is_alive(),
            )


@dataclass(frozen=True)
class FetcherSnapshot:
    stats: FetchStats
    chunks: int
    """Chunks in the layer."""
    chunks_in_flight: int
    """Chunks claimed by a fetch that has not delivered them yet."""
    background_fill_running: bool
