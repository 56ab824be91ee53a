"""Attributes of layer nodes through a real mount over a real TOCIndex: the same whichever
request built them first (lookup, readdirplus, getattr), across hardlinks, whiteouts, opaque
directories and devices, and again after the kernel forgot every inode (the adapter's
per-inode attribute cache is then dropped and rebuilt)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from layerstore.estargz.toc import TOCIndex
from stargz_store.config import FuseSettings
from stargz_store.fusefs import StoreOperations, ino_base_of, mount_options
from tests import fuse_util as fu

ok, why = fu.fuse_available()
pytestmark = [pytest.mark.fuse, pytest.mark.skipif(not ok, reason=why), pytest.mark.timeout(120)]

REF = "registry.example:5000/attrs/test:v1"
MT = "2023-11-14T22:13:20.5Z"
MT_NS = 1_700_000_000_500_000_000


def dg(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


ENTRIES: list[dict[str, Any]] = [
    {"name": "bin/", "type": "dir", "mode": 0o755, "modtime": MT},
    {"name": "bin/busybox", "type": "reg", "size": 5000, "mode": 0o4755, "uid": 0, "gid": 0,
     "modtime": MT, "offset": 100, "chunkDigest": dg("bb")},
    {"name": "bin/sh", "type": "hardlink", "linkName": "bin/busybox"},
    {"name": "bin/ls", "type": "hardlink", "linkName": "bin/busybox"},
    {"name": "bin/vi", "type": "symlink", "linkName": "busybox", "modtime": MT},
    {"name": "home/user/notes.txt", "type": "reg", "size": 3, "mode": 0o600, "uid": 1000,
     "gid": 1001, "offset": 200, "chunkDigest": dg("n")},
    {"name": "etc/.wh.passwd", "type": "reg", "modtime": MT},
    {"name": "etc/group", "type": "reg", "size": 0, "mode": 0o644},
    {"name": "opt/", "type": "dir", "mode": 0o750, "uid": 7, "gid": 8},
    {"name": "opt/.wh..wh..opq", "type": "reg"},
    {"name": "opt/app", "type": "reg", "size": 1, "offset": 300, "chunkDigest": dg("a")},
    {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o666},
    {"name": "dev/sda", "type": "block", "devMajor": 8, "devMinor": 0, "mode": 0o660},
    {"name": "run/fifo", "type": "fifo", "mode": 0o600},
    *({"name": f"many/f{i:04d}", "type": "reg", "size": i, "mode": 0o644, "uid": i % 3,
       **({"offset": 400 + i, "chunkDigest": dg(str(i))} if i else {})} for i in range(600)),
]  # fmt: skip


@dataclass
class Mounted:
    mp: Path
    ops: StoreOperations
    index: TOCIndex
    digest: str

    @property
    def diff(self) -> Path:
        return self.mp / fu.b64(REF) / self.digest / "diff"


class _Layer:
    def __init__(self, index: TOCIndex) -> None:
        self.index = index
        self.blob_size = 10_000
        self.compressed_digest = dg("blob")
        self.toc_digest = dg("toc")

    def info_json(self, scheme: str) -> bytes:
        return b"{}"

    def read(self, ino: int, offset: int, size: int) -> bytes:
        return b"\0" * size

    def read_blob(self, offset: int, size: int) -> bytes:
        return b"\0" * size


class _Provider:
    def __init__(self, layer: _Layer) -> None:
        self.layer = layer

    def get(self, ref: str, key: str) -> _Layer:
        return self.layer

    def use(self, ref: str, key: str) -> None:
        return None

    def release(self, ref: str, key: str) -> None:
        return None


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    doc = json.dumps({"version": 1, "entries": ENTRIES}).encode()
    index = TOCIndex.from_json(doc, toc_offset=5000)
    layer = _Layer(index)
    settings = FuseSettings(store_dir_timeout=0.0)
    ops = StoreOperations(_Provider(layer), settings)
    mp = tmp_path_factory.mktemp("attrs") / "mnt"
    with fu.mounted_ops(ops, mp, mount_options(settings)) as m:
        yield Mounted(m, ops, index, layer.compressed_digest)


def expected(m: Mounted, path: str) -> tuple[int, ...]:
    local = m.index.find(path)
    assert local is not None
    a = m.index.getattr(local)
    base = ino_base_of(m.ops, m.digest)
    assert base is not None
    return (base + local, a.mode, a.nlink, a.uid, a.gid, a.size, a.rdev, a.mtime_ns)


def seen(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_rdev,
            st.st_mtime_ns)  # fmt: skip


def all_paths(m: Mounted) -> list[str]:
    out = []
    stack = [""]
    while stack:
        d = stack.pop()
        for name, child in m.index.readdir(m.index.find(d) or 0):
            p = f"{d}/{name}" if d else name
            out.append(p)
            if m.index.is_dir(child):
                stack.append(p)
    return sorted(out)


def forget_all(m: Mounted) -> None:
    deadline = time.monotonic() + 10
    while m.ops._blocks[m.digest].layer is not None:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        time.sleep(0.1)
        assert time.monotonic() < deadline, "the kernel did not forget the inodes"
    assert m.ops._blocks[m.digest].attrs == {}


def test_new_entry_attributes_are_zeroed() -> None:
    """The adapter sets only the non-zero fields of a new EntryAttributes."""
    a = pyfuse3.EntryAttributes()
    assert (a.st_uid, a.st_gid, a.st_rdev, a.st_size, a.st_blocks, a.generation) == (0,) * 6
    assert (a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns) == (0, 0, 0)


def test_attributes_by_lookup_then_listing_then_again(mounted: Mounted) -> None:
    m = mounted
    if m.digest in m.ops._blocks:  # another test looked first
        forget_all(m)
    paths = all_paths(m)
    # first by lookup (stat by path, no listing yet), every path
    by_lookup = {p: seen(os.lstat(m.diff / p)) for p in paths}
    assert by_lookup == {p: expected(m, p) for p in paths}
    # then through readdirplus listings, and getattr of what they returned
    listed: dict[str, tuple[int, ...]] = {}
    for root, dirs, files in os.walk(m.diff):
        for n in dirs + files:
            p = os.path.relpath(os.path.join(root, n), m.diff)
            listed[p] = seen(os.lstat(os.path.join(root, n)))
    assert listed == by_lookup


def test_attributes_by_listing_first_and_after_forget(mounted: Mounted) -> None:
    m = mounted
    forget_all(m)
    # listing first: attributes built by readdirplus
    listed = {
        os.path.relpath(e.path, m.diff): seen(e.stat(follow_symlinks=False))
        for e in _scandir_all(m.diff)
    }
    assert listed == {p: expected(m, p) for p in all_paths(m)}
    forget_all(m)
    again = {p: seen(os.lstat(m.diff / p)) for p in listed}
    assert again == listed


def _scandir_all(top: Path) -> Iterator[os.DirEntry[str]]:
    with os.scandir(top) as it:
        entries = list(it)
    for e in entries:
        yield e
        if e.is_dir(follow_symlinks=False):
            yield from _scandir_all(Path(e.path))


def test_overlay_semantics_through_the_mount(mounted: Mounted) -> None:
    m = mounted
    busybox, sh, ls = (os.lstat(m.diff / "bin" / n) for n in ("busybox", "sh", "ls"))
    assert busybox.st_ino == sh.st_ino == ls.st_ino and busybox.st_nlink == 3
    assert stat.S_IMODE(busybox.st_mode) == 0o4755
    wh = os.lstat(m.diff / "etc" / "passwd")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert not os.path.lexists(m.diff / "etc" / ".wh.passwd")
    assert os.getxattr(m.diff / "opt", "trusted.overlay.opaque") == b"y"
    assert ".wh..wh..opq" not in os.listdir(m.diff / "opt")
    opt = os.lstat(m.diff / "opt")
    assert (opt.st_uid, opt.st_gid, stat.S_IMODE(opt.st_mode)) == (7, 8, 0o750)
    null = os.lstat(m.diff / "dev" / "null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
    assert os.minor(null.st_rdev) == 3
    assert stat.S_ISBLK(os.lstat(m.diff / "dev" / "sda").st_mode)
    assert stat.S_ISFIFO(os.lstat(m.diff / "run" / "fifo").st_mode)
    vi = os.lstat(m.diff / "bin" / "vi")
    assert stat.S_ISLNK(vi.st_mode) and vi.st_size == len("busybox")
    assert vi.st_mtime_ns == MT_NS
    assert os.readlink(m.diff / "bin" / "vi") == "busybox"
    assert len(os.listdir(m.diff / "many")) == 600
    # a large directory read in several readdirplus calls: each entry once, in order
    assert os.listdir(m.diff / "many") == [f"f{i:04d}" for i in range(600)]
