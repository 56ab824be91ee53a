"""The loader (``PT_INTERP``), the ``DT_NEEDED`` libraries and the library search path
(``DT_RUNPATH`` / ``DT_RPATH``) of an ELF file, from some of its bytes.

Pure and defensive: works on the pieces given (verified chunks of a file, by file offset),
only little-endian 32- and 64-bit ELF; any inconsistency yields whatever was found before it,
never an exception. When the dynamic segment or its string table lies outside the pieces
given (a large library whose first chunk holds only the headers), :attr:`ElfDeps.wants` names
the file ranges that would complete the answer, so that a caller can fetch those chunks and
ask again.
"""

from __future__ import annotations

import bisect
import contextlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

LIBRARY_DIRS = (
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
    "usr/local/lib",
)
"""Where the loader looks for a library when the object names no path (``ld.so.cache`` on
Debian, Fedora and Alpine covers these)."""


PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
PF_W = 2
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_INIT = 12
DT_RPATH = 15
DT_RUNPATH = 29

_MAX_PHDRS = 256
_MAX_DYN = 4096
_MAX_NAME = 4096


@dataclass
class ElfDeps:
    interp: str | None = None
    needed: list[str] = field(default_factory=list)
    runpath: list[str] = field(default_factory=list)
    """``DT_RUNPATH`` entries (``$ORIGIN`` not expanded)."""
    rpath: list[str] = field(default_factory=list)
    """``DT_RPATH`` entries (used only when there is no ``DT_RUNPATH``)."""
    early: list[tuple[int, int]] = field(default_factory=list)
    """File ranges ``(offset, length)`` the loader touches right after the headers: the
    writable ``PT_LOAD`` segments (relocations write the GOT and data), ``PT_DYNAMIC``, and
    the first page of the ``DT_INIT`` function (run when the object is loaded)."""
    wants: list[tuple[int, int]] = field(default_factory=list)
    """File ranges ``(offset, length)`` missing from the pieces given that hold the dynamic
    segment or its strings; empty when the answer is complete (or the file is no ELF)."""
    is_elf: bool = False


class _View:
    """Bytes of a file known at some offsets (contiguous pieces are joined on demand)."""

    def __init__(self, pieces: Mapping[int, bytes]) -> None:
        items = sorted((int(o), bytes(b)) for o, b in pieces.items() if o >= 0 and b)
        self._starts = [o for o, _ in items]
        self._data = [b for _, b in items]

    def get(self, off: int, n: int) -> bytes | None:
        """*n* bytes at *off*, or None when any of them is unknown."""
        if off < 0 or n < 0:
            return None
        i = bisect.bisect_right(self._starts, off) - 1
        out = b""
        pos = off
        end = off + n
        while pos < end:
            if i < 0 or i >= len(self._starts):
                return None
            start, data = self._starts[i], self._data[i]
            if not start <= pos < start + len(data):
                return None
            take = data[pos - start : min(end - start, len(data))]
            out += take
            pos += len(take)
            i += 1
        return out

    def cstr(self, off: int) -> str | None:
        """The NUL-terminated string at *off* (at most ``_MAX_NAME`` bytes), if known."""
        i = bisect.bisect_right(self._starts, off) - 1
        if i < 0 or off < 0:
            return None
        start, data = self._starts[i], self._data[i]
        if off >= start + len(data):
            return None
        end = data.find(b"\0", off - start, off - start + _MAX_NAME)
        raw: bytes | None
        if end < 0:  # may continue in the next piece
            raw = self.get(off, min(_MAX_NAME, start + len(data) - off + _MAX_NAME))
            if raw is None or b"\0" not in raw:
                return None
            raw = raw.split(b"\0", 1)[0]
        else:
            raw = data[off - start : end]
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return s or None


def elf_dependencies(data: bytes) -> tuple[str | None, list[str]]:
    """``(interp, needed)`` of the ELF file whose first bytes are *data*."""
    deps = elf_info({0: data})
    return deps.interp, deps.needed


