"""ChunkFetcher: single flight, coalescing, read-ahead, verification, errors, landmark prefetch,
background fill.

The blob here is synthetic (one gzip member per chunk, like eStargz) and the decode function is
a small stand-in for ``layerstore.estargz.reader.decode_chunk``; the real reader is exercised
through
``tests/test_layer.py`` and ``tests/test_manager.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerstore.errors import (
    ChunkDigestMismatchError,
    RegistryError,
    RegistryUnavailableError,
    VerificationError,
)
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.fetcher import (
    Activity,
    ChunkFetcher,
    ChunkLike,
    FetcherSettings,
    SpeculationCosts,
    plan_ranges,
)
from layerstore.source import BytesSource, RangeSource


@dataclass(frozen=True)
class FakeChunk:
    offset: int
    compressed_end: int
    chunk_offset: int
    chunk_size: int
    inner_offset: int
    digest: str


def fake_decode(compressed: bytes, chunk: ChunkLike) -> bytes:
    d = zlib.decompressobj(wbits=31)
    data = d.decompress(compressed)[chunk.inner_offset : chunk.inner_offset + chunk.chunk_size]
    if "sha256:" + hashlib.sha256(data).hexdigest() != chunk.digest:
        raise ChunkDigestMismatchError(f"chunk at {chunk.offset} does not match its digest")
    return data


def build_blob(payloads: Sequence[bytes], prefix: bytes = b"") -> tuple[bytes, list[FakeChunk]]:
    """One gzip member per payload (each its own 'file' at chunk_offset 0)."""
    out = bytearray(gzip.compress(prefix, mtime=0) if prefix else b"")
    chunks = []
    for p in payloads:
        start = len(out)
        out += gzip.compress(p, mtime=0, compresslevel=1)
        chunks.append(
            FakeChunk(start, len(out), 0, len(p), 0, "sha256:" + hashlib.sha256(p).hexdigest())
        )
    out += gzip.compress(b"", mtime=0)  # a trailing member, like the TOC/footer
    return bytes(out), chunks


class CountingSource:
    """A RangeSource wrapper counting calls, with optional latency and failure injection."""

    def __init__(self, inner: RangeSource, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.lock = threading.Lock()
        self.calls: list[list[tuple[int, int]]] = []
        self.fail: Exception | None = None
        self.active = 0
        self.max_active = 0

    def size(self) -> int:
        return self.inner.size()

    def read_at(self, offset: int, length: int) -> bytes:
        return self.read_ranges([(offset, length)])[0]

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        with self.lock:
            self.calls.append(list(ranges))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            return self.inner.read_ranges(ranges)
        finally:
            with self.lock:
                self.active -= 1

    @property
    def nbytes(self) -> int:
        return sum(n for call in self.calls for _, n in call)


def corrupt_member(blob: bytes, chunk: FakeChunk) -> bytes:
    """Replace a chunk's member by a valid gzip member of different content, same length."""
    orig = zlib.decompressobj(wbits=31).decompress(blob[chunk.offset : chunk.compressed_end])
    bad = bytes([orig[0] ^ 1]) + orig[1:]
    member = gzip.compress(bad, mtime=0, compresslevel=1)
    n = chunk.compressed_end - chunk.offset
    assert len(member) == n, "test assumes equal member sizes at level 1"
    return blob[: chunk.offset] + member + blob[chunk.compressed_end :]


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", 1 << 30)


def small_settings(**kw: object) -> FetcherSettings:
    base: dict[str, object] = {"readahead_bytes": 0}
    base.update(kw)
    return FetcherSettings(**base)  # type: ignore[arg-type]


def test_plan_ranges() -> None:
    cs = [
        FakeChunk(o, e, 0, 1, 0, f"sha256:{i:064x}")
        for i, (o, e) in enumerate([(0, 10), (10, 20), (25, 30), (100, 110), (110, 200)])
    ]
    plan = plan_ranges(list(reversed(cs)), gap=5, max_bytes=1000)
    assert [(s, e) for s, e, _ in plan] == [(0, 30), (100, 200)]
    plan = plan_ranges(cs, gap=0, max_bytes=1000)
    assert [(s, e) for s, e, _ in plan] == [(0, 20), (25, 30), (100, 200)]
    plan = plan_ranges(cs, gap=1000, max_bytes=50)
    assert [(s, e) for s, e, _ in plan] == [(0, 30), (100, 110), (110, 200)]


