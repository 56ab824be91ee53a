"""RFC 3339 times (TOC ``modtime``, token ``issued_at``) without ``datetime.fromisoformat``'s
version differences: any number of fractional digits, ``Z`` or a numeric offset."""

from __future__ import annotations

import datetime
import re

_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:[Zz]|([+-])(\d\d):(\d\d))\Z"
)
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_I64 = (1 << 63) - 1


def parse_rfc3339_ns(s: str) -> int:
    """RFC 3339 time -> nanoseconds since the epoch, clamped to the int64 range.
    Raises ValueError for anything else (including a missing zone)."""
    m = _RFC3339.match(s)
    if m is None:
        raise ValueError(f"{s[:60]!r} is not an RFC 3339 time")
    y, mo, d, h, mi, sec = (int(m.group(i)) for i in range(1, 7))
    try:
        day = datetime.date(y, mo, d).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise ValueError(f"{s[:60]!r} is not a valid date") from None
    if h > 23 or mi > 59 or sec > 60:
        raise ValueError(f"{s[:60]!r} is not a valid time")
    secs = day * 86400 + h * 3600 + mi * 60 + sec
    if m.group(8) is not None:
        off = int(m.group(9)) * 3600 + int(m.group(10)) * 60
        secs += -off if m.group(8) == "+" else off
    frac = m.group(7)
    ns = secs * 1_000_000_000 + (int(frac[:9].ljust(9, "0")) if frac else 0)
    return max(-_I64 - 1, min(_I64, ns))


def parse_rfc3339(s: str) -> float:
    """RFC 3339 time -> seconds since the epoch (float). Raises ValueError."""
    return parse_rfc3339_ns(s.strip()) / 1e9
