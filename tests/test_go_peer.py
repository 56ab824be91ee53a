"""Cross-implementation round trips with the Go reference library as a real peer.

Both ways, over random trees (the generator of ``test_writer_roundtrip``): our writer's blob is
opened by the Go reader (``estargz-peer verify``: TOC digest checked, every chunk of every
file verified against its ``chunkDigest`` by the library's verifier), and the Go writer's blob
(``estargz-peer build``: ``estargz.Build``) is opened by our reader (every chunk decoded and
verified). Entries, metadata and contents must equal the source tar's; prioritized files must
lie before ``.prefetch.landmark`` whichever side wrote them.

The Go side is Debian's containerd/stargz-snapshotter 0.12 (``peers/go/``, built by
``./run setup``). Known differences of that version, checked rather than hidden: it cannot
read ``innerOffset`` (packed) blobs and refuses them; it writes user and group names only when
they change per id, so names are not compared.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerstore.estargz.reader import EStargzReader, decode_chunk
from layerstore.estargz.toc import TOCEntry
from layerstore.estargz.writer import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    WriteResult,
    WriterOptions,
    write_estargz,
)
from layerstore.source import BytesSource
from testbed import pseudo_random
from testbed.gopeer import GoPeerError, GoPeerUnavailable, ensure_built, go_build, go_verify
from tests.goref import small_tar
from tests.test_writer_roundtrip import build_tar, trees

Tree = tuple[list[tarfile.TarInfo], dict[str, bytes], int]

_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@pytest.fixture(scope="module", autouse=True)
def _go_peers() -> None:
    try:
        ensure_built()
    except GoPeerUnavailable as exc:
        pytest.skip(f"the Go peers cannot be built here ({exc}); ./run setup installs them")


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scratch directory per test (hypothesis runs many examples in one)."""
    yield tmp_path_factory.mktemp("go-peer")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    return {
        k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
        for k, v in m.pax_headers.items()
        if k.startswith("SCHILY.xattr.")
    }


def _rfc3339_seconds(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def _write_ours(tar: bytes, opts: WriterOptions) -> tuple[bytes, WriteResult]:
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(tar), out, opts)  # type: ignore[arg-type]
    return out.getvalue(), res


def _implied_dirs(paths: list[str]) -> set[str]:
    out = set()
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            out.add("/".join(parts[:i]))
    return out


# --- our writer -> the Go reader ------------------------------------------------------------


def check_go_reads_ours(
    members: list[tarfile.TarInfo],
    contents: dict[str, bytes],
    chunk: int,
    prio: list[str],
    blob_path: Path,
    res: WriteResult,
) -> dict[str, Any]:
    """The Go reader's view of our blob equals the source tar; returns that view."""
    view = go_verify(blob_path, res.toc_digest)  # raises unless every chunk verifies
    assert view["tocDigest"] == res.toc_digest
    assert view["diffID"] == res.diff_id
    got = {e["path"]: e for e in view["entries"]}
    names = [m.name.rstrip("/") for m in members]
    landmark = PREFETCH_LANDMARK if prio else NO_PREFETCH_LANDMARK
    other = NO_PREFETCH_LANDMARK if prio else PREFETCH_LANDMARK
    assert landmark in got and other not in got
    assert got[landmark]["sha256"] == _sha(b"\x0f")
    assert set(got) - {landmark} - _implied_dirs(names) == set(names) - _implied_dirs(names)
    assert set(got) - {landmark} <= set(names) | _implied_dirs(names)
    for m in members:
        e = got[m.name.rstrip("/")]
        if m.islnk():
            target = got[m.linkname]
            assert e["hardlinkOf"] == m.linkname
            assert e["sha256"] == target["sha256"] == _sha(contents[m.linkname])
            continue
        assert e["type"] == _TYPES[m.type], m.name
        assert e["mode"] == m.mode
        assert (e["uid"], e["gid"]) == (m.uid, m.gid)
        assert _rfc3339_seconds(e["modtime"]) == m.mtime
        assert {k: base64.b64decode(v) for k, v in (e.get("xattrs") or {}).items()} == _xattrs(m)
        if m.isreg():
            data = contents[m.name]
            assert e["size"] == len(data)
            assert e["sha256"] == _sha(data)
            assert e.get("chunks", 0) == _ceil_div(len(data), chunk)
        elif m.issym():
            assert e["linkName"] == m.linkname
        elif m.ischr() or m.isblk():
            assert (e.get("devMajor", 0), e.get("devMinor", 0)) == (m.devmajor, m.devminor)
    # prioritized files (with data) lie before the landmark, every other file after it
    lm = got[landmark]["offset"]
    for m in members:
        if m.isreg() and m.size > 0:
            before = got[m.name]["offset"] < lm
            assert before == (m.name in prio), (m.name, prio)
    return view


