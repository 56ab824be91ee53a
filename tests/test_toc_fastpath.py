"""The msgspec fast path of the TOC build (layerstore/estargz/tocfast.py) against the reference
scan (tocbuild._Builder.run): same index or same error, on generated and adversarial TOCs; and
the fast path really serves ordinary TOCs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerstore.errors import LayerStoreError
from layerstore.estargz import tocbuild, tocfast
from layerstore.estargz.toc import TOCIndex
from tests.test_toc_index import _random_entry

TOC_OFFSET = 1_000_000


def dg(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


@pytest.fixture(autouse=True, params=[4096, 3], ids=["batch4096", "batch3"])
def batch_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The fast path decodes entries in batches: also with batches smaller than the TOCs."""
    monkeypatch.setattr(tocfast, "_BATCH", request.param)
    return int(request.param)


def state(idx: TOCIndex) -> dict[str, Any]:
    return {k: getattr(idx, k) for k in TOCIndex.__slots__ if k != "_readdir_cache"}


def build(doc: bytes, fast: bool, **kw: Any) -> tuple[str, Any]:
    """("ok", index state) or ("error", (type, message)), by one path."""
    saved = tocbuild._fast
    if not fast:
        tocbuild._fast = None
    try:
        idx = TOCIndex.from_json(doc, toc_offset=kw.pop("toc_offset", TOC_OFFSET), **kw)
    except (LayerStoreError, ValueError) as exc:
        return "error", (type(exc), str(exc))
    finally:
        tocbuild._fast = saved
    return "ok", state(idx)


def same(doc: bytes, **kw: Any) -> tuple[str, Any]:
    fast, ref = build(doc, True, **dict(kw)), build(doc, False, **dict(kw))
    assert fast == ref
    return fast


def doc_of(entries: list[Any], **top: Any) -> bytes:
    return json.dumps({"version": 1, **top, "entries": entries}, indent="\t").encode()