def test_single_flight_under_16_threads(cache: ChunkCache) -> None:
    payloads = [os.urandom(100_000) for _ in range(3)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob), delay=0.2)
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings())
    barrier = threading.Barrier(16)
    results: list[bytes] = []
    lock = threading.Lock()

    def reader() -> None:
        barrier.wait()
        data = f.get_chunk(chunks[1])
        with lock:
            results.append(data)

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and all(r == payloads[1] for r in results)
    assert len(src.calls) == 1
    assert src.calls[0] == [(chunks[1].offset, chunks[1].compressed_end - chunks[1].offset)]
    # Now cached: no more requests.
    assert f.get_chunk(chunks[1]) == payloads[1]
    assert len(src.calls) == 1


def test_coalescing_adjacent_chunks_one_request(cache: ChunkCache) -> None:
    payloads = [os.urandom(20_000) for _ in range(8)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings())
    assert f.get_chunks(chunks[1:7]) == payloads[1:7]
    assert len(src.calls) == 1
    assert src.calls[0] == [(chunks[1].offset, chunks[6].compressed_end - chunks[1].offset)]


def test_distant_chunks_one_read_ranges_call(cache: ChunkCache) -> None:
    payloads = [os.urandom(50_000) for _ in range(6)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings(coalesce_gap=0))
    wanted = [chunks[0], chunks[2], chunks[5]]
    assert f.get_chunks(wanted) == [payloads[0], payloads[2], payloads[5]]
    assert len(src.calls) == 1
    assert len(src.calls[0]) == 3


def test_readahead_fetches_following_small_chunks(cache: ChunkCache) -> None:
    payloads = [os.urandom(10_000) for _ in range(40)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    settings = FetcherSettings(readahead_bytes=100_000, small_chunk_bytes=64 * 1024)
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    assert f.get_chunk(chunks[0]) == payloads[0]
    assert len(src.calls) == 1
    ((start, length),) = src.calls[0]
    assert start == chunks[0].offset
    ahead = [c for c in chunks[1:] if c.compressed_end <= start + length]
    assert 5 <= len(ahead) <= 12  # ~10 KB members, 100 KB budget
    # (verified and cached on a helper thread; a reader of one waits for it, no new request)
    for c, p in zip(chunks[1 : 1 + len(ahead)], payloads[1:]):
        assert f.get_chunk(c) == p
    assert len(src.calls) == 1  # the neighbours cost nothing
    assert all(c.digest in cache for c in ahead)
    # The budget is bounded: the chunk after the read-ahead window needs a request.
    nxt = chunks[1 + len(ahead)]
    assert nxt.digest not in cache
    f.get_chunk(nxt)
    assert len(src.calls) == 2


def test_no_readahead_for_large_chunks(cache: ChunkCache) -> None:
    payloads = [os.urandom(300_000)] + [os.urandom(1000) for _ in range(5)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    settings = FetcherSettings(readahead_bytes=1 << 20, small_chunk_bytes=64 * 1024)
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    f.get_chunk(chunks[0])
    assert src.calls == [[(chunks[0].offset, chunks[0].compressed_end - chunks[0].offset)]]


def test_corrupted_chunk_fails_only_its_readers(cache: ChunkCache) -> None:
    payloads = [os.urandom(5000) for i in range(5)]
    blob, chunks = build_blob(payloads)
    blob = corrupt_member(blob, chunks[2])
    src = CountingSource(BytesSource(blob))
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings())
    with pytest.raises(VerificationError):
        f.get_chunks(chunks)  # a read spanning the bad chunk fails
    # ... but the good chunks fetched with it were verified, cached and are served.
    for i in (0, 1, 3, 4):
        assert chunks[i].digest in cache
        assert f.get_chunk(chunks[i]) == payloads[i]
    assert chunks[2].digest not in cache
    with pytest.raises(ChunkDigestMismatchError):
        f.get_chunk(chunks[2])
    # Remembered for failed_chunk_ttl: no refetch of a chunk known to be bad.
    assert f.stats.verification_failures == 1
    assert len(src.calls) == 1


def test_failed_chunk_retried_after_ttl(cache: ChunkCache) -> None:
    payloads = [os.urandom(5000) for i in range(2)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(corrupt_member(blob, chunks[0])))
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings(failed_chunk_ttl=0.2))
    with pytest.raises(VerificationError):
        f.get_chunk(chunks[0])
    with pytest.raises(VerificationError):
        f.get_chunk(chunks[0])
    assert len(src.calls) == 1
    time.sleep(0.25)
    src.inner = BytesSource(blob)  # the registry got better
    assert f.get_chunk(chunks[0]) == payloads[0]
    assert len(src.calls) == 2