@_SETTINGS
@given(tree=trees(), prioritize=st.integers(0, 3), gz=st.booleans())
def test_go_reader_reads_our_random_trees(
    work: Path, tree: Tree, prioritize: int, gz: bool
) -> None:
    members, contents, chunk = tree
    tar = build_tar(members, contents)
    prio = [m.name for m in members if m.isreg()][:prioritize]
    blob, res = _write_ours(
        gzip.compress(tar, mtime=0) if gz else tar,
        WriterOptions(chunk_size=chunk, prioritized_files=prio),
    )
    path = work / "ours.esgz"
    path.write_bytes(blob)
    check_go_reads_ours(members, contents, chunk, prio, path, res)


# --- the Go writer -> our reader ------------------------------------------------------------


def _toc_entries(r: EStargzReader) -> dict[str, TOCEntry]:
    return {e.name: e for e in r.index.entries() if e.type != "chunk"}


def check_we_read_go(
    members: list[tarfile.TarInfo],
    contents: dict[str, bytes],
    chunk: int,
    prio: list[str],
    blob: bytes,
    toc_digest: str,
    diff_id: str,
    diff_size: int,
) -> EStargzReader:
    """Our reader's view of the Go writer's blob equals the source tar; every chunk verifies."""
    r = EStargzReader.open(BytesSource(blob), expected_toc_digest=toc_digest)
    plain = gzip.decompress(blob)
    assert _sha(plain) == diff_id and len(plain) == diff_size
    for c in r.index.all_chunks():
        data = decode_chunk(blob[c.offset : c.compressed_end], c)  # raises on a bad digest
        assert len(data) == c.chunk_size
        assert _sha(data) == c.digest
    by_name = _toc_entries(r)
    for m in members:
        e = by_name[m.name.rstrip("/")]
        assert e.type == _TYPES[m.type], m.name
        assert e.mode == m.mode
        assert (e.uid, e.gid) == (m.uid, m.gid)
        assert e.mtime_ns == m.mtime * 10**9
        assert (e.xattrs or {}) == _xattrs(m)
        if m.issym() or m.islnk():
            assert e.link_name == m.linkname
        if m.ischr() or m.isblk():
            assert (e.dev_major, e.dev_minor) == (m.devmajor, m.devminor)
        if m.isreg():
            data = contents[m.name]
            assert e.size == len(data)
            assert e.digest == _sha(data)
            if not m.name.rsplit("/", 1)[-1].startswith(".wh."):
                assert r.read_file(m.name) == data
            ino = r.index.find(m.name)
            if ino is not None:
                cs = r.index.chunks(ino)
                assert len(cs) == _ceil_div(len(data), chunk)
                assert [c.chunk_offset for c in cs] == [i * chunk for i in range(len(cs))]
        if m.islnk() and not m.linkname.rsplit("/", 1)[-1].startswith(".wh."):
            assert r.read_file(m.name) == contents[m.linkname]
    idx = r.index
    lm = idx.prefetch_landmark_offset
    if lm is not None:
        assert not idx.has_no_prefetch_landmark
        for m in members:
            if m.isreg() and m.size > 0:
                ino = idx.find(m.name)
                if ino is None:  # a whiteout: not in the overlay view, check the raw entry
                    off = by_name[m.name].offset
                    assert off is not None
                    assert (off < lm) == (m.name in prio)
                    continue
                cs = idx.chunks(ino)
                if m.name in prio:
                    assert all(c.compressed_end <= lm for c in cs), m.name
                else:
                    assert all(c.offset > lm for c in cs), m.name
    else:
        assert idx.has_no_prefetch_landmark and not prio
    return r


