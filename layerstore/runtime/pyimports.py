"""The modules a Python source or bytecode file imports when it is executed, read from its
bytes without running, compiling or unmarshalling it with CPython's own machinery.

Why not ``ast.parse`` or ``marshal.loads``: the files come from an image, which is untrusted
(its bytes are verified against the image's TOC, which says nothing about their intent), and
both are C code that is documented as, or has been, crashable by crafted input (deeply nested
expressions, malformed code objects). A crash of the daemon is not acceptable, so both scanners
here are plain Python over bytes: memory-safe, bounded in size, depth and count, and they never
raise.

Only *module-level* imports are reported: those run when the module is imported. Imports in
function bodies run later or never, and imports under ``if TYPE_CHECKING:`` never run; both
are skipped (by indentation in source, by code object in bytecode).

* :func:`scan_source` — a single regular expression walks the text, consuming strings and
  comments whole (so an ``import`` inside a docstring is not seen) and stopping at line starts
  (indentation tells function bodies apart), ``import``/``from`` statements, ``def`` and
  ``if TYPE_CHECKING:``. Every alternative that starts a string also accepts the end of the
  input as its end, so the expression never fails part-way and never backtracks over a string:
  linear time.
* :func:`scan_pyc` — a bounded walker of the marshal format that keeps the top-level code
  object's bytecode, constants and names, then decodes ``LOAD_CONST level; LOAD_CONST fromlist;
  IMPORT_NAME name`` sequences. The layout of code objects and the opcode numbers depend on
  the CPython version, known from the file's magic number: 3.7 to 3.13 are understood; any
  other version yields None (nothing is guessed).
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

MAX_SOURCE_BYTES = 4 * 1024 * 1024
"""Larger source files are not scanned."""
MAX_PYC_BYTES = 4 * 1024 * 1024
"""Larger bytecode files are not scanned."""
MAX_IMPORTS = 2000
"""At most this many imports are reported per file."""
_MAX_DEPTH = 48
"""Nesting of marshalled containers (code objects in constants in code objects ...)."""
_MAX_OBJECTS = 2_000_000
_MAX_NAME = 512
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Import(NamedTuple):
    module: str
    """The dotted module name as written, without the leading dots (may be empty:
    ``from . import x``)."""
    level: int
    """0 for an absolute import, else the number of leading dots."""
    names: tuple[str, ...]
    """``from module import names`` (``*`` included as is); empty for ``import module``."""


def _dotted_ok(name: str) -> bool:
    return len(name) <= _MAX_NAME and all(_IDENT.match(p) for p in name.split("."))


# --- source --------------------------------------------------------------------------------

_STRING = (
    # optional prefix, then a triple- or single-quoted string; each also ends at the end of
    # the input (an unterminated string swallows the rest: nothing after it is code anyway)
    r"[rRbBuUfF]{0,2}(?:"
    r"'''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*(?:'''|\Z)"
    r'|"""[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*(?:"""|\Z)'
    r"|'[^'\\\n]*(?:\\.[^'\\\n]*)*(?:'|\n|\Z)"
    r'|"[^"\\\n]*(?:\\.[^"\\\n]*)*(?:"|\n|\Z)'
    r")"
)
_CONT = r"(?:\\\n)?"  # a backslash continuation between tokens
_WS = r"[ \t]*" + _CONT + r"[ \t]*"
_SOURCE = re.compile(
    r"(?P<str>" + _STRING + r")"
    r"|(?P<comment>\#[^\n]*)"
    # statements: at a line start (group ind), or after ';' or ':' on a line (no indentation)
    r"|(?:(?:^(?P<ind>[ \t]*))|(?<=[;:])[ \t]*)(?:"
    r"(?P<from>from"
    + _WS
    + r"(?P<fmod>\.*"
    + _WS
    + r"[\w.]*)"
    + _WS
    + r"import\b"
    + _WS
    + r"(?P<fnames>\([^)]*\)|[^\n;#\\]*(?:\\.[^\n;#\\]*)*))"
    r"|(?P<import>import\b" + _WS + r"(?P<imods>[^\n;#\\]*(?:\\.[^\n;#\\]*)*))"
    r"|(?P<def>(?:async[ \t]+)?def\b)"
    r"|(?P<tc>if[ \t]+(?:typing\.)?TYPE_CHECKING[ \t]*:)"
    r"|(?P<line>(?=[^ \t\n#)\]}]))"
    r")",
    re.MULTILINE | re.DOTALL,
)


_COMMENT = re.compile(r"#[^\n]*")
_STATEMENT_END = re.compile(r"\n(?=\n|[^ \t\n)\]}])")


def _indent(s: str | None) -> int:
    return -1 if s is None else len(s.expandtabs(8))


def _names(text: str) -> list[str]:
    text = _COMMENT.sub("", text.replace("\\\n", " ")).strip()
    if text.startswith("("):
        text = text[1:].rstrip(")")
    out = []
    for part in text.split(","):
        words = part.split()
        if words:
            out.append(words[0])
    return out


def scan_source(data: bytes | str) -> list[Import]:
    """The module-level imports of the Python source *data* (best effort, never raises)."""
    try:
        return _scan_source(data)
    except Exception:  # defensive: odd input never escapes
        return []


def _scan_source(data: bytes | str) -> list[Import]:
    if len(data) > MAX_SOURCE_BYTES:
        return []
    # latin-1 never fails; identifiers that are not ASCII then match nothing, which is fine
    text = data.decode("latin-1") if isinstance(data, (bytes, bytearray)) else data
    # Nothing after the line of the last "import" can be an import: most modules import at
    # the top, so most of the text is never scanned.
    last = text.rfind("import")
    if last < 0:
        return []
    # ... and its continuation lines (indented, or closing a bracket at the margin)
    end = _STATEMENT_END.search(text, last)
    text = text if end is None else text[: end.start() + 1]
    out: list[Import] = []
    # Blocks whose contents do not run at import: (indentation of their header line)
    skip: list[int] = []
    for m in _SOURCE.finditer(text):
        kind = m.lastgroup
        if kind in ("str", "comment"):
            continue
        ind = _indent(m.group("ind"))
        if ind >= 0:  # a line start: leaving the blocks it is not indented into
            while skip and ind <= skip[-1]:
                skip.pop()
        if kind in ("def", "tc"):
            skip.append(ind if ind >= 0 else 1 << 30)
            continue
        if kind == "line" or skip:
            continue
        if m.group("from") is not None:
            raw = re.sub(r"[ \t\\\n]", "", m.group("fmod"))
            module = raw.lstrip(".")
            level = len(raw) - len(module)
            names = tuple(n for n in _names(m.group("fnames")) if n == "*" or _dotted_ok(n))
            if (module and not _dotted_ok(module)) or (not module and not level) or level > 63:
                continue
            out.append(Import(module, level, names))
        elif m.group("import") is not None:
            for name in _names(m.group("imods")):
                if _dotted_ok(name):
                    out.append(Import(name, 0, ()))
        if len(out) >= MAX_IMPORTS:
            break
    return out[:MAX_IMPORTS]


# --- bytecode ------------------------------------------------------------------------------


class _Version(NamedTuple):
    minor: int
    load_const: int
    import_name: int
    extended_arg: int


def pyc_version(magic: int) -> _Version | None:
    """The CPython 3.x release that writes bytecode with this magic number (3.7 to 3.13)."""
    ranges = (
        (3390, 3400, 7),
        (3400, 3420, 8),
        (3420, 3430, 9),
        (3430, 3450, 10),
        (3450, 3500, 11),
        (3500, 3550, 12),
        (3550, 3600, 13),
    )
    for lo, hi, minor in ranges:
        if lo <= magic < hi:
            if minor >= 13:
                return _Version(minor, 83, 75, 71)
            return _Version(minor, 100, 108, 144)
    return None


CO_OPTIMIZED = 0x1
"""Set on the code of functions (and lambdas, comprehensions), not on module or class bodies."""


class _Code:
    __slots__ = ("code", "consts", "flags", "names")

    def __init__(self, flags: int, code: object, consts: object, names: object) -> None:
        self.flags = flags
        self.code = code
        self.consts = consts
        self.names = names


class _Malformed(Exception):
    pass


class _Unmarshal:
    """A bounded reader of CPython's marshal format (``Python/marshal.c``), producing plain
    values: None, bools, ints, floats (as None), str, bytes, tuples (lists, sets and dicts as
    tuples) and :class:`_Code` for code objects."""

    def __init__(self, data: bytes, minor: int) -> None:
        self.data = data
        self.pos = 0
        self.minor = minor
        self.refs: list[object] = []
        self.count = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Malformed("truncated")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def _byte(self) -> int:
        if self.pos >= len(self.data):
            raise _Malformed("truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def _long(self) -> int:
        (v,) = struct.unpack("<i", self._take(4))
        return int(v)

    def _size(self) -> int:
        n = self._long()
        if n < 0 or n > len(self.data):
            raise _Malformed("bad size")
        return n

    def load(self, depth: int = 0) -> object:
        if depth > _MAX_DEPTH:
            raise _Malformed("too deep")
        self.count += 1
        if self.count > _MAX_OBJECTS:
            raise _Malformed("too many objects")
        code = self._byte()
        flag = code & 0x80
        t = chr(code & 0x7F)
        slot = -1
        if flag and t not in "r":
            slot = len(self.refs)
            self.refs.append(None)
        v = self._value(t, depth)
        if slot >= 0:
            self.refs[slot] = v
        return v

    def _value(self, t: str, depth: int) -> object:
        if t in "0NS.":
            return None
        if t == "F":
            return False
        if t == "T":
            return True
        if t == "i":
            return self._long()
        if t == "I":
            self._take(8)
            return None
        if t == "l":
            n = self._long()
            if abs(n) > 1 << 20:
                raise _Malformed("long too long")
            digits = self._take(2 * abs(n))
            v = 0
            for k in range(abs(n) - 1, -1, -1):
                v = (v << 15) | (digits[2 * k] | (digits[2 * k + 1] << 8))
            return -v if n < 0 else v
        if t == "g":
            self._take(8)
            return None
        if t == "y":
            self._take(16)
            return None
        if t == "f":
            self._take(self._byte())
            return None
        if t == "x":
            self._take(self._byte())
            self._take(self._byte())
            return None
        if t == "s":
            return self._take(self._size())
        if t in "tuaA":
            return self._take(self._size()).decode("utf-8", "replace")
        if t in "zZ":
            return self._take(self._byte()).decode("latin-1")
        if t == "r":
            i = self._long()
            if not 0 <= i < len(self.refs):
                raise _Malformed("bad reference")
            return self.refs[i]
        if t == ")":
            return tuple(self.load(depth + 1) for _ in range(self._byte()))
        if t in "([<>":
            return tuple(self.load(depth + 1) for _ in range(self._size()))
        if t == "{":
            items: list[object] = []
            while True:
                if self.pos < len(self.data) and self.data[self.pos] == ord("0"):
                    self.pos += 1
                    return tuple(items)
                items.append(self.load(depth + 1))
                items.append(self.load(depth + 1))
        if t == "c":
            return self._code(depth)
        raise _Malformed(f"type {t!r}")

    def _code(self, depth: int) -> _Code:
        m = self.minor
        # int fields before co_code: argcount, [posonlyargcount], kwonlyargcount, [nlocals],
        # stacksize, flags
        ints = 5 if m == 7 or m >= 11 else 6
        (flags,) = struct.unpack_from("<i", self._take(4 * ints), 4 * (ints - 1))
        code = self.load(depth + 1)
        consts = self.load(depth + 1)
        names = self.load(depth + 1)
        if m >= 11:  # localsplusnames, localspluskinds, filename, name, qualname
            for _ in range(5):
                self.load(depth + 1)
            self._take(4)  # firstlineno
            self.load(depth + 1)  # linetable
            self.load(depth + 1)  # exceptiontable
        else:  # varnames, freevars, cellvars, filename, name
            for _ in range(5):
                self.load(depth + 1)
            self._take(4)  # firstlineno
            self.load(depth + 1)  # lnotab / linetable
        return _Code(int(flags), code, consts, names)


def scan_pyc(data: bytes) -> list[Import] | None:
    """The module-level imports of the bytecode file *data*; None when it cannot be read
    (unknown version, malformed, too large). Never raises."""
    try:
        return _scan_pyc(data)
    except Exception:  # defensive: odd input never escapes
        return None


def _scan_pyc(data: bytes) -> list[Import] | None:
    if len(data) < 17 or len(data) > MAX_PYC_BYTES or data[2:4] != b"\r\n":
        return None
    version = pyc_version(int.from_bytes(data[:2], "little"))
    if version is None:
        return None
    try:
        top = _Unmarshal(bytes(data[16:]), version.minor).load()
    except (_Malformed, RecursionError, struct.error):
        return None
    if not isinstance(top, _Code):
        return None
    out: list[Import] = []
    # The module body, and class bodies in it (they run at import too), not functions.
    todo = [top]
    seen = 0
    while todo and seen < 256 and len(out) < MAX_IMPORTS:
        code = todo.pop(0)
        seen += 1
        _decode_imports(code, version, out)
        consts = code.consts if isinstance(code.consts, tuple) else ()
        todo.extend(c for c in consts if isinstance(c, _Code) and not c.flags & CO_OPTIMIZED)
    return out[:MAX_IMPORTS]


def _import_of(name: object, level: object, fromlist: object) -> Import | None:
    """The import ``LOAD_CONST level; LOAD_CONST fromlist; IMPORT_NAME name`` does."""
    if not isinstance(name, str) or not isinstance(level, int) or isinstance(level, bool):
        return None
    if not 0 <= level < 64 or not ((name == "" and level > 0) or _dotted_ok(name)):
        return None
    items: tuple[str, ...] = ()
    if isinstance(fromlist, tuple):
        items = tuple(n for n in fromlist if isinstance(n, str) and (n == "*" or _dotted_ok(n)))
    return Import(name, level, items)


def _decode_imports(top: _Code, version: _Version, out: list[Import]) -> None:
    """Append the ``IMPORT_NAME`` instructions of *top* (not of code nested in it) to *out*."""
    if not isinstance(top.code, bytes):
        return
    consts = top.consts if isinstance(top.consts, tuple) else ()
    names = top.names if isinstance(top.names, tuple) else ()
    code = top.code
    ext = 0
    recent: list[object] = []  # values of the LOAD_CONSTs just before, most recent last
    marker = object()
    for i in range(0, len(code) - 1, 2):
        op, arg = code[i], code[i + 1] | ext
        if op == version.extended_arg:
            ext = arg << 8
            continue
        ext = 0
        if op == version.load_const:
            recent = [*recent, consts[arg] if arg < len(consts) else marker][-2:]
            continue
        if op == version.import_name and arg < len(names) and len(recent) == 2:
            found = _import_of(names[arg], recent[0], recent[1])
            if found is not None:
                out.append(found)
                if len(out) >= MAX_IMPORTS:
                    return
        if op != 0:  # CACHE entries (3.11+) do not break a LOAD_CONST sequence
            recent = []


# --- extension modules -----------------------------------------------------------------------

# a NUL, a dotted name, a NUL (looked ahead: the NUL starts the next string); simple enough
# for the regex engine to scan ~100 MB/s
_BINARY_NAME = re.compile(rb"\x00([A-Za-z_]\w*(?:\.\w+)+)(?=\x00)")
MAX_BINARY_NAMES = 2000
BOILERPLATE_NAMES = frozenset(("asyncio.coroutines",))
"""Dotted names every Cython module carries for features it rarely uses."""


def dotted_names_in_binary(data: bytes) -> list[str]:
    """Dotted names (``a.b``, ``a.b.c`` ...) stored as C strings in *data*, the bytes of an
    extension module: the modules Cython and C extensions import by name at run time
    (``PyImport_ImportModule("numpy.random._common")``), among other strings. Callers keep
    those that name a module of the image. Never raises."""
    try:
        out: dict[str, None] = {}
        for m in _BINARY_NAME.finditer(data):
            raw = m.group(1)
            if len(raw) > 256 or raw.count(b".") > 8:
                continue
            name = raw.decode("ascii")
            if name not in BOILERPLATE_NAMES and _dotted_ok(name):
                out[name] = None
                if len(out) >= MAX_BINARY_NAMES:
                    break
        return list(out)
    except Exception:  # defensive
        return []
