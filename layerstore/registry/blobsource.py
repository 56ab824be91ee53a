"""Lazy ranged reads of one registry blob: :class:`BlobSource`, a
:class:`layerstore.source.RangeSource`.

Owns: the Range and multi-range requests for a blob, checking every answer against what was
asked (the ``Content-Range`` and ``multipart/byteranges`` parsers, lengths, the blob's size),
coalescing ranges, batching them ``max_ranges_per_request`` at a time, learning per host
whether multi-range requests work, and reusing the signed storage URL a registry redirected to.
Each ``read_at``/``read_ranges`` call runs in one budget scope sized by the bytes it asks for
(``request_deadline + bytes / min_bytes_per_second``): whatever requests it takes (a
multi-range fallback, a re-resolved signed URL, a token), they end by that deadline.

Uses only the public parts of :class:`~layerstore.registry.client.RegistryClient` and
:mod:`.transport`.
"""

from __future__ import annotations

import email.message
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Union

import requests
import structlog

from layerstore.common.redact import redact_url
from layerstore.errors import FormatError, RangeError
from layerstore.registry import deadline as _deadline
from layerstore.registry.transport import Endpoint, drain, raise_for_status, stream

if TYPE_CHECKING:
    from layerstore.registry.client import RegistryClient

log = structlog.get_logger(__name__)

PARALLEL_SPANS = 4
"""Requests in flight for one ``read_ranges`` call when each range needs its own request."""
ROUND_TRIP_WINDOW = 16
"""Requests whose header times :meth:`BlobSource.round_trip` takes the shortest of."""

_MULTIPART_OVERHEAD_PER_PART = 1024
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_PART_RANGE_RE = re.compile(
    rb"^content-range:[ \t]*bytes[ \t]+(\d+)-(\d+)/(\d+|\*)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE
)

RangeProgress = Callable[[int, Union[bytearray, memoryview]], None]
"""``progress(offset, data)``: blob bytes ``[offset, offset + len(data))`` have arrived."""


