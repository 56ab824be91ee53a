"""The FUSE adapter over a real mount (in-process, trio in a thread) and a fake layer provider."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerstore import errors as lse
from stargz_store.config import FuseSettings
from stargz_store.fusefs import StoreOperations, ino_base_of, mount_options
from tests import fuse_util as fu

ok, why = fu.fuse_available()
pytestmark = [pytest.mark.fuse, pytest.mark.skipif(not ok, reason=why), pytest.mark.timeout(60)]


@dataclass
class Store:
    mp: Path
    mgr: fu.FakeManager
    ops: StoreOperations
    layer: fu.FakeLayer
    other: fu.FakeLayer
    wide: fu.FakeLayer

    @property
    def refdir(self) -> Path:
        return self.mp / fu.b64(fu.REF)

    @property
    def keydir(self) -> Path:
        return self.refdir / self.layer.compressed_digest

    @property
    def diff(self) -> Path:
        return self.keydir / "diff"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    mgr = fu.FakeManager()
    layer = mgr.add(fu.REF, fu.FakeLayer(fu.sample_tree()))
    other = mgr.add(fu.REF, fu.FakeLayer({"a": fu.file(b"A")}, blob_error=lse.RangeError("short")))
    wide = mgr.add(fu.REF, fu.FakeLayer({f"d/f{i:05d}": fu.file(b"%d" % i) for i in range(1500)}))
    mgr.errors[(fu.REF, "sha256:" + "e" * 64)] = lse.NotEStargzError("plain gzip")
    mgr.errors[(fu.REF, "sha256:" + "f" * 64)] = RuntimeError("provider bug")
    from layerstore.registry.reference import parse_reference

    settings = FuseSettings(negative_timeout=1.0, store_dir_timeout=0.0)
    ops = StoreOperations(mgr, settings, validate_ref=parse_reference)
    mp = tmp_path_factory.mktemp("fusefs") / "mnt"
    with fu.mounted_ops(ops, mp, mount_options(settings)) as mounted:
        yield Store(mounted, mgr, ops, layer, other, wide)
    assert not fu.is_mounted(mp)


def test_mount_options(store: Store) -> None:
    entry = fu.mount_entry(store.mp)
    assert entry is not None
    opts = entry["options"].split(",")
    # Containers keep setuid binaries and devices (overlayfs applies its own mount's flags);
    # straight from this mount they must not work (tests/test_privilege.py).
    assert "nosuid" in opts and "nodev" in opts
    assert entry["fstype"] == "fuse.stargz-store"
    assert entry["source"] == "stargz-store"
    assert "allow_other" in entry["super_options"]
    assert "default_permissions" in entry["super_options"]


def test_root_and_ref_dir(store: Store) -> None:
    assert os.listdir(store.mp) == []
    assert stat.S_ISDIR(os.stat(store.refdir).st_mode)
    # any valid reference is a directory, lazily; nothing is asked of the provider
    before = store.mgr.count("get")
    assert os.path.isdir(store.mp / fu.b64("docker.io/library/anything:latest"))
    assert store.mgr.count("get") == before


@pytest.mark.parametrize(
    "name",
    [
        "not base64!",
        "YWJj=",
        "++++",
        "YQ",
        fu.b64("a b"),
        # valid characters, but not references: the real parser is in force
        fu.b64("registry.example/UPPER:1"),
        fu.b64("a:b:c:d"),
        fu.b64("registry.example/x@sha256:abc"),
    ],
)
def test_bad_ref_dirs_are_enoent_fast(store: Store, name: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        os.stat(store.mp / name)
    assert time.monotonic() - t0 < 0.5


def test_key_dir_both_schemes(store: Store) -> None:
    for key, scheme_field in (
        (store.layer.compressed_digest, "compressed-diff-digest"),
        (store.layer.toc_digest, "toc-digest"),
    ):
        kd = store.refdir / key
        assert sorted(os.listdir(kd)) == ["blob", "diff", "info"]
        info = json.loads((kd / "info").read_bytes())
        assert info[scheme_field] == key
        assert os.stat(kd / "info").st_size == len((kd / "info").read_bytes())
    # one layer under two keys has the same inodes (one block)
    a = os.stat(store.refdir / store.layer.compressed_digest / "diff" / "etc" / "hostname")
    b = os.stat(store.refdir / store.layer.toc_digest / "diff" / "etc" / "hostname")
    assert a.st_ino == b.st_ino
    base = ino_base_of(store.ops, store.layer.compressed_digest)
    assert base is not None and a.st_ino == base + store.layer.index.ino("etc/hostname")


def test_unknown_and_failing_keys_are_enoent_and_cached(store: Store) -> None:
    cases = [
        ("sha256:" + "0" * 64, errno.ENOENT),  # LayerNotFoundError
        ("sha256:" + "e" * 64, errno.ENOENT),  # NotEStargzError
        ("sha256:" + "f" * 64, errno.EIO),  # a bug in the provider: EIO, logged
    ]
    for key, code in cases:
        before = store.mgr.count("get")
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            os.stat(store.refdir / key / "diff")
        assert info.value.errno == code
        assert time.monotonic() - t0 < 0.5
        assert store.mgr.count("get") == before + 1
        hits = store.ops.stats.negative_hits
        with pytest.raises(OSError) as info:  # negative cache: the provider is not asked
            os.stat(store.refdir / key)
        assert info.value.errno == code
        assert store.mgr.count("get") == before + 1
        if code == errno.EIO:  # (the kernel answers a cached ENOENT itself; EIO it asks us)
            assert store.ops.stats.negative_hits == hits + 1
    time.sleep(1.1)  # negative_timeout = 1 s
    before = store.mgr.count("get")
    with pytest.raises(FileNotFoundError):
        os.stat(store.refdir / ("sha256:" + "0" * 64))
    assert store.mgr.count("get") == before + 1
    # malformed keys never reach the provider
    before = store.mgr.count("get")
    for bad in ("sha256:abc", "latest", "md5:" + "0" * 32):
        with pytest.raises(FileNotFoundError):
            os.stat(store.refdir / bad)
    assert store.mgr.count("get") == before


def test_sha512_keys_are_enoent_without_asking_the_provider(store: Store) -> None:
    # containers/storage names layers by sha256 only; the grammar is layerstore.digest's
    key = "sha512:" + "a" * 128
    before = len(store.mgr.calls)
    with pytest.raises(FileNotFoundError):
        os.stat(store.refdir / key)
    with pytest.raises(FileNotFoundError):
        os.stat(store.refdir / key / "diff")
    with pytest.raises(FileNotFoundError):
        open(store.refdir / key / "use", "w").close()
    with pytest.raises(FileNotFoundError):  # the kernel's lookup fails before any rmdir
        os.rmdir(store.refdir / key)
    assert store.mgr.calls[before:] == []  # get, use and release never saw it


def test_getattr_readdir_read(store: Store) -> None:
    d = store.diff
    assert sorted(os.listdir(d)) == sorted(
        ["bin", "broken", "dev", "etc", "home", "opaque", "run", "var"]
    )
    assert (d / "etc" / "hostname").read_bytes() == b"sample\n"
    big = (d / "etc" / "big").read_bytes()
    assert big == bytes(range(256)) * 4096
    with open(d / "etc" / "big", "rb") as f:
        f.seek(1000)
        assert f.read(10) == (bytes(range(256)) * 4096)[1000:1010]
    st = os.stat(d / "home" / "user" / "owned")
    assert (st.st_uid, st.st_gid, st.st_size) == (1000, 1000, 1)
    assert st.st_mtime_ns == 1_700_000_000_000_000_000
    # readdirplus attributes agree with lookups
    with os.scandir(d / "etc") as it:
        seen = {e.name: e.inode() for e in it}
    assert seen["hostname"] == os.stat(d / "etc" / "hostname").st_ino


def test_missing_names_in_layers_are_cached_by_the_kernel(store: Store) -> None:
    # (relative to a directory fd: the ALS dirs above have a 0 s entry timeout in this module)
    fd = os.open(store.diff / "etc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        name = "ld.so.preload"  # the dynamic loader probes names like this
        with pytest.raises(FileNotFoundError):
            os.stat(name, dir_fd=fd)
        before = store.ops.stats.fuse_lookups
        for _ in range(20):
            with pytest.raises(FileNotFoundError):
                os.stat(name, dir_fd=fd)
        assert store.ops.stats.fuse_lookups == before  # negative dentry: never asked again
        assert os.stat("hostname", dir_fd=fd).st_size == 7
    finally:
        os.close(fd)


def test_large_directory_listing_resumes_correctly(store: Store) -> None:
    d = store.refdir / store.wide.compressed_digest / "diff" / "d"
    with os.scandir(d) as it:
        entries = [(e.name, e.inode()) for e in it]  # many READDIRPLUS requests
    names = [n for n, _ in entries]
    assert len(names) == 1500 == len(set(names))
    assert sorted(names) == [f"f{i:05d}" for i in range(1500)]
    for name, ino in entries[::250]:
        assert os.stat(d / name).st_ino == ino
        assert (d / name).read_bytes() == str(int(name[1:])).encode()


def test_other_users_read_with_file_permissions(store: Store) -> None:
    """allow_other lets other users in; default_permissions applies each file's mode."""
    # pytest's temporary directories are 0700: hand the mount's directories over as fds
    diff = os.open(store.diff, os.O_RDONLY | os.O_DIRECTORY)
    keydir = os.open(store.keydir, os.O_RDONLY | os.O_DIRECTORY)

    def as_nobody(*cmd: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
            capture_output=True,
            timeout=20,
            pass_fds=(diff, keydir),
        )

    try:
        r = as_nobody("cat", f"/proc/self/fd/{diff}/etc/hostname")
        assert r.returncode == 0 and r.stdout == b"sample\n", r.stderr
        r = as_nobody("cat", f"/proc/self/fd/{diff}/etc/shadow")  # 0600 root
        assert r.returncode != 0 and b"Permission denied" in r.stderr
        before = store.mgr.count("use")
        r = as_nobody("touch", f"/proc/self/fd/{keydir}/use")  # only root counts users
        assert r.returncode != 0 and store.mgr.count("use") == before
    finally:
        os.close(diff)
        os.close(keydir)


