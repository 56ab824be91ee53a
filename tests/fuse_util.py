"""FUSE test helpers, reusable by any test that mounts the store.

- :func:`mounted_ops`: mount a pyfuse3 Operations object in-process (trio in a thread).
- :func:`is_mounted`, :func:`wait_mounted`, :func:`wait_unmounted`, :func:`force_unmount`,
  :func:`mount_entry`: look at /proc/self/mountinfo and clean up.
- :class:`FakeLayer`, :class:`FakeIndex`, :class:`FakeManager`: an in-memory layer provider
  over a dict tree (paths -> :class:`Node`), shaped like
  ``layerstore.runtime.manager.LayerManager``.
- :func:`fake_provider_factory`: a ``STARGZ_STORE_PROVIDER_FACTORY`` for daemon subprocesses.

Mount tests need root and /dev/fuse; :func:`fuse_available` says whether they can run.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from layerstore import errors as lse
from tests.goref import GO_REFERENCE_ENV  # set by the go_reference fixture (conftest.py)


def fuse_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse is missing"
    if not any(
        os.access(os.path.join(d, "fusermount3"), os.X_OK)
        for d in os.environ.get("PATH", "/usr/bin").split(":")
    ):
        return False, "fusermount3 is not installed"
    return True, ""


# --- /proc/self/mountinfo -------------------------------------------------------------------------


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_entry(path: str | Path) -> dict[str, str] | None:
    """The mountinfo entry of the last mount on ``path``: mountpoint, options, fstype, source."""
    target = os.path.realpath(str(path))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            rparts = right.split()
            if _unescape(parts[4]) == target:
                found = {
                    "mountpoint": target,
                    "device": parts[2],
                    "options": parts[5],
                    "fstype": rparts[0],
                    "source": rparts[1] if len(rparts) > 1 else "",
                    "super_options": rparts[2] if len(rparts) > 2 else "",
                }
    return found


def is_mounted(path: str | Path) -> bool:
    return mount_entry(path) is not None


def wait_mounted(path: str | Path, timeout: float = 10.0, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode} before mounting {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not mounted after {timeout}s")
        time.sleep(0.02)


def wait_unmounted(path: str | Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} still mounted after {timeout}s")
        time.sleep(0.02)


def force_unmount(path: str | Path) -> None:
    """Unmount every mount on ``path``: fusermount3 -u, then umount -l as the fallback."""
    for _ in range(5):
        if not is_mounted(path):
            return
        r = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=10)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def abort_connection(device: str) -> None:
    """Abort the FUSE connection of mount device ``0:NN`` (ends its server loop)."""
    minor = device.partition(":")[2]
    with contextlib.suppress(OSError):
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


# --- in-process mount -----------------------------------------------------------------------------


@contextlib.contextmanager
def mounted_ops(ops: Any, mountpoint: str | Path, options: set[str]) -> Iterator[Path]:
    """Mount ``ops`` on ``mountpoint`` and serve it from a trio loop in a thread.

    pyfuse3 keeps one session per process: do not nest. Always unmounts on exit.
    """
    import pyfuse3
    import trio

    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    pyfuse3.init(ops, str(mp), options)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            trio.run(pyfuse3.main)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=serve, name="fuse-test-loop", daemon=True)
    thread.start()
    entry = mount_entry(mp)
    device = entry["device"] if entry else ""
    try:
        yield mp
    finally:
        # Unmounting ends pyfuse3.main (the session sees ENODEV).
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, timeout=10)
        thread.join(10)
        if thread.is_alive() or is_mounted(mp):
            force_unmount(mp)
            thread.join(5)
        if thread.is_alive() and device:
            abort_connection(device)  # a lazily detached mount still held open somewhere
            thread.join(5)
        if not thread.is_alive():
            pyfuse3.close(unmount=False)
    if errors:
        raise AssertionError(f"FUSE loop failed: {errors[0]!r}") from errors[0]


# --- an in-memory layer provider ------------------------------------------------------------------


@dataclass
class Node:
    """One entry of a fake layer (overlay view: whiteouts already char 0/0)."""

    mode: int
    data: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    mtime_ns: int = 1_700_000_000_000_000_000
    xattrs: dict[str, bytes] = field(default_factory=dict)
    link_to: str = ""  # hardlink: path of the entry whose inode this shares
    error: BaseException | None = None  # raised by read()


def file(data: bytes, mode: int = 0o644, **kw: Any) -> Node:
    return Node(stat.S_IFREG | mode, data=data, **kw)


def directory(mode: int = 0o755, **kw: Any) -> Node:
    return Node(stat.S_IFDIR | mode, **kw)


def symlink(target: str) -> Node:
    return Node(stat.S_IFLNK | 0o777, target=target)


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime_ns: int


class FakeIndex:
    """A TOCIndex-shaped view of ``{path: Node}`` (implied parents become 0755 dirs)."""

    root_ino = 1

    def __init__(self, tree: Mapping[str, Node]) -> None:
        nodes: dict[str, Node] = {"": directory()}
        for path, node in tree.items():
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                nodes.setdefault("/".join(parts[:i]), directory())
            nodes["/".join(parts)] = node
        self._ino_of: dict[str, int] = {}
        self._nodes: dict[int, Node] = {}
        self._children: dict[int, dict[str, int]] = {}
        self._nlink: dict[int, int] = {}
        self._sorted: dict[int, tuple[tuple[str, int], ...]] = {}
        for path in sorted(nodes, key=lambda p: (p.count("/"), p)):
            node = nodes[path]
            if node.link_to:
                ino = self._ino_of[node.link_to.strip("/")]
            else:
                ino = len(self._nodes) + 1
                self._nodes[ino] = node
            self._ino_of[path] = ino
            self._nlink[ino] = self._nlink.get(ino, 0) + 1
            if path:
                parent = self._ino_of[path.rpartition("/")[0]]
                self._children.setdefault(parent, {})[path.rpartition("/")[2]] = ino
        self.num_inodes = len(self._nodes)

    def ino(self, path: str) -> int:
        return self._ino_of[path.strip("/")]

    def lookup(self, parent_ino: int, name: str) -> int | None:
        return self._children.get(parent_ino, {}).get(name)

    def getattr(self, ino: int) -> Attr:
        n = self._nodes[ino]
        if stat.S_ISDIR(n.mode):
            nlink = 2 + sum(
                1 for c in self._children.get(ino, {}).values() if stat.S_ISDIR(self._nodes[c].mode)
            )
        else:
            nlink = self._nlink[ino]
        size = len(n.target.encode()) if stat.S_ISLNK(n.mode) else len(n.data)
        return Attr(ino, n.mode, nlink, n.uid, n.gid, size, n.rdev, n.mtime_ns)

    def readdir(self, ino: int) -> Sequence[tuple[str, int]]:
        cached = self._sorted.get(ino)
        if cached is None:
            cached = self._sorted[ino] = tuple(sorted(self._children.get(ino, {}).items()))
        return cached

    def readlink(self, ino: int) -> str:
        return self._nodes[ino].target

    def xattrs(self, ino: int) -> dict[str, bytes]:
        return dict(self._nodes[ino].xattrs)

    def node(self, ino: int) -> Node:
        return self._nodes[ino]


class FakeLayer:
    def __init__(
        self,
        tree: Mapping[str, Node],
        blob: bytes | None = None,
        blob_error: BaseException | None = None,
    ) -> None:
        self.index = FakeIndex(tree)
        self.blob = blob if blob is not None else json.dumps(sorted(tree)).encode() * 3
        self.blob_size = len(self.blob)
        self.compressed_digest = "sha256:" + hashlib.sha256(self.blob).hexdigest()
        self.toc_digest = "sha256:" + hashlib.sha256(b"toc" + self.blob).hexdigest()
        self.blob_error = blob_error
        self.reads: list[tuple[int, int, int]] = []

    def info_json(self, scheme: str) -> bytes:
        if scheme == "toc":
            body: dict[str, Any] = {"toc-digest": self.toc_digest, "diff-size": -1}
        else:
            body = {"compressed-diff-digest": self.compressed_digest}
        body.update({"compressed-size": self.blob_size, "compression": 2})
        return json.dumps(body).encode()

    def read(self, ino: int, offset: int, size: int) -> bytes:
        self.reads.append((ino, offset, size))
        node = self.index.node(ino)
        if node.error is not None:
            raise node.error
        return node.data[offset : offset + size]

    def read_blob(self, offset: int, size: int) -> bytes:
        if self.blob_error is not None:
            raise self.blob_error
        return self.blob[offset : offset + size]


class FakeManager:
    """``get/use/release`` over registered layers; records every call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.layers: dict[tuple[str, str], FakeLayer] = {}
        self.errors: dict[tuple[str, str], BaseException] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.delay = delay
        self._lock = threading.Lock()

    def add(self, ref: str, layer: FakeLayer) -> FakeLayer:
        self.layers[(ref, layer.compressed_digest)] = layer
        self.layers[(ref, layer.toc_digest)] = layer
        return layer

    def _record(self, op: str, ref: str, key: str) -> None:
        with self._lock:
            self.calls.append((op, ref, key))

    def count(self, op: str) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c[0] == op)

    def get(self, ref: str, key: str) -> FakeLayer:
        self._record("get", ref, key)
        if self.delay:
            time.sleep(self.delay)
        if (ref, key) in self.errors:
            raise self.errors[(ref, key)]
        try:
            return self.layers[(ref, key)]
        except KeyError:
            raise lse.LayerNotFoundError(f"{ref} has no layer {key}") from None

    def use(self, ref: str, key: str) -> None:
        self._record("use", ref, key)

    def release(self, ref: str, key: str) -> None:
        self._record("release", ref, key)