class BlobSource:
    """Ranged reads of one registry blob (a :class:`layerstore.source.RangeSource`).

    The redirect target (signed storage URL) is remembered and reused; a 401/403 from it
    re-resolves through the registry once. Thread-safe.
    """

    def __init__(self, client: RegistryClient, ep: Endpoint, digest: str, size: int) -> None:
        self._client = client
        self._transport = client.transport
        self._ep = ep
        self.digest = digest
        self._size = size
        self._lock = threading.Lock()
        self._signed_url: str | None = None
        self._path = f"blobs/{digest}"
        # seconds from sending each of the last requests to its response headers
        self._header_times: deque[float] = deque(maxlen=ROUND_TRIP_WINDOW)

    def __repr__(self) -> str:
        return f"BlobSource({self._ep.describe()}@{self.digest}, size={self._size})"

    @property
    def registry_host(self) -> str:
        return self._ep.host

    def size(self) -> int:
        return self._size

    def round_trip(self) -> float | None:
        """The shortest time to the response headers over the last ``ROUND_TRIP_WINDOW``
        requests for this blob (redirects included): what a miss costs before any byte, with
        the least waiting for this process's other threads. None before the first request."""
        with self._lock:
            return min(self._header_times) if self._header_times else None

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise FormatError(
                f"range {offset}+{length} is outside blob {self.digest} of {self._size} bytes"
            )

    def _open(self, headers: Mapping[str, str]) -> requests.Response:
        t0 = time.monotonic()
        resp = self._open_timed(headers)
        with self._lock:
            self._header_times.append(time.monotonic() - t0)
        return resp

    def _open_timed(self, headers: Mapping[str, str]) -> requests.Response:
        ep = self._ep
        with self._lock:
            signed = self._signed_url
        if signed is not None:
            resp = self._transport.send("GET", signed, ep, headers=headers)
            if resp.status_code not in (401, 403):
                return resp
            drain(resp)
            log.info("registry_signed_url_refused", host=ep.host, to=redact_url(signed))
            with self._lock:
                if self._signed_url == signed:
                    self._signed_url = None
        resp, url, redirected = self._client.get_following(ep, self._path, headers)
        if redirected and 200 <= resp.status_code < 300:
            with self._lock:
                self._signed_url = url
        return resp

    def read_at(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        with self._transport.budget(length):
            return self._read_at(offset, length)

    def read_at_progressive(
        self, offset: int, length: int, progress: Callable[[bytearray], None]
    ) -> bytes:
        """:meth:`read_at`, calling *progress* with the body received so far after each piece
        (the same growing buffer, not to be kept or changed; a retried request starts a new
        one): a caller can use the first bytes of a long range before the last arrive."""
        self._check(offset, length)
        if length == 0:
            return b""
        with self._transport.budget(length):
            return self._read_at(offset, length, progress)

    def _read_at(
        self, offset: int, length: int, progress: Callable[[bytearray], None] | None = None
    ) -> bytes:
        end = offset + length - 1
        resp = self._open({"Range": f"bytes={offset}-{end}"})
        try:
            if resp.status_code == 206:
                start, last, total = parse_content_range(resp.headers.get("Content-Range"))
                if (start, last) != (offset, end) or (total is not None and total != self._size):
                    raise RangeError(
                        f"blob {self.digest} on {self._ep.host}: asked bytes {offset}-{end}/"
                        f"{self._size}, got Content-Range {resp.headers.get('Content-Range')!r}"
                    )
                return read_exact(resp, length, self._ep, self.digest, progress)
            if resp.status_code == 200:
                if offset == 0 and length == self._size:
                    return read_exact(resp, length, self._ep, self.digest, progress)
                raise RangeError(
                    f"registry {self._ep.host} ignored the Range header for blob {self.digest}",
                    status=200,
                )
            raise_for_status(resp, self._ep, f"range of blob {self.digest}")
            raise RangeError(
                f"blob {self.digest} on {self._ep.host}: unexpected HTTP {resp.status_code} "
                "to a range request",
                status=resp.status_code,
            )
        finally:
            resp.close()

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        for off, ln in ranges:
            self._check(off, ln)
        spans = _coalesce(ranges)
        with self._transport.budget(sum(n for _, n in spans)):
            fetched = self._read_spans(spans)
        return [_slice(fetched, spans, off, ln) for off, ln in ranges]

    def read_ranges_progressive(
        self, ranges: Sequence[tuple[int, int]], progress: RangeProgress
    ) -> list[bytes]:
        """:meth:`read_ranges`, calling ``progress(offset, data)`` as the answer arrives:
        *data* holds the blob bytes ``[offset, offset + len(data))`` received so far of one
        span (or one part of a multi-range answer), growing from call to call; it is valid
        during the call only (copy what is kept). Calls come from this thread only; a span
        that needs a request of its own while others run in parallel (a registry without
        multi-range answers) is reported only by the return value. A caller that delivers
        bytes early must still check them: the whole answer is validated when it is in."""
        for off, ln in ranges:
            self._check(off, ln)
        spans = _coalesce(ranges)
        with self._transport.budget(sum(n for _, n in spans)):
            fetched = self._read_spans(spans, progress)
        return [_slice(fetched, spans, off, ln) for off, ln in ranges]

    def _read_spans(
        self, spans: list[tuple[int, int]], progress: RangeProgress | None = None
    ) -> dict[int, bytes]:
        st = self._transport.host_state(self._ep.host)
        fetched: dict[int, bytes] = {}
        limit = max(1, self._client.settings.max_ranges_per_request)
        with st.lock:
            multi = st.multirange
        if len(spans) == 1 and progress is not None:
            fetched[spans[0][0]] = self._read_one(spans[0], progress)
        elif len(spans) <= 1 or multi is False:
            fetched.update(self._read_each(spans))
        else:
            for i in range(0, len(spans), limit):
                batch = spans[i : i + limit]
                if len(batch) == 1:
                    fetched[batch[0][0]] = self._read_one(batch[0], progress)
                    continue
                got = self._read_multi(batch, progress)
                if got is None:
                    fetched.update(self._read_each(spans[i:]))
                    break
                fetched.update(got)
        return fetched

    def _read_one(self, span: tuple[int, int], progress: RangeProgress | None) -> bytes:
        off, ln = span
        if progress is None:
            return self.read_at(off, ln)
        return self.read_at_progressive(off, ln, lambda buf: progress(off, buf))

    def _read_each(self, spans: list[tuple[int, int]]) -> dict[int, bytes]:
        """Each span in a request of its own (the registry answers no multi-range request):
        several at a time, as each costs a round trip, within the caller's deadline."""
        if len(spans) <= 1:
            return {off: self.read_at(off, ln) for off, ln in spans}
        outer = _deadline.current()

        def one(span: tuple[int, int]) -> tuple[int, bytes]:
            off, ln = span
            if outer is None:
                return off, self.read_at(off, ln)
            with _deadline.budget(outer.remaining()):
                return off, self.read_at(off, ln)

        workers = min(PARALLEL_SPANS, len(spans))
        name = threading.current_thread().name
        with ThreadPoolExecutor(workers, thread_name_prefix=f"{name}-span") as pool:
            return dict(pool.map(one, spans))

    def _read_multi(
        self, spans: list[tuple[int, int]], progress: RangeProgress | None = None
    ) -> dict[int, bytes] | None:
        """One multi-range request; None when the registry refused or ignored it. *progress*:
        as for :meth:`read_ranges_progressive`."""
        st = self._transport.host_state(self._ep.host)
        header = "bytes=" + ",".join(f"{o}-{o + n - 1}" for o, n in spans)
        resp = self._open({"Range": header})
        try:
            if resp.status_code in (200, 400, 416):
                with st.lock:
                    st.multirange = False
                log.info(
                    "registry_multirange_unsupported",
                    host=self._ep.host,
                    status=resp.status_code,
                )
                return None
            if resp.status_code != 206:
                raise_for_status(resp, self._ep, f"ranges of blob {self.digest}")
                raise RangeError(
                    f"blob {self.digest} on {self._ep.host}: unexpected HTTP "
                    f"{resp.status_code} to a multi-range request",
                    status=resp.status_code,
                )
            ctype = resp.headers.get("Content-Type", "")
            wanted = sum(n for _, n in spans)
            if ctype.lower().startswith("multipart/byteranges"):
                msg = email.message.Message()
                msg["Content-Type"] = ctype
                boundary = msg.get_param("boundary")
                cap = wanted + _MULTIPART_OVERHEAD_PER_PART * len(spans) + 4096
                bound = boundary if isinstance(boundary, str) else ""
                follow = None if progress is None else PartProgress(bound, self._size, progress)
                body = read_upto(
                    resp, cap, self._ep, self.digest, None if follow is None else follow.feed
                )
                parts = parse_byteranges(body, bound, self._size)
            else:
                start, last, total = parse_content_range(resp.headers.get("Content-Range"))
                if total is not None and total != self._size:
                    raise RangeError(
                        f"blob {self.digest} on {self._ep.host}: Content-Range total {total}, "
                        f"blob size {self._size}"
                    )
                whole = None if progress is None else (lambda buf: progress(start, buf))
                parts = [(start, read_exact(resp, last - start + 1, self._ep, self.digest, whole))]
        finally:
            resp.close()
        with st.lock:
            st.multirange = True
        out: dict[int, bytes] = {}
        for off, ln in spans:
            for start, data in parts:
                if start <= off and off + ln <= start + len(data):
                    out[off] = data[off - start : off - start + ln]
                    break
            else:
                raise RangeError(
                    f"blob {self.digest} on {self._ep.host}: the multi-range answer lacks "
                    f"bytes {off}-{off + ln - 1}"
                )
        return out


# --- reading and checking range answers ---------------------------------------------------------
def read_exact(
    resp: requests.Response,
    length: int,
    ep: Endpoint,
    digest: str,
    progress: Callable[[bytearray], None] | None = None,
) -> bytes:
    """Exactly *length* body bytes of a range of blob *digest*, else RangeError. *progress*:
    as for :meth:`BlobSource.read_at_progressive`."""
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) != length:
        raise RangeError(
            f"blob {digest} on {ep.host}: Content-Length {declared} for a {length} byte range"
        )
    data = read_upto(resp, length, ep, digest, progress)
    if len(data) != length:
        raise RangeError(f"blob {digest} on {ep.host}: short body, {len(data)} of {length} bytes")
    return data