def test_special_files(store: Store) -> None:
    d = store.diff
    wh = os.lstat(d / "var" / "deleted")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    dev = os.lstat(d / "dev" / "null")
    assert stat.S_ISCHR(dev.st_mode) and os.major(dev.st_rdev) == 1 and os.minor(dev.st_rdev) == 3
    assert stat.S_ISFIFO(os.lstat(d / "run" / "fifo").st_mode)
    su = os.lstat(d / "bin" / "su")
    assert su.st_mode & stat.S_ISUID and stat.S_IMODE(su.st_mode) == 0o4755
    assert os.readlink(d / "bin" / "sh") == "busybox"
    assert stat.S_ISLNK(os.lstat(d / "bin" / "sh").st_mode)
    h1, h2 = os.stat(d / "etc" / "hard"), os.stat(d / "etc" / "hard2")
    assert h1.st_ino == h2.st_ino and h1.st_nlink == 2 == h2.st_nlink
    assert (d / "etc" / "hard2").read_bytes() == b"shared inode\n"


def test_opaque_xattrs(store: Store) -> None:
    p = store.diff / "opaque"
    assert os.getxattr(p, "trusted.overlay.opaque") == b"y"
    assert os.getxattr(p, "user.overlay.opaque") == b"y"
    assert sorted(os.listxattr(p)) == ["trusted.overlay.opaque", "user.overlay.opaque"]
    with pytest.raises(OSError) as info:
        os.getxattr(store.diff / "etc", "user.overlay.opaque")
    assert info.value.errno == errno.ENODATA
    assert os.listxattr(store.keydir) == []


