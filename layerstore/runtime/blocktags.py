"""Keyed per-block tags: a cheap check that bytes read back from the chunk cache are the bytes
that were verified in this process.

A chunk's sha256 is checked when it is fetched (``decode_chunk``); after that the cache serves
slices with ``pread``, and hashing the whole chunk for every 128 KiB read would cost far more
than the read. Instead, when the verified bytes are at hand, the cache computes one tag per
``BLOCK`` bytes with a keyed hash, stores the tags with the chunk in its pack (under the index
MAC, :mod:`layerstore.runtime.packfile`) and keeps them in memory with the entry; every pread
hashes the blocks it covers and compares. The key is the cache's (a root-only file, see
``docs/ARCHITECTURE.md``, "Cached chunks"), so whoever can write the cache directory but not
read the key cannot compute the tag of bytes of their choosing: altered bytes are caught with
probability ``1 - 2**-128`` per block.

The hash is BLAKE3 in keyed mode (the ``blake3`` package) when it can be imported, else keyed
BLAKE2b from ``hashlib`` (slower: measured on a 2-core Zen 3 with SHA-NI, CPU time per MiB in
64 KiB blocks, BLAKE3 ~0.5 ms, sha256 ~0.8 ms, BLAKE2b ~1.7 ms).

Memory: ``TAG_SIZE`` (16) bytes per ``BLOCK`` (64 KiB) of verified entries, i.e. 256 KiB per GiB
cached, plus one ``bytes`` object (33 bytes) per entry.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Union

BLOCK = 64 * 1024
"""Bytes covered by one tag. FUSE reads are 128 KiB or more and aligned, so a read hashes about
what it returns; a 4 KiB random read hashes 64 KiB."""

TAG_SIZE = 16

Buffer = Union[bytes, bytearray, memoryview]

try:  # pragma: no cover - which branch runs depends on the environment
    import blake3 as _blake3

    ALGORITHM = "blake3-keyed"

    def _keyed(key: bytes) -> Callable[[Buffer], bytes]:
        new = _blake3.blake3

        def tag(data: Buffer) -> bytes:
            return new(data, key=key).digest(TAG_SIZE)

        return tag

except ImportError:  # pragma: no cover
    ALGORITHM = "blake2b-keyed"

    def _keyed(key: bytes) -> Callable[[Buffer], bytes]:
        new = hashlib.blake2b

        def tag(data: Buffer) -> bytes:
            return new(data, key=key, digest_size=TAG_SIZE).digest()

        return tag


def blocks(size: int) -> int:
    """How many tags an entry of *size* bytes has (an empty entry has none)."""
    return (size + BLOCK - 1) // BLOCK


class BlockTagger:
    """Tags for whole entries, built incrementally or at once, and checks of block ranges.

    Thread-safe (no mutable state besides the immutable key)."""

    __slots__ = ("_tag",)

    def __init__(self, key: bytes | None = None) -> None:
        self._tag = _keyed(key if key is not None else os.urandom(32))

    def tags(self, data: Buffer) -> bytes:
        """The concatenated tags of every block of *data* (a whole entry)."""
        view = memoryview(data)
        tag = self._tag
        return b"".join(tag(view[i : i + BLOCK]) for i in range(0, len(view), BLOCK))

    def check(self, tags: bytes, first_block: int, data: Buffer) -> int:
        """Compare the blocks of *data*, which starts at block *first_block* of an entry and
        ends at a block boundary or at the entry's end, with the entry's *tags*. Returns the
        index of the first block that differs, or -1 when all match."""
        view = memoryview(data)
        tag = self._tag
        at = first_block * TAG_SIZE
        block = first_block
        for i in range(0, len(view), BLOCK):
            if tag(view[i : i + BLOCK]) != tags[at : at + TAG_SIZE]:
                return block
            at += TAG_SIZE
            block += 1
        return -1

    def builder(self) -> TagBuilder:
        return TagBuilder(self._tag)


class TagBuilder:
    """Tags of an entry written piece by piece (any piece sizes): ``add`` each piece in order,
    then ``finish``. Holds at most one partial block."""

    __slots__ = ("_partial", "_parts", "_tag", "size")

    def __init__(self, tag: Callable[[Buffer], bytes]) -> None:
        self._tag = tag
        self._parts: list[bytes] = []
        self._partial = bytearray()
        self.size = 0

    def add(self, data: Buffer) -> None:
        view = memoryview(data)
        self.size += len(view)
        pos = 0
        if self._partial:
            take = min(BLOCK - len(self._partial), len(view))
            self._partial += view[:take]
            pos = take
            if len(self._partial) < BLOCK:
                return
            self._parts.append(self._tag(self._partial))
            self._partial = bytearray()
        tag = self._tag
        end = len(view)
        while end - pos >= BLOCK:
            self._parts.append(tag(view[pos : pos + BLOCK]))
            pos += BLOCK
        if pos < end:
            self._partial += view[pos:end]

    def finish(self) -> bytes:
        if self._partial:
            self._parts.append(self._tag(self._partial))
            self._partial = bytearray()
        return b"".join(self._parts)
