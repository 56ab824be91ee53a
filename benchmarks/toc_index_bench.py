"""Build time and memory of TOCIndex for a synthetic TOC shaped like a large real image layer.

Usage: ``.venv/bin/python benchmarks/toc_index_bench.py [ENTRIES]`` (default 56,810: the entry
count of a large distribution base layer). The TOC mixes directories (~12 %), regular files
with offsets and digests (~80 %, some split into several chunks), symlinks and hardlinks, with
the fields the Go writer emits (modtime, mode, uid/gid, userName/groupName, digest,
chunkDigest, offset, chunkSize). Prints the JSON size, build time (best of 5) and the
tracemalloc peak (during build, JSON bytes excluded) and current (the finished index).
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import time
import tracemalloc
from typing import Any

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from layerstore.estargz.toc import TOCIndex


def synthetic_toc(n_entries: int = 56_810) -> tuple[bytes, int]:
    """A TOC JSON with *n_entries* entries and the matching toc_offset."""
    entries: list[dict[str, Any]] = []
    offset = 0
    dirs = [""]
    i = 0
    mt = "2024-05-01T10:20:30Z"
    while len(entries) < n_entries:
        i += 1
        if i % 8 == 1:
            parent = dirs[(i * 7919) % len(dirs)]
            name = f"{parent}dir{i:06d}/"
            if name.count("/") > 8:
                name = f"top{i:06d}/"
            dirs.append(name)
            entries.append(
                {
                    "name": name,
                    "type": "dir",
                    "modtime": mt,
                    "mode": 0o755,
                    "userName": "root",
                    "groupName": "root",
                }
            )
            continue
        parent = dirs[(i * 104729) % len(dirs)]
        name = f"{parent}file-{i:06d}.py"
        if i % 50 == 3:
            entries.append(
                {
                    "name": name,
                    "type": "symlink",
                    "linkName": "../lib/libc.so.6",
                    "modtime": mt,
                    "mode": 0o777,
                    "userName": "root",
                    "groupName": "root",
                }
            )
            continue
        size = 100 + (i * 2654435761) % 20000
        digest = "sha256:" + hashlib.sha256(b"%d" % i).hexdigest()
        offset += 100 + size // 3
        entry = {
            "name": name,
            "type": "reg",
            "size": size,
            "modtime": mt,
            "mode": 0o644,
            "uid": 0,
            "gid": 0,
            "userName": "root",
            "groupName": "root",
            "offset": offset,
            "digest": digest,
            "chunkDigest": digest,
        }
        if i % 997 == 0 and len(entries) + 3 < n_entries:
            # a large file in three chunks
            entry["size"] = size = 3 * 4_194_304
            entry["chunkSize"] = 4_194_304
            entries.append(entry)
            for k in (1, 2):
                offset += 1_500_000
                entries.append(
                    {
                        "name": name,
                        "type": "chunk",
                        "offset": offset,
                        "chunkOffset": k * 4_194_304,
                        **({"chunkSize": 4_194_304} if k == 1 else {}),
                        "chunkDigest": "sha256:" + hashlib.sha256(b"%d/%d" % (i, k)).hexdigest(),
                    }
                )
            continue
        entries.append(entry)
        if i % 211 == 0:
            entries.append(
                {
                    "name": name + ".link",
                    "type": "hardlink",
                    "linkName": name,
                    "modtime": mt,
                    "mode": 0o644,
                    "userName": "root",
                    "groupName": "root",
                }
            )
    entries = entries[:n_entries]
    # indented with tabs, as the Go writer (json.MarshalIndent(toc, "", "\t")) does
    doc = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    return doc, offset + 1_000_000


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 56_810
    doc, toc_offset = synthetic_toc(n)
    print(f"entries: {n}  TOC JSON: {len(doc) / 2**20:.1f} MiB")
    best = best_cpu = float("inf")
    for _ in range(5):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        idx = TOCIndex.from_json(doc, toc_offset=toc_offset)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        del idx
    ref = float("inf")
    for _ in range(3):
        c0 = time.process_time()
        json.loads(doc)
        ref = min(ref, time.process_time() - c0)
    print(f"reference: json.loads of the same TOC: CPU {ref * 1000:.0f} ms")
    print(f"build time (best of 5): wall {best * 1000:.0f} ms, CPU {best_cpu * 1000:.0f} ms")
    gc.collect()
    tracemalloc.start()
    idx = TOCIndex.from_json(doc, toc_offset=toc_offset)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"tracemalloc: index (current) {current / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    print(f"inodes: {idx.num_inodes}  file bytes: {idx.total_file_bytes}")


if __name__ == "__main__":
    main()