def test_blob_is_lazy_registry_bytes(store: Store) -> None:
    blob = store.keydir / "blob"
    assert os.stat(blob).st_size == store.layer.blob_size
    assert blob.read_bytes() == store.layer.blob


def test_use_and_release(store: Store) -> None:
    key = store.layer.compressed_digest
    before_use, before_rel = store.mgr.count("use"), store.mgr.count("release")
    with pytest.raises(FileNotFoundError):
        open(store.keydir / "use", "w").close()
    assert store.mgr.count("use") == before_use + 1
    assert ("use", fu.REF, key) in store.mgr.calls
    with pytest.raises(FileNotFoundError):
        os.rmdir(store.keydir)
    assert store.mgr.count("release") == before_rel + 1
    assert ("release", fu.REF, key) in store.mgr.calls
    # still served afterwards
    assert (store.diff / "etc" / "hostname").read_bytes() == b"sample\n"


def test_read_errors_are_eio_and_serving_continues(store: Store) -> None:
    for name in ("bad", "crash", "remote"):
        with pytest.raises(OSError) as info:
            fu.run_with_timeout(lambda n=name: (store.diff / "broken" / n).read_bytes(), 10)
        assert info.value.errno == errno.EIO, name
    other_blob = store.refdir / store.other.compressed_digest / "blob"
    with pytest.raises(OSError) as info:
        other_blob.read_bytes()
    assert info.value.errno == errno.EIO
    assert (store.diff / "etc" / "hostname").read_bytes() == b"sample\n"
    assert store.ops.stats.read_errors >= 4