@pytest.fixture
def reference_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail if the reference scan runs: the TOC must be built by the fast path alone."""

    def forbidden(self: Any, entries: Any) -> None:
        raise AssertionError("the reference path ran")

    monkeypatch.setattr(tocbuild._Builder, "run", forbidden)
    yield


def go_shaped_entries() -> list[dict[str, Any]]:
    mt = "2024-05-01T10:20:30.123456789Z"
    out: list[dict[str, Any]] = [
        {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 10,
         "chunkDigest": dg("l"), "digest": dg("l")},
        {"name": "./", "type": "dir", "mode": 0o755, "modtime": mt},
        {"name": "usr/", "type": "dir", "mode": 0o755, "modtime": mt, "userName": "root"},
        {"name": "usr/bin/sh", "type": "reg", "size": 3, "offset": 100, "mode": 0o755,
         "uid": 0, "gid": 0, "userName": "root", "groupName": "root", "modtime": mt,
         "digest": dg("sh"), "chunkDigest": dg("sh")},
        {"name": "usr/bin/big", "type": "reg", "size": 10, "offset": 200, "chunkSize": 4,
         "digest": dg("whole"), "chunkDigest": dg("b0")},
        {"name": "usr/bin/big", "type": "chunk", "offset": 300, "chunkOffset": 4,
         "chunkSize": 4, "chunkDigest": dg("b1")},
        {"name": "usr/bin/big", "type": "chunk", "offset": 300, "chunkOffset": 8,
         "innerOffset": 4, "chunkDigest": dg("b2")},
        {"name": "usr/bin/bash", "type": "hardlink", "linkName": "usr/bin/sh"},
        {"name": "usr/lib/libc.so", "type": "symlink", "linkName": "libc.so.6"},
        {"name": "etc/.wh.gone", "type": "reg"},
        {"name": "opt/.wh..wh..opq", "type": "reg"},
        {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o666},
        {"name": "run/fifo", "type": "fifo"},
        {"name": "x/empty", "type": "reg", "size": 0, "xattrs": {"user.a": "eA=="}},
        {"name": "ümlaut/ß", "type": "reg", "size": 2, "offset": 400, "chunkDigest": dg("u")},
        {"name": "usr/", "type": "dir", "mode": 0o700},  # a later dir updates attributes
    ]  # fmt: skip
    return out


def test_fast_path_builds_ordinary_tocs_alone(reference_forbidden: None) -> None:
    idx = TOCIndex.from_json(doc_of(go_shaped_entries()), toc_offset=TOC_OFFSET)
    assert idx.find("usr/bin/bash") == idx.find("usr/bin/sh")
    assert [c.chunk_size for c in idx.chunks(idx.find("usr/bin/big") or 0)] == [4, 4, 2]
    assert idx.prefetch_landmark_offset == 10


def test_fast_and_reference_agree_on_ordinary_tocs() -> None:
    kind, _ = same(doc_of(go_shaped_entries()))
    assert kind == "ok"
    assert same(b'{"version":1,"entries":[]}')[0] == "ok"


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # the same batch size
)
@given(st.lists(_random_entry(), max_size=10))
def test_random_tocs_same_result(entries: list[dict[str, Any]]) -> None:
    same(doc_of(entries), toc_offset=1000)


_ODD_VALUES: list[Any] = [
    None, True, False, 1.0, 1.5, -1, 0, 2**32, 2**63, 2**64, 2**70, "", "x", "5", [], {},
    "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha256: " + "a" * 63, dg("x").upper(),
    "sha512:" + "a" * 64, "xsha256:" + "a" * 63, "sha256:" + "a" * 62 + " a",
    "2024-01-01T00:00:00Z", "2024-01-01T00:00:00", "1970-01-01T00:00:60.5+01:00",
]  # fmt: skip
_FIELDS = [
    "name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "userName",
    "groupName", "devMajor", "devMinor", "xattrs", "digest", "offset", "chunkOffset",
    "chunkSize", "chunkDigest", "innerOffset",
]  # fmt: skip


@st.composite
def _mutated_toc(draw: st.DrawFn) -> list[dict[str, Any]]:
    entries = go_shaped_entries()
    for _ in range(draw(st.integers(1, 3))):
        e = entries[draw(st.integers(0, len(entries) - 1))]
        field = draw(st.sampled_from(_FIELDS))
        if draw(st.integers(0, 5)) == 0:
            e.pop(field, None)
        else:
            e[field] = draw(st.sampled_from(_ODD_VALUES))
    return entries


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # the same batch size
)
@given(_mutated_toc())
def test_odd_field_values_same_result(entries: list[dict[str, Any]]) -> None:
    same(doc_of(entries))


@pytest.mark.parametrize(
    "doc",
    [
        b'{"version":1,"entries":[],"entries":[{"name":"a","type":"dir"}]}',
        b'{"version":1,"version":1,"entries":[{"name":"a","type":"dir"}]}',
        b'{"x":1,"x":2,"version":1,"entries":[]}',
        b'{"entries":[{"name":"a","type":"dir"}],"version":1}',
        b'{"version":2,"entries":[{"name":"a","type":"dir"}]}',
        b'{"version":true,"entries":[]}',
        b'{"version":1.0,"entries":[]}',
        b'{"entries":[]}',
        b'{"version":1}',
        b'{"version":1,"entries":[{"name":"a","type":"dir"}],"x":[1]}',
        b'{"version":1,"entries":[{"name":"a","type":"dir"}]}]}',
        b'{"version":1,"entries":[{"name":"a","type":"dir"}]} x',
        b'{"version":1,"entries":[{"name":"a","type":"dir"}]}\n\t ',
        b'\xef\xbb\xbf{"version":1,"entries":[]}',
        b'{"version":1,"entries":[{"name":"a","type":"dir","x":"\xff"}]}',
        b'{"version":1,"entries":[{"name":"a","type":"dir","x":"\xed\xa0\x80"}]}',
        b'{"version":1,"entries":[{"name":"\\ud800","type":"dir"}]}',
        b'{"version":1,"entries":[{"name":"a","type":"dir","x":NaN}]}',
        b'{"version":1,"entries":[{"name":"a","type":"dir","name":"b"}]}',
        b'{"version":1,"entries":[{"n\\u0061me":"a","type":"dir"}]}',
        '{"\u00e9":1,"\\u00e9":2,"version":1,"entries":[]}'.encode(),
        b'{"version":1,"big":' + b"1" * 70_000 + b',"entries":[]}',
        b'{"version":1,"entries":[{"name":"a","type":"dir","x":[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]}]}',
        b'{"version":1,"entries":[{"name":"a","type":"reg","size":3,"offset":5,"digest":"'
        + dg("a").encode()
        + b'"}]}',
        b"[]",
        b"",
    ],
)
def test_document_shapes_same_result(doc: bytes) -> None:
    same(doc)


def test_entry_limit_same_result_and_nothing_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [{"name": f"d{i}{{}}", "type": "dir"} for i in range(5)]
    assert same(doc_of(entries), max_entries=5)[0] == "ok"
    assert same(doc_of(entries), max_entries=4)[0] == "error"
    # short entries: more could fit than the limit, so the braces are counted before decoding
    small = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    assert tocfast.decode_entries(small, 50) is not None
    assert tocfast.decode_entries(small, 4) is None


def test_memoryview_and_bytearray_inputs(reference_forbidden: None) -> None:
    doc = doc_of(go_shaped_entries())
    a = TOCIndex.from_json(memoryview(b"xx" + doc)[2:], toc_offset=TOC_OFFSET)
    b = TOCIndex.from_json(bytearray(doc), toc_offset=TOC_OFFSET)
    assert state(a) == state(b)


def test_large_synthetic_toc_same_index(batch_size: int) -> None:
    """Thousands of entries (directories, chunked files, symlinks, hardlinks) in several
    batches: the fast path builds exactly the reference's index."""
    from benchmarks.toc_index_bench import synthetic_toc

    doc, toc_offset = synthetic_toc(9000 if batch_size > 3 else 300)
    kind, _ = same(doc, toc_offset=toc_offset)
    assert kind == "ok"


def test_chunk_digests_in_bulk_accept_only_the_grammar() -> None:
    """The bulk decoding of chunk digests (joined, strided prefix checks, one fromhex) takes
    exactly ``sha256:`` + 64 lowercase hex digits per digest, whatever the neighbours."""
    good = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
    assert tocfast._chunk_digests(good) == b"".join(bytes.fromhex(d[7:]) for d in good)
    bad = [
        ["sha256:" + "A" * 64],  # uppercase
        ["sha512:" + "a" * 64],
        ["sha256:" + "a" * 63 + " "],
        ["sha256:" + "a" * 62 + " a"],  # whitespace fromhex would skip
        ["sha256:" + "a" * 57 + "sha256:"],  # a prefix inside the hex part
        ["sha256:" + "g" * 64],
        ["sha256:" + "a" * 65],
        ["sha256:" + "a" * 63, "sha256:" + "a" * 65],  # lengths that sum right
        ["sha256" + "a" * 65],
    ]
    for tail in bad:
        with pytest.raises((tocfast._GiveUp, ValueError)):
            tocfast._chunk_digests(good[:3] + tail)
