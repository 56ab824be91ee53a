"""Local users and the mount (issue 9, finding 2 and part of 6), through the real daemon.

The daemon runs as root and serves images that whoever names them chose. These tests take the
part of an unprivileged local user (uid 65534 via ``setpriv``) on a machine where the mount is
reachable (a world-traversable work directory, as an operator may make it for rootless users):

- they cannot list or look up anything in the mount, not even right after root did, and cannot
  make the daemon contact a registry;
- a setuid-root binary of the image gives no privilege when executed straight from the mount
  (``nosuid``), even for a uid that is allowed to read; a device node of the image does not
  open (``nodev``);
- a uid in ``fuse.allowed_uids`` reads the mount;
- in a container (real podman, ``--user 65534``) the same setuid binary still gives euid 0 and
  the device node still works: overlayfs applies its own mount's flags;
- rootless podman as an allowed uid pulls lazily through the store; a uid not allowed falls
  back to a full pull.

And the state directory: ``--root`` (and the mountpoint's parents) created 0700; an unsafe
existing ``--root`` refused; a second daemon on the same ``--root`` refused, naming the first's
pid and leaving it intact; a live auth-helper socket is never replaced.

The test image: busybox, plus a layer with ``/euid`` (a static C program printing its uid and
euid, mode 4755, owner 0), ``/nulldev`` (a character device 1:3, like /dev/null, mode 0666) and
``/secret.txt``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from auth.errors import HelperChannelError
from auth.helper_channel import HelperChannelServer
from stargz_store.daemon import PROVIDER_FACTORY_ENV
from testbed import (
    BuiltLayer,
    Entry,
    ImageInfo,
    LoopbackRegistry,
    StoreDaemon,
    busybox_rootfs,
    file,
    image_config,
    mounts_below,
    push_image,
    registry_binary,
    remove_tree,
    store_config_toml,
    write_image,
)
from tests import fuse_util as fu
from tests.image_util import convert_image
from tests.podman_util import Podman, need_podman

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
SECRET = b"only for root and allowed users\n"
EUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid()); return 0; }
"""

ok, why = fu.fuse_available()


def _have_registry() -> bool:
    try:
        registry_binary()
    except FileNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not ok, reason=why),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing"),
    pytest.mark.timeout(600),
]


NOBODY_ARGV = ("setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups")


