"""What the writer writes, the reader (layerstore.estargz.reader.EStargzReader) reads back
identically.

Fixed cases over the Go reference's ``small.tar`` (our TOC must match the Go writer's entry for
entry, offsets aside) and property-based cases over random trees: hardlinks, symlinks, devices,
fifos, xattrs, whiteouts, long and unicode names, empty and multi-chunk files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerstore.estargz.reader import EStargzReader
from layerstore.estargz.toc import TOCEntry
from layerstore.estargz.writer import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    WriterOptions,
    write_estargz,
)
from layerstore.source import BytesSource


def convert(tar: bytes, opts: WriterOptions) -> tuple[bytes, Any]:
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(tar), out, opts)  # type: ignore[arg-type]
    return out.getvalue(), res


def comparable(e: TOCEntry) -> tuple[Any, ...]:
    """An entry without blob offsets (which depend on compression)."""
    return (
        e.name,
        e.type,
        e.size,
        e.mode,
        e.uid,
        e.gid,
        e.mtime_ns,
        e.link_name,
        e.dev_major,
        e.dev_minor,
        e.xattrs,
        e.digest,
        e.user_name,
        e.group_name,
        e.chunk_offset,
        e.chunk_size,
        e.chunk_digest,
    )


CASES = {
    "ref-small": WriterOptions(),
    "ref-chunked-64k": WriterOptions(chunk_size=65536),
    "ref-prioritized": WriterOptions(prioritized_files=["app/main.py", "var/x"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_toc_as_go_writer(go_reference: Path, case: str) -> None:
    tar = (go_reference / "small.tar").read_bytes()
    blob, res = convert(tar, CASES[case])
    ours = EStargzReader.open(BytesSource(blob))
    assert ours.toc_digest == res.toc_digest
    assert ours.toc_offset == res.toc_offset
    go = EStargzReader.open(BytesSource((go_reference / f"{case}.esgz").read_bytes()))
    assert [comparable(e) for e in ours.index.entries()] == [
        comparable(e) for e in go.index.entries()
    ]
    # the decompressed tar is the Go writer's tar entry for entry (header bytes may differ)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as a:
        ours_list = [(m.name, m.type, m.size, m.mode, m.linkname) for m in a]
    go_tar = gzip.decompress((go_reference / f"{case}.esgz").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(go_tar)) as b:
        go_list = [(m.name, m.type, m.size, m.mode, m.linkname) for m in b]
    assert ours_list[:-1] == go_list[:-1]
    assert ours_list[-1][0] == TOC_TAR_NAME
    # every file reads back, chunk digests verified by the reader
    with tarfile.open(fileobj=io.BytesIO(tar)) as src:
        for m in src:
            if m.isreg() and not m.name.split("/")[-1].startswith(".wh."):
                f = src.extractfile(m)
                assert f is not None
                assert ours.read_file(m.name) == f.read()
            elif m.islnk():
                assert ours.read_file(m.name) == ours.read_file(m.linkname)


def test_reader_reads_packed_members(go_reference: Path) -> None:
    tar = (go_reference / "small.tar").read_bytes()
    blob, _ = convert(tar, WriterOptions(min_chunk_size=1 << 20, chunk_size=65536))
    r = EStargzReader.open(BytesSource(blob))
    assert any(c.inner_offset for c in r.index.all_chunks())
    with tarfile.open(fileobj=io.BytesIO(tar)) as src:
        data = src.extractfile("app/data.bin")
        assert data is not None
        assert r.read_file("app/data.bin") == data.read()
    assert r.read_file("var/x") == b"xattr\n"


# --- property-based: random trees ---------------------------------------------------------------

_NAME_CHARS = st.sampled_from([*"abcxyz019_-.", "é", "ß", "日", "✓", " "])
_component = st.text(_NAME_CHARS, min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.")
)
_long_component = st.text(st.sampled_from("abcdef"), min_size=60, max_size=110)


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[tarfile.TarInfo], dict[str, bytes], int]:
    chunk = draw(st.sampled_from([512, 1000, 4096]))
    dirs = draw(st.lists(st.lists(_component, min_size=1, max_size=3), max_size=4))
    if draw(st.booleans()):
        dirs.append([draw(_long_component), draw(_long_component)])  # a path over 100 chars
    dir_paths: list[str] = []
    for parts in dirs:
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in dir_paths:
                dir_paths.append(p)
    members: list[tarfile.TarInfo] = []
    contents: dict[str, bytes] = {}
    used: set[str] = set()
    explicit_dirs = draw(st.booleans())

    def base(name: str, typ: bytes) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = typ
        ti.mode = draw(st.integers(0, 0o7777))
        ti.uid = draw(st.sampled_from([0, 1, 1000, 65534, 2**21 + 5]))
        ti.gid = draw(st.sampled_from([0, 2, 1000, 2**22]))
        ti.uname = draw(st.sampled_from(["", "root", "user"]))
        ti.gname = draw(st.sampled_from(["", "wheel", "grp"]))
        ti.mtime = draw(st.integers(1, 2**33))
        if draw(st.integers(0, 3)) == 0:
            ti.pax_headers = {
                "SCHILY.xattr.user.k": draw(st.text(st.sampled_from("ab=✓ \n"), max_size=8)),
                "SCHILY.xattr.trusted.overlay.opaque": "y",
            }
        return ti

    for d in dir_paths:
        used.add(d)
        if explicit_dirs:
            members.append(base(d, tarfile.DIRTYPE))
    n = draw(st.integers(0, 12))
    regs: list[str] = []
    parents = ["", *dir_paths]
    for _ in range(n):
        parent = draw(st.sampled_from(parents))
        leaf = draw(_component)
        kind = draw(
            st.sampled_from(["reg", "reg", "empty", "big", "sym", "hard", "chr", "blk", "fifo"])
        )
        if kind in ("hard",) and not regs:
            kind = "reg"
        if kind == "empty" and draw(st.booleans()):
            leaf = ".wh." + leaf  # a whiteout
        name = f"{parent}/{leaf}" if parent else leaf
        if name in used:
            continue
        used.add(name)
        if kind in ("reg", "empty", "big"):
            size = {"reg": draw(st.integers(1, 700)), "empty": 0, "big": 3 * chunk + 7}[kind]
            data = draw(st.binary(min_size=min(size, 16), max_size=16)) * (size // 16 + 1)
            data = data[:size]
            ti = base(name, tarfile.REGTYPE)
            ti.size = len(data)
            contents[name] = data
            if not leaf.startswith(".wh."):
                regs.append(name)  # hardlink targets (a link to a whiteout means nothing)
        elif kind == "sym":
            ti = base(name, tarfile.SYMTYPE)
            ti.linkname = draw(st.sampled_from(["../x", "/abs/target", "é" * 3, "t" * 150]))
        elif kind == "hard":
            ti = base(name, tarfile.LNKTYPE)
            ti.linkname = draw(st.sampled_from(regs))
        elif kind in ("chr", "blk"):
            ti = base(name, tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE)
            ti.devmajor = draw(st.integers(0, 4095))
            ti.devminor = draw(st.integers(0, 2**20 - 1))
        else:
            ti = base(name, tarfile.FIFOTYPE)
        members.append(ti)
    if dir_paths and draw(st.booleans()):
        ti = base(dir_paths[0] + "/.wh..wh..opq", tarfile.REGTYPE)
        members.append(ti)
        contents[ti.name] = b""
    return members, contents, chunk


def build_tar(members: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti in members:
            if ti.isreg():
                tf.addfile(ti, io.BytesIO(contents[ti.name]))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def _toc_name(ti: tarfile.TarInfo) -> str:
    return ti.name.rstrip("/")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    tree=trees(),
    prioritize=st.integers(0, 3),
    packing=st.sampled_from([0, 0, 300, 5000]),
    gz=st.booleans(),
)
def test_random_trees_round_trip(
    tree: tuple[list[tarfile.TarInfo], dict[str, bytes], int],
    prioritize: int,
    packing: int,
    gz: bool,
) -> None:
    members, contents, chunk = tree
    tar = build_tar(members, contents)
    regs = [m.name for m in members if m.isreg()]
    prio = regs[:prioritize]
    opts = WriterOptions(chunk_size=chunk, prioritized_files=prio, min_chunk_size=packing)
    blob, res = convert(gzip.compress(tar, mtime=0) if gz else tar, opts)
    assert res.missed_prioritized == ()

    # the decompressed blob is a tar of the source entries, landmark and TOC
    plain = gzip.decompress(blob)
    assert res.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        listed = tf.getmembers()
        names = [m.name for m in listed]
        for m in listed:
            if m.isreg() and m.name in contents:
                f = tf.extractfile(m)
                assert f is not None and f.read() == contents[m.name]
    landmark = PREFETCH_LANDMARK if prio else NO_PREFETCH_LANDMARK
    assert names[-1] == TOC_TAR_NAME
    assert landmark in names
    rest = [n for n in names if n not in (landmark, TOC_TAR_NAME)]
    if prio:
        assert sorted(rest) == sorted(m.name for m in members)
        assert names.index(landmark) <= len(members)
    else:
        assert names[0] == landmark
        assert rest == [m.name for m in members]

    # the reader sees every entry with its metadata and content
    r = EStargzReader.open(BytesSource(blob), expected_toc_digest=res.toc_digest)
    toc_bytes = plain[plain.rindex(b'{"version"') :].split(b"\0", 1)[0]
    assert "sha256:" + hashlib.sha256(toc_bytes).hexdigest() == res.toc_digest
    assert json.loads(toc_bytes)["version"] == 1
    by_name = {e.name: e for e in r.index.entries() if e.type != "chunk"}
    for m in members:
        e = by_name[_toc_name(m)]
        want_type = {
            tarfile.REGTYPE: "reg",
            tarfile.DIRTYPE: "dir",
            tarfile.SYMTYPE: "symlink",
            tarfile.LNKTYPE: "hardlink",
            tarfile.CHRTYPE: "char",
            tarfile.BLKTYPE: "block",
            tarfile.FIFOTYPE: "fifo",
        }[m.type]
        assert e.type == want_type
        assert e.mode == m.mode
        assert (e.uid, e.gid) == (m.uid, m.gid)
        assert (e.user_name, e.group_name) == (m.uname, m.gname)
        assert e.mtime_ns == m.mtime * 10**9
        if m.issym():
            assert e.link_name == m.linkname
        if m.islnk():
            assert e.link_name == m.linkname
        if m.ischr() or m.isblk():
            assert (e.dev_major, e.dev_minor) == (m.devmajor, m.devminor)
        want_x = {
            k[len("SCHILY.xattr.") :]: v.encode()
            for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        assert (e.xattrs or {}) == want_x
        if m.isreg():
            assert e.size == m.size
            assert e.digest == "sha256:" + hashlib.sha256(contents[m.name]).hexdigest()
            if not m.name.split("/")[-1].startswith(".wh."):
                assert r.read_file(m.name) == contents[m.name]
    # multi-chunk files were split at the chunk size
    for name, data in contents.items():
        if len(data) > chunk:
            chunks = [e for e in r.index.entries() if e.name == name]
            assert len(chunks) == -(-len(data) // chunk)
