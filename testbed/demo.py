"""``./run demo``: lazy pulling end to end, on this machine, without the internet.

The demo starts its own registry on 127.0.0.1, builds a small real image from busybox-static,
converts it with ``stargz-store convert``, pushes both the eStargz and the plain gzip versions,
starts the store daemon and runs the eStargz image through podman (lazily), then pulls the gzip
version in full for comparison. Everything lives in one temporary directory and is torn down on
exit, error or Ctrl-C: the container, podman's private storage and mounts, the daemon and its
FUSE mount, the registry.

The building blocks (an OCI image layout writer, a loopback registry, a podman with private
configuration, the store daemon as a child process) live in ``testbed``, which the
end-to-end tests and the benchmarks use too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

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


def run_demo(workdir: Path, data_mib: int, keep: bool) -> int:
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

            layout = workdir / "image"
            _say(f"demo: building an image (busybox-static + {data_mib} MiB of data)")
            gzip_image = build_demo_image(layout, "gzip", data_size=data_mib << 20)
            _say("demo: converting it with `stargz-store convert`")
            t0 = time.monotonic()
            convert(f"oci:{layout}:gzip", f"oci:{layout}:estargz")
            esgz_image = read_image(layout, "estargz")
            _say(f"demo:   converted in {time.monotonic() - t0:.1f} s")
            if not all(esgz_image.is_estargz(i) for i in range(len(esgz_image.layers))):
                raise RuntimeError("the converted image has layers without a TOC digest annotation")
            push_image(gzip_image, registry, "demo/app", "gzip")
            push_image(esgz_image, registry, "demo/app", "estargz")
            repo = f"{registry.host}/demo/app"
            _say(f"demo: pushed {repo}:gzip ({_mib(gzip_image.compressed_size)})")
            _say(f"demo: pushed {repo}:estargz ({_mib(esgz_image.compressed_size)})")

            podman_lazy = PodmanEnv(
                workdir / "podman-lazy",
                layer_store=workdir / "daemon" / "store",
                insecure=[registry.host],
            )
            # No background filling: the numbers below then show what starting the container
            # needed, not how far the background fetch had got.
            daemon = StoreDaemon(
                workdir / "daemon",
                registries_conf=podman_lazy.registries_conf,
                insecure=[registry.host],
                background_fetch=False,
            )
            stack.callback(daemon.stop)
            stack.callback(podman_lazy.cleanup)  # runs before daemon.stop: overlays use the mount
            daemon.start()
            _say(f"demo: store daemon ready, mounted on {daemon.mountpoint}")

            cmd = ["sh", "-c", "echo hello from the container; ls /data | wc -l"]
            mark = len(registry.requests())
            t0 = time.monotonic()
            podman_lazy.pull(f"{registry.host}/demo/app:estargz")
            t_pull_lazy = time.monotonic() - t0
            out_lazy = podman_lazy.run(f"{registry.host}/demo/app:estargz", *cmd)
            t_lazy = time.monotonic() - t0
            lazy_requests = registry.requests()[mark:]
            links = store_layer_links(podman_lazy, daemon.mountpoint)
            _say("demo: the container printed: " + " | ".join(out_lazy.strip().splitlines()))
            _say(f"demo:   {len(links)} of {len(esgz_image.layers)} layers served by the store")

            podman_full = PodmanEnv(workdir / "podman-full", insecure=[registry.host])
            stack.callback(podman_full.cleanup)
            mark = len(registry.requests())
            t0 = time.monotonic()
            podman_full.pull(f"{registry.host}/demo/app:gzip")
            t_pull_full = time.monotonic() - t0
            out_full = podman_full.run(f"{registry.host}/demo/app:gzip", *cmd)
            t_full = time.monotonic() - t0
            full_requests = registry.requests()[mark:]
            if out_full != out_lazy:
                raise RuntimeError(f"outputs differ: lazy {out_lazy!r}, full {out_full!r}")

            lazy_total = _blob_bytes(lazy_requests)
            lazy_podman = _blob_bytes(lazy_requests, "containers/")
            full_total = _blob_bytes(full_requests)
            _say("")
            _say("                          lazy (eStargz + store)   full pull (gzip)")
            _say(
                f"  image size (compressed) {_mib(esgz_image.compressed_size):>22} "
                f"{_mib(gzip_image.compressed_size):>18}"
            )
            _say(f"  blob bytes from registry{_mib(lazy_total):>22} {_mib(full_total):>18}")
            _say(f"    by podman             {_mib(lazy_podman):>22} {_mib(full_total):>18}")
            _say(f"    by the store          {_mib(lazy_total - lazy_podman):>22} {'-':>18}")
            _say(f"  pull time               {t_pull_lazy:>20.2f} s {t_pull_full:>16.2f} s")
            _say(f"  pull + run time         {t_lazy:>20.2f} s {t_full:>16.2f} s")
            _say(
                f"  graphroot disk usage    {_mib(disk_usage(podman_lazy.graphroot)):>22} "
                f"{_mib(disk_usage(podman_full.graphroot)):>18}"
            )
            _say("")
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
        description="Lazy pulling with stargz-store and podman, on a registry on 127.0.0.1.",
    )
    parser.add_argument("--data-mib", type=int, default=32, help="size of the data layer")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the working directory (image layout, registry data, daemon log)",
    )
    parser.add_argument("--workdir", type=Path, help="parent of the working directory")
    args = parser.parse_args(argv)
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
        return run_demo(workdir, args.data_mib, args.keep)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"demo: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
