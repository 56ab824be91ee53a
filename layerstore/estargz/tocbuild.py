"""Build a :class:`~layerstore.estargz.toc.TOCIndex` from eStargz TOC JSON, validating it.

The TOC (``{"version": 1, "entries": [...]}``) is parsed one entry at a time: the ``entries``
array is scanned element by element (:func:`_iter_toc_entries`), so the whole document never
exists as Python objects, and each entry goes straight into the index's columns
(:class:`_Builder`). Hardlinks are resolved after the last entry (as the Go reader does), by the
name's final occupant; a ``chunk``'s ``compressed_end`` is the next distinct member offset in the
whole TOC.

Validation (a TOC failing any rule raises :class:`~layerstore.errors.TOCError`):

* names are cleaned like the Go reader (``./x``, ``/x``, ``x//y`` and a trailing ``/`` -> ``x``,
  ``x/y``); a ``..`` component, a NUL, an empty name, text that is not valid Unicode, a component
  over 255 bytes or a path over 4096 bytes (:class:`LimitExceededError`) is refused. Only a
  directory may clean to the root;
* unknown ``type`` values, wrongly typed fields, negative sizes/ids and ``modtime`` values that
  are not RFC 3339 are refused;
* ``chunk`` entries must directly follow their ``reg`` entry (same name) with contiguous
  ``chunkOffset`` values, and the chunks of a file must cover exactly ``size`` bytes;
* every chunk has an ``offset`` inside ``[0, toc_offset)`` and a ``chunkDigest`` (a legacy
  single-chunk file may instead rely on ``digest``): nothing is ever served unverified;
* hardlink targets must exist (chains are resolved) and must not be directories;
* more than ``max_entries`` entries raises :class:`LimitExceededError` while scanning, and so
  does a chunk larger than ``MAX_CHUNK_SIZE`` (256 MiB; chunks are inflated whole).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from array import array
from collections.abc import Iterator
from typing import Any

from layerstore.common.timefmt import parse_rfc3339_ns
from layerstore.digest import SHA256_DIGEST
from layerstore.errors import LayerStoreError, LimitExceededError, TOCError
from layerstore.estargz.constants import (
    NO_PREFETCH_LANDMARK,
    OPAQUE_WHITEOUT,
    PREFETCH_LANDMARK,
    RESERVED_ROOT_NAMES,
    WHITEOUT_META_PREFIX,
    WHITEOUT_PREFIX,
)
from layerstore.estargz.toc import (
    _BLOCK,
    _CHAR,
    _CHUNK,
    _DIR,
    _FIFO,
    _HARDLINK,
    _REG,
    _SYMLINK,
    _TYPE_CODES,
    _WHITEOUT,
    DEFAULT_MAX_ENTRIES,
    TOCIndex,
)

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_HARDLINK_CHAIN = 256
MAX_CHUNK_SIZE = 256 << 20
"""A chunk is inflated into memory whole; the Go writer's default is 4 MiB."""

_I64 = (1 << 63) - 1
_U32 = (1 << 32) - 1

# --- small parsing helpers ---------------------------------------------------------------------
_BAD_COMPONENT = re.compile(r"(?:^|/)\.{0,2}(?:/|$)")
_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = " \t\n\r"
_is_digest = SHA256_DIGEST.fullmatch


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


def _digest_bytes(v: object, what: str, e: dict[str, Any]) -> bytes:
    """The 32 raw bytes of a digest in layerstore.digest's grammar (lowercase sha256)."""
    if type(v) is str and _is_digest(v) is not None:
        return bytes.fromhex(v[7:])
    raise TOCError(f"TOC entry {_describe(e)}: {what} {str(v)[:80]!r} is not a sha256 digest")


def _utf8_ok(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
                        e, pos = value(pos)
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
        hidden = RESERVED_ROOT_NAMES
        wh = WHITEOUT_PREFIX
        nwh = len(wh)
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
                        try:
                            mtime = parse_rfc3339_ns(mt)
                        except ValueError as exc:
                            raise TOCError(f"modtime {exc}") from None
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
                if base[:nwh] == wh or code == _HARDLINK or (parent == 1 and base in hidden):
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
        if parent == 1 and code == _REG and base in RESERVED_ROOT_NAMES:
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
        if parent == 1 and base in RESERVED_ROOT_NAMES:
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


def build_index(
    into: TOCIndex,
    toc_json: bytes | bytearray | memoryview | str,
    *,
    toc_offset: int,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> TOCIndex:
    """Fill the empty index *into* from *toc_json* (what :meth:`TOCIndex.from_json` calls).

    Raises :class:`TOCError` (or :class:`LimitExceededError`) on any invalid input.
    """
    b = _Builder(toc_offset, max_entries)
    if _fast is not None and not isinstance(toc_json, str):
        # msgspec's path first; anything it does not take is decided by the scan below
        data = toc_json if isinstance(toc_json, (bytes, bytearray)) else bytes(toc_json)
        if _is_utf8(data):
            entries = _fast.decode_entries(data, max_entries)
            del data
            if entries is not None and _fast.run_entries(b, entries):
                del entries
                try:
                    return b.finish(into)
                except (LayerStoreError, TypeError, OverflowError, ValueError):
                    pass
            b = _Builder(toc_offset, max_entries)
        else:
            del data
    if isinstance(toc_json, (bytes, bytearray, memoryview)):
        try:
            text = str(toc_json, "utf-8")  # no intermediate copy of a memoryview
        except UnicodeDecodeError as exc:
            raise TOCError(f"TOC is not UTF-8: {exc}") from None
    else:
        text = toc_json
    try:
        b.run(_iter_toc_entries(text, max_entries))
    except RecursionError:
        raise TOCError("TOC JSON is nested too deeply") from None
    del text
    return b.finish(into)


def _is_utf8(data: bytes | bytearray) -> bool:
    """Whether *data* is valid UTF-8, decoded in pieces (no str of the whole TOC)."""
    if data.isascii():
        return True
    dec = codecs.getincrementaldecoder("utf-8")()
    piece = 1 << 20
    try:
        for i in range(0, len(data), piece):
            dec.decode(data[i : i + piece])
        dec.decode(b"", True)
    except UnicodeDecodeError:
        return False
    return True


def parse_toc(
    toc_json: bytes | str, *, toc_offset: int, max_entries: int = DEFAULT_MAX_ENTRIES
) -> TOCIndex:
    """Parse and validate TOC JSON into a new :class:`TOCIndex` (as :meth:`TOCIndex.from_json`)."""
    return build_index(
        TOCIndex.__new__(TOCIndex), toc_json, toc_offset=toc_offset, max_entries=max_entries
    )


try:  # msgspec is a dependency; without it every TOC takes the scan above
    from layerstore.estargz import tocfast as _fast
except ImportError:  # pragma: no cover
    _fast = None  # type: ignore[assignment]