@_SETTINGS
@given(tree=trees(), prioritize=st.integers(0, 3), gz=st.booleans())
def test_our_reader_reads_go_random_trees(
    work: Path, tree: Tree, prioritize: int, gz: bool
) -> None:
    members, contents, chunk = tree
    tar = build_tar(members, contents)
    prio = [m.name for m in members if m.isreg()][:prioritize]
    src = work / ("src.tar.gz" if gz else "src.tar")
    src.write_bytes(gzip.compress(tar, mtime=0) if gz else tar)
    res = go_build(src, work / "go.esgz", chunk_size=chunk, prioritized=prio)
    # 0.12 moves a prioritized file with its parents' tar entries and reports it missed when
    # one of those entries is absent (a directory only implied by its children's paths)
    explicit = {m.name.rstrip("/") for m in members}
    missed = [p for p in prio if not _implied_dirs([p]) <= explicit]
    assert list(res.missed_prioritized) == missed
    assert res.uncompressed_size == len(tar)
    blob = res.path.read_bytes()
    assert len(blob) == res.size and _sha(blob) == res.digest
    r = check_we_read_go(
        members,
        contents,
        chunk,
        [p for p in prio if p not in missed],
        blob,
        res.toc_digest,
        res.diff_id,
        res.diff_size,
    )
    # the landmark says whether prioritized files were asked for, found or not
    assert r.index.has_no_prefetch_landmark == (not prio)


# --- fixed cases: small.tar, a multi-chunk file, prioritized files, packed blobs --------------


