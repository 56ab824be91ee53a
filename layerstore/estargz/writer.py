"""tar (plain or gzip) -> eStargz blob, streaming.

Layout of what we write (see ``docs``/estargz-format notes):

* the source tar's entries, their header bytes copied as they were (PAX / GNU extension headers
  included), each regular file's payload starting a new gzip member, and large payloads split
  into ``chunk_size`` chunks, each in its own member;
* with ``prioritized_files``: those files (with their parent directories and hardlink targets)
  first, then ``.prefetch.landmark``; otherwise ``.no.prefetch.landmark`` first;
* the TOC tar entry ``stargz.index.json`` and the tar end-of-archive blocks in their own member;
* the 51-byte footer.

Decompressed, the blob is an ordinary tar. Members are compressed by a thread pool (zlib
releases the GIL) and written in order, with a bound on the bytes in flight; hashing (DiffID,
file and chunk digests, blob digest) happens on the calling thread. Output is deterministic:
gzip headers carry no name and mtime 0, and the order depends only on the input and options.

With ``min_chunk_size > 0`` small files are packed: a file smaller than it goes into the
current member (``innerOffset`` > 0) while that member is still smaller than it. This costs
readers that predate ``innerOffset`` their correctness, so it is off by default.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import io
import json
import os
import posixpath
import tempfile
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Protocol, Union

from layerstore.common.atomicfile import atomic_output
from layerstore.digest import sha256_digest
from layerstore.errors import FormatError, LayerStoreError, LimitExceededError
from layerstore.estargz.constants import (
    LANDMARK_CONTENT,
    MAX_TOC_JSON_SIZE,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    RESERVED_ROOT_NAMES,
    TOC_TAR_NAME,
)
from layerstore.estargz.footer import build_footer
from layerstore.estargz.tarfmt import (
    header_checksum_ok,
    parse_number,
    parse_pax_int,
    parse_pax_records,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC_TAR_NAME",
    "TarFormatError",
    "WriteResult",
    "WriterOptions",
    "clean_entry_name",
    "write_estargz",
    "write_estargz_file",
]

DEFAULT_CHUNK_SIZE = 4 << 20

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_MAX_EXTENSION_HEADER = 64 << 20  # PAX / GNU long-name payloads held in memory
_READ_PIECE = 1 << 20

Source = Union[str, "os.PathLike[str]", BinaryIO]
ProgressFn = Callable[[int], None]


class TarFormatError(FormatError):
    """The input is not a tar (or gzip of a tar) we can convert."""


@dataclass(frozen=True)
class WriterOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    prioritized_files: Sequence[str] = ()
    compression_level: int = 6
    min_chunk_size: int = 0  # > 0 enables small-file packing (innerOffset)
    workers: int = 0  # compression threads; 0 = os.cpu_count()
    max_inflight_bytes: int = 0  # uncompressed bytes queued for compression; 0 = automatic
    tmpdir: str | None = None  # where to spool a streamed input when reordering

    def validate(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if not 0 <= self.compression_level <= 9:
            raise ValueError("compression_level must be in 0..9")
        if self.min_chunk_size < 0:
            raise ValueError("min_chunk_size must not be negative")
        if self.workers < 0 or self.max_inflight_bytes < 0:
            raise ValueError("workers and max_inflight_bytes must not be negative")


@dataclass(frozen=True)
class WriteResult:
    blob_digest: str  # sha256 of the blob
    compressed_size: int  # blob size
    diff_id: str  # sha256 of the tar the blob decompresses to
    uncompressed_size: int  # size of that tar
    toc_digest: str  # sha256 of the TOC JSON
    toc_offset: int  # blob offset of the TOC member
    source_size: int  # bytes of the source as read (compressed if it was gzip)
    entries: int  # TOC entries written (chunks included)
    missed_prioritized: tuple[str, ...] = field(default=())
    prefetch_size: int = 0  # blob offset of the .prefetch.landmark entry (0: none written)


# --- names and small helpers -------------------------------------------------------------------


def clean_entry_name(name: str) -> str:
    """The canonical TOC form of a tar name: no leading ``/`` or ``./``, ``.``/``..`` resolved
    lexically (never above the root), no trailing slash. The root is ``""``."""
    p = posixpath.normpath("/" + name)
    return p.lstrip("/")


@functools.lru_cache(maxsize=4096)
def _rfc3339(mtime: int) -> str:
    if mtime == 0:
        return ""
    try:
        t = datetime.datetime.fromtimestamp(mtime, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return ""
    if t.year > 9999 or t.year < 1:
        return ""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _pad(n: int) -> int:
    return (-n) % _BLOCK


def _gzip_member(data: bytes | bytearray, level: int) -> bytes:
    """One gzip member: header without name, mtime 0 (wbits 31 gives exactly that)."""
    c = zlib.compressobj(level, zlib.DEFLATED, 31, 9)
    return c.compress(data) + c.flush()


def _ustar_header(name: str, size: int, mode: int = 0, typeflag: bytes = b"0") -> bytes:
    """A plain ustar header for our own entries (landmarks, TOC): owner 0:0, mtime 0."""
    bname = name.encode()
    if len(bname) > 100:
        raise ValueError("internal entry name too long")
    h = bytearray(_BLOCK)
    h[0 : len(bname)] = bname
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % 0
    h[116:124] = b"%07o\0" % 0
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % 0
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = b"%07o\0" % 0
    h[337:345] = b"%07o\0" % 0
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


# --- input: raw bytes, optional gunzip ---------------------------------------------------------


class _Readable(Protocol):
    def read(self, n: int) -> bytes: ...


class _Counting:
    """Reads the source, counting raw bytes (for progress), with a pushback for magic sniffing."""

    def __init__(self, f: BinaryIO, progress: ProgressFn | None) -> None:
        self._f = f
        self._pushback = b""
        self.count = 0
        self.progress = progress

    def read(self, n: int) -> bytes:
        if self._pushback:
            out, self._pushback = self._pushback[:n], self._pushback[n:]
            return out
        data = self._f.read(n)
        if data:
            self.count += len(data)
            if self.progress is not None:
                self.progress(self.count)
        return data

    def unread(self, data: bytes) -> None:
        self._pushback = data + self._pushback


class _Gunzip:
    """Streaming decompression of a (multi-member) gzip stream."""

    def __init__(self, raw: _Counting) -> None:
        self._raw = raw
        self._d = zlib.decompressobj(31)
        self._eof = False
        self._buf = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            try:
                self._buf = self._inflate(_READ_PIECE)
            except zlib.error as e:
                raise TarFormatError(f"corrupt gzip stream: {e}") from None
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def _inflate(self, n: int) -> bytes:
        """Up to *n* decompressed bytes (b"" at the end). Inflating in large pieces keeps the
        cost of zlib's unconsumed-tail copies linear."""
        while not self._eof:
            # eof first: when a member ends inside the input that an output limit left in
            # unconsumed_tail, zlib reports those bytes as unused_data too, and feeding the
            # tail to the finished object again would loop forever.
            if self._d.unconsumed_tail and not self._d.eof:
                out = self._d.decompress(self._d.unconsumed_tail, n)
            else:
                if self._d.eof:
                    rest = self._d.unused_data
                    if not rest:
                        rest = self._raw.read(_READ_PIECE)
                    if not rest:
                        self._eof = True
                        break
                    if rest[:1] == b"\0" and not rest.strip(b"\0"):
                        # zero padding after the last member: tolerated like gzip(1) does
                        self._drain_zeros()
                        self._eof = True
                        break
                    self._d = zlib.decompressobj(31)
                    data = rest
                else:
                    data = self._raw.read(_READ_PIECE)
                    if not data:
                        raise TarFormatError("gzip stream is truncated")
                out = self._d.decompress(data, n)
            if out:
                return out
        return b""

    def _drain_zeros(self) -> None:
        while True:
            data = self._raw.read(_READ_PIECE)
            if not data:
                return
            if data.strip(b"\0"):
                raise TarFormatError("garbage after the end of the gzip stream")


