"""One cold start (pull, create+run) in one mode, and the filesystem figures of one layer."""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.env import (
    EnvError,
    GoStore,
    Podman,
    ProxyThread,
    StoreDaemon,
    als_layer_dir,
    cleaned,
    drop_caches,
    make_store,
)

_READ = 1 << 20
IDLE_RSS_WAIT = 12.0
"""Seconds the filesystem figures wait after the last read before the idle RSS is read (our
daemon's idle trim looks every 5 s)."""


@dataclass(frozen=True)
class Target:
    """An image variant in the registry, as podman pulls it (through the proxy)."""

    image: str
    mode: str  # report.MODES: full-gzip | lazy-esgz | lazy-esgz-opt | go-esgz | ...
    ref: str  # <proxy host:port>/bench/<image>:<tag>
    expect: str
    store: str | None  # None: podman pulls everything; "ours" or "go": the layer store

    @property
    def lazy(self) -> bool:
        return self.store is not None


def _als_layers(graphroot: Path) -> int:
    """Layers podman took from the additional layer store: ``diff`` symlinks into the mount."""
    overlay = graphroot / "overlay"
    if not overlay.is_dir():
        return 0
    return sum(1 for d in overlay.iterdir() if (d / "diff").is_symlink())


def cold_run(
    target: Target,
    proxy: ProxyThread,
    workdir: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fresh graphroot, fresh store root and daemon (ours or the Go store), dropped page
    cache; then time ``podman pull`` and ``podman run --rm``."""
    result: dict[str, Any] = {"error": None, "store": target.store}
    with cleaned(workdir) as w:
        daemon: StoreDaemon | GoStore | None = None
        podman: Podman | None = None
        try:
            if target.store is not None:
                daemon = make_store(target.store, w / "store", w / "mnt", proxy.address)
                daemon.start()
                result["daemon_startup_s"] = daemon.startup_s
            podman = Podman(w / "podman", proxy.address, als_mount=w / "mnt" if daemon else None)
            drop_caches()
            b0 = proxy.bytes_down
            t0 = time.monotonic()
            podman.run("pull", "-q", "--tls-verify=false", target.ref)
            t1 = time.monotonic()
            b1 = proxy.bytes_down
            out = podman.run("run", "--rm", "--network", "none", target.ref).stdout
            t2 = time.monotonic()
            if target.expect not in out:
                raise EnvError(f"workload printed {out[-200:]!r}, expected {target.expect!r}")
            result.update(
                pull_s=t1 - t0,
                run_s=t2 - t1,
                total_s=t2 - t0,
                bytes_down_pull=b1 - b0,
                bytes_down=proxy.bytes_down - b0,
                als_layers=_als_layers(w / "podman" / "graphroot"),
            )
            if daemon is not None:
                result["daemon_peak_rss_bytes"] = daemon.peak_rss_bytes()
                if result["als_layers"] == 0:
                    result["warning"] = "no layer came from the store: this was a full pull"
        except (EnvError, OSError) as exc:
            result["error"] = str(exc)[-1500:]
            log(f"  {target.image}/{target.mode}: ERROR {result['error']}")
        finally:
            if podman is not None:
                podman.cleanup()
            if daemon is not None:
                daemon.stop()
    return result


# --------------------------------------------------------------------------------------------
# Filesystem figures


def _walk(diff: Path) -> tuple[int, list[tuple[str, int]]]:
    entries = 0
    files: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(diff):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            if name in filenames and (st.st_mode & 0o170000) == 0o100000:
                files.append((os.path.relpath(os.path.join(dirpath, name), diff), st.st_size))
    return entries, files


def pick_files(
    files: list[tuple[str, int]], budget: int, lo: int = 16 << 10, hi: int = 16 << 20
) -> list[tuple[str, int]]:
    """A deterministic, spread-out sample of files (by hash of the path) up to *budget* bytes."""
    pool = sorted(
        (f for f in files if lo <= f[1] <= hi), key=lambda f: hashlib.sha256(f[0].encode()).digest()
    )
    picked: list[tuple[str, int]] = []
    total = 0
    for f in pool:
        if total >= budget:
            break
        picked.append(f)
        total += f[1]
    return picked


def _read_all(diff: Path, files: list[tuple[str, int]]) -> tuple[int, float]:
    total = 0
    t0 = time.monotonic()
    for rel, _size in files:
        with open(diff / rel, "rb", buffering=0) as f:
            while True:
                chunk = f.read(_READ)
                if not chunk:
                    break
                total += len(chunk)
    return total, time.monotonic() - t0


def _resolve_once(store: str, ref: str, layer_digest: str, proxy: ProxyThread, root: Path) -> float:
    """Seconds for one ``stat`` of the layer's ``diff`` through a fresh daemon on a fresh
    root (nothing cached), with the page cache dropped."""
    with cleaned(root) as w:
        daemon = make_store(store, w / "store", w / "mnt", proxy.address, background_fetch=False)
        try:
            daemon.start()
            drop_caches()
            diff = als_layer_dir(w / "mnt", ref, layer_digest) / "diff"
            t0 = time.monotonic()
            os.stat(diff)
            return time.monotonic() - t0
        finally:
            daemon.stop()


def fs_figures(
    image: str,
    ref: str,
    layer_digest: str,
    layer_size: int,
    proxy: ProxyThread,
    workdir: Path,
    read_budget: int,
    log: Callable[[str], None] = print,
    store: str = "ours",
    resolve_runs: int = 3,
) -> dict[str, Any]:
    """Resolve, walk and read one layer through a fresh daemon (background fetch off, so cold
    reads are cold); then read again from the store's disk cache with the page cache dropped.

    The resolve (one ``stat`` of ``diff``: manifest, config, TOC, index) is timed
    ``resolve_runs`` times, each through a fresh daemon on a fresh root, and ``resolve_s`` is
    the median (``resolve_all_s`` has each): a single resolve moved by +-15% between runs.

    Our daemon is restarted first (its cache persists across restarts: the figure includes a
    fresh process's first use of each chunk). The Go store keeps serving: its disk cache lives
    in a fresh temporary directory per process and does not survive a restart, so the Go
    figure is a dropped page cache with the same process (``cached_after_restart`` says
    which)."""
    res: dict[str, Any] = {
        "store": store,
        "image": image,
        "ref": ref,
        "layer": layer_digest,
        "layer_bytes": layer_size,
        "layer_mb": layer_size / 1e6,
        "read_budget_bytes": read_budget,
        "error": None,
    }
    resolves: list[float] = []
    try:
        for i in range(max(0, resolve_runs - 1)):
            resolves.append(_resolve_once(store, ref, layer_digest, proxy, workdir / f"r{i}"))
    except (EnvError, OSError) as exc:
        res["error"] = str(exc)[-1500:]
        log(f"  fs ({store}): ERROR {res['error']}")
        return res
    with cleaned(workdir) as w:
        daemon = make_store(store, w / "store", w / "mnt", proxy.address, background_fetch=False)
        try:
            daemon.start()
            res["daemon_startup_s"] = daemon.startup_s
            drop_caches()
            layer = als_layer_dir(w / "mnt", ref, layer_digest)
            diff = layer / "diff"
            b0 = proxy.bytes_down
            t0 = time.monotonic()
            os.stat(diff)
            resolves.append(time.monotonic() - t0)
            res["resolve_all_s"] = resolves
            res["resolve_s"] = statistics.median(resolves)
            res["bytes_resolve"] = proxy.bytes_down - b0
            t0 = time.monotonic()
            entries, files = _walk(diff)
            res["walk_s"] = time.monotonic() - t0
            res["entries"] = entries
            res["regular_files"] = len(files)
            res["bytes_after_walk"] = proxy.bytes_down - b0
            picked = pick_files(files, read_budget)
            res["read_files"] = len(picked)
            nbytes, secs = _read_all(diff, picked)
            res["read_bytes"] = nbytes
            res["cold_s"] = secs
            res["cold_MBps"] = nbytes / 1e6 / secs if secs > 0 else None
            res["bytes_fetched"] = proxy.bytes_down - b0
            res["fetched_vs_layer"] = res["bytes_fetched"] / layer_size if layer_size else None
            res["fetched_vs_read"] = res["bytes_fetched"] / nbytes if nbytes else None
            rss = daemon.peak_rss_bytes()
            log(f"  fs ({store}): cold {res['cold_MBps'] or 0:.1f} MB/s over {nbytes / 1e6:.0f} MB")

            res["cached_after_restart"] = store != "go"
            if store != "go":
                daemon.stop()
                daemon.start()
            os.stat(diff)
            drop_caches()
            b1 = proxy.bytes_down
            nbytes2, secs2 = _read_all(diff, picked)
            res["cached_s"] = secs2
            res["cached_MBps"] = nbytes2 / 1e6 / secs2 if secs2 > 0 else None
            res["bytes_fetched_cached"] = proxy.bytes_down - b1
            nbytes3, secs3 = _read_all(diff, picked)
            res["hot_s"] = secs3
            res["hot_MBps"] = nbytes3 / 1e6 / secs3 if secs3 > 0 else None
            res["daemon_peak_rss_bytes"] = max(rss, daemon.peak_rss_bytes())
            # What the daemon keeps once nothing happens (ours trims its heap when fetching
            # stops; the Go runtime returns memory on its own schedule).
            time.sleep(IDLE_RSS_WAIT)
            res["daemon_idle_rss_bytes"] = daemon.rss_bytes()
        except (EnvError, OSError) as exc:
            res["error"] = str(exc)[-1500:]
            log(f"  fs ({store}): ERROR {res['error']}")
        finally:
            daemon.stop()
    return res
