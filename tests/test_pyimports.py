"""The Python import scanners (layerstore.runtime.pyimports): what they find in source and in
bytecode, and that hostile input (huge, deeply nested, garbage, truncated) neither raises nor
hangs."""

from __future__ import annotations

import glob
import importlib.util
import marshal
import os
import random
import struct
import sys

import pytest

from layerstore.runtime.pyimports import (
    MAX_IMPORTS,
    MAX_PYC_BYTES,
    MAX_SOURCE_BYTES,
    Import,
    pyc_version,
    scan_pyc,
    scan_source,
)

SOURCE = '''"""Docstring that mentions
import not_a_module
from nowhere import nothing
"""
import os, sys as system
import a.b.c
from . import sibling, other as o
from .sub.mod import (
    x,   # a comment, import commented
    y as z,
)
from ..up import thing
from pkg.mod import \\
    first, \\
    second
# import commented_out
s = "import in a string"
t = \'\'\'
import in_triple
\'\'\'
try:
    import fast_json as json
except ImportError:
    import json

if sys.version_info >= (3, 8):
    from typing import Protocol

if TYPE_CHECKING:
    from heavy import Thing

if typing.TYPE_CHECKING:
    import heavier


def f(
    arg,
):
    import lazy_inside_function
    return arg


async def g():
    from lazy_async import q


class C:
    import in_class_body

    def method(self):
        import in_method


x = 1; import after_semicolon
if True: import after_colon
'''

EXPECTED = [
    Import("os", 0, ()),
    Import("sys", 0, ()),
    Import("a.b.c", 0, ()),
    Import("", 1, ("sibling", "other")),
    Import("sub.mod", 1, ("x", "y")),
    Import("up", 2, ("thing",)),
    Import("pkg.mod", 0, ("first", "second")),
    Import("fast_json", 0, ()),
    Import("json", 0, ()),
    Import("typing", 0, ("Protocol",)),
    Import("in_class_body", 0, ()),
    Import("after_semicolon", 0, ()),
    Import("after_colon", 0, ()),
]


def test_source_module_level_imports() -> None:
    assert scan_source(SOURCE.encode()) == EXPECTED
    assert scan_source(SOURCE) == EXPECTED


def pyc_of(source: str) -> bytes:
    """Timestamp bytecode of *source* for this interpreter, as ``py_compile`` writes it."""
    code = compile(source, "<test>", "exec")
    return importlib.util.MAGIC_NUMBER + struct.pack("<III", 0, 0, 0) + marshal.dumps(code)


def test_bytecode_module_level_imports() -> None:
    if pyc_version(int.from_bytes(importlib.util.MAGIC_NUMBER[:2], "little")) is None:
        pytest.skip(f"bytecode of Python {sys.version_info[:2]} is not understood")
    got = scan_pyc(pyc_of(SOURCE))
    # Bytecode keeps what TYPE_CHECKING guards (a run-time test); the rest is the same.
    assert got == [
        *EXPECTED[:10],
        Import("heavy", 0, ("Thing",)),
        Import("heavier", 0, ()),
        *EXPECTED[11:],
        Import("in_class_body", 0, ()),
    ]


