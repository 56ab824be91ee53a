"""Layer: verified file reads over the Go reference blobs, the blob file, info JSON.

``TinyIndex`` below is a test stand-in for ``layerstore.estargz.toc.TOCIndex`` (just what Layer and
the
fetcher need), built from the TOC of a real eStargz blob, so these tests do not depend on the
reader module. ``tests/test_manager.py`` also runs against the real reader when it is present.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from layerstore.errors import CacheError, ChunkDigestMismatchError, VerificationError
from layerstore.estargz.footer import parse_footer
from layerstore.runtime.blobspool import BlobSpool
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.fetcher import ChunkFetcher, ChunkLike, FetcherSettings
from layerstore.runtime.layer import Layer, LayerSettings
from layerstore.source import BytesSource, RangeSource
from tests.test_fetcher import CountingSource, FakeChunk


@dataclass
class _Attr:
    size: int


@dataclass
class TinyIndex:
    files: dict[str, int] = field(default_factory=dict)  # path -> ino
    sizes: dict[int, int] = field(default_factory=dict)
    file_chunks: dict[int, list[FakeChunk]] = field(default_factory=dict)
    landmark: int | None = None
    num_entries: int = 0
    uid_set: set[int] = field(default_factory=set)
    gid_set: set[int] = field(default_factory=set)

    def chunks(self, ino: int) -> Sequence[FakeChunk]:
        return self.file_chunks.get(ino, [])

    def first_chunk_digests(self, ino: int, n: int) -> list[str]:
        return [c.digest for c in self.chunks(ino)[: max(0, n)]]

    def chunk_at(self, ino: int, file_offset: int) -> int:
        starts = [c.chunk_offset for c in self.file_chunks[ino]]
        return max(0, bisect.bisect_right(starts, file_offset) - 1)

    def getattr(self, ino: int) -> _Attr:
        return _Attr(self.sizes[ino])

    def path_of(self, ino: int) -> str | None:
        return next((p for p, i in self.files.items() if i == ino), None)

    @property
    def prefetch_landmark_offset(self) -> int | None:
        return self.landmark

    def uids(self) -> set[int]:
        return self.uid_set

    def gids(self) -> set[int]:
        return self.gid_set

    def all_chunks(self) -> list[FakeChunk]:
        return [c for cs in self.file_chunks.values() for c in cs]


@dataclass
class TinyReader:
    toc_digest: str
    index: TinyIndex


def toc_member(blob: bytes) -> tuple[bytes, int, int]:
    toc_offset, footer_size = parse_footer(blob[-51:])
    return blob[toc_offset : len(blob) - footer_size], toc_offset, footer_size


def tiny_open_toc(
    source: RangeSource, member: bytes, toc_offset: int, footer_size: int, expected: str
) -> TinyReader:
    """Parses the TOC; does NOT check the digest (the manager must)."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(member))) as tar:
        info = tar.next()
        assert info is not None and info.name == "stargz.index.json"
        f = tar.extractfile(info)
        assert f is not None
        raw = f.read()
    toc = json.loads(raw)
    idx = TinyIndex(num_entries=len(toc["entries"]))
    offsets = sorted({e["offset"] for e in toc["entries"] if e.get("offset")} | {toc_offset})
    ino = 0
    for e in toc["entries"]:
        idx.uid_set.add(e.get("uid", 0))
        idx.gid_set.add(e.get("gid", 0))
        if e["name"] == ".prefetch.landmark":
            idx.landmark = e["offset"]
        if e["type"] == "reg":
            ino += 1
            idx.files[e["name"]] = ino
            idx.sizes[ino] = e.get("size", 0)
            idx.file_chunks[ino] = []
        if e["type"] in ("reg", "chunk") and e.get("offset"):
            cur = idx.files[e["name"]]
            off = e["offset"]
            csize = e.get("chunkSize") or idx.sizes[cur] - e.get("chunkOffset", 0)
            end = offsets[bisect.bisect_right(offsets, off)]
            idx.file_chunks[cur].append(
                FakeChunk(
                    off,
                    end,
                    e.get("chunkOffset", 0),
                    csize,
                    e.get("innerOffset", 0),
                    e["chunkDigest"],
                )
            )
    return TinyReader("sha256:" + hashlib.sha256(raw).hexdigest(), idx)


