"""Unit tests for issue 9's findings 4 (on-disk part) and 5: the streaming chunk decoder, the
keyed block tags that check every pread from the cache, large chunks streamed into the cache,
and the daemon-wide memory budget. (End to end through FUSE: tests/test_cache_integrity.py.)"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from layerstore.errors import (
    CacheError,
    ChunkDigestMismatchError,
    FormatError,
    RegistryUnavailableError,
)
from layerstore.estargz.reader import EStargzReader, decode_chunk, decode_chunk_into
from layerstore.estargz.toc import Chunk
from layerstore.estargz.writer import WriterOptions, write_estargz
from layerstore.runtime.blocktags import BLOCK, TAG_SIZE, BlockTagger
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.fetcher import ChunkFetcher, FetcherSettings
from layerstore.runtime.layer import Layer, LayerSettings
from layerstore.runtime.membudget import MemoryBudget
from layerstore.source import BytesSource
from tests.test_fetcher import CountingSource

MiB = 1 << 20


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunk_of(blob: bytes, data: bytes, *, inner: int = 0, offset: int = 0) -> Chunk:
    return Chunk(offset, len(blob), 0, len(data), inner, dg(data))


def wait_until(pred: Any, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# --- the streaming decoder --------------------------------------------------------------------


def test_decode_into_matches_decode_chunk_in_bounded_pieces() -> None:
    data = os.urandom(300_000) + bytes(700_000)
    skip = b"x" * 5000
    # two gzip members, the chunk starting 5000 bytes into the first one (innerOffset)
    blob = gzip.compress(skip + data[:400_000], mtime=0) + gzip.compress(data[400_000:], mtime=0)
    c = chunk_of(blob, data, inner=len(skip))
    pieces: list[bytes] = []
    decode_chunk_into(blob, c, pieces.append, piece=64 * 1024)
    assert b"".join(pieces) == data == decode_chunk(blob, c)
    assert max(len(p) for p in pieces) <= 64 * 1024
    assert len(pieces) >= len(data) // (64 * 1024)


def test_decode_into_truncated_raises_after_partial_output() -> None:
    data = os.urandom(200_000)
    blob = gzip.compress(data, mtime=0)
    c = chunk_of(blob, data)
    got: list[bytes] = []
    with pytest.raises(FormatError):
        decode_chunk_into(blob[: len(blob) // 2], c, got.append, piece=16 * 1024)
    assert got  # the sink saw (unverified) pieces: the caller must discard them


def test_decode_into_wrong_digest_raises_at_the_end() -> None:
    data = os.urandom(100_000)
    blob = gzip.compress(data, mtime=0)
    c = chunk_of(blob, data)._replace(digest=dg(b"something else"))
    got: list[bytes] = []
    with pytest.raises(ChunkDigestMismatchError):
        decode_chunk_into(blob, c, got.append)
    assert b"".join(got) == data


def test_decode_into_bomb_like_ratio_stays_bounded() -> None:
    size = 96 * MiB
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = co.compress(bytes(size)) + co.flush()
    assert len(blob) < size // 500  # ~1000:1
    c = Chunk(0, len(blob), 0, size, 0, dg(bytes(size)))
    h = hashlib.sha256()
    largest = 0

    def sink(piece: bytes) -> None:
        nonlocal largest
        largest = max(largest, len(piece))
        h.update(piece)

    tracemalloc.start()
    try:
        decode_chunk_into(blob, c, sink, piece=MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "sha256:" + h.hexdigest() == c.digest
    assert largest <= MiB
    assert peak < 8 * MiB, peak
    # A member that inflates to far more than the TOC says: only chunk_size bytes are inflated.
    small = c._replace(chunk_size=MiB, digest=dg(bytes(MiB)))
    tracemalloc.start()
    try:
        decode_chunk_into(blob, small, lambda p: None, piece=MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak


# --- block tags -------------------------------------------------------------------------------


def test_block_tags_are_keyed_and_incremental() -> None:
    data = os.urandom(3 * BLOCK + 123)
    a, b = BlockTagger(b"k" * 32), BlockTagger(b"K" * 32)
    tags = a.tags(data)
    assert len(tags) == 4 * TAG_SIZE
    assert tags != b.tags(data)  # another key, other tags
    builder = a.builder()
    for i in range(0, len(data), 10_000):
        builder.add(data[i : i + 10_000])
    assert builder.finish() == tags
    assert a.check(tags, 0, data) == -1
    assert a.check(tags, 1, data[BLOCK : 3 * BLOCK]) == -1
    altered = bytearray(data)
    altered[2 * BLOCK + 7] ^= 1
    assert a.check(tags, 0, altered) == 2
    assert a.check(tags, 2, altered[2 * BLOCK :]) == 2
    assert a.check(tags, 3, altered[3 * BLOCK :]) == -1
    assert a.check(tags, 1, data[2 * BLOCK : 3 * BLOCK]) == 1  # a block moved: caught


# --- the chunk cache: checks on pread ---------------------------------------------------------


def _entry_path(c: ChunkCache, data: bytes) -> Path:
    """The pack file that holds *data*."""
    loc = c.locate(dg(data))
    assert loc is not None
    return loc[0]


def _alter(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def _alter_chunk(c: ChunkCache, digest: str, at: int) -> Path:
    """Flip byte *at* of the chunk's bytes in its pack; returns the pack's path."""
    loc = c.locate(digest)
    assert loc is not None
    _alter(loc[0], loc[1] + at)
    return loc[0]


def test_altered_after_put_is_caught_on_read_and_get(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 30)
    data = os.urandom(5 * BLOCK + 10)
    assert c.put(dg(data), data, verified=True)
    # unaligned slices across blocks and at the end come back right
    for off, n in ((0, 10), (BLOCK - 5, 20), (BLOCK, 2 * BLOCK), (5 * BLOCK, 100), (7, 10**9)):
        assert c.read(dg(data), off, n) == data[off : off + n]
    path = _alter_chunk(c, dg(data), 3 * BLOCK + 1)
    assert c.read(dg(data), 0, BLOCK) == data[:BLOCK]  # other blocks are still served
    with capture_logs() as logs:
        assert c.read(dg(data), 3 * BLOCK, 10) is None
    assert dg(data) not in c
    assert not path.exists()  # its pack held nothing else
    (ev,) = [e for e in logs if e["event"] == "chunk_cache_entry_altered"]
    assert ev["log_level"] == "error" and ev["block"] == 3 and ev["digest"] == dg(data)
    assert c.stats()["altered"] == 1
    # get() (the whole entry) checks every block too
    assert c.put(dg(data), data, verified=True)
    _alter_chunk(c, dg(data), len(data) - 1)
    assert c.get(dg(data)) is None
    assert dg(data) not in c
    c.close()


def test_altered_while_no_daemon_ran_is_caught_after_restart(tmp_path: Path) -> None:
    small = os.urandom(3 * BLOCK)
    large = os.urandom(4 * BLOCK + 99)
    c = ChunkCache(tmp_path, 1 << 30)
    for d in (small, large):
        c.put(dg(d), d, verified=True)
    c.close()
    _alter_chunk(c, dg(large), 2 * BLOCK)  # offline: the daemon is down
    _alter_chunk(c, dg(small), 0)
    # restarted: the packs' indexes authenticate, their tags are trusted, no chunk re-hashed
    c = ChunkCache(tmp_path, 1 << 30)
    assert dg(small) in c and dg(large) in c
    assert c.read(dg(large), 10, 10) == large[10:20]  # block 0 is intact
    assert c.peek(dg(large), 0, 1) is None  # never held in memory
    with capture_logs() as logs:
        assert c.read(dg(large), 2 * BLOCK, 1) is None
        assert c.read(dg(small), 5, 4) is None
    assert dg(large) not in c and dg(small) not in c
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "chunk_cache_entry_altered"
    ] * 2
    c.close()


def test_tag_memory_per_entry(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 30)
    data = os.urandom(4 * MiB)
    c.put(dg(data), data, verified=True)
    entry = c._entries[dg(data)[7:]]
    assert entry.tags is not None and len(entry.tags) == (4 * MiB // BLOCK) * TAG_SIZE  # 1 KiB
    c.close()


# --- store_stream -----------------------------------------------------------------------------


def test_store_stream_writes_in_pieces_and_checks_reads(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 30)
    data = os.urandom(3 * MiB + 5)

    def fill(write: Any) -> None:
        for i in range(0, len(data), 100_000):
            write(data[i : i + 100_000])

    assert c.store_stream(dg(data), len(data), fill)
    assert c.read(dg(data), MiB, 10) == data[MiB : MiB + 10]
    assert c.peek(dg(data), 0, 1) is None
    _alter_chunk(c, dg(data), MiB + 3)
    assert c.read(dg(data), MiB, 10) is None
    c.close()


def test_store_stream_failures_leave_nothing(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 10 * MiB)
    data = os.urandom(MiB)

    def bad(write: Any) -> None:
        write(data[:1000])
        raise ChunkDigestMismatchError("no")

    with pytest.raises(ChunkDigestMismatchError):
        c.store_stream(dg(data), len(data), bad)
    with pytest.raises(CacheError):
        c.store_stream(dg(data), len(data), lambda write: write(data[:10]))
    called = []
    assert not c.store_stream(dg(data), 11 * MiB, lambda write: called.append(1))
    assert not called
    assert dg(data) not in c and c.total_bytes == 0 and c._reserved == 0
    assert list((tmp_path / "packs").iterdir()) == []
    c.close()


# --- the memory budget ------------------------------------------------------------------------


def _acquire_in_thread(b: MemoryBudget, size: int, out: list[Any]) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(b.acquire(size, 30)))
    t.start()
    return t


def test_budget_waits_for_room_in_order() -> None:
    b = MemoryBudget(100)
    g1 = b.acquire(60)
    got: list[Any] = []
    t_big = _acquire_in_thread(b, 70, got)
    wait_until(lambda: b.waits == 1, "the first waiter")
    t_small = _acquire_in_thread(b, 10, got)  # fits, but queues behind the earlier waiter
    wait_until(lambda: b.waits == 2, "the second waiter")
    assert got == [] and b.used == 60
    g1.release()
    g1.release()  # idempotent
    t_big.join(10)
    t_small.join(10)
    assert [g.size for g in got] == [70, 10] and b.used == 80
    for g in got:
        g.release()
    assert b.used == 0


def test_budget_lets_a_larger_request_run_alone() -> None:
    b = MemoryBudget(100)
    with b.acquire(500) as alone:  # nothing else held: goes at once
        assert alone.size == 500 and b.used == 500
        got: list[Any] = []
        t = _acquire_in_thread(b, 1, got)
        wait_until(lambda: b.waits == 1, "the waiter")
        assert got == []
    t.join(10)
    assert [g.size for g in got] == [1]
    got[0].release()
    small = b.acquire(50)
    got = []
    t = _acquire_in_thread(b, 500, got)  # waits until nothing else is held
    wait_until(lambda: b.waits == 2, "the large waiter")
    assert got == []
    small.release()
    t.join(10)
    assert got[0].size == 500 and b.peak == 500
    got[0].release()


def test_budget_wait_has_a_deadline() -> None:
    b = MemoryBudget(10)
    held = b.acquire(10)
    with pytest.raises(CacheError, match="decode memory"):
        b.acquire(5, timeout=0.05, what="test")
    held.release()
    assert b.acquire(5, timeout=0.05).size == 5


# --- the fetcher: large chunks are streamed, memory bounded ----------------------------------


def _zeros_blob(size: int, tail: bytes) -> tuple[bytes, Chunk, bytes]:
    data = bytes(size - len(tail)) + tail
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    member = co.compress(data) + co.flush()
    blob = member + gzip.compress(b"", mtime=0)
    return blob, Chunk(0, len(member), 0, size, 0, dg(data)), data


def test_large_chunk_is_streamed_into_the_cache(tmp_path: Path) -> None:
    blob, c, data = _zeros_blob(64 * MiB, b"tail-one")
    budget = MemoryBudget(16 * MiB)
    cache = ChunkCache(tmp_path, 1 << 30, memory_budget=budget)
    src = CountingSource(BytesSource(blob))
    f = ChunkFetcher(src, cache, [c], decode_chunk)  # type: ignore[arg-type]
    assert f.streamed(c)
    tracemalloc.start()
    try:
        assert f.fetch_chunks([c]) == [None]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * MiB, peak  # never the 64 MiB chunk
    assert budget.peak <= len(blob) + MiB and budget.used == 0
    assert c.digest in cache
    assert cache.read(c.digest, 64 * MiB - 8, 8) == b"tail-one"
    assert f.fetch_chunks([c]) == [None] and len(src.calls) == 1  # cached: no new request
    assert f.get_chunks([c]) == [data]  # whole (for the dependency prefetch)
    f.close()
    cache.close()


def test_large_chunk_the_cache_cannot_hold_is_read_by_slices(tmp_path: Path) -> None:
    blob, c, data = _zeros_blob(24 * MiB, b"tail-two")
    cache = ChunkCache(tmp_path, 8 * MiB)
    f = ChunkFetcher(BytesSource(blob), cache, [c], decode_chunk)  # type: ignore[arg-type]
    assert f.fetch_chunks([c]) == [None]
    assert c.digest not in cache
    assert f.read_slice(c, 24 * MiB - 10, 24 * MiB) == data[-10:]
    assert f.read_slice(c, 5, 5 + MiB) == data[5 : 5 + MiB]
    bad = c._replace(digest=dg(b"x"))
    with pytest.raises(ChunkDigestMismatchError):
        f.read_slice(bad, 0, 10)
    f.close()
    cache.close()


def test_requests_larger_than_half_the_budget_are_split(tmp_path: Path) -> None:
    payloads = [os.urandom(300_000) for _ in range(8)]
    out = bytearray()
    chunks = []
    for p in payloads:
        start = len(out)
        out += gzip.compress(p, mtime=0, compresslevel=1)
        chunks.append(Chunk(start, len(out), 0, len(p), 0, dg(p)))
    out += gzip.compress(b"", mtime=0)
    budget = MemoryBudget(2 * MiB)
    cache = ChunkCache(tmp_path, 1 << 30, memory_budget=budget)
    src = CountingSource(BytesSource(bytes(out)))
    f = ChunkFetcher(
        src,
        cache,
        chunks,
        decode_chunk,  # type: ignore[arg-type]
        FetcherSettings(readahead_bytes=0),
    )
    # one landmark-like fetch of everything (unbounded range): ~2.4 MB compressed
    assert f.landmark_prefetch(len(out)) == len(chunks)
    assert len(src.calls) >= 3
    assert all(sum(n for _, n in call) <= MiB for call in src.calls)
    assert budget.peak <= 2 * MiB and budget.used == 0
    assert f.get_chunks(chunks) == payloads
    f.close()
    cache.close()


# --- Layer.read of streamed chunks: from the checked cache file, or by slices ----------------


class _Switch:
    """A RangeSource that can be made to fail (the registry gone)."""

    def __init__(self, inner: BytesSource) -> None:
        self.inner = inner
        self.down = False

    def size(self) -> int:
        return self.inner.size()

    def read_at(self, offset: int, length: int) -> bytes:
        return self.read_ranges([(offset, length)])[0]

    def read_ranges(self, ranges: Any) -> list[bytes]:
        if self.down:
            raise RegistryUnavailableError("registry down (test)")
        return self.inner.read_ranges(ranges)


def _layer(tmp_path: Path, cache_max: int) -> tuple[Any, int, bytes, ChunkCache, _Switch]:
    data = bytes(3 * MiB) + b"the-tail"
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("big.bin")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(tar.getvalue()), out, WriterOptions(chunk_size=4 * MiB))
    src = _Switch(BytesSource(out.getvalue()))
    reader = EStargzReader.open(src)
    index = reader.index
    cache = ChunkCache(tmp_path, cache_max)
    fetcher = ChunkFetcher(
        src,
        cache,
        list(index.all_chunks()),
        decode_chunk,  # type: ignore[arg-type]
        FetcherSettings(stream_chunk_bytes=MiB, readahead_bytes=0),
    )
    layer = Layer(
        compressed_digest=res.blob_digest,
        toc_digest=res.toc_digest,
        diff_id=res.diff_id,
        blob_size=res.compressed_size,
        index=index,  # type: ignore[arg-type]
        source=src,
        cache=cache,
        fetcher=fetcher,
        toc_offset=res.toc_offset,
        footer_size=51,
        settings=LayerSettings(landmark_prefetch=False, sequential_readahead_chunks=0),
    )
    ino = index.find("big.bin")
    assert ino is not None
    (chunk,) = index.chunks(ino)
    assert fetcher.streamed(chunk)
    return layer, ino, data, cache, src


def test_layer_reads_streamed_chunk_from_the_checked_cache_file(tmp_path: Path) -> None:
    layer, ino, data, cache, src = _layer(tmp_path, 1 << 30)
    assert layer.read(ino, 3 * MiB - 4, 100) == data[3 * MiB - 4 :]
    (chunk,) = layer.index.chunks(ino)
    assert chunk.digest in cache and cache.peek(chunk.digest, 0, 1) is None
    assert layer.read(ino, 0, 10) == data[:10]
    _alter_chunk(cache, chunk.digest, 3 * MiB + 1)
    with capture_logs() as logs:
        assert layer.read(ino, 3 * MiB, 8) == b"the-tail"  # fetched again, not the altered byte
    assert "chunk_cache_entry_altered" in [e["event"] for e in logs]
    _alter_chunk(cache, chunk.digest, 3 * MiB + 1)
    src.down = True  # altered again, and the registry is gone: an error, not the bytes
    with pytest.raises(RegistryUnavailableError):
        layer.read(ino, 3 * MiB, 8)
    src.down = False
    assert layer.read(ino, 3 * MiB, 8) == b"the-tail"
    layer.close()
    cache.close()


def test_layer_reads_a_chunk_larger_than_the_cache_by_slices(tmp_path: Path) -> None:
    layer, ino, data, cache, _src = _layer(tmp_path, 2 * MiB)
    assert layer.read(ino, 100, 1000) == data[100:1100]
    assert layer.read(ino, 3 * MiB, 8) == b"the-tail"
    assert len(cache) == 0
    layer.close()
    cache.close()
