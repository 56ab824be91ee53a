"""The loader (``PT_INTERP``) and the ``DT_NEEDED`` libraries named by the head of an ELF file.

Pure and defensive: works on the bytes given (the verified first chunk of a file), only
little-endian 32- and 64-bit ELF; any inconsistency, or data outside the bytes given, yields
``(None, [])`` (or whatever was found before it), never an exception.
"""

from __future__ import annotations

import struct

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5

_MAX_PHDRS = 256
_MAX_DYN = 4096
_MAX_NAME = 4096


def _cstr(data: bytes, off: int) -> str | None:
    if off < 0 or off >= len(data):
        return None
    end = data.find(b"\0", off, off + _MAX_NAME)
    if end < 0:
        return None
    try:
        s = data[off:end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return s or None


def elf_dependencies(data: bytes) -> tuple[str | None, list[str]]:
    """``(interp, needed)`` of the ELF file whose first bytes are *data*."""
    try:
        return _parse(bytes(data))
    except Exception:  # defensive: malformed input never escapes
        return None, []


def _parse(data: bytes) -> tuple[str | None, list[str]]:
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[5] != 1:  # little-endian only
        return None, []
    if data[4] == 2:
        if len(data) < 64:
            return None, []
        (phoff,) = struct.unpack_from("<Q", data, 32)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
        ph_fmt, ph_min, dyn_fmt = "<IIQQQQQQ", 56, "<qQ"
    elif data[4] == 1:
        (phoff,) = struct.unpack_from("<I", data, 28)
        phentsize, phnum = struct.unpack_from("<HH", data, 42)
        ph_fmt, ph_min, dyn_fmt = "<IIIIIIII", 32, "<iI"
    else:
        return None, []
    if phnum == 0 or phnum > _MAX_PHDRS or phentsize < ph_min:
        return None, []
    if phoff <= 0 or phoff + phnum * phentsize > len(data):
        return None, []
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    interp: str | None = None
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        f = struct.unpack_from(ph_fmt, data, phoff + i * phentsize)
        if data[4] == 2:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = f[:6]
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz = f[:5]
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_INTERP and interp is None:
            if p_offset + p_filesz <= len(data) and p_filesz > 0:
                raw = data[p_offset : p_offset + p_filesz].split(b"\0", 1)[0]
                try:
                    interp = raw.decode("utf-8") or None
                except UnicodeDecodeError:
                    interp = None
        elif p_type == PT_DYNAMIC and dynamic is None:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return interp, []
    d_off, d_size = dynamic
    entsize = struct.calcsize(dyn_fmt)
    end = min(d_off + d_size, len(data))
    needed_offs: list[int] = []
    strtab: int | None = None
    n = 0
    pos = d_off
    while pos + entsize <= end and n < _MAX_DYN:
        tag, val = struct.unpack_from(dyn_fmt, data, pos)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed_offs.append(val)
        elif tag == DT_STRTAB:
            strtab = val
        pos += entsize
        n += 1
    if strtab is None or not needed_offs:
        return interp, []
    str_off: int | None = None
    for vaddr, offset, filesz in loads:
        if vaddr <= strtab < vaddr + filesz:
            str_off = offset + (strtab - vaddr)
            break
    if str_off is None or str_off >= len(data):
        return interp, []
    needed: list[str] = []
    for o in needed_offs:
        name = _cstr(data, str_off + o)
        if name is not None and name not in needed:
            needed.append(name)
    return interp, needed
