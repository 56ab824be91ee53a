"""The eStargz writer: layout, landmarks, chunks, determinism, gzip/tar compatibility."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from layerstore.errors import FormatError
from layerstore.estargz.footer import parse_footer
from layerstore.estargz.writer import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    TarFormatError,
    WriteResult,
    WriterOptions,
    clean_entry_name,
    iter_members,
    write_estargz,
    write_estargz_file,
)

MTIME = 1600000000


def make_tar(
    files: list[tuple[str, bytes | None, dict[str, object]]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    """(name, content or None for a dir, extra TarInfo attributes) -> tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, content, extra in files:
            ti = tarfile.TarInfo(name)
            ti.mtime = MTIME
            ti.mode = 0o644
            if content is None and "type" not in extra:
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
            for k, v in extra.items():
                setattr(ti, k, v)
            if content is not None:
                ti.size = len(content)
                tf.addfile(ti, io.BytesIO(content))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def convert(tar: bytes, **kw: object) -> tuple[bytes, WriteResult]:
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(tar), out, WriterOptions(**kw))  # type: ignore[arg-type]
    return out.getvalue(), res


def gunzip_all(blob: bytes) -> bytes:
    return gzip.decompress(blob)


def toc_of(blob: bytes) -> dict[str, object]:
    toc_offset, size = parse_footer(blob[-51:])
    assert size == 51
    d = zlib.decompressobj(31)
    member = d.decompress(blob[toc_offset:])
    assert member[: len(TOC_TAR_NAME)] == TOC_TAR_NAME.encode()
    n = int(member[124:136].rstrip(b"\0 "), 8)
    toc = json.loads(member[512 : 512 + n])
    assert isinstance(toc, dict)
    return toc


def read_chunk(blob: bytes, e: dict[str, object], file_size: int) -> bytes:
    d = zlib.decompressobj(31)
    off = e["offset"]
    assert isinstance(off, int)
    data = d.decompress(blob[off:])  # one member only: decompressobj stops at its end
    inner = int(e.get("innerOffset", 0))  # type: ignore[call-overload]
    cs = int(e.get("chunkSize", 0))  # type: ignore[call-overload]
    co = int(e.get("chunkOffset", 0))  # type: ignore[call-overload]
    if cs == 0:
        cs = file_size - co
    out = data[inner : inner + cs]
    assert len(out) == cs
    assert "sha256:" + hashlib.sha256(out).hexdigest() == e["chunkDigest"]
    return out


def files_from_toc(blob: bytes) -> dict[str, bytes]:
    toc = toc_of(blob)
    entries = toc["entries"]
    assert isinstance(entries, list)
    out: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    for e in entries:
        if e["type"] == "reg":
            sizes[e["name"]] = e.get("size", 0)
            out[e["name"]] = read_chunk(blob, e, e.get("size", 0)) if e.get("size") else b""
        elif e["type"] == "chunk":
            out[e["name"]] += read_chunk(blob, e, sizes[e["name"]])
    for name, data in out.items():
        assert len(data) == sizes[name], name
    return out


def tar_names(blob: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(gunzip_all(blob))) as tf:
        return [m.name for m in tf]


SAMPLE = [
    ("app", None, {}),
    ("app/main.py", b"print('hi')\n", {}),
    ("app/empty", b"", {}),
    ("app/link", None, {"type": tarfile.SYMTYPE, "linkname": "main.py", "mode": 0o777}),
    ("app/hard", None, {"type": tarfile.LNKTYPE, "linkname": "app/main.py"}),
    ("app/data.bin", os.urandom(300_000), {"uid": 1000, "gid": 1000, "uname": "u", "gname": "g"}),
    ("etc", None, {}),
    ("etc/.wh.removed", b"", {}),
    ("var", None, {}),
    ("var/tty", None, {"type": tarfile.CHRTYPE, "devmajor": 5, "devminor": 1, "mode": 0o666}),
    ("var/pipe", None, {"type": tarfile.FIFOTYPE}),
    ("var/x", b"xattr\n", {"pax_headers": {"SCHILY.xattr.user.k": "v"}, "mode": 0o4755}),
]


