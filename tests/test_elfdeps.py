"""ELF loader / DT_NEEDED parsing (layerstore.runtime.elfdeps)."""

from __future__ import annotations

import os
import platform
import random
import struct

import pytest

from layerstore.runtime.elfdeps import elf_dependencies


def make_elf(interp: str | None, needed: list[str], *, bits: int = 64, pad: int = 0) -> bytes:
    """A minimal little-endian ELF with PT_LOAD (the whole file at 0x400000), PT_INTERP and
    PT_DYNAMIC (DT_NEEDED..., DT_STRTAB as a virtual address, DT_NULL)."""
    base = 0x400000
    ehsize, phentsize = (64, 56) if bits == 64 else (52, 32)
    phnum = 3
    phoff = ehsize
    body_off = phoff + phnum * phentsize + pad
    strtab = b"\0"
    offs = []
    for n in needed:
        offs.append(len(strtab))
        strtab += n.encode() + b"\0"
    interp_b = (interp.encode() + b"\0") if interp else b""
    interp_off = body_off
    str_off = interp_off + len(interp_b)
    dyn_off = str_off + len(strtab)
    dfmt = "<qQ" if bits == 64 else "<iI"
    dyn = b"".join(struct.pack(dfmt, 1, o) for o in offs)
    dyn += struct.pack(dfmt, 5, base + str_off) + struct.pack(dfmt, 0, 0)
    total = dyn_off + len(dyn)
    if bits == 64:
        eh = b"\x7fELF\x02\x01\x01" + b"\0" * 9
        eh += struct.pack(
            "<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, 0, 0, ehsize, phentsize, phnum, 64, 0, 0
        )

        def ph(t: int, off: int, size: int) -> bytes:
            return struct.pack("<IIQQQQQQ", t, 4, off, base + off, base + off, size, size, 8)
    else:
        eh = b"\x7fELF\x01\x01\x01" + b"\0" * 9
        eh += struct.pack(
            "<HHIIIIIHHHHHH", 3, 3, 1, 0, phoff, 0, 0, ehsize, phentsize, phnum, 40, 0, 0
        )

        def ph(t: int, off: int, size: int) -> bytes:
            return struct.pack("<IIIIIIII", t, off, base + off, base + off, size, size, 4, 4)

    phdrs = ph(1, 0, total)
    phdrs += ph(3, interp_off, len(interp_b)) if interp else ph(4, 0, 0)  # PT_NOTE filler
    phdrs += ph(2, dyn_off, len(dyn))
    out = eh + phdrs + b"\0" * pad + interp_b + strtab + dyn
    assert len(out) == total
    return out


@pytest.mark.parametrize("bits", [64, 32])
def test_synthetic(bits: int) -> None:
    data = make_elf("/lib/ld.so.1", ["libfoo.so.1", "libc.so.6"], bits=bits)
    assert elf_dependencies(data) == ("/lib/ld.so.1", ["libfoo.so.1", "libc.so.6"])
    assert elf_dependencies(make_elf(None, ["libx.so"], bits=bits)) == (None, ["libx.so"])


def test_truncated_and_garbage() -> None:
    data = make_elf("/lib/ld.so.1", ["libfoo.so.1"])
    for n in range(len(data)):
        interp, needed = elf_dependencies(data[:n])
        assert needed in ([], ["libfoo.so.1"])  # only names wholly inside the bytes given
        if n < len(data) - 32:  # DT_NEEDED itself cut off
            assert needed == []
        assert interp in (None, "/lib/ld.so.1")
    assert elf_dependencies(b"") == (None, [])
    assert elf_dependencies(b"\x7fELF") == (None, [])
    assert elf_dependencies(b"#!/bin/sh\necho hi\n" * 10) == (None, [])
    assert elf_dependencies(b"\x7fELF\x02\x02" + b"\0" * 100) == (None, [])  # big-endian
    r = random.Random(7)
    assert elf_dependencies(bytes(r.randrange(256) for _ in range(4096))) == (None, [])
    for _ in range(2000):  # corrupted headers: any result, but no exception
        b = bytearray(data)
        for _ in range(4):
            b[r.randrange(len(b))] = r.randrange(256)
        interp, needed = elf_dependencies(bytes(b))
        assert interp is None or isinstance(interp, str)
        assert all(isinstance(n, str) for n in needed)


