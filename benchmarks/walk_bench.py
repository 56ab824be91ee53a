"""Walk benchmark: a ~50,000-entry layer through the real daemon, registry and FUSE mount.

    .venv/bin/python -m benchmarks.walk_bench [--entries 50000] [--sample 500] [--keep DIR]

(root, /dev/fuse, docker-registry.) A deterministic layer of directories, small files and
symlinks is written as a gzip OCI layout, converted with ``stargz-store convert`` straight into
a ``docker-registry`` on 127.0.0.1, and served by ``python -m stargz_store`` (background fetch
and landmark prefetch off, so the figures are the lookup/readdir path only). Measured:

- ``resolve_s``: the first ``stat`` of ``<mount>/<base64 ref>/<digest>/diff`` (manifest, config,
  TOC fetch, TOC index);
- ``walk``: ``find DIR -printf '%y %s\\n'`` (every entry stat'ed; readdirplus) on the fresh
  layer; then, dentries and inodes dropped, plain ``find DIR``; then again with the kernel's
  caches warm. entries/s counts the entries below ``diff/``;
- ``read``: ``--sample`` files picked at random read whole (cold: fetched from the registry);
- the daemon's CPU time (utime + stime) during the resolve and each walk (``daemon_cpu_s``):
  repeatable on a loaded machine where wall times are not;
- the daemon's ``VmHWM`` (peak RSS) and ``VmRSS`` at start, with the layer resolved, after the
  walks and after the reads.

``--store go`` measures the Go reference store instead (``go-stargz-store``, prefetch and
background fetch off too), ``--store ours,go`` both on the same registry and layer, with
``ours_vs_go`` ratios.

Targets (issue 4): peak RSS <= 150 MB, walk >= 30,000 entries/s. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from benchmarks.workdir import in_workdir
from testbed import (
    BuiltLayer,
    LoopbackRegistry,
    RegistryHTTP,
    StoreDaemon,
    convert,
    gzip_bytes,
    image_config,
    sha256_digest,
    write_image,
)
from testbed.gopeer import GoStoreDaemon

MB = 1_000_000
TARGET_RSS_MB = 150.0
TARGET_WALK_PER_S = 30_000.0


def build_tar(entries: int, seed: int = 1) -> tuple[bytes, dict[str, int], list[str]]:
    """A tar of about ``entries`` entries: ~8% directories (up to 4 levels), ~84% small files
    (40 B .. 12 KiB, text-like), ~8% symlinks. Returns (tar, counts by kind, file paths)."""
    rnd = random.Random(seed)
    words = [
        bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz_", k=rnd.randint(3, 10))) for _ in range(500)
    ]
    buf = io.BytesIO()
    counts = {"dir": 0, "file": 0, "symlink": 0}
    files: list[str] = []
    dirs: list[str] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add_dir(path: str) -> None:
            ti = tarfile.TarInfo(path)
            ti.type = tarfile.DIRTYPE
            ti.mode, ti.mtime = 0o755, 1_600_000_000
            tar.addfile(ti)
            dirs.append(path)
            counts["dir"] += 1

        for top in ("usr", "usr/lib", "usr/share", "etc", "opt"):
            add_dir(top)
        total = len(dirs)
        while total < entries:
            parent = rnd.choice(dirs[-40:] if rnd.random() < 0.7 else dirs)
            roll = rnd.random()
            if roll < 0.08 and parent.count("/") < 5:
                add_dir(f"{parent}/d{counts['dir']}_{rnd.choice(words).decode()}")
            elif roll < 0.16 and files:
                ti = tarfile.TarInfo(f"{parent}/l{counts['symlink']}")
                ti.type = tarfile.SYMTYPE
                ti.linkname = "/" + rnd.choice(files)
                ti.mode, ti.mtime = 0o777, 1_600_000_000
                tar.addfile(ti)
                counts["symlink"] += 1
            else:
                name = f"{parent}/f{counts['file']}_{rnd.choice(words).decode()}.py"
                size = min(12 * 1024, int(rnd.expovariate(1 / 2500)) + 40)
                data = b" ".join(rnd.choices(words, k=size // 5 + 1))[:size]
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_600_000_000
                tar.addfile(ti, io.BytesIO(data))
                files.append(name)
                counts["file"] += 1
            total += 1
    return buf.getvalue(), counts, files


def memory(pid: int) -> dict[str, float]:
    """VmHWM and VmRSS of ``pid`` in MB (10^6 bytes)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(value.split()[0]) * 1024 / MB, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds, from /proc/PID/stat.

    CPU time, unlike wall time, is not inflated by other processes on a loaded machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_kernel_caches(what: str) -> None:
    """ "1" page cache, "2" dentries and inodes, "3" both (the FUSE daemon is asked again)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(what)


def timed_find(diff: Path, *args: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = subprocess.run(["find", str(diff), *args], capture_output=True, check=True, timeout=3600)
    seconds = time.perf_counter() - t0
    entries = r.stdout.count(b"\n") - 1  # not diff/ itself
    return {
        "command": " ".join(["find", "DIFF", *args]),
        "entries": entries,
        "seconds": round(seconds, 3),
        "entries_per_s": round(entries / seconds),
    }


class Profiler:
    """``py-spy record --format raw`` (collapsed stacks) of the daemon during one phase."""

    def __init__(self, out_dir: Path | None, pid: int) -> None:
        self.out_dir, self.pid = out_dir, pid
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, phase: str) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{phase}.txt"
        self.proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.pid), "--threads", "--idle", "--rate", "200",
             "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # attached

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # writes the profile and exits
            proc.wait(60)


def config_text(host: str, workdir: Path, read_ahead: int | None) -> str:
    fetch = "" if read_ahead is None else f"read_ahead_bytes = {read_ahead}\n"
    return (
        "[registry]\n"
        f'registries_conf = "{workdir}/registries.conf"\n'
        f'registries_conf_d = "{workdir}/registries.conf.d"\n'
        f'insecure_registries = ["{host}"]\n'
        "[auth]\nextra_auth_files = []\n"
        f"[fetch]\nbackground_fetch = false\nprefetch_landmark = false\n{fetch}"
        f'[log]\nlevel = "{os.environ.get("BENCH_STORE_LOG_LEVEL", "info")}"\nformat = "json"\n'
    )


GO_STORE_CONFIG = "noprefetch = true\nno_background_fetch = true\n"


def start_store(
    store: str, work: Path, host: str, read_ahead: int | None
) -> StoreDaemon | GoStoreDaemon:
    """Our daemon or the Go reference store, both with background fetch and landmark
    prefetch off (the lookup/readdir and read paths only)."""
    if store == "go":
        return GoStoreDaemon(work / "go-daemon", config_text=GO_STORE_CONFIG).start()
    return StoreDaemon(work / "daemon", config_text=config_text(host, work, read_ahead)).start()


def measure(
    args: argparse.Namespace,
    store: str,
    work: Path,
    host: str,
    ref: str,
    digest: str,
    tar: bytes,
    files: list[str],
) -> dict[str, Any]:
    daemon = start_store(store, work, host, args.read_ahead_bytes)
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        mem: dict[str, dict[str, float]] = {"started": memory(pid)}
        prof = Profiler(args.py_spy if store == "ours" else None, pid)
        prof.start("resolve-walk")
        b64 = base64.b64encode(ref.encode()).decode()
        diff = daemon.mountpoint / b64 / digest / "diff"
        t0 = time.perf_counter()
        c0 = cpu_seconds(pid)
        os.stat(diff)
        resolve_s = time.perf_counter() - t0
        resolve_cpu = cpu_seconds(pid) - c0
        mem["resolved"] = memory(pid)
        walks = []
        for i, find_args in enumerate((("-printf", "%y %s\n"), (), ())):
            if i == 1:
                drop_kernel_caches("2")
            c0 = cpu_seconds(pid)
            walks.append(timed_find(diff, *find_args))
            walks[-1]["daemon_cpu_s"] = round(cpu_seconds(pid) - c0, 3)
        walks[0]["kernel_caches"] = "cold (fresh layer)"
        walks[1]["kernel_caches"] = "cold (dentries and inodes dropped)"
        walks[2]["kernel_caches"] = "warm"
        prof.stop()
        mem["after_walk"] = memory(pid)
        sample = random.Random(2).sample(files, min(args.sample, len(files)))
        drop_kernel_caches("3")
        prof.start("read")
        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        nbytes = 0
        got = hashlib.sha256()
        for name in sample:
            data = (diff / name).read_bytes()
            nbytes += len(data)
            got.update(data)
        read_s = time.perf_counter() - t0
        read_cpu = cpu_seconds(pid) - cpu0
        prof.stop()
        mem["after_read"] = memory(pid)
    finally:
        code = daemon.stop()
    want = hashlib.sha256()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for name in sample:
            f = tf.extractfile(name)
            assert f is not None
            want.update(f.read())
    if want.digest() != got.digest():
        raise SystemExit(f"{store}: the files read through the store differ from the source tar")
    peak = max(m["VmHWM"] for m in mem.values())
    return {
        "store": store,
        "resolve_s": round(resolve_s, 3),
        "resolve_daemon_cpu_s": round(resolve_cpu, 3),
        "walk": walks,
        "read": {
            "files": len(sample),
            "bytes": nbytes,
            "seconds": round(read_s, 3),
            "files_per_s": round(len(sample) / read_s) if sample else None,
            "daemon_cpu_ms_per_file": (round(read_cpu * 1000 / len(sample), 2) if sample else None),
            "verified": True,
        },
        "daemon_memory_mb": mem,
        "peak_rss_mb": peak,
        "daemon_exit": code,
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    tar, counts, files = build_tar(args.entries)
    layer = BuiltLayer(gzip_bytes(tar), sha256_digest(tar))
    layout = work / "layout"
    write_image(layout, "src", [layer], image_config([layer.diff_id]))
    build_s = time.perf_counter() - t0
    stores = [x.strip() for x in args.store.split(",") if x.strip()]
    by_store: dict[str, dict[str, Any]] = {}
    with LoopbackRegistry(work / "registry") as registry:
        t0 = time.perf_counter()
        convert(f"oci:{layout}:src", f"docker://{registry.host}/bench/walk:v1",
                "--dest-tls-verify=false")  # fmt: skip
        convert_s = time.perf_counter() - t0
        client = RegistryHTTP(registry.host)
        manifest = json.loads(client.manifest("bench/walk", "v1")[0])
        desc = manifest["layers"][0]
        ref = f"{registry.host}/bench/walk:v1"
        for store in stores:
            by_store[store] = measure(
                args, store, work, registry.host, ref, desc["digest"], tar, files
            )
    out: dict[str, Any] = {
        "command": " ".join(
            [os.path.basename(sys.executable), "-m", "benchmarks.walk_bench", *sys.argv[1:]]
        ),
        "layer": {
            "entries": sum(counts.values()),
            **counts,
            "tar_bytes": len(tar),
            "estargz_bytes": int(desc["size"]),
            "build_s": round(build_s, 2),
            "convert_s": round(convert_s, 2),
        },
        "read_ahead_bytes": args.read_ahead_bytes,  # None: the daemon's default (512 KiB)
    }
    if len(by_store) == 1:
        out.update(next(iter(by_store.values())))
    else:
        out["by_store"] = by_store
    if "ours" in by_store:
        ours = by_store["ours"]
        out["targets"] = {
            "peak_rss_mb": TARGET_RSS_MB,
            "peak_rss_ok": ours["peak_rss_mb"] <= TARGET_RSS_MB,
            "walk_entries_per_s": TARGET_WALK_PER_S,
            "walk_ok": ours["walk"][0]["entries_per_s"] >= TARGET_WALK_PER_S,
        }
    if "ours" in by_store and "go" in by_store:
        ours, go = by_store["ours"], by_store["go"]
        out["ours_vs_go"] = {
            "resolve_s": round(ours["resolve_s"] / go["resolve_s"], 3),
            "walk_s": [
                round(a["seconds"] / b["seconds"], 3) for a, b in zip(ours["walk"], go["walk"])
            ],
            "peak_rss": round(ours["peak_rss_mb"] / go["peak_rss_mb"], 3),
        }
        if ours["read"]["files"] and go["read"]["files"]:
            out["ours_vs_go"]["read_files_per_s"] = round(
                ours["read"]["files_per_s"] / go["read"]["files_per_s"], 3
            )
            out["ours_vs_go"]["read_cpu_ms_per_file"] = round(
                ours["read"]["daemon_cpu_ms_per_file"] / go["read"]["daemon_cpu_ms_per_file"], 3
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--sample", type=int, default=500, help="files read after the walk")
    ap.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="profile the daemon (py-spy in PATH): DIR/resolve-walk.txt, DIR/read.txt (raw)",
    )
    ap.add_argument(
        "--read-ahead-bytes",
        type=int,
        help="the daemon's [fetch] read_ahead_bytes (default: the daemon's default)",
    )
    ap.add_argument(
        "--store",
        default="ours",
        help="ours, go (the Go reference store, go-stargz-store) or ours,go (both, with ratios)",
    )
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()
    if not set(args.store.split(",")) <= {"ours", "go"}:
        raise SystemExit("--store takes ours, go or ours,go")
    if os.geteuid() != 0:
        raise SystemExit("walk_bench needs root (FUSE allow_other, drop_caches)")
    result = in_workdir(lambda work: run(args, work), args.keep, "walk-bench-")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
