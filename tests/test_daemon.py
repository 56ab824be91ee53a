"""The daemon as a subprocess (``python -m stargz_store``): signals, stale mounts, sd_notify,
readable configuration errors, and the real wiring (registry client, cache, manager)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stargz_store import daemon
from tests import fuse_util as fu

REPO = Path(__file__).resolve().parent.parent
ok, why = fu.fuse_available()
needs_fuse = pytest.mark.skipif(not ok, reason=why)
pytestmark = [pytest.mark.timeout(90)]


class Daemon:
    """One daemon subprocess with a private notify socket; always cleaned up."""

    def __init__(
        self,
        tmp: Path,
        *,
        fake: bool = True,
        factory: str = "tests.fuse_util:fake_provider_factory",
        config: str = "",
        name: str = "d",
        root: Path | None = None,
    ) -> None:
        self.tmp = tmp
        self.root = root or tmp / "root"
        self.mp = tmp / "mnt"
        self.log = tmp / f"{name}.log"
        self.config = tmp / "config.toml"
        self.config.write_text(config)
        self.notify_path = tmp / f"{name}.notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        self.sock.bind(str(self.notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONUNBUFFERED="1")
        env.pop(daemon.PROVIDER_FACTORY_ENV, None)
        if fake:
            env[daemon.PROVIDER_FACTORY_ENV] = factory
        cmd = [
            sys.executable,
            "-m",
            "stargz_store",
            "--config",
            str(self.config),
            "--root",
            str(self.root),
            str(self.mp),
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )

    def messages(self, until: str, timeout: float = 20.0) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while until not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {until} in {got}; log:\n{self.log_text()}")
            self.sock.settimeout(min(left, 0.2))
            try:
                got.extend(self.sock.recv(4096).decode().splitlines())
            except socket.timeout:
                if self.proc.poll() is not None and until not in got:
                    raise AssertionError(
                        f"daemon exited {self.proc.returncode}; log:\n{self.log_text()}"
                    ) from None
        return got

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        return [json.loads(x) for x in self.log_text().splitlines() if x.startswith("{")]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sock.close()
        fu.force_unmount(self.mp)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()
    fu.force_unmount(tmp_path / "mnt")
    assert not fu.is_mounted(tmp_path / "mnt")


def _sample_file(mp: Path) -> Path:
    layer = fu.FakeLayer(fu.sample_tree())
    return mp / fu.b64(fu.REF) / layer.compressed_digest / "diff" / "etc" / "hostname"


@pytest.mark.fuse
@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_serve_and_signal_unmounts(
    tmp_path: Path, daemons: list[Daemon], sig: signal.Signals
) -> None:
    d = Daemon(tmp_path)
    daemons.append(d)
    t0 = time.monotonic()
    assert "READY=1" in d.messages("READY=1")
    ready_s = time.monotonic() - t0
    assert fu.is_mounted(d.mp)  # READY=1 comes after the mount
    entry = fu.mount_entry(d.mp)
    assert entry is not None and entry["fstype"] == "fuse.stargz-store"
    assert "nosuid" in entry["options"].split(",") and "nodev" in entry["options"].split(",")
    assert fu.run_with_timeout(_sample_file(d.mp).read_bytes, 10) == b"sample\n"
    dev = os.stat(d.mp).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert knob.read_text().strip() == "1024"  # [fuse] read_ahead_kb default
    d.proc.send_signal(sig)
    assert "STOPPING=1" in d.messages("STOPPING=1")
    assert d.proc.wait(15) == 0
    assert not fu.is_mounted(d.mp)
    events = [e["event"] for e in d.events()]
    for name in (
        "daemon_starting",
        "mounted",
        "ready",
        "layer_resolved",
        "signal_received",
        "unmounted",
        "daemon_stopped",
    ):
        assert name in events, (name, events)
    print(f"startup to READY=1: {ready_s:.3f}s")


@pytest.mark.fuse
@needs_fuse
def test_stale_mount_is_recovered(tmp_path: Path, daemons: list[Daemon]) -> None:
    first = Daemon(tmp_path, name="first")
    daemons.append(first)
    first.messages("READY=1")
    first.proc.kill()
    first.proc.wait(10)
    with pytest.raises(OSError) as info:
        os.listdir(first.mp)
    assert info.value.errno == errno.ENOTCONN  # the dead mount that breaks podman
    second = Daemon(tmp_path, name="second")
    daemons.append(second)
    second.messages("READY=1")
    assert fu.run_with_timeout(_sample_file(second.mp).read_bytes, 10) == b"sample\n"
    assert any(e["event"] == "stale_mount_detached" for e in second.events())
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(15) == 0
    assert not fu.is_mounted(second.mp)
    # the lazily detached mount is gone too: nothing at all is left on the path
    os.stat(second.mp)


@pytest.mark.fuse
@needs_fuse
def test_live_mount_is_refused(tmp_path: Path, daemons: list[Daemon]) -> None:
    first = Daemon(tmp_path, name="first")
    daemons.append(first)
    first.messages("READY=1")
    # (another --root: on the same one, the root lock refuses it first; tests/test_privilege.py)
    second = Daemon(tmp_path, name="second", root=tmp_path / "root2")
    daemons.append(second)
    assert second.proc.wait(15) == 1
    assert "already a live FUSE mount" in second.log_text()
    assert fu.run_with_timeout(_sample_file(first.mp).read_bytes, 10) == b"sample\n"


@pytest.mark.fuse
@needs_fuse
def test_external_unmount_ends_daemon(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path)
    daemons.append(d)
    d.messages("READY=1")
    subprocess.run(["fusermount3", "-u", str(d.mp)], check=True, timeout=10)
    assert d.proc.wait(15) == 0
    assert "STOPPING=1" in d.messages("STOPPING=1")


@pytest.mark.fuse
@needs_fuse
def test_real_wiring_unreachable_registry_is_enoent(tmp_path: Path, daemons: list[Daemon]) -> None:
    """No provider factory: CredentialStore -> RegistryClient -> ChunkCache -> LayerManager."""
    conf = (
        f'[registry]\nregistries_conf = "{tmp_path}/registries.conf"\n'
        f'registries_conf_d = "{tmp_path}/registries.conf.d"\nretries = 0\n'
        "connect_timeout = 2.0\n[auth]\nextra_auth_files = []\n"
    )
    d = Daemon(tmp_path, fake=False, config=conf)
    daemons.append(d)
    d.messages("READY=1")
    key = "sha256:" + "a" * 64
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        fu.run_with_timeout(
            lambda: os.stat(d.mp / fu.b64("127.0.0.1:1/library/x:1") / key / "diff"), 20
        )
    assert time.monotonic() - t0 < 5
    assert (d.root / "cache").is_dir()
    assert (d.root / "auth-helper.sock").is_socket()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert not (d.root / "auth-helper.sock").exists()


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargz_store", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, **(env or {})),
    )


def test_config_errors_are_readable(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[fetch]\nconcurency = 4\n[fuse]\nentry_timeout = 'long'\n")
    r = _run_cli("--config", str(bad), str(tmp_path / "mnt"))
    assert r.returncode == 2
    assert f"{bad}: unknown key 'fetch.concurency'" in r.stderr
    assert "fuse.entry_timeout" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run_cli("--config", str(tmp_path / "missing.toml"), str(tmp_path / "mnt"))
    assert r.returncode == 2
    assert "missing.toml: configuration file not found" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "mnt").exists()  # nothing happens before the config is valid


def test_usage_errors(tmp_path: Path) -> None:
    r = _run_cli()
    assert r.returncode == 2 and "MOUNTPOINT" in r.stderr.upper()
    r = _run_cli("--log-level", "loud", str(tmp_path))
    assert r.returncode == 2


def test_mountpoint_that_is_a_file_fails_cleanly(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    r = _run_cli(
        "--config",
        str(cfg),
        "--root",
        str(tmp_path / "root"),
        str(f),
        env={daemon.PROVIDER_FACTORY_ENV: "tests.fuse_util:fake_provider_factory"},
    )
    assert r.returncode == 1
    assert "is not a directory" in r.stderr
    assert "Traceback" not in r.stderr


def _expected_tree(tar_path: Path) -> dict[str, tuple[str, int, int, int, bytes, str]]:
    """path -> (kind, mode bits, uid, gid, content, link target) in overlay form."""
    out: dict[str, tuple[str, int, int, int, bytes, str]] = {}
    with tarfile.open(tar_path) as t:
        members = t.getmembers()
        for m in members:
            base = m.name.rpartition("/")[2]
            parent = m.name.rpartition("/")[0]
            if base == ".wh..wh..opq":
                continue
            if base.startswith(".wh."):
                name = f"{parent}/{base[4:]}" if parent else base[4:]
                out[name] = ("whiteout", 0, 0, 0, b"", "")
            elif m.isreg():
                f = t.extractfile(m)
                assert f is not None
                out[m.name] = ("file", m.mode, m.uid, m.gid, f.read(), "")
            elif m.islnk():
                out[m.name] = (*out[m.linkname][:5], m.linkname)
            elif m.issym():
                out[m.name] = ("symlink", m.mode, m.uid, m.gid, b"", m.linkname)
            elif m.isdir():
                out[m.name] = ("dir", m.mode, m.uid, m.gid, b"", "")
            elif m.ischr():
                out[m.name] = ("chr", m.mode, m.devmajor, m.devminor, b"", "")
            elif m.isfifo():
                out[m.name] = ("fifo", m.mode, m.uid, m.gid, b"", "")
    return out


def _check_layer_dir(keydir: Path, blob: fu.GoBlob, scheme: str, tar_path: Path) -> None:
    diff = keydir / "diff"
    expected = _expected_tree(tar_path)
    seen = set()
    for dirpath, dirnames, filenames in os.walk(diff):
        for name in dirnames + filenames:
            seen.add(os.path.relpath(os.path.join(dirpath, name), diff))
    assert seen == set(expected), (blob.name, sorted(seen ^ set(expected)))
    for path, (kind, mode, a, b, content, link) in expected.items():
        st = os.lstat(diff / path)
        if kind == "whiteout":
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, path
            continue
        assert stat.S_IMODE(st.st_mode) == mode, (blob.name, path)
        assert st.st_mtime == 1600000000, (blob.name, path)
        if kind == "file":
            assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == (a, b)
            assert (diff / path).read_bytes() == content, (blob.name, path)
        elif kind == "symlink":
            assert os.readlink(diff / path) == link
        elif kind == "chr":
            assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (
                a,
                b,
            )
        elif kind == "fifo":
            assert stat.S_ISFIFO(st.st_mode)
    main, hard = os.stat(diff / "app/main.py"), os.stat(diff / "app/hard")
    assert main.st_ino == hard.st_ino and main.st_nlink == 2
    assert os.getxattr(diff / "var", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(diff / "var", "user.overlay.opaque") == b"y"
    assert os.getxattr(diff / "var/x", "user.k") == b"v"
    info = json.loads((keydir / "info").read_bytes())
    if scheme == "compressed":
        assert info["compressed-diff-digest"] == blob.digest
        assert info["diff-digest"] == blob.diff_id
    else:
        assert info["toc-digest"] == blob.toc_digest
    assert info["compressed-size"] == len(blob.data)
    data = (keydir / "blob").read_bytes()
    assert data == blob.data
    assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


@pytest.mark.fuse
@needs_fuse
def test_real_manager_over_go_reference_blobs(
    tmp_path: Path, daemons: list[Daemon], go_reference: Path
) -> None:
    """The daemon with the real LayerManager/Layer/TOCIndex/cache, the Go writer's blobs as the
    registry: every layer under both key schemes matches small.tar in overlay form."""
    d = Daemon(tmp_path, factory="tests.fuse_util:go_reference_provider_factory")
    daemons.append(d)
    d.messages("READY=1")
    refdir = d.mp / fu.b64(fu.GO_REF_IMAGE)
    for blob in fu.go_blobs(go_reference):
        for key, scheme in ((blob.digest, "compressed"), (blob.toc_digest, "toc")):
            fu.run_with_timeout(
                lambda k=key, s=scheme, b=blob: _check_layer_dir(
                    refdir / k, b, s, go_reference / "small.tar"
                ),
                30,
            )
    with pytest.raises(FileNotFoundError):  # a key the image does not have
        os.stat(refdir / ("sha256:" + "a" * 64))
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0


@pytest.mark.fuse
@needs_fuse
def test_sigterm_abandons_hung_reads_after_grace(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon(
        tmp_path,
        factory="tests.fuse_util:slow_provider_factory",
        config="[fuse]\nshutdown_grace_seconds = 1.0\n",
    )
    daemons.append(d)
    d.messages("READY=1")
    key = "sha256:" + hashlib.sha256(fu.SLOW_BLOB).hexdigest()
    slow = d.mp / fu.b64(fu.REF) / key / "diff" / "slow"
    reader = subprocess.Popen(["cat", str(slow)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # the read is now blocked in the provider
        assert reader.poll() is None
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        assert time.monotonic() - t0 < 6  # not the 60 s the read would take
        assert not fu.is_mounted(d.mp)
        assert reader.wait(10) != 0  # the reader got an error, not hung
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait()
    assert any(e["event"] == "requests_abandoned_at_shutdown" for e in d.events())


def test_build_wiring_maps_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each configuration key reaches the constructor it is meant for."""
    from stargz_store.config import parse_config_text

    monkeypatch.delenv(daemon.PROVIDER_FACTORY_ENV, raising=False)
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
    (tmp_path / "registries.conf").write_text(
        '[[registry]]\nlocation = "blocked.example"\nblocked = true\n'
    )
    cfg = parse_config_text(
        f"""
[registry]
connect_timeout = 3.5
read_timeout = 7.0
retries = 1
retry_backoff = 0.25
pool_size = 5
insecure_registries = ["127.0.0.1:5000"]
platform = "linux/arm64"
registries_conf = "{tmp_path}/registries.conf"
registries_conf_d = "{tmp_path}/none.d"
resolve_ttl = 9.0
[auth]
extra_auth_files = []
helper_socket = "sock/helper.sock"
[cache]
max_size_bytes = 12345678
dir = "c"
[fetch]
concurrency = 3
read_ahead_bytes = 65536
background_fetch = false
background_bandwidth_share = 0.25
prefetch_landmark = false
background_concurrency = 4
[fuse]
negative_timeout = 4.0
"""
    )
    (tmp_path / "sock").mkdir()
    wiring = daemon.build_wiring(cfg, tmp_path)
    try:
        mgr = wiring.provider
        rs = mgr.client.settings
        assert (rs.connect_timeout, rs.read_timeout, rs.retries, rs.backoff_factor) == (
            3.5,
            7.0,
            1,
            0.25,
        )
        assert rs.pool_size == 5 and rs.insecure_registries == frozenset({"127.0.0.1:5000"})
        assert rs.platform == "linux/arm64"
        ms = mgr.settings
        assert (ms.resolve_ttl, ms.negative_ttl, ms.background_fill_concurrency) == (9.0, 4.0, 4)
        assert ms.fetcher.max_concurrent_requests == 3 and ms.fetcher.readahead_bytes == 65536
        assert ms.fetcher.background_share == 0.25 and not ms.fetcher.background_fill
        assert not ms.layer.landmark_prefetch and not ms.layer.background_fill
        assert mgr.resolutions is not None and mgr.resolutions.directory == tmp_path / "resolutions"
        assert mgr.cache.max_bytes == 12345678 and mgr.cache.root == tmp_path / "c"
        assert (tmp_path / "sock" / "helper.sock").is_socket()
        # registries.conf is in force: a blocked registry fails the lookup
        from layerstore.errors import BlockedRegistryError

        with pytest.raises(BlockedRegistryError):
            mgr.get("blocked.example/x:1", "sha256:" + "a" * 64)
        assert wiring.validate_ref is not None
    finally:
        wiring.close()
    assert not (tmp_path / "sock" / "helper.sock").exists()
