"""The chunk cache's pack files: batching, atomic publication, the authenticated index, block
tags trusted across restarts, eviction per pack, recovery at start-up, the key file."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from layerstore.runtime import packfile
from layerstore.runtime.blocktags import BLOCK
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.packfile import INDEX_ENTRY, TRAILER_SIZE, PackKeys, read_index
from tests.pack_util import data_bytes, pack_files


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class GatedCache(ChunkCache):
    """The pack writer waits for ``gate``: what ``put_async`` gets piles up as pending."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.batches: list[int] = []

    def _write_pack(self, batch: list[tuple[str, bytes]]) -> bool:
        self.gate.wait(30)
        self.batches.append(len(batch))
        return super()._write_pack(batch)


def place(c: ChunkCache, data: bytes) -> tuple[Path, int, int]:
    loc = c.locate(dg(data))
    assert loc is not None
    return loc


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


def batch_of(tmp_path: Path, n: int, size: int = 3000, **kw: Any) -> tuple[ChunkCache, list[bytes]]:
    """*n* chunks written by put_async as one pack (the writer held back until all are
    pending, with one writer thread)."""
    c = GatedCache(tmp_path, 1 << 30, writer_threads=1, **kw)
    blobs = [os.urandom(size) for _ in range(n)]
    for b in blobs:
        c.put_async(dg(b), b, verified=True)
    c.gate.set()
    assert c.flush(10)
    return c, blobs


def test_pending_chunks_are_written_together(tmp_path: Path) -> None:
    c, blobs = batch_of(tmp_path, 50)
    # The writer took the first chunk at once, then everything that piled up meanwhile.
    assert c.batches == [1, 49]
    assert len(pack_files(tmp_path)) == 2 and len(c) == 50
    assert all(c.read(dg(b), 100, 50) == b[100:150] for b in blobs)
    assert c.total_bytes == 50 * 3000 == sum(data_bytes(p) for p in pack_files(tmp_path))
    # Packs are bounded: a batch is cut at max_pack_bytes (but holds at least one chunk).
    c2, blobs2 = batch_of(tmp_path / "small", 10, size=1000, max_pack_bytes=2500)
    assert c2.batches == [1, 2, 2, 2, 2, 1]
    assert all(c2.get(dg(b)) == b for b in blobs2)
    c.close()
    c2.close()


def test_pending_over_the_bound_is_written_by_the_caller(tmp_path: Path) -> None:
    c = GatedCache(tmp_path, 1 << 30, writer_threads=1, max_pending_bytes=10_000)
    blobs = [os.urandom(3000) for _ in range(8)]
    c.gate.set()  # (the writer may or may not keep up: either way nothing waits forever)
    for b in blobs:
        c.put_async(dg(b), b, verified=True)
    assert c.flush(10)
    assert all(c.get(dg(b)) == b for b in blobs)
    assert c.snapshot().pending_bytes == 0
    c.close()


