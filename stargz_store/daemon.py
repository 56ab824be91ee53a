"""The store daemon: ``stargz-store serve [--config FILE] [--root DIR] [--log-level LEVEL]
MOUNTPOINT`` (or the same without ``serve``, as the Go store is run; see ``cli.py``).

Lifecycle:

1. parse arguments and the configuration (errors: one readable line, exit status 2);
2. set up logging (structlog; JSON lines unless stderr is a terminal);
3. make ``--root`` private (created 0700; refused when others can write to it or it belongs to
   another user; an existing one others can read is made 0700) and lock it: ``<root>/lock``
   is held with ``flock`` for the daemon's life, so a second daemon on the same ``--root``
   refuses to start, naming the first's pid, before it touches anything;
4. make the mount point usable: a dead FUSE mount left by a killed daemon (``ENOTCONN``) is
   detached with ``umount -l``; a live mount is refused (another daemon is serving it); missing
   parents are created 0700;
5. build the layer provider: CredentialStore -> RegistryClient -> ChunkCache (+ the
   ResolutionStore in ``<root>/resolutions``) -> LayerManager, and start the podman
   auth-helper channel;
6. mount (pyfuse3; ``allow_other``, ``nosuid``, ``nodev``, ``default_permissions``), send
   ``READY=1`` to ``$NOTIFY_SOCKET``, serve until SIGINT/SIGTERM or an external unmount;
7. send ``STOPPING=1``, unmount, close the provider. Exit status 0.

``STARGZ_STORE_PROVIDER_FACTORY=module:function`` replaces step 5 with ``function(config,
root)`` returning a provider (tests and demos use it to serve an in-memory tree).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import importlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Callable, cast

from stargz_store import notify
from stargz_store.cmdline import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ArgParser,
    parse_command_line,
    version,
)
from stargz_store.config import DEFAULT_CONFIG_PATH, DEFAULT_ROOT, Config, ConfigError, load_config
from stargz_store.log import LEVELS, configure_logging, get_logger

if TYPE_CHECKING:
    from stargz_store.fusefs import LayerProvider

log = get_logger("stargz_store.daemon")

PROVIDER_FACTORY_ENV = "STARGZ_STORE_PROVIDER_FACTORY"
SWEEP_INTERVAL = 60.0
"""The idle sweep's period at most (shorter when ``[cache] layer_idle_seconds`` is)."""
TRIM_INTERVAL = 5.0
"""How often the idle trim looks whether fetching has stopped (``IdleTrim``)."""
STARTUP_CHECK_SECONDS = 30.0
PROBE_SECONDS = 5.0
LOCK_NAME = "lock"


class DaemonError(Exception):
    """A start-up failure with a user-facing message."""


class _Stop(BaseException):
    """A signal arrived before the trio loop took over signal handling."""


# --- arguments -----------------------------------------------------------------------------------


def build_parser(prog: str = "stargz-store serve") -> argparse.ArgumentParser:
    p = ArgParser(
        prog=prog,
        description="Mount the additional layer store on MOUNTPOINT and serve it until SIGINT or "
        "SIGTERM: podman and CRI-O find lazily pulled eStargz layers there (storage.conf: "
        'additionallayerstores = ["MOUNTPOINT:ref"]). Runs in the foreground and logs to stderr '
        "(JSON lines unless stderr is a terminal).",
        epilog="Exit status: 0 after a clean unmount, 1 when the store cannot start, 2 for bad "
        "usage or an invalid configuration file.",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"TOML configuration file (default {DEFAULT_CONFIG_PATH}, used when present; "
        "config.example.toml lists every key)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        metavar="DIR",
        help=f"state directory for the chunk cache and the auth-helper socket, created when "
        f"missing (default {DEFAULT_ROOT})",
    )
    p.add_argument(
        "--log-level",
        choices=sorted(LEVELS),
        default=None,
        metavar="LEVEL",
        help="debug, info, warning or error (default: the configuration's [log] level, info)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="record workload profiles (as [record] enabled = true): per image, the files "
        "read in the first [record] period_seconds (10) after the container's first read, "
        "written under ROOT/profiles ('stargz-store profiles' lists them)",
    )
    p.add_argument(
        "mountpoint",
        type=Path,
        metavar="MOUNTPOINT",
        help="directory to mount the store on (created when missing; a dead mount left by a "
        "killed daemon is detached first)",
    )
    return p