def test_layout_members_footer_and_toc() -> None:
    tar = make_tar(SAMPLE)
    blob, res = convert(tar, chunk_size=65536)
    assert res.compressed_size == len(blob)
    assert res.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    plain = gunzip_all(blob)
    assert res.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert res.uncompressed_size == len(plain)
    members = [off for off, _ in iter_members(blob)]
    assert members[-1] == len(blob) - 51
    assert res.toc_offset == members[-2]
    toc = toc_of(blob)
    assert (
        res.toc_digest
        == "sha256:"
        + hashlib.sha256(plain[plain.index(b'{"version"') :].split(b"\0", 1)[0]).hexdigest()
    )
    entries = toc["entries"]
    assert isinstance(entries, list)
    assert entries[0]["name"] == NO_PREFETCH_LANDMARK
    # every offset is the start of a gzip member; payloads start members (innerOffset 0)
    for e in entries:
        if "offset" in e:
            assert e["offset"] in members
            assert "innerOffset" not in e
    by = {(e["name"], e.get("chunkOffset", 0)): e for e in entries}
    assert by[("app/", 0)]["type"] == "dir" and by[("app/", 0)]["mode"] == 0o755
    assert by[("app/link", 0)]["linkName"] == "main.py"
    assert by[("app/hard", 0)]["type"] == "hardlink"
    assert by[("app/hard", 0)]["linkName"] == "app/main.py"
    assert by[("var/tty", 0)]["devMajor"] == 5 and by[("var/tty", 0)]["devMinor"] == 1
    assert by[("var/x", 0)]["xattrs"] == {"user.k": "dg=="}
    assert by[("var/x", 0)]["mode"] == 0o4755
    assert by[("app/data.bin", 0)]["userName"] == "u"
    assert by[("app/data.bin", 0)]["modtime"] == "2020-09-13T12:26:40Z"
    assert by[("app/empty", 0)]["digest"] == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert "offset" not in by[("app/empty", 0)]
    # 300,000 bytes in 64 KiB chunks: a reg entry and 4 chunk entries
    chunks = [e for e in entries if e["name"] == "app/data.bin"]
    assert [c["type"] for c in chunks] == ["reg", "chunk", "chunk", "chunk", "chunk"]
    assert [c.get("chunkOffset", 0) for c in chunks] == [0, 65536, 131072, 196608, 262144]
    assert [c.get("chunkSize", 0) for c in chunks] == [65536] * 4 + [0]
    files = files_from_toc(blob)
    src = {n: c for n, c, _ in SAMPLE if c is not None}
    for name, content in src.items():
        assert files[name] == content
    assert files[NO_PREFETCH_LANDMARK] == b"\x0f"


def test_go_field_order_and_format() -> None:
    blob, _ = convert(make_tar(SAMPLE))
    toc = toc_of(blob)
    entries = toc["entries"]
    assert isinstance(entries, list)
    x = next(e for e in entries if e["name"] == "var/x")
    assert list(x) == [
        "name",
        "type",
        "size",
        "modtime",
        "mode",
        "offset",
        "xattrs",
        "digest",
        "chunkDigest",
    ]
    plain = gunzip_all(blob)
    assert b'{"version":1,"entries":[{"name":".no.prefetch.landmark","type":"reg"' in plain


def test_decompressed_blob_is_a_tar_listing_the_source(tmp_path: Path) -> None:
    tar = make_tar(SAMPLE)
    src = tmp_path / "layer.tar"
    src.write_bytes(tar)
    dst = tmp_path / "layer.esgz"
    write_estargz_file(src, dst)
    listing = subprocess.run(
        f"gzip -dc {dst} | tar -tf -", shell=True, check=True, capture_output=True, text=True
    ).stdout.split()
    want = [NO_PREFETCH_LANDMARK] + [n + "/" if c is None and not e else n for n, c, e in SAMPLE]
    assert listing == [*want, TOC_TAR_NAME]
    # and gzip -t is happy with the concatenated members
    subprocess.run(["gzip", "-t", str(dst)], check=True)


def test_gzip_input_gives_same_blob() -> None:
    tar = make_tar(SAMPLE)
    a, ra = convert(tar)
    b, rb = convert(gzip.compress(tar, mtime=0))
    assert a == b
    assert ra.source_size == len(tar)
    assert rb.source_size < len(tar)


def test_deterministic_and_independent_of_threads() -> None:
    tar = make_tar([*SAMPLE, ("big", os.urandom(1 << 20) * 3, {})])
    outs = {
        convert(tar, chunk_size=100_000, workers=w, max_inflight_bytes=m)[0]
        for w, m in [(1, 0), (2, 0), (4, 1), (3, 10 << 20)]
    }
    assert len(outs) == 1
    blob = outs.pop()
    # gzip headers: no name, mtime 0
    for off, _ in iter_members(blob[:-51]):
        assert blob[off : off + 3] == b"\x1f\x8b\x08"
        assert blob[off + 3] & 0x08 == 0  # FNAME
        assert blob[off + 4 : off + 8] == b"\0\0\0\0"


