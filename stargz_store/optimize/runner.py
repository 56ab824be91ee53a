"""One recording run: a private store daemon recording reads, and a private podman that pulls
the image through it and runs it once.

Everything lives in one work directory: the daemon's root (cache, profiles) and mount point,
podman's graphroot, configuration files and logs; podman's runroot is a short directory in
/tmp (conmon's socket paths must stay under 108 bytes). podman is pointed at its own files with
``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF`` and ``CONTAINERS_REGISTRIES_CONF`` (not with
``--root``, which makes podman 4 drop ``additionallayerstores``), so nothing of the machine's
podman storage is read or written. The private containers.conf sets what a throwaway run
needs: cgroupfs, a file events log, no network; podman's default ulimits.

Stopping: the container exits by itself, or is removed once the store has written the profile
(the recording period ended), or at the timeout. Then the daemon gets SIGTERM: it writes the
profile of a session still open, unmounts and exits. :meth:`RecordingRun.close` removes
containers, waits for podman's clean-up helpers, unmounts whatever podman left below the work
directory, stops the daemon, and deletes the work directory only when nothing is mounted
below it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerstore.estargz.profile import Profile, ProfileError, parse_profile

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
PODMAN_TIMEOUT = 600.0


class RunError(Exception):
    """The recording run failed; the message is one user-facing line (plus a log tail)."""


@dataclass(frozen=True)
class RunOptions:
    cmd: Sequence[str] | None = None
    """Arguments after the image (replace the image's Cmd); None keeps the image's."""
    entrypoint: Sequence[str] | None = None
    env: Sequence[str] = ()
    mounts: Sequence[str] = ()
    """podman ``--mount`` specifications, as given."""
    period: float = 10.0
    timeout: float = 300.0
    runtime: str | None = None
    """podman's OCI runtime (``--runtime``); None lets podman choose."""
    log_level: str = "info"


@dataclass
class RunResult:
    command: list[str]
    """The ``podman run`` command as run (private configuration in the environment)."""
    status: int | None
    """The container's exit status (None when it was stopped)."""
    ended: str
    """``exited``, ``recording period ended`` or ``timeout``."""
    seconds: float
    output_tail: list[str] = field(default_factory=list)
    profile: Profile | None = None
    profile_path: Path | None = None


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def mounts_below(root: str) -> list[str]:
    """Mount points at or below *root* (from /proc/self/mountinfo), deepest first."""
    points = set()
    prefix = root.rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(prefix):
                points.add(point)
    return sorted(points, key=len, reverse=True)


class RecordingRun:
    """A private store (recording) and a private podman under *workdir*. Use as a context
    manager; :meth:`close` cleans up everything it started."""

    def __init__(self, workdir: Path, registry_host: str, options: RunOptions) -> None:
        self.workdir = workdir.resolve()
        self.registry_host = registry_host
        self.options = options
        self.root = self.workdir / "store-root"
        self.mountpoint = self.workdir / "store"
        self.store_log = self.workdir / "store.log"
        self.graphroot = self.workdir / "graph"
        self.runroot = Path(tempfile.mkdtemp(prefix="stargz-opt-", dir="/tmp"))
        self.tmpdir = self.workdir / "tmp"
        self.container_log = self.workdir / "container.log"
        self.name = f"stargz-optimize-{os.getpid()}"
        self._daemon: subprocess.Popen[bytes] | None = None
        self._env = self._write_configs()

    # --- configuration ------------------------------------------------------------------------
    def _write_configs(self) -> dict[str, str]:
        w = self.workdir
        for d in (self.root, self.mountpoint, self.graphroot, self.tmpdir, w / "networks"):
            d.mkdir(parents=True, exist_ok=True)
        (w / "registries.conf.d").mkdir(exist_ok=True)
        if "," in str(self.mountpoint) or ":" in str(self.mountpoint):
            raise RunError(f"the work directory {w} may not hold ',' or ':' (podman's syntax)")
        (w / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
            f"[[registry]]\nlocation = {_toml(self.registry_host)}\ninsecure = true\n"
        )
        o = self.options
        (w / "store.toml").write_text(
            "[registry]\n"
            f"registries_conf = {_toml(str(w / 'registries.conf'))}\n"
            f"registries_conf_d = {_toml(str(w / 'registries.conf.d'))}\n"
            f"insecure_registries = [{_toml(self.registry_host)}]\n"
            '[auth]\nextra_auth_files = []\nhelper_socket = ""\n'
            "[fetch]\nbackground_fetch = false\nprefetch_profile = false\n"
            f"[record]\nenabled = true\nperiod_seconds = {float(o.period)!r}\n"
            f'dir = "profiles"\n[log]\nlevel = {_toml(o.log_level)}\nformat = "json"\n'
        )
        runtime = f"runtime = {_toml(o.runtime)}\n" if o.runtime else ""
        (w / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = []\nnetns = "none"\nlog_driver = "k8s-file"\n'
            "[engine]\n" + runtime + 'cgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f"events_logfile_path = {_toml(str(self.tmpdir / 'events.log'))}\n"
            f"tmp_dir = {_toml(str(self.tmpdir))}\n"
            f"volume_path = {_toml(str(self.graphroot / 'volumes'))}\n"
            f"static_dir = {_toml(str(self.graphroot / 'libpod'))}\n"
            f"[network]\nnetwork_config_dir = {_toml(str(w / 'networks'))}\n"
        )
        (w / "storage.conf").write_text(
            '[storage]\ndriver = "overlay"\n'
            f"graphroot = {_toml(str(self.graphroot))}\n"
            f"runroot = {_toml(str(self.runroot))}\n"
            "[storage.options]\n"
            f"additionallayerstores = [{_toml(str(self.mountpoint) + ':ref')}]\n"
        )
        env = dict(os.environ)
        env.update(
            CONTAINERS_CONF=str(w / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(w / "storage.conf"),
            CONTAINERS_REGISTRIES_CONF=str(w / "registries.conf"),
            TMPDIR=str(self.tmpdir),
        )
        for k in ("CONTAINERS_REGISTRIES_CONF_DIR", "REGISTRY_AUTH_FILE", "CONTAINER_HOST"):
            env.pop(k, None)
        return env

    # --- the store -------------------------------------------------------------------------
    def start_store(self) -> None:
        notify = self.workdir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            notify.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(notify))
            env = dict(os.environ)
            env["NOTIFY_SOCKET"] = str(notify)
            env.pop("STARGZ_STORE_PROVIDER_FACTORY", None)
            cmd = [
                sys.executable,
                "-m",
                "stargz_store",
                "serve",
                "--root",
                str(self.root),
                "--config",
                str(self.workdir / "store.toml"),
                "--record",
                str(self.mountpoint),
            ]
            with open(self.store_log, "ab") as log:
                self._daemon = subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=self.workdir,
                )
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                if self._daemon.poll() is not None:
                    raise RunError(
                        f"the private store exited with status {self._daemon.returncode}: "
                        + self.store_log_tail()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RunError(
                        "the private store did not start in time: " + self.store_log_tail()
                    )
                sock.settimeout(min(left, 0.2))
                try:
                    msg = sock.recv(4096).decode(errors="replace")
                except socket.timeout:
                    continue
                if "READY=1" in msg.splitlines():
                    return
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                notify.unlink()

    def store_log_tail(self, lines: int = 8) -> str:
        try:
            text = self.store_log.read_text(errors="replace")
        except OSError:
            return ""
        out = []
        for line in text.splitlines()[-lines:]:
            try:
                ev = json.loads(line)
            except ValueError:
                out.append(line)
                continue
            out.append(" ".join(f"{k}={v}" for k, v in ev.items() if k != "timestamp"))
        return "\n".join(out)

    def stop_store(self) -> int | None:
        proc, self._daemon = self._daemon, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        target = str(self.mountpoint)
        for cmd in (["fusermount3", "-u", "-q", target], ["umount", "-l", target]):
            if target not in mounts_below(target):
                break
            with contextlib.suppress(OSError):
                subprocess.run(cmd, capture_output=True, check=False, timeout=30)
        return code

    # --- podman ----------------------------------------------------------------------------
    def podman(
        self, *args: str, timeout: float = PODMAN_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["podman", *args]
        try:
            out = subprocess.run(
                cmd,
                env=self._env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise RunError(
                "podman is not installed (optimize runs the image with podman)"
            ) from None
        except subprocess.TimeoutExpired:
            raise RunError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s") from None
        if check and out.returncode != 0:
            detail = (out.stderr or out.stdout).strip().splitlines()
            raise RunError(
                f"{' '.join(cmd)} failed (status {out.returncode}): "
                + (detail[-1] if detail else "no output")
            )
        return out

    def pull(self, ref: str) -> str:
        out = self.podman("pull", "--quiet", "--tls-verify=false", ref)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""

    def store_layers(self) -> int:
        """How many of podman's layers are served by the store (``diff`` links into it)."""
        overlay = self.graphroot / "overlay"
        prefix = str(self.mountpoint) + "/"
        n = 0
        for d in overlay.iterdir() if overlay.is_dir() else ():
            diff = d / "diff"
            if diff.is_symlink() and os.readlink(diff).startswith(prefix):
                n += 1
        return n

    def run_command(self, ref: str) -> list[str]:
        o = self.options
        cmd = ["podman", "run", "--name", self.name, "--rm", "--network", "none"]
        cmd += ["--pull", "never"]
        if o.entrypoint is not None:
            cmd += ["--entrypoint", json.dumps(list(o.entrypoint))]
        for e in o.env:
            cmd += ["--env", e]
        for m in o.mounts:
            cmd += ["--mount", m]
        cmd.append(ref)
        if o.cmd is not None:
            cmd += list(o.cmd)
        return cmd

    def _profiles(self) -> list[Path]:
        d = self.root / "profiles"
        return sorted(d.glob("*.json")) if d.is_dir() else []

    def run(self, ref: str) -> RunResult:
        """Run the image once; stop at its exit, when the recording period has ended (the
        store wrote the profile), or at the timeout. The store is stopped afterwards, so the
        profile is complete when this returns."""
        cmd = self.run_command(ref)
        t0 = time.monotonic()
        deadline = t0 + self.options.timeout
        ended = "exited"
        with open(self.container_log, "wb") as out:
            try:
                proc = subprocess.Popen(
                    cmd, env=self._env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )  # fmt: skip
            except FileNotFoundError:
                raise RunError("podman is not installed") from None
            try:
                while proc.poll() is None:
                    if self._profiles():
                        ended = "recording period ended"
                        break
                    if time.monotonic() > deadline:
                        ended = "timeout"
                        break
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    self.podman("rm", "--force", "--time", "0", self.name, check=False, timeout=60)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        seconds = time.monotonic() - t0
        status = proc.returncode if ended == "exited" else None
        tail = self.container_log.read_text(errors="replace").splitlines()[-10:]
        if status is not None and status in (125, 126, 127) and not self._recorded_anything():
            raise RunError(
                f"podman run failed (status {status}): " + (tail[-1] if tail else "no output")
            )
        self.cleanup_podman()
        code = self.stop_store()
        if code not in (0, None):
            raise RunError(f"the private store exited with status {code}: " + self.store_log_tail())
        result = RunResult(cmd, status, ended, seconds, tail)
        files = self._profiles()
        if files:
            result.profile_path = files[-1]
            try:
                result.profile = parse_profile(files[-1].read_bytes())
            except (OSError, ProfileError) as e:
                raise RunError(f"the recorded profile {files[-1]} is unreadable: {e}") from None
        return result

    def _recorded_anything(self) -> bool:
        return bool(self._profiles())

    # --- clean-up --------------------------------------------------------------------------
    def _helper_pids(self) -> list[int]:
        """conmon and the ``podman container cleanup`` it starts, by our paths in their
        command line."""
        needles = (str(self.graphroot).encode(), str(self.runroot).encode())
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

    def cleanup_podman(self) -> None:
        if self.graphroot.is_dir():
            with contextlib.suppress(RunError):
                self.podman("rm", "--all", "--force", "--time", "0", timeout=60, check=False)
            deadline = time.monotonic() + 30
            while self._helper_pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(RunError):
                self.podman("umount", "--all", timeout=60, check=False)
        for root in (str(self.graphroot), str(self.runroot)):
            for point in mounts_below(root):
                if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                    subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def close(self, keep: bool = False) -> str | None:
        """Clean up; returns a warning line when something had to be left behind."""
        self.cleanup_podman()
        self.stop_store()
        left = mounts_below(str(self.workdir)) + mounts_below(str(self.runroot))
        if left:
            return f"left {self.workdir} in place: still mounted below it: {', '.join(left)}"
        shutil.rmtree(self.runroot, ignore_errors=True)
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return None

    def __enter__(self) -> RecordingRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