def test_undecodable_member_is_a_verification_error(cache: ChunkCache) -> None:
    payloads = [os.urandom(5000) for _ in range(2)]
    blob, chunks = build_blob(payloads)
    c = chunks[0]
    blob = blob[: c.offset] + b"\x00" * (c.compressed_end - c.offset) + blob[c.compressed_end :]
    f = ChunkFetcher(BytesSource(blob), cache, chunks, fake_decode, small_settings())
    with pytest.raises(VerificationError):
        f.get_chunk(c)
    assert f.get_chunk(chunks[1]) == payloads[1]


def test_registry_error_reaches_all_waiters_then_retry_succeeds(cache: ChunkCache) -> None:
    payloads = [os.urandom(5000) for _ in range(2)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob), delay=0.1)
    src.fail = RegistryUnavailableError("registry.example: connection refused")
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings())
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            f.get_chunk(chunks[0])
        except RegistryError as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4
    assert chunks[0].digest not in cache
    src.fail = None
    assert f.get_chunk(chunks[0]) == payloads[0]


def test_foreign_exception_wrapped_as_registry_error_and_redacted(cache: ChunkCache) -> None:
    blob, chunks = build_blob([b"abc"])
    src = CountingSource(BytesSource(blob))
    src.fail = OSError(
        "connection reset: https://user:pw@s3.example/blob?X-Amz-Signature=deadbeef&X=1 (x)"
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings())
    with pytest.raises(RegistryError) as info:
        f.get_chunk(chunks[0])
    msg = str(info.value)
    assert "OSError" in msg and "s3.example/blob" in msg
    assert "deadbeef" not in msg and "pw@" not in msg
    assert info.value.__cause__ is None


def test_short_range_answer_is_rejected(cache: ChunkCache) -> None:
    blob, chunks = build_blob([os.urandom(1000)])

    class Short(BytesSource):
        def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            return [b[:-1] for b in super().read_ranges(ranges)]

    f = ChunkFetcher(Short(blob), cache, chunks, fake_decode, small_settings())
    with pytest.raises(RegistryError):
        f.get_chunk(chunks[0])


def test_served_from_cache_when_source_fails(tmp_path: Path) -> None:
    payloads = [os.urandom(5000) for _ in range(3)]
    blob, chunks = build_blob(payloads)
    c1 = ChunkCache(tmp_path, 1 << 20)
    f1 = ChunkFetcher(BytesSource(blob), c1, chunks, fake_decode, small_settings())
    f1.get_chunks(chunks)
    c1.close()  # a clean shutdown: pending writes reach the disk
    src = CountingSource(BytesSource(blob))
    src.fail = RegistryUnavailableError("offline")
    f2 = ChunkFetcher(src, ChunkCache(tmp_path, 1 << 20), chunks, fake_decode, small_settings())
    assert f2.get_chunks(chunks) == payloads
    assert src.calls == []


