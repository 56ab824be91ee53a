"""Small pieces of the tar format shared by the eStargz reader and writer.

One reading of numeric header fields and of the header checksum, so that the TOC reader and the
converter agree on what a header says. The rules follow Go's ``archive/tar`` (the writer of
nearly every layer we meet): an octal field is digits ``0``-``7`` with NUL/space padding at
either end and nothing else (no sign, no ``_``, no NUL inside); a field whose first byte has the
high bit set is GNU base-256, a big-endian two's-complement number whose sign is bit 6 of that
first byte. Negative numbers exist only in base-256 and are refused unless the caller says the
field is signed (a modification time before 1970). The checksum field is octal only.
"""

from __future__ import annotations

from layerstore.errors import FormatError

_CHECKSUM_FIELD = slice(148, 156)
_OCTAL_DIGITS = frozenset(b"01234567")
_PADDING = b" \x00"


def _parse_octal(field: bytes, what: str, error: type[FormatError]) -> int:
    s = field.strip(_PADDING)
    if not s:
        return 0
    if not _OCTAL_DIGITS.issuperset(s):
        raise error(f"bad octal number {field!r} in tar header field {what}")
    return int(s, 8)


def parse_number(
    field: bytes, what: str, *, signed: bool = False, error: type[FormatError] = FormatError
) -> int:
    """The value of the numeric header field *field* (named *what* in errors): octal or GNU
    base-256. A negative value raises *error* unless *signed*; so does a malformed field."""
    if field[:1] and field[0] & 0x80:
        value = int.from_bytes(field, "big") & ~(1 << (8 * len(field) - 1))  # drop the marker
        if field[0] & 0x40:  # the sign bit: two's complement over the remaining bits
            value -= 1 << (8 * len(field) - 1)
            if not signed:
                raise error(f"negative number in tar header field {what}")
        return value
    return _parse_octal(field, what, error)


def parse_pax_int(
    value: bytes, what: str, *, signed: bool = False, error: type[FormatError] = FormatError
) -> int:
    """A decimal PAX record value (``size``, ``uid``, ``gid``): ASCII digits, with a leading
    ``-`` only where *signed*; anything else (spaces, ``+``, ``_``) raises *error*."""
    digits = value[1:] if signed and value[:1] == b"-" else value
    if not digits.isdigit():  # bytes: ASCII digits only; False when empty
        raise error(f"bad PAX {what}: {value[:40]!r}")
    return int(value)


def header_checksum_ok(block: bytes, *, error: type[FormatError] = FormatError) -> bool:
    """Whether the checksum field of the 512-byte header *block* matches its bytes (with the
    field itself counted as spaces), summed as unsigned bytes or, as some old tars did, as
    signed ones. A checksum field that is not octal raises *error*."""
    stored = _parse_octal(block[_CHECKSUM_FIELD], "chksum", error)
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored == unsigned:
        return True
    high = sum(1 for b in block[:148] if b & 0x80) + sum(1 for b in block[156:] if b & 0x80)
    return stored == unsigned - 256 * high


def parse_pax_records(data: bytes, *, error: type[FormatError] = FormatError) -> dict[bytes, bytes]:
    """The ``LENGTH KEY=VALUE\\n`` records of a PAX extended header (trailing NUL or newline
    padding tolerated). A malformed record raises *error*."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            if not data[pos:].strip(b"\0\n"):
                break
            raise error("malformed PAX header")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise error("malformed PAX record length") from None
        rec = data[sp + 1 : pos + length]
        if length <= sp - pos or pos + length > len(data) or not rec.endswith(b"\n"):
            raise error("malformed PAX record")
        key, eq, value = rec[:-1].partition(b"=")
        if not eq:
            raise error("PAX record without '='")
        records[key] = value
        pos += length
    return records
