"""Open an eStargz (or legacy stargz) blob: footer -> TOC -> digest check -> TOCIndex.

Reading a layer costs two ranged reads: the tail (footer, and the TOC too when the tail hint is
large enough) and ``[toc_offset, blob_size - footer_size)``. The TOC member is a gzip member
holding a tar header and ``stargz.index.json``; it is inflated with an output cap
(``max_toc_size`` plus a little tar overhead) so that a gzip bomb cannot exhaust memory, and the
compressed region itself is bounded before it is fetched.

File data is verified chunk by chunk: :func:`decode_chunk` inflates ``[offset,
compressed_end)``, skips ``inner_offset`` and checks sha256 against ``chunkDigest``; bytes that
fail are never returned. :func:`decode_chunk_into` does the same in bounded memory, handing
pieces to a sink, which must discard them when the call raises (the chunk cache streams large
chunks into a temporary file that way).
"""

from __future__ import annotations

import hashlib
import re
import stat
from collections.abc import Iterator, Sequence
from typing import Callable

from layerstore.digest import sha256_digest
from layerstore.errors import (
    ChunkDigestMismatchError,
    FormatError,
    LimitExceededError,
    NotEStargzError,
    TOCDigestMismatchError,
)
from layerstore.estargz.constants import (
    ESTARGZ_FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    MAX_TOC_JSON_SIZE,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
)
from layerstore.estargz.footer import parse_footer
from layerstore.estargz.inflate import ERRORS as INFLATE_ERRORS
from layerstore.estargz.inflate import gunzip_object
from layerstore.estargz.tarfmt import (
    header_checksum_ok,
    parse_number,
    parse_pax_int,
    parse_pax_records,
)
from layerstore.estargz.toc import DEFAULT_MAX_ENTRIES, Chunk, TOCIndex
from layerstore.source import RangeSource

DEFAULT_MAX_TOC_SIZE = MAX_TOC_JSON_SIZE
"""Cap on the TOC JSON (containers/storage uses the same 150 MiB)."""

TOC_TAR_OVERHEAD = 64 * 1024
"""Decompressed bytes allowed in the TOC member besides the JSON (tar headers, padding, end)."""

DEFAULT_TAIL_FETCH = 64 * 1024
"""First read from the end of a blob: the footer, and often the whole TOC member."""

_SKIP_PIECE = 1 << 20
_INFLATE_PIECE = 16 << 20

DECODE_PIECE = 1 << 20
"""Largest piece :func:`decode_chunk_into` hands to its sink."""


def tail_fetch_size(blob_size: int, hint: int = DEFAULT_TAIL_FETCH) -> int:
    """How many bytes to read first from the end of a blob of *blob_size* bytes.

    At least the 51-byte footer (or the whole blob when smaller); a larger *hint* often brings
    the TOC member in the same request (see :meth:`EStargzReader.open`).
    """
    return max(0, min(blob_size, max(hint, ESTARGZ_FOOTER_SIZE)))


def max_toc_member_size(max_toc_size: int = DEFAULT_MAX_TOC_SIZE) -> int:
    """Largest compressed TOC region accepted (stored deflate blocks cost ~0.01 %)."""
    return max_toc_size + max_toc_size // 64 + TOC_TAR_OVERHEAD


def toc_region(
    blob_size: int, toc_offset: int, footer_size: int, max_toc_size: int = DEFAULT_MAX_TOC_SIZE
) -> tuple[int, int]:
    """``(offset, length)`` of the TOC member, validated against the blob and the size cap."""
    end = blob_size - footer_size
    if not 0 <= toc_offset < end:
        raise FormatError(
            f"footer points at TOC offset {toc_offset}, outside the blob of {blob_size} bytes"
        )
    length = end - toc_offset
    if length > max_toc_member_size(max_toc_size):
        raise LimitExceededError(
            f"TOC member of {length} bytes exceeds the limit for a {max_toc_size}-byte TOC"
        )
    return toc_offset, length


def inflate_toc_member(member: bytes, max_toc_size: int = DEFAULT_MAX_TOC_SIZE) -> bytes:
    """Gunzip the TOC member (one or more gzip members), refusing output beyond the cap."""
    return bytes(_inflate_toc_member(member, max_toc_size))


