"""Tar header numbers and checksums (``layerstore.estargz.tarfmt``), and the reader and the
writer agreeing on them (they had one parser each, which disagreed on negative values)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerstore.errors import FormatError
from layerstore.estargz.reader import extract_toc_json
from layerstore.estargz.tarfmt import header_checksum_ok, parse_number, parse_pax_int
from layerstore.estargz.writer import TarFormatError, write_estargz
from tests.estargz_util import tar_header


def gnu_field(n: int, digits: int = 12) -> bytes:
    """Python's own tar writer as the oracle: octal when it fits, else GNU base-256."""
    return tarfile.itn(n, digits, tarfile.GNU_FORMAT)


# --- numbers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"0000644\x00", 0o644),
        (b"  644 \x00\x00", 0o644),
        (b"00000000012\x00", 10),
        (b"\x00" * 8, 0),
        (b" " * 8, 0),
        (b"", 0),
        (b"\x80" + (5).to_bytes(11, "big"), 5),
        (b"\x80" + (2**40).to_bytes(11, "big"), 2**40),
    ],
)
def test_parse_number(field: bytes, value: int) -> None:
    assert parse_number(field, "f") == value


@pytest.mark.parametrize(
    "field",
    [b"-5\x00", b"+5\x00", b"1_0\x00", b"12\x0034\x00", b"9\x00", b"0o7\x00", b"\t7\x00", b"x"],
)
def test_malformed_octal_is_refused(field: bytes) -> None:
    with pytest.raises(FormatError, match="bad octal number"):
        parse_number(field, "f")


@given(st.integers(min_value=-(256**11), max_value=256**11 - 1))
def test_base256_and_octal_round_trip_with_pythons_tarfile(n: int) -> None:
    field = gnu_field(n)
    assert parse_number(field, "f", signed=True) == n
    assert tarfile.nti(field) == n  # the oracle agrees with itself
    if n >= 0:
        assert parse_number(field, "f") == n
    else:
        with pytest.raises(FormatError, match="negative number in tar header field f"):
            parse_number(field, "f")


def test_negative_base256_values() -> None:
    assert parse_number(b"\xff" * 8, "mtime", signed=True) == -1
    # any first byte with bit 6 set is negative (the old writer read 0xc0..0xfe as positive)
    assert parse_number(b"\xc0" + bytes(7), "mtime", signed=True) == -(2**62)
    for field in (b"\xff" * 12, b"\xc0" + bytes(11), b"\xfe" + b"\xff" * 11):
        with pytest.raises(TarFormatError, match="negative"):
            parse_number(field, "size", error=TarFormatError)


def test_parse_pax_int() -> None:
    assert parse_pax_int(b"123", "size") == 123
    assert parse_pax_int(b"-7", "uid", signed=True) == -7
    for bad in (b"-7", b"", b" 1", b"1 ", b"+1", b"1_0", b"0x10", b"\xd9\xa1"):
        with pytest.raises(TarFormatError, match="bad PAX size"):
            parse_pax_int(bad, "size", error=TarFormatError)


# --- checksums ----------------------------------------------------------------------------------
def _with_checksum(block: bytes, checksum: int) -> bytes:
    b = bytearray(block)
    b[148:156] = b"%06o\x00 " % checksum
    return bytes(b)


def test_checksum_unsigned_and_signed() -> None:
    hdr = tar_header("dé/f", 3)  # UTF-8 name: bytes >= 0x80 make the two sums differ
    assert header_checksum_ok(hdr)
    body = hdr[:148] + b" " * 8 + hdr[156:]
    unsigned = sum(body)
    high = sum(1 for b in body if b & 0x80)
    assert high > 0
    signed = unsigned - 256 * high  # what a tar writer using signed chars stored
    assert header_checksum_ok(_with_checksum(hdr, signed))
    # the old reader's formula (unsigned - 2 * sum of the high bytes) is no checksum at all
    wrong = unsigned - 2 * sum(b for b in body if b & 0x80)
    assert wrong not in (signed, unsigned) and wrong > 0
    assert not header_checksum_ok(_with_checksum(hdr, wrong))
    assert not header_checksum_ok(_with_checksum(hdr, unsigned + 1))


def test_checksum_field_must_be_octal() -> None:
    hdr = bytearray(tar_header("a", 0))
    hdr[148:156] = b"\x80" + bytes(7)  # base-256 is not allowed here
    with pytest.raises(FormatError):
        header_checksum_ok(bytes(hdr))


# --- the reader and the writer agree ------------------------------------------------------------
def _tar(**attrs: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = 1
        for k, v in attrs.items():
            setattr(ti, k, v)
        tf.addfile(ti, io.BytesIO(b"x"))
    return buf.getvalue()


def _convert(tar: bytes) -> bytes:
    out = io.BytesIO()
    write_estargz(io.BytesIO(tar), out)
    return out.getvalue()


def _toc_entry(blob: bytes, name: str) -> dict[str, Any]:
    plain = gzip.decompress(blob)
    toc = json.loads(extract_toc_json(plain[plain.rindex(b"stargz.index.json\x00") :]))
    return next(e for e in toc["entries"] if e["name"] == name)


def test_writer_keeps_a_negative_mtime() -> None:
    tar = _tar(mtime=-86400)
    assert tar[136] & 0xC0 == 0xC0  # base-256, negative
    assert _toc_entry(_convert(tar), "f")["modtime"] == "1969-12-31T00:00:00Z"


@pytest.mark.parametrize("attr", ["uid", "gid"])
def test_writer_refuses_negative_ids(attr: str) -> None:
    with pytest.raises(TarFormatError, match=f"negative number in tar header field {attr}"):
        _convert(_tar(**{attr: -1}))


def test_writer_refuses_a_size_with_the_sign_bit() -> None:
    tar = bytearray(_tar())
    tar[124:136] = b"\xc0" + bytes(10) + b"\x01"  # the old writer read this as 2**62 + 1
    tar[148:156] = b"%06o\x00 " % (sum(tar[:148]) + 256 + sum(tar[156:512]))
    with pytest.raises(TarFormatError, match="negative number in tar header field size"):
        _convert(bytes(tar))


def test_reader_refuses_a_negative_toc_size() -> None:
    toc = b'{"version":1,"entries":[]}'
    hdr = bytearray(tar_header("stargz.index.json", len(toc)))
    hdr[124:136] = b"\xff" * 12
    hdr[148:156] = b"%06o\x00 " % (sum(hdr[:148]) + 256 + sum(hdr[156:]))
    with pytest.raises(FormatError, match="negative number in tar header field size in the TOC"):
        extract_toc_json(bytes(hdr) + toc + bytes(512 - len(toc)))
    hdr[124:136] = b"-0000000033\x00"
    hdr[148:156] = b"%06o\x00 " % (sum(hdr[:148]) + 256 + sum(hdr[156:]))
    with pytest.raises(FormatError, match="bad octal number"):
        extract_toc_json(bytes(hdr) + toc + bytes(512 - len(toc)))


def test_reader_refuses_a_negative_pax_size() -> None:
    toc = b'{"version":1,"entries":[]}'
    pax = tar_header(
        "stargz.index.json", len(toc), fmt=tarfile.PAX_FORMAT, pax_headers={"size": "-1"}
    )
    with pytest.raises(FormatError, match="bad PAX size"):
        extract_toc_json(pax + toc + bytes(512 - len(toc)))