def read_upto(
    resp: requests.Response,
    limit: int,
    ep: Endpoint,
    digest: str,
    progress: Callable[[bytearray], None] | None = None,
) -> bytes:
    """At most *limit* body bytes of blob *digest*; a longer body is a RangeError."""
    out = bytearray()
    for piece in stream(resp, ep):
        out += piece
        if len(out) > limit:
            raise RangeError(
                f"blob {digest} on {ep.host}: body longer than the {limit} bytes asked"
            )
        if progress is not None:
            progress(out)
    return bytes(out)


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """``bytes A-B/TOTAL`` -> (A, B, TOTAL or None for ``*``); RangeError when malformed."""
    m = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if not m:
        raise RangeError("missing or malformed Content-Range in a range response")
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total):
        raise RangeError(f"inconsistent Content-Range {value!r}")
    return start, end, total


class PartProgress:
    """Follows a ``multipart/byteranges`` body while it arrives (:meth:`feed`, with the whole
    body so far) and reports each part's data received so far: ``progress(start, view)``,
    *view* a memoryview of the body released after the call. Lenient: anything it does not
    expect stops the reports (the complete body is parsed strictly by
    :func:`parse_byteranges` all the same). Parts are reported only when their Content-Range
    lies inside the blob."""

    _HEADERS_MAX = 8192

    def __init__(self, boundary: str, blob_size: int, progress: RangeProgress) -> None:
        self._delim = b"--" + boundary.encode("latin-1")
        self._size = blob_size
        self._progress = progress
        self._pos = 0  # where the next part's delimiter is looked for
        self._part: tuple[int, int, int] | None = None  # blob start, data start, data end
        self._seen = 0  # body bytes of the current part reported
        self._stopped = not boundary

    def feed(self, body: bytearray) -> None:
        while not self._stopped:
            if self._part is None and not self._next_part(body):
                return
            assert self._part is not None
            start, lo, hi = self._part
            have = min(len(body), hi)
            if have > self._seen:
                self._seen = have
                view = memoryview(body)[lo:have]
                try:
                    self._progress(start, view)
                finally:
                    view.release()
            if have < hi:
                return
            self._pos = hi
            self._part = None

    def _next_part(self, body: bytearray) -> bool:
        at = body.find(self._delim, self._pos)
        if at < 0:
            return False
        head = at + len(self._delim)
        if len(body) < head + 2:
            return False
        if body[head : head + 2] == b"--":  # the closing delimiter
            self._stopped = True
            return False
        end = body.find(b"\r\n\r\n", head)
        if end < 0:
            self._stopped = len(body) - head > self._HEADERS_MAX
            return False
        m = _PART_RANGE_RE.search(bytes(body[head:end]))
        if m is None:
            self._stopped = True
            return False
        start, last = int(m.group(1)), int(m.group(2))
        total = None if m.group(3) == b"*" else int(m.group(3))
        if last < start or last >= self._size or total not in (None, self._size):
            self._stopped = True
            return False
        lo = end + 4
        self._part = (start, lo, lo + last - start + 1)
        self._seen = lo
        return True


