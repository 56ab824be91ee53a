"""ChunkCache: content addressing, verification, atomic writes, LRU eviction, persistence."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from layerstore.errors import CacheError, VerificationError
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.packfile import PackKeys, read_index


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entry_path(root: Path, data: bytes) -> Path:
    """The pack file that holds *data* (found through the packs' authenticated indexes)."""
    return locate(root, data)[0]


def locate(root: Path, data: bytes) -> tuple[Path, int, int]:
    h = hashlib.sha256(data).hexdigest()
    keys = PackKeys.derive((root / "key").read_bytes())
    for p in (root / "packs").iterdir():
        if p.name.startswith(".tmp-"):
            continue
        for e in read_index(p, keys).entries:
            if e.hexd == h:
                return p, e.offset, e.size
    raise AssertionError(f"{h} is in no pack")


def pack_files(root: Path) -> list[Path]:
    return [p for p in (root / "packs").iterdir() if not p.name.startswith(".tmp-")]


def test_put_get_roundtrip_and_miss(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 20)
    data = b"hello world" * 100
    assert c.get(dg(data)) is None
    assert c.put(dg(data), data)
    assert c.get(dg(data)) == data
    assert dg(data) in c
    assert c.read(dg(data), 6, 5) == b"world"
    assert c.read(dg(data), len(data) - 3, 100) == data[-3:]
    assert c.read(dg(data), len(data) + 10, 5) == b""
    assert c.stats()["hits"] >= 3


def test_put_refuses_wrong_digest(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 20)
    with pytest.raises(VerificationError):
        c.put(dg(b"a"), b"b")
    assert c.get(dg(b"a")) is None
    assert not any((tmp_path / "packs").iterdir())


def test_invalid_key(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 20)
    with pytest.raises(CacheError):
        c.get("sha256:../../etc/passwd")
    with pytest.raises(CacheError):
        c.put("md5:abc", b"")


def test_persistence_across_instances(tmp_path: Path) -> None:
    data = os.urandom(5000)
    c1 = ChunkCache(tmp_path, 1 << 20)
    c1.put(dg(data), data)
    c1.close()
    c2 = ChunkCache(tmp_path, 1 << 20)
    assert len(c2) == 1
    assert c2.total_bytes == 5000
    assert c2.read(dg(data), 100, 10) == data[100:110]
    assert c2.get(dg(data)) == data


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_entry_detected_after_restart(tmp_path: Path, damage: str) -> None:
    data = os.urandom(5000)
    ChunkCache(tmp_path, 1 << 20).put(dg(data), data)
    p = entry_path(tmp_path, data)
    raw = bytearray(p.read_bytes())
    if damage == "flip":
        raw[10] ^= 0xFF
    else:
        del raw[100:]
    p.write_bytes(bytes(raw))
    c = ChunkCache(tmp_path, 1 << 20)
    # A flipped byte is caught by its block's tag; a truncated pack does not open.
    assert c.read(dg(data), 0, 10) is None
    assert not p.exists()
    assert dg(data) not in c
    assert c.total_bytes == 0


def test_truncated_after_verification_is_a_miss(tmp_path: Path) -> None:
    data = os.urandom(5000)
    c = ChunkCache(tmp_path, 1 << 20)
    c.put(dg(data), data)
    p = entry_path(tmp_path, data)
    p.write_bytes(data[:10])  # size mismatch with what the cache recorded
    assert c.get(dg(data)) is None
    assert dg(data) not in c


def test_lru_eviction_keeps_size_under_limit(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 10_000)
    blobs = [os.urandom(3000) for _ in range(10)]
    for i, b in enumerate(blobs):
        c.put(dg(b), b)
        if i >= 1:
            assert c.get(dg(blobs[0])) == blobs[0]  # keep the first one hot
        assert c.total_bytes <= 10_000
    assert dg(blobs[0]) in c  # recently used survives
    assert dg(blobs[-1]) in c  # newest survives
    assert dg(blobs[1]) not in c  # the least recently used went first
    # one pack per put(); the chunk bytes in them are what is counted
    packs = pack_files(tmp_path)
    assert len(packs) == len(c) and sum(locate(tmp_path, b)[2] for b in blobs if dg(b) in c) == (
        c.total_bytes
    )
    assert c.total_bytes <= 10_000


def test_rebuild_orders_by_mtime_and_evicts_on_smaller_limit(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 20)
    blobs = [os.urandom(1000) for _ in range(5)]
    paths = []
    for i, b in enumerate(blobs):
        c.put(dg(b), b)
        paths.append(entry_path(tmp_path, b))
        os.utime(paths[-1], (1_000_000 + i, 1_000_000 + i))
    c.close()
    c2 = ChunkCache(tmp_path, 2500)
    assert c2.total_bytes <= 2500
    assert dg(blobs[4]) in c2 and dg(blobs[3]) in c2
    assert dg(blobs[0]) not in c2 and not paths[0].exists()


def test_too_large_entry_not_cached(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 100)
    data = b"x" * 101
    assert c.put(dg(data), data) is False
    assert c.get(dg(data)) is None


def test_atomic_writes_no_partial_files(tmp_path: Path) -> None:
    """Concurrent readers never see a partial pack; stale temp files vanish on open."""
    c = ChunkCache(tmp_path, 1 << 30)
    blobs = [os.urandom(256 * 1024) for _ in range(16)]
    stop = threading.Event()
    bad: list[str] = []
    keys = PackKeys.derive((tmp_path / "key").read_bytes())

    def watcher() -> None:
        while not stop.is_set():
            for p in pack_files(tmp_path):
                try:
                    index = read_index(p, keys)
                    raw = p.read_bytes()
                except FileNotFoundError:
                    continue
                except Exception as e:  # a pack visible under its name must be whole
                    bad.append(f"{p.name}: {e}")
                    continue
                for e in index.entries:
                    got = raw[e.offset : e.offset + e.size]
                    if hashlib.sha256(got).hexdigest() != e.hexd:
                        bad.append(p.name)

    t = threading.Thread(target=watcher)
    t.start()
    try:
        threads = [
            threading.Thread(target=lambda b=b: c.put(dg(b), b))  # type: ignore[misc]
            for b in blobs
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        stop.set()
        t.join()
    assert not bad
    assert all(c.get(dg(b)) == b for b in blobs)
    # A crash mid-write leaves a temp file: it is never served and is removed on open.
    shard = entry_path(tmp_path, blobs[0]).parent
    (shard / ".tmp-crashed.partial").write_bytes(b"partial")
    c2 = ChunkCache(tmp_path, 1 << 30)
    assert not (shard / ".tmp-crashed.partial").exists()
    assert len(c2) == 16


def test_concurrent_reads_with_fd_lru(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 30, max_open_files=2)
    blobs = [os.urandom(4096) for _ in range(8)]
    for b in blobs:
        c.put(dg(b), b)
    errors: list[str] = []

    def worker(seed: int) -> None:
        for i in range(300):
            b = blobs[(seed + i) % len(blobs)]
            off = (i * 37) % 4000
            if c.read(dg(b), off, 64) != b[off : off + 64]:
                errors.append("mismatch")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    c.close()


def test_toc_store(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1000)
    assert c.get_toc("abc-def") is None
    c.put_toc("abc-def", b"x" * 5000)  # not limited by the chunk budget
    assert ChunkCache(tmp_path, 1000).get_toc("abc-def") == b"x" * 5000
    with pytest.raises(CacheError):
        c.get_toc("../x")
    c.remove_toc("abc-def")
    assert c.get_toc("abc-def") is None
    # Image resolutions of older versions (now in layerstore.runtime.resolutions) go on open;
    # temp files of the shared atomic write (".tmp-*.partial") too.
    c.put_toc("resolved-" + "a" * 64, b"{}")
    c.put_toc("abc-def", b"kept")
    (tmp_path / "toc" / ".tmp-x.partial").write_bytes(b"partial")
    ChunkCache(tmp_path, 1000)
    assert sorted(p.name for p in (tmp_path / "toc").iterdir()) == ["abc-def"]


def test_toc_store_budget(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1000, max_toc_bytes=10_000)
    for i in range(5):
        c.put_toc(f"t{i}", bytes([i]) * 3000)
        os.utime(tmp_path / "toc" / f"t{i}", (1_000_000 + i, 1_000_000 + i))
    names = sorted(p.name for p in (tmp_path / "toc").iterdir())
    assert names == ["t2", "t3", "t4"]
    c2 = ChunkCache(tmp_path, 1000, max_toc_bytes=7000)
    assert c2.get_toc("t2") is not None  # now the youngest in use
    c2.put_toc("t5", b"z" * 3000)
    assert sorted(p.name for p in (tmp_path / "toc").iterdir()) == ["t2", "t5"]
    c2.put_toc("huge", b"z" * 8000)  # over the whole budget: not stored
    assert c2.get_toc("huge") is None


def test_zero_size_cache_stores_nothing(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 0)
    data = b"abc"
    assert c.put(dg(data), data) is False
    c.put_async(dg(data), data)
    assert c.get(dg(data)) is None and dg(data) not in c
    with pytest.raises(ValueError):
        ChunkCache(tmp_path, -1)


def test_restart_serves_from_disk_without_memory_copies(tmp_path: Path) -> None:
    """After a restart, entries are read from their packs (tags checked), never held whole in
    memory; a pending write is served from memory until its pack is in place."""
    data = os.urandom(300_000)
    c1 = ChunkCache(tmp_path, 1 << 30)
    c1.put(dg(data), data)
    c1.close()
    c = ChunkCache(tmp_path, 1 << 30)
    assert c.peek(dg(data), 0, 10) is None
    assert c.read(dg(data), 1000, 5000) == data[1000:6000]
    assert c.peek(dg(data), 0, 10) is None
    assert c.get(dg(data)) == data
    other = os.urandom(1000)
    c.put_async(dg(other), other, verified=True)
    assert c.read(dg(other), 10, 10) == other[10:20]
    assert c.flush(10)
    assert c.peek(dg(other), 0, 1) is None and c.read(dg(other), 10, 10) == other[10:20]
    c.close()


def test_concurrent_first_reads_of_one_entry(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    c1 = ChunkCache(tmp_path, 1 << 30)
    c1.put(dg(data), data)
    c1.close()
    c = ChunkCache(tmp_path, 1 << 30)
    results: list[bytes | None] = []
    lock = threading.Lock()

    def reader(off: int) -> None:
        got = c.read(dg(data), off, 4096)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=reader, args=(i * 4096,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r for r in results if r is not None) == sorted(
        data[i * 4096 : (i + 1) * 4096] for i in range(16)
    )
    assert len(results) == 16
