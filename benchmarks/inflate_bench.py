"""Inflate speed of the standard zlib and zlib-ng (the decoder layerstore/estargz/inflate.py
picks), on gzip members like a layer's: a TOC-sized JSON document and file chunks of a few
sizes, inflated the way the reader does (``decompressobj(31)``, bounded output pieces).

    .venv/bin/python -m benchmarks.inflate_bench [--repeat 5]

Prints one JSON document: best-of-N milliseconds and MB/s (decompressed) per decoder and size.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import time
import zlib
from typing import Any

PIECE = 1 << 20


def _text(rnd: random.Random, n: int) -> bytes:
    words = [
        bytes(rnd.choices(b"abcdefghijklmnop_ ()\n", k=rnd.randint(3, 10))) for _ in range(2000)
    ]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words)
    return bytes(out[:n])


def _toc(entries: int) -> bytes:
    ents = [
        {
            "name": f"usr/lib/python3/dist-packages/pkg{i % 300}/mod_{i}.py",
            "type": "reg",
            "size": 1000 + i % 9000,
            "modtime": "2020-09-13T12:26:40Z",
            "mode": 420,
            "digest": "sha256:" + hashlib.sha256(str(i).encode()).hexdigest(),
            "offset": i * 1000,
            "chunkDigest": "sha256:" + hashlib.sha256(str(i).encode()).hexdigest(),
        }
        for i in range(entries)
    ]
    return json.dumps({"version": 1, "entries": ents}).encode()


def _inflate(mod: Any, comp: bytes) -> int:
    d = mod.decompressobj(31)
    buf: Any = memoryview(comp)
    n = 0
    while True:
        out = d.decompress(buf, PIECE)
        n += len(out)
        if d.eof:
            return n
        buf = d.unconsumed_tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    decoders: dict[str, Any] = {"zlib": zlib}
    try:
        from zlib_ng import zlib_ng

        decoders["zlib-ng"] = zlib_ng
    except ImportError:
        pass
    rnd = random.Random(1)
    inputs = {
        "toc_56810_entries": _toc(56_810),
        "chunk_4KB": _text(rnd, 4_000),
        "chunk_100KB": _text(rnd, 100_000),
        "chunk_4MB": _text(rnd, 4_000_000),
    }
    result: dict[str, Any] = {"command": "python -m benchmarks.inflate_bench", "inputs": {}}
    for name, raw in inputs.items():
        comp = gzip.compress(raw, 6)
        reps = max(1, 20_000_000 // len(raw))
        row: dict[str, Any] = {"bytes": len(raw), "compressed": len(comp)}
        for dname, mod in decoders.items():
            best = float("inf")
            for _ in range(args.repeat):
                t = time.perf_counter()
                for _ in range(reps):
                    assert _inflate(mod, comp) == len(raw)
                best = min(best, (time.perf_counter() - t) / reps)
            row[dname] = {"ms": round(best * 1e3, 3), "mb_per_s": round(len(raw) / best / 1e6)}
        if "zlib-ng" in row:
            row["zlib_ng_speedup"] = round(row["zlib"]["ms"] / row["zlib-ng"]["ms"], 2)
        result["inputs"][name] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
