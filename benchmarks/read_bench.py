"""Read-path micro-benchmark: LayerManager + ChunkFetcher + ChunkCache over a simulated WAN.

    .venv/bin/python -m benchmarks.read_bench [--rtt-ms 20] [--mbps 200] [--files 2000]

A synthetic layer (many small files plus a few large ones) is converted with our writer and
served from memory through a source that sleeps ``rtt + bytes / bandwidth`` per ``read_ranges``
call (one HTTP request). Prints requests, bytes and wall time for: the lookup (tail fetch), a
cold read of every small file in TOC order with and without read-ahead, a cold sequential read
of a large file in 128 KiB FUSE-sized reads, 16 threads reading random files, warm 128 KiB
reads from the disk cache, and the background fill of the whole layer.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import structlog

from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
from layerstore.estargz.writer import write_estargz
from layerstore.registry.client import ResolvedImage
from layerstore.registry.manifest import Descriptor
from layerstore.registry.reference import Reference
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.fetcher import FetcherSettings
from layerstore.runtime.layer import LayerSettings
from layerstore.runtime.manager import LayerManager, ManagerSettings
from layerstore.source import BytesSource
from testbed.resolved import resolved_image

KiB = 1024
MiB = 1024 * KiB


class WanSource:
    def __init__(self, data: bytes, rtt: float, bytes_per_s: float) -> None:
        self.inner = BytesSource(data)
        self.rtt = rtt
        self.bps = bytes_per_s
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0

    def size(self) -> int:
        return self.inner.size()

    def read_at(self, offset: int, length: int) -> bytes:
        return self.read_ranges([(offset, length)])[0]

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        n = sum(ln for _, ln in ranges)
        with self.lock:
            self.requests += 1
            self.bytes += n
        time.sleep(self.rtt + n / self.bps)
        return self.inner.read_ranges(ranges)

    def reset(self) -> tuple[int, int]:
        with self.lock:
            out = (self.requests, self.bytes)
            self.requests = self.bytes = 0
            return out


class OneImageClient:
    def __init__(self, desc: Descriptor, diff_id: str, source: WanSource) -> None:
        self.image = resolved_image("r/x:1", [desc], [diff_id])
        self.source = source

    def resolve(self, ref: Reference, platform: str | None = None) -> ResolvedImage:
        return self.image

    def blob_source(self, image: ResolvedImage, digest: str, size: int) -> WanSource:
        return self.source


def must(ino: int | None) -> int:
    if ino is None:
        raise SystemExit("file missing from the layer")
    return ino


def build_tar(n_small: int, n_large: int, seed: int = 1) -> tuple[bytes, list[str], list[str]]:
    rnd = random.Random(seed)
    buf = io.BytesIO()
    small, large = [], []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(n_small):
            name = f"usr/lib/pkg{i // 100}/file{i}.py"
            size = rnd.randint(512, 16 * KiB)
            # half-compressible content, like source and bytecode
            data = (os.urandom(size // 2) + b"x" * (size - size // 2))[:size]
            ti = tarfile.TarInfo(name)
            ti.size = size
            ti.mtime = 1_600_000_000
            tar.addfile(ti, io.BytesIO(data))
            small.append(name)
        for i in range(n_large):
            name = f"opt/big{i}.bin"
            data = os.urandom(12 * MiB)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
            large.append(name)
    return buf.getvalue(), small, large


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mbps", type=float, default=200.0, help="link speed, megabits/s")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--large", type=int, default=2)
    args = ap.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40)  # errors only
    )
    rtt, bps = args.rtt_ms / 1000, args.mbps * 1e6 / 8

    tar, small, large = build_tar(args.files, args.large)
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(tar), out)
    blob = out.getvalue()
    print(
        f"layer: {len(blob) / MiB:.1f} MiB compressed, {res.uncompressed_size / MiB:.1f} MiB tar, "
        f"{args.files} small files, {args.large} x 12 MiB; link RTT {args.rtt_ms} ms, "
        f"{args.mbps} Mbit/s"
    )
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        res.blob_digest,
        len(blob),
        {TOC_DIGEST_ANNOTATION: res.toc_digest},
    )

    def run(label: str, fn: Any, src: WanSource) -> Any:
        src.reset()
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
        reqs, nbytes = src.reset()
        print(f"{label:<58} {dt * 1000:9.1f} ms {reqs:6d} req {nbytes / MiB:8.2f} MiB")
        return value

    def one(readahead: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            src = WanSource(blob, rtt, bps)
            cache = ChunkCache(os.path.join(d, "cache"), 4 << 30)
            settings = ManagerSettings(
                layer=LayerSettings(landmark_prefetch=False),
                fetcher=FetcherSettings(readahead_bytes=readahead),
            )
            mgr = LayerManager(OneImageClient(desc, res.diff_id, src), cache, settings)
            ra = f"read-ahead {readahead // KiB} KiB"
            layer = run(
                f"lookup (tail + TOC, verify) [{ra}]", lambda: mgr.get("r/x:1", res.toc_digest), src
            )
            idx = layer.index
            inos = [must(idx.find(p)) for p in small]

            def read_small() -> int:
                n = 0
                for ino in inos:
                    n += len(layer.read(ino, 0, 1 << 20))
                return n

            run(f"cold read of {len(inos)} small files, TOC order [{ra}]", read_small, src)
            big = must(idx.find(large[0]))

            def read_big() -> None:
                for off in range(0, 12 * MiB, 128 * KiB):
                    layer.read(big, off, 128 * KiB)

            if readahead:
                run("cold sequential read, 12 MiB file, 128 KiB reads", read_big, src)
                t0 = time.perf_counter()
                n = 0
                for _ in range(3):
                    for off in range(0, 12 * MiB, 128 * KiB):
                        n += len(layer.read(big, off, 128 * KiB))
                dt = time.perf_counter() - t0
                print(
                    f"{'warm 128 KiB reads from the disk cache':<58} {n / MiB / dt:9.1f} MiB/s"
                    f" ({dt / (n / (128 * KiB)) * 1e6:.0f} us/read)"
                )
            mgr.close()
            cache.close()

    for readahead in (0, 512 * KiB):
        one(readahead)

    with tempfile.TemporaryDirectory() as d:
        src = WanSource(blob, rtt, bps)
        cache = ChunkCache(os.path.join(d, "cache"), 4 << 30)
        mgr = LayerManager(
            OneImageClient(desc, res.diff_id, src),
            cache,
            ManagerSettings(layer=LayerSettings(landmark_prefetch=False)),
        )
        layer = mgr.get("r/x:1", res.toc_digest)
        rnd = random.Random(2)
        picks = [must(layer.index.find(p)) for p in rnd.sample(small, min(400, len(small)))]

        def concurrent() -> None:
            def worker(k: int) -> None:
                for ino in picks[k::16]:
                    layer.read(ino, 0, 1 << 20)

            ts = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        run(f"cold read of {len(picks)} random small files, 16 threads", concurrent, src)
        mgr.close()
        cache.close()
    with tempfile.TemporaryDirectory() as d:
        src = WanSource(blob, rtt, bps)
        cache = ChunkCache(os.path.join(d, "cache"), 4 << 30)
        mgr = LayerManager(
            OneImageClient(desc, res.diff_id, src),
            cache,
            ManagerSettings(layer=LayerSettings(landmark_prefetch=False)),
        )
        layer = mgr.get("r/x:1", res.toc_digest)

        def read_blob() -> None:
            got = bytearray()
            for off in range(0, len(blob), 128 * KiB):
                got += layer.read_blob(off, 128 * KiB)
            assert bytes(got) == blob

        run("blob file: sequential 128 KiB reads of the whole blob", read_blob, src)
        mgr.close()
        cache.close()
    with tempfile.TemporaryDirectory() as d:
        src = WanSource(blob, rtt, bps)
        cache = ChunkCache(os.path.join(d, "cache"), 4 << 30)
        settings = ManagerSettings(
            layer=LayerSettings(landmark_prefetch=False, background_fill=True),
            fetcher=replace(FetcherSettings(), background_share=1.0, background_idle_seconds=0),
        )
        mgr = LayerManager(OneImageClient(desc, res.diff_id, src), cache, settings)
        layer = mgr.get("r/x:1", res.toc_digest)

        def fill() -> None:
            layer.start()
            time.sleep(0.01)
            layer.fetcher.join_background_fill(120)

        run("background fill of the whole layer", fill, src)
        assert all(c.digest in cache for c in layer.fetcher.chunks)
        mgr.close()
        cache.close()


if __name__ == "__main__":
    main()
