"""Looking into the chunk cache's pack files from outside (tests only)."""

from __future__ import annotations

import os
from pathlib import Path

from layerstore.runtime.packfile import HEAD, TRAILER_SIZE, PackKeys, read_index


def pack_files(cache_dir: Path) -> list[Path]:
    """The complete pack files (not the temporary ones being written)."""
    packs = cache_dir / "packs"
    if not packs.is_dir():
        return []
    return sorted(p for p in packs.iterdir() if p.is_file() and not p.name.startswith(".tmp-"))


def data_bytes(pack: Path) -> int:
    """The chunk bytes of a pack (what the cache counts), from its trailer."""
    with open(pack, "rb") as f:
        f.seek(-TRAILER_SIZE, os.SEEK_END)
        head = f.read(HEAD.size)
    return int(HEAD.unpack(head)[4])


def cached_bytes(cache_dir: Path) -> int:
    return sum(data_bytes(p) for p in pack_files(cache_dir))


def locate(cache_dir: Path, key_path: Path, digest: str) -> tuple[Path, int, int] | None:
    """``(pack, offset, size)`` of a chunk, through the packs' authenticated indexes."""
    keys = PackKeys.derive(key_path.read_bytes())
    hexd = digest.split(":", 1)[1]
    for p in pack_files(cache_dir):
        for e in read_index(p, keys).entries:
            if e.hexd == hexd:
                return p, e.offset, e.size
    return None
