"""TOCIndex: validation and the overlay view, on hand-written TOC JSON."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerstore.errors import LimitExceededError, TOCError
from layerstore.estargz.constants import OPAQUE_XATTRS
from layerstore.estargz.toc import TOCIndex

TOC_OFFSET = 1_000_000


def dg(s: str | bytes) -> str:
    return "sha256:" + hashlib.sha256(s.encode() if isinstance(s, str) else s).hexdigest()


def mk(entries: list[dict[str, Any]], **kw: Any) -> TOCIndex:
    doc = json.dumps({"version": 1, "entries": entries}).encode()
    return TOCIndex.from_json(doc, toc_offset=kw.pop("toc_offset", TOC_OFFSET), **kw)


def reg(name: str, size: int = 0, offset: int | None = None, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"name": name, "type": "reg", "size": size, "mode": 0o644}
    if size:
        e["offset"] = offset if offset is not None else 100
        e["chunkDigest"] = dg(name)
    e.update(kw)
    return e


def d(name: str, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"name": name, "type": "dir", "mode": 0o755}
    e.update(kw)
    return e


def names(idx: TOCIndex, path: str = "") -> list[str]:
    ino = idx.find(path)
    assert ino is not None
    return [n for n, _ in idx.readdir(ino)]


def all_inos(idx: TOCIndex) -> set[int]:
    out = {idx.root_ino}
    stack = [idx.root_ino]
    while stack:
        for _, c in idx.readdir(stack.pop()):
            out.add(c)
            if idx.is_dir(c):
                stack.append(c)
    return out


# --- overlay view ---------------------------------------------------------------------------------
def test_whiteout_becomes_char_device_and_real_entry_wins() -> None:
    idx = mk(
        [
            d("a/"),
            reg("a/.wh.gone", modtime="2021-01-01T00:00:00Z", uid=5),
            reg("a/.wh.kept"),
            reg("a/kept", 3, chunkDigest=dg("x")),
            reg("b/real", 1),
            reg("b/.wh.real"),
        ]
    )
    assert names(idx, "a") == ["gone", "kept"]
    gone = idx.find("a/gone")
    assert gone is not None
    a = idx.getattr(gone)
    assert (a.mode, a.rdev, a.uid, a.gid, a.size, a.nlink) == (stat.S_IFCHR, 0, 0, 0, 0, 1)
    assert a.mtime_ns == 1609459200 * 10**9
    assert idx.xattrs(gone) == {}
    assert stat.S_ISREG(idx.getattr(idx.find("a/kept") or 0).mode)
    assert stat.S_ISREG(idx.getattr(idx.find("b/real") or 0).mode)
    assert idx.find("a/.wh.gone") is None
    assert all_inos(idx) == set(range(1, idx.num_inodes + 1))


def test_opaque_marker_hidden_and_xattrs() -> None:
    idx = mk(
        [
            d("o/", xattrs={"user.a": "Yg=="}),
            reg("o/.wh..wh..opq"),
            reg("o/f"),
            reg("p/.wh..wh..opq"),
        ]
    )
    o = idx.find("o")
    p = idx.find("p")
    assert o is not None and p is not None
    assert names(idx, "o") == ["f"]
    assert idx.xattrs(o) == {
        "user.a": b"b",
        "trusted.overlay.opaque": b"y",
        "user.overlay.opaque": b"y",
    }
    assert idx.xattrs(p) == {k: b"y" for k in OPAQUE_XATTRS}  # an implied dir can be opaque
    assert idx.xattrs(idx.root_ino) == {}
    assert names(idx, "p") == []


def test_aufs_metadata_hidden() -> None:
    idx = mk([reg(".wh..wh.plnk"), reg("x/.wh..wh.aufs")])
    assert names(idx) == ["x"]
    assert names(idx, "x") == []


def test_landmarks_and_toc_hidden_at_root_only() -> None:
    idx = mk(
        [
            reg(".prefetch.landmark", 1, offset=500),
            reg(".no.prefetch.landmark", 1, offset=600),
            reg("stargz.index.json"),
            reg("sub/.prefetch.landmark"),
            reg("sub/stargz.index.json"),
        ]
    )
    assert names(idx) == ["sub"]
    assert names(idx, "sub") == [".prefetch.landmark", "stargz.index.json"]
    assert idx.prefetch_landmark_offset == 500
    assert idx.has_no_prefetch_landmark
    plain = mk([reg("f")])
    assert plain.prefetch_landmark_offset is None and not plain.has_no_prefetch_landmark


def test_hardlinks_share_one_inode_and_count_links() -> None:
    idx = mk(
        [
            reg("a/f", 5, uid=7),
            {"name": "a/h1", "type": "hardlink", "linkName": "a/f"},
            {"name": "b/h2", "type": "hardlink", "linkName": "./a/h1"},  # a chain
            {"name": "early", "type": "hardlink", "linkName": "late"},  # target comes later
            reg("late", 2),
        ]
    )
    f = idx.find("a/f")
    assert f is not None
    assert idx.find("a/h1") == idx.find("b/h2") == f
    a = idx.getattr(f)
    assert a.nlink == 3 and a.size == 5 and a.uid == 7
    assert idx.find("early") == idx.find("late")
    assert idx.getattr(idx.find("late") or 0).nlink == 2
    assert idx.total_file_bytes == 7  # each inode once
    assert all_inos(idx) == set(range(1, idx.num_inodes + 1))
    assert len(idx.chunks(f)) == 1


@pytest.mark.parametrize(
    "entries",
    [
        [{"name": "h", "type": "hardlink", "linkName": "missing"}],
        [d("dir/"), {"name": "h", "type": "hardlink", "linkName": "dir"}],
        [
            {"name": "h1", "type": "hardlink", "linkName": "h2"},
            {"name": "h2", "type": "hardlink", "linkName": "h1"},
        ],
        [{"name": "h", "type": "hardlink", "linkName": "h"}],
        [{"name": "h", "type": "hardlink", "linkName": "./"}],
        [reg("a/.wh.x"), {"name": "h", "type": "hardlink", "linkName": "a/.wh.x"}],
    ],
)
def test_bad_hardlinks_refused(entries: list[dict[str, Any]]) -> None:
    with pytest.raises(TOCError):
        mk(entries)


def test_directory_nlink_implied_dirs_and_root_entry() -> None:
    idx = mk(
        [
            reg("x/y/z/file"),
            d("x/", mode=0o700, uid=3, modtime="2020-01-01T00:00:00Z"),
            d("x/w/"),
            {"name": "./", "type": "dir", "mode": 0o1777, "uid": 9},
        ]
    )
    x = idx.find("x")
    y = idx.find("x/y")
    assert x is not None and y is not None
    ax = idx.getattr(x)
    assert ax.mode == stat.S_IFDIR | 0o700 and ax.uid == 3 and ax.nlink == 4  # y, w
    ay = idx.getattr(y)
    assert (ay.mode, ay.uid, ay.gid, ay.mtime_ns, ay.nlink) == (stat.S_IFDIR | 0o755, 0, 0, 0, 3)
    root = idx.getattr(idx.root_ino)
    assert root.mode == stat.S_IFDIR | 0o1777 and root.uid == 9 and root.nlink == 3
    # inode numbers follow the TOC: root, x, y, z, file, w
    assert [idx.find(p) for p in ("", "x", "x/y", "x/y/z", "x/y/z/file", "x/w")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    assert idx.uids() == {0, 3, 9}


def test_duplicates_replace_earlier_entries() -> None:
    idx = mk(
        [
            reg("f", 3, offset=10, uid=1),
            d("dd/"),
            reg("dd/child"),
            reg("f", 4, offset=20, uid=2),
            reg("dd", 1, offset=30),  # a file replaces a directory and its children
            d("keep/", mode=0o700),
            reg("keep/c"),
            d("keep/", mode=0o750),  # directory over directory keeps the children
        ]
    )
    f = idx.find("f")
    assert f is not None
    assert idx.getattr(f).size == 4 and idx.getattr(f).uid == 2
    assert idx.chunks(f)[0].offset == 20
    dd = idx.find("dd")
    assert dd is not None and stat.S_ISREG(idx.getattr(dd).mode)
    assert idx.find("dd/child") is None
    assert names(idx, "keep") == ["c"]
    assert stat.S_IMODE(idx.getattr(idx.find("keep") or 0).mode) == 0o750
    assert all_inos(idx) == set(range(1, idx.num_inodes + 1))
    assert idx.num_inodes == 5  # root, f, dd, keep, keep/c
    assert len(list(idx.entries())) == 8


def test_entry_below_non_directory_refused() -> None:
    with pytest.raises(TOCError):
        mk([reg("f"), reg("f/g")])
    with pytest.raises(TOCError):
        mk([reg(".wh.x"), reg(".wh.x/y")])


def test_image_overlay_xattrs_are_not_shown() -> None:
    """An image must not steer the overlay mount it is part of: redirect, metacopy, origin,
    opaque or whiteout xattrs it carries never reach overlayfs; only the opaque marker derived
    from ``.wh..wh..opq`` is answered."""
    y = "eQ=="  # base64 of b"y"
    steer = {
        "trusted.overlay.redirect": "L2V0Yy9zaGFkb3c=",
        "trusted.overlay.metacopy": "",
        "trusted.overlay.origin": "AAEC",
        "trusted.overlay.opaque": y,
        "user.overlay.redirect": "L2V0Yw==",
        "user.overlay.whiteout": "",
        "user.keep": "AAEC",
        "security.capability": "AAEC",
    }
    idx = mk([d("a/", xattrs=steer), reg("a/f", xattrs=steer), d("o/"), reg("o/.wh..wh..opq")])
    kept = {"user.keep": b"\x00\x01\x02", "security.capability": b"\x00\x01\x02"}
    for path in ("a", "a/f"):
        ino = idx.find(path)
        assert ino is not None
        assert idx.xattrs(ino) == kept, path
    o = idx.find("o")
    assert o is not None and idx.xattrs(o) == {k: b"y" for k in OPAQUE_XATTRS}
    # the raw TOC view keeps what the image said (for verification and conversion)
    raw = {e.name: e.xattrs for e in idx.entries()}
    assert raw["a/f"] is not None and "trusted.overlay.redirect" in raw["a/f"]


def test_modes_devices_symlinks_xattrs() -> None:
    idx = mk(
        [
            reg("suid", mode=0o4755),
            reg("sgid", mode=0o2755),
            reg("typed", mode=0o100640),  # tar type bits in mode are ignored
            {"name": "tty", "type": "char", "mode": 0o620, "devMajor": 4, "devMinor": 1},
            {"name": "sda", "type": "block", "mode": 0o660, "devMajor": 8, "devMinor": 300},
            {"name": "null", "type": "char", "mode": 0o666},
            {"name": "p", "type": "fifo", "mode": 0o600},
            {"name": "l", "type": "symlink", "linkName": "../ü/target", "mode": 0o777},
            reg("x", xattrs={"user.a": "AAEC", "security.capability": ""}),
        ]
    )

    def attr(p: str) -> Any:
        ino = idx.find(p)
        assert ino is not None
        return idx.getattr(ino)

    assert attr("suid").mode == stat.S_IFREG | 0o4755
    assert attr("sgid").mode == stat.S_IFREG | 0o2755
    assert attr("typed").mode == stat.S_IFREG | 0o640
    assert attr("tty").mode == stat.S_IFCHR | 0o620 and attr("tty").rdev == os.makedev(4, 1)
    assert attr("sda").mode == stat.S_IFBLK | 0o660 and attr("sda").rdev == os.makedev(8, 300)
    assert attr("null").rdev == os.makedev(0, 0)
    assert attr("p").mode == stat.S_IFIFO | 0o600
    li = idx.find("l")
    assert li is not None
    assert idx.readlink(li) == "../ü/target"
    assert attr("l").size == len("../ü/target".encode())
    assert idx.xattrs(idx.find("x") or 0) == {"user.a": b"\x00\x01\x02", "security.capability": b""}
    with pytest.raises(ValueError):
        idx.readlink(idx.find("x") or 0)
    with pytest.raises(ValueError):
        idx.readdir(idx.find("x") or 0)
    with pytest.raises(KeyError):
        idx.getattr(idx.num_inodes + 1)
    with pytest.raises(KeyError):
        idx.getattr(0)
    assert idx.lookup(idx.find("x") or 0, "y") is None
    assert idx.lookup(999, "y") is None
    assert idx.chunks(idx.find("p") or 0) == ()


def test_names_are_cleaned() -> None:
    idx = mk([reg("./a/b"), reg("/c"), reg("d//e"), d("f/./g/"), d("h//"), reg("i///")])
    assert names(idx) == ["a", "c", "d", "f", "h", "i"]
    assert names(idx, "h") == []
    assert idx.find("a/b") and idx.find("c") and idx.find("d/e") and idx.find("f/g")
    assert [e.name for e in idx.entries()] == ["a/b", "c", "d/e", "f/g", "h", "i"]
    assert idx.find("/a//b") == idx.find("a/b")
    assert idx.find("nope") is None and idx.find("a/b/c") is None


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../b", "a/..", "..", "a\x00b", "", "x/" + "y" * 256, "z/" * 2100 + "f", "\ud800"],
)
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(TOCError):
        mk([reg(name)])


def test_non_directory_root_refused() -> None:
    with pytest.raises(TOCError):
        mk([reg("./")])
    with pytest.raises(TOCError):
        mk([{"name": "/", "type": "symlink", "linkName": "x"}])


def test_long_names_limits() -> None:
    ok = mk([reg("a" * 255 + "/" + "b" * 255)])
    assert ok.find("a" * 255 + "/" + "b" * 255) is not None
    with pytest.raises(LimitExceededError):
        mk([reg("a" * 256)])


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "x", "type": "socket"},
        {"name": "x"},
        {"type": "reg"},
        {"name": 5, "type": "reg"},
        {"name": "x", "type": "reg", "size": "5"},
        {"name": "x", "type": "reg", "size": -1},
        {"name": "x", "type": "reg", "size": 1.5, "offset": 1, "chunkDigest": dg("x")},
        {"name": "x", "type": "reg", "uid": -1},
        {"name": "x", "type": "reg", "uid": 2**32},
        {"name": "x", "type": "reg", "gid": "0"},
        {"name": "x", "type": "reg", "mode": "0644"},
        {"name": "x", "type": "reg", "modtime": "yesterday"},
        {"name": "x", "type": "reg", "modtime": "2020-02-30T00:00:00Z"},
        {"name": "x", "type": "reg", "modtime": 5},
        {"name": "x", "type": "reg", "xattrs": {"user.a": "not base64!"}},
        {"name": "x", "type": "reg", "xattrs": ["user.a"]},
        {"name": "x", "type": "reg", "digest": "sha256:abc"},
        {"name": "x", "type": "reg", "digest": "md5:" + "0" * 32},
        {"name": "x", "type": "char", "devMajor": -1},
        {"name": "x", "type": "symlink", "linkName": 3},
        {"name": "x", "type": "symlink", "linkName": "a\x00b"},
        {"name": "x", "type": "symlink", "linkName": "a\ud800b"},
        {"name": "x", "type": "reg", "xattrs": {"user.\udc80": ""}},
        {"name": "x", "type": "reg", "size": 4},  # data without offset
        {"name": "x", "type": "reg", "size": 4, "offset": 5},  # no digest at all
        {"name": "x", "type": "reg", "size": 4, "offset": TOC_OFFSET, "chunkDigest": dg("x")},
        {"name": "x", "type": "reg", "size": 4, "offset": -1, "chunkDigest": dg("x")},
        {"name": "x", "type": "reg", "size": 4, "offset": 5, "chunkDigest": "sha256:" + "g" * 64},
        # layerstore.digest's grammar: lowercase hex only (bytes.fromhex alone took uppercase)
        {"name": "x", "type": "reg", "size": 4, "offset": 5, "chunkDigest": "sha256:" + "AB" * 32},
        {"name": "x", "type": "reg", "size": 4, "offset": 5, "chunkDigest": "SHA256:" + "a" * 64},
        {"name": "x", "type": "reg", "digest": "sha256:" + "A" * 64},
        {"name": "x", "type": "reg", "size": 4, "offset": 5, "chunkDigest": "sha512:" + "a" * 128},
        {
            "name": "x",
            "type": "reg",
            "size": 4,
            "offset": 5,
            "chunkSize": 8,
            "chunkDigest": dg("x"),
        },
        {
            "name": "x",
            "type": "reg",
            "size": 4,
            "offset": 5,
            "chunkOffset": 1,
            "chunkDigest": dg("x"),
        },
        {
            "name": "x",
            "type": "reg",
            "size": 4,
            "offset": 5,
            "innerOffset": -1,
            "chunkDigest": dg("x"),
        },
        {"name": "x", "type": "chunk", "offset": 5, "chunkOffset": 0, "chunkDigest": dg("x")},
        "not an object",
    ],
)
def test_bad_entries_refused(entry: Any) -> None:
    with pytest.raises(TOCError):
        mk([entry])


def chunked(
    name: str, size: int, parts: list[tuple[int, int, int]], **kw: Any
) -> list[dict[str, Any]]:
    """reg + chunk entries: parts are (offset, chunkOffset, chunkSize)."""
    off, co, cs = parts[0]
    out = [reg(name, size, offset=off, chunkSize=cs, chunkDigest=dg(f"{name}0"), **kw)]
    for i, (off, co, cs) in enumerate(parts[1:], 1):
        e: dict[str, Any] = {
            "name": name,
            "type": "chunk",
            "offset": off,
            "chunkOffset": co,
            "chunkDigest": dg(f"{name}{i}"),
        }
        if cs:
            e["chunkSize"] = cs
        out.append(e)
    return out


def test_chunks_compressed_end_and_chunk_at() -> None:
    idx = mk(
        [
            reg("small", 10, offset=50),
            *chunked("big", 250, [(100, 0, 100), (200, 100, 100), (300, 200, 0)]),
            reg("last", 5, offset=400),
        ],
        toc_offset=1000,
    )
    big = idx.find("big")
    assert big is not None
    cs = idx.chunks(big)
    assert len(cs) == 3
    assert [(c.offset, c.compressed_end, c.chunk_offset, c.chunk_size) for c in cs] == [
        (100, 200, 0, 100),
        (200, 300, 100, 100),
        (300, 400, 200, 50),
    ]
    assert cs[-1].digest == dg("big2") and cs[0].digest == dg("big0")
    assert [idx.chunk_at(big, o) for o in (0, 99, 100, 199, 200, 249)] == [0, 0, 1, 1, 2, 2]
    for bad in (-1, 250):
        with pytest.raises(ValueError):
            idx.chunk_at(big, bad)
    assert idx.chunks(idx.find("small") or 0)[0].compressed_end == 100
    assert idx.chunks(idx.find("last") or 0)[0].compressed_end == 1000  # the TOC offset
    raw = [e for e in idx.entries() if e.name == "big"]
    assert [(e.type, e.chunk_offset, e.chunk_size) for e in raw] == [
        ("reg", 0, 100),
        ("chunk", 100, 100),
        ("chunk", 200, 0),
    ]
    assert idx.num_entries == 5
    assert len(idx.all_chunks()) == 5
    # the first chunks' digests alone (what an open advises), for every inode and count
    for ino in range(1, idx.num_inodes + 1):
        for n in (0, 1, 2, 5):
            assert idx.first_chunk_digests(ino, n) == [c.digest for c in idx.chunks(ino)[:n]]
    assert idx.first_chunk_digests(big, 2) == [dg("big0"), dg("big1")]
    assert idx.first_chunk_digests(0, 1) == idx.first_chunk_digests(99, 1) == []


def test_inner_offset_chunks_share_a_member() -> None:
    idx = mk(
        [
            reg("a", 10, offset=100, innerOffset=0),
            reg("b", 20, offset=100, innerOffset=512),
            reg("c", 5, offset=300),
        ],
        toc_offset=400,
    )
    b = idx.chunks(idx.find("b") or 0)[0]
    assert (b.offset, b.compressed_end, b.inner_offset, b.chunk_size) == (100, 300, 512, 20)


@pytest.mark.parametrize(
    "entries",
    [
        chunked("f", 300, [(100, 0, 100), (200, 150, 100), (300, 250, 0)]),  # gap
        chunked("f", 300, [(100, 0, 100), (200, 100, 100)]),  # short cover
        chunked("f", 300, [(100, 0, 0), (200, 300, 0)]),  # chunk beyond the file
        [
            *chunked("f", 300, [(100, 0, 100)])[:1],
            reg("g"),
            {
                "name": "f",
                "type": "chunk",
                "offset": 200,
                "chunkOffset": 100,
                "chunkDigest": dg("x"),
            },
        ],
        [
            *chunked("f", 200, [(100, 0, 100), (200, 100, 0)])[:1],
            {
                "name": "other",
                "type": "chunk",
                "offset": 200,
                "chunkOffset": 100,
                "chunkDigest": dg("x"),
            },
        ],
        [
            *chunked("f", 200, [(100, 0, 100), (200, 100, 0)])[:1],
            {"name": "f", "type": "chunk", "offset": 200, "chunkOffset": 100},
        ],  # no chunkDigest
        [
            reg("e"),
            {"name": "e", "type": "chunk", "offset": 200, "chunkOffset": 0, "chunkDigest": dg("x")},
        ],
    ],
)
def test_bad_chunk_sequences_refused(entries: list[dict[str, Any]]) -> None:
    with pytest.raises(TOCError):
        mk(entries)


def test_legacy_digest_stands_in_for_a_single_chunk() -> None:
    idx = mk([{"name": "f", "type": "reg", "size": 3, "offset": 7, "digest": dg("abc")}])
    c = idx.chunks(idx.find("f") or 0)[0]
    assert c.digest == dg("abc") and c.chunk_size == 3
    with pytest.raises(TOCError):  # several chunks without chunkDigest cannot be verified
        mk(
            [
                {
                    "name": "f",
                    "type": "reg",
                    "size": 3,
                    "offset": 7,
                    "chunkSize": 1,
                    "digest": dg("abc"),
                }
            ]
        )


def test_rfc3339_modtime() -> None:
    """modtime goes through layerstore.common.timefmt; its ValueError becomes a TOCError."""

    def mtime(s: str) -> int:
        idx = mk([reg("x", modtime=s)])
        return idx.getattr(idx.find("x") or 0).mtime_ns

    assert mtime("1970-01-01T00:00:00Z") == 0
    assert mtime("2020-09-13T12:26:40Z") == 1600000000 * 10**9
    assert mtime("2020-09-13T14:26:40.5+02:00") == 1600000000 * 10**9 + 500_000_000
    assert mtime("1969-12-31T23:59:59.000000001Z") == -999_999_999
    assert mtime("0001-01-01T00:00:00Z") == -(2**63)  # clamped
    assert mtime("") == 0  # absent
    for bad, why in (
        ("2020-09-13 12:26:40Z", "is not an RFC 3339 time"),
        ("2020-13-01T00:00:00Z", "is not a valid date"),
        ("2020-01-01T25:00:00Z", "is not a valid time"),
    ):
        with pytest.raises(TOCError, match=f"^modtime '{bad}' {why}$"):
            mk([reg("x", modtime=bad)])


@pytest.mark.parametrize(
    "doc",
    [
        b'{"version": 2, "entries": []}',
        b'{"entries": []}',
        b'{"version": 1}',
        b'{"version": 1, "entries": {}}',
        b'{"version": 1, "entries": [], "entries": []}',
        b'{"version": 1, "entries": []} x',
        b'{"version": 1, "entries": [}',
        b'{"version": 1, "entries": [{"name": "a", "type": "reg"} {"name": "b"}]}',
        b"[]",
        b"",
        b"\xff\xfe",
        b'{"version": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "entries": []}',
        b'{"version": true, "entries": []}',
    ],
)
def test_bad_documents_refused(doc: bytes) -> None:
    with pytest.raises(TOCError):
        TOCIndex.from_json(doc, toc_offset=TOC_OFFSET)


def test_whitespace_and_key_order_tolerated() -> None:
    doc = (
        b' {\n "entries" : [ {"name":"a","type":"reg"} ,\n\t{"name":"b","type":"dir"} ] '
        b',"version":1 } \n'
    )
    idx = TOCIndex.from_json(doc, toc_offset=TOC_OFFSET)
    assert names(idx) == ["a", "b"]
    assert TOCIndex.from_json(b'{"version":1,"entries":[]}', toc_offset=0).num_inodes == 1


def test_entry_limit() -> None:
    entries = [reg(f"f{i}") for i in range(50)]
    assert mk(entries, max_entries=50).num_inodes == 51
    with pytest.raises(LimitExceededError):
        mk(entries, max_entries=49)


def test_readdir_sorted_and_large_directory() -> None:
    idx = mk([reg(f"d/f{i:04d}") for i in reversed(range(300))])
    got = idx.readdir(idx.find("d") or 0)
    assert [n for n, _ in got] == [f"f{i:04d}" for i in range(300)]
    assert idx.readdir(idx.find("d") or 0) is got  # large listings are cached
    # inode numbers follow the TOC order, not the name order
    assert idx.find("d/f0299") == 3 and idx.find("d/f0000") == 302


def test_chunk_size_limit() -> None:
    big = 300 << 20
    with pytest.raises(LimitExceededError):
        mk([reg("f", big)])
    with pytest.raises(LimitExceededError):
        mk(
            [
                reg("f", big, chunkSize=1 << 20),
                {
                    "name": "f",
                    "type": "chunk",
                    "offset": 200,
                    "chunkOffset": 1 << 20,
                    "chunkDigest": dg("x"),
                },
            ]
        )
    ok = chunked("f", 512 << 20, [(100, 0, 256 << 20), (200, 256 << 20, 0)])
    assert mk(ok).getattr(2).size == 512 << 20


# --- random TOCs: either refused with TOCError or a consistent view ----------------------------
_GOOD = ["a", "b", "c", ".wh.a", ".wh..wh..opq", "ü"]
_RARE = [".wh.b", ".prefetch.landmark", "stargz.index.json", "..", ".", ""]
_TYPES = ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "bogus"]


def _component(draw: st.DrawFn) -> str:
    return draw(st.sampled_from(_RARE if draw(st.integers(0, 9)) == 0 else _GOOD))


@st.composite
def _random_entry(draw: st.DrawFn) -> dict[str, Any]:
    parts = [_component(draw) for _ in range(draw(st.integers(1, 3)))]
    name = "/".join(parts) + draw(st.sampled_from(["", "", "/"]))
    typ = draw(st.sampled_from(_TYPES[:3] * 4 + _TYPES))
    e: dict[str, Any] = {"name": name, "type": typ}
    rare = draw(st.integers(0, 9)) == 0
    if typ in ("reg", "chunk") and draw(st.booleans()):
        e["size"] = draw(st.sampled_from([-1, 3])) if rare else draw(st.sampled_from([5, 10]))
        e["offset"] = draw(st.sampled_from([10**6, -5])) if rare else draw(st.integers(0, 999))
        e["chunkDigest"] = dg(name)
        if draw(st.integers(0, 2)) == 0:
            e["chunkSize"] = draw(st.sampled_from([0, 5]))
        if typ == "chunk" or draw(st.integers(0, 4)) == 0:
            e["chunkOffset"] = draw(st.sampled_from([0, 5, 10]))
    if typ in ("symlink", "hardlink") or rare:
        e["linkName"] = "/".join(_component(draw) for _ in range(draw(st.integers(1, 2))))
    if typ in ("char", "block"):
        e["devMajor"] = draw(st.sampled_from([0, 1, 2**32] if rare else [0, 1]))
    if draw(st.integers(0, 3)) == 0:
        e["mode"] = draw(st.sampled_from([-1, "x"] if rare else [0o644, 0o4755]))
    if draw(st.integers(0, 6)) == 0:
        e["xattrs"] = {"user.x": draw(st.sampled_from(["!"] if rare else ["eA==", ""]))}
    return e


ACCEPTED: list[int] = []


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(_random_entry(), max_size=10))
def test_random_tocs_are_refused_or_consistent(entries: list[dict[str, Any]]) -> None:
    try:
        idx = mk(entries, toc_offset=1000)
    except TOCError:
        return
    n = idx.num_inodes
    seen: dict[int, int] = {}  # ino -> names pointing at it
    subdirs: dict[int, int] = {}
    stack = [idx.root_ino]
    visited_dirs = set()
    while stack:
        ino = stack.pop()
        assert ino not in visited_dirs
        visited_dirs.add(ino)
        listing = list(idx.readdir(ino))
        assert [x for x, _ in listing] == sorted(x for x, _ in listing)
        for child_name, child in listing:
            assert child_name and "/" not in child_name and child_name not in (".", "..")
            assert not child_name.startswith(".wh.")
            assert idx.lookup(ino, child_name) == child
            seen[child] = seen.get(child, 0) + 1
            a = idx.getattr(child)
            if stat.S_ISDIR(a.mode):
                subdirs[ino] = subdirs.get(ino, 0) + 1
                stack.append(child)
    assert set(seen) | {1} == set(range(1, n + 1))
    assert "stargz.index.json" not in [x for x, _ in idx.readdir(1)] or not stat.S_ISREG(
        idx.getattr(idx.find("stargz.index.json") or 0).mode
    )
    ACCEPTED.append(n)
    for ino in range(1, n + 1):
        a = idx.getattr(ino)
        assert a.ino == ino
        if stat.S_ISDIR(a.mode):
            assert a.nlink == 2 + subdirs.get(ino, 0)
        else:
            assert a.nlink == seen[ino]
        if stat.S_ISREG(a.mode):
            cs = idx.chunks(ino)
            assert sum(c.chunk_size for c in cs) == a.size
            pos = 0
            for i, c in enumerate(cs):
                assert c.chunk_offset == pos and 0 <= c.offset < c.compressed_end <= 1000
                assert idx.chunk_at(ino, pos) == i
                pos += c.chunk_size
        elif stat.S_ISLNK(a.mode):
            assert isinstance(idx.readlink(ino), str)
        idx.xattrs(ino)
    list(idx.entries())


def test_random_tocs_are_not_all_refused() -> None:
    """The property test above must exercise accepted TOCs, not only refusals."""
    if not ACCEPTED:
        test_random_tocs_are_refused_or_consistent()
    assert sum(1 for n in ACCEPTED if n > 2) >= 5, ACCEPTED


def test_entries_keep_whole_file_digests() -> None:
    entries = [
        reg("same", 3, digest=dg("same")),  # digest == chunkDigest
        reg("none", 3),  # chunkDigest only
        reg("empty", digest=dg("")),
        *chunked("multi", 10, [(200, 0, 5), (300, 5, 0)], digest=dg("whole")),
        d("dir"),
    ]
    got = {e.name: e.digest for e in mk(entries).entries() if e.type != "chunk"}
    assert got == {"same": dg("same"), "none": "", "empty": dg(""), "multi": dg("whole"), "dir": ""}