def _members(tar: bytes) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    members, contents = [], {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            members.append(m)
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                contents[m.name] = f.read()
    return members, contents


@pytest.mark.parametrize("prio", [[], ["app/main.py", "var/x"], ["var/x", "app/data.bin"]])
def test_small_tar_both_ways(work: Path, prio: list[str]) -> None:
    """Every kind of entry (dirs, empty file, symlink, hardlink, whiteout, opaque marker, char
    device, fifo, xattr) through both writers and both readers, with and without prioritized
    files (landmarks)."""
    tar = small_tar()
    members, contents = _members(tar)
    chunk = 65536
    blob, res = _write_ours(tar, WriterOptions(chunk_size=chunk, prioritized_files=prio))
    (work / "ours.esgz").write_bytes(blob)
    view = check_go_reads_ours(members, contents, chunk, prio, work / "ours.esgz", res)
    assert view["chunksVerified"] >= 5 + 1 + 1 + 1  # data.bin, main.py (twice: hard), x, lm
    (work / "small.tar").write_bytes(tar)
    go = go_build(work / "small.tar", work / "go.esgz", chunk_size=chunk, prioritized=prio)
    r = check_we_read_go(
        members,
        contents,
        chunk,
        prio,
        go.path.read_bytes(),
        go.toc_digest,
        go.diff_id,
        go.diff_size,
    )
    # the order of prioritized files is kept by both writers
    ours = EStargzReader.open(BytesSource(blob))
    for reader in (r, ours):
        order = [e.name for e in reader.index.entries() if e.type == "reg"]
        assert [p for p in order if p in prio] == prio
        if prio:
            assert order.index(PREFETCH_LANDMARK) > max(order.index(p) for p in prio)


def test_multi_chunk_file_same_chunks_both_ways(work: Path) -> None:
    """A 1 MiB + 3 byte file at 64 KiB chunks: both writers cut the same 17 chunks with the
    same digests, and each reader verifies the other's."""
    data = pseudo_random((1 << 20) + 3, 99)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("big/file.bin")
        ti.size, ti.mode, ti.mtime = len(data), 0o600, 1_600_000_000
        tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    (work / "big.tar").write_bytes(tar)
    chunk = 65536
    go = go_build(work / "big.tar", work / "go.esgz", chunk_size=chunk)
    blob, res = _write_ours(tar, WriterOptions(chunk_size=chunk))
    (work / "ours.esgz").write_bytes(blob)
    view = go_verify(work / "ours.esgz", res.toc_digest)
    (entry,) = [e for e in view["entries"] if e["path"] == "big/file.bin"]
    assert entry["chunks"] == 17 and entry["sha256"] == _sha(data)
    ours_r = EStargzReader.open(BytesSource(blob), expected_toc_digest=res.toc_digest)
    go_r = EStargzReader.open(BytesSource(go.path.read_bytes()), expected_toc_digest=go.toc_digest)
    assert go_r.read_file("big/file.bin") == data

    def chunks(r: EStargzReader) -> list[tuple[int, int, str]]:
        ino = r.index.find("big/file.bin")
        assert ino is not None
        return [(c.chunk_offset, c.chunk_size, c.digest) for c in r.index.chunks(ino)]

    assert chunks(ours_r) == chunks(go_r)
    assert len(chunks(go_r)) == 17 and chunks(go_r)[-1][:2] == (16 * chunk, 3)
    # both TOCs list the same entries (offsets aside), so the TOC digests differ only by them
    go_view = go_verify(go.path, go.toc_digest)
    assert [(e["path"], e["type"], e.get("sha256")) for e in go_view["entries"]] == [
        (e["path"], e["type"], e.get("sha256")) for e in view["entries"]
    ]


def test_go_reader_refuses_packed_blobs(work: Path) -> None:
    """``min_chunk_size`` packs small files into shared gzip members (``innerOffset``), which
    the 0.12 reader predates: it must refuse such a blob, never return wrong bytes."""
    tar = small_tar()
    blob, res = _write_ours(tar, WriterOptions(min_chunk_size=1 << 20, chunk_size=65536))
    r = EStargzReader.open(BytesSource(blob), expected_toc_digest=res.toc_digest)
    assert any(c.inner_offset for c in r.index.all_chunks())
    (work / "packed.esgz").write_bytes(blob)
    with pytest.raises(GoPeerError, match="found twice"):
        go_verify(work / "packed.esgz", res.toc_digest)


def test_go_reader_detects_a_corrupted_chunk_and_a_wrong_toc_digest(work: Path) -> None:
    """The peer's verification can fail: a flipped byte in a chunk of our blob, and a TOC
    digest that is not the blob's, are both reported (so the round trips above mean
    something)."""
    tar = small_tar()
    blob, res = _write_ours(tar, WriterOptions(chunk_size=65536))
    r = EStargzReader.open(BytesSource(blob))
    ino = r.index.find("app/data.bin")
    assert ino is not None
    c = r.index.chunks(ino)[2]
    bad = bytearray(blob)
    bad[(c.offset + c.compressed_end) // 2] ^= 0x40
    (work / "bad.esgz").write_bytes(bytes(bad))
    with pytest.raises(GoPeerError, match=r"app/data\.bin: chunk at 131072"):
        go_verify(work / "bad.esgz", res.toc_digest)
    (work / "good.esgz").write_bytes(blob)
    with pytest.raises(GoPeerError, match="invalid TOC JSON"):
        go_verify(work / "good.esgz", "sha256:" + "0" * 64)