@pytest.mark.skipif(not os.path.isdir(sys.prefix + "/lib"), reason="no standard library here")
def test_source_and_bytecode_agree_on_the_standard_library() -> None:
    if pyc_version(int.from_bytes(importlib.util.MAGIC_NUMBER[:2], "little")) is None:
        pytest.skip(f"bytecode of Python {sys.version_info[:2]} is not understood")
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(f"{stdlib}/*.py")) + sorted(glob.glob(f"{stdlib}/*/*.py"))
    assert len(files) > 100
    for path in files[:400]:
        with open(path, "rb") as f:
            src = f.read()
        if b"TYPE_CHECKING" in src:
            continue
        try:
            pyc = pyc_of(src.decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        a = {(i.module, i.level, i.names) for i in scan_source(src)}
        b = {(i.module, i.level, i.names) for i in scan_pyc(pyc) or []}
        assert a == b, path


def test_versions_by_magic() -> None:
    assert pyc_version(3413) is not None and pyc_version(3413).minor == 8  # type: ignore[union-attr]
    assert pyc_version(3495).minor == 11  # type: ignore[union-attr]
    assert pyc_version(3571).minor == 13  # type: ignore[union-attr]
    assert pyc_version(3571).import_name == 75  # type: ignore[union-attr]
    assert pyc_version(3379) is None  # 3.6
    assert pyc_version(3600) is None  # not known yet
    assert scan_pyc(struct.pack("<H", 3000) + b"\r\n" + b"\0" * 40) is None


# --- bytecode of other CPython versions: a marshal writer for their code object layout -------


def _w_str(s: str) -> bytes:
    b = s.encode()
    return b"z" + bytes([len(b)]) + b if len(b) < 256 else b"u" + struct.pack("<i", len(b)) + b


def _w(obj: object) -> bytes:
    if obj is None:
        return b"N"
    if isinstance(obj, int):
        return b"i" + struct.pack("<i", obj)
    if isinstance(obj, str):
        return _w_str(obj)
    if isinstance(obj, bytes):
        return b"s" + struct.pack("<i", len(obj)) + obj
    if isinstance(obj, tuple):
        return b"(" + struct.pack("<i", len(obj)) + b"".join(_w(x) for x in obj)
    raise TypeError(obj)


def _code_38(code: bytes, consts: tuple[object, ...], names: tuple[str, ...]) -> bytes:
    """A 3.8-3.10 code object: six int fields, then code, consts, names, varnames, freevars,
    cellvars, filename, name, firstlineno, lnotab."""
    out = b"c" + struct.pack("<iiiiii", 0, 0, 0, 0, 2, 64)
    out += _w(code) + _w(consts) + _w(names)
    out += _w(()) + _w(()) + _w(()) + _w("<x>") + _w("<module>")
    return out + struct.pack("<i", 1) + _w(b"")


def test_bytecode_layout_of_3_8_to_3_10() -> None:
    # from . import a ; import b.c  (LOAD_CONST 100, IMPORT_NAME 108, EXTENDED_ARG 144)
    consts = (1, ("a",), 0, None)
    names = ("", "a", "b.c")
    code = bytes([100, 0, 100, 1, 108, 0, 109, 1, 100, 2, 100, 3, 108, 2, 83, 0])
    body = _code_38(code, consts, names)
    for magic in (3413, 3425, 3439):
        pyc = struct.pack("<H", magic) + b"\r\n" + b"\0" * 12 + body
        assert scan_pyc(pyc) == [Import("", 1, ("a",)), Import("b.c", 0, ())]
    # EXTENDED_ARG: name index 256
    many = (*(f"n{i}" for i in range(256)), "big.name")
    code = bytes([100, 2, 100, 3, 144, 1, 108, 0, 83, 0])
    pyc = struct.pack("<H", 3413) + b"\r\n" + b"\0" * 12 + _code_38(code, consts, many)
    assert scan_pyc(pyc) == [Import("big.name", 0, ())]


# --- hostile input -----------------------------------------------------------------------


def test_source_hostile_input_never_raises() -> None:
    r = random.Random(11)
    cases: list[bytes] = [
        b"",
        b"import",
        b"from",
        b"from . import",
        b"import ;;;",
        b"\xff\xfe\x00import os\x00",
        bytes(r.randrange(256) for _ in range(200_000)),
        b"'''" + b"import x\n" * 10_000,  # unterminated triple-quoted string
        b'"' * 100_000 + b"\nimport y\n",
        b"(" * 200_000 + b"\nimport z\n",
        b"\\\n" * 100_000 + b"import w\n",
        b"import " + b"a." * 100_000 + b"b\n",
        b"from " + b"." * 100_000 + b" import x\n",
        b"def f(:\n" * 20_000 + b"import v\n",
        b" " * 500_000 + b"import u\n",
        b"import a\n" * (MAX_IMPORTS + 10),
    ]
    for data in cases:
        got = scan_source(data)
        assert isinstance(got, list)
        assert len(got) <= MAX_IMPORTS
        assert all(isinstance(i, Import) for i in got)
    assert scan_source(b"import os\n" + b"#" * (MAX_SOURCE_BYTES + 1)) == []  # too large
    # names longer than any module name are dropped, the rest kept
    assert scan_source(b"import " + b"a" * 1000 + b", ok\n") == [Import("ok", 0, ())]
    assert scan_source(b"'''" + b"import x\n" * 10) == []
    assert scan_source(b'"' * 60_000 + b"\nimport y\n") == [Import("y", 0, ())]  # closed
    assert scan_source(b"from " + b"." * 100 + b" import x\n") == []  # no such depth


def _pyc(body: bytes, magic: bytes = importlib.util.MAGIC_NUMBER) -> bytes:
    return magic + b"\0" * 12 + body


def test_bytecode_hostile_input_never_raises() -> None:
    magic = struct.pack("<H", 3495) + b"\r\n"
    r = random.Random(5)
    real = pyc_of(SOURCE)
    cases: list[bytes] = [
        b"",
        real[:20],
        _pyc(b"(" + struct.pack("<i", 1) * 100_000, magic),  # tuples nested 100,000 deep
        _pyc(b")\x01" * 500_000, magic),
        _pyc(b"[" + struct.pack("<i", 2**31 - 1), magic),  # size beyond the data
        _pyc(b"r" + struct.pack("<i", 12345), magic),  # reference to nothing
        _pyc(b"\xda\x05hello" + b"r" + struct.pack("<i", -1), magic),
        _pyc(b"l" + struct.pack("<i", 2**30), magic),  # a huge long
        _pyc(b"{" + b"N" * 100_000, magic),  # dict without end
        _pyc(b"c" + b"\0" * 20 + b"c" * 50_000, magic),  # code in code in code ...
        _pyc(b"?", magic),
        _pyc(bytes(r.randrange(256) for _ in range(100_000)), magic),
    ]
    for _ in range(300):  # the real bytecode with a few bytes changed
        b = bytearray(real)
        for _ in range(3):
            b[r.randrange(16, len(b))] = r.randrange(256)
        cases.append(bytes(b))
    for _ in range(100):  # and cut short
        cases.append(real[: r.randrange(len(real))])
    for data in cases:
        got = scan_pyc(data)
        assert got is None or (isinstance(got, list) and all(isinstance(i, Import) for i in got))
    assert scan_pyc(_pyc(b"(" + struct.pack("<i", 1) * 100_000, magic)) is None
    assert scan_pyc(real[:100]) is None
    assert scan_pyc(real + b"\0" * MAX_PYC_BYTES) is None  # too large
