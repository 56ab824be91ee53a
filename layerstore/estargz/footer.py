"""eStargz and legacy stargz footers.

The footer is a gzip member with an empty payload whose header carries the TOC offset in an
"extra" field. eStargz (51 bytes): subfield id ``SG``, 22 data bytes ``%016x`` + ``STARGZ``.
Legacy stargz (47 bytes): the extra field is the bare 22 bytes ``%016x`` + ``STARGZ``.
"""

from __future__ import annotations

import struct

from layerstore.errors import NotEStargzError
from layerstore.estargz.constants import ESTARGZ_FOOTER_SIZE, LEGACY_FOOTER_SIZE

__all__ = [
    "ESTARGZ_FOOTER_SIZE",
    "LEGACY_FOOTER_SIZE",
    "MAGIC",
    "build_footer",
    "build_legacy_footer",
    "parse_footer",
]

MAGIC = b"STARGZ"

# gzip header: magic, CM=deflate, FLG=FEXTRA, MTIME=0, XFL=0, OS=255 (unknown)
_GZIP_HEADER = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
# an empty final stored deflate block, then CRC32=0 and ISIZE=0
_EMPTY_BODY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


def _payload(toc_offset: int) -> bytes:
    if not 0 <= toc_offset < 1 << 64:
        raise ValueError(f"TOC offset {toc_offset} out of range")
    return b"%016x" % toc_offset + MAGIC


def build_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at *toc_offset*."""
    payload = _payload(toc_offset)
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    return _GZIP_HEADER + struct.pack("<H", len(extra)) + extra + _EMPTY_BODY


def build_legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte legacy stargz footer (for tests of the legacy reader path)."""
    payload = _payload(toc_offset)
    return _GZIP_HEADER + struct.pack("<H", len(payload)) + payload + _EMPTY_BODY


def _parse_payload(payload: bytes) -> int:
    if len(payload) != 22 or payload[16:] != MAGIC:
        raise NotEStargzError("footer has no STARGZ magic")
    hexpart = payload[:16]
    if not all(c in b"0123456789abcdefABCDEF" for c in hexpart):
        raise NotEStargzError("footer TOC offset is not hexadecimal")
    return int(hexpart, 16)


def parse_footer(tail: bytes) -> tuple[int, int]:
    """Parse the last bytes of a blob (at least 47, ideally 51).

    Returns ``(toc_offset, footer_size)``. Tries the 51-byte eStargz footer first, then the
    47-byte legacy one. Raises :class:`NotEStargzError` when neither is present.
    """
    if len(tail) >= ESTARGZ_FOOTER_SIZE:
        f = tail[-ESTARGZ_FOOTER_SIZE:]
        if (
            f[:10] == _GZIP_HEADER
            and f[10:12] == struct.pack("<H", 26)
            and f[12:14] == b"SG"
            and f[14:16] == struct.pack("<H", 22)
            and f[-13:] == _EMPTY_BODY
        ):
            return _parse_payload(f[16:38]), ESTARGZ_FOOTER_SIZE
    if len(tail) >= LEGACY_FOOTER_SIZE:
        f = tail[-LEGACY_FOOTER_SIZE:]
        if f[:10] == _GZIP_HEADER and f[10:12] == struct.pack("<H", 22) and f[-13:] == _EMPTY_BODY:
            return _parse_payload(f[12:34]), LEGACY_FOOTER_SIZE
    raise NotEStargzError("no eStargz or stargz footer: not an eStargz layer")