def test_read_only(store: Store) -> None:
    d = store.diff
    cases = [
        lambda: open(d / "etc" / "hostname", "w"),  # noqa: SIM115
        lambda: open(d / "etc" / "new", "w"),  # noqa: SIM115
        lambda: os.mkdir(d / "newdir"),
        lambda: os.unlink(d / "etc" / "hostname"),
        lambda: os.rename(d / "etc" / "hostname", d / "etc" / "x"),
        lambda: os.symlink("x", d / "link"),
        lambda: os.chmod(d / "etc" / "hostname", 0o777),
        lambda: os.setxattr(d / "etc", "user.x", b"1"),
        lambda: os.mkdir(store.mp / "x"),
    ]
    for case in cases:
        with pytest.raises(OSError) as info:
            case()
        assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), info.value


def test_statfs(store: Store) -> None:
    st = os.statvfs(store.mp)
    assert st.f_bsize == 4096 and st.f_namemax == 255


def _drop_kernel_caches_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Drop dentries and inodes (the kernel sends FORGET for all it lets go) until ``cond``."""
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        time.sleep(0.1)
        if cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError("the kernel did not forget the inodes")


def test_forget_drops_layer_but_keeps_inode_numbers(store: Store) -> None:
    p = store.diff / "etc" / "hostname"
    ino = os.stat(p).st_ino
    digest = store.layer.compressed_digest
    base = ino_base_of(store.ops, digest)
    # no kernel reference left: the layer is dropped
    _drop_kernel_caches_until(lambda: store.ops._blocks[digest].layer is None)
    assert store.ops._blocks[digest].lookups == 0
    assert os.stat(p).st_ino == ino  # resolved again, same numbers
    assert ino_base_of(store.ops, digest) == base
    assert store.ops._blocks[digest].layer is store.layer


def test_unused_ref_dirs_are_pruned(store: Store) -> None:
    for i in range(300):
        assert os.path.isdir(store.mp / fu.b64(f"docker.io/library/img{i}:latest"))
    assert len(store.ops._ref_dirs) >= 300
    # only ref dirs with resolved layers stay
    _drop_kernel_caches_until(lambda: len(store.ops._ref_dirs) < 10)


def test_concurrent_lookups_resolve(store: Store, tmp_path: Path) -> None:
    import threading

    keys = [store.layer.compressed_digest, store.layer.toc_digest, store.other.compressed_digest]
    results: list[bool] = []

    def worker(k: str) -> None:
        results.append((store.refdir / k / "diff").is_dir())

    threads = [threading.Thread(target=worker, args=(k,)) for k in keys * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [True] * len(threads)


def test_reads_served_from_memory_without_a_thread(store: Store) -> None:
    """A layer's ``read_nowait`` answers on the event loop when it has the bytes (a view is
    fine); when it answers None the read goes to ``read`` in a worker thread."""
    big = bytes(range(256)) * 4096
    calls: list[tuple[int, int]] = []

    def read_nowait(ino: int, offset: int, size: int, disk: bool = False) -> memoryview | None:
        calls.append((offset, size))
        if offset >= 512 * 1024 or disk:
            return None
        return memoryview(big)[offset : offset + size]

    store.layer.read_nowait = read_nowait  # type: ignore[attr-defined]
    try:
        before = store.ops.stats.fast_reads
        with open(store.diff / "etc" / "big", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # drop cached pages
            got = f.read()
        assert got == big
        assert calls and store.ops.stats.fast_reads > before
        assert any(off >= 512 * 1024 for off, _ in calls)  # those came from read()
    finally:
        del store.layer.read_nowait  # type: ignore[attr-defined]


def test_cached_reads_answered_on_the_loop_while_no_read_waits_in_a_thread(store: Store) -> None:
    """When ``read_nowait`` cannot answer from memory or the page cache, a read whose chunks are
    all in the disk cache is answered on the event loop (``read_nowait(..., disk=True)``), but
    only while no other read waits in a thread, and never with ``inline_cache_reads`` off."""
    import threading

    big = bytes(range(256)) * 4096
    hostname = store.layer.index.ino("etc/hostname")
    disk_calls: list[int] = []
    release = threading.Event()
    entered = threading.Event()
    real_read = store.layer.read

    def read_nowait(ino: int, offset: int, size: int, disk: bool = False) -> memoryview | None:
        if not disk or ino == hostname:
            return None
        disk_calls.append(offset)
        return memoryview(big)[offset : offset + size]

    def read(ino: int, offset: int, size: int) -> bytes:
        if ino == hostname:
            entered.set()
            release.wait(10)
        return real_read(ino, offset, size)

    def read_big() -> bytes:
        with open(store.diff / "etc" / "big", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # drop cached pages
            return f.read()

    store.layer.read_nowait = read_nowait  # type: ignore[attr-defined]
    store.layer.read = read  # type: ignore[method-assign]
    try:
        before = store.ops.stats.disk_reads_inline
        assert read_big() == big
        assert disk_calls and store.ops.stats.disk_reads_inline > before

        # A read waits in a thread: the next one joins it there.
        waiter = threading.Thread(
            target=lambda: (store.diff / "etc" / "hostname").read_bytes(), daemon=True
        )
        with open(store.diff / "etc" / "hostname", "rb") as f:  # pages of a fresh open
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        waiter.start()
        assert entered.wait(10)
        disk_calls.clear()
        assert read_big() == big
        assert disk_calls == []
        release.set()
        waiter.join(10)

        store.ops._inline_disk_reads = False
        assert read_big() == big
        assert disk_calls == []
    finally:
        release.set()
        store.ops._inline_disk_reads = True
        del store.layer.read_nowait  # type: ignore[attr-defined]
        del store.layer.read  # type: ignore[method-assign]


def test_close_costs_no_flush_round_trip(store: Store) -> None:
    """FLUSH answers ENOSYS once; the kernel then stops sending it (and close succeeds)."""
    for _ in range(3):
        with open(store.diff / "etc" / "hostname", "rb") as f:
            assert f.read() == b"sample\n"