def _inflate_toc_member(member: bytes, max_toc_size: int) -> bytearray:
    cap = max_toc_size + TOC_TAR_OVERHEAD
    result = bytearray()
    total = 0
    data: bytes | memoryview = memoryview(member)
    if not member:
        raise FormatError("empty TOC member")
    try:
        while True:
            d = gunzip_object()
            buf = data
            while True:
                limit = min(cap + 1 - total, _INFLATE_PIECE)  # bounded transient copies
                out = d.decompress(buf, limit)
                got = len(out)
                total += got
                if total > cap:
                    raise LimitExceededError(
                        f"TOC member inflates to more than {cap} bytes (limit {max_toc_size})"
                    )
                result += out
                del out
                if d.eof:
                    break
                buf = d.unconsumed_tail
                if not buf and got < limit:  # input used up and nothing pending
                    raise FormatError("TOC gzip member is truncated")
            if not d.unused_data:
                break
            data = d.unused_data
    except INFLATE_ERRORS as exc:
        raise FormatError(f"TOC member is not valid gzip: {exc}") from None
    return result


_LANDMARK_NAME = re.compile(
    rb'"name"\s*:\s*"(?:\./)?' + re.escape(PREFETCH_LANDMARK.encode()) + rb'"'
)
_OFFSET_FIELD = re.compile(rb'"offset"\s*:\s*(\d{1,15})\b')


def landmark_offset_hint(member: bytes, max_json: int = 4 * 1024 * 1024) -> int | None:
    """The blob offset of the ``.prefetch.landmark`` entry, read from the first bytes of a TOC
    member (gzip of the TOC tar) before the TOC is verified and parsed: inflated piece by
    piece until the entry's JSON object is in, at most *max_json* bytes. The entry follows the
    prioritized files, so for a region of a few hundred files it is found in the first tens
    of KB. None when not found or odd. A hint only (the head start's length): nothing read
    with it is trusted before the verified TOC's chunk digests check it."""
    d = gunzip_object()
    seen = bytearray()
    buf: bytes | memoryview = memoryview(member)
    name = None
    try:
        while len(seen) < max_json:
            piece = d.decompress(buf, 64 * 1024)
            buf = d.unconsumed_tail
            if not piece:
                return None
            start = max(0, len(seen) - 256)
            seen += piece
            if name is None:
                name = _LANDMARK_NAME.search(seen, start)
            if name is not None:
                lo = seen.rfind(b"{", 0, name.start())
                hi = seen.find(b"}", name.end())
                if lo >= 0 and hi >= 0:
                    field = _OFFSET_FIELD.search(seen, lo, hi)
                    return int(field.group(1)) if field else None
            if d.eof:
                return None
    except INFLATE_ERRORS:
        return None
    return None


def _check_tar_header(hdr: bytes) -> int:
    """Check a TOC member tar header's checksum; return its size field."""
    try:
        if not header_checksum_ok(hdr):
            raise FormatError("TOC tar header checksum mismatch")
        return parse_number(hdr[124:136], "size")
    except FormatError as e:
        raise FormatError(f"{e} in the TOC member") from None


def _parse_pax(payload: bytes) -> dict[str, str]:
    try:
        records = parse_pax_records(payload)
    except FormatError as e:
        raise FormatError(f"{e} in the TOC member") from None
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in records.items()}


def extract_toc_json(tar: bytes, max_toc_size: int = DEFAULT_MAX_TOC_SIZE) -> bytes:
    """The content of the ``stargz.index.json`` tar entry at the start of *tar*."""
    start, end = _toc_json_span(tar, max_toc_size)
    return bytes(tar[start:end])


def _toc_json_span(tar: bytes | bytearray, max_toc_size: int) -> tuple[int, int]:
    pos = 0
    override_name: str | None = None
    override_size: int | None = None
    while True:
        hdr = bytes(tar[pos : pos + 512])
        if len(hdr) < 512 or hdr == bytes(512):
            raise FormatError(f"the TOC member has no {TOC_TAR_NAME} tar entry")
        header_size = _check_tar_header(hdr)
        size = header_size if override_size is None else override_size
        typeflag = hdr[156:157]
        body = pos + 512
        if typeflag in (b"x", b"g", b"L"):
            if size > TOC_TAR_OVERHEAD or body + size > len(tar):
                raise FormatError("oversized or truncated extended header in the TOC member")
            payload = bytes(tar[body : body + size])
            if typeflag == b"x":
                pax = _parse_pax(payload)
                if "path" in pax:
                    override_name = pax["path"]
                if "size" in pax:
                    try:
                        override_size = parse_pax_int(pax["size"].encode(), "size")
                    except FormatError as e:
                        raise FormatError(f"{e} in the TOC member") from None
            elif typeflag == b"L":
                override_name = payload.split(b"\x00", 1)[0].decode("utf-8", "replace")
            pos = body + (size + 511) // 512 * 512
            continue
        if override_name is not None:
            name = override_name
        else:
            raw = hdr[:100].split(b"\x00", 1)[0]
            if hdr[257:262] == b"ustar":
                prefix = hdr[345:500].split(b"\x00", 1)[0]
                if prefix:
                    raw = prefix + b"/" + raw
            name = raw.decode("utf-8", "replace")
        if name != TOC_TAR_NAME:
            raise FormatError(f"the TOC member holds {name[:100]!r}, not {TOC_TAR_NAME}")
        if typeflag not in (b"0", b"\x00", b"7"):
            raise FormatError(f"{TOC_TAR_NAME} is not a regular file in the TOC member")
        if size > max_toc_size:
            raise LimitExceededError(f"TOC of {size} bytes exceeds the limit of {max_toc_size}")
        if body + size > len(tar):
            raise FormatError(f"{TOC_TAR_NAME} is truncated in the TOC member")
        return body, body + size


