"""eStargz TOC JSON -> a compact, immutable :class:`TOCIndex` and its overlay view.

The TOC (``{"version": 1, "entries": [...]}``) is parsed one entry at a time (the ``entries``
array is scanned element by element, so the whole document never exists as Python objects) into
parallel ``array.array`` columns: one row per TOC record (every entry except ``chunk``), one row
per chunk, one row per inode of the overlay view. Strings kept are the path components (shared
with the directory dictionaries), symlink targets, user/group names (interned) and the paths of
directories. Chunk digests are kept as 32 raw bytes; a whole-file ``digest`` only where it
differs from the file's first chunk digest. Measured (benchmarks/toc_index_bench.py): a
56,810-entry TOC (19 MiB JSON) becomes a 16 MiB index.

Hardlinks are resolved after the last entry (as the Go reader does), by the name's final
occupant; a ``chunk``'s ``compressed_end`` is the next distinct member offset in the whole TOC.

Validation (a TOC failing any rule raises :class:`~layerstore.errors.TOCError`):

* names are cleaned like the Go reader (``./x``, ``/x``, ``x//y`` and a trailing ``/`` -> ``x``,
  ``x/y``); a ``..`` component, a NUL, an empty name, text that is not valid Unicode, a component
  over 255 bytes or a path over 4096 bytes (:class:`LimitExceededError`) is refused. Only a
  directory may clean to the root;
* unknown ``type`` values, wrongly typed fields, negative sizes/ids are refused;
* ``chunk`` entries must directly follow their ``reg`` entry (same name) with contiguous
  ``chunkOffset`` values, and the chunks of a file must cover exactly ``size`` bytes;
* every chunk has an ``offset`` inside ``[0, toc_offset)`` and a ``chunkDigest`` (a legacy
  single-chunk file may instead rely on ``digest``): nothing is ever served unverified;
* hardlink targets must exist (chains are resolved) and must not be directories;
* more than ``max_entries`` entries raises :class:`LimitExceededError` while scanning, and so
  does a chunk larger than ``MAX_CHUNK_SIZE`` (256 MiB; chunks are inflated whole).

The overlay view (what ``diff/`` serves): inodes are numbered 1..N in TOC order (root is 1,
implied directories take the number of the point where they are first needed, whiteouts come
last), so numbers are stable across runs for the same TOC. ``D/.wh.NAME`` shows as ``D/NAME``, a
character device 0/0 with mode ``S_IFCHR`` (a real ``NAME`` wins); ``D/.wh..wh..opq`` is hidden
and ``D`` answers the opaque xattrs; other ``.wh..wh.*`` (aufs metadata) is hidden; the root's
``.prefetch.landmark``, ``.no.prefetch.landmark`` and ``stargz.index.json`` regular files are
hidden; hardlinks share one inode; a later entry with the same name replaces the earlier one
(directory over directory updates the attributes and keeps the children).

The index is immutable after construction and safe to share between threads.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
import json
import re
import stat
from array import array
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, overload

from layerstore.errors import LimitExceededError, TOCError

DEFAULT_MAX_ENTRIES = 1_000_000
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_HARDLINK_CHAIN = 256
MAX_CHUNK_SIZE = 256 << 20
"""A chunk is inflated into memory whole; the Go writer's default is 4 MiB."""

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_HIDDEN_AT_ROOT = frozenset((PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME))

_I64 = (1 << 63) - 1
_U32 = (1 << 32) - 1

# type codes (records and inodes); _WHITEOUT exists only in the overlay view
_DIR, _REG, _SYMLINK, _HARDLINK, _CHAR, _BLOCK, _FIFO, _CHUNK, _WHITEOUT = range(1, 10)
_TYPE_CODES = {
    "dir": _DIR,
    "reg": _REG,
    "symlink": _SYMLINK,
    "hardlink": _HARDLINK,
    "char": _CHAR,
    "block": _BLOCK,
    "fifo": _FIFO,
    "chunk": _CHUNK,
}
_TYPE_NAMES = {v: k for k, v in _TYPE_CODES.items()}
_IFMT = {
    _DIR: stat.S_IFDIR,
    _REG: stat.S_IFREG,
    _SYMLINK: stat.S_IFLNK,
    _CHAR: stat.S_IFCHR,
    _BLOCK: stat.S_IFBLK,
    _FIFO: stat.S_IFIFO,
    _WHITEOUT: stat.S_IFCHR,
}


class Chunk(NamedTuple):
    """One verifiable piece of a regular file.

    ``offset`` is the blob offset of the gzip member holding it, ``compressed_end`` the next
    distinct member offset of the TOC (or the TOC offset): ``[offset, compressed_end)`` is the
    byte range to fetch. Decompress it, skip ``inner_offset`` bytes, take ``chunk_size`` bytes
    (already resolved, never 0 for a chunk that exists); their sha256 is ``digest``. The bytes
    are the file's ``[chunk_offset, chunk_offset + chunk_size)``.
    """

    offset: int
    compressed_end: int
    chunk_offset: int
    chunk_size: int
    inner_offset: int
    digest: str


