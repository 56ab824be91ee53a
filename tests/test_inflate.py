"""The gzip decoder (layerstore/estargz/inflate.py): zlib-ng must behave as the standard zlib,
state by state, on valid, truncated, corrupted and padded multi-member streams, so that the
loops built on zlib's semantics (reader, blob check, converter) behave the same with either."""

from __future__ import annotations

import gzip
import random
import zlib
from typing import Any

import pytest

from layerstore.errors import FormatError
from layerstore.estargz import inflate

zlib_ng = pytest.importorskip(
    "zlib_ng.zlib_ng", reason="zlib-ng is not installed: the store uses the standard zlib"
)


def _steps(mod: Any, data: bytes, limits: list[int]) -> list[tuple[Any, ...]]:
    """Every state a member-by-member inflate loop sees, with output limits cycling through
    *limits*; an error ends the trace with its kind."""
    trace: list[tuple[Any, ...]] = []
    d = mod.decompressobj(31)
    buf = data
    for i in range(20_000):
        limit = limits[i % len(limits)]
        try:
            out = d.decompress(buf, limit)
        except mod.error:
            trace.append(("error",))
            break
        trace.append((out, d.eof, bytes(d.unused_data), bytes(d.unconsumed_tail)))
        if d.eof:
            buf = d.unused_data
            if not buf:
                break
            d = mod.decompressobj(31)
        else:
            buf = d.unconsumed_tail
            if not buf and len(out) < limit:
                break
    return trace


def _stream(rnd: random.Random) -> bytes:
    members = [
        gzip.compress(bytes(rnd.choices(b"ab\x00xyz\n", k=rnd.randint(0, 4000))), rnd.randint(1, 9))
        for _ in range(rnd.randint(1, 3))
    ]
    data = b"".join(members)
    kind = rnd.random()
    if kind < 0.2:  # truncated
        data = data[: rnd.randint(0, len(data))]
    elif kind < 0.4:  # one bit flipped
        ba = bytearray(data)
        ba[rnd.randrange(len(ba))] ^= 1 << rnd.randrange(8)
        data = bytes(ba)
    elif kind < 0.5:  # trailing padding or garbage
        data += bytes(rnd.choices(b"\x00\x1f\x8b\x08", k=rnd.randint(1, 24)))
    return data


def test_zlib_ng_steps_like_zlib() -> None:
    rnd = random.Random(20261202)
    for _ in range(1500):
        data = _stream(rnd)
        limits = [rnd.randint(1, 6000) for _ in range(5)]
        assert _steps(zlib_ng, data, limits) == _steps(zlib, data, limits), data[:64]


def test_the_store_uses_zlib_ng_when_installed() -> None:
    assert inflate.IMPLEMENTATION == "zlib-ng"
    assert type(inflate.gunzip_object()).__module__.startswith("zlib_ng")
    assert zlib_ng.error in inflate.ERRORS and zlib.error in inflate.ERRORS


def test_chunk_and_toc_errors_are_format_errors() -> None:
    """A zlib-ng error surfaces as the reader's FormatError, as zlib's did."""
    from layerstore.estargz.reader import inflate_toc_member

    good = gzip.compress(b"x" * 1000)
    bad = bytearray(good)
    bad[12] ^= 0xFF  # inside the deflate stream
    with pytest.raises(FormatError):
        inflate_toc_member(bytes(bad))
    with pytest.raises(FormatError, match="truncated"):
        inflate_toc_member(good[:-12])