def elf_info(pieces: Mapping[int, bytes]) -> ElfDeps:
    """What the ELF file whose bytes at some offsets are *pieces* needs (see :class:`ElfDeps`)."""
    out = ElfDeps()
    with contextlib.suppress(Exception):  # defensive: malformed input never escapes
        _parse(_View(pieces), out)
    return out


def _split_path(s: str | None) -> list[str]:
    return [p for p in (s or "").split(":") if p]


def _parse(v: _View, out: ElfDeps) -> None:
    head = v.get(0, 64) or v.get(0, 52)
    if head is None or head[:4] != b"\x7fELF" or head[5] != 1:  # little-endian only
        return
    cls = head[4]
    if cls == 2:
        if len(head) < 64:
            return
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        ph_fmt, ph_min, dyn_fmt = "<IIQQQQQQ", 56, "<qQ"
    elif cls == 1:
        (phoff,) = struct.unpack_from("<I", head, 28)
        phentsize, phnum = struct.unpack_from("<HH", head, 42)
        ph_fmt, ph_min, dyn_fmt = "<IIIIIIII", 32, "<iI"
    else:
        return
    out.is_elf = True
    if phnum == 0 or phnum > _MAX_PHDRS or phentsize < ph_min or phoff <= 0:
        return
    phdrs = v.get(phoff, phnum * phentsize)
    if phdrs is None:
        out.wants.append((phoff, phnum * phentsize))
        return
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        f = struct.unpack_from(ph_fmt, phdrs, i * phentsize)
        if cls == 2:
            p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz = f[:6]
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz, _memsz, p_flags = f[:7]
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
            if p_flags & PF_W and p_filesz > 0:
                out.early.append((p_offset, p_filesz))
        elif p_type == PT_INTERP and out.interp is None and 0 < p_filesz <= _MAX_NAME:
            raw = v.get(p_offset, p_filesz)
            if raw is not None:
                try:
                    out.interp = raw.split(b"\0", 1)[0].decode("utf-8") or None
                except UnicodeDecodeError:
                    out.interp = None
        elif p_type == PT_DYNAMIC and dynamic is None:
            dynamic = (p_offset, p_filesz)
            if p_filesz > 0:
                out.early.append((p_offset, p_filesz))
    if dynamic is None:
        return
    d_off, d_size = dynamic
    entsize = struct.calcsize(dyn_fmt)
    d_size = min(d_size, _MAX_DYN * entsize)
    dyn = v.get(d_off, d_size)
    if dyn is None:
        if d_size > 0:
            out.wants.append((d_off, d_size))
        return
    needed_offs: list[int] = []
    runpath: list[int] = []
    rpath: list[int] = []
    strtab: int | None = None
    init: int | None = None
    strsz = 0
    pos = 0
    while pos + entsize <= len(dyn):
        tag, val = struct.unpack_from(dyn_fmt, dyn, pos)
        pos += entsize
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed_offs.append(val)
        elif tag == DT_STRTAB:
            strtab = val
        elif tag == DT_STRSZ:
            strsz = val
        elif tag == DT_RUNPATH:
            runpath.append(val)
        elif tag == DT_RPATH:
            rpath.append(val)
        elif tag == DT_INIT:
            init = val
    if init is not None:
        for vaddr, offset, filesz in loads:
            if vaddr <= init < vaddr + filesz:
                out.early.append((offset + (init - vaddr), 4096))
                break
    if strtab is None or not (needed_offs or runpath or rpath):
        return
    str_off: int | None = None
    for vaddr, offset, filesz in loads:
        if vaddr <= strtab < vaddr + filesz:
            str_off = offset + (strtab - vaddr)
            break
    if str_off is None:
        return
    missing = False
    for o in needed_offs:
        name = v.cstr(str_off + o)
        if name is None:
            missing = True
        elif name not in out.needed:
            out.needed.append(name)
    for offs, dest in ((runpath, out.runpath), (rpath, out.rpath)):
        for o in offs:
            s = v.cstr(str_off + o)
            if s is None:
                missing = True
            else:
                dest.extend(p for p in _split_path(s) if p not in dest)
    if missing and 0 < strsz <= 16 * 1024 * 1024:
        out.wants.append((str_off, strsz))
