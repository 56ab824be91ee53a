"""Issue 9, findings 4 (on-disk part) and 5, through the real daemon, FUSE mount and
``docker-registry``:

- chunk files altered on disk after they were read (and verified) once are never served: the
  reads answer the registry's bytes (fetched again), and an error event names each one;
- eight concurrent readers of eight files, each one 255 MiB chunk of zeros (a 2 MB image),
  keep the daemon's peak RSS (``VmHWM``) under 600 MB, and read the right bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import BuiltLayer, RegistryHTTP, image_config, write_image
from tests.image_util import convert
from tests.pack_util import locate
from tests.test_store_integration import (  # the module's registry and daemon helpers
    CHUNK,
    Registry,
    daemon,
    drop_page_cache,
    events,
    keydir,
    push_edge_image,
    read_range,
    timed,
)
from tests.test_store_integration import pytestmark as _integration_marks

pytestmark = list(_integration_marks)

MiB = 1 << 20


@pytest.fixture(scope="module")
def live_reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("cache-registry"))
    r.start()
    yield r
    r.stop()


def _chunk_place(d: Any, digest: str) -> tuple[Path, int, int] | None:
    """``(pack, offset, size)`` of a chunk in the daemon's cache (None: not written yet)."""
    root = Path(d.root)
    if not (root / "cache.key").exists():
        return None
    return locate(root / "cache", root / "cache.key", digest)