def test_prioritized_files_order() -> None:
    tar = make_tar(SAMPLE)
    blob, res = convert(tar, prioritized_files=["app/main.py", "/var/x", "does/not/exist"])
    assert res.missed_prioritized == ("does/not/exist",)
    names = tar_names(blob)
    assert names[:5] == ["app", "app/main.py", "var", "var/x", PREFETCH_LANDMARK]
    assert names[-1] == TOC_TAR_NAME
    assert sorted(names[5:-1]) == sorted(n for n, _, _ in SAMPLE if n not in names[:4])
    toc = toc_of(blob)
    entries = toc["entries"]
    assert isinstance(entries, list)
    landmark = next(e for e in entries if e["name"] == PREFETCH_LANDMARK)
    prio = [e for e in entries if e["name"] in ("app/main.py", "var/x")]
    assert all(e["offset"] < landmark["offset"] for e in prio)
    others = [e for e in entries if "offset" in e and e["name"] not in ("app/main.py", "var/x")]
    assert all(e["offset"] >= landmark["offset"] for e in others)
    assert files_from_toc(blob)["var/x"] == b"xattr\n"


def test_prioritized_hardlink_pulls_its_target_and_gzip_input() -> None:
    tar = make_tar(SAMPLE)
    blob, _ = convert(gzip.compress(tar), prioritized_files=["app/hard"])
    names = tar_names(blob)
    assert names[:4] == ["app", "app/main.py", "app/hard", PREFETCH_LANDMARK]
    blob2, _ = convert(tar, prioritized_files=["app/hard"])
    assert blob == blob2  # spooled gzip input and pread of a plain file agree


def test_prioritized_from_seekable_file(tmp_path: Path) -> None:
    tar = make_tar(SAMPLE)
    p = tmp_path / "t.tar"
    p.write_bytes(b"junk" + tar)
    with open(p, "rb") as f:
        f.seek(4)
        out = io.BytesIO()
        write_estargz(f, out, WriterOptions(prioritized_files=["var/x"]))
    assert out.getvalue() == convert(tar, prioritized_files=["var/x"])[0]


def test_reconverting_an_estargz_blob_with_a_member_over_a_read_piece() -> None:
    """An eStargz blob as input (``optimize`` reorders the layers of an image already
    converted): a member that inflates to more than the reader's 1 MiB piece ends inside the
    input that the output limit left unconsumed. The reader once looped forever there."""
    # Compressible: the whole member and the ones after it arrive in one read of the input,
    # and it inflates to 1.5 MiB (one member: the chunk size is 4 MiB).
    big = b"".join(b"%08d" % i for i in range(196608))
    tar = make_tar(
        [("bin", None, {}), ("bin/big", big, {}), ("etc", None, {}), ("etc/a", b"a\n", {})]
    )
    blob, _ = convert(tar)
    again, res = convert(blob, prioritized_files=["etc/a", "bin/big"])
    names = tar_names(again)
    assert names[:5] == ["etc", "etc/a", "bin", "bin/big", PREFETCH_LANDMARK]
    assert files_from_toc(again)["bin/big"] == big
    assert res.missed_prioritized == ()


def test_small_file_packing() -> None:
    files = [(f"d/f{i}", (b"line %d\n" % i) * (i + 1), {}) for i in range(200)]
    tar = make_tar([("d", None, {}), *files, ("big", os.urandom(200_000), {})])
    unpacked, _ = convert(tar)
    packed, _ = convert(tar, min_chunk_size=16384)
    assert len(packed) < len(unpacked)
    toc = toc_of(packed)
    entries = toc["entries"]
    assert isinstance(entries, list)
    assert sum(1 for e in entries if e.get("innerOffset")) > 100
    assert len({e["offset"] for e in entries if "offset" in e}) < 50
    got = files_from_toc(packed)
    for name, content, _ in files:
        assert got[name] == content
    assert gunzip_all(packed) != b""
    members = [off for off, _ in iter_members(packed)]
    assert all(e["offset"] in members for e in entries if "offset" in e)


def test_long_unicode_names_and_gnu_format() -> None:
    long = "dir/" + "x" * 150 + "/é✓.txt"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tar = make_tar(
            [(long, b"content", {}), ("l", None, {"type": tarfile.SYMTYPE, "linkname": "y" * 200})],
            fmt,
        )
        blob, _ = convert(tar)
        toc = toc_of(blob)
        entries = toc["entries"]
        assert isinstance(entries, list)
        assert entries[1]["name"] == long
        assert entries[2]["linkName"] == "y" * 200
        assert files_from_toc(blob)[long] == b"content"


