"""podman 5.4 on a Debian 12 host: Debian trixie's podman, run from a chroot that ``./run setup``
builds once with debootstrap and caches outside the checkout.

Why a chroot: Debian 12 ships podman 4.3.1, which asks the additional layer store for compressed
digests; podman >= 5.1 asks for TOC digests only, and >= 5.2 runs the
``additional-layer-store-auth-helper``. Those paths of the store can only be checked against a
real podman 5 (``tests/test_e2e_podman5.py``).

What one session mounts (``TrixieChroot.start``), each step found necessary by trying:

- the cached tree, bind-mounted **read-only** onto a private directory of this session, made a
  private mount: containers/storage unpacks layers in a child that remounts ``/`` private, which
  fails with EINVAL unless ``/`` is a mount point. Read-only, because several sessions (other
  checkouts of the machine) use the same cache at once and none may change it; every place podman
  writes to is mounted over below.
- ``/sys`` and ``/dev`` recursive binds made slaves (runc needs the cgroup tree and the devices;
  unmounting the copies never reaches the host's), a fresh ``proc``, and tmpfs on ``/run``,
  ``/tmp``, ``/var/tmp``, ``/var/lib/containers`` (c/image's blob-info cache as root) and
  ``/dev/shm`` (podman's SHM lock segment, kept apart from the host's podman 4.3's one);
- the session's work directory on ``/var/lib/stargz-store``: podman's graphroot, configuration,
  the store daemon's work directory and its FUSE mount, the auth helper. The daemon runs on the
  host and mounts inside the chroot's tree (``<root>/var/lib/stargz-store/<name>/store``), so that
  podman sees it at ``/var/lib/stargz-store/<name>/store`` and its auth helper reaches the
  daemon's socket the same way.

One set of mounts serves every test of a session: a test gets its own directory, graphroot,
runroot and daemon (``Podman5``), and its clean-up checks that the session's mounts are back to
what ``start`` made (``TrixieChroot.check_clean``). ``stop`` unmounts all of it and checks
/proc/self/mountinfo that nothing is left below the session's directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed import PodmanError, StoreDaemon, _toml_str, disk_usage, mounts_below, remove_tree

CACHE_ENV = "STARGZ_PODMAN5_ROOT"
DEFAULT_CACHE = Path("/var/cache/stargz-store-tests/trixie-podman")
#: Written by ``./run setup`` last, once the chroot is complete: "suite variant packages".
STAMP = ".stargz-store-chroot"
#: Where the session's work directory appears inside the chroot.
INSIDE_WORK = "/var/lib/stargz-store"
HELPER_NAME = "stargz-store-helper"
#: What ``auth.helper_client`` needs, standard library only (tests/test_helper_channel.py).
HELPER_CLIENT_FILES = ("__init__.py", "helper_protocol.py", "helper_client.py")
CHROOT_PATH = (
    "/var/lib/stargz-store/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)
REPO = Path(__file__).resolve().parent.parent
SESSION_PREFIX = "sgz5-"
OWNER_FILE = "owner.pid"


def chroot_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def chroot_problem(cache: Path | None = None) -> str | None:
    """Why the cached chroot cannot be used, or None when it can."""
    cache = cache or chroot_cache()
    if not (cache / STAMP).is_file():
        return f"the podman 5.4 chroot is not built at {cache} (./run setup builds it)"
    for tool in ("usr/bin/podman", "usr/bin/python3", "usr/sbin/runc", "usr/bin/conmon"):
        if not os.access(cache / tool, os.X_OK):
            return f"{cache} is incomplete: no /{tool} (remove it; ./run setup rebuilds it)"
    return None


def _mount(*args: str) -> None:
    out = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)}: {out.stderr.strip()}")


def _mount_points(below: str) -> list[str]:
    """Every mount at or below ``below``, one entry per mount (a path mounted over twice is
    listed twice), in mount order."""
    found = []
    prefix = below.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == below or point.startswith(prefix):
                found.append(point)
    return found


def unmount_all(below: str) -> list[str]:
    """Unmount everything at or below ``below``, deepest and newest first (``umount``, then
    ``umount -l`` for a busy one); returns what is still mounted afterwards."""
    for _ in range(3):
        points = _mount_points(below)
        if not points:
            break
        order = sorted(range(len(points)), key=lambda i: (points[i].count("/"), i), reverse=True)
        for i in order:
            point = points[i]
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return _mount_points(below)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is no zombie (a killed test run's process can stay a
    zombie for a while when its parent was killed too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def sweep_stale_sessions() -> list[Path]:
    """Unmount and delete the directories of sessions whose process is gone (a test run killed
    before its clean-up): left mounted, their recursive binds of /dev and /sys would let a later
    ``rm -rf /tmp/*`` reach the host's devices. Sessions of live processes are left alone; a
    directory something is still mounted below is never deleted. Returns what was removed."""
    removed = []
    for base in Path("/tmp").glob(SESSION_PREFIX + "*"):
        try:
            pid = int((base / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _alive(pid):
            continue
        if unmount_all(str(base)):
            continue
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


class TrixieChroot:
    """The cached trixie tree mounted for one session under a private directory in /tmp (short,
    because Unix socket paths below it are limited to 107 bytes)."""

    def __init__(self, cache: Path | None = None) -> None:
        self.cache = (cache or chroot_cache()).resolve()
        sweep_stale_sessions()
        self.base = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX, dir="/tmp"))
        (self.base / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.session = self.base.name.split("-", 1)[1].lower().replace("_", "")[:6]
        self.root = self.base / "root"  # the chroot, as the host sees it
        self.backing = self.base / "work"  # what /var/lib/stargz-store shows inside
        self.baseline: list[str] = []
        self._names = itertools.count(1)

    @property
    def work(self) -> Path:
        """The chroot's /var/lib/stargz-store, through the chroot's mounts (a FUSE mount made
        here is what podman sees)."""
        return self.root / INSIDE_WORK.lstrip("/")

    def host_path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def inside_path(self, host: Path) -> str:
        rel = host.absolute().relative_to(self.root)
        return "/" + str(rel)

    def start(self) -> TrixieChroot:
        problem = chroot_problem(self.cache)
        if problem:
            raise RuntimeError(problem)
        try:
            self._mount_all()
            self._install_helper()
        except BaseException:
            self.stop()
            raise
        self.baseline = _mount_points(str(self.base))
        return self

    def _mount_all(self) -> None:
        root = str(self.root)
        self.root.mkdir()
        self.backing.mkdir()
        _mount("--bind", str(self.cache), root)
        _mount("--make-private", root)
        _mount("-o", "remount,bind,ro", root)
        for sub in ("sys", "dev"):
            _mount("--rbind", f"/{sub}", f"{root}/{sub}")
            _mount("--make-rslave", f"{root}/{sub}")
        _mount("-t", "proc", "proc", f"{root}/proc")
        for sub, mode in (
            ("run", "755"),
            ("tmp", "1777"),
            ("var/tmp", "1777"),
            ("var/lib/containers", "700"),
            ("dev/shm", "1777"),
        ):
            _mount("-t", "tmpfs", "-o", f"mode={mode}", "tmpfs", f"{root}/{sub}")
            _mount("--make-private", f"{root}/{sub}")
        _mount("--bind", str(self.backing), str(self.work))
        _mount("--make-private", str(self.work))

    def _install_helper(self) -> None:
        """The auth helper podman runs: our ``auth.helper_client`` (standard library only),
        copied from this checkout, under the chroot's python3; it finds the daemon's socket in
        ``$STARGZ_STORE_HELPER_SOCKET``, which podman passes on from its own environment."""
        lib = self.work / "helper" / "auth"
        lib.mkdir(parents=True)
        for name in HELPER_CLIENT_FILES:
            shutil.copy2(REPO / "auth" / name, lib / name)
        bindir = self.work / "bin"
        bindir.mkdir()
        wrapper = bindir / HELPER_NAME
        wrapper.write_text(
            "#!/bin/sh\n"
            "# stargz-store-helper for podman in the test chroot (testbed/podman5.py)\n"
            f'PYTHONPATH={INSIDE_WORK}/helper exec python3 -m auth.helper_client "$@"\n'
        )
        wrapper.chmod(0o755)

    def new_name(self) -> str:
        """A directory name for one test, unique on the machine (paths inside the chroot are the
        same for every session, and process command lines are matched on them)."""
        return f"{self.session}-{next(self._names)}"

    def extra_mounts(self) -> list[str]:
        """Mounts below the session's directory that ``start`` did not make."""
        left = list(_mount_points(str(self.base)))
        for point in self.baseline:
            if point in left:
                left.remove(point)
        return left

    def check_clean(self) -> None:
        extra = self.extra_mounts()
        if extra:
            raise RuntimeError(f"mounts left in the podman 5.4 chroot: {extra}")

    def stop(self) -> None:
        """Unmount everything below the session's directory and delete it; raises when a mount
        is still there (the directory is then left alone)."""
        left = unmount_all(str(self.base))
        if left:
            raise RuntimeError(f"still mounted after unmounting the podman 5.4 chroot: {left}")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> TrixieChroot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Podman5:
    """podman 5.4 in the chroot with everything of its own in ``<work>/<name>/``: graphroot,
    containers.conf, storage.conf, registries.conf; runroot ``/run/<name>`` (podman allows 50
    characters at most). Paths given to podman are the chroot's; attributes ending in ``_host``
    and the inspection helpers are the host's view.

    ``layer_store`` is the store's mountpoint as podman sees it. ``auth_helper`` is written to
    registries.conf as ``additional-layer-store-auth-helper``; ``helper_socket`` (inside path)
    is handed to it in ``$STARGZ_STORE_HELPER_SOCKET``. ``authfile`` (inside path) becomes
    ``REGISTRY_AUTH_FILE``."""

    def __init__(
        self,
        chroot: TrixieChroot,
        name: str,
        *,
        layer_store: str | None = None,
        insecure: Sequence[str] = (),
        authfile: str | None = None,
        auth_helper: str | None = None,
        helper_socket: str | None = None,
    ) -> None:
        self.chroot = chroot
        self.name = name
        self.inside = f"{INSIDE_WORK}/{name}"
        self.workdir = chroot.host_path(self.inside)
        self.graphroot = f"{self.inside}/graph"
        self.runroot = f"/run/{name}"
        self.tmpdir = f"{self.inside}/tmp"
        self.layer_store = layer_store
        self.insecure = list(insecure)
        self.authfile = authfile
        self.auth_helper = auth_helper
        self.helper_socket = helper_socket
        self.graphroot_host = chroot.host_path(self.graphroot)
        self.runroot_host = chroot.host_path(self.runroot)
        self.containers_conf = f"{self.inside}/containers.conf"
        self.storage_conf = f"{self.inside}/storage.conf"
        self.registries_conf = f"{self.inside}/registries.conf"
        self.write_configs()

    def _write(self, inside: str, text: str) -> None:
        self.chroot.host_path(inside).write_text(text)

    def write_configs(self) -> None:
        for d in (self.graphroot, self.runroot, self.tmpdir, f"{self.inside}/networks"):
            self.chroot.host_path(d).mkdir(parents=True, exist_ok=True)
        self._write(
            self.containers_conf,
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            'netns = "none"\n'
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f"events_logfile_path = {_toml_str(self.tmpdir + '/events.log')}\n"
            f"tmp_dir = {_toml_str(self.tmpdir)}\n"
            f"image_copy_tmp_dir = {_toml_str(self.tmpdir)}\n"
            f"volume_path = {_toml_str(self.graphroot + '/volumes')}\n"
            f"static_dir = {_toml_str(self.graphroot + '/libpod')}\n"
            "[network]\n"
            f"network_config_dir = {_toml_str(self.inside + '/networks')}\n",
        )
        als = ""
        if self.layer_store is not None:
            als = f"additionallayerstores = [{_toml_str(self.layer_store + ':ref')}]\n"
        self._write(
            self.storage_conf,
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {_toml_str(self.graphroot)}\n"
            f"runroot = {_toml_str(self.runroot)}\n"
            "[storage.options]\n" + als,
        )
        head = 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
        if self.auth_helper:
            head += f"additional-layer-store-auth-helper = {_toml_str(self.auth_helper)}\n"
        regs = "".join(
            f"[[registry]]\nlocation = {_toml_str(h)}\ninsecure = true\n" for h in self.insecure
        )
        self._write(self.registries_conf, head + regs)

    @property
    def env(self) -> dict[str, str]:
        """podman's whole environment (nothing of the host's: its paths mean nothing inside)."""
        env = {
            "PATH": CHROOT_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "CONTAINERS_CONF": self.containers_conf,
            "CONTAINERS_STORAGE_CONF": self.storage_conf,
            "CONTAINERS_REGISTRIES_CONF": self.registries_conf,
            "TMPDIR": self.tmpdir,
            # The host has cgroups v1 (hybrid); podman 5 warns about it on every command.
            "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
        }
        if self.authfile is not None:
            env["REGISTRY_AUTH_FILE"] = self.authfile
        if self.helper_socket is not None:
            env["STARGZ_STORE_HELPER_SOCKET"] = self.helper_socket
        return env

    def command(self, *args: str) -> list[str]:
        return ["chroot", str(self.chroot.root), "podman", *args]

    def run_podman(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.command(*args)
        out = subprocess.run(
            cmd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
        if check and out.returncode != 0:
            raise PodmanError(cmd, out.returncode, out.stdout, out.stderr)
        return out

    def check_storage(self) -> dict[str, Any]:
        """``podman info``'s store section, after checking that podman uses our graphroot,
        runroot and (when configured) additional layer store."""
        out = self.run_podman("info", "--format", "{{json .Store}}")
        store: dict[str, Any] = json.loads(out.stdout)
        if store.get("graphRoot") != self.graphroot or store.get("runRoot") != self.runroot:
            raise RuntimeError(f"podman does not use our storage: {store}")
        if self.layer_store is not None:
            opts = store.get("graphOptions") or {}
            if opts.get("overlay.additionallayerstore") != f"{self.layer_store}:ref":
                raise RuntimeError(f"podman does not use the additional layer store: {opts}")
        return store

    def version(self) -> str:
        return self.run_podman("version", "--format", "{{.Client.Version}}").stdout.strip()

    def pull(self, ref: str, *extra: str, timeout: float = 300) -> str:
        """``podman pull``; returns the image id."""
        out = self.run_podman("pull", "--quiet", "--tls-verify=false", *extra, ref, timeout=timeout)
        return out.stdout.strip().splitlines()[-1]

    def run(self, image: str, *cmd: str, timeout: float = 300) -> str:
        """``podman run --rm --network none --pull never IMAGE CMD...``; returns stdout."""
        out = self.run_podman(
            "run", "--rm", "--network", "none", "--pull", "never", image, *cmd, timeout=timeout
        )
        return out.stdout

    def save(self, image: str, dest: str, fmt: str) -> Path:
        """``podman save`` to ``dest`` (inside path); returns the archive's host path."""
        self.run_podman("save", "--format", fmt, "--output", dest, image)
        return self.chroot.host_path(dest)

    def push(self, image: str, dest: str, *extra: str) -> None:
        self.run_podman("push", "--quiet", "--tls-verify=false", *extra, image, f"docker://{dest}")

    def inspect(self, image: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.run_podman("image", "inspect", image).stdout)
        return data[0]

    # --- the host's view of podman's storage --------------------------------------------------
    def layer_diff_links(self) -> dict[str, str]:
        """{layer id: target (a path inside the chroot)} for every layer whose ``diff`` is a
        symlink: the layers the additional layer store served."""
        links = {}
        overlay = self.graphroot_host / "overlay"
        for layer in sorted(overlay.iterdir()) if overlay.is_dir() else []:
            diff = layer / "diff"
            if diff.is_symlink():
                links[layer.name] = os.readlink(diff)
        return links

    def storage_layers(self) -> list[dict[str, Any]]:
        path = self.graphroot_host / "overlay-layers" / "layers.json"
        if not path.exists():
            return []
        layers: list[dict[str, Any]] = json.loads(path.read_text() or "[]")
        return layers

    def layer_ids(self, image: str) -> list[str]:
        """containers/storage layer ids of ``image``, base first."""
        image_id = self.inspect(image)["Id"]
        images = json.loads((self.graphroot_host / "overlay-images" / "images.json").read_text())
        top = next(i["layer"] for i in images if i["id"] == image_id)
        parents = {layer["id"]: layer.get("parent", "") for layer in self.storage_layers()}
        chain: list[str] = []
        while top:
            chain.append(top)
            top = parents[top]
        return chain[::-1]

    def store_links(self, image: str) -> list[bool]:
        """Per image layer (base first): does its ``diff`` point into the store's mount?"""
        if self.layer_store is None:
            return [False] * len(self.layer_ids(image))
        links = self.layer_diff_links()
        prefix = self.layer_store.rstrip("/") + "/"
        return [links.get(layer, "").startswith(prefix) for layer in self.layer_ids(image)]

    def graphroot_usage(self) -> int:
        """Bytes allocated in the graphroot (symlinks into the store are not followed)."""
        return disk_usage(self.graphroot_host)

    # --- clean-up -----------------------------------------------------------------------------
    def helper_pids(self) -> list[int]:
        """conmon and the ``podman container cleanup`` it starts (their command lines name our
        graphroot or runroot, which are unique to this test on the machine)."""
        needles = (self.graphroot.encode(), self.runroot.encode() + b"/")
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if any(n in cmdline for n in needles):
                pids.append(int(entry))
        return pids

    def cleanup(self) -> None:
        """Stop containers, unmount everything of this podman, delete its directories."""
        if self.graphroot_host.exists():
            with contextlib.suppress(Exception):
                self.run_podman("rm", "--all", "--force", "--time", "0", timeout=60, check=False)
            deadline = time.monotonic() + 30
            while self.helper_pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(Exception):
                self.run_podman("umount", "--all", timeout=60, check=False)
        for top in (self.workdir, self.runroot_host):
            left = unmount_all(str(top))
            if left:
                raise RuntimeError(f"still mounted after podman's clean-up: {left}")
        remove_tree(self.runroot_host)
        remove_tree(self.workdir)


def store_daemon(chroot: TrixieChroot, name: str, **kw: Any) -> StoreDaemon:
    """A store daemon on the host whose work directory (and so its mount and its auth-helper
    socket) is ``/var/lib/stargz-store/<name>`` inside the chroot. ``registries_conf`` is
    a host path, like every other argument of ``StoreDaemon``."""
    return StoreDaemon(chroot.work / name, **kw)


def inside(chroot: TrixieChroot, daemon: StoreDaemon) -> dict[str, str]:
    """The daemon's mountpoint and auth-helper socket as podman in the chroot sees them."""
    return {
        "mountpoint": chroot.inside_path(daemon.mountpoint),
        "socket": chroot.inside_path(daemon.root / "auth-helper.sock"),
    }


__all__ = [
    "INSIDE_WORK",
    "Podman5",
    "TrixieChroot",
    "chroot_cache",
    "chroot_problem",
    "inside",
    "mounts_below",
    "store_daemon",
    "unmount_all",
]