def test_concurrency_limit(cache: ChunkCache) -> None:
    payloads = [os.urandom(2000) for _ in range(12)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob), delay=0.05)
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings(max_concurrent_requests=2))
    threads = [threading.Thread(target=f.get_chunk, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert src.max_active <= 2
    assert all(c.digest in cache for c in chunks)


def test_landmark_prefetch_one_request(cache: ChunkCache) -> None:
    payloads = [os.urandom(3000) for _ in range(10)]
    blob, chunks = build_blob(payloads, prefix=b"tar headers")
    src = CountingSource(BytesSource(blob))
    f = ChunkFetcher(src, cache, chunks, fake_decode, small_settings())
    landmark = chunks[6].offset
    assert f.landmark_prefetch(landmark) == 6
    assert len(src.calls) == 1 and len(src.calls[0]) == 1
    assert all(c.digest in cache for c in chunks[:6])
    assert all(c.digest not in cache for c in chunks[6:])
    assert f.landmark_prefetch(landmark) == 0
    assert len(src.calls) == 1


def test_landmark_prefetch_in_parallel_ranges(cache: ChunkCache) -> None:
    """A large prioritized region goes in ranges of about ``landmark_range_bytes``, several
    at a time, covering the region once: early files do not wait for the whole region, and
    at most a few ranges are held in memory."""
    payloads = [os.urandom(10_000) for _ in range(40)]
    blob, chunks = build_blob(payloads, prefix=b"tar headers")
    src = CountingSource(BytesSource(blob), delay=0.05)
    settings = small_settings(landmark_range_bytes=50_000, landmark_parallel=3)
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    landmark = chunks[30].offset
    assert f.landmark_prefetch(landmark) == 30
    assert all(len(call) == 1 for call in src.calls)
    ranges = sorted(r for call in src.calls for r in call)
    assert len(ranges) >= 6 and all(length <= 50_000 for _, length in ranges)
    assert sum(length for _, length in ranges) == chunks[29].compressed_end - chunks[0].offset
    assert src.max_active == 3
    assert all(c.digest in cache for c in chunks[:30])
    assert all(c.digest not in cache for c in chunks[30:])


def test_landmark_prefetch_does_not_hold_the_region_in_memory(tmp_path: Path) -> None:
    """A prioritized region larger than what a fetch may hold goes through memory a few ranges
    at a time: its decoded chunks are let go once they are in the cache's write queue, not
    kept until the whole region is in (which held the benchmark's whole pandas region, ~150
    MB). 48 chunks of 1 MiB; the cache's queue and packs are 2 MiB."""
    payloads = [bytes([i]) * (1 << 20) for i in range(48)]
    blob, chunks = build_blob(payloads)
    cache = ChunkCache(
        tmp_path / "cache", 1 << 30, max_pending_bytes=2 << 20, max_pack_bytes=2 << 20
    )
    settings = small_settings(
        landmark_range_bytes=4 * (chunks[0].compressed_end), landmark_parallel=2
    )
    f = ChunkFetcher(BytesSource(blob), cache, chunks, fake_decode, settings)
    del payloads
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert f.landmark_prefetch(chunks[-1].compressed_end) == 48
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert cache.flush(30)
    assert all(c.digest in cache for c in chunks)
    assert peak < 24 << 20, f"{peak / (1 << 20):.1f} MiB held at once for a 48 MiB region"


def test_background_fill_fetches_everything_in_large_ranges(cache: ChunkCache) -> None:
    payloads = [os.urandom(10_000) for _ in range(50)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    settings = small_settings(
        background_range_bytes=200_000, background_idle_seconds=0.0, background_share=1.0
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    assert f.start_background_fill()
    assert not f.start_background_fill()
    f.join_background_fill(10)
    assert all(c.digest in cache for c in chunks)
    assert len(src.calls) <= 5
    assert f.stats.background_chunks == 50


class RecordingTap:
    def __init__(self) -> None:
        self.pieces: list[tuple[int, bytes]] = []
        self.finished: list[bool] = []

    def feed(self, offset: int, data: bytes) -> None:
        self.pieces.append((offset, data))

    def finish(self, complete: bool) -> None:
        self.finished.append(complete)


def test_streaming_fill_feeds_every_byte_in_order(cache: ChunkCache) -> None:
    """With a tap, the fill covers the whole blob (the header member before the first chunk,
    chunks already cached, the trailing member) in order, in ranges ending at member
    boundaries, and still delivers the chunks nobody had."""
    payloads = [os.urandom(10_000) for _ in range(30)]
    blob, chunks = build_blob(payloads, prefix=b"tar headers before the first payload")
    src = CountingSource(BytesSource(blob))
    settings = small_settings(
        background_range_bytes=50_000, background_idle_seconds=0.0, background_share=1.0
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    assert f.get_chunks(chunks[3:5]) == payloads[3:5]  # cached before the fill
    tap = RecordingTap()
    assert f.start_background_fill(tap)
    f.join_background_fill(10)
    assert tap.finished == [True]
    pos = 0
    for offset, data in tap.pieces:
        assert offset == pos
        pos += len(data)
    assert b"".join(d for _, d in tap.pieces) == blob
    boundaries = {c.offset for c in chunks} | {c.compressed_end for c in chunks} | {0, len(blob)}
    assert all(o in boundaries for o, _ in tap.pieces)
    assert all(c.digest in cache for c in chunks)
    assert f.stats.background_chunks == 28  # the two cached ones are not delivered again


def test_streaming_fill_counted_as_background_fill(cache: ChunkCache) -> None:
    """The operator's totals (status, metrics) count the streaming fill's ranges under its own
    mechanism, not as nothing or as foreground."""
    from layerstore.runtime.meter import BACKGROUND_FILL, FOREGROUND, FetchMeter

    payloads = [os.urandom(10_000) for _ in range(12)]
    blob, chunks = build_blob(payloads)
    settings = small_settings(
        background_range_bytes=50_000, background_idle_seconds=0.0, background_share=1.0
    )
    meter = FetchMeter()
    f = ChunkFetcher(BytesSource(blob), cache, chunks, fake_decode, settings, meter=meter)
    assert f.start_background_fill(RecordingTap())
    f.join_background_fill(10)
    totals = meter.snapshot().by_mechanism
    assert totals[BACKGROUND_FILL].bytes == len(blob)
    assert totals[BACKGROUND_FILL].requests >= 3
    assert totals[FOREGROUND].bytes == 0


def test_streaming_fill_that_cannot_finish_says_so(cache: ChunkCache) -> None:
    payloads = [os.urandom(10_000) for _ in range(10)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    src.fail = RegistryUnavailableError("registry down")
    settings = small_settings(
        background_range_bytes=50_000, background_idle_seconds=0.0, background_share=1.0
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    tap = RecordingTap()
    assert f.start_background_fill(tap)
    time.sleep(0.2)
    f.close()  # stops the retries
    f.join_background_fill(10)
    assert tap.finished == [False] and tap.pieces == []
    # No chunk future is left pending: a reader gets the registry's answer, not a hang.
    src.fail = None
    assert f.get_chunk(chunks[0]) == payloads[0]
    tap2 = RecordingTap()
    assert not f.start_background_fill(tap2)  # once per fetcher; the tap still hears of it
    assert tap2.finished == [False]


def test_background_yields_to_foreground(cache: ChunkCache) -> None:
    payloads = [os.urandom(10_000) for _ in range(30)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob), delay=0.3)
    settings = small_settings(
        background_range_bytes=20_000, background_idle_seconds=0.2, background_share=1.0
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    fg = threading.Thread(target=f.get_chunk, args=(chunks[-1],))
    fg.start()
    time.sleep(0.05)
    f.start_background_fill()
    time.sleep(0.2)
    # While the foreground request is in flight, the background fill has not started.
    assert len(src.calls) == 1
    fg.join()
    f.close()
    f.join_background_fill(5)
    assert f._fill_thread is not None and not f._fill_thread.is_alive()


def test_background_fill_waits_while_readers_are_served_from_the_cache(
    cache: ChunkCache,
) -> None:
    """A container reading its way through cached files (no request of its own) keeps the
    fill waiting; it starts ``background_idle_seconds`` after the last read."""
    payloads = [os.urandom(10_000) for _ in range(30)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    settings = small_settings(
        background_range_bytes=20_000, background_idle_seconds=0.3, background_share=1.0
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    try:
        f.get_chunk(chunks[0])
        calls = len(src.calls)
        f.start_background_fill()
        until = time.monotonic() + 1.0
        while time.monotonic() < until:  # a reader served from the cache every 50 ms
            f.reader_seen()
            time.sleep(0.05)
        assert len(src.calls) == calls, "the fill ran while the reader was busy"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(src.calls) == calls:
            time.sleep(0.02)
        assert len(src.calls) > calls  # and once the reader stopped, it did
    finally:
        f.close()
        f.join_background_fill(5)


def test_async_cache_writes_serve_from_memory_then_disk(tmp_path: Path) -> None:
    payloads = [os.urandom(5000) for _ in range(20)]
    blob, chunks = build_blob(payloads)
    cache = ChunkCache(tmp_path, 1 << 20)
    f = ChunkFetcher(BytesSource(blob), cache, chunks, fake_decode, small_settings())
    assert f.get_chunks(chunks) == payloads
    # Served at once, whether or not the writer pool has finished.
    assert all(c.digest in cache for c in chunks)
    assert cache.read(chunks[3].digest, 10, 5) == payloads[3][10:15]
    assert cache.flush(10)
    # on disk in packs: a few files for the 20 chunks (batches of what was pending)
    packs = {loc[0] for loc in (cache.locate(c.digest) for c in chunks) if loc is not None}
    assert len(cache) == 20 and 1 <= len(packs) <= 20
    assert sorted(p.name for p in packs) == sorted(p.name for p in (tmp_path / "packs").iterdir())
    assert cache.total_bytes == 20 * 5000


def test_background_fill_skipped_when_layer_exceeds_half_the_cache(tmp_path: Path) -> None:
    payloads = [os.urandom(10_000) for _ in range(10)]
    blob, chunks = build_blob(payloads)
    f = ChunkFetcher(
        BytesSource(blob), ChunkCache(tmp_path, 150_000), chunks, fake_decode, small_settings()
    )
    assert not f.start_background_fill()


def test_readahead_beyond_inline_budget_goes_in_a_parallel_request(cache: ChunkCache) -> None:
    payloads = [os.urandom(10_000) for _ in range(40)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    settings = FetcherSettings(
        readahead_bytes=200_000, readahead_inline_bytes=50_000, small_chunk_bytes=64 * 1024
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    assert f.get_chunk(chunks[0]) == payloads[0]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(src.calls) < 2:
        time.sleep(0.01)
    assert len(src.calls) == 2
    first, second = sorted(src.calls)  # issued in parallel: any order
    assert first[0][0] == chunks[0].offset and sum(n for _, n in first) < 70_000
    assert second[0][0] >= first[0][0] + first[0][1]
    assert (
        chunks[0].compressed_end + 50_000
        < second[0][0] + second[0][1]
        <= (chunks[0].compressed_end + 200_000)
    )


def _wait_calls(src: CountingSource, n: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(src.calls) < n:
        time.sleep(0.01)


def test_readbehind_fetches_preceding_small_files_in_parallel(cache: ChunkCache) -> None:
    payloads = [os.urandom(10_000) for _ in range(20)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    settings = FetcherSettings(
        readahead_bytes=1, readbehind_bytes=45_000, small_chunk_bytes=64 * 1024
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    assert f.get_chunk(chunks[10]) == payloads[10]
    _wait_calls(src, 2)
    assert len(src.calls) == 2
    behind = min(src.calls, key=lambda call: call[0][0])
    start = behind[0][0]
    assert start >= chunks[10].offset - 45_000 and start < chunks[9].offset + 1
    got = [c for c in chunks[:10] if start <= c.offset]
    assert 3 <= len(got) <= 5
    for c in got:  # served by the read-behind request (or its single flight), no new one
        assert f.get_chunk(c) == payloads[chunks.index(c)]
    assert len(src.calls) == 2


def test_no_readbehind_for_a_read_spanning_chunks(cache: ChunkCache) -> None:
    payloads = [os.urandom(10_000) for _ in range(20)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob))
    settings = FetcherSettings(readahead_bytes=1, readbehind_bytes=1 << 20)
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    f.get_chunks(chunks[10:12])
    time.sleep(0.1)
    assert len(src.calls) == 1


def test_first_chunk_miss_fetches_the_file_continuation_in_parallel(cache: ChunkCache) -> None:
    data = os.urandom(300_000)
    parts = [data[i : i + 100_000] for i in range(0, 300_000, 100_000)]
    blob, chunks = build_blob([*parts, os.urandom(1000)])
    # The three parts form one file (chunk offsets 0, 100k, 200k); the last is another file.
    file_chunks = [
        FakeChunk(c.offset, c.compressed_end, i * 100_000, 100_000, 0, c.digest)
        for i, c in enumerate(chunks[:3])
    ]
    chunks = [*file_chunks, chunks[3]]
    src = CountingSource(BytesSource(blob))
    settings = FetcherSettings(readahead_bytes=1, continuation_bytes=1 << 20)
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    assert f.get_chunk(chunks[0]) == parts[0]
    _wait_calls(src, 2)
    assert len(src.calls) == 2
    cont = max(src.calls, key=lambda call: call[0][0])
    assert cont == [(chunks[1].offset, chunks[2].compressed_end - chunks[1].offset)]
    assert f.get_chunks(chunks[1:3]) == parts[1:]
    assert len(src.calls) == 2
    # A later chunk of the file missing alone does not pull the rest.
    f2 = ChunkFetcher(
        src, ChunkCache(cache.root.parent / "c2", 1 << 30), chunks, fake_decode, settings
    )
    f2.get_chunk(chunks[1])
    time.sleep(0.1)
    assert len(src.calls) == 3


def test_background_of_one_layer_yields_to_another_layers_reads(tmp_path: Path) -> None:
    activity = Activity()
    payloads = [os.urandom(10_000) for _ in range(10)]
    blob, chunks = build_blob(payloads)
    src_a = CountingSource(BytesSource(blob))
    src_b = CountingSource(BytesSource(blob), delay=0.4)
    settings = small_settings(background_idle_seconds=0.1, background_share=1.0)
    a = ChunkFetcher(
        src_a,
        ChunkCache(tmp_path / "a", 1 << 30),
        chunks,
        fake_decode,
        settings,
        activity=activity,
    )
    b = ChunkFetcher(
        src_b,
        ChunkCache(tmp_path / "b", 1 << 30),
        chunks,
        fake_decode,
        settings,
        activity=activity,
    )
    reader = threading.Thread(target=b.get_chunk, args=(chunks[0],))
    reader.start()
    time.sleep(0.05)
    assert a.start_background_fill()
    time.sleep(0.2)
    # Layer b's read is in flight: layer a's fill has not started.
    assert src_a.calls == []
    reader.join()
    a.join_background_fill(5)
    assert len(src_a.calls) >= 1
    a.close()
    b.close()


def test_speculation_costs_gate() -> None:
    costs = SpeculationCosts()
    assert costs.pays(1 << 20)  # nothing measured yet: speculate
    costs.request(0.002, 300)  # a 2 ms round trip (a registry on this machine)
    assert costs.pays(1 << 20)  # decoding not measured yet
    costs.decoded(0.010, 1 << 20)  # 10 ms of CPU per MiB
    assert not costs.pays(1 << 20)  # 2 ms saved < 10 ms spent
    assert costs.pays(100 << 10)  # 2 ms > 1 ms for 100 KiB
    costs.request(5.0, 1 << 20)  # large requests say nothing about the round trip
    assert not costs.pays(1 << 20)
    for _ in range(30):
        costs.request(0.045, 200)  # a WAN: 45 ms per round trip
    assert costs.pays(1 << 20)


def _random_small_file_misses(
    cache: ChunkCache, delay: float, files: int = 400
) -> tuple[ChunkFetcher, int]:
    """Reads of every 17th small 'file' of a blob of *files* (each ~136 KB from the next one
    read, beyond the 64 KiB read-ahead and read-behind windows), one at a time."""
    payloads = [os.urandom(8_000) for _ in range(files)]
    blob, chunks = build_blob(payloads)
    src = CountingSource(BytesSource(blob), delay=delay)
    settings = FetcherSettings(
        readahead_bytes=64 * 1024, readbehind_bytes=64 * 1024, small_chunk_bytes=64 * 1024
    )
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    # a slow decoder (2 ms per chunk: about 250 ns per byte), as CPU would be on a busy machine
    f._decode = lambda b, c: (_busy(0.002), fake_decode(b, c))[1]  # type: ignore[method-assign]
    for i in range(0, files, 17):
        assert f.get_chunk(chunks[i]) == payloads[i]
    f.close()
    return f, src.nbytes


def _busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_no_read_ahead_where_a_round_trip_costs_less_than_decoding(tmp_path: Path) -> None:
    """Instant answers (loopback) and decoding that costs CPU: after the first misses have
    measured both, misses fetch their own chunk only."""
    f, nbytes = _random_small_file_misses(
        ChunkCache(tmp_path / "a", 1 << 30), delay=0.0, files=1000
    )
    # 59 misses; the first few speculate while the costs are being measured
    assert f.stats.speculation_skipped >= 45
    assert nbytes < 59 * 8_100 * 4  # mostly the chunks read (each ~8 KB), not ~136 KB a miss


def test_read_ahead_kept_where_round_trips_are_long(tmp_path: Path) -> None:
    """The same reads with 60 ms round trips: the neighbours are worth their decoding."""
    f, nbytes = _random_small_file_misses(ChunkCache(tmp_path / "b", 1 << 30), delay=0.06)
    assert f.stats.speculation_skipped == 0
    assert nbytes > 24 * 8_100 * 8  # each miss carried ~8 neighbours ahead and behind


class ProgressiveSource(CountingSource):
    """Answers a single range in 4 KiB pieces through ``read_at_progressive``; after the
    piece that completes ``hold_after`` bytes it waits (up to 5 s) for ``release``."""

    def __init__(self, inner: RangeSource, hold_after: int) -> None:
        super().__init__(inner)
        self.hold_after = hold_after
        self.release = threading.Event()
        self.held = False

    def read_at_progressive(
        self, offset: int, length: int, progress: Callable[[bytearray], None]
    ) -> bytes:
        data = self.read_ranges([(offset, length)])[0]
        buf = bytearray()
        for i in range(0, length, 4096):
            buf += data[i : i + 4096]
            progress(buf)
            if not self.held and len(buf) >= self.hold_after:
                self.held = True
                self.release.wait(5.0)
        return bytes(buf)


def test_a_miss_returns_before_its_read_ahead_has_arrived(cache: ChunkCache) -> None:
    """The reader's chunk leads a range that carries read-ahead: it is verified and handed
    over when its own bytes are in, while the rest of the range is still coming."""
    payloads = [os.urandom(10_000) for _ in range(40)]
    blob, chunks = build_blob(payloads)
    src = ProgressiveSource(BytesSource(blob), hold_after=chunks[0].compressed_end + 4096)
    settings = FetcherSettings(readahead_bytes=200_000, small_chunk_bytes=64 * 1024)
    f = ChunkFetcher(src, cache, chunks, fake_decode, settings)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(f.get_chunk(chunks[0])))
    t0 = time.monotonic()
    reader.start()
    reader.join(3.0)
    waited = time.monotonic() - t0
    src.release.set()
    reader.join(5.0)
    assert src.held and len(src.calls) == 1
    ((start, length),) = src.calls[0]
    assert start == chunks[0].offset and length > 100_000  # the read-ahead rode along
    assert got == [payloads[0]]
    assert waited < 2.5, "the reader waited for the whole range"
    # the read-ahead chunks arrive with the rest of the body, verified
    for c, p in zip(chunks[1:6], payloads[1:6]):
        assert f.get_chunk(c) == p
    assert len(src.calls) == 1
    f.close()


def test_landmark_ranges_deliver_their_chunks_as_they_arrive(cache: ChunkCache) -> None:
    payloads = [os.urandom(10_000) for _ in range(20)]
    blob, chunks = build_blob(payloads)
    src = ProgressiveSource(BytesSource(blob), hold_after=chunks[2].compressed_end + 1)
    f = ChunkFetcher(src, cache, chunks, fake_decode, FetcherSettings(readahead_bytes=0))
    prefetch = threading.Thread(target=f.landmark_prefetch, args=(chunks[-1].compressed_end,))
    prefetch.start()
    deadline = time.monotonic() + 3.0
    while not src.held and time.monotonic() < deadline:
        time.sleep(0.01)
    # the range is held after its third chunk: the first three are served already
    t0 = time.monotonic()
    assert [f.get_chunk(c) for c in chunks[:3]] == payloads[:3]
    assert time.monotonic() - t0 < 2.0
    assert len(src.calls) == 1
    src.release.set()
    prefetch.join(5.0)
    assert [f.get_chunk(c) for c in chunks] == payloads
    assert len(src.calls) == 1
    f.close()


class MultiProgressiveSource(ProgressiveSource):
    """Also answers several ranges in one go through ``read_ranges_progressive``, each in 4 KiB
    pieces, in the order asked; after the piece that completes the first range it waits (up
    to 5 s) for ``release``."""

    def read_ranges_progressive(
        self,
        ranges: Sequence[tuple[int, int]],
        progress: Callable[[int, bytearray | memoryview], None],
    ) -> list[bytes]:
        bodies = self.read_ranges(ranges)
        for n, ((offset, length), data) in enumerate(zip(ranges, bodies)):
            buf = bytearray()
            for i in range(0, length, 4096):
                buf += data[i : i + 4096]
                view = memoryview(buf)
                progress(offset, view)
                view.release()
            if n == 0 and not self.held:
                self.held = True
                self.release.wait(5.0)
        return bodies


def test_multi_range_requests_deliver_each_chunk_as_it_arrives(cache: ChunkCache) -> None:
    """A batch of chunks far apart (the profile prefetch's access-ordered batches) goes in one
    multi-range request; the chunks of its first range are served while the later ranges are
    still on their way."""
    payloads = [os.urandom(10_000) for _ in range(60)]
    blob, chunks = build_blob(payloads)
    src = MultiProgressiveSource(BytesSource(blob), hold_after=1 << 62)
    f = ChunkFetcher(src, cache, chunks, fake_decode, FetcherSettings(readahead_bytes=0))
    wanted = [chunks[0], chunks[1], chunks[2], chunks[30], chunks[31], chunks[59]]
    fetch = threading.Thread(target=f.get_chunks, args=(wanted,), kwargs={"speculate": False})
    fetch.start()
    deadline = time.monotonic() + 3.0
    while not src.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert src.held
    ((first, _), *rest) = src.calls[0]
    assert first == chunks[0].offset and len(rest) == 2  # one request, three ranges
    # the first range's chunks are verified and cached already, the later ones not yet
    assert all(c.digest in cache for c in chunks[:3])
    assert not any(c.digest in cache for c in (chunks[30], chunks[59]))
    assert [f.get_chunk(c) for c in chunks[:3]] == payloads[:3]
    assert len(src.calls) == 1
    src.release.set()
    fetch.join(5.0)
    assert not fetch.is_alive()
    assert [f.get_chunk(c) for c in wanted] == [payloads[i] for i in (0, 1, 2, 30, 31, 59)]
    assert len(src.calls) == 1
    f.close()
