"""The benchmark environment: a loopback registry, the WAN proxy in front of it (in a thread of
this process, so its byte counters can be read), private podman configuration, and the store
daemon. Loopback addresses only; nothing touches the machine's global podman config/storage."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from benchmarks.wanproxy import WanProxy
from testbed.gopeer import GoPeerError, GoPeerUnavailable, GoStoreDaemon

LOOPBACK = "127.0.0.1"


class EnvError(Exception):
    """A piece of the benchmark environment could not be started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EnvError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(0.05)
    raise EnvError(f"nothing listens on {LOOPBACK}:{port} after {timeout:.0f} s")


def registry_binary() -> str:
    for name in ("docker-registry", "registry"):
        path = shutil.which(name)
        if path:
            return path
    raise EnvError("docker-registry is not installed (apt-get install docker-registry)")


class Registry:
    """``docker-registry serve`` on 127.0.0.1 with storage in *storage* (kept across runs)."""

    def __init__(self, storage: Path, workdir: Path) -> None:
        self.storage = storage
        self.workdir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cfg = self.workdir / "registry.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {LOOPBACK}:{self.port}\n"
        )
        log = open(self.workdir / "registry.log", "wb")  # noqa: SIM115 - lives with the process
        self._proc = subprocess.Popen(
            [registry_binary(), "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        _wait_port(self.port, 20, self._proc)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def has_manifest(self, repo: str, tag: str) -> bool:
        req = urllib.request.Request(
            f"http://{self.address}/v2/{repo}/manifests/{tag}",
            method="HEAD",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10):
                return True
        except urllib.error.HTTPError:
            return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


class ProxyThread:
    """A :class:`WanProxy` served by trio in a daemon thread of this process."""

    def __init__(self, upstream_port: int, rtt_s: float, bits_per_second: float) -> None:
        self.proxy = WanProxy(LOOPBACK, upstream_port, rtt_s=rtt_s, bits_per_second=bits_per_second)
        self.port = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wanproxy", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as nursery:
                    self.port = await nursery.start(self.proxy.serve)
                    self._started.set()

        try:
            trio.run(main)
        except BaseException as exc:  # reported by start()
            self._error = exc
        finally:
            self._started.set()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(20)
        if self._error is not None or not self.port:
            raise EnvError(f"WAN proxy did not start: {self._error!r}")

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def bytes_down(self) -> int:
        return self.proxy.down.bytes_total

    @property
    def bytes_up(self) -> int:
        return self.proxy.up.bytes_total

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None and self._thread.is_alive():
            cancel = self._cancel
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(cancel.cancel, trio_token=self._token)
        self._thread.join(10)


# --------------------------------------------------------------------------------------------
# Mounts


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below *path* (deepest first)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def unmount_all(path: Path) -> None:
    """Unmount everything at or below *path*: FUSE with fusermount3, then lazily."""
    for mnt in mounts_under(path):
        if subprocess.run(["umount", mnt], capture_output=True, check=False).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, check=False)
            if mnt in mounts_under(path):
                subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --------------------------------------------------------------------------------------------
# podman with private configuration


@dataclass
class Podman:
    """podman with its own containers.conf / storage.conf / registries.conf under *workdir*."""

    workdir: Path
    registry: str  # host:port podman pulls from (the proxy)
    als_mount: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = self.workdir
        for d in ("graphroot", "runroot", "tmp", "netconf"):
            (w / d).mkdir(parents=True, exist_ok=True)
        (w / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "none"\n'
            f'tmp_dir = "{w / "tmp"}"\n'
            f'static_dir = "{w / "graphroot" / "libpod"}"\n'
            f'volume_path = "{w / "graphroot" / "volumes"}"\n'
            "[network]\n"
            f'network_config_dir = "{w / "netconf"}"\n'
        )
        als = f'additionallayerstores = ["{self.als_mount}:ref"]\n' if self.als_mount else ""
        (w / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{w / "graphroot"}"\n'
            f'runroot = "{w / "runroot"}"\n'
            "[storage.options]\n" + als
        )
        (w / "registries.conf").write_text(registries_conf(self.registry))
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(w / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(w / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(w / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(w / "auth.json"),
            "TMPDIR": str(w / "tmp"),
        }
        (w / "auth.json").write_text('{"auths": {}}')

    def run(
        self, *args: str, timeout: float = 1800, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise EnvError(
                f"podman {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-2000:]}"
            )
        return proc

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.run("rm", "-af", timeout=120, check=False)
        with contextlib.suppress(Exception):
            self.run("rmi", "-af", timeout=300, check=False)
        unmount_all(self.workdir)


def registries_conf(registry: str) -> str:
    return (
        "unqualified-search-registries = []\n"
        "[[registry]]\n"
        f'location = "{registry}"\n'
        "insecure = true\n"
    )


# --------------------------------------------------------------------------------------------
# The store daemon


def als_layer_dir(mount: Path, ref: str, key: str) -> Path:
    return mount / base64.standard_b64encode(ref.encode()).decode() / key


@dataclass
class StoreDaemon:
    """``python -m stargz_store --root ROOT --config FILE MOUNT``, waited for until mounted."""

    root: Path
    mount: Path
    registry: str
    background_fetch: bool = True
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0

    def config_text(self) -> str:
        regconf = self.root.parent / "store-registries.conf"
        regconf.write_text(registries_conf(self.registry))
        empty_d = self.root.parent / "store-registries.conf.d"
        empty_d.mkdir(exist_ok=True)
        extra = [x.strip() for x in os.environ.get("BENCH_STORE_FETCH", "").split(";") if x.strip()]
        bg = f"background_fetch = {'true' if self.background_fetch else 'false'}\n"
        return (
            "[registry]\n"
            f'insecure_registries = ["{self.registry}"]\n'
            f'registries_conf = "{regconf}"\n'
            f'registries_conf_d = "{empty_d}"\n'
            "[auth]\n"
            "extra_auth_files = []\n"
            'helper_socket = ""\n'
            "[fetch]\n"
            # Experiments: extra [fetch] lines, e.g. BENCH_STORE_FETCH='read_ahead_bytes = 0'.
            + "".join(f"{x}\n" for x in extra)
            + ("" if any(x.startswith("background_fetch ") for x in extra) else bg)
            + "[log]\n"
            f'level = "{os.environ.get("BENCH_STORE_LOG_LEVEL", "warning")}"\n'
            'format = "json"\n'
        )

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(parents=True, exist_ok=True)
        cfg = self.root.parent / "store-config.toml"
        cfg.write_text(self.config_text())
        log_path = self.log_path or _log_path(self.root.parent / "store.log", "store", self)
        log = open(log_path, "ab")  # noqa: SIM115 - lives with the process
        env = {**os.environ, "REGISTRY_AUTH_FILE": str(self.root.parent / "store-auth.json")}
        (self.root.parent / "store-auth.json").write_text('{"auths": {}}')
        env.pop("NOTIFY_SOCKET", None)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stargz_store",
                "--root",
                str(self.root),
                "--config",
                str(cfg),
                str(self.mount),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        log.close()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise EnvError(f"store daemon exited with {self.proc.returncode}: {tail}")
            if os.path.ismount(self.mount):
                self.startup_s = time.monotonic() - t0
                self._profile(log_path)
                return
            time.sleep(0.02)
        self.stop()
        raise EnvError(f"store daemon did not mount {self.mount} within {timeout:.0f} s")

    def _profile(self, log_path: Path) -> None:
        """With ``BENCH_STORE_PY_SPY=DIR``, py-spy samples the daemon (all threads, idle ones
        too, 100 Hz) until it exits, as collapsed stacks next to its log name in DIR.
        ``BENCH_STORE_PY_SPY_FLAGS`` replaces ``--idle`` (e.g. ``--gil``: only the thread
        holding the GIL, i.e. where the interpreter's time goes)."""
        out_dir = os.environ.get("BENCH_STORE_PY_SPY")
        if not out_dir or self.proc is None:
            return
        spy = Path(sys.executable).parent / "py-spy"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        out = Path(out_dir) / f"{log_path.stem}-{self.proc.pid}.collapsed"
        subprocess.Popen(
            [str(spy), "record", "--pid", str(self.proc.pid), "--rate", "100",
             *os.environ.get("BENCH_STORE_PY_SPY_FLAGS", "--idle").split(),
             "--threads", "--format", "raw", "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def peak_rss_bytes(self) -> int:
        """VmHWM of the daemon (0 when it is gone)."""
        return proc_status_bytes(self.pid, "VmHWM")

    def rss_bytes(self) -> int:
        """VmRSS of the daemon now (0 when it is gone)."""
        return proc_status_bytes(self.pid, "VmRSS")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if os.path.ismount(self.mount) or self.mount.resolve().as_posix() in mounts_under(
            self.mount
        ):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False)
            if os.path.ismount(self.mount):
                subprocess.run(["umount", "-l", str(self.mount)], check=False)


def _log_path(default: Path, name: str, obj: object) -> Path:
    """*default*, or a file in ``$BENCH_STORE_LOG_DIR`` (daemon logs kept across clean-ups)."""
    keep = os.environ.get("BENCH_STORE_LOG_DIR")
    if not keep:
        return default
    Path(keep).mkdir(parents=True, exist_ok=True)
    return Path(keep) / f"{name}-{time.strftime('%H%M%S')}-{os.getpid()}-{id(obj)}.log"


@dataclass
class GoStore:
    """The Go reference store (``go-stargz-store``, our main around the ``store`` package of
    Debian's stargz-snapshotter 0.12; ``testbed.gopeer``) with :class:`StoreDaemon`'s interface.

    Its defaults are the upstream ones: landmark prefetch and background fetch on, the
    registry on 127.0.0.1 reached over http (the library's rule for loopback hosts, so
    *registry* needs no configuration). ``BENCH_GO_STORE_CONFIG`` adds TOML lines
    (``;``-separated, e.g. ``prefetch_size = 0``); ``BENCH_STORE_LOG_LEVEL`` and
    ``BENCH_STORE_LOG_DIR`` apply as for our daemon."""

    root: Path
    mount: Path
    registry: str
    background_fetch: bool = True
    startup_s: float = 0.0
    daemon: GoStoreDaemon | None = None

    def config_text(self) -> str:
        extra = [
            x.strip() for x in os.environ.get("BENCH_GO_STORE_CONFIG", "").split(";") if x.strip()
        ]
        lines = [] if self.background_fetch else ["no_background_fetch = true"]
        return "".join(f"{x}\n" for x in [*lines, *extra])

    def start(self, timeout: float = 60) -> None:
        level = os.environ.get("BENCH_STORE_LOG_LEVEL", "warning")
        work = self.root.parent / "go-store"
        self.daemon = GoStoreDaemon(
            work,
            mountpoint=self.mount,
            root=self.root,
            config_text=self.config_text(),
            log_level=level,
            log_path=_log_path(work / "go-store.log", "go-store", self),
        )
        try:
            self.daemon.start(timeout)
        except (GoPeerError, GoPeerUnavailable) as exc:
            raise EnvError(f"Go store: {exc}") from exc
        self.startup_s = self.daemon.startup_s

    @property
    def pid(self) -> int:
        return self.daemon.pid if self.daemon is not None else 0

    def peak_rss_bytes(self) -> int:
        return self.daemon.peak_rss_bytes() if self.daemon is not None else 0

    def rss_bytes(self) -> int:
        return proc_status_bytes(self.pid, "VmRSS")

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        self.daemon = None
        if os.path.ismount(self.mount):
            unmount_all(self.mount)


def proc_status_bytes(pid: int, key: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of /proc/PID/status in bytes; 0 when the process
    is gone."""
    if pid <= 0:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def make_store(
    kind: str, root: Path, mount: Path, registry: str, background_fetch: bool = True
) -> StoreDaemon | GoStore:
    """Our daemon (``ours``) or the Go reference store (``go``), not started."""
    if kind == "go":
        return GoStore(root, mount, registry, background_fetch=background_fetch)
    if kind == "ours":
        return StoreDaemon(root, mount, registry, background_fetch=background_fetch)
    raise ValueError(f"unknown store {kind!r}")


# --------------------------------------------------------------------------------------------
# Pushing images


def skopeo_push(layout: str, tag: str, dest: str) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-skopeo-") as tmp:
        auth = Path(tmp) / "auth.json"
        auth.write_text('{"auths": {}}')
        proc = subprocess.run(
            [
                "skopeo",
                "copy",
                "-q",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--authfile",
                str(auth),
                f"oci:{layout}:{tag}",
                f"docker://{dest}",
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "REGISTRY_AUTH_FILE": str(auth), "TMPDIR": tmp},
        )
    if proc.returncode != 0:
        raise EnvError(f"skopeo copy oci:{layout}:{tag} docker://{dest}: {proc.stderr[-1500:]}")


def manifest_layers(layout: str, tag: str) -> list[dict[str, object]]:
    index = json.loads(Path(layout, "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            algo, _, hexd = desc["digest"].partition(":")
            manifest = json.loads(Path(layout, "blobs", algo, hexd).read_text())
            layers: list[dict[str, object]] = manifest["layers"]
            return layers
    raise EnvError(f"{layout} has no tag {tag}")


@contextlib.contextmanager
def cleaned(path: Path) -> Iterator[Path]:
    """A fresh directory that is unmounted and removed afterwards."""
    if path.exists():
        unmount_all(path)
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        unmount_all(path)
        shutil.rmtree(path, ignore_errors=True)


def measure_link(address: str, repo: str, digest: str, nbytes: int) -> dict[str, float]:
    """Time a ranged blob GET through *address*: time to first byte and the effective
    throughput of the emulated link (which may fall short of the nominal rate)."""
    req = urllib.request.Request(
        f"http://{address}/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes=0-{nbytes - 1}"}
    )
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=300) as resp:
        first = resp.read(1)
        t1 = time.monotonic()
        got = len(first)
        while True:
            data = resp.read(1 << 20)
            if not data:
                break
            got += len(data)
    t2 = time.monotonic()
    return {
        "bytes": got,
        "first_byte_s": t1 - t0,
        "seconds": t2 - t0,
        "effective_mbit": got * 8 / 1e6 / (t2 - t1) if t2 > t1 else 0.0,
    }