def _inflate_chunk(compressed: bytes | memoryview, chunk: Chunk, piece: int) -> Iterator[bytes]:
    """The chunk's bytes (not yet verified) in pieces of at most *piece* bytes: inflate
    *compressed* (the blob bytes from ``chunk.offset``, possibly several gzip members), skip
    ``chunk.inner_offset``, stop after ``chunk.chunk_size`` bytes. Never inflates more than
    that, whatever the compressed bytes hold."""
    skip = chunk.inner_offset
    need = chunk.chunk_size
    buf = memoryview(compressed)
    have = 0
    pos = 0
    try:
        while have < need:
            if pos >= len(buf):
                raise FormatError(
                    f"chunk at {chunk.offset} inflates to {have} of {need} bytes "
                    f"(after skipping {chunk.inner_offset - skip}): data ends early"
                )
            d = gunzip_object()
            data: bytes | memoryview = buf[pos:]
            while True:
                if skip:  # the inner offset is inflated and dropped in bounded pieces
                    limit = min(skip, _SKIP_PIECE)
                    out = d.decompress(data, limit)
                    skip -= len(out)
                else:
                    limit = min(need - have, piece)
                    out = d.decompress(data, limit)
                    if out:
                        have += len(out)
                        yield out
                if have >= need or d.eof:
                    break
                data = d.unconsumed_tail
                if not data and len(out) < limit:  # input used up and nothing pending
                    raise FormatError(f"chunk at {chunk.offset}: gzip member is truncated")
            if have >= need:
                break
            pos = len(buf) - len(d.unused_data)
    except INFLATE_ERRORS as exc:
        raise FormatError(f"chunk at {chunk.offset} is not valid gzip: {exc}") from None


def _check_chunk_digest(got: str, chunk: Chunk) -> None:
    if got != chunk.digest:
        raise ChunkDigestMismatchError(
            f"chunk at blob offset {chunk.offset} (file offset {chunk.chunk_offset}): "
            f"digest {got} != {chunk.digest}"
        )


def decode_chunk(compressed: bytes | memoryview, chunk: Chunk) -> bytes:
    """Inflate *compressed* (the blob bytes from ``chunk.offset``, possibly several gzip
    members), skip ``chunk.inner_offset``, take ``chunk.chunk_size`` bytes and verify them.

    Holds the whole chunk in memory (twice while joining pieces of several gzip members): for
    chunks of ordinary size; large ones go through :func:`decode_chunk_into`.
    Raises :class:`ChunkDigestMismatchError` when the sha256 differs from ``chunk.digest`` and
    :class:`FormatError` when the data is not gzip or ends early. Pure and thread-safe.
    """
    parts = list(_inflate_chunk(compressed, chunk, max(chunk.chunk_size, 1)))
    out_bytes = parts[0] if len(parts) == 1 else b"".join(parts)
    _check_chunk_digest(sha256_digest(out_bytes), chunk)
    return out_bytes


def decode_chunk_into(
    compressed: bytes | memoryview,
    chunk: Chunk,
    sink: Callable[[bytes], object],
    piece: int = DECODE_PIECE,
) -> None:
    """:func:`decode_chunk` in bounded memory: each piece of at most *piece* decompressed bytes
    is handed to *sink* as soon as it is inflated, and the sha256 is computed on the way.

    The pieces are NOT verified when *sink* gets them: only a normal return says that all of
    them, in order, have ``chunk.digest``. When this raises (:class:`ChunkDigestMismatchError`,
    :class:`FormatError`, or whatever *sink* raised), the caller must discard everything the
    sink received (the chunk cache writes them to a temporary file that it then removes).
    """
    h = hashlib.sha256()
    for out in _inflate_chunk(compressed, chunk, max(1, piece)):
        h.update(out)
        sink(out)
    _check_chunk_digest("sha256:" + h.hexdigest(), chunk)