def tiny_decode(compressed: bytes, chunk: ChunkLike) -> bytes:
    data = zlib.decompressobj(wbits=31).decompress(compressed)
    data = data[chunk.inner_offset : chunk.inner_offset + chunk.chunk_size]
    if "sha256:" + hashlib.sha256(data).hexdigest() != chunk.digest:
        raise ChunkDigestMismatchError(f"chunk at {chunk.offset}")
    return data


def tamper_member(blob: bytes, start: int, end: int) -> bytes:
    """Flip one payload byte of the (stored-block) gzip member [start, end), fixing its CRC, so
    the member still inflates cleanly but to different bytes."""
    orig = blob[start:end]
    assert orig[:3] == b"\x1f\x8b\x08" and orig[3] == 0, "plain 10-byte gzip header"
    good = zlib.decompressobj(wbits=-15).decompress(orig[10:-8])
    for pos in range(len(orig) // 2, len(orig) - 8):
        member = bytearray(orig)
        member[pos] ^= 0x55
        try:
            d = zlib.decompressobj(wbits=-15)
            raw = d.decompress(bytes(member[10:-8]))
        except zlib.error:
            continue
        if d.eof and len(raw) == len(good) and raw != good:
            break
    else:
        raise AssertionError("no byte to tamper with")
    member[-8:-4] = struct.pack("<I", zlib.crc32(raw))
    out = blob[:start] + bytes(member) + blob[end:]
    assert zlib.decompressobj(wbits=31).decompress(out[start:end]) == raw
    return out


def tar_files(ref: Path) -> dict[str, bytes]:
    with tarfile.open(ref / "small.tar") as t:
        out = {}
        for m in t.getmembers():
            if m.isreg():
                f = t.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
        return out


def meta(ref: Path, name: str) -> dict[str, Any]:
    return json.loads((ref / f"{name}.json").read_text())  # type: ignore[no-any-return]


def make_layer(
    ref: Path,
    name: str,
    cache: ChunkCache,
    *,
    blob: bytes | None = None,
    source: RangeSource | None = None,
    uncompressed: int | None = None,
    fetch: FetcherSettings | None = None,
    settings: LayerSettings | None = None,
    spool: BlobSpool | None = None,
    diff_id: str | None = None,
) -> tuple[Layer, TinyIndex]:
    if blob is None:
        blob = (ref / f"{name}.esgz").read_bytes()
    m = meta(ref, name)
    member, toc_offset, footer_size = toc_member(blob)
    src = source or BytesSource(blob)
    reader = tiny_open_toc(src, member, toc_offset, footer_size, m["tocDigest"])
    fetcher = ChunkFetcher(
        src, cache, reader.index.all_chunks(), tiny_decode, fetch or FetcherSettings()
    )
    layer = Layer(
        compressed_digest=m["digest"],
        toc_digest=reader.toc_digest,
        diff_id=diff_id or m["diffID"],
        blob_size=len(blob),
        index=reader.index,
        source=src,
        cache=cache,
        fetcher=fetcher,
        toc_offset=toc_offset,
        footer_size=footer_size,
        uncompressed_size=uncompressed,
        settings=settings or LayerSettings(landmark_prefetch=False),
        spool=spool or BlobSpool(cache.root.parent / "spool", 1 << 30),
        toc_member_digest="sha256:" + hashlib.sha256(member).hexdigest(),
    )
    return layer, reader.index


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", 1 << 30)


@pytest.mark.parametrize("name", ["ref-small", "ref-chunked-64k", "ref-prioritized"])
def test_read_every_file_matches_the_tar(go_reference: Path, cache: ChunkCache, name: str) -> None:
    layer, idx = make_layer(go_reference, name, cache)
    files = tar_files(go_reference)
    assert set(files) <= set(idx.files)
    for path, content in files.items():
        ino = idx.files[path]
        assert layer.read(ino, 0, len(content) + 10) == content, path


def test_read_ranges_across_chunks_and_eof(go_reference: Path, cache: ChunkCache) -> None:
    layer, idx = make_layer(go_reference, "ref-chunked-64k", cache)
    data = tar_files(go_reference)["app/data.bin"]
    ino = idx.files["app/data.bin"]
    assert len(idx.chunks(ino)) == 5
    for off, n in [(0, 1), (65535, 2), (65536, 65536), (100_000, 150_000), (299_990, 100)]:
        assert layer.read(ino, off, n) == data[off : off + n], (off, n)
    assert layer.read(ino, 300_000, 10) == b""
    assert layer.read(ino, 400_000, 10) == b""
    assert layer.read(ino, 10, 0) == b""
    empty = idx.files["app/empty"]
    assert layer.read(empty, 0, 100) == b""


def test_cached_reads_make_no_requests(go_reference: Path, tmp_path: Path) -> None:
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    cache = ChunkCache(tmp_path / "c", 1 << 30)
    layer, idx = make_layer(go_reference, "ref-chunked-64k", cache, blob=blob, source=src)
    ino = idx.files["app/data.bin"]
    whole = layer.read(ino, 0, 300_000)
    n = len(src.calls)
    assert n == 1  # five adjacent chunks, one request
    assert layer.read(ino, 70_000, 128 * 1024) == whole[70_000 : 70_000 + 128 * 1024]
    assert len(src.calls) == n
    # Restart: a new cache on the same directory, and the registry is gone.
    cache.close()
    src.fail = OSError("registry down")
    cache2 = ChunkCache(tmp_path / "c", 1 << 30)
    layer2, _ = make_layer(go_reference, "ref-chunked-64k", cache2, blob=blob, source=src)
    assert layer2.read(ino, 0, 300_000) == whole
    assert len(src.calls) == n


def test_corrupted_chunk_fails_that_file_only(go_reference: Path, cache: ChunkCache) -> None:
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    _, idx = make_layer(go_reference, "ref-chunked-64k", cache)
    ino = idx.files["app/data.bin"]
    bad = idx.chunks(ino)[2]
    blob = tamper_member(blob, bad.offset, bad.compressed_end)
    layer, idx = make_layer(go_reference, "ref-chunked-64k", cache, blob=blob)
    files = tar_files(go_reference)
    data = files["app/data.bin"]
    with pytest.raises(VerificationError):
        layer.read(ino, 0, 300_000)
    with pytest.raises(ChunkDigestMismatchError):
        layer.read(ino, bad.chunk_offset + 5, 10)
    # Other chunks of the same file and other files are still served, verified.
    assert layer.read(ino, 0, 1000) == data[:1000]
    assert layer.read(ino, 299_000, 1000) == data[299_000:]
    for path in ("app/main.py", "var/x"):
        assert layer.read(idx.files[path], 0, 100) == files[path]
    assert bad.digest not in cache


def test_info_json_both_schemes(go_reference: Path, cache: ChunkCache) -> None:
    m = meta(go_reference, "ref-chunked-64k")
    layer, _ = make_layer(go_reference, "ref-chunked-64k", cache, uncompressed=317440)
    comp = json.loads(layer.info_json("compressed"))
    assert comp == {
        "compressed-diff-digest": m["digest"],
        "compressed-size": m["size"],
        "diff-digest": m["diffID"],
        "diff-size": 317440,
        "compression": 2,
        "uidset": [0, 1000],
        "gidset": [0, 1000],
    }
    toc = json.loads(layer.info_json("toc"))
    assert toc == {
        "toc-digest": m["tocDigest"],
        "diff-size": 317440,
        "compressed-size": m["size"],
        "compression": 2,
        "flags": {"expected-layer-diffid": m["diffID"]},
        "uidset": [0, 1000],
        "gidset": [0, 1000],
    }
    assert layer.scheme_for(m["digest"]) == "compressed"
    assert layer.scheme_for(m["tocDigest"]) == "toc"
    with pytest.raises(ValueError):
        layer.info_json("zstd")


@pytest.mark.parametrize("name", ["ref-small", "ref-chunked-64k", "ref-prioritized"])
def test_uncompressed_size_without_annotation(
    go_reference: Path, cache: ChunkCache, name: str
) -> None:
    """Without the annotation: -1 in the TOC scheme, an estimate (no request) otherwise."""
    blob = (go_reference / f"{name}.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    layer, _ = make_layer(go_reference, name, cache, blob=blob, source=src)
    assert json.loads(layer.info_json("toc"))["diff-size"] == -1
    diff_size = json.loads(layer.info_json("compressed"))["diff-size"]
    actual = len(gzip.decompress(blob))
    assert 0.9 * actual <= diff_size <= 1.1 * actual
    assert src.calls == []


def test_read_blob_serves_a_verified_spool(go_reference: Path, cache: ChunkCache) -> None:
    blob = (go_reference / "ref-small.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    spool = BlobSpool(cache.root.parent / "spool", 1 << 30)
    layer, _ = make_layer(
        go_reference,
        "ref-small",
        cache,
        blob=blob,
        source=src,
        spool=spool,
        settings=LayerSettings(landmark_prefetch=False, blob_fetch_bytes=100_000),
    )
    offs = list(range(0, len(blob), 50_000))
    offs[1], offs[2] = offs[2], offs[1]  # any order: the first read fetches everything
    parts = {o: layer.read_blob(o, 50_000) for o in offs}
    assert b"".join(parts[o] for o in sorted(parts)) == blob
    assert layer.read_blob(len(blob), 10) == b""
    # The whole blob once, in order, in 100 KB ranges; the spool took its size.
    starts = [call[0][0] for call in src.calls]
    assert starts == list(range(0, len(blob), 100_000))
    assert spool.used == len(blob)
    assert layer.verified and layer.bad is None
    assert not list(spool.directory.iterdir())  # the spool file is unlinked from the start
    # Idle: dropped, the space comes back; the next read fetches again.
    assert not layer.drop_spool(idle_before=time.monotonic() - 60)
    assert layer.drop_spool(idle_before=time.monotonic() + 1)
    assert spool.used == 0
    assert layer.read_blob(1000, 10) == blob[1000:1010]
    assert len(src.calls) == 2 * len(starts)
    layer.close()
    assert spool.used == 0


@pytest.mark.parametrize("where", ["gzip header of the first member", "a chunk's payload"])
def test_read_blob_of_a_tampered_blob_serves_nothing(
    go_reference: Path, cache: ChunkCache, where: str
) -> None:
    blob = bytearray((go_reference / "ref-small.esgz").read_bytes())
    if where.startswith("gzip"):
        blob[5] ^= 0x40  # MTIME of the first member: inflates the same, digest differs
    else:
        blob[1000] ^= 1
    spool = BlobSpool(cache.root.parent / "spool", 1 << 30)
    layer, _ = make_layer(go_reference, "ref-small", cache, blob=bytes(blob), spool=spool)
    bad: list[str] = []
    layer.on_bad = lambda _layer, reason: bad.append(reason)
    with pytest.raises(VerificationError):
        layer.read_blob(0, 4096)  # the very first read: nothing was served
    assert layer.bad is not None and len(bad) == 1 and "blob digest" in bad[0]
    with pytest.raises(VerificationError):
        layer.read_blob(0, 10)
    assert spool.used == 0


def test_read_blob_concurrent_readers_share_one_fetch(
    go_reference: Path, cache: ChunkCache
) -> None:
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    src = CountingSource(BytesSource(blob), delay=0.05)
    layer, _ = make_layer(
        go_reference,
        "ref-chunked-64k",
        cache,
        blob=blob,
        source=src,
        settings=LayerSettings(landmark_prefetch=False, blob_fetch_bytes=64 * 1024),
    )
    out: dict[int, bytes] = {}

    def reader(o: int) -> None:
        out[o] = layer.read_blob(o, 40_000)

    threads = [threading.Thread(target=reader, args=(o,)) for o in range(0, len(blob), 40_000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert b"".join(out[o] for o in sorted(out)) == blob
    starts = sorted(call[0][0] for call in src.calls)
    assert starts == list(range(0, len(blob), 64 * 1024))  # each range fetched once


def test_read_blob_spool_is_bounded(go_reference: Path, cache: ChunkCache) -> None:
    blob = (go_reference / "ref-small.esgz").read_bytes()
    spool = BlobSpool(cache.root.parent / "spool", len(blob) - 1)
    src = CountingSource(BytesSource(blob))
    layer, _ = make_layer(go_reference, "ref-small", cache, blob=blob, source=src, spool=spool)
    with pytest.raises(CacheError):
        layer.read_blob(0, 10)
    assert src.calls == [] and spool.used == 0 and layer.bad is None


def test_landmark_prefetch_on_start(go_reference: Path, cache: ChunkCache) -> None:
    blob = (go_reference / "ref-prioritized.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    layer, idx = make_layer(
        go_reference,
        "ref-prioritized",
        cache,
        blob=blob,
        source=src,
        settings=LayerSettings(landmark_prefetch=True),
    )
    assert idx.landmark is not None
    assert layer.start()
    assert not layer.start()
    deadline = time.monotonic() + 5
    wanted = [c for p in ("app/main.py", "var/x") for c in idx.chunks(idx.files[p])]
    while time.monotonic() < deadline and not all(c.digest in cache for c in wanted):
        time.sleep(0.01)
    assert all(c.digest in cache for c in wanted)
    # One request covering everything before the landmark.
    assert len(src.calls) == 1 and len(src.calls[0]) == 1
    start, length = src.calls[0][0]
    assert start <= min(c.offset for c in wanted)
    assert start + length >= max(c.compressed_end for c in wanted)
    big = idx.chunks(idx.files["app/data.bin"])[0]
    assert big.digest not in cache
    files = tar_files(go_reference)
    assert layer.read(idx.files["app/main.py"], 0, 100) == files["app/main.py"]
    assert len(src.calls) == 1


def test_tiny_reader_digest(go_reference: Path) -> None:
    blob = (go_reference / "ref-small.esgz").read_bytes()
    r = tiny_open_toc(BytesSource(blob), *toc_member(blob), "")
    assert r.toc_digest == meta(go_reference, "ref-small")["tocDigest"]


def test_sequential_readahead_in_large_files(go_reference: Path, cache: ChunkCache) -> None:
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    layer, idx = make_layer(
        go_reference,
        "ref-chunked-64k",
        cache,
        blob=blob,
        source=src,
        fetch=FetcherSettings(readahead_bytes=0),
        settings=LayerSettings(landmark_prefetch=False, sequential_readahead_chunks=2),
    )
    data = tar_files(go_reference)["app/data.bin"]
    ino = idx.files["app/data.bin"]
    cs = idx.chunks(ino)
    assert layer.read(ino, 0, 10_000) == data[:10_000]  # first half: no read-ahead
    time.sleep(0.1)
    assert len(src.calls) == 1 and cs[1].digest not in cache
    assert layer.read(ino, 40_000, 10_000) == data[40_000:50_000]  # second half of chunk 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (cs[1].digest in cache and cs[2].digest in cache):
        time.sleep(0.01)
    assert cs[1].digest in cache and cs[2].digest in cache and cs[3].digest not in cache
    n = len(src.calls)
    assert layer.read(ino, 65_536, 65_536 * 2) == data[65_536 : 65_536 * 3]
    assert len(src.calls) == n


class _GatedCache(ChunkCache):
    """A cache whose pack writer waits for ``gate``: pending chunks stay in memory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def _write_pack(self, batch: list[tuple[str, bytes]]) -> bool:
        self.gate.wait(30)
        return super()._write_pack(batch)


def test_read_nowait_only_from_verified_memory(go_reference: Path, tmp_path: Path) -> None:
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    settings = LayerSettings(landmark_prefetch=False, sequential_readahead_chunks=0)
    cache = _GatedCache(tmp_path / "c", 1 << 30)
    layer, idx = make_layer(
        go_reference, "ref-chunked-64k", cache, blob=blob, source=src, settings=settings
    )
    data = tar_files(go_reference)["app/data.bin"]
    ino = idx.files["app/data.bin"]
    assert layer.read_nowait(ino, 0, 100) is None  # nothing fetched yet: never fetches
    assert src.calls == []
    assert layer.read(ino, 0, 300_000) == data
    # Verified chunks not written yet are served from memory, across chunks too.
    got = layer.read_nowait(ino, 60_000, 10_000)
    assert got is not None and bytes(got) == data[60_000:70_000]
    assert layer.read_nowait(ino, 300_000, 10) is None  # at EOF: the thread path answers
    cache.gate.set()
    cache.flush()
    cache.close()
    # Restart: a pack is opened by a read in a thread; then reads of its blocks that are in
    # the page cache are answered without waiting (checked against the tags all the same).
    cache2 = ChunkCache(tmp_path / "c", 1 << 30)
    layer2, _ = make_layer(
        go_reference, "ref-chunked-64k", cache2, blob=blob, source=src, settings=settings
    )
    layer2.start()
    assert layer2.read_nowait(ino, 0, 100) is None  # no pack open yet
    assert layer2.read(ino, 65_536, 10) == data[65_536:65_546]
    got = layer2.read_nowait(ino, 70_000, 50_000)
    assert got is not None and bytes(got) == data[70_000:120_000]
    loc = cache2.locate(idx.chunks(ino)[1].digest)
    assert loc is not None
    with open(loc[0], "r+b") as f:  # altered: the loop path says None, the thread path reports
        f.seek(loc[1] + 10)
        byte = f.read(1)
        f.seek(loc[1] + 10)
        f.write(bytes([byte[0] ^ 1]))
    assert layer2.read_nowait(ino, 65_536, 100) is None
    assert layer2.read(ino, 65_536, 100) == data[65_536:65_636]  # fetched again
    assert len(src.calls) == 2


def test_read_nowait_from_the_disk_cache_never_fetches(go_reference: Path, tmp_path: Path) -> None:
    """``read_nowait(..., disk=True)`` reads cached chunks from their packs (tag-checked, the
    page cache dropped), and answers None, without a request, when a chunk is not cached or
    its pack was altered."""
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    settings = LayerSettings(landmark_prefetch=False, sequential_readahead_chunks=0)
    cache = ChunkCache(tmp_path / "c", 1 << 30)
    layer, idx = make_layer(
        go_reference,
        "ref-chunked-64k",
        cache,
        blob=blob,
        source=src,
        settings=settings,
        fetch=FetcherSettings(readahead_bytes=0),
    )
    data = tar_files(go_reference)["app/data.bin"]
    ino = idx.files["app/data.bin"]
    layer.start()
    assert layer.read(ino, 0, 65_536) == data[:65_536]  # chunk 0 only
    cache.flush()
    cache.close()
    cache2 = ChunkCache(tmp_path / "c", 1 << 30)
    layer2, _ = make_layer(
        go_reference,
        "ref-chunked-64k",
        cache2,
        blob=blob,
        source=src,
        settings=settings,
        fetch=FetcherSettings(readahead_bytes=0),
    )
    layer2.start()
    calls = len(src.calls)
    loc = cache2.locate(idx.chunks(ino)[0].digest)
    assert loc is not None
    with open(loc[0], "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert layer2.read_nowait(ino, 100, 1000) is None  # no pack open: not without the disk
    got = layer2.read_nowait(ino, 100, 1000, disk=True)
    assert got is not None and bytes(got) == data[100:1100]
    assert layer2.read_nowait(ino, 60_000, 10_000, disk=True) is None  # chunk 1 not cached
    with open(loc[0], "r+b") as f:
        f.seek(loc[1] + 10)
        byte = f.read(1)
        f.seek(loc[1] + 10)
        f.write(bytes([byte[0] ^ 1]))
    assert layer2.read_nowait(ino, 0, 100, disk=True) is None  # altered: dropped, not served
    assert len(src.calls) == calls


def test_open_advises_the_first_cached_chunks(
    go_reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    settings = LayerSettings(
        landmark_prefetch=False, sequential_readahead_chunks=0, open_advise_chunks=2
    )
    cache = ChunkCache(tmp_path / "c", 1 << 30)
    layer, idx = make_layer(go_reference, "ref-chunked-64k", cache, blob=blob, settings=settings)
    ino = idx.files["app/data.bin"]
    cs = idx.chunks(ino)
    layer.start()
    layer.read(ino, 0, 4 * 65_536)
    cache.flush()
    advised: list[list[str]] = []
    monkeypatch.setattr(cache, "advise_soon", lambda digests: advised.append(digests) or 0)
    layer.opened(ino)
    assert advised == [[c.digest for c in cs[:2]]]
    layer2, _ = make_layer(
        go_reference,
        "ref-chunked-64k",
        cache,
        blob=blob,
        settings=replace(settings, open_advise_chunks=0),
    )
    layer2.start()
    layer2.opened(ino)
    assert len(advised) == 1


def test_sequential_reads_advise_cached_chunks_ahead(
    go_reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    settings = LayerSettings(landmark_prefetch=False, sequential_readahead_chunks=2)
    cache = ChunkCache(tmp_path / "c", 1 << 30)
    layer, idx = make_layer(
        go_reference, "ref-chunked-64k", cache, blob=blob, source=src, settings=settings
    )
    data = tar_files(go_reference)["app/data.bin"]
    ino = idx.files["app/data.bin"]
    assert layer.read(ino, 0, 300_000) == data
    cache.flush()
    cache.close()
    cache2 = ChunkCache(tmp_path / "c", 1 << 30)
    layer2, _ = make_layer(
        go_reference, "ref-chunked-64k", cache2, blob=blob, source=src, settings=settings
    )
    advised: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        advised.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    chunks = idx.chunks(ino)
    assert layer2.read(ino, 0, 10) == data[:10]
    # the next chunks of the file (2 + 2), each once, at their place in their packs
    want = []
    for c in chunks[1:5]:
        loc = cache2.locate(c.digest)
        assert loc is not None
        want.append((loc[1], loc[2]))
    assert advised == want
    assert layer2.read(ino, 10, 10) == data[10:20]
    assert len(advised) == 4
    assert layer2.read(ino, 0, 300_000) == data
    assert len(src.calls) == 1
