"""Small pieces of the tar format shared by the eStargz reader and writer."""

from __future__ import annotations

from layerstore.errors import FormatError


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