def parse_byteranges(body: bytes, boundary: str, blob_size: int) -> list[tuple[int, bytes]]:
    """Parse a ``multipart/byteranges`` body into ``(start, data)`` parts.

    Each part's length comes from its Content-Range, so binary data that happens to contain the
    boundary cannot confuse the parser.
    """
    if not boundary:
        raise RangeError("multipart/byteranges answer without a boundary")
    delim = b"--" + boundary.encode("latin-1")
    pos = body.find(delim)
    if pos < 0:
        raise RangeError("multipart/byteranges answer without a boundary line")
    parts: list[tuple[int, bytes]] = []
    while True:
        pos += len(delim)
        if body.startswith(b"--", pos):
            break
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise RangeError("malformed multipart boundary line")
        pos = eol + 2
        hdr_end = body.find(b"\r\n\r\n", pos)
        if hdr_end < 0:
            raise RangeError("multipart part without a header block")
        headers: dict[str, str] = {}
        for line in body[pos:hdr_end].split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                raise RangeError("malformed multipart part header")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        start, end, total = parse_content_range(headers.get("content-range"))
        if total is not None and total != blob_size:
            raise RangeError(f"Content-Range total {total} differs from the blob size {blob_size}")
        data_start = hdr_end + 4
        data_end = data_start + (end - start + 1)
        if data_end > len(body):
            raise RangeError("multipart part is shorter than its Content-Range")
        parts.append((start, body[data_start:data_end]))
        pos = data_end
        if not body.startswith(b"\r\n" + delim, pos):
            raise RangeError("multipart part is longer than its Content-Range")
        pos += 2
    if not parts:
        raise RangeError("multipart/byteranges answer without parts")
    return parts


def _coalesce(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged ``(offset, length)`` spans covering every non-empty range."""
    spans = sorted((o, o + n) for o, n in ranges if n > 0)
    merged: list[list[int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e - s) for s, e in merged]


def _slice(
    fetched: Mapping[int, bytes], spans: Sequence[tuple[int, int]], off: int, ln: int
) -> bytes:
    if ln == 0:
        return b""
    for s, n in spans:
        if s <= off and off + ln <= s + n:
            data = fetched[s]
            return data[off - s : off - s + ln]
    raise AssertionError("range not covered by its spans")  # pragma: no cover


__all__ = [
    "BlobSource",
    "PartProgress",
    "RangeProgress",
    "parse_byteranges",
    "parse_content_range",
    "read_exact",
    "read_upto",
]