class EntryAttr(NamedTuple):
    """Attributes of one inode of the overlay view (``mode`` is a full ``st_mode``)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime_ns: int


class TOCEntry(NamedTuple):
    """A TOC entry as parsed (names cleaned: no leading ``./`` or trailing ``/``; root is "")."""

    name: str
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] | None = None
    digest: str = ""
    user_name: str = ""
    group_name: str = ""
    offset: int | None = None
    chunk_offset: int = 0
    chunk_size: int = 0
    inner_offset: int = 0
    chunk_digest: str = ""


# --- small parsing helpers ---------------------------------------------------------------------
_BAD_COMPONENT = re.compile(r"(?:^|/)\.{0,2}(?:/|$)")
_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = " \t\n\r"
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:[Zz]|([+-])(\d\d):(\d\d))\Z"
)
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def _describe(e: dict[str, Any]) -> str:
    n = e.get("name")
    return repr(n)[:200] if isinstance(n, str) else "(unnamed entry)"


def clean_name(name: str) -> str:
    """Clean a TOC name like the Go reader; refuse ``..``, NUL and over-long names."""
    if "\x00" in name:
        raise TOCError(f"NUL in TOC name {name[:200]!r}")
    n = name.rstrip("/")
    if _BAD_COMPONENT.search(n) is not None:
        parts = [p for p in n.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise TOCError(f"'..' in TOC name {name[:200]!r}")
        n = "/".join(parts)
    if not n.isascii():
        try:
            encoded = n.encode("utf-8")
        except UnicodeEncodeError:
            raise TOCError(f"TOC name is not valid Unicode: {name[:200]!r}") from None
    else:
        encoded = b""
    if len(n) > MAX_COMPONENT_BYTES // 4:
        b = encoded or n.encode("ascii")
        if len(b) > MAX_PATH_BYTES:
            raise LimitExceededError(f"TOC name longer than {MAX_PATH_BYTES} bytes")
        if len(b) > MAX_COMPONENT_BYTES and any(
            len(p) > MAX_COMPONENT_BYTES for p in b.split(b"/")
        ):
            raise LimitExceededError(f"TOC name component longer than {MAX_COMPONENT_BYTES} bytes")
    return n


def parse_rfc3339_ns(s: str) -> int:
    """RFC 3339 time -> nanoseconds since the epoch (clamped to the int64 range)."""
    m = _RFC3339.match(s)
    if m is None:
        raise TOCError(f"modtime {s[:60]!r} is not RFC 3339")
    y, mo, d, h, mi, sec = (int(m.group(i)) for i in range(1, 7))
    try:
        day = datetime.date(y, mo, d).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise TOCError(f"modtime {s[:60]!r} is not a valid date") from None
    if h > 23 or mi > 59 or sec > 60:
        raise TOCError(f"modtime {s[:60]!r} is not a valid time")
    secs = day * 86400 + h * 3600 + mi * 60 + sec
    if m.group(8) is not None:
        off = int(m.group(9)) * 3600 + int(m.group(10)) * 60
        secs += -off if m.group(8) == "+" else off
    frac = m.group(7)
    ns = secs * 1_000_000_000 + (int(frac[:9].ljust(9, "0")) if frac else 0)
    return max(-_I64 - 1, min(_I64, ns))


def _digest_bytes(v: object, what: str, e: dict[str, Any]) -> bytes:
    if type(v) is str and len(v) == 71 and v.startswith("sha256:"):
        try:
            b = bytes.fromhex(v[7:])
        except ValueError:
            b = b""
        if len(b) == 32:
            return b
    raise TOCError(f"TOC entry {_describe(e)}: {what} {str(v)[:80]!r} is not a sha256 digest")


def _utf8_ok(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _hex(d: bytes) -> str:
    return "sha256:" + d.hex()


def _bad_int(e: dict[str, Any], key: str) -> TOCError:
    return TOCError(f"TOC entry {_describe(e)}: {key} {str(e.get(key))[:40]!r} is not valid")


def _bad_fields(e: dict[str, Any]) -> TOCError:
    for key, hi in (("mode", _I64), ("uid", _U32), ("gid", _U32), ("size", _I64)):
        v = e.get(key, 0)
        if type(v) is not int or not 0 <= v <= hi:
            return _bad_int(e, key)
    return TOCError(f"TOC entry {_describe(e)} is not valid")  # pragma: no cover


def _bad_chunk(e: dict[str, Any], toc_offset: int) -> TOCError:
    off = e.get("offset")
    if type(off) is not int or not 0 <= off < toc_offset:
        return TOCError(
            f"TOC entry {_describe(e)}: offset {str(off)[:40]} is outside [0, {toc_offset})"
        )
    for key in ("chunkSize", "innerOffset"):
        v = e.get(key, 0)
        if type(v) is not int or not 0 <= v <= _I64:
            return _bad_int(e, key)
    return TOCError(f"TOC entry {_describe(e)} is not valid")  # pragma: no cover


def _bad_fit(e: dict[str, Any], start: int, cs: int, size: int) -> TOCError:
    return TOCError(
        f"TOC entry {_describe(e)}: chunk {start}+{cs} does not fit the file of {size} bytes"
    )


def _big_chunk(e: dict[str, Any], size: int) -> LimitExceededError:
    return LimitExceededError(
        f"TOC entry {_describe(e)}: a chunk of {size} bytes exceeds {MAX_CHUNK_SIZE} bytes"
    )


def _bad_cover(name: str, covered: int, size: int) -> TOCError:
    return TOCError(f"the chunks of {name[:200]!r} cover {covered} of {size} bytes")


# --- the index ---------------------------------------------------------------------------------
class _ChunkList(Sequence[Chunk]):
    """A read-only view of a file's chunks (built on access; cheap to create)."""

    __slots__ = ("_index", "_lo", "_n")

    def __init__(self, index: TOCIndex, lo: int, hi: int) -> None:
        self._index = index
        self._lo = lo
        self._n = hi - lo

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Chunk: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Chunk]: ...

    def __getitem__(self, i: int | slice) -> Chunk | Sequence[Chunk]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("chunk index out of range")
        return self._index._chunk(self._lo + i)

    def __iter__(self) -> Iterator[Chunk]:
        make = self._index._chunk
        for j in range(self._lo, self._lo + self._n):
            yield make(j)

    def __repr__(self) -> str:
        return f"<{self._n} chunks>"


_EMPTY_CHUNKS: tuple[Chunk, ...] = ()