# --- the mount point -----------------------------------------------------------------------------


def _unescape_mountinfo(s: str) -> str:
    return (
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def mount_fstype(path: Path) -> str | None:
    """The filesystem type of the topmost mount exactly on ``path``, or None."""
    target = _resolved(path)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if len(parts) > 4 and _unescape_mountinfo(parts[4]) == target:
                    found = right.split()[0] if right else ""
    except OSError:
        return None
    return found


def _resolved(path: Path) -> str:
    """The canonical path without touching ``path`` itself (it may be a dead or not yet served
    FUSE mount, where even lstat would fail or block)."""
    return os.path.join(os.path.realpath(path.parent), path.name)


def mount_device(path: Path) -> str | None:
    """``major:minor`` of the topmost mount on ``path`` (from mountinfo: no access to the FS,
    which is not served yet when this is asked)."""
    target = _resolved(path)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(" - ")[0].split()
                if len(parts) > 4 and _unescape_mountinfo(parts[4]) == target:
                    found = parts[2]
    except OSError:
        return None
    return found


def set_read_ahead(path: Path, kib: int) -> None:
    """Raise the mount's read-ahead so the kernel sends fewer, larger reads (best effort)."""
    if kib <= 0:
        return
    dev = mount_device(path)
    if dev is None:
        return
    knob = Path("/sys/class/bdi") / dev / "read_ahead_kb"
    try:
        knob.write_text(str(kib))
    except OSError as exc:
        log.warning("read_ahead_not_set", knob=str(knob), error=exc.strerror)
    else:
        log.debug("read_ahead_set", knob=str(knob), kib=kib)


FUSECTL = Path("/sys/fs/fuse/connections")


def set_max_background(path: Path, requests: int) -> None:
    """Raise the kernel's limit of background (read-ahead) requests in flight on the mount.

    The kernel queues read-ahead of *every* file of the mount behind this one limit (12 by
    default): a dozen reads hanging on one slow registry would hold up reads of images from all
    others, whatever the daemon's per-registry shares allow. Needs fusectl (systemd mounts it at
    boot); best effort. The congestion threshold (where the kernel skips async read-ahead) is
    kept at the kernel's 3/4 of the limit."""
    if requests <= 0:
        return
    dev = mount_device(path)
    if dev is None:
        return
    conn = FUSECTL / dev.partition(":")[2]
    try:
        (conn / "max_background").write_text(str(requests))
        (conn / "congestion_threshold").write_text(str(max(1, requests * 3 // 4)))
    except OSError as exc:
        log.warning(
            "max_background_not_set",
            knob=str(conn / "max_background"),
            error=exc.strerror,
            hint=f"mount -t fusectl fusectl {FUSECTL}",
        )
    else:
        log.debug("max_background_set", knob=str(conn / "max_background"), requests=requests)


def _detach(path: Path) -> None:
    attempts = (["umount", "-l", str(path)], ["fusermount3", "-u", "-z", str(path)])
    last = ""
    for cmd in attempts:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            last = str(exc)
            continue
        if r.returncode == 0:
            return
        last = (r.stderr or r.stdout).strip()
    raise DaemonError(f"cannot detach the dead mount on {path}: {last}")


_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


def _probe(path: Path, timeout: float = PROBE_SECONDS) -> int | None:
    """Ask the FUSE server behind ``path`` something it must answer (opendir is never cached by
    the kernel, unlike a stat of the root). The errno, 0 when it answered, None on timeout."""
    result: list[int] = []

    def target() -> None:
        try:
            os.listdir(path)
            result.append(0)
        except OSError as exc:
            result.append(exc.errno or errno.EIO)

    t = threading.Thread(target=target, name="mount-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 (``Path.mkdir(parents=True)`` would
    give the parents the umask's mode, typically 0755)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)


def prepare_root(root: Path) -> None:
    """Create ``--root`` 0700, or check an existing one.

    It holds the chunk cache (bytes of private images, and what is served again without a
    registry), the auth-helper socket (credentials) and the lock. A directory that someone
    other than root or the daemon's user owns, or that group or others may write to, is refused:
    whoever can write there may already have planted files or links, and tightening the mode
    now would not undo that; an operator has to look. One that others may only read or enter
    (0755, as earlier releases created it) is made 0700, with a warning.
    """
    try:
        make_private_dirs(root)
        st = os.stat(root)
    except OSError as exc:
        raise DaemonError(f"cannot create --root {root}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"--root {root} is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        raise DaemonError(
            f"--root {root} belongs to uid {st.st_uid}, not to root or to this daemon's user: "
            "refusing to use it (chown it or choose another --root)"
        )
    if mode & 0o022:
        raise DaemonError(
            f"--root {root} is writable by group or others (mode {mode:04o}): refusing to use "
            f"it; check its contents, then chmod 700 {root}"
        )
    if mode & 0o077:
        try:
            os.chmod(root, mode & 0o700)
        except OSError as exc:
            raise DaemonError(f"cannot make --root {root} private: {exc.strerror}") from None
        log.warning("root_made_private", root=str(root), old_mode=f"{mode:04o}", new_mode="0700")


def lock_root(root: Path) -> IO[str]:
    """Take ``<root>/lock`` (``flock``, exclusive) for the daemon's life and write our pid in it.

    A second daemon on the same ``--root`` would take over the first's auth-helper socket and
    cache; it gets a DaemonError naming the first's pid instead, having changed nothing (the
    lock file is opened without truncation and written only once the lock is ours). The file
    is never removed: unlinking a lock file races with the next daemon opening it.
    """
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise DaemonError(f"cannot open the lock {path}: {exc.strerror}") from None
    f = os.fdopen(fd, "r+", encoding="ascii", errors="replace")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = f.read(32).strip() or "unknown"
        f.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DaemonError(
                f"--root {root} is in use by another stargz-store (pid {holder}, "
                f"lock {path}); not starting a second daemon on it"
            ) from None
        raise DaemonError(f"cannot lock {path}: {exc.strerror}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def prepare_mountpoint(path: Path) -> None:
    """Make ``path`` a directory we can mount on; detach a dead FUSE mount (``ENOTCONN``) left
    by a killed daemon; refuse a live one. Missing parents are created 0700: only root needs to
    reach the mount (a rootless setup in ``fuse.allowed_uids`` provides its own parent)."""
    dead: int | None = None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        make_private_dirs(path.parent)
        path.mkdir(exist_ok=True)
        return
    except OSError as exc:
        if exc.errno not in _DEAD:
            raise DaemonError(f"cannot use mount point {path}: {exc.strerror}") from None
        dead = exc.errno
    else:
        fstype = mount_fstype(path)
        if fstype is not None and fstype.startswith("fuse"):
            answer = _probe(path)
            if answer not in _DEAD:
                state = "not answering" if answer is None else "live"
                raise DaemonError(
                    f"{path} is already a {state} FUSE mount ({fstype}): "
                    "is another stargz-store running?"
                )
            dead = answer
    if dead is not None:
        log.warning("stale_mount_detached", mountpoint=str(path), error=os.strerror(dead))
        _detach(path)
        try:
            st = os.stat(path)
        except OSError as exc2:
            raise DaemonError(f"mount point {path} unusable after detach: {exc2}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"mount point {path} is not a directory")


# --- wiring --------------------------------------------------------------------------------------


@dataclass
class Wiring:
    provider: Any
    validate_ref: Callable[[str], object] | None = None
    closers: list[Callable[[], object]] = field(default_factory=list)
    sweep: Callable[[], object] | None = None
    sweep_interval: float = SWEEP_INTERVAL
    trim: Callable[[], tuple[int, int] | None] | None = None
    """``IdleTrim.tick``: called every ``TRIM_INTERVAL`` seconds."""
    # For the operator's tools (status, cache, metrics): None with a provider factory.
    manager: Any = None
    cache: Any = None
    status: Any = None
    """:class:`stargz_store.status.StatusSource`, set by :func:`start_operator_services`."""
    # CredentialStore.on_credentials_added and LayerManager.forget_failures (see
    # forget_failures_on_credentials).
    subscribe_credentials: Callable[[Callable[[str, str], None]], None] | None = None
    forget_failures: Callable[[str, str], object] | None = None

    def close(self) -> None:
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception as exc:
                log.warning("shutdown_close_failed", what=repr(fn), error=repr(exc))


def _under(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def _load_factory(spec: str) -> Callable[[Config, Path], Any]:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise DaemonError(f"{PROVIDER_FACTORY_ENV} must be 'module:function', not {spec!r}")
    try:
        return cast(Callable[[Config, Path], Any], getattr(importlib.import_module(module), attr))
    except (ImportError, AttributeError) as exc:
        raise DaemonError(f"{PROVIDER_FACTORY_ENV}={spec}: {exc}") from None


def build_wiring(config: Config, root: Path) -> Wiring:
    """config -> CredentialStore -> RegistryClient -> ChunkCache -> LayerManager (+ helper)."""
    factory = os.environ.get(PROVIDER_FACTORY_ENV)
    if factory:
        provider = _load_factory(factory)(config, root)
        return Wiring(provider, sweep=getattr(provider, "sweep", None))

    from auth.errors import AuthError
    from auth.helper_channel import HelperChannelServer
    from auth.store import CredentialStore
    from layerstore.errors import LayerStoreError
    from layerstore.registry.client import RegistryClient
    from layerstore.registry.reference import parse_reference
    from layerstore.registry.registries_conf import RegistriesConf, WatchedRegistriesConf
    from layerstore.runtime.blobspool import BlobSpool
    from layerstore.runtime.cache import DAEMON_KEY_NAME, ChunkCache
    from layerstore.runtime.depfetch import DependencyFetchSettings
    from layerstore.runtime.fetcher import FetcherSettings
    from layerstore.runtime.layer import LayerSettings
    from layerstore.runtime.manager import IdleTrim, LayerManager, ManagerSettings
    from layerstore.runtime.membudget import MemoryBudget
    from layerstore.runtime.prefetch import ProfileSource
    from layerstore.runtime.recorder import AccessRecorder, RecordSettings
    from layerstore.runtime.resolutions import ResolutionStore

    rc, fc, ac = config.registry, config.fetch, config.auth
    wiring = Wiring(provider=None, validate_ref=parse_reference)
    try:
        # registries.conf and its drop-ins: re-read when they change (checked at most every
        # registries_conf_check_seconds, by the thread resolving an image), so that a mirror
        # or a block applies without a restart; its credential-helpers list is read from the
        # same object at each credential lookup.
        registries: RegistriesConf | WatchedRegistriesConf
        try:
            if rc.registries_conf_check_seconds > 0:
                registries = WatchedRegistriesConf(
                    system_conf=rc.registries_conf,
                    system_conf_dir=rc.registries_conf_d,
                    min_interval=rc.registries_conf_check_seconds,
                )
            else:
                registries = RegistriesConf.load(
                    system_conf=rc.registries_conf, system_conf_dir=rc.registries_conf_d
                )
        except LayerStoreError as exc:
            raise DaemonError(str(exc)) from None
        credentials = CredentialStore(
            extra_files=list(ac.extra_auth_files),
            helper_timeout=ac.credential_helper_timeout,
            credential_helpers=lambda: registries.credential_helpers,
        )
        client = RegistryClient(credentials, registries, settings=rc.client_settings())
        wiring.closers.append(client.close)
        cache_dir = _under(root, config.cache.dir)
        try:
            cache = ChunkCache(
                cache_dir,
                config.cache.max_size_bytes,
                memory_budget=MemoryBudget(fc.max_inflight_decoded_bytes),
                key_path=root / DAEMON_KEY_NAME,
                persistent=config.cache.keep_across_restarts,
            )
        except (OSError, LayerStoreError, ValueError) as exc:
            raise DaemonError(f"cannot open the cache in {cache_dir}: {exc}") from None
        wiring.closers.append(cache.close)
        spool_dir = root / "spool"
        try:
            # The `blob` file's verified copies: at most as much disk as the chunk cache.
            spool = BlobSpool(spool_dir, config.cache.max_size_bytes)
        except LayerStoreError as exc:
            raise DaemonError(f"cannot open {spool_dir}: {exc}") from None
        resolutions_dir = root / "resolutions"
        try:
            resolutions = ResolutionStore(resolutions_dir)
        except LayerStoreError as exc:
            raise DaemonError(f"cannot open {resolutions_dir}: {exc}") from None
        recorder: AccessRecorder | None = None
        if config.record.enabled:
            recorder = AccessRecorder(
                _under(root, config.record.dir),
                RecordSettings(period_seconds=config.record.period_seconds),
                tool=f"stargz-store {version()}",
            )
            log.info(
                "recording_enabled",
                dir=str(recorder.directory),
                period_seconds=config.record.period_seconds,
            )
        profiles: ProfileSource | None = None
        if fc.prefetch_profile:
            from layerstore.estargz.profile import MAX_PROFILE_BYTES, PROFILE_MEDIA_TYPE
            from layerstore.registry.referrers import ArtifactSource

            profiles = ArtifactSource(client, PROFILE_MEDIA_TYPE, MAX_PROFILE_BYTES)
        # [fetch] keys -> mechanisms (docs/CONCURRENCY.md): read_ahead_bytes = read-ahead (and
        # read-behind, continuation), prefetch_landmark = landmark prefetch, background_fetch,
        # background_bandwidth_share and background_concurrency = background fill,
        # dependency_fetch = dependency fetch, resolve_all_layers = sibling layers built.
        manager = LayerManager(
            client,
            cache,
            ManagerSettings(
                resolve_ttl=rc.resolve_ttl,
                negative_ttl=config.fuse.negative_timeout,
                idle_drop_seconds=config.cache.layer_idle_seconds,
                blob_spool_max_bytes=config.cache.max_size_bytes,
                background_fill_concurrency=fc.background_concurrency,
                host_share=rc.host_share,
                platform=rc.platform or None,
                fetcher=FetcherSettings(
                    max_concurrent_requests=fc.concurrency,
                    readahead_bytes=fc.read_ahead_bytes,
                    background_fill=fc.background_fetch,
                    background_share=fc.background_bandwidth_share,
                ),
                layer=LayerSettings(
                    landmark_prefetch=fc.prefetch_landmark, background_fill=fc.background_fetch
                ),
                dependency_fetch=DependencyFetchSettings(enabled=fc.dependency_fetch),
                resolve_siblings=fc.resolve_all_layers,
                head_start_bytes=fc.head_start_bytes,
            ),
            resolutions=resolutions,
            spool=spool,
            recorder=recorder,
            profiles=profiles,
        )
        checked: LayerProvider = manager  # the real manager meets the adapter's protocol
        wiring.provider = checked
        wiring.manager, wiring.cache = manager, cache
        wiring.closers.append(manager.close)
        if recorder is not None:
            wiring.closers.append(recorder.close)  # runs first: writes what was recorded
        wiring.sweep = manager.sweep
        wiring.trim = IdleTrim(lambda: cache.memory_budget.granted).tick
        wiring.sweep_interval = min(SWEEP_INTERVAL, config.cache.layer_idle_seconds / 2)
        wiring.subscribe_credentials = credentials.on_credentials_added
        wiring.forget_failures = manager.forget_failures
        if ac.helper_socket:
            sock = _under(root, ac.helper_socket)
            server = HelperChannelServer(sock, credentials)
            try:
                server.start()
            except (AuthError, OSError) as exc:
                # Credentials from auth files still work; podman only warns when the helper
                # cannot reach us.
                log.warning("auth_helper_channel_unavailable", socket=str(sock), error=str(exc))
            else:
                wiring.closers.append(server.stop)
        return wiring
    except BaseException:
        wiring.close()
        raise


def start_operator_services(wiring: Wiring, config: Config, root: Path) -> None:
    """The control socket (``stargz-store status``, ``cache``) and, when configured, the
    metrics listener. The control socket is best effort (the store serves without it); a
    metrics listener that was asked for and cannot listen stops the start."""
    from stargz_store.control import ControlError, ControlServer, socket_path
    from stargz_store.status import StatusSource

    status = StatusSource(root=str(root), manager=wiring.manager, cache=wiring.cache)
    wiring.status = status
    server = ControlServer(socket_path(root), status.handle)
    try:
        server.start()
    except ControlError as exc:
        log.warning("control_socket_unavailable", socket=str(server.path), error=str(exc))
    else:
        wiring.closers.append(server.stop)
    if config.metrics.listen:
        from stargz_store.metrics import MetricsError, MetricsServer

        try:
            metrics = MetricsServer(config.metrics.listen, status, root)
            metrics.start()
        except MetricsError as exc:
            raise DaemonError(str(exc)) from None
        wiring.closers.append(metrics.stop)


def forget_failures_on_credentials(
    forget_in_provider: Callable[[str, str], object] | None, ops: Any
) -> Callable[[str, str], None]:
    """The CredentialStore callback for credentials that arrive for ``host/repository``:
    lookups of that repository that failed earlier (perhaps for want of them) are forgotten
    where they are remembered for ``[fuse] negative_timeout``: the manager's negative cache,
    then the adapter's and the kernel's negative dentries (on the trio loop, waited for).
    Runs in the auth-helper connection thread, before podman's helper is answered, so podman's
    lookups that follow ask the registry again."""
    from layerstore.registry.reference import in_repository

    def on_added(host: str, repository: str) -> None:
        if forget_in_provider is not None:
            forget_in_provider(host, repository)
        ops.forget_failures_from_thread(lambda ref: in_repository(ref, host, repository))

    return on_added


# --- serving -------------------------------------------------------------------------------------

_stopping_sent = False


def _stopping() -> None:
    """``STOPPING=1`` once: at the signal (the loop may wait for in-flight reads), else at exit."""
    global _stopping_sent
    if not _stopping_sent:
        _stopping_sent = True
        notify.stopping()


async def _serve(
    ops: Any,
    wiring: Wiring,
    mountpoint: Path,
    read_ahead_kb: int,
    grace: float,
    max_background: int = 0,
) -> str:
    """Run pyfuse3's loop; return why it ended ("signal SIGTERM", "unmounted").

    The first SIGINT/SIGTERM stops taking requests; requests in flight (a registry read may
    take long) get ``grace`` seconds, then are abandoned, like at once after a second signal.
    """
    import pyfuse3
    import trio

    from stargz_store.fusefs import run_in_thread

    reason = "unmounted"
    fuse_scope = trio.CancelScope()

    async def on_signals() -> None:
        nonlocal reason
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if reason.startswith("signal"):
                    log.info("signal_received_again", signal=name)
                    fuse_scope.cancel()
                    continue
                reason = f"signal {name}"
                log.info("signal_received", signal=name, grace_seconds=grace)
                _stopping()
                pyfuse3.terminate()
                fuse_scope.deadline = trio.current_time() + grace

    async def sweeper() -> None:
        if wiring.sweep is None:
            return
        while True:
            await trio.sleep(wiring.sweep_interval)
            try:
                dropped = await run_in_thread(wiring.sweep)
                if dropped:
                    log.info("layers_dropped", count=dropped)
            except Exception as exc:
                log.warning("sweep_failed", error=repr(exc))

    async def trimmer() -> None:
        if wiring.trim is None:
            return
        while True:
            await trio.sleep(TRIM_INTERVAL)
            try:
                trimmed = await run_in_thread(wiring.trim)
            except Exception as exc:
                log.warning("memory_trim_failed", error=repr(exc))
                continue
            if trimmed is not None:
                log.info(
                    "memory_trimmed",
                    rss_before_mb=round(trimmed[0] / 1e6, 1),
                    rss_after_mb=round(trimmed[1] / 1e6, 1),
                )

    async def announce() -> None:
        # The kernel answers nothing before the INIT handshake, which the loop below performs:
        # once a stat of the root returns, the mount serves. Only then is the read-ahead
        # raised (INIT resets it) and READY=1 sent.
        with trio.move_on_after(STARTUP_CHECK_SECONDS) as scope:
            await run_in_thread(os.stat, str(mountpoint))
        if scope.cancelled_caught:
            log.warning("mount_self_check_timeout", mountpoint=str(mountpoint))
        await run_in_thread(set_read_ahead, mountpoint, read_ahead_kb)
        await run_in_thread(set_max_background, mountpoint, max_background)
        notify.ready(f"serving {mountpoint}")
        log.info("ready", mountpoint=str(mountpoint))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        nursery.start_soon(sweeper)
        nursery.start_soon(trimmer)
        nursery.start_soon(announce)
        with fuse_scope:
            await pyfuse3.main(min_tasks=4, max_tasks=256)
        if fuse_scope.cancelled_caught:
            log.warning("requests_abandoned_at_shutdown", grace_seconds=grace)
        nursery.cancel_scope.cancel()
    return reason


@contextlib.contextmanager
def _early_signals() -> Iterator[None]:
    """Until trio handles signals, SIGINT/SIGTERM unwind the stack (so the mount is removed)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(config: Config, root: Path, mountpoint: Path, config_path: str = "") -> int:
    import pyfuse3
    import trio

    from layerstore.estargz.inflate import IMPLEMENTATION as inflate_implementation
    from layerstore.runtime.manager import limit_malloc_arenas
    from stargz_store.fusefs import StoreOperations, mount_options

    mountpoint = Path(_resolved(mountpoint.absolute()))
    arenas_capped = limit_malloc_arenas()  # before any thread of ours starts
    log.info(
        "daemon_starting",
        mountpoint=str(mountpoint),
        root=str(root),
        config=config_path,
        pid=os.getpid(),
        malloc_arenas_capped=arenas_capped,
        gzip_decoder=inflate_implementation,
    )
    with _early_signals(), contextlib.ExitStack() as held:
        prepare_root(root)
        held.enter_context(lock_root(root))
        prepare_mountpoint(mountpoint)
        wiring = build_wiring(config, root)
        try:
            start_operator_services(wiring, config, root)
            ops = StoreOperations(
                wiring.provider,
                config.fuse,
                validate_ref=wiring.validate_ref,
                host_share=config.registry.host_share,
            )
            wiring.status.attach_fuse(ops.stats, str(mountpoint))
            if wiring.subscribe_credentials is not None:
                wiring.subscribe_credentials(
                    forget_failures_on_credentials(wiring.forget_failures, ops)
                )
            options = mount_options(config.fuse)
            try:
                pyfuse3.init(ops, str(mountpoint), options)
            except RuntimeError as exc:
                raise DaemonError(f"cannot mount on {mountpoint}: {exc}") from None
            started = time.monotonic()
            log.info("mounted", mountpoint=str(mountpoint), options=sorted(options))
            reason = "error"
            try:
                reason = trio.run(
                    _serve,
                    ops,
                    wiring,
                    mountpoint,
                    config.fuse.read_ahead_kb,
                    config.fuse.shutdown_grace_seconds,
                    config.fuse.max_background,
                )
            finally:
                _stopping()
                pyfuse3.close(unmount=True)
                log.info(
                    "unmounted",
                    mountpoint=str(mountpoint),
                    reason=reason,
                    uptime_seconds=round(time.monotonic() - started, 3),
                    stats=vars(ops.stats),
                )
        finally:
            wiring.close()
    return EXIT_OK


def serve_main(argv: Sequence[str]) -> int:
    """``stargz-store serve [OPTIONS] MOUNTPOINT``."""
    return main(argv, prog="stargz-store serve")


def main(argv: Sequence[str], prog: str = "stargz-store") -> int:
    args = parse_command_line(build_parser(prog), argv, prog)
    if isinstance(args, int):
        return args
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"stargz-store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.record:
        config = config.model_copy(
            update={"record": config.record.model_copy(update={"enabled": True})}
        )
    try:
        configure_logging(args.log_level or config.log.level, config.log.format)
    except ValueError as exc:
        print(f"stargz-store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config_path = str(args.config) if args.config else f"{DEFAULT_CONFIG_PATH} (if present)"
        return run(config, args.root.absolute(), args.mountpoint, config_path)
    except DaemonError as exc:
        log.error("daemon_failed", error=str(exc))
        return EXIT_FAILURE
    except _Stop:
        log.info("daemon_interrupted_during_startup")
        return EXIT_OK
    except Exception as exc:
        log.error("daemon_crashed", error=repr(exc), exc_info=True)
        return EXIT_FAILURE
    finally:
        log.info("daemon_stopped")
