"""Issue 4's "Must show", end to end: ``stargz-store convert`` pushes an edge-case image to a real
``docker-registry`` on loopback, the daemon (a subprocess, real wiring) serves it over FUSE.

- ``diff/`` against the source tar entry by entry, under both key schemes; ``info``, ``blob``,
  ``use`` and release (``rmdir``);
- a chunk corrupted in the registry's storage: EIO where it is touched, right data elsewhere;
- the registry stopping (hung with SIGSTOP, or killed and restarted on the same port and storage):
  EIO within the configured timeouts, serving again afterwards;
- SIGTERM while reader threads hang on the registry: clean unmount, exit 0;
- a daemon restart on the same ``--root``: chunks read before come from the persistent cache;
- lookups the store cannot serve (not eStargz, unknown or invalid key, bad base64, unparsable
  reference, blocked registry) answer ENOENT within 2 s.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from layerstore.estargz.reader import EStargzReader
from layerstore.source import BytesSource
from testbed import (
    BuiltLayer,
    RegistryHTTP,
    StoreDaemon,
    gzip_bytes,
    image_config,
    push_image,
    read_image,
    sha256_digest,
    write_image,
)
from tests import fuse_util as fu
from tests.image_util import convert
from tests.registry_fixtures import free_port, registry_binary

ok, why = fu.fuse_available()
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.registry,
    pytest.mark.skipif(not ok, reason=why),
    pytest.mark.skipif(registry_binary() is None, reason="no docker-registry binary"),
    pytest.mark.timeout(240),
]

TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
CHUNK = 4096  # --chunk-size: multi-chunk files stay small

# The daemon's registry timeouts in these tests; EIO must come within their budget.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 3.0
RETRIES = 1
EIO_BUDGET = (CONNECT_TIMEOUT + READ_TIMEOUT) * (RETRIES + 1) + 10.0


# --- a docker-registry that can be stopped, hung and restarted on the same port and storage ------


class Registry:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = workdir / "config.yml"
        self.config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: stargz-store-test\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = registry_binary()
        assert binary is not None
        with open(self.workdir / "registry.log", "ab") as out:
            self.proc = subprocess.Popen(
                [binary, "serve", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
            )
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, (self.workdir / "registry.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                    return
            except (OSError, urllib.error.URLError):
                pass
            assert time.monotonic() < deadline, "docker-registry did not come up"
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)  # accepts connections (kernel backlog), answers none

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def blob_file(self, digest: str) -> Path:
        hex_ = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("als-registry"))
    r.start()
    yield r
    r.stop()


@pytest.fixture
def live_reg(reg: Registry) -> Iterator[Registry]:
    """The module's registry, running again after the test whatever the test did to it."""
    if not reg.running():
        reg.start()
    yield reg
    if reg.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            reg.proc.send_signal(signal.SIGCONT)
    if not reg.running():
        reg.start()


# --- the edge-case source tar ---------------------------------------------------------------------

T0 = 1_600_000_000


@dataclass
class Member:
    name: str
    kind: str  # dir reg sym lnk chr blk fifo
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = T0
    data: bytes = b""
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)