def test_reserved_names_in_source_are_dropped() -> None:
    tar = make_tar(
        [(".no.prefetch.landmark", b"\x0f", {}), ("a", b"1", {}), (TOC_TAR_NAME, b"{}", {})]
    )
    blob, _ = convert(tar)
    names = tar_names(blob)
    assert names == [NO_PREFETCH_LANDMARK, "a", TOC_TAR_NAME]


def test_root_dir_and_dot_slash_names() -> None:
    tar = make_tar([("./", None, {}), ("./a/", None, {}), ("./a/b", b"x", {})])
    blob, _ = convert(tar)
    toc = toc_of(blob)
    names = [e["name"] for e in toc["entries"]]  # type: ignore[union-attr]
    assert names == [NO_PREFETCH_LANDMARK, "a/", "a/b"]


@pytest.mark.parametrize(
    "data",
    [b"not a tar at all" * 100, b"\x1f\x8bgarbage", gzip.compress(b"x" * 1000)],
)
def test_bad_input(data: bytes) -> None:
    with pytest.raises(FormatError):
        convert(data)


def test_truncated_input() -> None:
    tar = make_tar(SAMPLE)
    with pytest.raises(TarFormatError, match="ends"):
        convert(tar[:2000])
    gz = gzip.compress(tar)
    with pytest.raises(TarFormatError):
        convert(gz[: len(gz) // 2])
    bad = bytearray(gz)
    bad[-6] ^= 0xFF  # CRC of the gzip member
    with pytest.raises(TarFormatError):
        convert(bytes(bad))


def test_empty_tar() -> None:
    blob, res = convert(b"")
    toc = toc_of(blob)
    assert [e["name"] for e in toc["entries"]] == [NO_PREFETCH_LANDMARK]  # type: ignore[union-attr]
    assert res.uncompressed_size % 512 == 0


def test_atomic_file_write_cleans_up(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        write_estargz_file(io.BytesIO(b"garbage" * 200), tmp_path / "out")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_clean_entry_name() -> None:
    assert clean_entry_name("./a/b/") == "a/b"
    assert clean_entry_name("/a//b/../c") == "a/c"
    assert clean_entry_name("../../x") == "x"
    assert clean_entry_name("./") == ""


def test_options_validation() -> None:
    with pytest.raises(ValueError):
        convert(b"", chunk_size=0)
    with pytest.raises(ValueError):
        convert(b"", compression_level=10)


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_made_archive(tmp_path: Path, fmt: str) -> None:
    """A tree written by GNU tar (long names, hardlink, symlink, fifo, xattr) converts and
    lists identically with ``tar -tv``."""
    root = tmp_path / "root"
    deep = root / ("d" * 80) / ("e" * 80)
    deep.mkdir(parents=True)
    (deep / "f.txt").write_bytes(b"deep file\n")
    (root / "big").write_bytes(os.urandom(70_000))
    os.link(root / "big", root / "big.hard")
    os.symlink("big", root / "sym")
    os.mkfifo(root / "fifo")
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    xattr_ok = True
    try:
        os.setxattr(root / "big", "user.test", b"v\x00\xff")
    except OSError:
        xattr_ok = False  # file system without user xattrs: the rest still runs
    src = tmp_path / "src.tar"
    subprocess.run(
        [
            "tar",
            f"--format={fmt}",
            "--xattrs",
            "--sort=name",
            "-C",
            str(root),
            "-cf",
            str(src),
            ".",
        ],
        check=True,
    )
    dst = tmp_path / "out.esgz"
    write_estargz_file(src, dst, WriterOptions(chunk_size=16384))

    def listing(cmd: str) -> list[str]:
        out = subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout
        return out.splitlines()

    want = listing(f"tar -tvf {src}")
    got = listing(f"gzip -dc {dst} | tar -tvf -")
    assert got[0].endswith(NO_PREFETCH_LANDMARK) and got[-1].endswith(TOC_TAR_NAME)
    assert got[1:-1] == want
    blob = dst.read_bytes()
    toc = toc_of(blob)
    entries = {e["name"]: e for e in toc["entries"] if e["type"] != "chunk"}  # type: ignore[union-attr]
    long_name = f"{'d' * 80}/{'e' * 80}/f.txt"
    assert files_from_toc(blob)[long_name] == b"deep file\n"
    assert entries["setuid"]["mode"] == 0o4755
    assert entries["big.hard"]["type"] == "hardlink" and entries["big.hard"]["linkName"] == "big"
    assert entries["fifo"]["type"] == "fifo"
    if xattr_ok and fmt == "posix":
        assert entries["big"]["xattrs"] == {"user.test": "dgD/"}
    assert files_from_toc(blob)["big"] == (root / "big").read_bytes()
