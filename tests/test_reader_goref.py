"""The reader against blobs written by the Go reference library (tests/goref.py: the session
builds them with our estargz-peer from Debian's stargz-snapshotter 0.12)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from layerstore.estargz.constants import OPAQUE_XATTRS
from layerstore.estargz.reader import EStargzReader, decode_chunk, tail_fetch_size
from layerstore.source import BytesSource, FileSource

BLOBS = ("ref-small", "ref-chunked-64k", "ref-prioritized")


def _meta(ref: Path, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((ref / f"{name}.json").read_text())
    return out


def _tar_members(ref: Path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    out: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    with tarfile.open(ref / "small.tar") as tf:
        for m in tf.getmembers():
            data = b""
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                data = f.read()
            out[m.name.rstrip("/")] = (m, data)
    return out


@pytest.fixture(params=BLOBS)
def blob(request: pytest.FixtureRequest, go_reference: Path) -> tuple[str, Path]:
    return str(request.param), go_reference


def _open(ref: Path, name: str) -> EStargzReader:
    meta = _meta(ref, name)
    return EStargzReader.open(
        FileSource(ref / f"{name}.esgz"), expected_toc_digest=meta["tocDigest"]
    )


def test_toc_digest_blob_digest_and_diffid(blob: tuple[str, Path]) -> None:
    name, ref = blob
    meta = _meta(ref, name)
    raw = (ref / f"{name}.esgz").read_bytes()
    assert len(raw) == meta["size"]
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == meta["digest"]
    plain = gzip.decompress(raw)
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == meta["diffID"]
    r = _open(ref, name)
    assert r.toc_digest == meta["tocDigest"]
    assert r.footer_size == 51 and not r.legacy
    assert 0 < r.toc_offset < len(raw)


def test_every_chunk_verifies(blob: tuple[str, Path]) -> None:
    name, ref = blob
    r = _open(ref, name)
    raw = (ref / f"{name}.esgz").read_bytes()
    chunks = list(r.index.all_chunks())
    assert chunks
    for c in chunks:
        assert c.offset < c.compressed_end <= r.toc_offset
        data = decode_chunk(raw[c.offset : c.compressed_end], c)
        assert len(data) == c.chunk_size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == c.digest
        assert r.read_chunk(c) == data
    if name == "ref-chunked-64k":
        ino = r.index.find("app/data.bin")
        assert ino is not None
        cs = r.index.chunks(ino)
        assert [c.chunk_offset for c in cs] == [0, 65536, 131072, 196608, 262144]
        assert [c.chunk_size for c in cs] == [65536] * 4 + [300000 - 262144]
        assert r.index.chunk_at(ino, 0) == 0
        assert r.index.chunk_at(ino, 65535) == 0
        assert r.index.chunk_at(ino, 65536) == 1
        assert r.index.chunk_at(ino, 299999) == 4
        with pytest.raises(ValueError):
            r.index.chunk_at(ino, 300000)


def test_files_and_metadata_equal_small_tar(blob: tuple[str, Path]) -> None:
    name, ref = blob
    r = _open(ref, name)
    idx = r.index
    members = _tar_members(ref)
    for path, (m, data) in members.items():
        base = os.path.basename(path)
        parent = os.path.dirname(path)
        if base == ".wh..wh..opq":
            assert idx.find(path) is None
            pino = idx.find(parent)
            assert pino is not None
            for x in OPAQUE_XATTRS:
                assert idx.xattrs(pino)[x] == b"y"
            continue
        if base.startswith(".wh."):
            assert idx.find(path) is None
            ino = idx.find(f"{parent}/{base[4:]}")
            assert ino is not None
            a = idx.getattr(ino)
            assert a.mode == stat.S_IFCHR and a.rdev == 0 and a.uid == 0 and a.gid == 0
            continue
        ino = idx.find(path)
        assert ino is not None, path
        a = idx.getattr(ino)
        assert a.mtime_ns == int(m.mtime) * 10**9
        assert stat.S_IMODE(a.mode) == m.mode & 0o7777
        assert (a.uid, a.gid) == (m.uid, m.gid)
        if m.isdir():
            assert stat.S_ISDIR(a.mode)
        elif m.isreg():
            assert stat.S_ISREG(a.mode)
            assert a.size == m.size == len(data)
            assert r.read_file(path) == data
        elif m.islnk():
            target = idx.find(m.linkname)
            assert target == ino  # one inode
            assert a.nlink == 2
            assert r.read_file(path) == members[m.linkname][1]
        elif m.issym():
            assert stat.S_ISLNK(a.mode)
            assert idx.readlink(ino) == m.linkname
            assert a.size == len(m.linkname)
        elif m.ischr():
            assert stat.S_ISCHR(a.mode)
            assert a.rdev == os.makedev(m.devmajor, m.devminor)
        elif m.isfifo():
            assert stat.S_ISFIFO(a.mode)
        else:  # pragma: no cover
            pytest.fail(f"unexpected member {m.name}")
        want_x = {
            k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
            for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        got_x = {k: v for k, v in idx.xattrs(ino).items() if k not in OPAQUE_XATTRS}
        assert got_x == want_x, path
    assert idx.find("var/x") is not None
    assert idx.xattrs(idx.find("var/x") or 0) == {"user.k": b"v"}


def test_overlay_view_of_small_tar(blob: tuple[str, Path]) -> None:
    name, ref = blob
    idx = _open(ref, name).index
    root = idx.root_ino
    assert root == 1
    assert [n for n, _ in idx.readdir(root)] == ["app", "etc", "var"]  # landmarks hidden
    app = idx.lookup(root, "app")
    assert app is not None
    assert [n for n, _ in idx.readdir(app)] == ["data.bin", "empty", "hard", "link", "main.py"]
    etc = idx.find("etc")
    assert etc is not None
    assert [n for n, _ in idx.readdir(etc)] == ["removed"]
    assert idx.lookup(etc, ".wh.removed") is None
    var = idx.find("var")
    assert var is not None
    assert [n for n, _ in idx.readdir(var)] == ["pipe", "tty", "x"]
    assert idx.xattrs(var) == {k: b"y" for k in OPAQUE_XATTRS}
    assert idx.xattrs(app) == {}
    # inode numbers: 1..N, stable across two parses of the same TOC
    inos = set()
    stack = [root]
    while stack:
        d = stack.pop()
        inos.add(d)
        for _, c in idx.readdir(d):
            inos.add(c)
            if idx.is_dir(c):
                stack.append(c)
    assert inos == set(range(1, idx.num_inodes + 1))
    again = _open(ref, name).index
    assert [(p, again.find(p)) for p in ("app/main.py", "var/tty", "etc/removed")] == [
        (p, idx.find(p)) for p in ("app/main.py", "var/tty", "etc/removed")
    ]
    assert idx.getattr(root).nlink == 2 + 3
    assert idx.total_file_bytes == 12 + 300000 + 6
    assert idx.uids() == {0, 1000} and idx.gids() == {0, 1000}


def test_landmarks(go_reference: Path) -> None:
    small = _open(go_reference, "ref-small").index
    assert small.has_no_prefetch_landmark
    assert small.prefetch_landmark_offset is None
    prio = _open(go_reference, "ref-prioritized")
    idx = prio.index
    assert not idx.has_no_prefetch_landmark
    lm = idx.prefetch_landmark_offset
    assert lm is not None
    names = [e.name for e in idx.entries()]
    assert names.index(".prefetch.landmark") > names.index("var/x") > names.index("app/main.py")
    # every prioritized file lies before the landmark, everything else after it
    for path in ("app/main.py", "var/x"):
        ino = idx.find(path)
        assert ino is not None
        assert all(c.compressed_end <= lm for c in idx.chunks(ino))
    ino = idx.find("app/data.bin")
    assert ino is not None
    assert all(c.offset > lm for c in idx.chunks(ino))
    # [0, landmark) really holds them: decode from a prefix of the blob only
    prefix = (go_reference / "ref-prioritized.esgz").read_bytes()[:lm]
    ino = idx.find("app/main.py")
    assert ino is not None
    c = idx.chunks(ino)[0]
    assert decode_chunk(prefix[c.offset : c.compressed_end], c) == b"print('hi')\n"


def test_entries_round_trip_raw_toc(blob: tuple[str, Path]) -> None:
    """entries() reproduces the TOC JSON entries (names cleaned, defaults filled)."""
    import zlib

    name, ref = blob
    raw = (ref / f"{name}.esgz").read_bytes()
    r = _open(ref, name)
    plain = zlib.decompressobj(31).decompress(raw[r.toc_offset : len(raw) - r.footer_size])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        f = tf.extractfile("stargz.index.json")
        assert f is not None
        toc = json.loads(f.read())
    got = list(r.index.entries())
    assert len(got) == len(toc["entries"])
    for g, e in zip(got, toc["entries"]):
        assert g.name == e["name"].rstrip("/")
        assert g.type == e["type"]
        assert g.offset == e.get("offset")
        assert g.chunk_offset == e.get("chunkOffset", 0)
        assert g.chunk_size == e.get("chunkSize", 0)
        assert g.chunk_digest == e.get("chunkDigest", "")
        if e["type"] != "chunk":
            assert g.digest == e.get("digest", "")
            assert g.size == e.get("size", 0)
            assert g.mode == e.get("mode", 0)
            assert g.link_name == e.get("linkName", "")


def test_tail_hint_single_read_and_from_toc_bytes(go_reference: Path) -> None:
    raw = (go_reference / "ref-small.esgz").read_bytes()
    meta = _meta(go_reference, "ref-small")
    reads: list[tuple[int, int]] = []

    class Counting(BytesSource):
        def read_at(self, offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return super().read_at(offset, length)

    r = EStargzReader.open(Counting(raw), expected_toc_digest=meta["tocDigest"])
    assert len(reads) == 1  # the 64 KiB tail already held the TOC
    reads.clear()
    r2 = EStargzReader.open(Counting(raw), tail_hint=51)
    assert len(reads) == 2 and reads[0] == (len(raw) - 51, 51)
    assert reads[1] == (r2.toc_offset, len(raw) - 51 - r2.toc_offset)
    assert tail_fetch_size(10) == 10 and tail_fetch_size(10**9, 0) == 51
    member = raw[r.toc_offset : len(raw) - r.footer_size]
    r3 = EStargzReader.from_toc_bytes(
        BytesSource(raw), member, r.toc_offset, r.footer_size, meta["tocDigest"]
    )
    assert r3.toc_digest == meta["tocDigest"]
    assert r3.read_file("var/x") == b"xattr\n"
