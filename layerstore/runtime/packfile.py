"""Pack files of the chunk cache: many verified chunks in one file, with their block tags and
an authenticated index, so that a restarted daemon can trust the tags without re-hashing.

Why packs: a cold read of a small file fetches a few hundred neighbouring small chunks
(read-ahead, read-behind), and creating one file per chunk costs 1-1.7 ms on ext4 (mkstemp,
write, rename): the cache's writers, not the network, bounded small-file reads to ~25 files/s.
The cache now writes the chunks it has pending as one file.

Layout (integers little-endian)::

    chunk bytes, concatenated                          data_size bytes
    index: count x (sha256 32 | offset 8 | size 8)     offsets relative to the file's start
    tags: each chunk's block tags, in index order      16 bytes per 64 KiB block of a chunk
    trailer (64 bytes): magic 8 | version 2 | tag algorithm 2 | count 4 | data_size 8 |
                        tags_size 8 | mac 32

The MAC is keyed BLAKE2b-256 over the trailer's fields (without the MAC), the index and the
tags. Its key and the tags' key are derived from one 32-byte key kept in a file only root can
read (``load_key``). A pack is written to a temporary file and renamed into place when
complete; one whose tail does not parse or whose MAC does not match is not used (the cache
removes it). The MAC says "this index and these tags were written by a daemon holding the
key, from bytes it had verified"; the tags then check every block read from the data region,
so bytes altered after the pack was written are still caught on every read
(``docs/ARCHITECTURE.md``, "Cached chunks").
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layerstore.runtime.blocktags import ALGORITHM, TAG_SIZE, blocks

MAGIC = b"SGZPACK\x00"
VERSION = 1
HEAD = struct.Struct("<8sHHIQQ")  # the trailer without its MAC
MAC_SIZE = 32
TRAILER_SIZE = HEAD.size + MAC_SIZE
INDEX_ENTRY = struct.Struct("<32sQQ")
KEY_SIZE = 32
# Which block-tag hash wrote a pack: a daemon that has another cannot check its tags.
ALGORITHMS = {"blake3-keyed": 1, "blake2b-keyed": 2}
MAX_INDEX = 1 << 20  # entries in one pack (the writer stays far below)


class PackError(Exception):
    """A pack file that cannot be used (the message says why)."""


@dataclass(frozen=True)
class PackKeys:
    """The keys derived from the cache's key: block tags, and the MAC of pack indexes."""

    tags: bytes
    mac: bytes

    @classmethod
    def derive(cls, key: bytes) -> PackKeys:
        def sub(label: bytes) -> bytes:
            return hashlib.blake2b(label, key=key, digest_size=32, person=b"stargz-cache").digest()

        return cls(tags=sub(b"block tags v1"), mac=sub(b"pack index mac v1"))


@dataclass(frozen=True)
class PackEntry:
    hexd: str
    offset: int
    size: int
    tags: bytes


@dataclass(frozen=True)
class PackIndex:
    entries: list[PackEntry]
    data_size: int
    file_size: int


def _mac(keys: PackKeys, head: bytes, index: bytes, tags: bytes) -> bytes:
    h = hashlib.blake2b(key=keys.mac, digest_size=32, person=b"stargz-pack-idx")
    h.update(head)
    h.update(index)
    h.update(tags)
    return h.digest()


def _head(count: int, data_size: int, tags_size: int) -> bytes:
    return HEAD.pack(MAGIC, VERSION, ALGORITHMS[ALGORITHM], count, data_size, tags_size)


def encode_tail(keys: PackKeys, entries: Sequence[PackEntry], data_size: int) -> bytes:
    """Index, tags and trailer to append after *data_size* bytes of chunk data."""
    index = b"".join(INDEX_ENTRY.pack(bytes.fromhex(e.hexd), e.offset, e.size) for e in entries)
    tags = b"".join(e.tags for e in entries)
    head = _head(len(entries), data_size, len(tags))
    return index + tags + head + _mac(keys, head, index, tags)


def read_tail(fd: int, keys: PackKeys) -> PackIndex:
    """The authenticated index of the pack open at *fd*; :class:`PackError` when it is
    incomplete, malformed, written with another key or another tag algorithm."""
    try:
        size = os.fstat(fd).st_size
        if size < TRAILER_SIZE:
            raise PackError("shorter than a pack trailer")
        raw = os.pread(fd, TRAILER_SIZE, size - TRAILER_SIZE)
    except OSError as e:
        raise PackError(f"unreadable: {e.strerror}") from None
    if len(raw) != TRAILER_SIZE:
        raise PackError("short read of the trailer")
    head, mac = raw[: HEAD.size], raw[HEAD.size :]
    magic, version, algorithm, count, data_size, tags_size = HEAD.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise PackError("not a pack of this version")
    if algorithm != ALGORITHMS[ALGORITHM]:
        raise PackError("written with another block-tag algorithm")
    index_size = count * INDEX_ENTRY.size
    if count > MAX_INDEX or data_size + index_size + tags_size + TRAILER_SIZE != size:
        raise PackError("sizes in the trailer do not match the file")
    try:
        body = os.pread(fd, index_size + tags_size, data_size)
    except OSError as e:
        raise PackError(f"unreadable: {e.strerror}") from None
    if len(body) != index_size + tags_size:
        raise PackError("short read of the index")
    index, tags = body[:index_size], body[index_size:]
    if not hmac.compare_digest(mac, _mac(keys, head, index, tags)):
        raise PackError("index MAC does not match (another key, or altered)")
    entries: list[PackEntry] = []
    at = 0
    for i in range(count):
        digest, offset, length = INDEX_ENTRY.unpack_from(index, i * INDEX_ENTRY.size)
        n = blocks(length) * TAG_SIZE
        if offset + length > data_size or at + n > tags_size:
            raise PackError("index entry outside the pack")  # only with a leaked key
        entries.append(PackEntry(digest.hex(), offset, length, tags[at : at + n]))
        at += n
    if at != tags_size:
        raise PackError("tags do not match the index")
    return PackIndex(entries, data_size, size)


def read_index(path: str | os.PathLike[str], keys: PackKeys) -> PackIndex:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise PackError(f"cannot open: {e.strerror}") from None
    try:
        return read_tail(fd, keys)
    finally:
        os.close(fd)


# --- the key ------------------------------------------------------------------------------------


class KeyFileError(Exception):
    """No key file can be written (the message says why)."""


def _read_key(path: Path) -> bytes | None:
    """The key in *path* if the file is one we can trust: a regular file of ours that neither
    group nor others may access, holding exactly 32 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        key = os.read(fd, KEY_SIZE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & 0o077
        and len(key) == KEY_SIZE
    ):
        return key
    return None


def load_key(path: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """The cache's key from *path*, created (32 random bytes, mode 0600, fsynced) when missing
    or not trustworthy. Returns ``(key, created)``; with a new key, packs written before do
    not authenticate and are dropped.

    A key file that is not a regular file of ours, that group or others may access, or that
    does not hold exactly 32 bytes is replaced: whoever could read it could forge packs.
    Raises :class:`KeyFileError` when no key can be written (the caller then keeps one in
    memory only)."""
    p = Path(path)
    key = _read_key(p)
    if key is not None:
        return key, False
    key = os.urandom(KEY_SIZE)
    tmp = p.with_name(f".tmp-{p.name}.{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise KeyFileError(f"cannot write the cache key {p}: {e.strerror}") from None
    return key, True
