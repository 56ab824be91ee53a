"""Benchmark of the eStargz writer on a realistic rootfs tar.

Builds (once, cached) a ~170 MB tar of this machine's /usr/bin, /usr/lib and /usr/share (files
taken in sorted walk order, each tree capped), then converts it with layerstore.estargz.writer and
compresses it with ``gzip -6`` for comparison. Prints throughput (MB/s of source tar) and the
size ratio eStargz / gzip -6.

    .venv/bin/python benchmarks/convert_bench.py [--workdir DIR] [--runs N] [--min-chunk-size N]

Targets (issue 2): >= 9.5 MB/s on 2 cores; ratio <= 1.065.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layerstore.estargz.writer import WriterOptions, write_estargz

BUDGETS = (("/usr/bin", 15_000_000), ("/usr/lib", 90_000_000), ("/usr/share", 65_000_000))


def build_rootfs_tar(path: Path) -> None:
    names: list[str] = []
    for root, budget in BUDGETS:
        total = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            filenames.sort()
            if total >= budget:
                break
            names.append(dirpath)
            for fn in filenames:
                p = os.path.join(dirpath, fn)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                size = st.st_size if os.path.isfile(p) and not os.path.islink(p) else 0
                if total + size > budget:
                    continue
                total += size
                names.append(p)
    listing = path.with_suffix(".list")
    listing.write_text("".join(n + "\n" for n in names))
    subprocess.run(
        ["tar", "--no-recursion", "--ignore-failed-read", "-cf", str(path), "-T", str(listing)],
        check=True,
        stderr=subprocess.DEVNULL,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_work = os.path.join(tempfile.gettempdir(), "stargz-convert-bench")
    ap.add_argument("--workdir", default=default_work)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--min-chunk-size", type=int, default=0)
    ap.add_argument("--level", type=int, default=6)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument(
        "--gzip-input", action="store_true", help="also time conversion from the gzip -6 tar"
    )
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "rootfs.tar"
    if not src.exists():
        print(f"building {src} ...", file=sys.stderr)
        build_rootfs_tar(src)
    size = src.stat().st_size
    print(f"source tar: {size / 1e6:.1f} MB, cpus: {os.cpu_count()}")

    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    gz = subprocess.run(["gzip", "-6", "-c", str(src)], stdout=subprocess.PIPE, check=True).stdout
    t_gzip = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_gzip = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    print(
        f"gzip -6: {len(gz) / 1e6:.2f} MB in {t_gzip:.1f} s ({size / 1e6 / t_gzip:.1f} MB/s), "
        f"{cpu_gzip:.1f} CPU s"
    )

    opts = WriterOptions(
        min_chunk_size=args.min_chunk_size, compression_level=args.level, workers=args.workers
    )
    times: list[float] = []
    cpus: list[float] = []
    out_path = work / "rootfs.esgz"
    res = None
    for _ in range(args.runs):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        with open(out_path, "wb") as out:
            res = write_estargz(src, out, opts)
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    assert res is not None
    med = statistics.median(times)
    ratio = res.compressed_size / len(gz)
    print(
        f"estargz: {res.compressed_size / 1e6:.2f} MB, median {med:.2f} s of {args.runs} "
        f"({size / 1e6 / med:.1f} MB/s), times {[round(t, 2) for t in times]}, "
        f"CPU s {[round(c, 1) for c in cpus]}"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    best = size / 1e6 / min(times)
    print(
        f"best run {best:.1f} MB/s; CPU-bound floor (all work on one core): "
        f"{size / 1e6 / statistics.median(cpus):.1f} MB/s"
    )
    print(f"ratio estargz / gzip -6: {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)")
    if args.gzip_input:
        gz_path = work / "rootfs.tar.gz"
        gz_path.write_bytes(gz)
        gtimes = []
        gcpus = []
        for _ in range(args.runs):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            with open(out_path, "wb") as out:
                gres = write_estargz(gz_path, out, opts)
            gtimes.append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            gcpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        assert gres.blob_digest == res.blob_digest
        gmed = statistics.median(gtimes)
        print(
            f"estargz from gzip input: median {gmed:.2f} s ({size / 1e6 / gmed:.1f} MB/s of tar),"
            f" CPU s {[round(c, 1) for c in gcpus]}, same blob: yes"
        )
    print(f"toc offset {res.toc_offset}, TOC+footer {res.compressed_size - res.toc_offset} bytes")
    ok = size / 1e6 / med >= 9.5 and ratio <= 1.065
    print("targets (>= 9.5 MB/s, ratio <= 1.065):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