def test_restart_trusts_the_packs_without_rehashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, blobs = batch_of(tmp_path, 20, size=3 * BLOCK + 17)
    c.close()

    def no_sha256(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a chunk was re-hashed after the restart")

    digests = [dg(b) for b in blobs]
    c2 = ChunkCache(tmp_path, 1 << 30)
    monkeypatch.setattr(hashlib, "sha256", no_sha256)
    assert len(c2) == 20 and c2.total_bytes == 20 * (3 * BLOCK + 17)
    for b, d in zip(blobs, digests):
        assert c2.read(d, BLOCK - 3, BLOCK + 10) == b[BLOCK - 3 : 2 * BLOCK + 7]
        assert c2.get(d) == b
    c2.close()


def test_tampered_chunk_in_a_pack_is_caught_and_its_neighbours_still_served(
    tmp_path: Path,
) -> None:
    c, blobs = batch_of(tmp_path, 3, size=2 * BLOCK)
    c.close()
    c = ChunkCache(tmp_path, 1 << 30)
    path, at, _ = place(c, blobs[1])
    assert place(c, blobs[2])[0] == path  # the batch after the first chunk
    flip(path, at + BLOCK + 5)
    with capture_logs() as logs:
        assert c.read(dg(blobs[1]), BLOCK, 10) is None
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["chunk_cache_entry_altered"]
    assert dg(blobs[1]) not in c
    assert c.read(dg(blobs[2]), 0, 2 * BLOCK) == blobs[2] and path.exists()
    # Bytes of another chunk moved over it: caught too (tags are per chunk and block).
    other_at = place(c, blobs[2])[1]
    raw = bytearray(path.read_bytes())
    raw[other_at : other_at + BLOCK] = blobs[0][:BLOCK]
    path.write_bytes(bytes(raw))  # (a new file under the same name)
    assert c.read(dg(blobs[2]), 0, 10) is None
    # The pack goes when nothing in it is served any more; the other pack is untouched.
    assert not path.exists() and c.get(dg(blobs[0])) == blobs[0]
    c.close()


def test_single_chunk_pack_goes_with_its_chunk(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 30)
    data = os.urandom(5000)
    c.put(dg(data), data)
    path, at, _ = place(c, data)
    flip(path, at + 10)
    assert c.get(dg(data)) is None
    assert not path.exists() and c.total_bytes == 0 and c.snapshot().packs == 0
    c.close()


@pytest.mark.parametrize(
    "damage", ["index offset", "index digest", "tags", "trailer size", "mac", "truncated"]
)
def test_pack_with_a_damaged_tail_is_dropped_at_start(tmp_path: Path, damage: str) -> None:
    c, blobs = batch_of(tmp_path, 4, size=2000)
    c.close()
    big = max(pack_files(tmp_path), key=data_bytes)
    keep = [p for p in pack_files(tmp_path) if p != big]
    raw = bytearray(big.read_bytes())
    data_size, count = 3 * 2000, 3
    index_at = data_size
    tags_at = index_at + count * INDEX_ENTRY.size
    if damage == "index offset":  # point a digest at another chunk's bytes
        raw[index_at + 32] ^= 0x01
    elif damage == "index digest":
        raw[index_at] ^= 0x01
    elif damage == "tags":
        raw[tags_at] ^= 0x01
    elif damage == "trailer size":
        raw[len(raw) - TRAILER_SIZE + 16] ^= 0x01
    elif damage == "mac":
        raw[-1] ^= 0x01
    else:  # a crash (power loss) after the rename, before the data reached the disk
        del raw[len(raw) // 2 :]
    big.write_bytes(bytes(raw))
    with capture_logs() as logs:
        c2 = ChunkCache(tmp_path, 1 << 30)
    (ev,) = [e for e in logs if e["event"] == "chunk_cache_packs_dropped"]
    assert ev["packs"] == 1 and ev["log_level"] == "warning"
    assert not big.exists() and pack_files(tmp_path) == keep
    assert len(c2) == 1 and c2.total_bytes == 2000
    assert sum(c2.get(dg(b)) is not None for b in blobs) == 1
    c2.close()


def test_crash_while_writing_a_pack_leaves_nothing_used(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 30)
    data = os.urandom(3 * BLOCK)

    def dies(write: Any) -> None:
        write(data[:BLOCK])
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        c.store_stream(dg(data), len(data), dies)
    assert list((tmp_path / "packs").iterdir()) == []  # the temporary file is gone
    # A process killed mid-write leaves its temporary file: removed at the next start.
    (tmp_path / "packs" / ".tmp-abc.partial").write_bytes(data[:BLOCK])
    c.close()
    c2 = ChunkCache(tmp_path, 1 << 30)
    assert list((tmp_path / "packs").iterdir()) == [] and len(c2) == 0
    c2.close()


def test_eviction_removes_whole_packs_least_recently_used_first(tmp_path: Path) -> None:
    c = GatedCache(tmp_path, 30_000, writer_threads=1)
    c.gate.set()
    groups: list[list[bytes]] = []
    for _ in range(3):
        group = [os.urandom(2000) for _ in range(4)]
        c.gate.clear()
        for b in group:
            c.put_async(dg(b), b, verified=True)
        c.gate.set()
        assert c.flush(10)
        groups.append(group)
    assert c.get(dg(groups[0][3])) == groups[0][3]  # the first group's last pack: young again
    snap = c.snapshot()
    assert snap.entries == 12 and snap.bytes == 24_000
    more = [os.urandom(4000) for _ in range(3)]
    for b in more:
        c.put(dg(b), b)  # 12,000 more: 36,000 > 30,000
    assert c.total_bytes <= 30_000
    # the oldest pack (group 0's first chunk alone) went; then group 1's packs
    assert dg(groups[0][0]) not in c and dg(groups[0][3]) in c
    assert all(dg(b) in c for b in more)
    assert c.snapshot().evicted >= 1
    assert sum(data_bytes(p) for p in pack_files(tmp_path)) == c.total_bytes
    c.close()


def test_a_batch_larger_than_the_cache_does_not_overfill_it(tmp_path: Path) -> None:
    """Pending chunks are written together into one pack; when they add up to more than the
    whole cache, that pack is not kept past the limit (its chunks are fetched again)."""
    c = GatedCache(tmp_path, 10_000, writer_threads=1)
    c.gate.clear()
    batch = [os.urandom(4000) for _ in range(4)]  # 16,000 > 10,000, each chunk fits
    for b in batch:
        c.put_async(dg(b), b, verified=True)
    c.gate.set()
    assert c.flush(10)
    assert c.total_bytes <= 10_000
    assert sum(data_bytes(p) for p in pack_files(tmp_path)) == c.total_bytes
    c.put(dg(batch[0]), batch[0])  # still usable afterwards
    assert c.get(dg(batch[0])) == batch[0]
    c.close()


def test_hits_survive_a_restart_through_pack_mtimes(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 30)
    blobs = [os.urandom(1000) for _ in range(4)]
    for i, b in enumerate(blobs):
        c.put(dg(b), b)
        os.utime(place(c, b)[0], (1_000_000 + i, 1_000_000 + i))
    c.close()
    c = ChunkCache(tmp_path, 1 << 30)
    assert c.get(dg(blobs[0])) == blobs[0]  # touches its pack (last touched long ago)
    c.close()
    c = ChunkCache(tmp_path, 2000)  # keeps the two youngest packs
    assert dg(blobs[0]) in c and dg(blobs[3]) in c
    assert dg(blobs[1]) not in c and dg(blobs[2]) not in c
    c.close()


def test_key_file_is_private_and_replaced_when_exposed(tmp_path: Path) -> None:
    key = tmp_path / "state" / "cache.key"
    key.parent.mkdir()
    c = ChunkCache(tmp_path / "c", 1 << 30, key_path=key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    data = os.urandom(3000)
    c.put(dg(data), data)
    c.close()
    assert not (tmp_path / "c" / "key").exists()
    c = ChunkCache(tmp_path / "c", 1 << 30, key_path=key)
    assert c.get(dg(data)) == data
    c.close()
    old = key.read_bytes()
    os.chmod(key, 0o644)  # others could have read it: not trusted any more
    with capture_logs() as logs:
        c = ChunkCache(tmp_path / "c", 1 << 30, key_path=key)
    assert key.read_bytes() != old and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "chunk_cache_key_created" in [e["event"] for e in logs]
    assert len(c) == 0 and pack_files(tmp_path / "c") == []
    c.close()


def test_a_pack_forged_with_another_key_is_not_used(tmp_path: Path) -> None:
    data = os.urandom(3000)
    forged_data = os.urandom(3000)
    c = ChunkCache(tmp_path, 1 << 30)
    c.close()
    # Someone without the key writes a well-formed pack claiming data's digest.
    keys = PackKeys.derive(os.urandom(32))
    claim = packfile.PackEntry(dg(data)[7:], 0, 3000, b"\0" * 16)
    (tmp_path / "packs" / ("ab" * 16)).write_bytes(
        forged_data + packfile.encode_tail(keys, [claim], 3000)
    )
    c = ChunkCache(tmp_path, 1 << 30)
    assert dg(data) not in c and pack_files(tmp_path) == []
    c.close()


def test_not_persistent_empties_the_cache_at_start(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 1 << 30, persistent=False)
    data = os.urandom(3000)
    c.put(dg(data), data)
    assert c.get(dg(data)) == data
    c.close()
    assert not (tmp_path / "key").exists()
    c = ChunkCache(tmp_path, 1 << 30, persistent=False)
    assert len(c) == 0 and pack_files(tmp_path) == []
    c.close()


def test_the_old_one_file_per_chunk_layout_is_removed(tmp_path: Path) -> None:
    data = os.urandom(3000)
    old = tmp_path / "chunks" / dg(data)[7:9]
    old.mkdir(parents=True)
    (old / dg(data)[7:]).write_bytes(data)
    c = ChunkCache(tmp_path, 1 << 30)
    assert dg(data) not in c and not (tmp_path / "chunks").exists()
    c.close()
    deadline = threading.Event()
    for _ in range(200):  # removed by a background thread
        if not [p for p in tmp_path.iterdir() if p.name.startswith(".old-")]:
            break
        deadline.wait(0.05)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".old-")]


def test_read_index_rejects_what_does_not_add_up(tmp_path: Path) -> None:
    keys = PackKeys.derive(b"k" * 32)
    data = os.urandom(100)
    entry = packfile.PackEntry(dg(data)[7:], 0, 100, b"t" * 16)
    good = tmp_path / "good"
    good.write_bytes(data + packfile.encode_tail(keys, [entry], 100))
    (got,) = read_index(good, keys).entries
    assert got == entry
    for name, raw in {
        "empty": b"",
        "short": b"x" * 10,
        "no magic": b"\0" * 200,
        "extra byte": data + b"\0" + packfile.encode_tail(keys, [entry], 100),
    }.items():
        p = tmp_path / name.replace(" ", "-")
        p.write_bytes(raw)
        with pytest.raises(packfile.PackError):
            read_index(p, keys)
    with pytest.raises(packfile.PackError):
        read_index(good, PackKeys.derive(b"K" * 32))


def _drop_from_page_cache(path: str | os.PathLike[str], offset: int, size: int) -> None:
    """Drop *path*'s pages from the page cache until [offset, offset+size) is out of it.

    The file is read whole first, so that no read-ahead the kernel started earlier is still in
    flight (pages under I/O are not dropped: this made the test flaky on a loaded machine);
    dirty pages are written back first for the same reason."""
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
        for _ in range(50):
            os.sync()
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                os.preadv(f.fileno(), [bytearray(size)], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                return  # out of the page cache
            time.sleep(0.05)
    raise AssertionError(f"the kernel kept {path}'s pages in the page cache")


def test_read_nowait_answers_from_the_page_cache_only(tmp_path: Path) -> None:
    data = os.urandom(4 * BLOCK)
    c = ChunkCache(tmp_path, 1 << 30)
    c.put(dg(data), data)
    c.close()
    c = ChunkCache(tmp_path, 1 << 30)
    assert c.read_nowait(dg(data), 0, 10) is None  # its pack is not open yet
    assert c.read(dg(data), 0, 10) == data[:10]  # opens it (a thread would)
    got = c.read_nowait(dg(data), BLOCK - 5, BLOCK)
    assert got is not None and bytes(got) == data[BLOCK - 5 : 2 * BLOCK - 5]
    assert c.read_nowait(dg(data), len(data), 10) is None  # at the end: the thread path
    path, at, _size = place(c, data)
    _drop_from_page_cache(path, at + 2 * BLOCK, 100)  # no waiting for the disk here
    assert c.read_nowait(dg(data), 2 * BLOCK, 100) is None
    assert c.read(dg(data), 2 * BLOCK, 100) == data[2 * BLOCK : 2 * BLOCK + 100]
    flip(path, at + 3 * BLOCK + 1)  # altered: never served, left to the thread path to report
    assert c.read_nowait(dg(data), 3 * BLOCK, 10) is None and dg(data) in c
    with capture_logs() as logs:
        assert c.read(dg(data), 3 * BLOCK, 10) is None
    assert "chunk_cache_entry_altered" in [e["event"] for e in logs]
    c.close()


def test_advise_soon_reads_ahead_once_per_chunk_off_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = [os.urandom(3000) for _ in range(3)]
    c = ChunkCache(tmp_path, 1 << 30)
    for b in blobs:
        c.put(dg(b), b)
    calls: list[tuple[str, int, int]] = []
    done = threading.Event()
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((threading.current_thread().name, offset, length))
        real(fd, offset, length, advice)
        if len(calls) == 2:
            done.set()

    monkeypatch.setattr(os, "posix_fadvise", record)
    digests = [dg(b) for b in blobs[:2]] + [dg(b"not cached")]
    assert c.advise_soon(digests) == 2
    assert done.wait(10)
    assert all(name.startswith("chunk-cache-advise") for name, _, _ in calls)
    assert sorted((o, n) for _, o, n in calls) == [(0, 3000), (0, 3000)]
    assert c.advise_soon(digests) == 0 and c.advise([dg(blobs[2])]) == 1  # once per chunk
    c.close()
