"""The gzip decoder every reader of layer bytes uses: ``zlib_ng`` (python-zlib-ng, a port of
CPython's ``zlib`` module onto zlib-ng) when it is installed, else the standard ``zlib``.

Why: inflating is most of the CPU a cold start spends on layer data (every chunk a container
reads, the TOC, the background fill's whole-blob check), and zlib-ng inflates 1.5-1.7x faster
than the system zlib here (benchmarks/inflate_bench.py). Its module keeps the standard one's
interface and behaviour: the same ``decompressobj`` states (``eof``, ``unused_data``,
``unconsumed_tail``), the same output limits and the same errors on bad input, which
tests/test_inflate.py checks step by step on valid, truncated, corrupted and padded
multi-member streams, so the loops above it behave the same with either.

The converter (layerstore/estargz/writer.py) stays on the standard ``zlib``, for reading its
source layers too: what it writes is part of the converted image and must not depend on what
is installed.
"""

from __future__ import annotations

import types
import zlib
from typing import Any

_impl: types.ModuleType
try:
    from zlib_ng import zlib_ng as _impl
except ImportError:  # pragma: no cover (a dependency; optional at run time)
    _impl = zlib

IMPLEMENTATION = "zlib-ng" if _impl is not zlib else "zlib"
"""Which decoder this process uses (logged by the daemon at start)."""

GZIP_WBITS = 31
"""``wbits`` for a gzip member (header and trailer checked)."""

ERRORS: tuple[type[Exception], ...] = (zlib.error,) if _impl is zlib else (zlib.error, _impl.error)
"""What the decoder raises on bad input."""


def gunzip_object() -> Any:
    """A decompression object for one gzip member (``zlib.decompressobj(31)`` semantics)."""
    return _impl.decompressobj(GZIP_WBITS)