class _Stream:
    """A sequential byte stream with exact reads and a position."""

    def __init__(self, reader: _Readable) -> None:
        self._r = reader
        self.pos = 0

    def read_exact(self, n: int) -> bytes:
        data = self.read_upto(n)
        if len(data) != n:
            raise TarFormatError(f"tar stream ends early at byte {self.pos}")
        return data

    def read_upto(self, n: int) -> bytes:
        """Up to *n* bytes; fewer only at the end of the stream."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            piece = self._r.read(n - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, _READ_PIECE)
            self.read_exact(k)
            n -= k


# --- tar parsing -------------------------------------------------------------------------------


def _num(field_: bytes, what: str, *, signed: bool = False) -> int:
    return parse_number(field_, what, signed=signed, error=TarFormatError)


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _utf8(b: bytes, what: str) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise TarFormatError(f"tar {what} {b!r} is not valid UTF-8") from None


def _parse_pax(data: bytes) -> dict[str, bytes]:
    records = parse_pax_records(data, error=TarFormatError)
    return {_utf8(key, "PAX key"): value for key, value in records.items()}


def _pax_int(v: bytes, what: str) -> int:
    return parse_pax_int(v, what, error=TarFormatError)


def _pax_time(v: bytes) -> int:
    """Seconds, rounded to the nearest second (half away from zero)."""
    s = v.decode("ascii", "replace")
    neg = s.startswith("-")
    whole, _, frac = s.lstrip("-").partition(".")
    try:
        secs = int(whole or "0")
    except ValueError:
        raise TarFormatError(f"bad PAX mtime: {v!r}") from None
    if frac[:1] and frac[0] in "56789":
        secs += 1
    return -secs if neg else secs


_TYPES = {
    b"0": "reg",
    b"\0": "reg",
    b"7": "reg",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}


class _TarEntry:
    __slots__ = (
        "data_pos",
        "devmajor",
        "devminor",
        "gid",
        "gname",
        "linkname",
        "mode",
        "mtime",
        "name",
        "raw",
        "size",
        "type",
        "uid",
        "uname",
        "xattrs",
    )

    def __init__(self) -> None:
        self.raw = b""  # header block(s) as found in the input
        self.name = ""  # cleaned
        self.type = "reg"
        self.size = 0  # payload bytes following the header in the tar
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.uname = ""
        self.gname = ""
        self.mtime = 0
        self.linkname = ""
        self.devmajor = 0
        self.devminor = 0
        self.xattrs: dict[str, bytes] = {}
        self.data_pos = 0  # position of the payload in the (decompressed) input


class _TarParser:
    def __init__(self, stream: _Stream) -> None:
        self._s = stream
        self._global: dict[str, bytes] = {}
        self.done = False

    def next(self) -> _TarEntry | None:
        """The next entry (header consumed, payload not), or None at the end of the archive."""
        if self.done:
            return None
        raw: list[bytes] = []
        pax: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            blk = self._s.read_upto(_BLOCK)
            if not blk and not raw:
                self.done = True
                return None
            if len(blk) != _BLOCK:
                raise TarFormatError(f"tar stream ends inside a header at byte {self._s.pos}")
            if blk == _ZERO_BLOCK:
                if raw:
                    raise TarFormatError("tar extension header not followed by an entry")
                self.done = True
                return None
            if not header_checksum_ok(blk, error=TarFormatError):
                raise TarFormatError(f"bad tar header checksum at byte {self._s.pos - _BLOCK}")
            tflag = blk[156:157]
            size = _num(blk[124:136], "size")
            if tflag in (b"x", b"g", b"L", b"K"):
                if not 0 <= size <= _MAX_EXTENSION_HEADER:
                    raise TarFormatError(f"tar extension header of {size} bytes is too large")
                data = self._s.read_exact(size + _pad(size))
                raw.append(blk)
                raw.append(data)
                content = data[:size]
                if tflag == b"x":
                    pax.update(_parse_pax(content))
                elif tflag == b"g":
                    self._global.update(_parse_pax(content))
                elif tflag == b"L":
                    longname = _cstr(content)
                else:
                    longlink = _cstr(content)
                continue
            raw.append(blk)
            break
        if tflag not in _TYPES:
            raise TarFormatError(
                f"unsupported tar entry type {tflag!r} (sparse/multi-volume/GNU extensions)"
            )
        rec = dict(self._global)
        rec.update(pax)
        if any(k.startswith("GNU.sparse") for k in rec):
            raise TarFormatError("sparse files in the tar are not supported")
        e = _TarEntry()
        e.raw = b"".join(raw)
        magic = blk[257:263]
        if "path" in rec:
            name_b = rec["path"]
        elif longname is not None:
            name_b = longname
        else:
            name_b = _cstr(blk[0:100])
            prefix = _cstr(blk[345:500]) if magic == b"ustar\0" else b""
            if prefix:
                name_b = prefix + b"/" + name_b
        raw_name = _utf8(name_b, "name")
        if "linkpath" in rec:
            link_b = rec["linkpath"]
        elif longlink is not None:
            link_b = longlink
        else:
            link_b = _cstr(blk[157:257])
        e.linkname = _utf8(link_b, "link name")
        e.type = _TYPES[tflag]
        if tflag == b"\0" and raw_name.endswith("/"):
            e.type = "dir"
        e.size = _pax_int(rec["size"], "size") if "size" in rec else size
        e.mode = _num(blk[100:108], "mode") & 0o7777
        e.uid = _pax_int(rec["uid"], "uid") if "uid" in rec else _num(blk[108:116], "uid")
        e.gid = _pax_int(rec["gid"], "gid") if "gid" in rec else _num(blk[116:124], "gid")
        e.uname = _utf8(rec["uname"] if "uname" in rec else _cstr(blk[265:297]), "user name")
        e.gname = _utf8(rec["gname"] if "gname" in rec else _cstr(blk[297:329]), "group name")
        if "mtime" in rec:
            e.mtime = _pax_time(rec["mtime"])
        else:  # before 1970 in base-256
            e.mtime = _num(blk[136:148], "mtime", signed=True)
        if e.type in ("char", "block"):
            e.devmajor = _num(blk[329:337], "devmajor")
            e.devminor = _num(blk[337:345], "devminor")
        for k, v in rec.items():
            if k.startswith("SCHILY.xattr."):
                e.xattrs[k[len("SCHILY.xattr.") :]] = v
        e.name = clean_entry_name(raw_name)
        if e.type == "hardlink":
            e.linkname = clean_entry_name(e.linkname)
        e.data_pos = self._s.pos
        return e


# --- the TOC -----------------------------------------------------------------------------------


class _TocRecord:
    """A TOC entry whose blob offset is known only once its member has been compressed."""

    __slots__ = ("chunk_offset", "chunk_size", "d", "inner", "segment")

    def __init__(self, d: dict[str, object]) -> None:
        self.d = d
        self.segment = -1
        self.inner = 0
        self.chunk_offset = 0
        self.chunk_size = 0


def _toc_head(e: _TarEntry) -> dict[str, object]:
    name = e.name + "/" if e.type == "dir" and e.name else e.name
    d: dict[str, object] = {"name": name, "type": e.type}
    if e.type == "reg" and e.size:
        d["size"] = e.size
    mt = _rfc3339(e.mtime)
    if mt:
        d["modtime"] = mt
    if e.linkname and e.type in ("hardlink", "symlink"):
        d["linkName"] = e.linkname
    if e.mode:
        d["mode"] = e.mode
    if e.uid:
        d["uid"] = e.uid
    if e.gid:
        d["gid"] = e.gid
    if e.uname:
        d["userName"] = e.uname
    if e.gname:
        d["groupName"] = e.gname
    return d


def _toc_tail(d: dict[str, object], e: _TarEntry) -> None:
    """Fields that come after ``offset`` in the Go writer's field order."""
    if e.type in ("char", "block"):
        if e.devmajor:
            d["devMajor"] = e.devmajor
        if e.devminor:
            d["devMinor"] = e.devminor
    if e.xattrs:
        d["xattrs"] = {k: base64.b64encode(v).decode("ascii") for k, v in sorted(e.xattrs.items())}