def test_static_busybox() -> None:
    if not os.path.exists("/bin/busybox"):
        pytest.skip("no /bin/busybox on this machine")
    with open("/bin/busybox", "rb") as f:
        assert elf_dependencies(f.read()) == (None, [])


@pytest.mark.skipif(
    platform.machine() != "x86_64", reason="checks the x86_64 loader name (ld-linux-x86-64.so.2)"
)
@pytest.mark.parametrize("path", ["/usr/bin/python3.11", "/bin/ls"])
def test_real_dynamic_executable(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"no {path} on this machine")
    with open(path, "rb") as f:
        data = f.read()
    interp, needed = elf_dependencies(data)
    assert interp is not None and interp.endswith("ld-linux-x86-64.so.2")
    assert "libc.so.6" in needed
    # the headers alone (the dynamic section lies further on): no exception, no names
    assert elf_dependencies(data[:4096])[1] in ([], needed)


def make_elf_paths(
    needed: list[str], *, runpath: str | None = None, rpath: str | None = None, gap: int = 0
) -> bytes:
    """A 64-bit ELF whose string table comes first and whose dynamic segment lies *gap* bytes
    further (as in a large library, where it is near the end), with DT_RUNPATH / DT_RPATH."""
    base = 0x400000
    phoff, phentsize, phnum = 64, 56, 2
    str_off = phoff + phnum * phentsize
    strtab = b"\0"
    offs = {}
    for n in [*needed, *(x for x in (runpath, rpath) if x)]:
        offs[n] = len(strtab)
        strtab += n.encode() + b"\0"
    dyn_off = str_off + len(strtab) + gap
    dyn = b"".join(struct.pack("<qQ", 1, offs[n]) for n in needed)
    if runpath:
        dyn += struct.pack("<qQ", 29, offs[runpath])
    if rpath:
        dyn += struct.pack("<qQ", 15, offs[rpath])
    dyn += struct.pack("<qQ", 5, base + str_off) + struct.pack("<qQ", 10, len(strtab))
    dyn += struct.pack("<qQ", 0, 0)
    total = dyn_off + len(dyn)
    eh = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    eh += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, 0, 0, 64, phentsize, phnum, 64, 0, 0)

    def ph(t: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQQQ", t, 4, off, base + off, base + off, size, size, 8)

    out = eh + ph(1, 0, total) + ph(2, dyn_off, len(dyn)) + strtab + b"\0" * gap + dyn
    assert len(out) == total
    return out


def test_runpath_and_rpath() -> None:
    from layerstore.runtime.elfdeps import elf_info

    d = elf_info({0: make_elf_paths(["liba.so"], runpath="$ORIGIN/../libs:/opt/x")})
    assert d.is_elf and d.needed == ["liba.so"] and not d.wants
    assert d.runpath == ["$ORIGIN/../libs", "/opt/x"] and d.rpath == []
    d = elf_info({0: make_elf_paths(["liba.so"], rpath="/old")})
    assert d.rpath == ["/old"] and d.runpath == []


def test_dynamic_segment_beyond_the_pieces_given() -> None:
    from layerstore.runtime.elfdeps import elf_info

    data = make_elf_paths(["libfar.so", "libc.so.6"], runpath="$ORIGIN", gap=100_000)
    head = data[:8192]
    d = elf_info({0: head})
    assert d.is_elf and d.needed == [] and len(d.wants) == 1
    off, n = d.wants[0]
    assert off == len(data) - n  # the dynamic segment, at the end
    # the missing piece given at its offset (as a later chunk would be): complete answer
    chunk = 16384
    pieces = {0: data[:chunk], (off // chunk) * chunk: data[(off // chunk) * chunk :]}
    d = elf_info(pieces)
    assert d.needed == ["libfar.so", "libc.so.6"] and d.runpath == ["$ORIGIN"] and not d.wants
    # pieces that do not join (a hole in the middle) never read across the hole
    assert elf_info({0: data[:100], 200: data[200:]}).needed == []
    # not ELF: nothing wanted
    assert elf_info({0: b"#!/bin/sh\n" * 100}) == elf_info({})
    assert not elf_info({0: b"#!/bin/sh\n"}).is_elf