def _wait_for(pred: Any, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- finding 4: chunk files altered on disk after their verification ------------------------


def test_altered_cache_files_are_never_served(live_reg: Registry, tmp_path: Path) -> None:
    img = push_edge_image(live_reg, tmp_path, "edge/altered", seed=11)
    content = {m.name: m.data for m in img.members}["data/big.bin"]
    index = img.index()
    chunks = index.chunks(index.find("data/big.bin"))
    assert len(chunks) == 11
    victims = [chunks[i] for i in (1, 3, 5, 7)]
    assert len({c.digest for c in chunks}) == len(chunks)
    with daemon(tmp_path / "d", live_reg) as d:
        diff = keydir(d, img, img.digest) / "diff"
        # Read once: every chunk fetched, verified and written to the cache.
        assert timed(lambda: (diff / "data/big.bin").read_bytes()) == content
        _wait_for(lambda: all(_chunk_place(d, c.digest) is not None for c in victims), "the packs")
        time.sleep(0.3)  # the writer pool drops its in-memory copies once the packs are indexed
        altered: dict[int, bytes] = {}
        for n, c in enumerate(victims):
            place = _chunk_place(d, c.digest)
            assert place is not None
            f, at, size = place
            raw = f.read_bytes()
            good = raw[at : at + size]
            assert good == content[c.chunk_offset : c.chunk_offset + CHUNK]
            bad = bytes(b ^ 0x5A for b in good)  # same size, different bytes
            if n % 2 == 0:
                with open(f, "r+b") as out:  # in place: the daemon's open descriptor sees it
                    out.seek(at)
                    out.write(bad)
            else:
                tmp = f.with_name(f.name + ".x")  # a new file under the same name
                tmp.write_bytes(raw[:at] + bad + raw[at + size :])
                os.replace(tmp, f)
            altered[c.chunk_offset] = bad
        drop_page_cache()
        for c in victims:
            got = timed(lambda c=c: read_range(diff / "data/big.bin", c.chunk_offset, CHUNK))
            assert got != altered[c.chunk_offset], f"altered bytes served at {c.chunk_offset}"
            assert got == content[c.chunk_offset : c.chunk_offset + CHUNK]
        drop_page_cache()
        assert timed(lambda: (diff / "data/big.bin").read_bytes()) == content
        evs = events(d)
    flagged = [e for e in evs if e["event"] == "chunk_cache_entry_altered"]
    # The files written in place are caught by the tag check; the ones replaced by a new file
    # are caught too unless the daemon still had the old file open (then it read the old,
    # verified bytes, which is as good).
    assert {e["digest"] for e in flagged} >= {victims[0].digest, victims[2].digest}
    assert all(e["level"] == "error" for e in flagged)
    assert {e["digest"] for e in flagged} <= {c.digest for c in victims}


# --- finding 5: eight readers of eight 255 MiB chunks ----------------------------------------

BIG = 255 * MiB
FILES = 8
RSS_BOUND_MB = 600  # MiB


class _Zeros(io.RawIOBase):
    """*size* bytes: zeros, then an 8-byte tag (each file a distinct chunk digest)."""

    def __init__(self, size: int, tag: bytes) -> None:
        self.left = size
        self.tail = tag
        self.size = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        pos = self.size - self.left
        piece = bytearray(n)
        tail_at = self.size - len(self.tail)
        if pos + n > tail_at:
            lo = max(pos, tail_at)
            piece[lo - pos : n] = self.tail[lo - tail_at : pos + n - tail_at]
        b[:n] = piece
        self.left -= n
        return n


class _HashingWriter(io.RawIOBase):
    def __init__(self, out: Any) -> None:
        self.out = out
        self.h = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.out.write(b)
        return len(b)


def _expected(tag: bytes) -> str:
    h = hashlib.sha256()
    zeros = bytes(16 * MiB)
    left = BIG - len(tag)
    while left:
        n = min(left, len(zeros))
        h.update(zeros[:n])
        left -= n
    h.update(tag)
    return h.hexdigest()


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024  # kB -> MB (MiB)
    raise AssertionError(f"no {key} for {pid}")


@pytest.mark.timeout(900)
def test_eight_readers_of_255mib_chunks_bounded_memory(live_reg: Registry, tmp_path: Path) -> None:
    tags = [f"file-{n:03d}".encode()[:8] for n in range(FILES)]
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=6, mtime=0) as z:
        hashing = _HashingWriter(z)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for n, tag in enumerate(tags):
                ti = tarfile.TarInfo(f"big/{n}.bin")
                ti.size, ti.mode, ti.mtime = BIG, 0o644, 1_600_000_000
                tar.addfile(ti, io.BufferedReader(_Zeros(BIG, tag), 4 * MiB))
    layer = BuiltLayer(gz.getvalue(), "sha256:" + hashing.h.hexdigest())
    assert len(layer.blob) < 4 * MiB
    layout = tmp_path / "layout"
    write_image(layout, "src", [layer], image_config([layer.diff_id]))
    convert(
        f"oci:{layout}:src",
        f"docker://{live_reg.host}/big/zeros:v1",
        "--chunk-size",
        str(256 * MiB),
        "--dest-tls-verify=false",
    )
    manifest = json.loads(RegistryHTTP(live_reg.host).manifest("big/zeros", "v1")[0])
    (desc,) = manifest["layers"]
    assert desc["size"] < 8 * MiB  # a small image
    want = [_expected(tag) for tag in tags]

    with daemon(tmp_path / "d", live_reg) as d:
        assert d.proc is not None
        pid = d.proc.pid
        diff = keydir(d, _Ref(f"{live_reg.host}/big/zeros:v1"), desc["digest"]) / "diff"
        timed(lambda: os.stat(diff / "big/0.bin"))
        before = _vm(pid, "VmHWM")
        got: dict[int, str] = {}
        errors: list[BaseException] = []

        def reader(n: int) -> None:
            try:
                h = hashlib.sha256()
                with open(diff / f"big/{n}.bin", "rb", buffering=0) as f:
                    while True:
                        piece = f.read(MiB)
                        if not piece:
                            break
                        h.update(piece)
                got[n] = h.hexdigest()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(FILES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(800)
        assert not any(t.is_alive() for t in threads), "readers still running"
        peak = _vm(pid, "VmHWM")
        assert not errors, errors
        assert [got.get(n) for n in range(FILES)] == want
        evs = events(d)
    print(f"daemon VmHWM: {before} MiB before the readers, {peak} MiB after")
    assert peak < RSS_BOUND_MB, f"daemon peak RSS {peak} MiB (bound {RSS_BOUND_MB} MiB)"
    assert not [e for e in evs if e.get("level") == "error"]


class _Ref:
    """What :func:`keydir` needs of an image: its reference."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