def edge_members(seed: int) -> list[Member]:
    rnd = random.Random(seed)
    big = rnd.randbytes(10 * CHUNK + 123)  # 11 chunks, incompressible
    medium = rnd.randbytes(2 * CHUNK + 7)
    long_dir = "long/" + "d" * 150
    return [
        Member("etc", "dir", 0o755, mtime=T0 + 1),
        Member("etc/hostname", "reg", 0o644, data=b"edge-%d\n" % seed),
        Member("etc/empty", "reg", 0o644, mtime=1_234_567_890),
        Member("etc/shadow", "reg", 0o640, gid=42, data=b"root:*:1::::::\n"),
        Member("data", "dir", 0o750, uid=1000, gid=2000, mtime=T0 + 2),
        Member("data/nested", "dir", 0o700, uid=1000, gid=2000, xattrs={"user.dir": "d"}),
        Member("data/nested/deeper", "dir", 0o755, uid=1001, gid=2001),
        Member("data/nested/deeper/leaf.txt", "reg", 0o644, uid=1001, gid=2001, data=b"leaf\n"),
        Member("data/big.bin", "reg", 0o600, uid=1000, gid=2000, data=big, mtime=2_000_000_000),
        Member("data/medium.bin", "reg", 0o644, data=medium),
        Member("data/small.txt", "reg", 0o644, data=b"small file next to big.bin\n" * 3),
        Member("data/xattr.txt", "reg", 0o644, data=b"x\n", xattrs={"user.comment": "hé llo"}),
        Member("data/link-rel", "sym", 0o777, link="nested/deeper/leaf.txt"),
        Member("data/link-abs", "sym", 0o777, uid=1000, link="/etc/hostname"),
        Member("data/dangling", "sym", 0o777, link="does/not/exist"),
        Member("hard", "dir", 0o755),
        Member("hard/a", "reg", 0o640, uid=7, gid=8, data=b"one inode, three names\n"),
        Member("hard/b", "lnk", 0o640, uid=7, gid=8, link="hard/a"),
        Member("hard/c", "lnk", 0o640, uid=7, gid=8, link="hard/a"),
        Member("dev", "dir", 0o755),
        Member("dev/null", "chr", 0o666, dev=(1, 3)),
        Member("dev/sda", "blk", 0o660, gid=6, dev=(8, 0)),
        Member("dev/fifo", "fifo", 0o600),
        Member("bin", "dir", 0o755),
        Member("bin/su", "reg", 0o4755, data=b"\x7fELF su"),
        Member("bin/wall", "reg", 0o2755, gid=5, data=b"\x7fELF wall"),
        Member("bin/all", "reg", 0o6711, data=b"\x7fELF all"),
        Member("tmp", "dir", 0o1777),
        Member("wh", "dir", 0o755),
        Member("wh/.wh.gone", "reg", 0o644),
        Member("wh/kept", "reg", 0o644, data=b"kept\n"),
        Member("opq", "dir", 0o755),
        Member("opq/.wh..wh..opq", "reg", 0o644),
        Member("opq/inside", "reg", 0o644, data=b"inside\n"),
        Member("long", "dir", 0o755),
        Member(long_dir, "dir", 0o755),
        Member(f"{long_dir}/{'f' * 250}", "reg", 0o644, data=b"long name\n"),
        Member("unicode", "dir", 0o755),
        Member("unicode/日本語", "dir", 0o755),
        Member("unicode/日本語/ファイル.txt", "reg", 0o644, data="内容\n".encode()),
        Member("unicode/émoji-😀 and space.txt", "reg", 0o644, data=b"e\n"),
    ]


def content_of(members: dict[str, Member], name: str) -> bytes:
    m = members[name]
    return members[m.link].data if m.kind == "lnk" else m.data


