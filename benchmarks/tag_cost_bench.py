"""CPU cost per MiB of the chunk cache's checks (no daemon, no disk): sha256 (the first-use
check of an entry found on disk), the keyed block tags (computed when verified bytes are
written or re-verified, and hashed again on every pread) and, for scale, copying the bytes.

    .venv/bin/python -m benchmarks.tag_cost_bench [--mib 64] [--rounds 5]

Thread CPU time (``time.thread_time``), best of ``--rounds``: on a loaded machine wall time
mostly measures the other load. Prints JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Any, Callable

from layerstore.runtime import blocktags
from layerstore.runtime.blocktags import BLOCK, BlockTagger

MiB = 1 << 20


def _cost(fn: Callable[[], object], mib: int, rounds: int) -> dict[str, float]:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return {"us_per_mib": round(best / mib * 1e6, 1), "mb_s": round(mib * MiB / best / 1e6, 0)}


def run(mib: int, rounds: int) -> dict[str, Any]:
    data = os.urandom(mib * MiB)
    view = memoryview(data)
    tagger = BlockTagger()
    tags = tagger.tags(data)
    read = 128 * 1024  # a FUSE read

    def check_reads() -> None:
        for off in range(0, len(data), read):
            tagger.check(tags, off // BLOCK, view[off : off + read])

    def copy_reads() -> None:
        for off in range(0, len(data), read):
            bytes(view[off : off + read])

    return {
        "command": f"python -m benchmarks.tag_cost_bench --mib {mib} --rounds {rounds}",
        "algorithm": blocktags.ALGORITHM,
        "block_bytes": BLOCK,
        "tag_bytes_per_gib": (1 << 30) // BLOCK * blocktags.TAG_SIZE,
        "sha256_whole": _cost(lambda: hashlib.sha256(data).digest(), mib, rounds),
        "tags_whole": _cost(lambda: tagger.tags(data), mib, rounds),
        "check_128k_reads": _cost(check_reads, mib, rounds),
        "copy_128k_reads": _cost(copy_reads, mib, rounds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(run(args.mib, args.rounds), indent=2))


if __name__ == "__main__":
    main()
