"""Reference blobs written by the Go library, made by the test session itself.

``small.tar`` (built here, byte for byte the same on every run) holds one of each kind of
entry a layer can have: a directory tree, an empty file, a symlink, a hardlink, a 300,000-byte
pseudo-random file owned by 1000:1000, a whiteout ``etc/.wh.removed``, an opaque marker
``var/.wh..wh..opq``, a character device 5/0, a fifo and a file with the xattr ``user.k=v``;
every mtime is 1600000000. The Go writer (``estargz-peer build``, i.e. ``estargz.Build`` of
Debian's stargz-snapshotter 0.12) turns it into:

| blob | writer options |
| --- | --- |
| ref-small.esgz | defaults (4 MiB chunks, no prioritized files: ``.no.prefetch.landmark`` first) |
| ref-chunked-64k.esgz | chunk size 65536: ``app/data.bin`` is split into 5 chunks |
| ref-prioritized.esgz | prioritized ``app/main.py``, ``var/x``, then ``.prefetch.landmark`` |

and ``X.json`` beside ``X.esgz`` gives what the writer reported: ``digest``, ``size``,
``diffID``, ``tocDigest``, ``uncompressedSize`` (of ``small.tar``) and ``diffSize``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from testbed import pseudo_random
from testbed.gopeer import go_build

#: Daemons started by the tests find the session's blobs through this variable
#: (``tests.fuse_util.go_reference_provider_factory``); the ``go_reference`` fixture sets it.
GO_REFERENCE_ENV = "STARGZ_TEST_GO_REFERENCE"
MTIME = 1_600_000_000
DATA_SIZE = 300_000
BLOBS: dict[str, dict[str, Any]] = {
    "ref-small": {},
    "ref-chunked-64k": {"chunk_size": 65536},
    "ref-prioritized": {"prioritized": ["app/main.py", "var/x"]},
}


def small_tar() -> bytes:
    def info(name: str, typ: bytes, mode: int = 0o644, **kw: Any) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = typ
        ti.mode = mode
        ti.mtime = MTIME
        for k, v in kw.items():
            setattr(ti, k, v)
        return ti

    files: list[tuple[tarfile.TarInfo, bytes]] = [
        (info("app", tarfile.DIRTYPE, 0o755), b""),
        (info("app/main.py", tarfile.REGTYPE), b"print('hi')\n"),
        (info("app/empty", tarfile.REGTYPE), b""),
        (info("app/link", tarfile.SYMTYPE, 0o777, linkname="main.py"), b""),
        (info("app/hard", tarfile.LNKTYPE, linkname="app/main.py"), b""),
        (info("app/data.bin", tarfile.REGTYPE, uid=1000, gid=1000), pseudo_random(DATA_SIZE, 12)),
        (info("etc", tarfile.DIRTYPE, 0o755), b""),
        (info("etc/.wh.removed", tarfile.REGTYPE), b""),
        (info("var", tarfile.DIRTYPE, 0o755), b""),
        (info("var/.wh..wh..opq", tarfile.REGTYPE), b""),
        (info("var/tty", tarfile.CHRTYPE, 0o666, devmajor=5, devminor=0), b""),
        (info("var/pipe", tarfile.FIFOTYPE), b""),
        (info("var/x", tarfile.REGTYPE, pax_headers={"SCHILY.xattr.user.k": "v"}), b"xattr\n"),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in files:
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def build_go_reference(directory: Path) -> Path:
    """Write ``small.tar`` and the three Go-written blobs with their ``.json`` into
    *directory* (raises ``testbed.gopeer.GoPeerUnavailable`` without the Go peers)."""
    directory.mkdir(parents=True, exist_ok=True)
    tar = directory / "small.tar"
    tar.write_bytes(small_tar())
    for name, opts in BLOBS.items():
        res = go_build(tar, directory / f"{name}.esgz", **opts)
        assert not res.missed_prioritized, res
        (directory / f"{name}.json").write_text(json.dumps(res.meta(), sort_keys=True) + "\n")
    return directory
