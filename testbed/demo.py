"""``./run demo``: lazy pulling end to end, on this machine, without the internet.

The demo starts its own registry on 127.0.0.1 behind the WAN emulator
(``benchmarks/wanproxy.py``: a delay-line TCP proxy on loopback, by default 20 ms round trip and
150 Mbit/s shared by every connection), builds an image shaped like many real ones (a busybox
base; an application layer whose start reads a script and a small configuration file but not
its large assets), converts it with ``stargz-store convert``, pushes both the eStargz and the
plain gzip versions, starts the store daemon and runs the eStargz image through podman
(lazily), then pulls the gzip version in full for comparison. Both podmans pull from the
proxy's address, so the store's range requests cross the emulated link too; pushing goes to
the registry directly (it is not part of the comparison). Everything lives in one temporary
directory and is torn down on exit, error or Ctrl-C: the container, podman's private storage
and mounts, the daemon and its FUSE mount, the proxy, the registry.

The building blocks (an OCI image layout writer, a loopback registry, a podman with private
configuration, the store daemon as a child process) live in ``testbed``, which the
end-to-end tests and the benchmarks use too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from benchmarks.env import ProxyThread
from testbed import (
    AccessLogLine,
    LoopbackRegistry,
    PodmanEnv,
    StoreDaemon,
    build_demo_image,
    convert,
    disk_usage,
    push_image,
    read_image,
    remove_tree,
    store_layer_links,
)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def _blob_bytes(lines: Sequence[AccessLogLine], agent_has: str | None = None) -> int:
    return sum(
        line.size
        for line in lines
        if line.is_blob_get
        and line.status in (200, 206)
        and (agent_has is None or agent_has in line.agent)
    )


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _say(msg: str) -> None:
    print(msg, flush=True)


DEFAULT_DATA_MIB = 128


@dataclass(frozen=True)
class Wan:
    """The emulated link (None in run_demo: podman talks to the registry directly)."""

    rtt_ms: float = 20.0
    mbit: float = 150.0  # 0: no bandwidth limit

    def describe(self) -> str:
        rate = f"{self.mbit:g} Mbit/s" if self.mbit > 0 else "unlimited bandwidth"
        return f"{self.rtt_ms:g} ms round trip, {rate}"


@dataclass
class Run:
    """What one side of the comparison measured."""

    pull_s: float
    start_s: float
    output: str
    blob_total: int
    blob_podman: int
    link_bytes: int | None
    disk: int


def _table(lazy: Run, full: Run, lazy_size: int, full_size: int) -> list[str]:
    """The comparison, then one short phrase per line saying what it counts."""
    rows: list[tuple[str, str, str, str]] = [
        ("image size (compressed)", _mib(lazy_size), _mib(full_size),
         "what a full pull has to download"),
    ]  # fmt: skip
    if lazy.link_bytes is not None and full.link_bytes is not None:
        rows.append(
            ("bytes over the WAN link", _mib(lazy.link_bytes), _mib(full.link_bytes),
             "all the registry sent through the emulated link (blobs, manifests, HTTP)")
        )  # fmt: skip
    rows += [
        ("layer bytes from registry", _mib(lazy.blob_total), _mib(full.blob_total),
         "layer blob bytes the registry served (its access log)"),
        ("  fetched by podman", _mib(lazy.blob_podman), _mib(full.blob_podman),
         "podman's own downloads: none when the store serves every layer"),
        ("  fetched by the store", _mib(lazy.blob_total - lazy.blob_podman), "-",
         "range requests: the TOCs and the files the container read"),
        ("pull time", f"{lazy.pull_s:.2f} s", f"{full.pull_s:.2f} s",
         "`podman pull` until the image is ready to run"),
        ("pull + run time", f"{lazy.start_s:.2f} s", f"{full.start_s:.2f} s",
         "from the pull to the container's last line: the time to start"),
        ("graphroot disk usage", _mib(lazy.disk), _mib(full.disk),
         "podman's storage; lazy layers stay in the store (cached as read)"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    out = [f"  {'':<{width}}  {'lazy (eStargz + store)':>22}  {'full pull (gzip)':>16}"]
    out += [f"  {name:<{width}}  {a:>22}  {b:>16}" for name, a, b, _ in rows]
    out.append("")
    out += [f"  {name.strip() + ':':<{width + 1}} {why}" for name, _, _, why in rows]
    return out


def _podman_run(
    podman: PodmanEnv,
    ref: str,
    registry: LoopbackRegistry,
    proxy: ProxyThread | None,
) -> Run:
    mark = len(registry.requests())
    link0 = proxy.bytes_down + proxy.bytes_up if proxy is not None else 0
    t0 = time.monotonic()
    podman.pull(ref)
    pull_s = time.monotonic() - t0
    output = podman.run(ref)
    start_s = time.monotonic() - t0
    requests = registry.requests()[mark:]
    link = proxy.bytes_down + proxy.bytes_up - link0 if proxy is not None else None
    return Run(
        pull_s=pull_s,
        start_s=start_s,
        output=output,
        blob_total=_blob_bytes(requests),
        blob_podman=_blob_bytes(requests, "containers/"),
        link_bytes=link,
        disk=disk_usage(podman.graphroot),
    )


def run_demo(workdir: Path, data_mib: int, keep: bool, wan: Wan | None = None) -> int:
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.callback(_say, "demo: cleaned up")
        if not keep:
            stack.callback(remove_tree, workdir)
        try:
            _say(f"demo: working in {workdir}")

            registry = LoopbackRegistry(workdir / "registry")
            stack.callback(registry.stop)
            registry.start()
            _say(f"demo: registry listening on {registry.host}")
            proxy: ProxyThread | None = None
            pull_host = registry.host
            if wan is not None:
                bits = wan.mbit * 1e6 if wan.mbit > 0 else math.inf
                proxy = ProxyThread(registry.port, wan.rtt_ms / 1000, bits)
                proxy.start()
                stack.callback(proxy.stop)
                pull_host = proxy.address
                _say(f"demo: WAN emulator on {pull_host} ({wan.describe()}): podman and the "
                     "store pull through it")  # fmt: skip
            else:
                _say("demo: no WAN emulation (--no-wan): pulls go to the registry directly")

            layout = workdir / "image"
            _say(f"demo: building an image (busybox + an app layer with {data_mib} MiB of assets "
                 "its start does not read)")  # fmt: skip
            t0 = time.monotonic()
            gzip_image = build_demo_image(layout, "gzip", data_size=data_mib << 20)
            _say(f"demo:   built in {time.monotonic() - t0:.1f} s")
            _say("demo: converting it with `stargz-store convert`")
            t0 = time.monotonic()
            convert(f"oci:{layout}:gzip", f"oci:{layout}:estargz")
            esgz_image = read_image(layout, "estargz")
            _say(f"demo:   converted in {time.monotonic() - t0:.1f} s")
            if not all(esgz_image.is_estargz(i) for i in range(len(esgz_image.layers))):
                raise RuntimeError("the converted image has layers without a TOC digest annotation")
            push_image(gzip_image, registry, "demo/app", "gzip")
            push_image(esgz_image, registry, "demo/app", "estargz")
            repo = f"{pull_host}/demo/app"
            _say(f"demo: pushed demo/app:gzip ({_mib(gzip_image.compressed_size)}) and "
                 f"demo/app:estargz ({_mib(esgz_image.compressed_size)})")  # fmt: skip

            insecure = sorted({registry.host, pull_host})
            podman_lazy = PodmanEnv(
                workdir / "podman-lazy",
                layer_store=workdir / "daemon" / "store",
                insecure=insecure,
            )
            # No background filling: the numbers below then show what starting the container
            # needed, not how far the background fetch had got.
            daemon = StoreDaemon(
                workdir / "daemon",
                registries_conf=podman_lazy.registries_conf,
                insecure=insecure,
                background_fetch=False,
            )
            stack.callback(daemon.stop)
            stack.callback(podman_lazy.cleanup)  # runs before daemon.stop: overlays use the mount
            daemon.start()
            _say(f"demo: store daemon ready, mounted on {daemon.mountpoint}")

            _say(f"demo: lazy: podman pull {repo}:estargz, then podman run")
            lazy = _podman_run(podman_lazy, f"{repo}:estargz", registry, proxy)
            links = store_layer_links(podman_lazy, daemon.mountpoint)
            _say("demo: the container printed: " + " | ".join(lazy.output.strip().splitlines()))
            _say(f"demo:   {len(links)} of {len(esgz_image.layers)} layers served by the store")

            podman_full = PodmanEnv(workdir / "podman-full", insecure=insecure)
            stack.callback(podman_full.cleanup)
            _say(f"demo: full: podman pull {repo}:gzip, then podman run")
            full = _podman_run(podman_full, f"{repo}:gzip", registry, proxy)
            if full.output != lazy.output:
                raise RuntimeError(f"outputs differ: lazy {lazy.output!r}, full {full.output!r}")

            _say("")
            if wan is not None:
                _say(f"  through the WAN emulator ({wan.describe()}):")
            for line in _table(lazy, full, esgz_image.compressed_size, gzip_image.compressed_size):
                _say(line)
            _say("")
            _say(f"demo: finished in {time.monotonic() - started:.0f} s")
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            _ignore_signals()
            _say("demo: cleaning up")
    if keep:
        _say(f"demo: kept {workdir} (daemon log: {workdir / 'daemon' / 'daemon.log'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.demo",
        description="Lazy pulling with stargz-store and podman, on a registry on 127.0.0.1 "
        "behind an emulated WAN link, compared with a full pull.",
    )
    parser.add_argument(
        "--data-mib",
        type=int,
        default=DEFAULT_DATA_MIB,
        help=f"size of the assets the container does not read at start (default "
        f"{DEFAULT_DATA_MIB})",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=Wan.rtt_ms,
        help=f"round-trip time the WAN emulator adds (default {Wan.rtt_ms:g})",
    )
    parser.add_argument(
        "--mbit",
        type=float,
        default=Wan.mbit,
        help=f"bandwidth of the emulated link, shared by all connections, 0 for no limit "
        f"(default {Wan.mbit:g})",
    )
    parser.add_argument(
        "--no-wan",
        action="store_true",
        help="no WAN emulator: podman and the store reach the registry directly on loopback",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the working directory (image layout, registry data, daemon log)",
    )
    parser.add_argument("--workdir", type=Path, help="parent of the working directory")
    args = parser.parse_args(argv)
    if args.data_mib < 0 or args.rtt_ms < 0 or args.mbit < 0:
        parser.error("--data-mib, --rtt-ms and --mbit must not be negative")
    wan = None if args.no_wan else Wan(args.rtt_ms, args.mbit)
    if os.geteuid() != 0:
        print("demo: needs root (FUSE with allow_other, rootful podman)", file=sys.stderr)
        return 2
    for tool in ("podman", "runc", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} not found; `./run setup` installs it", file=sys.stderr)
            return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="stargz-demo-", dir=args.workdir))
    try:
        return run_demo(workdir, args.data_mib, args.keep, wan)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"demo: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