def as_nobody(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``cmd`` as uid/gid 65534 with no supplementary groups and no capabilities.

    Through a shell: setpriv re-raises its effective capabilities after ``setresuid`` (it needs
    CAP_SETGID for what follows) and keeps them until ``execve``, whose own path walk therefore
    still has CAP_DAC_OVERRIDE; the shell it starts has none, and execs ``cmd`` as a real
    unprivileged user would."""
    argv = [*NOBODY_ARGV, "/bin/sh", "-c", 'exec "$@"', "sh", *cmd]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
    )


def denied(r: subprocess.CompletedProcess[str]) -> bool:
    return r.returncode != 0 and "Permission denied" in r.stderr


# --- the image --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def euid_program(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A static binary printing ``uid=U euid=E`` (static: it runs in a busybox image)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing: the setuid test program is compiled with gcc -static")
    d = tmp_path_factory.mktemp("euid")
    (d / "euid.c").write_text(EUID_C)
    r = subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(d / "euid"), str(d / "euid.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"gcc -static failed (static libc missing?): {r.stderr.strip()[-300:]}")
    return (d / "euid").read_bytes()


@dataclass
class PrivImage:
    reg: LoopbackRegistry
    ref: str  # the image root uses
    other_ref: str  # the same image under a name nobody but the attacker ever names
    key: str  # compressed digest of the layer holding /euid, /nulldev, /secret.txt
    image: ImageInfo

    def keydir(self, mountpoint: Path, ref: str | None = None) -> Path:
        name = base64.b64encode((ref or self.ref).encode()).decode()
        return mountpoint / name / self.key


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackRegistry]:
    if not _have_registry():
        pytest.skip("no docker-registry binary")
    with LoopbackRegistry(tmp_path_factory.mktemp("priv-registry")) as r:
        yield r


@pytest.fixture(scope="module")
def image(
    reg: LoopbackRegistry, euid_program: bytes, tmp_path_factory: pytest.TempPathFactory
) -> PrivImage:
    if not Path("/bin/busybox").is_file():
        pytest.skip("/bin/busybox is missing: the test image is built from busybox-static")
    layers = [
        BuiltLayer.from_entries(busybox_rootfs()),
        BuiltLayer.from_entries(
            [
                file("euid", euid_program, 0o4755),
                Entry("nulldev", "char", mode=0o666, devmajor=1, devminor=3),
                file("secret.txt", SECRET, 0o644),
            ]
        ),
    ]
    layout = tmp_path_factory.mktemp("priv-layout")
    gz = write_image(layout, "gzip", layers, image_config([x.diff_id for x in layers]))
    esgz = convert_image(gz, "estargz")
    push_image(esgz, reg, "priv/img", "v1")
    push_image(esgz, reg, "priv/other", "v1")
    return PrivImage(
        reg,
        f"{reg.host}/priv/img:v1",
        f"{reg.host}/priv/other:v1",
        esgz.layers[1]["digest"],
        esgz,
    )


# --- a daemon whose mount other users can reach -----------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A work directory every user may enter (pytest's own tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="stargz-privilege-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for point in mounts_below(str(d.resolve())):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        remove_tree(d)


def _config(workdir: Path, reg: LoopbackRegistry, allowed_uids: Sequence[int] | None) -> str:
    conf = workdir / "registries.conf"
    workdir.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
        f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n'
    )
    text = store_config_toml(
        registries_conf=conf, registries_conf_d=workdir / "registries.conf.d", insecure=[reg.host]
    )
    if allowed_uids is not None:  # only then: the default config must run on older code too
        text += f"[fuse]\nallowed_uids = {json.dumps(list(allowed_uids))}\n"
    return text


@contextlib.contextmanager
def store(
    workdir: Path, reg: LoopbackRegistry, allowed_uids: Sequence[int] | None = None
) -> Iterator[StoreDaemon]:
    d = StoreDaemon(workdir, config_text=_config(workdir, reg, allowed_uids))
    d.start(60)
    try:
        yield d
    except BaseException:
        sys.stderr.write("--- store daemon log (tail) ---\n" + d.log_tail(6000) + "\n")
        raise
    finally:
        code = d.stop()
    assert code == 0, d.log_tail()
    assert not d.is_mounted()


def events(d: StoreDaemon, name: str) -> list[dict[str, object]]:
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            if e.get("event") == name:
                out.append(e)
    return out


def mount_flags(path: Path) -> list[str]:
    entry = fu.mount_entry(path)
    assert entry is not None, f"{path} is not mounted"
    return entry["options"].split(",")


# --- an unprivileged user and the mount -------------------------------------------------------


@pytest.mark.registry
@pytest.mark.parametrize(
    "allowed_uids",
    [None, [NOBODY - 1]],
    ids=["default", "another-uid-allowed"],
)
def test_other_users_cannot_list_or_look_up(
    image: PrivImage, open_dir: Path, allowed_uids: list[int] | None
) -> None:
    """By default the kernel refuses them (the store's directories are 0700); with another
    uid allowed (0755 directories), the daemon does, at every walk."""
    with store(open_dir / "daemon", image.reg, allowed_uids) as d:
        keydir = image.keydir(d.mountpoint)
        diff = keydir / "diff"
        # root (the container engine) reads; its names are now in the kernel's caches
        assert (diff / "secret.txt").read_bytes() == SECRET
        assert json.loads((keydir / "info").read_bytes())["compressed-diff-digest"] == image.key
        # ...and nobody, right after, is refused at every level of the store
        for cmd in (
            ["ls", str(d.mountpoint)],
            ["stat", str(keydir.parent)],
            ["stat", str(diff)],
            ["ls", str(diff)],
            ["cat", str(diff / "secret.txt")],
            ["cat", str(keydir / "info")],
            ["head", "-c", "16", str(keydir / "blob")],
        ):
            r = as_nobody(*cmd)
            assert denied(r), (cmd, r.returncode, r.stdout, r.stderr)
            assert SECRET.decode() not in r.stdout
        # a name nobody chose: the daemon does not even ask the registry
        other = image.keydir(d.mountpoint, image.other_ref)
        r = as_nobody("stat", str(other / "diff"))
        assert denied(r), (r.returncode, r.stdout, r.stderr)
        # (the push made HEAD, POST and PUT requests; a GET would be the daemon's)
        asked = [
            x.path for x in image.reg.requests() if "/priv/other/" in x.path and x.method == "GET"
        ]
        assert asked == []
        assert any(  # the check sees GETs: root's lookups of priv/img made some
            "/priv/img/" in x.path and x.method == "GET" for x in image.reg.requests()
        )
        # root still gets everything
        assert (diff / "secret.txt").read_bytes() == SECRET
        if allowed_uids:  # the daemon's check refused them (by default the kernel did)
            denials = events(d, "access_denied")
            assert denials and {e["uid"] for e in denials} == {NOBODY}
            assert stat.S_IMODE(os.stat(d.mountpoint).st_mode) == 0o755
        else:
            assert stat.S_IMODE(os.stat(d.mountpoint).st_mode) == 0o700


@pytest.mark.registry
def test_setuid_binary_from_the_mount_gives_no_privilege(image: PrivImage, open_dir: Path) -> None:
    with store(open_dir / "daemon", image.reg) as d:
        euid = image.keydir(d.mountpoint) / "diff" / "euid"
        st = os.stat(euid)
        assert st.st_mode & stat.S_ISUID and st.st_uid == 0  # the image's setuid-root binary
        r = as_nobody(str(euid))
        assert "euid=0" not in r.stdout, r.stdout
        assert denied(r), (r.returncode, r.stdout, r.stderr)
        assert {"nosuid", "nodev"} <= set(mount_flags(d.mountpoint))


@pytest.mark.registry
def test_setuid_binary_gives_no_privilege_even_to_an_allowed_user(
    image: PrivImage, open_dir: Path
) -> None:
    """Even if the access check were not there (an allowed uid), nosuid holds."""
    with store(open_dir / "daemon", image.reg, allowed_uids=[NOBODY]) as d:
        r = as_nobody(str(image.keydir(d.mountpoint) / "diff" / "euid"))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"uid={NOBODY} euid={NOBODY}"


@pytest.mark.registry
def test_device_node_from_the_mount_does_not_open(image: PrivImage, open_dir: Path) -> None:
    with store(open_dir / "daemon", image.reg, allowed_uids=[NOBODY]) as d:
        node = image.keydir(d.mountpoint) / "diff" / "nulldev"
        st = os.stat(node)
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        for cmd in (["dd", f"if={node}", "count=1"], ["sh", "-c", f"echo x > {node}"]):
            r = as_nobody(*cmd)
            assert denied(r), (cmd, r.returncode, r.stdout, r.stderr)
        # nodev holds for root too
        for flags in (os.O_RDONLY, os.O_WRONLY):
            with pytest.raises(PermissionError):
                os.close(os.open(node, flags))


@pytest.mark.registry
def test_allowed_uid_reads_the_mount(image: PrivImage, open_dir: Path) -> None:
    with store(open_dir / "daemon", image.reg, allowed_uids=[NOBODY]) as d:
        keydir = image.keydir(d.mountpoint)
        r = as_nobody("cat", str(keydir / "diff" / "secret.txt"))
        assert (r.returncode, r.stdout) == (0, SECRET.decode()), r.stderr
        r = as_nobody("ls", str(keydir / "diff"))
        assert r.returncode == 0 and r.stdout.split() == ["euid", "nulldev", "secret.txt"]
        r = as_nobody("cat", str(keydir / "info"))
        assert r.returncode == 0 and json.loads(r.stdout)["compressed-diff-digest"] == image.key
        assert events(d, "access_denied") == []


# --- containers keep setuid binaries and devices -----------------------------------------------


@pytest.mark.registry
@pytest.mark.podman
def test_podman_container_keeps_setuid_and_devices(image: PrivImage, open_dir: Path) -> None:
    """The same image, the same mount: in a container (``--user 65534``) the setuid binary
    gives euid 0 and the device node works, while straight from the mount neither does."""
    need_podman()
    with store(open_dir / "daemon", image.reg) as d:
        podman = Podman(open_dir / "podman", layer_store=d.mountpoint, insecure=[image.reg.host])
        try:
            podman.check_storage()
            podman.pull(image.ref)
            mount = str(d.mountpoint.resolve()) + "/"
            links = podman.layer_diff_links()
            assert len(links) == 2 and all(t.startswith(mount) for t in links.values()), links
            assert {"nosuid", "nodev"} <= set(mount_flags(d.mountpoint))
            run = ("run", "--rm", "--network", "none", "--pull", "never", "--user", "65534")
            out = podman.run_podman(*run, image.ref, "/euid").stdout
            assert out.strip() == "uid=65534 euid=0"
            script = "echo x > /nulldev && head -c 4 /nulldev | wc -c && echo dev-ok"
            out = podman.run_podman(*run, image.ref, "sh", "-c", script).stdout
            assert out.split() == ["0", "dev-ok"]
            # meanwhile, from the host, nobody gets nothing: no lookup, no euid 0
            r = as_nobody(str(image.keydir(d.mountpoint) / "diff" / "euid"))
            assert denied(r) and "euid=0" not in r.stdout, (r.stdout, r.stderr)
            # the refused walks (which make the kernel drop root's cached names) do not disturb
            # podman: it starts another container on the same layers
            out = podman.run_podman(*run, image.ref, "cat", "/secret.txt").stdout
            assert out == SECRET.decode()
        finally:
            podman.cleanup()


@dataclass
class RootlessPodman:
    """podman run by uid 65534 (rootless; a single-uid mapping since /etc/subuid has no range
    for it), with its own HOME, XDG_RUNTIME_DIR and storage under ``workdir``."""

    workdir: Path
    layer_store: Path | None
    registry: str

    def __post_init__(self) -> None:
        self.home = self.workdir / "home"
        self.run = self.workdir / "run"
        self.graphroot = self.workdir / "graph"
        conf = self.home / ".config" / "containers"
        for p in (conf, self.run, self.graphroot):
            p.mkdir(parents=True, exist_ok=True)
        (conf / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            'netns = "none"\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        (conf / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
            f'[[registry]]\nlocation = "{self.registry}"\ninsecure = true\n'
        )
        als = f'additionallayerstores = ["{self.layer_store}:ref"]\n' if self.layer_store else ""
        (conf / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.graphroot}"\n'
            f'runroot = "{self.run}/storage"\n[storage.options]\n' + als
        )
        self.run.chmod(0o700)
        for dirpath, dirnames, filenames in os.walk(self.workdir):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, NOBODY, NOBODY)

    def podman(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.run),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
        }
        return subprocess.run(
            [*NOBODY_ARGV, "/bin/sh", "-c", 'exec "$@"', "sh", "podman", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
            env=env,
        )

    def store_links(self) -> list[bool]:
        assert self.layer_store is not None
        overlay = self.graphroot / "overlay"
        mount = str(self.layer_store.resolve()) + "/"
        return [
            (d / "diff").is_symlink() and os.readlink(d / "diff").startswith(mount)
            for d in sorted(overlay.iterdir())
            if (d / "diff").exists() or (d / "diff").is_symlink()
        ]

    def cleanup(self) -> None:
        self.podman("rmi", "--all", "--force", timeout=120)
        # rootless podman leaves a pause process holding its user namespace: ours, by its pid
        pid_file = self.run / "libpod" / "tmp" / "pause.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        for point in mounts_below(str(self.workdir.resolve())):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@pytest.mark.registry
@pytest.mark.podman
@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "not-allowed"])
def test_rootless_podman_pulls_through_the_store_only_when_allowed(
    image: PrivImage, open_dir: Path, allowed: bool
) -> None:
    """Rootless podman (uid 65534) with the root daemon as its additional layer store.

    Only the pull is checked: running the image needs files owned by the container's root,
    and a layer served by a root daemon has files owned by host uid 0, which a rootless user
    namespace does not map (runc fails with "permission denied" on /etc, as without the access
    check); that is what the README's own rootless set-up (the daemon run by the user) is for.
    """
    need_podman()
    probe = RootlessPodman(open_dir / "probe", None, image.reg.host)
    info = probe.podman(
        "info", "--format", "{{.Host.Security.Rootless}} {{.Store.GraphDriverName}}"
    )
    probe.cleanup()
    if info.returncode != 0 or info.stdout.split() != ["true", "overlay"]:
        pytest.skip(f"rootless podman with overlay does not work here: {info.stderr[-500:]}")
    with store(open_dir / "daemon", image.reg, allowed_uids=[NOBODY] if allowed else None) as d:
        rootless = RootlessPodman(open_dir / "rootless", d.mountpoint, image.reg.host)
        try:
            r = rootless.podman("pull", "--quiet", image.ref)
            assert r.returncode == 0, r.stderr
            # lazily: both layers are links into the store; refused: podman pulled them itself
            assert rootless.store_links() == [allowed, allowed]
        finally:
            rootless.cleanup()


# --- the state directory ------------------------------------------------------------------------


@contextlib.contextmanager
def fake_daemon(workdir: Path, root: Path, mountpoint: Path) -> Iterator[subprocess.Popen[str]]:
    """The daemon over the in-memory provider (no registry), until READY=1; SIGTERM after."""
    notify = workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), PYTHONPATH=str(REPO))
    env[PROVIDER_FACTORY_ENV] = "tests.fuse_util:fake_provider_factory"
    cmd = [sys.executable, "-m", "stargz_store", "--config", "/dev/null", "--root", str(root)]
    log = open(workdir / "daemon.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*cmd, str(mountpoint)], env=env, stdout=log, stderr=log, text=True, cwd=workdir
    )
    try:
        deadline = time.monotonic() + 60
        got = b""
        while b"READY=1" not in got:
            assert proc.poll() is None, (workdir / "daemon.log").read_text()
            assert time.monotonic() < deadline, "no READY=1"
            sock.settimeout(0.2)
            with contextlib.suppress(socket.timeout):
                got += sock.recv(4096)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        sock.close()
        log.close()
        fu.force_unmount(mountpoint)


def test_root_and_mountpoint_parents_are_created_private(tmp_path: Path) -> None:
    root = tmp_path / "state" / "a" / "root"
    mountpoint = tmp_path / "mnt" / "b" / "store"
    with fake_daemon(tmp_path, root, mountpoint) as proc:
        assert fu.is_mounted(mountpoint)
        for d in (tmp_path / "state", tmp_path / "state" / "a", root):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
        for d in (tmp_path / "mnt", tmp_path / "mnt" / "b"):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
        assert (root / "lock").read_text().strip() == str(proc.pid)
    assert proc.returncode == 0


def _run_once(root: Path, mountpoint: Path) -> subprocess.CompletedProcess[str]:
    """The daemon, expected to refuse to start. One that starts anyway is stopped (SIGTERM,
    then its mount removed) after 20 s and reported with its exit status."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env[PROVIDER_FACTORY_ENV] = "tests.fuse_util:fake_provider_factory"
    cmd = [sys.executable, "-m", "stargz_store", "--config", "/dev/null", "--root", str(root)]
    proc = subprocess.Popen(
        [*cmd, str(mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        fu.force_unmount(mountpoint)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _error_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    lines = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    return [str(e["error"]) for e in lines if e.get("level") == "error"]


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o777, 0, "writable by group or others (mode 0777)"),
        (0o770, 0, "writable by group or others (mode 0770)"),
        (0o700, NOBODY, f"belongs to uid {NOBODY}"),
    ],
)
def test_unsafe_existing_root_is_refused(tmp_path: Path, mode: int, owner: int, why: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(mode)
    os.chown(root, owner, owner)
    r = _run_once(root, tmp_path / "mnt")
    assert r.returncode == 1, r.stderr
    errors = _error_lines(r)
    assert len(errors) == 1 and why in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(root) == [] and stat.S_IMODE(os.stat(root).st_mode) == mode
    assert not (tmp_path / "mnt").exists()


def test_readable_existing_root_is_made_private(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o755)  # as earlier releases created it
    with fake_daemon(tmp_path, root, tmp_path / "mnt"):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    log = (tmp_path / "daemon.log").read_text()
    assert '"root_made_private"' in log and '"old_mode": "0755"' in log


def _tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _helper_answers(sock: Path) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"{}")
        s.shutdown(socket.SHUT_WR)
        reply: dict[str, object] = json.loads(s.makefile("rb").read())
        return reply


@pytest.mark.registry
def test_second_daemon_on_the_same_root_is_refused(image: PrivImage, open_dir: Path) -> None:
    with store(open_dir / "first", image.reg) as first:
        assert first.proc is not None
        sock = first.root / "auth-helper.sock"
        assert _helper_answers(sock)["ok"] is True
        before = _tree(first.root)
        assert "auth-helper.sock" in before
        second = StoreDaemon(
            open_dir / "second", config_text=_config(open_dir / "second", image.reg, None)
        )
        second.root = first.root  # the same --root, another mountpoint
        started, why = True, ""
        try:
            second.start(60)
        except RuntimeError as exc:
            started, why = False, str(exc)
        finally:
            second.stop()
        # the first daemon's state is untouched: its socket (same inode) answers, it serves
        assert _tree(first.root) == before
        assert _helper_answers(sock)["ok"] is True
        diff = image.keydir(first.mountpoint) / "diff"
        assert (diff / "secret.txt").read_bytes() == SECRET
        # the second said why, in one line naming the first's pid, and exited 1
        assert not started and "exited with 1 before READY=1" in why, why
        errors = [
            str(e["error"])
            for e in (json.loads(x) for x in second.log_tail(20000).splitlines() if x[:1] == "{")
            if e.get("level") == "error"
        ]
        assert len(errors) == 1, errors
        assert f"pid {first.proc.pid}" in errors[0] and str(first.root) in errors[0]
        assert not second.is_mounted()
        assert (first.root / "lock").read_text().strip() == str(first.proc.pid)
    # and once the first has stopped, the lock is free again
    with store(open_dir / "first", image.reg) as again:
        assert again.proc is not None
        assert (again.root / "lock").read_text().strip() == str(again.proc.pid)


class _Sink:
    def add_helper_credentials(self, payload: object) -> int:
        return 0


def test_live_helper_socket_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "auth-helper.sock"
    with HelperChannelServer(path, _Sink()):
        inode = os.lstat(path).st_ino
        with pytest.raises(HelperChannelError, match="in use"):
            HelperChannelServer(path, _Sink()).start()
        assert os.lstat(path).st_ino == inode
        assert _helper_answers(path)["ok"] is True
    assert not path.exists()
    # a stale socket (nobody listening) is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with HelperChannelServer(path, _Sink()):
        assert _helper_answers(path)["ok"] is True