def build_tar(members: list[Member]) -> bytes:
    kinds = {
        "dir": tarfile.DIRTYPE,
        "reg": tarfile.REGTYPE,
        "sym": tarfile.SYMTYPE,
        "lnk": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "blk": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type = kinds[m.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = m.mode, m.uid, m.gid, m.mtime
            ti.linkname = m.link
            ti.devmajor, ti.devminor = m.dev
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in m.xattrs.items()}
            ti.size = len(m.data) if m.kind == "reg" else 0
            tf.addfile(ti, io.BytesIO(m.data) if m.kind == "reg" else None)
    return out.getvalue()


@dataclass(frozen=True)
class Want:
    """What ``diff/<path>`` must show."""

    kind: str  # dir reg sym chr blk fifo whiteout
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    link: str = ""
    rdev: int = 0
    nlink: int = 1
    xattrs: dict[str, bytes] = field(default_factory=dict)


OPAQUE = {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"}


def expected_view(members: list[Member]) -> dict[str, Want]:
    """The overlay form of the tar, computed independently of the code under test."""
    by_name = {m.name: m for m in members}
    links: dict[str, int] = {}
    for m in members:
        if m.kind == "lnk":
            links[m.link] = links.get(m.link, 1) + 1
    opaque = {m.name.rpartition("/")[0] for m in members if m.name.endswith("/.wh..wh..opq")}
    out: dict[str, Want] = {}
    for m in members:
        parent, _, base = m.name.rpartition("/")
        if base == ".wh..wh..opq":
            continue
        if base.startswith(".wh."):
            out[f"{parent}/{base[4:]}" if parent else base[4:]] = Want("whiteout")
            continue
        src = by_name[m.link] if m.kind == "lnk" else m
        xattrs = {k: v.encode() for k, v in src.xattrs.items()}
        if m.name in opaque:
            xattrs.update(OPAQUE)
        out[m.name] = Want(
            kind="reg" if m.kind == "lnk" else m.kind,
            mode=src.mode,
            uid=src.uid,
            gid=src.gid,
            mtime=src.mtime,
            data=src.data,
            link=src.link if src.kind == "sym" else "",
            rdev=os.makedev(*src.dev) if src.kind in ("chr", "blk") else 0,
            nlink=links.get(src.name, 1),
            xattrs=xattrs,
        )
    return out


_KIND = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "reg",
    stat.S_IFLNK: "sym",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
}


def walk(root: Path) -> list[str]:
    out: list[str] = []

    def rec(d: Path, prefix: str) -> None:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = f"{prefix}{e.name}"
            out.append(rel)
            if e.is_dir(follow_symlinks=False):
                rec(Path(e.path), rel + "/")

    rec(root, "")
    return out


def check_diff(diff: Path, want: dict[str, Want]) -> None:
    seen = walk(diff)
    assert len(seen) == len(set(seen))
    extra, missing = sorted(set(seen) - set(want)), sorted(set(want) - set(seen))
    assert not extra and not missing, f"extra {extra}, missing {missing}"
    for path, w in want.items():
        p = diff / path
        st = os.lstat(p)
        if w.kind == "whiteout":
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, (path, oct(st.st_mode))
            continue
        got = (
            _KIND.get(stat.S_IFMT(st.st_mode)),
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
        )
        assert got == (w.kind, w.mode, w.uid, w.gid, w.mtime * 10**9), (path, got, w)
        if w.kind == "reg":
            assert st.st_size == len(w.data), path
            assert p.read_bytes() == w.data, path
        elif w.kind == "sym":
            assert os.readlink(p) == w.link, path
            assert st.st_size == len(w.link.encode()), path
        elif w.kind in ("chr", "blk"):
            assert st.st_rdev == w.rdev, (path, os.major(st.st_rdev), os.minor(st.st_rdev))
        if w.kind != "dir":
            assert st.st_nlink == w.nlink, (path, st.st_nlink)
        names = sorted(os.listxattr(p, follow_symlinks=False))
        assert names == sorted(w.xattrs), (path, names)
        for k, v in w.xattrs.items():
            assert os.getxattr(p, k, follow_symlinks=False) == v, (path, k)
    # hardlinks: one inode for the three names
    assert len({os.lstat(diff / f"hard/{n}").st_ino for n in "abc"}) == 1
    # nothing of eStargz shows
    for hidden in ("stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"):
        with pytest.raises(FileNotFoundError):
            os.lstat(diff / hidden)
    for hidden in ("wh/.wh.gone", "opq/.wh..wh..opq"):
        with pytest.raises(FileNotFoundError):
            os.lstat(diff / hidden)


# --- images in the registry ----------------------------------------------------------------------


@dataclass
class Image:
    ref: str
    repo: str
    members: list[Member]
    blob: bytes
    digest: str
    toc_digest: str
    diff_id: str
    diff_size: int
    annotations: dict[str, str]

    def index(self) -> Any:
        return EStargzReader.open(BytesSource(self.blob)).index


def push_edge_image(reg: Registry, tmp: Path, repo: str, seed: int) -> Image:
    """Source tar -> gzip OCI layout -> ``stargz-store convert`` -> registry."""
    members = edge_members(seed)
    tar = build_tar(members)
    layer = BuiltLayer(gzip_bytes(tar), sha256_digest(tar))
    layout = tmp / f"layout-{repo.replace('/', '-')}"
    write_image(layout, "src", [layer], image_config([layer.diff_id]))
    convert(
        f"oci:{layout}:src",
        f"docker://{reg.host}/{repo}:v1",
        "--chunk-size",
        str(CHUNK),
        "--dest-tls-verify=false",
    )
    client = RegistryHTTP(reg.host)
    manifest = json.loads(client.manifest(repo, "v1")[0])
    config = json.loads(client.blob(repo, manifest["config"]["digest"]))
    (desc,) = manifest["layers"]
    blob = client.blob(repo, desc["digest"])
    raw = gzip.decompress(blob)
    diff_id = config["rootfs"]["diff_ids"][0]
    assert diff_id == sha256_digest(raw)  # the converter updated the config
    assert len(blob) == desc["size"]
    ann = desc.get("annotations", {})
    return Image(
        f"{reg.host}/{repo}:v1",
        repo,
        members,
        blob,
        desc["digest"],
        ann[TOC_ANNOTATION],
        diff_id,
        len(raw),
        ann,
    )


@pytest.fixture(scope="module")
def edge(reg: Registry, tmp_path_factory: pytest.TempPathFactory) -> Image:
    return push_edge_image(reg, tmp_path_factory.mktemp("edge"), "edge/img", seed=1)


def config_toml(reg: Registry, tmp: Path, read_ahead: int, **fuse: float) -> str:
    lines = [
        "[registry]",
        f'registries_conf = "{tmp}/registries.conf"',
        f'registries_conf_d = "{tmp}/registries.conf.d"',
        f'insecure_registries = ["{reg.host}"]',
        f"connect_timeout = {CONNECT_TIMEOUT}",
        f"read_timeout = {READ_TIMEOUT}",
        f"retries = {RETRIES}",
        "retry_backoff = 0.1",
        "resolve_ttl = 3600.0",
        "[auth]",
        "extra_auth_files = []",
        "[fetch]",
        "background_fetch = false",
        "prefetch_landmark = false",
        f"read_ahead_bytes = {read_ahead}",
        "[fuse]",
        "negative_timeout = 0.5",
        *(f"{k} = {v}" for k, v in fuse.items()),
        "[log]",
        'level = "debug"',
        'format = "json"',
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def daemon(
    workdir: Path, reg: Registry, *, read_ahead: int = 0, fetch_extra: str = "", **fuse: float
) -> Iterator[StoreDaemon]:
    """The daemon with short registry timeouts; ``read_ahead`` 0 (unless given) so that a read
    fetches only the chunks it needs, and what is cached is exactly what the test read.
    *fetch_extra*: more lines for the ``[fetch]`` section."""
    text = config_toml(reg, workdir, read_ahead, **fuse)
    if fetch_extra:
        text = text.replace("[fetch]\n", f"[fetch]\n{fetch_extra}\n", 1)
    d = StoreDaemon(workdir, config_text=text)
    d.start(60)
    try:
        yield d
    finally:
        d.stop()
        assert not fu.is_mounted(d.mountpoint), "stale mount left"


def keydir(d: StoreDaemon, img: Image, key: str) -> Path:
    return d.mountpoint / fu.b64(img.ref) / key


def timed(fn: Callable[[], Any], limit: float = 60.0) -> Any:
    return fu.run_with_timeout(fn, limit)


def expect_errno(fn: Callable[[], Any], code: int, limit: float = EIO_BUDGET) -> float:
    """Run ``fn`` (bounded by ``limit`` + 5 s); it must fail with ``code``; returns seconds."""
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        timed(fn, limit + 5)
    took = time.monotonic() - t0
    assert info.value.errno == code, info.value
    assert took < limit, f"errno {code} after {took:.1f}s (budget {limit:.1f}s)"
    return took


def drop_page_cache() -> None:
    """The kernel forgets file pages: later reads must go to the daemon again."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def read_range(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead around it
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def events(d: StoreDaemon) -> list[dict[str, Any]]:
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


# --- 1. the edge-case image under both key schemes -----------------------------------------------


def test_edge_image_both_schemes(edge: Image, live_reg: Registry, tmp_path: Path) -> None:
    want = expected_view(edge.members)
    tar_ids = {m.uid for m in edge.members}, {m.gid for m in edge.members}
    with daemon(tmp_path, live_reg) as d:
        for key, scheme in ((edge.digest, "compressed"), (edge.toc_digest, "toc")):
            kd = keydir(d, edge, key)
            assert sorted(timed(lambda k=kd: os.listdir(k))) == ["blob", "diff", "info"]
            timed(lambda k=kd: check_diff(k / "diff", want), 120)
            info = json.loads(timed(lambda k=kd: (k / "info").read_bytes()))
            assert info["compressed-size"] == len(edge.blob)
            assert info["compression"] == 2
            assert info["diff-size"] == edge.diff_size
            assert int(edge.annotations[SIZE_ANNOTATION]) == edge.diff_size
            assert (set(info["uidset"]), set(info["gidset"])) == tar_ids
            if scheme == "compressed":
                assert info["compressed-diff-digest"] == edge.digest
                assert info["diff-digest"] == edge.diff_id
                assert "toc-digest" not in info
            else:
                assert info["toc-digest"] == edge.toc_digest
                assert info["flags"] == {"expected-layer-diffid": edge.diff_id}
                assert "compressed-diff-digest" not in info
            blob = timed(lambda k=kd: (k / "blob").read_bytes())
            assert os.stat(kd / "blob").st_size == len(edge.blob)
            assert blob == edge.blob
            assert sha256_digest(blob) == edge.digest
            # use: create() -> ENOENT (containers/storage then counts on us); release: rmdir
            expect_errno(lambda k=kd: open(k / "use", "w").close(), errno.ENOENT, 30)
            expect_errno(lambda k=kd: os.rmdir(k), errno.ENOENT, 30)
            assert (kd / "diff" / "etc" / "hostname").read_bytes() == b"edge-1\n"
        # same inodes whichever key names the layer
        a = os.stat(keydir(d, edge, edge.digest) / "diff/hard/a")
        b = os.stat(keydir(d, edge, edge.toc_digest) / "diff/hard/a")
        assert a.st_ino == b.st_ino
        # keys the image does not have
        for bad in ("sha256:" + "0" * 64, "sha256:" + hashlib.sha256(b"x").hexdigest()):
            expect_errno(lambda k=bad: os.stat(keydir(d, edge, k) / "diff"), errno.ENOENT, 30)
        # each of these is logged once, by the adapter or the manager, not by both (the key
        # directory is looked up again after its rmdir: a second layer_resolved is a second
        # resolution, from the same logger)
        evs = events(d)
        for name in ("layer_resolved", "layer_use", "layer_release"):
            assert len({e["logger"] for e in evs if e["event"] == name}) == 1, name
        for key in (edge.digest, edge.toc_digest):
            for name in ("layer_use", "layer_release"):
                n = sum(1 for e in evs if e["event"] == name and e.get("key") == key)
                assert n == 1, (name, key, n)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0


# --- 2. a chunk corrupted in the registry's storage ----------------------------------------------


def test_corrupted_chunk_in_registry_storage(live_reg: Registry, tmp_path: Path) -> None:
    img = push_edge_image(live_reg, tmp_path, "edge/corrupt", seed=2)
    index = img.index()
    big = index.find("data/big.bin")
    chunks = index.chunks(big)
    assert len(chunks) == 11
    bad = chunks[5]
    data_file = live_reg.blob_file(img.digest)
    original = data_file.read_bytes()
    assert original == img.blob
    pos = (bad.offset + bad.compressed_end) // 2  # inside the chunk's deflate stream
    damaged = bytearray(original)
    damaged[pos] ^= 0x55
    data_file.write_bytes(bytes(damaged))
    try:
        members = {m.name: m for m in img.members}
        content = members["data/big.bin"].data
        # default read-ahead: ranges that hold the bad chunk also hold good ones
        with daemon(tmp_path / "d", live_reg, read_ahead=512 * 1024) as d:
            diff = keydir(d, img, img.digest) / "diff"
            timed(lambda: os.stat(diff / "data/big.bin"))  # resolves: the TOC is intact
            # a read inside the bad chunk, then the whole file: EIO, within the budget
            lo = bad.chunk_offset
            expect_errno(lambda: read_range(diff / "data/big.bin", lo + 10, 100), errno.EIO)
            expect_errno(lambda: (diff / "data/big.bin").read_bytes(), errno.EIO)
            # again: the bad chunk was not cached
            drop_page_cache()
            expect_errno(lambda: read_range(diff / "data/big.bin", lo, CHUNK), errno.EIO)
            # the other chunks of that file and the other files (neighbours in the blob too)
            for i in (0, 4, 6, 10):
                c = chunks[i]
                got = timed(lambda c=c: read_range(diff / "data/big.bin", c.chunk_offset, CHUNK))
                assert got == content[c.chunk_offset : c.chunk_offset + CHUNK], i
            for name in ("data/medium.bin", "data/small.txt", "data/xattr.txt", "etc/hostname"):
                assert timed(lambda n=name: (diff / n).read_bytes()) == members[name].data, name
            # blob: the registry's (damaged) bytes cannot pass the whole-blob digest check,
            # which marks the layer bad: it is dropped, and lookups fail (ENOENT) until the
            # failure is forgotten (negative_timeout), then resolve it again
            expect_errno(lambda: (keydir(d, img, img.digest) / "blob").read_bytes(), errno.EIO)
            # the registry repaired: the same daemon serves the chunk once its failure is
            # forgotten (FetcherSettings.failed_chunk_ttl, 5 s): nothing stays poisoned
            data_file.write_bytes(original)
            deadline = time.monotonic() + 5.0 + 15.0
            while True:
                drop_page_cache()
                try:
                    got = timed(lambda: (diff / "data/big.bin").read_bytes())
                    break
                except OSError as exc:
                    assert exc.errno in (errno.EIO, errno.ENOENT)
                    assert time.monotonic() < deadline, "the repaired chunk is never served"
                    time.sleep(0.5)
            assert got == content
            assert any(e.get("level") in ("warning", "error") for e in events(d))
    finally:
        data_file.write_bytes(original)


# --- 3. the registry stopping mid-read -----------------------------------------------------------


def test_registry_hangs_then_dies_then_returns(live_reg: Registry, tmp_path: Path) -> None:
    img = push_edge_image(live_reg, tmp_path, "edge/outage", seed=3)
    members = {m.name: m for m in img.members}
    big = members["data/big.bin"].data
    with daemon(tmp_path / "d", live_reg) as d:
        diff = keydir(d, img, img.toc_digest) / "diff"
        assert timed(lambda: (diff / "etc/hostname").read_bytes()) == b"edge-3\n"
        assert timed(lambda: read_range(diff / "data/big.bin", 0, CHUNK)) == big[:CHUNK]
        # hung registry (SIGSTOP: connections accepted, never answered): read timeouts
        live_reg.pause()
        took_hung = expect_errno(
            lambda: read_range(diff / "data/big.bin", 3 * CHUNK, 100), errno.EIO
        )
        # what was read before is still served (from the daemon's cache, page cache dropped)
        drop_page_cache()
        assert timed(lambda: (diff / "etc/hostname").read_bytes(), 30) == b"edge-3\n"
        assert timed(lambda: read_range(diff / "data/big.bin", 0, CHUNK), 30) == big[:CHUNK]
        live_reg.resume()
        assert (
            timed(lambda: read_range(diff / "data/big.bin", 3 * CHUNK, 100))
            == (big[3 * CHUNK : 3 * CHUNK + 100])
        )
        # dead registry (connection refused), then restarted on the same port and storage
        live_reg.stop()
        took_dead = expect_errno(
            lambda: read_range(diff / "data/big.bin", 7 * CHUNK, 100), errno.EIO
        )
        expect_errno(lambda: (diff / "data/medium.bin").read_bytes(), errno.EIO)
        live_reg.start()
        assert timed(lambda: (diff / "data/medium.bin").read_bytes()) == (
            members["data/medium.bin"].data
        )
        drop_page_cache()
        assert timed(lambda: (diff / "data/big.bin").read_bytes()) == big
    print(f"EIO: hung registry {took_hung:.1f}s, dead registry {took_dead:.1f}s")


# --- 4. SIGTERM while readers hang on the registry -----------------------------------------------


def test_sigterm_during_hung_reads(live_reg: Registry, tmp_path: Path) -> None:
    img = push_edge_image(live_reg, tmp_path, "edge/sigterm", seed=4)
    grace = 2.0
    with daemon(tmp_path / "d", live_reg, shutdown_grace_seconds=grace) as d:
        diff = keydir(d, img, img.digest) / "diff"
        assert timed(lambda: (diff / "etc/hostname").read_bytes()) == b"edge-4\n"
        live_reg.pause()
        names = [
            "data/big.bin",
            "data/medium.bin",
            "data/small.txt",
            "bin/su",
            "hard/a",
            "unicode/日本語/ファイル.txt",
        ]
        readers = [
            subprocess.Popen(["cat", str(diff / n)], stdout=subprocess.DEVNULL) for n in names
        ]
        try:
            time.sleep(1.0)  # every reader is now blocked in a daemon thread on the registry
            assert all(r.poll() is None for r in readers)
            assert d.proc is not None
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(grace + 15) == 0
            took = time.monotonic() - t0
            fu.wait_unmounted(d.mountpoint, 10)
            codes = [r.wait(15) for r in readers]
            assert all(c != 0 for c in codes), codes  # errors, nobody hangs
        finally:
            for r in readers:
                if r.poll() is None:
                    r.kill()
                r.wait()
            live_reg.resume()
        evs = [e["event"] for e in events(d)]
        assert "signal_received" in evs and "unmounted" in evs and "daemon_stopped" in evs
    print(f"SIGTERM to exit with hung readers: {took:.1f}s (grace {grace}s)")


# --- 5. restart on the same --root: the persistent cache -----------------------------------------


def test_restart_serves_cached_chunks_without_blob(live_reg: Registry, tmp_path: Path) -> None:
    """Chunks (and the TOC) read by the first daemon come from the disk cache in the second.
    The registry still answers manifests (the resolution is not cached on disk), but the layer
    blob is gone from its storage: every byte served must come from the cache."""
    img = push_edge_image(live_reg, tmp_path, "edge/restart", seed=5)
    members = {m.name: m for m in img.members}
    read_before = ["etc/hostname", "data/big.bin", "bin/su"]
    with daemon(tmp_path / "d", live_reg) as d:
        diff = keydir(d, img, img.digest) / "diff"
        for n in read_before:
            assert timed(lambda n=n: (diff / n).read_bytes()) == members[n].data
    data_file = live_reg.blob_file(img.digest)
    moved = data_file.with_name("data.away")
    data_file.rename(moved)
    try:
        with daemon(tmp_path / "d", live_reg) as d:
            diff = keydir(d, img, img.toc_digest) / "diff"
            for n in read_before:
                assert timed(lambda n=n: (diff / n).read_bytes()) == members[n].data, n
            expect_errno(lambda: (diff / "data/medium.bin").read_bytes(), errno.EIO)
            loaded = [e for e in events(d) if e["event"] == "layer_loaded"]
            assert loaded and loaded[-1]["toc_from_cache"] is True
    finally:
        moved.rename(data_file)


def test_resolved_layer_served_from_cache_with_registry_stopped(
    live_reg: Registry, tmp_path: Path
) -> None:
    """What works with the registry down: a layer resolved before it stopped, in the same
    daemon, serves every chunk read before (page cache dropped, kernel inodes forgotten)."""
    img = push_edge_image(live_reg, tmp_path, "edge/down", seed=6)
    members = {m.name: m for m in img.members}
    read_before = ["etc/hostname", "data/big.bin", "hard/b"]
    with daemon(tmp_path / "d", live_reg) as d:
        diff = keydir(d, img, img.digest) / "diff"
        for n in read_before:
            assert timed(lambda n=n: (diff / n).read_bytes()) == content_of(members, n)
        live_reg.stop()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")  # page cache, dentries and inodes: the daemon is asked again
        for n in read_before:
            got = timed(lambda n=n: (diff / n).read_bytes(), 30)
            assert got == content_of(members, n), n
        check = keydir(d, img, img.toc_digest) / "diff"  # the other key: same layer, no lookup
        assert timed(lambda: (check / "etc/hostname").read_bytes(), 30) == b"edge-6\n"
        expect_errno(lambda: (diff / "data/medium.bin").read_bytes(), errno.EIO)


def test_restart_with_registry_stopped_serves_cached_chunks(
    live_reg: Registry, tmp_path: Path
) -> None:
    img = push_edge_image(live_reg, tmp_path, "edge/restart-down", seed=7)
    members = {m.name: m for m in img.members}
    with daemon(tmp_path / "d", live_reg) as d:
        diff = keydir(d, img, img.digest) / "diff"
        assert timed(lambda: (diff / "data/big.bin").read_bytes()) == members["data/big.bin"].data
    live_reg.stop()
    with daemon(tmp_path / "d", live_reg) as d:
        diff = keydir(d, img, img.digest) / "diff"
        got = timed(lambda: (diff / "data/big.bin").read_bytes(), EIO_BUDGET)
        assert got == members["data/big.bin"].data


def test_registry_restart_is_on_the_same_port(live_reg: Registry) -> None:
    """The helper the outage tests rely on: stop and start keep the address and the storage."""
    host = live_reg.host
    blobs = sorted(p.name for p in (live_reg.storage / "docker/registry/v2/blobs").rglob("*"))
    live_reg.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{host}/v2/", timeout=2)
    live_reg.start()
    assert live_reg.host == host
    with urllib.request.urlopen(f"http://{host}/v2/", timeout=5) as r:
        assert r.status == 200
    assert sorted(p.name for p in (live_reg.storage / "docker/registry/v2/blobs").rglob("*")) == (
        blobs
    )


def test_walk_bench_smoke() -> None:
    """benchmarks/walk_bench.py runs end to end on a small layer and reports every figure."""
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.walk_bench", "--entries", "400", "--sample", "20"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["layer"]["entries"] == 400
    assert [w["entries"] for w in out["walk"]] == [400, 400, 400]
    assert out["read"]["files"] == 20 and out["read"]["verified"]
    assert out["daemon_exit"] == 0
    assert out["peak_rss_mb"] >= out["daemon_memory_mb"]["resolved"]["VmRSS"] > 0


# --- 6. lookups that must fail quickly, so podman falls back to an ordinary pull -----------------

LOOKUP_BUDGET = 2.0  # containers/storage stats diff, info and blob: each answer must come fast


def push_plain_image(reg: Registry, tmp: Path, repo: str) -> tuple[str, str]:
    """A gzip layer that is not eStargz; returns (ref, layer digest)."""
    tar = build_tar([Member("plain", "dir", 0o755), Member("plain/f", "reg", 0o644, data=b"p")])
    layer = BuiltLayer(gzip_bytes(tar), sha256_digest(tar))
    layout = tmp / "plain-layout"
    write_image(layout, "src", [layer], image_config([layer.diff_id]))
    push_image(read_image(layout, "src"), RegistryHTTP(reg.host), repo, "v1")
    return f"{reg.host}/{repo}:v1", layer.digest


def test_lookups_that_cannot_be_served_fail_fast(
    edge: Image, live_reg: Registry, tmp_path: Path
) -> None:
    plain_ref, plain_digest = push_plain_image(live_reg, tmp_path, "plain/img")
    workdir = tmp_path / "d"
    workdir.mkdir()
    (workdir / "registries.conf").write_text(
        f'[[registry]]\nprefix = "{live_reg.host}/blocked"\nlocation = "{live_reg.host}/edge"\n'
        "blocked = true\n"
    )
    with daemon(workdir, live_reg) as d:
        mp = d.mountpoint
        cases = {
            "not eStargz": mp / fu.b64(plain_ref) / plain_digest / "diff",
            "unknown digest": keydir(d, edge, "sha256:" + "e" * 64) / "diff",
            "not a digest": keydir(d, edge, "latest") / "diff",
            "bad base64": mp / "not*base64" / edge.digest / "diff",
            "unparsable ref": mp / fu.b64("UPPER/Case::bad") / edge.digest / "diff",
            "blocked registry": mp / fu.b64(f"{live_reg.host}/blocked/img:v1") / edge.digest,
        }
        for what, path in cases.items():
            took = expect_errno(lambda p=path: os.stat(p), errno.ENOENT, LOOKUP_BUDGET)
            assert took < LOOKUP_BUDGET, what
        # The same layer through an allowed name is served: the failures above were about the
        # names, not the daemon.
        assert (keydir(d, edge, edge.digest) / "diff" / "etc" / "hostname").read_bytes()
        failed = [e for e in events(d) if e["event"] == "layer_lookup_failed"]
        assert {e.get("error_type") for e in failed} >= {
            "NotEStargzError",
            "LayerNotFoundError",
            "BlockedRegistryError",
        }, failed
