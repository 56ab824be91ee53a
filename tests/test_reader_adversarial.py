"""The reader under hostile input: corrupt, truncated, oversized or malicious blobs.

The invariant checked throughout: a read either raises a LayerStoreError or returns exactly
the right bytes, never anything else.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerstore.errors import (
    ChunkDigestMismatchError,
    FormatError,
    LayerStoreError,
    LimitExceededError,
    NotEStargzError,
    TOCDigestMismatchError,
    TOCError,
)
from layerstore.estargz.footer import build_footer
from layerstore.estargz.reader import (
    EStargzReader,
    decode_chunk,
    extract_toc_json,
    inflate_toc_member,
)
from layerstore.estargz.toc import Chunk, TOCIndex
from layerstore.source import BytesSource
from tests.estargz_util import build_blob, gz, sha, tar_header, toc_member

BLOBS = ("ref-small", "ref-chunked-64k", "ref-prioritized")


class CountingSource(BytesSource):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().read_at(offset, length)


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


# --- the Go reference blobs, corrupted -----------------------------------------------------------
Reference = dict[str, tuple[bytes, str, dict[str, bytes]]]


@pytest.fixture(scope="session")
def ref(go_reference: Path) -> Reference:
    """{blob name: (blob, TOC digest, {path: contents} of small.tar's readable files)}."""
    out: Reference = {}
    files: dict[str, bytes] = {}
    with tarfile.open(go_reference / "small.tar") as tf:
        for m in tf.getmembers():
            if m.isreg() and not m.name.rsplit("/", 1)[-1].startswith(".wh."):
                f = tf.extractfile(m)
                assert f is not None
                files[m.name] = f.read()
            elif m.islnk():
                files[m.name] = files[m.linkname]
    for name in BLOBS:
        meta = json.loads((go_reference / f"{name}.json").read_text())
        out[name] = ((go_reference / f"{name}.esgz").read_bytes(), meta["tocDigest"], files)
    return out


def _check_all_files(blob: bytes, toc_digest: str | None, files: dict[str, bytes]) -> int:
    """Open and read every file; each read is exact or raises. Returns the number read OK."""
    try:
        r = EStargzReader.open(BytesSource(blob), expected_toc_digest=toc_digest)
    except LayerStoreError:
        return 0
    ok = 0
    for path, want in files.items():
        try:
            got = r.read_file(path)
        except (LayerStoreError, FileNotFoundError, ValueError):
            continue
        assert got == want, f"wrong bytes for {path}"
        ok += 1
    return ok


@pytest.mark.parametrize("name", BLOBS)
def test_flipped_bit_in_chunk_is_an_error(ref: Reference, name: str) -> None:
    blob, toc_digest, _ = ref[name]
    r = EStargzReader.open(BytesSource(blob), expected_toc_digest=toc_digest)
    ino = r.index.find("app/data.bin")
    assert ino is not None
    c = r.index.chunks(ino)[0]
    bad = flip(blob, (c.offset + c.compressed_end) // 2)
    r2 = EStargzReader.open(BytesSource(bad), expected_toc_digest=toc_digest)
    with pytest.raises((ChunkDigestMismatchError, FormatError)):
        r2.read_file("app/data.bin")
    with pytest.raises((ChunkDigestMismatchError, FormatError)):
        r2.read_chunk(c)
    assert r2.read_file("app/main.py") == b"print('hi')\n"  # other files unaffected


@pytest.mark.parametrize("name", BLOBS)
def test_flipped_bit_in_toc_is_an_error(ref: Reference, name: str) -> None:
    blob, toc_digest, _ = ref[name]
    r = EStargzReader.open(BytesSource(blob))
    toc_end = len(blob) - r.footer_size
    for pos in range(r.toc_offset, toc_end, max(1, (toc_end - r.toc_offset) // 40)):
        with pytest.raises((TOCDigestMismatchError, FormatError)):
            EStargzReader.open(BytesSource(flip(blob, pos)), expected_toc_digest=toc_digest)


def test_digest_mismatch_names_both_digests(ref: Reference) -> None:
    blob, toc_digest, _ = ref["ref-small"]
    wrong = "sha256:" + "0" * 64
    with pytest.raises(TOCDigestMismatchError, match=toc_digest[7:]):
        EStargzReader.open(BytesSource(blob), expected_toc_digest=wrong)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    name=st.sampled_from(BLOBS),
    where=st.sampled_from(("anywhere", "head", "tail")),
    frac=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    mask=st.integers(min_value=1, max_value=255),
    verified=st.booleans(),
)
def test_any_flipped_byte_never_yields_wrong_bytes(
    ref: Reference, name: str, where: str, frac: float, mask: int, verified: bool
) -> None:
    blob, toc_digest, files = ref[name]
    if where == "anywhere":
        pos = int(frac * len(blob))
    elif where == "head":  # tar headers and small files
        pos = int(frac * 1200)
    else:  # TOC member and footer
        pos = len(blob) - 1 - int(frac * 1500)
    bad = flip(blob, pos, mask)
    _check_all_files(bad, toc_digest if verified else None, files)
    if verified:
        # with the TOC digest pinned, metadata is exact too whenever the open succeeds
        try:
            r = EStargzReader.open(BytesSource(bad), expected_toc_digest=toc_digest)
        except LayerStoreError:
            return
        good = EStargzReader.open(BytesSource(blob), expected_toc_digest=toc_digest)
        assert list(r.index.entries()) == list(good.index.entries())


def test_unflipped_reference_reads_everything(ref: Reference) -> None:
    """The oracle of the property test above is not vacuous."""
    for name in BLOBS:
        blob, toc_digest, files = ref[name]
        assert (
            _check_all_files(blob, toc_digest, files) == len(files) == 5
        )  # 4 files and a hardlink


@pytest.mark.parametrize("name", BLOBS)
def test_truncated_blobs(ref: Reference, name: str) -> None:
    blob, toc_digest, _ = ref[name]
    for cut in (1, 10, 51, 52, 500, 5000, len(blob) // 2, len(blob) - 47, len(blob) - 1):
        with pytest.raises(LayerStoreError):
            EStargzReader.open(BytesSource(blob[: len(blob) - cut]), expected_toc_digest=toc_digest)
    # bytes cut from the middle, footer kept: offsets no longer match
    r = EStargzReader.open(BytesSource(blob))
    spliced = blob[:1000] + blob[2000:]
    with pytest.raises(LayerStoreError):
        EStargzReader.open(BytesSource(spliced), expected_toc_digest=toc_digest)
    assert r.read_file("var/x") == b"xattr\n"


# --- footers and non-eStargz blobs ---------------------------------------------------------------
def test_plain_gzip_tar_is_not_estargz() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("hello")
        ti.size = 5
        tf.addfile(ti, io.BytesIO(b"hello"))
    with pytest.raises(NotEStargzError):
        EStargzReader.open(BytesSource(gzip.compress(buf.getvalue())))
    for tiny in (b"", b"\x1f\x8b", b"x" * 50):
        with pytest.raises(NotEStargzError):
            EStargzReader.open(BytesSource(tiny))


def test_footer_pointing_outside_the_blob() -> None:
    b = build_blob([("f", b"data")])
    body = b.blob[:-51]
    for bad_offset in (len(b.blob), len(b.blob) + 100, 2**63, len(body)):
        with pytest.raises(FormatError):
            EStargzReader.open(BytesSource(body + build_footer(bad_offset)))
    # pointing at a non-TOC member inside the blob
    with pytest.raises(FormatError):
        EStargzReader.open(BytesSource(body + build_footer(0)))


def test_huge_toc_region_refused_before_reading() -> None:
    """A footer claiming a TOC region larger than the cap is refused without fetching it."""

    class Huge:
        def __init__(self) -> None:
            self.reads: list[tuple[int, int]] = []

        def size(self) -> int:
            return 10 * 2**30

        def read_at(self, offset: int, length: int) -> bytes:
            self.reads.append((offset, length))
            if length > 2**20:
                raise AssertionError(f"read of {length} bytes")
            return (b"\0" * length + build_footer(0))[-length:]

        def read_ranges(self, ranges: Any) -> list[bytes]:
            return [self.read_at(o, n) for o, n in ranges]

    src = Huge()
    with pytest.raises(LimitExceededError):
        EStargzReader.open(src)  # type: ignore[arg-type]
    assert len(src.reads) == 1


def test_legacy_footer_and_from_toc_bytes_checks() -> None:
    b = build_blob([("f", b"data")], legacy=True)
    r = EStargzReader.open(BytesSource(b.blob), expected_toc_digest=b.toc_digest)
    assert r.legacy and r.footer_size == 47 and r.read_file("f") == b"data"
    member = b.blob[b.toc_offset : -47]
    with pytest.raises(FormatError):
        EStargzReader.from_toc_bytes(BytesSource(b.blob), member[:-1], b.toc_offset, 47)
    ok = EStargzReader.from_toc_bytes(BytesSource(b.blob), member, b.toc_offset, 47, b.toc_digest)
    assert ok.index.find("f") is not None


# --- TOC member and chunk decoding ---------------------------------------------------------------
def test_toc_member_variants() -> None:
    toc = json.dumps({"version": 1, "entries": [{"name": "a", "type": "dir"}]}).encode()
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        plain = gzip.decompress(toc_member(toc, fmt=fmt))
        assert extract_toc_json(plain) == toc
    # a PAX header in front (e.g. a long name written by another tool) is honoured
    pax = tar_header("stargz.index.json", len(toc), fmt=tarfile.PAX_FORMAT, uname="u" * 40)
    assert pax[156:157] == b"x"
    plain = pax + toc + b"\0" * ((-len(toc)) % 512)
    assert extract_toc_json(plain) == toc
    with pytest.raises(FormatError):
        extract_toc_json(gzip.decompress(toc_member(toc, name="other.json")))
    hdr = bytearray(gzip.decompress(toc_member(toc)))
    hdr[0] ^= 0x20  # breaks the header checksum
    with pytest.raises(FormatError):
        extract_toc_json(bytes(hdr))
    with pytest.raises(FormatError):
        extract_toc_json(gzip.decompress(toc_member(toc))[:520])  # truncated content
    with pytest.raises(LimitExceededError):
        extract_toc_json(gzip.decompress(toc_member(toc)), max_toc_size=10)
    with pytest.raises(FormatError):
        extract_toc_json(b"\0" * 1024)
    # several gzip members and truncation
    member = toc_member(toc)
    two = gz(gzip.decompress(member)[:512]) + gz(gzip.decompress(member)[512:])
    assert extract_toc_json(inflate_toc_member(two)) == toc
    with pytest.raises(FormatError):
        inflate_toc_member(member[:-9])
    with pytest.raises(FormatError):
        inflate_toc_member(member + b"garbage")
    with pytest.raises(FormatError):
        inflate_toc_member(b"")


def test_gzip_bomb_in_toc_member_is_capped() -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [comp.compress(tar_header("stargz.index.json", 2**30))]
    zeros = b"\0" * 2**20
    for _ in range(48):  # 48 MiB of zeros -> ~50 KiB compressed
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 2**20
    blob = b"\0" * 64 + bomb + build_footer(64)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError):
            EStargzReader.open(BytesSource(blob), max_toc_size=4 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak
    with pytest.raises(LimitExceededError):
        inflate_toc_member(bomb, max_toc_size=2**20)


def test_decode_chunk_rules() -> None:
    data = bytes(range(256)) * 40
    c = Chunk(0, 0, 0, len(data), 0, sha(data))
    assert decode_chunk(gz(data), c) == data
    # a chunk spread over several members, with trailing members after it
    multi = gz(data[:100]) + gz(b"") + gz(data[100:]) + gz(b"tail")
    assert decode_chunk(multi, c) == data
    # inner offset
    inner = Chunk(0, 0, 0, 50, 1000, sha(data[1000:1050]))
    assert decode_chunk(gz(data), inner) == data[1000:1050]
    with pytest.raises(ChunkDigestMismatchError):
        decode_chunk(gz(data), Chunk(0, 0, 0, len(data), 0, sha(b"other")))
    with pytest.raises(FormatError):
        decode_chunk(gz(data[:-1]), c)  # short
    with pytest.raises(FormatError):
        decode_chunk(gz(data)[:-30], c)  # truncated member
    with pytest.raises(FormatError):
        decode_chunk(b"not gzip at all", c)
    with pytest.raises(FormatError):
        decode_chunk(b"", c)
    assert decode_chunk(memoryview(gz(data)), c) == data


def test_inner_offset_blobs_from_the_writer() -> None:
    writer = pytest.importorskip("layerstore.estargz.writer", reason="writer not available")
    buf = io.BytesIO()
    files = {f"d/f{i}": bytes([i]) * (i * 37 + 1) for i in range(40)}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    out = io.BytesIO()
    res = writer.write_estargz(
        io.BytesIO(buf.getvalue()), out, writer.WriterOptions(min_chunk_size=4096)
    )
    r = EStargzReader.open(BytesSource(out.getvalue()), expected_toc_digest=res.toc_digest)
    assert any(e.inner_offset for e in r.index.entries())
    for name, data in files.items():
        assert r.read_file(name) == data


# --- hostile TOC contents in a real blob ---------------------------------------------------------
def _rename(new: str) -> Any:
    def edit(toc: dict[str, Any]) -> None:
        toc["entries"][0]["name"] = new

    return edit


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/../../x", "a/b/..", "x\x00y", ""])
def test_hostile_names_refused(bad: str) -> None:
    b = build_blob([("f", b"data")], edit_toc=_rename(bad))
    with pytest.raises(TOCError):
        EStargzReader.open(BytesSource(b.blob), expected_toc_digest=b.toc_digest)


def test_absolute_and_dot_names_are_cleaned() -> None:
    b = build_blob([("f", b"data"), ("g", b"more")], edit_toc=_rename("/abs/f"))
    r = EStargzReader.open(BytesSource(b.blob))
    assert r.read_file("abs/f") == b"data"
    b = build_blob([("f", b"data")], edit_toc=_rename("./dot//f"))
    assert EStargzReader.open(BytesSource(b.blob)).read_file("dot/f") == b"data"


def test_toc_offsets_must_point_before_the_toc() -> None:
    def edit(toc: dict[str, Any]) -> None:
        toc["entries"][0]["offset"] = 10**9

    b = build_blob([("f", b"data")], edit_toc=edit)
    with pytest.raises(TOCError):
        EStargzReader.open(BytesSource(b.blob))


def test_lying_toc_never_yields_wrong_bytes() -> None:
    """Without a pinned TOC digest the TOC is untrusted; chunk digests still protect data."""
    data = b"A" * 5000 + b"B" * 5000

    def shift(toc: dict[str, Any]) -> None:  # point f's first chunk at g's member
        toc["entries"][0]["offset"] = toc["entries"][2]["offset"]

    def grow(toc: dict[str, Any]) -> None:  # claim the last chunk runs into tar padding
        toc["entries"][1]["chunkOffset"] = 4000
        toc["entries"][0]["chunkSize"] = 4000

    for edit in (shift, grow):
        b = build_blob([("f", data), ("g", b"C" * 100)], chunk_size=5000, edit_toc=edit)
        r = EStargzReader.open(BytesSource(b.blob))
        with pytest.raises(LayerStoreError):
            r.read_file("f")


# --- big TOCs -------------------------------------------------------------------------------------
def _many_entries_json(n: int) -> bytes:
    one = b'{"name":"d%07d/f","type":"reg","mode":420}'
    return b'{"version":1,"entries":[' + b",".join(one % i for i in range(n)) + b"]}"


def test_million_entry_toc_hits_the_entry_limit_with_bounded_memory() -> None:
    doc = _many_entries_json(1_000_000)
    text = doc.decode()
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError):
            TOCIndex.from_json(text, toc_offset=2**40, max_entries=2_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the 47 MB document is scanned lazily: only the first entries are ever materialised
    assert peak < 16 * 2**20, peak
    # through the reader: a compressed TOC over the limit
    member = toc_member(_many_entries_json(30_000))
    blob = gz(b"x") + member + build_footer(len(gz(b"x")))
    with pytest.raises(LimitExceededError):
        EStargzReader.open(BytesSource(blob), max_entries=20_000)


def test_large_toc_memory_per_entry() -> None:
    n = 2_000  # tracemalloc slows allocation-heavy code ~25x; the benchmark measures 56k
    doc = _many_entries_json(n)
    tracemalloc.start()
    try:
        idx = TOCIndex.from_json(doc, toc_offset=2**40)
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert idx.num_inodes == 2 * n + 1
    # 2k files in 2k directories: well under 300 bytes per entry once built
    assert current < 300 * 2 * n, current
    assert idx.find("d0001999/f") == 2 * n + 1


def test_large_inner_offset_is_skipped_in_pieces() -> None:
    data = b"\0" * (5 << 20) + bytes(range(256)) * 4 + b"\1" * (3 << 20)
    comp = gzip.compress(data)
    inner = (5 << 20) + 10
    want = data[inner : inner + (2 << 20)]
    assert decode_chunk(comp, Chunk(0, len(comp), 0, len(want), inner, sha(want))) == want
    with pytest.raises(FormatError):  # runs past the end of the data
        decode_chunk(comp, Chunk(0, len(comp), 0, 10, len(data) - 5, sha(b"x")))


def test_toc_larger_than_one_inflate_piece() -> None:
    entries = [{"name": f"{'x' * 200}{i}", "type": "reg"} for i in range(90_000)]
    doc = json.dumps({"version": 1, "entries": entries}).encode()
    assert len(doc) > 16 << 20
    member = toc_member(doc)
    assert extract_toc_json(inflate_toc_member(member)) == doc
    with pytest.raises(FormatError):
        inflate_toc_member(member[:-20])
    with pytest.raises(LimitExceededError):
        inflate_toc_member(member, max_toc_size=len(doc) - 100_000)