class TOCIndex:
    """A parsed, validated TOC and its overlay view. Build with :meth:`from_json`.

    Unknown inode numbers raise ``KeyError``; asking a directory-only question of a
    non-directory (or ``readlink`` of a non-symlink) raises ``ValueError``.
    """

    __slots__ = (
        "_c_digest",
        "_c_end",
        "_c_inner",
        "_c_offset",
        "_c_open",
        "_c_size",
        "_c_start",
        "_children",
        "_dir_path",
        "_has_no_landmark",
        "_kind",
        "_landmark_rec",
        "_nlink",
        "_opaque",
        "_r_chunk_hi",
        "_r_chunk_lo",
        "_r_dev",
        "_r_dir",
        "_r_fdigest",
        "_r_gid",
        "_r_gname",
        "_r_link",
        "_r_mode",
        "_r_mtime",
        "_r_name",
        "_r_size",
        "_r_type",
        "_r_uid",
        "_r_uname",
        "_r_xattrs",
        "_readdir_cache",
        "_rec",
        "_total_file_bytes",
        "toc_offset",
    )

    # populated by _Builder.finish()
    toc_offset: int
    _r_type: bytearray
    _r_name: list[str]
    _r_dir: array[int]
    _r_mode: array[int]
    _r_uid: array[int]
    _r_gid: array[int]
    _r_size: array[int]
    _r_mtime: array[int]
    _r_fdigest: dict[int, bytes]  # whole-file digests differing from the first chunk's
    _r_chunk_lo: array[int]
    _r_chunk_hi: array[int]
    _r_uname: list[str]
    _r_gname: list[str]
    _r_link: dict[int, str]
    _r_dev: dict[int, tuple[int, int]]
    _r_xattrs: dict[int, dict[str, bytes]]
    _c_offset: array[int]
    _c_end: array[int]
    _c_start: array[int]
    _c_size: array[int]
    _c_inner: array[int]
    _c_digest: bytearray
    _c_open: bytearray
    _dir_path: list[str | None]
    _kind: bytearray
    _rec: array[int]
    _nlink: array[int]
    _children: list[dict[str, int] | None]
    _opaque: frozenset[int]
    _landmark_rec: int
    _has_no_landmark: bool
    _total_file_bytes: int
    _readdir_cache: dict[int, tuple[tuple[str, int], ...]]

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_json(
        cls,
        toc_json: bytes | bytearray | memoryview | str,
        *,
        toc_offset: int,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> TOCIndex:
        """Parse and validate TOC JSON. *toc_offset* bounds every chunk offset.

        Raises :class:`TOCError` (or :class:`LimitExceededError`) on any invalid input.
        """
        if isinstance(toc_json, (bytes, bytearray, memoryview)):
            try:
                text = str(toc_json, "utf-8")  # no intermediate copy of a memoryview
            except UnicodeDecodeError as exc:
                raise TOCError(f"TOC is not UTF-8: {exc}") from None
        else:
            text = toc_json
        b = _Builder(toc_offset, max_entries)
        try:
            b.run(_iter_toc_entries(text, max_entries))
        except RecursionError:
            raise TOCError("TOC JSON is nested too deeply") from None
        del text
        return b.finish(cls.__new__(cls))

    # --- overlay view ---------------------------------------------------------------------
    @property
    def root_ino(self) -> int:
        return 1

    @property
    def num_inodes(self) -> int:
        return len(self._kind) - 1

    def _check(self, ino: int) -> int:
        if not 0 < ino < len(self._kind):
            raise KeyError(f"no inode {ino}")
        return self._kind[ino]

    def lookup(self, parent_ino: int, name: str) -> int | None:
        if not 0 < parent_ino < len(self._kind):
            return None
        ch = self._children[parent_ino]
        if ch is None:
            return None
        return ch.get(name)

    def readdir(self, ino: int) -> Sequence[tuple[str, int]]:
        """Children of a directory, sorted by name, without ``.`` and ``..``."""
        self._check(ino)
        cached = self._readdir_cache.get(ino)
        if cached is not None:
            return cached
        ch = self._children[ino]
        if ch is None:
            raise ValueError(f"inode {ino} is not a directory")
        items = tuple(ch.items())  # dictionaries are stored sorted by name
        if len(items) > 64:
            self._readdir_cache[ino] = items
        return items

    def getattr(self, ino: int) -> EntryAttr:
        kind = self._check(ino)
        r = self._rec[ino]
        nlink = self._nlink[ino]
        if kind == _WHITEOUT:
            return EntryAttr(ino, stat.S_IFCHR, nlink, 0, 0, 0, 0, self._r_mtime[r])
        if r < 0:  # implied directory
            return EntryAttr(ino, stat.S_IFDIR | 0o755, nlink, 0, 0, 0, 0, 0)
        mode = _IFMT[kind] | self._r_mode[r]
        if kind == _REG:
            size = self._r_size[r]
        elif kind == _SYMLINK:
            size = len(self._r_link[r].encode("utf-8"))
        else:
            size = 0
        rdev = 0
        if kind in (_CHAR, _BLOCK):
            major, minor = self._r_dev.get(r, (0, 0))
            rdev = _makedev(major, minor)
        return EntryAttr(
            ino, mode, nlink, self._r_uid[r], self._r_gid[r], size, rdev, self._r_mtime[r]
        )

    def readlink(self, ino: int) -> str:
        kind = self._check(ino)
        if kind != _SYMLINK:
            raise ValueError(f"inode {ino} is not a symlink")
        return self._r_link[self._rec[ino]]

    def xattrs(self, ino: int) -> dict[str, bytes]:
        kind = self._check(ino)
        r = self._rec[ino]
        out: dict[str, bytes] = {}
        if r >= 0 and kind != _WHITEOUT:
            x = self._r_xattrs.get(r)
            if x:
                out.update(x)
        if ino in self._opaque:
            for name in OPAQUE_XATTRS:
                out[name] = b"y"
        return out

    def chunks(self, ino: int) -> Sequence[Chunk]:
        """The chunks of a regular file in file order (empty for empty files and non-files)."""
        kind = self._check(ino)
        if kind != _REG:
            return _EMPTY_CHUNKS
        r = self._rec[ino]
        lo, hi = self._r_chunk_lo[r], self._r_chunk_hi[r]
        if lo == hi:
            return _EMPTY_CHUNKS
        return _ChunkList(self, lo, hi)

    def chunk_at(self, ino: int, file_offset: int) -> int:
        """Index into ``chunks(ino)`` of the chunk holding *file_offset*.

        Raises ``ValueError`` when *file_offset* is outside ``[0, size)``.
        """
        kind = self._check(ino)
        if kind != _REG:
            raise ValueError(f"inode {ino} is not a regular file")
        r = self._rec[ino]
        if not 0 <= file_offset < self._r_size[r]:
            raise ValueError(f"offset {file_offset} outside the file of {self._r_size[r]} bytes")
        lo, hi = self._r_chunk_lo[r], self._r_chunk_hi[r]
        return bisect.bisect_right(self._c_start, file_offset, lo, hi) - 1 - lo

    def find(self, path: str) -> int | None:
        """The inode of an overlay-view path (``"a/b/c"``; ``""`` or ``"/"`` is the root)."""
        ino = 1
        for comp in path.split("/"):
            if comp in ("", "."):
                continue
            ch = self._children[ino]
            if ch is None:
                return None
            nxt = ch.get(comp)
            if nxt is None:
                return None
            ino = nxt
        return ino

    def is_dir(self, ino: int) -> bool:
        return self._check(ino) == _DIR

    @property
    def total_file_bytes(self) -> int:
        """Sum of the sizes of the regular-file inodes (each hardlinked inode once)."""
        return self._total_file_bytes

    @property
    def prefetch_landmark_offset(self) -> int | None:
        """Blob offset of ``.prefetch.landmark``'s member: ``[0, it)`` holds prioritized files."""
        r = self._landmark_rec
        if r < 0 or self._r_chunk_lo[r] == self._r_chunk_hi[r]:
            return None
        return int(self._c_offset[self._r_chunk_lo[r]])

    @property
    def has_no_prefetch_landmark(self) -> bool:
        return self._has_no_landmark

    def uids(self) -> set[int]:
        """The uids of the inodes of the view (implied directories and whiteouts are 0)."""
        return self._ids(self._r_uid)

    def gids(self) -> set[int]:
        return self._ids(self._r_gid)

    def _ids(self, col: array[int]) -> set[int]:
        out: set[int] = set()
        rec, kind = self._rec, self._kind
        for ino in range(1, len(kind)):
            r = rec[ino]
            out.add(0 if r < 0 or kind[ino] == _WHITEOUT else col[r])
        return out

    # --- chunks and raw entries -----------------------------------------------------------
    def _chunk(self, j: int) -> Chunk:
        return Chunk(
            self._c_offset[j],
            self._c_end[j],
            self._c_start[j],
            self._c_size[j],
            self._c_inner[j],
            "sha256:" + self._c_digest[32 * j : 32 * j + 32].hex(),
        )

    def all_chunks(self) -> Sequence[Chunk]:
        """Every chunk of the TOC (hidden entries included) in TOC order."""
        return _ChunkList(self, 0, len(self._c_offset))

    @property
    def num_entries(self) -> int:
        return len(self._r_type) + sum(
            max(0, self._r_chunk_hi[r] - self._r_chunk_lo[r] - 1) for r in range(len(self._r_type))
        )

    def _record_name(self, r: int) -> str:
        parent = self._dir_path[self._r_dir[r]]
        base = self._r_name[r]
        return f"{parent}/{base}" if parent else base

    def entries(self) -> Iterator[TOCEntry]:
        """The TOC entries in TOC order (``chunk`` entries after their ``reg`` entry)."""
        for r in range(len(self._r_type)):
            code = self._r_type[r]
            name = self._record_name(r)
            lo, hi = self._r_chunk_lo[r], self._r_chunk_hi[r]
            major, minor = self._r_dev.get(r, (0, 0))
            fd = self._r_fdigest.get(r)
            first = self._chunk(lo) if lo < hi else None
            yield TOCEntry(
                name=name,
                type=_TYPE_NAMES[code],
                size=self._r_size[r],
                mode=self._r_mode[r],
                uid=self._r_uid[r],
                gid=self._r_gid[r],
                mtime_ns=self._r_mtime[r],
                link_name=self._r_link.get(r, ""),
                dev_major=major,
                dev_minor=minor,
                xattrs=dict(self._r_xattrs[r]) if r in self._r_xattrs else None,
                digest=(first.digest if first else "") if fd is None else (_hex(fd) if fd else ""),
                user_name=self._r_uname[r],
                group_name=self._r_gname[r],
                offset=first.offset if first else None,
                chunk_offset=0,
                chunk_size=self._raw_chunk_size(lo) if first else 0,
                inner_offset=first.inner_offset if first else 0,
                chunk_digest=first.digest if first else "",
            )
            for j in range(lo + 1, hi):
                c = self._chunk(j)
                yield TOCEntry(
                    name=name,
                    type="chunk",
                    offset=c.offset,
                    chunk_offset=c.chunk_offset,
                    chunk_size=self._raw_chunk_size(j),
                    inner_offset=c.inner_offset,
                    chunk_digest=c.digest,
                )

    def _raw_chunk_size(self, j: int) -> int:
        return 0 if self._c_open[j] else self._c_size[j]


def _makedev(major: int, minor: int) -> int:
    # glibc's gnu_dev_makedev layout, as os.makedev computes it on Linux
    return (
        ((major & 0xFFFFF000) << 32)
        | ((major & 0x00000FFF) << 8)
        | ((minor & 0xFFFFFF00) << 12)
        | (minor & 0x000000FF)
    )


# --- streaming scan of the TOC document --------------------------------------------------------
def _iter_toc_entries(text: str, max_entries: int) -> Iterator[Any]:
    """Yield the elements of ``entries`` of ``{"version": 1, "entries": [...]}`` one by one.

    The rest of the document is parsed normally; the version is checked at the end.
    """
    scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
    ws = _WS.match

    def value(pos: int) -> tuple[Any, int]:
        try:
            v, end = scan(text, pos)
        except StopIteration:
            raise TOCError(f"invalid JSON in TOC at offset {pos}") from None
        except ValueError as exc:
            raise TOCError(f"invalid JSON in TOC: {exc}") from None
        return v, end

    def skip(pos: int) -> int:
        return ws(text, pos).end()  # type: ignore[union-attr]

    def expect(pos: int, ch: str) -> int:
        pos = skip(pos)
        if text[pos : pos + 1] != ch:
            raise TOCError(f"invalid JSON in TOC at offset {pos}: expected {ch!r}")
        return skip(pos + 1)

    pos = expect(0, "{")
    seen: set[str] = set()
    version: object = None
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            if text[pos : pos + 1] != '"':
                raise TOCError(f"invalid JSON in TOC at offset {pos}: expected a key")
            key, pos = value(pos)
            if key in seen:
                raise TOCError(f"duplicate key {key[:40]!r} in the TOC")
            seen.add(key)
            pos = expect(pos, ":")
            if key == "entries":
                if text[pos : pos + 1] != "[":
                    raise TOCError("TOC entries is not an array")
                pos = skip(pos + 1)
                if text[pos : pos + 1] == "]":
                    pos += 1
                else:
                    n = 0
                    while True:
                        try:
                            e, pos = scan(text, pos)
                        except StopIteration:
                            raise TOCError(f"invalid JSON in TOC at offset {pos}") from None
                        except ValueError as exc:
                            raise TOCError(f"invalid JSON in TOC: {exc}") from None
                        n += 1
                        if n > max_entries:
                            raise LimitExceededError(f"TOC has more than {max_entries} entries")
                        yield e
                        c = text[pos : pos + 1]
                        if c != "," and c != "]":
                            pos = skip(pos)
                            c = text[pos : pos + 1]
                        if c == ",":
                            pos += 1
                            if text[pos : pos + 1] in _WS_CHARS:
                                pos = skip(pos)
                        elif c == "]":
                            pos += 1
                            break
                        else:
                            raise TOCError(f"invalid JSON in TOC entries at offset {pos}")
            else:
                v, pos = value(pos)
                if key == "version":
                    version = v
            pos = skip(pos)
            c = text[pos : pos + 1]
            if c == ",":
                pos = skip(pos + 1)
                continue
            if c == "}":
                pos += 1
                break
            raise TOCError(f"invalid JSON in TOC at offset {pos}")
    if skip(pos) != len(text):
        raise TOCError("trailing data after the TOC JSON")
    if type(version) is not int or version != 1:
        raise TOCError(f"unsupported TOC version {str(version)[:20]!r} (want 1)")
    if "entries" not in seen:
        raise TOCError("TOC has no entries")


# --- the builder -------------------------------------------------------------------------------
class _Builder:
    def __init__(self, toc_offset: int, max_entries: int) -> None:
        if type(toc_offset) is not int or toc_offset < 0:
            raise ValueError("toc_offset must be a non-negative int")
        self.toc_offset = toc_offset
        self.max_entries = max_entries
        # records
        self.r_type = bytearray()
        self.r_name: list[str] = []
        self.r_dir = array("I")
        self.r_mode = array("I")
        self.r_uid = array("I")
        self.r_gid = array("I")
        self.r_size = array("q")
        self.r_mtime = array("q")
        self.r_fdigest: dict[int, bytes] = {}
        self.r_chunk_lo = array("I")
        self.r_chunk_hi = array("I")
        self.r_uname: list[str] = []
        self.r_gname: list[str] = []
        self.r_link: dict[int, str] = {}
        self.r_dev: dict[int, tuple[int, int]] = {}
        self.r_xattrs: dict[int, dict[str, bytes]] = {}
        # chunks
        self.c_offset = array("q")
        self.c_start = array("q")
        self.c_size = array("q")
        self.c_inner = array("q")
        self.c_digest = bytearray()
        self.c_open = bytearray()
        # provisional nodes (0 unused, 1 root)
        self.n_kind = bytearray((0, _DIR))
        self.n_rec = array("i", (-1, -1))
        self.n_children: list[dict[str, int] | None] = [None, {}]
        self.n_path: list[str | None] = [None, ""]
        self.dirmap: dict[str, int] = {"": 1}
        self.hardlinks: list[tuple[int, str, str]] = []  # (parent node, base, target path)
        self.whiteouts: dict[tuple[int, str], int] = {}  # (parent node, name) -> record
        self.opaque: set[int] = set()
        self.landmark_rec = -1
        self.has_no_landmark = False
        self.strings: dict[str, str] = {"": ""}
        self.replaced = False  # an entry replaced an earlier one: look for unreachable nodes
        self.mtimes: dict[str, int] = {}

    # --- the entry loop (hot: everything common is inlined) ------------------------------
    def run(self, entries: Iterator[Any]) -> None:
        """Process every entry. Wrongly typed or out-of-range numbers surface as TypeError /
        OverflowError from the typed arrays and are reported as :class:`TOCError`."""
        type_codes = _TYPE_CODES
        hidden = _HIDDEN_AT_ROOT
        dirmap = self.dirmap
        children = self.n_children
        n_kind = self.n_kind
        n_rec = self.n_rec
        n_path = self.n_path
        r_type = self.r_type
        r_name = self.r_name
        r_dir = self.r_dir
        r_mode = self.r_mode
        r_uid = self.r_uid
        r_gid = self.r_gid
        r_size = self.r_size
        r_mtime = self.r_mtime
        r_fdigest = self.r_fdigest
        fd_cache: dict[bytes, bytes] = {}
        r_chunk_lo = self.r_chunk_lo
        r_chunk_hi = self.r_chunk_hi
        r_uname = self.r_uname
        r_gname = self.r_gname
        c_offset = self.c_offset
        c_start = self.c_start
        c_size = self.c_size
        c_inner = self.c_inner
        c_digest = self.c_digest
        c_open = self.c_open
        mtimes = self.mtimes
        strings = self.strings
        toc_offset = self.toc_offset
        digest_bytes = _digest_bytes
        cur_rec = -1
        cur_name = ""
        cur_next = 0
        cur_size = 0
        nchunks = len(c_offset)
        e: Any = None
        try:
            for e in entries:
                if type(e) is not dict:
                    raise TOCError("TOC entry is not an object")
                get = e.get
                name = get("name")
                typ = get("type")
                if type(name) is not str or type(typ) is not str or not name:
                    raise TOCError(f"TOC entry {_describe(e)} has no valid name/type")
                code = type_codes.get(typ)
                if code is None:
                    raise TOCError(f"TOC entry {_describe(e)} has unknown type {typ[:40]!r}")
                n = name[:-1] if name[-1] == "/" else name
                if (
                    len(n) > 255
                    or "//" in n
                    or "/." in n
                    or n[:1] in "./"
                    or n[-1:] == "/"
                    or "\x00" in n
                    or not n.isascii()
                ):
                    n = clean_name(name)

                if code == _CHUNK:
                    start = get("chunkOffset")
                    off: Any = get("offset")
                    cs = get("chunkSize", 0)
                    inner = get("innerOffset", 0)
                    if cur_rec < 0 or n != cur_name:
                        raise TOCError(f"chunk entry {_describe(e)} does not follow its reg entry")
                    if type(start) is not int or start != cur_next or start == 0:
                        raise TOCError(
                            f"chunk entry {_describe(e)}: chunkOffset {str(start)[:40]} is not "
                            f"{cur_next} (chunks must be contiguous)"
                        )
                    if not 0 <= off < toc_offset or cs < 0 or inner < 0:
                        raise _bad_chunk(e, toc_offset)
                    size = cur_size - start if cs == 0 else cs
                    if size <= 0 or start + size > cur_size:
                        raise _bad_fit(e, start, cs, cur_size)
                    if size > MAX_CHUNK_SIZE:
                        raise _big_chunk(e, size)
                    c_offset.append(off)
                    c_start.append(start)
                    c_size.append(size)
                    c_inner.append(inner)
                    c_digest += digest_bytes(get("chunkDigest"), "chunkDigest", e)
                    c_open.append(cs == 0)
                    nchunks += 1
                    cur_next = start + size
                    r_chunk_hi[cur_rec] = nchunks
                    continue

                if cur_rec >= 0:
                    if cur_next != cur_size:
                        raise _bad_cover(cur_name, cur_next, cur_size)
                    cur_rec = -1
                if not n and code != _DIR:
                    raise TOCError(f"non-directory TOC entry {name[:200]!r} names the root")

                r = len(r_type)
                mode = get("mode", 0)
                uid = get("uid", 0)
                gid = get("gid", 0)
                size = get("size", 0)
                if size < 0 or mode < 0:
                    raise _bad_fields(e)
                mt = get("modtime")
                if mt is None or mt == "":
                    mtime = 0
                else:
                    if type(mt) is not str:
                        raise _bad_int(e, "modtime")
                    cached = mtimes.get(mt)
                    if cached is None:
                        mtime = parse_rfc3339_ns(mt)
                        if len(mtimes) < 4096:
                            mtimes[mt] = mtime
                    else:
                        mtime = cached
                un = get("userName", "")
                gn = get("groupName", "")
                if type(un) is not str or type(gn) is not str:
                    raise _bad_int(e, "userName/groupName")
                un = strings.setdefault(un, un)  # one shared object per distinct name
                gn = strings.setdefault(gn, gn)
                # the whole-file digest is kept only where the first chunk's digest is not it
                dg = get("digest")
                if dg is None or dg == "":
                    if code == _REG and size:
                        r_fdigest[r] = b""
                elif code != _REG or not size or dg != get("chunkDigest"):
                    dgb = digest_bytes(dg, "digest", e)
                    r_fdigest[r] = fd_cache.setdefault(dgb, dgb)
                xa = get("xattrs")
                if xa is not None:
                    self._xattrs(r, xa, e)

                if n:
                    i = n.rfind("/")
                    if i >= 0:
                        parent = dirmap.get(n[:i])
                        if parent is None:
                            parent = self._mkdirs(n[:i])
                        base = n[i + 1 :]
                    else:
                        parent = 1
                        base = n
                else:
                    parent, base = 1, ""

                r_type.append(code)
                r_name.append(base)
                r_dir.append(parent)
                r_mode.append(mode & 0o7777)
                r_uid.append(uid)
                r_gid.append(gid)
                r_size.append(size if code == _REG else 0)
                r_mtime.append(mtime)
                r_uname.append(un)
                r_gname.append(gn)
                r_chunk_lo.append(nchunks)
                r_chunk_hi.append(nchunks)

                if code == _REG:
                    co = get("chunkOffset", 0)
                    if co != 0 or type(co) is not int:
                        raise TOCError(
                            f"TOC entry {_describe(e)}: a reg entry's chunkOffset must be 0"
                        )
                    cur_rec = r
                    cur_name = n
                    cur_next = 0
                    cur_size = size
                    off = get("offset")
                    if size or off is not None:
                        cs = get("chunkSize", 0)
                        inner = get("innerOffset", 0)
                        if off is None or not 0 <= off < toc_offset or cs < 0 or inner < 0:
                            raise _bad_chunk(e, toc_offset)
                        if size:
                            cd = get("chunkDigest")
                            if cd is None or cd == "":
                                cdb = r_fdigest.get(r, b"")
                                if cs not in (0, size) or not cdb:
                                    raise TOCError(f"TOC entry {_describe(e)} has no chunkDigest")
                            else:
                                cdb = digest_bytes(cd, "chunkDigest", e)
                            csize = size if cs == 0 else cs
                            if csize > size:
                                raise _bad_fit(e, 0, cs, size)
                            if csize > MAX_CHUNK_SIZE:
                                raise _big_chunk(e, csize)
                            c_offset.append(off)
                            c_start.append(0)
                            c_size.append(csize)
                            c_inner.append(inner)
                            c_digest += cdb
                            c_open.append(cs == 0)
                            nchunks += 1
                            cur_next = csize
                            r_chunk_hi[r] = nchunks
                elif code != _DIR and code != _FIFO:
                    self._special_fields(r, code, e)

                if not n:  # the root directory's own entry
                    n_rec[1] = r
                    continue
                if base[:4] == ".wh." or code == _HARDLINK or (parent == 1 and base in hidden):
                    self._place(parent, base, r, code, n)
                    continue
                ch = children[parent]
                assert ch is not None
                old = ch.get(base)
                if old is not None and old > 0:
                    if n_kind[old] == _DIR:
                        if code == _DIR:  # directory over directory: new attributes, same children
                            n_rec[old] = r
                            continue
                        self._drop_subtree(n, old)
                    self.replaced = True  # some provisional node may now be unreachable
                node = len(n_kind)
                n_kind.append(code)
                n_rec.append(r)
                if code == _DIR:
                    children.append({})
                    n_path.append(n)
                    dirmap[n] = node
                else:
                    children.append(None)
                    n_path.append(None)
                ch[base] = node
        except (TypeError, OverflowError) as exc:
            raise TOCError(
                f"TOC entry {_describe(e) if type(e) is dict else '?'} "
                f"has a field of the wrong type or range ({exc})"
            ) from None

        if cur_rec >= 0 and cur_next != cur_size:
            raise _bad_cover(cur_name, cur_next, cur_size)

    def _special_fields(self, r: int, code: int, e: dict[str, Any]) -> None:
        get = e.get
        if code in (_SYMLINK, _HARDLINK):
            ln = get("linkName", "")
            if type(ln) is not str or "\x00" in ln or not _utf8_ok(ln):
                raise TOCError(f"TOC entry {_describe(e)} has an invalid linkName")
            if code == _HARDLINK:
                ln = clean_name(ln)
                if not ln:
                    raise TOCError(f"hardlink {_describe(e)} points at the root")
            self.r_link[r] = ln
        elif code in (_CHAR, _BLOCK):
            major = get("devMajor", 0)
            minor = get("devMinor", 0)
            if type(major) is not int or not 0 <= major <= _U32:
                raise _bad_int(e, "devMajor")
            if type(minor) is not int or not 0 <= minor <= _U32:
                raise _bad_int(e, "devMinor")
            if major or minor:
                self.r_dev[r] = (major, minor)

    def _xattrs(self, r: int, xa: object, e: dict[str, Any]) -> None:
        if type(xa) is not dict:
            raise TOCError(f"TOC entry {_describe(e)}: xattrs is not an object")
        out: dict[str, bytes] = {}
        for k, v in xa.items():
            if type(v) is not str or not k or "\x00" in k or not _utf8_ok(k):
                raise TOCError(f"TOC entry {_describe(e)}: invalid xattr {k[:60]!r}")
            try:
                out[k] = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise TOCError(
                    f"TOC entry {_describe(e)}: xattr {k[:60]!r} is not base64"
                ) from None
        if out:
            self.r_xattrs[r] = out

    def _place(self, parent: int, base: str, r: int, code: int, n: str) -> None:
        if base.startswith(WHITEOUT_PREFIX):
            if base == OPAQUE_WHITEOUT:
                self.opaque.add(parent)
            elif not base.startswith(WHITEOUT_META_PREFIX):
                target = base[len(WHITEOUT_PREFIX) :]
                if target in ("", ".", ".."):
                    raise TOCError(f"invalid whiteout name {n[:200]!r}")
                self.whiteouts[(parent, target)] = r  # a later duplicate keeps the first slot
            return
        if parent == 1 and code == _REG and base in _HIDDEN_AT_ROOT:
            if base == PREFETCH_LANDMARK:
                self.landmark_rec = r
            elif base == NO_PREFETCH_LANDMARK:
                self.has_no_landmark = True
            return
        ch = self.n_children[parent]
        assert ch is not None
        old = ch.get(base)
        if old is not None and old > 0:
            if self.n_kind[old] == _DIR:
                if code == _DIR:  # directory over directory: new attributes, same children
                    self.n_rec[old] = r
                    return
                self._drop_subtree(n, old)
            self.replaced = True
        if code == _HARDLINK:
            self.hardlinks.append((parent, base, self.r_link[r]))
            ch[base] = -len(self.hardlinks)
            return
        node = len(self.n_kind)
        self.n_kind.append(code)
        self.n_rec.append(r)
        if code == _DIR:
            self.n_children.append({})
            self.n_path.append(n)
            self.dirmap[n] = node
        else:
            self.n_children.append(None)
            self.n_path.append(None)
        ch[base] = node

    def _drop_subtree(self, path: str, node: int) -> None:
        stack = [(path, node)]
        while stack:
            p, nd = stack.pop()
            self.dirmap.pop(p, None)
            ch = self.n_children[nd]
            if ch:
                for name, child in ch.items():
                    if child > 0 and self.n_kind[child] == _DIR:
                        stack.append((f"{p}/{name}", child))

    def _mkdirs(self, path: str) -> int:
        """Create the implied directories of *path* (which is not in dirmap)."""
        i = path.rfind("/")
        parent_path = path[:i] if i >= 0 else ""
        base = path[i + 1 :]
        parent = self.dirmap.get(parent_path)
        if parent is None:
            parent = self._mkdirs(parent_path)
        if base.startswith(WHITEOUT_PREFIX):
            raise TOCError(f"whiteout {path[:200]!r} used as a directory")
        if parent == 1 and base in _HIDDEN_AT_ROOT:
            raise TOCError(f"{base!r} used as a directory")
        ch = self.n_children[parent]
        assert ch is not None
        old = ch.get(base)
        if old is not None:
            raise TOCError(f"TOC entry below {path[:200]!r}, which is not a directory")
        node = len(self.n_kind)
        self.n_kind.append(_DIR)
        self.n_rec.append(-1)
        self.n_children.append({})
        self.n_path.append(path)
        self.dirmap[path] = node
        ch[base] = node
        return node

    # --- end ----------------------------------------------------------------------------
    def _lookup_path(self, path: str) -> int | None:
        ch: dict[str, int] | None = self.n_children[1]
        parts = path.split("/")
        for comp in parts[:-1]:
            assert ch is not None
            v = ch.get(comp)
            if v is None or v < 0:
                return None
            ch = self.n_children[v]
            if ch is None:
                return None
        assert ch is not None
        return ch.get(parts[-1])

    def _resolve_hardlinks(self) -> None:
        resolved: list[int] = [0] * len(self.hardlinks)
        for k in range(len(self.hardlinks)):
            chain = [k]
            seen = {k}
            node: int | None
            while True:
                target = self.hardlinks[chain[-1]][2]
                node = self._lookup_path(target)
                if node is None:
                    raise TOCError(f"hardlink target {target[:200]!r} does not exist")
                if node > 0:
                    break
                j = -node - 1
                if resolved[j]:
                    node = resolved[j]
                    break
                if j in seen or len(chain) > MAX_HARDLINK_CHAIN:
                    raise TOCError(f"hardlink loop at {target[:200]!r}")
                seen.add(j)
                chain.append(j)
            if self.n_kind[node] == _DIR:
                raise TOCError(f"hardlink to directory {target[:200]!r}")
            for j in chain:
                resolved[j] = node
        for k, (parent, base, _target) in enumerate(self.hardlinks):
            ch = self.n_children[parent]
            assert ch is not None
            if ch.get(base) == -k - 1:
                ch[base] = resolved[k]

    def finish(self, idx: TOCIndex) -> TOCIndex:
        self._resolve_hardlinks()
        # whiteouts last, in TOC order, unless a real entry has the name
        for (parent, target), r in self.whiteouts.items():
            ch = self.n_children[parent]
            assert ch is not None
            if target in ch:
                continue
            node = len(self.n_kind)
            self.n_kind.append(_WHITEOUT)
            self.n_rec.append(r)
            self.n_children.append(None)
            self.n_path.append(None)
            ch[target] = node

        kind, rec, children = self.n_kind, self.n_rec, self.n_children
        nprov = len(kind)
        # live nodes: reachable from the root (all of them unless an entry replaced another)
        live = bytearray(nprov)
        live[1] = 1
        stack = [1] if self.replaced else []
        nlive = 1 if self.replaced else nprov - 1
        while stack:
            ch = children[stack.pop()]
            assert ch is not None
            for v in ch.values():
                if not live[v]:
                    live[v] = 1
                    nlive += 1
                    if children[v] is not None:
                        stack.append(v)
        if nlive == nprov - 1:
            newid: array[int] | None = None
            f_kind, f_rec = kind, rec
            f_children = children
        else:
            newid = array("I", bytes(4 * nprov))
            f_kind = bytearray(1)
            f_rec = array("i", [-1])
            f_children = [None]
            for p in range(1, nprov):
                if live[p]:
                    newid[p] = len(f_kind)
                    f_kind.append(kind[p])
                    f_rec.append(rec[p])
                    f_children.append(children[p])
        nlink = array("I", bytes(4 * len(f_kind)))
        nlink[1] = 2
        opaque: set[int] = set()
        for ino in range(1, len(f_kind)):
            ch = f_children[ino]
            if ch is None:
                continue
            if newid is not None:
                ch = {k: newid[v] for k, v in sorted(ch.items())}
            elif len(ch) > 1:
                ch = dict(sorted(ch.items()))
            f_children[ino] = ch
            for v in ch.values():
                if f_kind[v] == _DIR:
                    nlink[v] += 2
                    nlink[ino] += 1
                else:
                    nlink[v] += 1
        for p in self.opaque:
            if newid is None or live[p]:
                opaque.add(newid[p] if newid is not None else p)
        r_size = self.r_size  # one record per inode: hardlinked files count once
        total = sum(r_size[f_rec[i]] for i in range(1, len(f_kind)) if f_kind[i] == _REG)

        # compressed_end: the next distinct member offset, or the TOC offset
        offs = sorted(set(self.c_offset))
        ends = dict(zip(offs, [*offs[1:], self.toc_offset]))
        c_end = array("q", map(ends.__getitem__, self.c_offset))

        idx.toc_offset = self.toc_offset
        idx._r_type = self.r_type
        idx._r_name = self.r_name
        idx._r_dir = self.r_dir
        idx._r_mode = self.r_mode
        idx._r_uid = self.r_uid
        idx._r_gid = self.r_gid
        idx._r_size = self.r_size
        idx._r_mtime = self.r_mtime
        idx._r_fdigest = self.r_fdigest
        idx._r_chunk_lo = self.r_chunk_lo
        idx._r_chunk_hi = self.r_chunk_hi
        idx._r_uname = self.r_uname
        idx._r_gname = self.r_gname
        idx._r_link = self.r_link
        idx._r_dev = self.r_dev
        idx._r_xattrs = self.r_xattrs
        idx._c_offset = self.c_offset
        idx._c_end = c_end
        idx._c_start = self.c_start
        idx._c_size = self.c_size
        idx._c_inner = self.c_inner
        idx._c_digest = self.c_digest
        idx._c_open = self.c_open
        idx._dir_path = self.n_path
        idx._kind = f_kind
        idx._rec = f_rec
        idx._nlink = nlink
        idx._children = f_children
        idx._opaque = frozenset(opaque)
        idx._landmark_rec = self.landmark_rec
        idx._has_no_landmark = self.has_no_landmark
        idx._total_file_bytes = total
        idx._readdir_cache = {}
        return idx


def parse_toc(
    toc_json: bytes | str, *, toc_offset: int, max_entries: int = DEFAULT_MAX_ENTRIES
) -> TOCIndex:
    """Shorthand for :meth:`TOCIndex.from_json`."""
    return TOCIndex.from_json(toc_json, toc_offset=toc_offset, max_entries=max_entries)
