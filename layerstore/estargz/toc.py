"""The eStargz TOC index: :class:`TOCIndex`, its records (:class:`Chunk`, :class:`EntryAttr`,
:class:`TOCEntry`) and the overlay view that ``diff/`` serves.

A :class:`TOCIndex` is compact and immutable: parallel ``array.array`` columns, one row per TOC
record (every entry except ``chunk``), one row per chunk, one row per inode of the overlay view.
Strings kept are the path components (shared with the directory dictionaries), symlink targets,
user/group names (interned) and the paths of directories. Chunk digests are kept as 32 raw bytes;
a whole-file ``digest`` only where it differs from the file's first chunk digest. Measured
(benchmarks/toc_index_bench.py): a 56,810-entry TOC (19 MiB JSON) becomes a 16 MiB index.
Building and validating one from TOC JSON is :mod:`layerstore.estargz.tocbuild`'s job
(:meth:`TOCIndex.from_json` calls it); this module only answers questions.

The overlay view (what ``diff/`` serves): inodes are numbered 1..N in TOC order (root is 1,
implied directories take the number of the point where they are first needed, whiteouts come
last), so numbers are stable across runs for the same TOC. ``D/.wh.NAME`` shows as ``D/NAME``, a
character device 0/0 with mode ``S_IFCHR`` (a real ``NAME`` wins); ``D/.wh..wh..opq`` is hidden
and ``D`` answers the opaque xattrs (and no ``trusted.overlay.*``/``user.overlay.*`` xattr from the
image is shown: the image must not steer the overlay mount); other ``.wh..wh.*`` (aufs metadata)
is hidden; the root's
``.prefetch.landmark``, ``.no.prefetch.landmark`` and ``stargz.index.json`` regular files are
hidden; hardlinks share one inode; a later entry with the same name replaces the earlier one
(directory over directory updates the attributes and keeps the children).

The index is immutable after construction and safe to share between threads.
"""

from __future__ import annotations

import bisect
import stat
from array import array
from collections.abc import Iterator, Sequence
from typing import NamedTuple, overload

from layerstore.estargz.constants import OPAQUE_XATTRS, OVERLAY_XATTR_PREFIXES

DEFAULT_MAX_ENTRIES = 1_000_000
"""Default cap on the number of TOC entries (:class:`~layerstore.errors.LimitExceededError`)."""

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


_new_attr = tuple.__new__
_S_IFCHR = stat.S_IFCHR
_S_IFDIR = stat.S_IFDIR


def _hex(d: bytes) -> str:
    return "sha256:" + d.hex()


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

    def offsets(self) -> array[int]:
        """The ``offset`` of each chunk, as a new array (without building the chunks)."""
        return self._index._c_offset[self._lo : self._lo + self._n]


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

    # populated by layerstore.estargz.tocbuild
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
        """Parse and validate TOC JSON. *toc_offset* bounds every chunk offset.

        Raises :class:`TOCError` (or :class:`LimitExceededError`) on any invalid input.
        """
        # the builder imports this module, so it is imported when first needed
        from layerstore.estargz.tocbuild import build_index

        return build_index(
            cls.__new__(cls), toc_json, toc_offset=toc_offset, max_entries=max_entries
        )

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
        # hot (every entry a walk meets): the tuple is built without EntryAttr's Python __new__
        if not 0 < ino < len(self._kind):
            raise KeyError(f"no inode {ino}")
        kind = self._kind[ino]
        r = self._rec[ino]
        nlink = self._nlink[ino]
        if kind == _WHITEOUT:
            return _new_attr(EntryAttr, (ino, _S_IFCHR, nlink, 0, 0, 0, 0, self._r_mtime[r]))
        if r < 0:  # implied directory
            return _new_attr(EntryAttr, (ino, _S_IFDIR | 0o755, nlink, 0, 0, 0, 0, 0))
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
        return _new_attr(
            EntryAttr,
            (
                ino,
                _IFMT[kind] | self._r_mode[r],
                nlink,
                self._r_uid[r],
                self._r_gid[r],
                size,
                rdev,
                self._r_mtime[r],
            ),
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
                for name in [n for n in out if n.startswith(OVERLAY_XATTR_PREFIXES)]:
                    del out[name]
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

    def first_chunk_digests(self, ino: int, n: int) -> list[str]:
        """The digests of the first *n* chunks of regular file *ino* (fewer when it has
        fewer; none for other kinds), without building the chunks."""
        if not 0 < ino < len(self._kind) or self._kind[ino] != _REG or n <= 0:
            return []
        r = self._rec[ino]
        lo = self._r_chunk_lo[r]
        hi = min(self._r_chunk_hi[r], lo + n)
        d = self._c_digest
        return ["sha256:" + d[32 * j : 32 * j + 32].hex() for j in range(lo, hi)]

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

    def path(self, ino: int) -> str | None:
        """The TOC name of the entry behind *ino* (for a hardlinked inode, the entry that
        holds its data; no leading ``/``), or None for the root, implied directories and
        whiteouts. Used to name files in workload profiles."""
        kind = self._check(ino)
        r = self._rec[ino]
        if r < 0 or kind == _WHITEOUT:
            return None
        return self._record_name(r) or None

    def is_dir(self, ino: int) -> bool:
        return self._check(ino) == _DIR

    def path_of(self, ino: int) -> str | None:
        """The TOC path (``"a/b/c"``) of an inode's entry (a hardlinked file: its first name);
        None for the root, implied directories and unknown inodes."""
        if not 0 < ino < len(self._kind):
            return None
        r = self._rec[ino]
        return None if r < 0 else self._record_name(r)

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