def b64(ref: str) -> str:
    return base64.b64encode(ref.encode()).decode()


# --- a standard fake tree ------------------------------------------------------------------------

REF = "registry.example:5000/library/sample:1.0"


def sample_tree() -> dict[str, Node]:
    opaque = {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"}
    return {
        "etc/hostname": file(b"sample\n"),
        "etc/big": file(bytes(range(256)) * 4096),  # 1 MiB
        "etc/shadow": file(b"root:*:1::::::\n", mode=0o600),
        "etc/hard": file(b"shared inode\n"),
        "etc/hard2": Node(0, link_to="etc/hard"),
        "bin/su": file(b"\x7fELF", mode=0o4755),
        "bin/sh": symlink("busybox"),
        "dev/null": Node(stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
        "run/fifo": Node(stat.S_IFIFO | 0o600),
        "var/deleted": Node(stat.S_IFCHR, rdev=0),  # a whiteout in overlay form
        "opaque": directory(xattrs=opaque),
        "opaque/kept": file(b"k"),
        "home/user/owned": file(b"u", uid=1000, gid=1000),
        "broken/bad": file(b"x" * 10, error=lse.ChunkDigestMismatchError("chunk mismatch")),
        "broken/crash": file(b"x" * 10, error=RuntimeError("bug")),
        "broken/remote": file(b"x" * 10, error=lse.RegistryUnavailableError("down")),
    }


def fake_provider_factory(config: Any, root: Path) -> FakeManager:
    """``STARGZ_STORE_PROVIDER_FACTORY=tests.fuse_util:fake_provider_factory`` for daemons."""
    mgr = FakeManager()
    mgr.add(REF, FakeLayer(sample_tree()))
    return mgr


def run_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """Run ``fn`` in a thread; raise if it does not finish (a hung FUSE call fails the test)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"call did not return within {timeout}s")
    if errors:
        raise errors[0]
    return result[0]


# --- the real LayerManager over the Go reference blobs (no registry) ------------------------------

GO_REF_IMAGE = "registry.example/go-reference:v1"
GO_BLOBS = ("ref-small", "ref-chunked-64k", "ref-prioritized")


@dataclass(frozen=True)
class GoBlob:
    name: str
    data: bytes
    digest: str
    toc_digest: str
    diff_id: str


def go_blobs(directory: Path | None = None) -> list[GoBlob]:
    """The Go-written blobs of the session's ``go_reference`` directory (by default the one
    named by ``$STARGZ_TEST_GO_REFERENCE``, which the fixture sets for daemon subprocesses)."""
    if directory is None:
        directory = Path(os.environ[GO_REFERENCE_ENV])
    out = []
    for name in GO_BLOBS:
        meta = json.loads((directory / f"{name}.json").read_text())
        data = (directory / f"{name}.esgz").read_bytes()
        out.append(GoBlob(name, data, meta["digest"], meta["tocDigest"], meta["diffID"]))
    return out


class _LocalClient:
    """Just enough of RegistryClient for LayerManager: one image of the Go blobs, in memory."""

    def __init__(self, blobs: list[GoBlob]) -> None:
        from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
        from layerstore.registry.manifest import Descriptor
        from testbed.resolved import resolved_image

        media = "application/vnd.oci.image.layer.v1.tar+gzip"
        layers = [
            Descriptor(media, b.digest, len(b.data), {TOC_DIGEST_ANNOTATION: b.toc_digest})
            for b in blobs
        ]
        self.image = resolved_image(GO_REF_IMAGE, layers, [b.diff_id for b in blobs])
        self.blobs = {b.digest: b.data for b in blobs}

    def resolve(self, ref: Any, platform: str | None = None) -> Any:
        if str(ref) != GO_REF_IMAGE:
            raise lse.NotFoundError(f"{ref}: manifest unknown")
        return self.image

    def blob_source(self, ref: Any, digest: str, size: int) -> Any:
        from layerstore.source import BytesSource

        return BytesSource(self.blobs[digest])


def go_reference_provider_factory(config: Any, root: Path) -> Any:
    """``STARGZ_STORE_PROVIDER_FACTORY=tests.fuse_util:go_reference_provider_factory``: the real
    LayerManager, Layer, TOC index and chunk cache, with the Go blobs as the registry."""
    from layerstore.runtime.cache import ChunkCache
    from layerstore.runtime.manager import LayerManager

    cache = ChunkCache(root / "cache", 1 << 30)
    return LayerManager(_LocalClient(go_blobs()), cache)


class SlowLayer(FakeLayer):
    """Reads of file data block for ``delay`` seconds (a registry that hangs)."""

    delay = 60.0

    def read(self, ino: int, offset: int, size: int) -> bytes:
        time.sleep(self.delay)
        return super().read(ino, offset, size)


SLOW_BLOB = b"slow layer blob"


def slow_provider_factory(config: Any, root: Path) -> FakeManager:
    mgr = FakeManager()
    mgr.add(REF, SlowLayer({"slow": file(b"never served in time")}, blob=SLOW_BLOB))
    return mgr