class EStargzReader:
    """A verified TOC of one blob plus chunk reads through its :class:`RangeSource`."""

    __slots__ = ("blob_size", "footer_size", "index", "source", "toc_digest", "toc_offset")

    def __init__(
        self,
        source: RangeSource,
        index: TOCIndex,
        *,
        toc_digest: str,
        toc_offset: int,
        footer_size: int,
        blob_size: int,
    ) -> None:
        self.source = source
        self.index = index
        self.toc_digest = toc_digest
        self.toc_offset = toc_offset
        self.footer_size = footer_size
        self.blob_size = blob_size

    @property
    def legacy(self) -> bool:
        """True for a legacy (CRFS) stargz footer."""
        return self.footer_size == LEGACY_FOOTER_SIZE

    @classmethod
    def open(
        cls,
        source: RangeSource,
        *,
        expected_toc_digest: str | None = None,
        max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        tail_hint: int = DEFAULT_TAIL_FETCH,
    ) -> EStargzReader:
        """Read the footer and the TOC (at most two reads), verify and index it.

        Raises :class:`NotEStargzError` for a blob without footer, :class:`FormatError` /
        :class:`TOCError` / :class:`LimitExceededError` for malformed or oversized TOCs and
        :class:`TOCDigestMismatchError` when *expected_toc_digest* does not match.
        """
        size = source.size()
        if size < LEGACY_FOOTER_SIZE:
            raise NotEStargzError(f"blob of {size} bytes is too small for an eStargz footer")
        n = tail_fetch_size(size, tail_hint)
        tail_start = size - n
        tail = source.read_at(tail_start, n)
        toc_offset, footer_size = parse_footer(tail)
        off, length = toc_region(size, toc_offset, footer_size, max_toc_size)
        if off >= tail_start:
            member = tail[off - tail_start : off - tail_start + length]
        else:
            member = source.read_at(off, length)
        del tail
        return cls.from_toc_bytes(
            source,
            member,
            toc_offset,
            footer_size,
            expected_toc_digest=expected_toc_digest,
            max_toc_size=max_toc_size,
            max_entries=max_entries,
        )

    @classmethod
    def from_toc_bytes(
        cls,
        source: RangeSource,
        toc_member_bytes: bytes,
        toc_offset: int,
        footer_size: int,
        expected_toc_digest: str | None = None,
        *,
        max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> EStargzReader:
        """Build a reader from the already fetched ``[toc_offset, size - footer_size)`` bytes."""
        size = source.size()
        _, length = toc_region(size, toc_offset, footer_size, max_toc_size)
        if len(toc_member_bytes) != length:
            raise FormatError(
                f"TOC member is {len(toc_member_bytes)} bytes, expected {length} "
                f"(blob {size}, TOC offset {toc_offset}, footer {footer_size})"
            )
        # peak memory ~ compressed member + inflated member + the decoded entries
        toc_json = _inflate_toc_member(toc_member_bytes, max_toc_size)
        start, end = _toc_json_span(toc_json, max_toc_size)
        # the JSON alone, in place: a bytearray drops its head without copying
        del toc_json[end:]
        del toc_json[:start]
        toc_digest = sha256_digest(toc_json)
        if expected_toc_digest is not None and toc_digest != expected_toc_digest:
            raise TOCDigestMismatchError(
                f"TOC digest {toc_digest} != expected {expected_toc_digest}"
            )
        index = TOCIndex.from_json(toc_json, toc_offset=toc_offset, max_entries=max_entries)
        del toc_json
        return cls(
            source,
            index,
            toc_digest=toc_digest,
            toc_offset=toc_offset,
            footer_size=footer_size,
            blob_size=size,
        )

    # --- data ---------------------------------------------------------------------------
    def read_chunk(self, chunk: Chunk) -> bytes:
        """One verified chunk (one ``read_at`` of ``[offset, compressed_end)``)."""
        return decode_chunk(
            self.source.read_at(chunk.offset, chunk.compressed_end - chunk.offset), chunk
        )

    def read_chunks(self, chunks: Sequence[Chunk]) -> list[bytes]:
        """Several verified chunks fetched with one ``read_ranges`` call."""
        datas = self.source.read_ranges([(c.offset, c.compressed_end - c.offset) for c in chunks])
        return [decode_chunk(d, c) for d, c in zip(datas, chunks)]

    def read_inode(self, ino: int) -> bytes:
        """The whole content of a regular-file inode, every chunk verified."""
        attr = self.index.getattr(ino)
        if not stat.S_ISREG(attr.mode):
            raise ValueError(f"inode {ino} is not a regular file")
        chunks = self.index.chunks(ino)
        data = b"".join(self.read_chunks(chunks)) if chunks else b""
        if len(data) != attr.size:
            raise FormatError(f"inode {ino}: read {len(data)} bytes, expected {attr.size}")
        return data

    def read_file(self, path: str) -> bytes:
        """The whole content of the regular file at overlay-view *path*."""
        ino = self.index.find(path)
        if ino is None:
            raise FileNotFoundError(path)
        return self.read_inode(ino)