def _finish_toc(records: list[_TocRecord], seg_offsets: list[int]) -> bytes:
    entries: list[dict[str, object]] = []
    for r in records:
        d = r.d
        if r.segment >= 0:
            out: dict[str, object] = {}
            placed = False
            for k, v in d.items():
                if not placed and k in ("devMajor", "devMinor", "xattrs", "digest", "chunkDigest"):
                    out["offset"] = seg_offsets[r.segment]
                    placed = True
                if k == "chunkDigest":
                    if r.chunk_offset:
                        out["chunkOffset"] = r.chunk_offset
                    if r.chunk_size:
                        out["chunkSize"] = r.chunk_size
                out[k] = v
            if not placed:
                out["offset"] = seg_offsets[r.segment]
            if r.inner:
                out["innerOffset"] = r.inner
            d = out
        entries.append(d)
    toc = {"version": 1, "entries": entries}
    # Compact (the C encoder; indentation would use the pure-Python one): readers only parse it.
    return json.dumps(toc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- the blob builder --------------------------------------------------------------------------


class _BlobBuilder:
    """Accumulates the uncompressed tar into segments (one gzip member each), compresses them in
    a thread pool and writes them in order."""

    def __init__(self, dst: BinaryIO, level: int, workers: int, max_inflight: int) -> None:
        self._dst = dst
        self._level = level
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz-gzip")
        self._pending: deque[tuple[Future[bytes], int]] = deque()  # (member, input size)
        self._inflight = 0
        self._max_inflight = max_inflight
        self.cur = bytearray()
        self.segment = 0  # index of the segment ``cur`` will become
        self.seg_offsets: list[int] = []
        self.written = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.usize = 0

    def cut(self) -> None:
        """End the current member (no-op when it is empty)."""
        if not self.cur:
            return
        data = self.cur  # handed over as is: never mutated again
        self.cur = bytearray()
        self.segment += 1
        self.diff_hash.update(data)
        self.usize += len(data)
        fut = self._pool.submit(_gzip_member, data, self._level)
        self._pending.append((fut, len(data)))
        self._inflight += len(data)
        while self._inflight > self._max_inflight and self._pending:
            self._drain_one()

    def _drain_one(self) -> None:
        fut, n = self._pending.popleft()
        member = fut.result()
        self._write(member)
        self.seg_offsets.append(self.written - len(member))
        self._inflight -= n

    def _write(self, data: bytes) -> None:
        self._dst.write(data)
        self.blob_hash.update(data)
        self.written += len(data)

    def drain(self) -> None:
        self.cut()
        while self._pending:
            self._drain_one()

    def write_tail(self, uncompressed: bytes, raw_tail: bytes) -> int:
        """Write one final member of *uncompressed* (after draining) and *raw_tail* as is;
        return the offset of that member."""
        self.drain()
        offset = self.written
        self.diff_hash.update(uncompressed)
        self.usize += len(uncompressed)
        self._write(_gzip_member(uncompressed, self._level))
        self._write(raw_tail)
        return offset

    def close(self) -> None:
        for fut, _ in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


# --- ordering ----------------------------------------------------------------------------------


def _order(
    entries: list[_TarEntry], prioritized: Sequence[str]
) -> tuple[list[_TarEntry], list[_TarEntry], list[str]]:
    """Split entries into (prioritized first, rest) following the Go writer's rule: each
    prioritized file is preceded by its parent directories and, for a hardlink, its target."""
    by_name: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_name.setdefault(e.name, []).append(i)
    taken = [False] * len(entries)
    first: list[_TarEntry] = []
    missed: list[str] = []

    def move(name: str, depth: int) -> bool:
        if depth > 4096:
            return False
        idx = by_name.get(name)
        if name and idx is None:
            return False
        if name:
            move(posixpath.dirname(name), depth + 1)
        for i in idx or ():
            if taken[i]:
                continue
            e = entries[i]
            if e.type == "hardlink" and e.linkname != name:
                move(e.linkname, depth + 1)
            if not taken[i]:
                taken[i] = True
                first.append(e)
        return True

    for p in prioritized:
        if not move(clean_entry_name(p), 0):
            missed.append(p)
    rest = [e for i, e in enumerate(entries) if not taken[i]]
    return first, rest, missed


# --- the writer --------------------------------------------------------------------------------


class _Writer:
    def __init__(self, b: _BlobBuilder, opts: WriterOptions) -> None:
        self.b = b
        self.opts = opts
        self.records: list[_TocRecord] = []
        self.prefetch_landmark: _TocRecord | None = None

    def _boundary(self) -> None:
        # Between entries: keep header-only runs from growing into huge members.
        if len(self.b.cur) >= self.opts.chunk_size:
            self.b.cut()

    def add_landmark(self, name: str) -> None:
        self._boundary()
        b = self.b
        b.cur += _ustar_header(name, len(LANDMARK_CONTENT))
        b.cut()
        digest = sha256_digest(LANDMARK_CONTENT)
        r = _TocRecord({"name": name, "type": "reg", "size": 1, "digest": digest})
        if name == PREFETCH_LANDMARK:
            self.prefetch_landmark = r
        r.d["chunkDigest"] = digest
        r.segment = b.segment
        self.records.append(r)
        b.cur += LANDMARK_CONTENT + bytes(_pad(1))

    def add(self, e: _TarEntry, read: Callable[[int], bytes]) -> None:
        """Append entry *e*; *read(n)* returns the next n payload bytes of it."""
        self._boundary()
        b = self.b
        b.cur += e.raw
        if e.type != "reg":
            if e.size:  # data on a non-regular entry: copied through, not indexed
                self._copy(e.size, read)
            d = _toc_head(e)
            _toc_tail(d, e)
            if e.name or e.type != "dir":
                self.records.append(_TocRecord(d))
            return
        if e.size == 0:
            d = _toc_head(e)
            _toc_tail(d, e)
            d["digest"] = sha256_digest(b"")
            self.records.append(_TocRecord(d))
            return
        opts = self.opts
        chunk = opts.chunk_size
        file_hash = hashlib.sha256()
        first: _TocRecord | None = None
        done = 0
        while done < e.size:
            n = min(chunk, e.size - done)
            pack = (
                done == 0
                and e.size < opts.min_chunk_size
                and len(b.cur) < opts.min_chunk_size + len(e.raw)
            )
            if not pack:
                b.cut()
            data = read(n)
            if len(data) != n:
                raise TarFormatError(f"tar stream ends inside {e.name!r}")
            if first is None:
                d = _toc_head(e)
                _toc_tail(d, e)
                r = _TocRecord(d)
                first = r
            else:
                r = _TocRecord({"name": e.name, "type": "chunk"})
            r.segment = b.segment
            r.inner = len(b.cur)
            r.chunk_offset = done
            r.chunk_size = n if e.size > chunk else 0
            if e.size > chunk:
                r.d["chunkDigest"] = sha256_digest(data)
            self.records.append(r)
            file_hash.update(data)
            b.cur += data
            done += n
        assert first is not None
        whole = "sha256:" + file_hash.hexdigest()
        # "digest" precedes "chunkDigest" in the Go field order
        cd = first.d.pop("chunkDigest", whole)
        first.d["digest"] = whole
        first.d["chunkDigest"] = cd
        # last chunk: size 0 means "to the end of the file", like the Go writer
        if e.size > chunk:
            self.records[-1].chunk_size = 0
        b.cur += bytes(_pad(e.size))

    def _copy(self, size: int, read: Callable[[int], bytes]) -> None:
        left = size
        while left:
            n = min(left, _READ_PIECE)
            data = read(n)
            if len(data) != n:
                raise TarFormatError("tar stream ends inside an entry")
            self.b.cur += data
            left -= n
        self.b.cur += bytes(_pad(size))


def _open_source(src: Source) -> tuple[BinaryIO, bool]:
    if isinstance(src, (str, os.PathLike)):
        try:
            return open(src, "rb"), True
        except OSError as e:
            raise LayerStoreError(f"cannot open {os.fspath(src)!r}: {e.strerror}") from None
    return src, False


def _plain_file_position(f: BinaryIO) -> int | None:
    """The current offset of *f* when it is a regular file usable with pread, else None."""
    try:
        if not f.seekable():
            return None
        import stat

        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.tell()
    except (OSError, io.UnsupportedOperation, AttributeError, ValueError):
        return None


def write_estargz(
    src: Source,
    dst: BinaryIO,
    options: WriterOptions | None = None,
    progress: ProgressFn | None = None,
) -> WriteResult:
    """Convert the tar (or gzip-compressed tar) *src* to an eStargz blob written to *dst*.

    *progress*, if given, is called with the number of source bytes read so far.
    Raises :class:`TarFormatError` for input that is not a convertible tar.
    """
    opts = options or WriterOptions()
    opts.validate()
    f, owned = _open_source(src)
    try:
        return _write(f, dst, opts, progress)
    finally:
        if owned:
            f.close()


def _write(
    f: BinaryIO, dst: BinaryIO, opts: WriterOptions, progress: ProgressFn | None
) -> WriteResult:
    start_pos = _plain_file_position(f)
    counting = _Counting(f, progress)
    magic = counting.read(2)
    counting.unread(magic)
    gz = magic == b"\x1f\x8b"
    reader: _Readable = _Gunzip(counting) if gz else counting
    workers = opts.workers or os.cpu_count() or 1
    max_inflight = opts.max_inflight_bytes or max(16 << 20, (workers + 2) * opts.chunk_size)
    b = _BlobBuilder(dst, opts.compression_level, workers, max_inflight)
    w = _Writer(b, opts)
    missed: list[str] = []
    try:
        if not opts.prioritized_files:
            w.add_landmark(NO_PREFETCH_LANDMARK)
            stream = _Stream(reader)
            parser = _TarParser(stream)
            while True:
                e = parser.next()
                if e is None:
                    break
                if e.name in RESERVED_ROOT_NAMES:
                    stream.skip(e.size + _pad(e.size))
                    continue
                w.add(e, stream.read_exact)
                stream.skip(_pad(e.size))
            # read what follows the end of the archive: checks a gzip input's CRC to its end
            while stream.read_upto(_READ_PIECE):
                pass
        else:
            start = start_pos if not gz else None
            missed = _write_reordered(f, start, reader, counting, w, opts)
        b.cut()
        b.drain()
        toc_json = _finish_toc(w.records, b.seg_offsets)
        landmark = w.prefetch_landmark
        prefetch_size = b.seg_offsets[landmark.segment] if landmark is not None else 0
        if len(toc_json) > MAX_TOC_JSON_SIZE:
            raise LimitExceededError(
                f"the TOC would be {len(toc_json)} bytes; "
                f"readers refuse more than {MAX_TOC_JSON_SIZE}"
            )
        toc_digest = sha256_digest(toc_json)
        tail = (
            _ustar_header(TOC_TAR_NAME, len(toc_json))
            + toc_json
            + bytes(_pad(len(toc_json)))
            + bytes(2 * _BLOCK)
        )
        toc_offset = b.written
        footer = build_footer(toc_offset)
        assert b.write_tail(tail, footer) == toc_offset
    finally:
        b.close()
    return WriteResult(
        blob_digest="sha256:" + b.blob_hash.hexdigest(),
        compressed_size=b.written,
        diff_id="sha256:" + b.diff_hash.hexdigest(),
        uncompressed_size=b.usize,
        toc_digest=toc_digest,
        toc_offset=toc_offset,
        source_size=counting.count,
        entries=len(w.records) + 1,
        missed_prioritized=tuple(missed),
        prefetch_size=prefetch_size,
    )


class _PReader:
    """Sequential reads of a file descriptor from a position, with ``os.pread``."""

    def __init__(self, fd: int, pos: int) -> None:
        self._fd = fd
        self.pos = pos

    def read(self, n: int) -> bytes:
        data = os.pread(self._fd, n, self.pos)
        self.pos += len(data)
        return data


def _write_reordered(
    f: BinaryIO,
    start: int | None,
    reader: _Readable,
    counting: _Counting,
    w: _Writer,
    opts: WriterOptions,
) -> list[str]:
    """Prioritized files need random access: index the tar (spooling a streamed or gzip input
    to a temporary file first), then write the entries in the new order."""
    spool: BinaryIO | None = None
    try:
        if start is not None:
            fd, base = f.fileno(), start
        else:
            spool = tempfile.TemporaryFile(dir=opts.tmpdir)  # noqa: SIM115 - closed below
            while True:
                piece = reader.read(_READ_PIECE)
                if not piece:
                    break
                spool.write(piece)
            spool.flush()
            fd, base = spool.fileno(), 0
        pr = _PReader(fd, base)
        stream = _Stream(pr)
        parser = _TarParser(stream)
        entries: list[_TarEntry] = []
        while True:
            e = parser.next()
            if e is None:
                break
            skip = e.size + _pad(e.size)
            stream.pos += skip
            pr.pos += skip
            if e.name not in RESERVED_ROOT_NAMES:
                entries.append(e)
        if spool is None:
            counting.count = stream.pos
            if counting.progress is not None:
                counting.progress(counting.count)
        first, rest, missed = _order(entries, opts.prioritized_files)
        for e in first:
            w.add(e, _PReader(fd, base + e.data_pos).read)
        w.add_landmark(PREFETCH_LANDMARK)
        if not first:  # an empty region: nothing worth announcing
            w.prefetch_landmark = None
        for e in rest:
            w.add(e, _PReader(fd, base + e.data_pos).read)
        return missed
    finally:
        if spool is not None:
            spool.close()


def write_estargz_file(
    src: Source,
    dst_path: str | os.PathLike[str],
    options: WriterOptions | None = None,
    progress: ProgressFn | None = None,
) -> WriteResult:
    """:func:`write_estargz` into *dst_path*, atomically and durably (temporary file, fsync,
    rename, fsync of the directory)."""
    with atomic_output(os.path.abspath(dst_path), durable=True, prefix=".estargz-") as out:
        return write_estargz(src, out, options, progress)


def iter_members(blob: bytes) -> Iterator[tuple[int, int]]:
    """(offset, compressed length) of every gzip member of *blob* (for tests and tools)."""
    off = 0
    while off < len(blob):
        d = zlib.decompressobj(31)
        try:
            d.decompress(blob[off:])
        except zlib.error as e:
            raise FormatError(f"corrupt gzip member at {off}: {e}") from None
        used = len(blob) - off - len(d.unused_data)
        yield off, used
        off += used
