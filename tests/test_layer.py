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
import struct
import tarfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from layerstore.errors import ChunkDigestMismatchError, VerificationError
from layerstore.estargz.footer import parse_footer
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
        diff_id=m["diffID"],
        blob_size=len(blob),
        index=reader.index,
        source=src,
        cache=cache,
        fetcher=fetcher,
        toc_offset=toc_offset,
        footer_size=footer_size,
        uncompressed_size=uncompressed,
        settings=settings or LayerSettings(landmark_prefetch=False),
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


def test_read_blob_windows_and_digest(go_reference: Path, cache: ChunkCache) -> None:
    blob = (go_reference / "ref-small.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    layer, _ = make_layer(
        go_reference,
        "ref-small",
        cache,
        blob=blob,
        source=src,
        settings=LayerSettings(landmark_prefetch=False, blob_readahead_bytes=100_000),
    )
    out = bytearray()
    # Sequential 128 KiB-ish reads, with one pair out of order.
    offs = list(range(0, len(blob), 50_000))
    offs[1], offs[2] = offs[2], offs[1]
    parts = {o: layer.read_blob(o, 50_000) for o in offs}
    for o in sorted(parts):
        out += parts[o]
    assert bytes(out) == blob
    assert len(src.calls) <= 5  # 100 KB windows over 301 KB (+ one read-ahead race at most)
    assert all(n <= 100_000 for call in src.calls for _, n in call)
    assert layer.read_blob(len(blob), 10) == b""
    assert layer._blob_verified


def test_read_blob_mismatch_fails_last_read(go_reference: Path, cache: ChunkCache) -> None:
    blob = bytearray((go_reference / "ref-small.esgz").read_bytes())
    blob[1000] ^= 1  # the registry serves a different blob than the manifest names
    layer, _ = make_layer(go_reference, "ref-small", cache, blob=bytes(blob))
    step = 64 * 1024
    with pytest.raises(VerificationError):
        for o in range(0, len(blob), step):
            layer.read_blob(o, step)
    with pytest.raises(VerificationError):
        layer.read_blob(0, 10)


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


def test_read_blob_sequential_readahead(go_reference: Path, cache: ChunkCache) -> None:
    blob = (go_reference / "ref-small.esgz").read_bytes()
    src = CountingSource(BytesSource(blob), delay=0.05)
    layer, _ = make_layer(
        go_reference,
        "ref-small",
        cache,
        blob=blob,
        source=src,
        settings=LayerSettings(landmark_prefetch=False, blob_readahead_bytes=64 * 1024),
    )
    waited = 0.0
    out = bytearray()
    for o in range(0, len(blob), 16 * 1024):
        t0 = time.monotonic()
        out += layer.read_blob(o, 16 * 1024)
        waited += time.monotonic() - t0
        time.sleep(0.02)  # the consumer works a little between reads
    assert bytes(out) == blob
    starts = sorted(call[0][0] for call in src.calls)
    assert starts == list(range(0, len(blob), 64 * 1024))  # each window fetched once
    # Only the first window is waited for in full; the rest arrive while reading.
    assert waited < 0.05 * 3
    assert layer._blob_verified


def test_read_nowait_only_from_verified_memory(go_reference: Path, tmp_path: Path) -> None:
    blob = (go_reference / "ref-chunked-64k.esgz").read_bytes()
    src = CountingSource(BytesSource(blob))
    settings = LayerSettings(landmark_prefetch=False, sequential_readahead_chunks=0)
    cache = ChunkCache(tmp_path / "c", 1 << 30)
    layer, idx = make_layer(
        go_reference, "ref-chunked-64k", cache, blob=blob, source=src, settings=settings
    )
    data = tar_files(go_reference)["app/data.bin"]
    ino = idx.files["app/data.bin"]
    assert layer.read_nowait(ino, 0, 100) is None  # nothing fetched yet: never fetches
    assert src.calls == []
    assert layer.read(ino, 0, 300_000) == data
    cache.flush()
    cache.close()
    # Restart: entries on disk are not in memory until verified by a read in a thread.
    cache2 = ChunkCache(tmp_path / "c", 1 << 30)
    layer2, _ = make_layer(
        go_reference, "ref-chunked-64k", cache2, blob=blob, source=src, settings=settings
    )
    layer2.start()
    assert layer2.read_nowait(ino, 0, 100) is None
    assert layer2.read(ino, 65_536, 10) == data[65_536:65_546]  # verifies chunk 1 whole
    got = layer2.read_nowait(ino, 70_000, 50_000)
    assert got is not None and bytes(got) == data[70_000:120_000]
    assert layer2.read_nowait(ino, 60_000, 10_000) is None  # chunk 0 not verified yet
    assert layer2.read(ino, 0, 10) == data[:10]
    got = layer2.read_nowait(ino, 60_000, 10_000)  # across chunks 0 and 1
    assert got is not None and bytes(got) == data[60_000:70_000]
    assert layer2.read_nowait(ino, 300_000, 10) is None  # at EOF: the thread path answers
    assert len(src.calls) == 1


def test_sequential_reads_verify_cached_chunks_ahead(go_reference: Path, tmp_path: Path) -> None:
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
    assert layer2.read(ino, 0, 10) == data[:10]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and layer2.read_nowait(ino, 0, 300_000) is None:
        time.sleep(0.01)
    got = layer2.read_nowait(ino, 0, 300_000)  # chunks 1.. verified in the background
    assert got is not None and bytes(got) == data
    assert len(src.calls) == 1
