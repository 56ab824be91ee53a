"""Workload profiles without podman: the document format, recording through real layers (the
manager over a fake registry client and real eStargz blobs from our writer), and the profile
prefetch (a fake profile source)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from layerstore.estargz.profile import (
    MAX_ENTRIES,
    PROFILE_MEDIA_TYPE,
    LayerProfile,
    Profile,
    ProfileEntry,
    ProfileError,
    clean_path,
    fit,
    parse_profile,
)
from layerstore.estargz.writer import WriterOptions, write_estargz
from layerstore.registry.reference import Reference
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.layer import Layer
from layerstore.runtime.manager import LayerManager
from layerstore.runtime.prefetch import ProfilePrefetchSettings
from layerstore.runtime.recorder import AccessRecorder, RecordSettings
from layerstore.source import BytesSource
from tests.test_fetcher import CountingSource
from tests.test_manager import Blob, FakeClient, desc, quiet

TOC_A = "sha256:" + "a" * 64
TOC_B = "sha256:" + "b" * 64
TOOL = os.urandom(200_000)


# --- the format -------------------------------------------------------------------------------


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "media_type": PROFILE_MEDIA_TYPE,
        "created": "2024-05-01T12:00:00Z",
        "tool": "stargz-store 0.1",
        "image": "registry.example/app:1",
        "manifest_digest": "sha256:" + "c" * 64,
        "period_seconds": 10.0,
        "layers": [
            {
                "toc_digest": TOC_A,
                "digest": "sha256:" + "d" * 64,
                "entries": [
                    {"path": "usr/bin/python3", "first_access_ms": 0, "bytes": 4096},
                    {"path": "lib64/ld-linux-x86-64.so.2", "first_access_ms": 2, "bytes": 8192},
                ],
            },
            {"toc_digest": TOC_B, "entries": [{"path": "app/main.py", "first_access_ms": 1}]},
        ],
    }
    doc.update(over)
    return doc


def test_profile_round_trip() -> None:
    p = parse_profile(json.dumps(_doc(future_field={"x": 1})).encode())
    assert [lp.toc_digest for lp in p.layers] == [TOC_A, TOC_B]
    assert p.layer(TOC_A) is not None and p.layer("sha256:" + "e" * 64) is None
    assert p.layers[0].paths == ["usr/bin/python3", "lib64/ld-linux-x86-64.so.2"]
    assert p.layers[1].entries == (ProfileEntry("app/main.py", 1, 0),)
    assert (p.files, p.total_bytes) == (3, 12288)
    again = parse_profile(p.to_json())
    assert again == p and again.extra == {"future_field": {"x": 1}}
    assert p.to_json() == again.to_json()  # the same profile gives the same bytes (digest)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps(_doc(media_type="application/json")).encode(), "media type"),
        (json.dumps(_doc(layers={})).encode(), "'layers' must be a list"),
        (json.dumps(_doc(layers=[{"toc_digest": "sha256:12", "entries": []}])).encode(), "toc"),
        (
            json.dumps(_doc(layers=[{"toc_digest": TOC_A, "entries": []}] * 2)).encode(),
            "listed twice",
        ),
        (
            json.dumps(
                _doc(layers=[{"toc_digest": TOC_A, "entries": [{"path": "/", "bytes": 1}]}])
            ).encode(),
            "no valid path",
        ),
        (
            json.dumps(
                _doc(layers=[{"toc_digest": TOC_A, "entries": [{"path": "a\x00b"}]}])
            ).encode(),
            "no valid path",
        ),
        (
            json.dumps(
                _doc(layers=[{"toc_digest": TOC_A, "entries": [{"path": "a", "bytes": -1}]}])
            ).encode(),
            "non-negative",
        ),
        (
            json.dumps(
                _doc(layers=[{"toc_digest": TOC_A, "entries": [{"path": "a" * 5000}]}])
            ).encode(),
            "at most 4096",
        ),
        (json.dumps(_doc(period_seconds=-1)).encode(), "period_seconds"),
        (json.dumps(_doc(manifest_digest="md5:x")).encode(), "manifest_digest"),
        (b" " * ((1 << 20) + 1), "over the 1048576 byte limit"),
    ],
)
def test_profile_refuses(doc: bytes, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_profile(doc)


def test_profile_entry_limit() -> None:
    entries = [{"path": f"f{i}"} for i in range(MAX_ENTRIES + 1)]
    big = json.dumps(_doc(layers=[{"toc_digest": TOC_A, "entries": entries}])).encode()
    with pytest.raises(ProfileError, match=f"more than {MAX_ENTRIES} entries"):
        parse_profile(big, max_bytes=1 << 30)


def test_clean_path() -> None:
    assert clean_path("/usr/bin/x") == "usr/bin/x"
    assert clean_path("../../etc/./a//b") == "etc/a/b"
    assert clean_path("/") is None and clean_path("") is None and clean_path("a\0") is None


def test_fit_keeps_the_earliest_entries_of_every_layer() -> None:
    a = tuple(ProfileEntry(f"a/{i:05d}" + "x" * 60, 2 * i, 1) for i in range(4000))
    b = tuple(ProfileEntry(f"b/{i:05d}" + "x" * 60, 2 * i + 1, 1) for i in range(4000))
    p = Profile((LayerProfile(TOC_A, a), LayerProfile(TOC_B, b)))
    assert len(p.to_json()) > 400_000
    small = fit(p, max_bytes=100_000)
    assert len(small.to_json()) <= 100_000
    kept_a, kept_b = small.layers[0].entries, small.layers[1].entries
    assert kept_a == a[: len(kept_a)] and kept_b == b[: len(kept_b)]
    assert abs(len(kept_a) - len(kept_b)) <= 1 and len(kept_a) > 100
    assert fit(p) == p  # within the default limit: unchanged


# --- a real layer ------------------------------------------------------------------------------


def make_layer(client: FakeClient, ref: str, files: dict[str, Any]) -> Blob:
    """An eStargz blob of *files* ({name: bytes, ("link", target), ("hard", target), None for a
    directory}) from our writer, registered as the only layer of *ref*."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, v in files.items():
            ti = tarfile.TarInfo(name)
            if v is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif isinstance(v, tuple):
                ti.type = tarfile.SYMTYPE if v[0] == "link" else tarfile.LNKTYPE
                ti.linkname = v[1]
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(v), 0o755
                tf.addfile(ti, io.BytesIO(v))
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(buf.getvalue()), out, WriterOptions(chunk_size=64 * 1024))
    blob = Blob(out.getvalue(), res.blob_digest, res.toc_digest, res.diff_id, res.uncompressed_size)
    client.sources[blob.digest] = CountingSource(BytesSource(blob.data))
    client.add(ref, [(desc(blob), blob.diff_id)])
    return blob


FILES: dict[str, Any] = {
    "bin": None,
    "bin/tool": TOOL,
    "bin/link": ("link", "tool"),
    "bin/hard": ("hard", "bin/tool"),
    "etc": None,
    "etc/a": b"a" * 100,
    "etc/b": b"b" * 50,
    "etc/c": b"c" * 70,
}
REF = "registry.example/prof:v1"
REF2 = "registry.example/prof2:v1"


@pytest.fixture
def client() -> FakeClient:
    return FakeClient({})


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", 1 << 30)


def _ino(layer: Layer, path: str) -> int:
    ino = layer.index.find(path)
    assert ino is not None
    return ino


def test_recording_through_layer_reads(
    client: FakeClient, cache: ChunkCache, tmp_path: Path
) -> None:
    blob = make_layer(client, REF, FILES)
    rec = AccessRecorder(tmp_path / "profiles", RecordSettings(period_seconds=60), tool="t 1")
    mgr = LayerManager(client, cache, quiet(), recorder=rec)
    layer = mgr.get(REF, blob.digest)
    layer.read(_ino(layer, "etc/b"), 0, 4096)  # a read before any use is not recorded
    mgr.use(REF, blob.digest)
    assert layer.observer is rec
    tool = _ino(layer, "bin/tool")
    layer.read(_ino(layer, "etc/c"), 0, 10)
    layer.read(_ino(layer, "etc/c"), 5, 10)  # overlapping: 15 distinct bytes
    layer.read(tool, 100_000, 50_000)  # a chunk in the middle first
    layer.read(_ino(layer, "bin/hard"), 0, 10_000)  # the same inode as bin/tool
    # A read answered on the event loop (pending cache writes, packs in the page cache) is
    # recorded too; the cache's memory is faked here, what it holds depends on timing.
    real_nowait = layer.cache.read_nowait
    layer.cache.read_nowait = lambda d, o, n: memoryview(b"b" * 50)[o : o + n]  # type: ignore[method-assign]
    assert layer.read_nowait(_ino(layer, "etc/b"), 0, 4096) == b"b" * 50
    layer.cache.read_nowait = real_nowait  # type: ignore[method-assign]
    layer.read(_ino(layer, "etc/a"), 0, 4096)
    assert rec.written == []
    paths = rec.close()
    assert len(paths) == 1 and paths[0].parent == tmp_path / "profiles"
    assert paths[0].name.endswith(".json") and not list(paths[0].parent.glob(".tmp-*"))
    p = parse_profile(paths[0].read_bytes())
    assert (p.image, p.manifest_digest, p.tool) == (REF, client.images[REF].digest, "t 1")
    assert p.period_seconds == 60
    (lp,) = p.layers
    assert (lp.toc_digest, lp.digest) == (blob.toc_digest, blob.digest)
    assert lp.paths == ["etc/c", "bin/tool", "etc/b", "etc/a"]
    assert [e.bytes for e in lp.entries] == [15, 60_000, 50, 100]
    ms = [e.first_access_ms for e in lp.entries]
    assert ms == sorted(ms) and ms[0] == 0
    # closed: nothing more is recorded, nothing more is written
    layer.read(_ino(layer, "etc/a"), 0, 10)
    assert rec.close() == [] and len(list((tmp_path / "profiles").iterdir())) == 1


def test_recording_period_ends_the_session(
    client: FakeClient, cache: ChunkCache, tmp_path: Path
) -> None:
    blob = make_layer(client, REF, FILES)
    rec = AccessRecorder(tmp_path / "p", RecordSettings(period_seconds=0.2))
    mgr = LayerManager(client, cache, quiet(), recorder=rec)
    layer = mgr.get(REF, blob.digest)
    mgr.use(REF, blob.digest)
    layer.read(_ino(layer, "etc/a"), 0, 10)
    deadline = time.monotonic() + 30
    while not rec.written and time.monotonic() < deadline:  # the session's timer writes it
        time.sleep(0.02)
    assert len(rec.written) == 1
    layer.read(_ino(layer, "etc/b"), 0, 10)  # after the period: not recorded anywhere
    assert parse_profile(rec.written[0].read_bytes()).layers[0].paths == ["etc/a"]
    mgr.use(REF, blob.digest)  # the image used again: a new session
    layer.read(_ino(layer, "etc/c"), 0, 10)
    second = rec.close()
    assert len(second) == 1 and second[0] != rec.written[0]
    assert parse_profile(second[0].read_bytes()).layers[0].paths == ["etc/c"]


def test_a_layer_of_two_images_is_recorded_for_both_and_unread_images_write_nothing(
    client: FakeClient, cache: ChunkCache, tmp_path: Path
) -> None:
    blob = make_layer(client, REF, FILES)
    client.add(REF2, [(desc(blob), blob.diff_id)])
    other = make_layer(client, "registry.example/unread:v1", {"x": b"x"})
    rec = AccessRecorder(tmp_path / "p", RecordSettings(period_seconds=60))
    mgr = LayerManager(client, cache, quiet(), recorder=rec)
    mgr.use(REF, blob.digest)
    mgr.use(REF2, blob.digest)
    mgr.use("registry.example/unread:v1", other.digest)
    layer = mgr.get(REF, blob.digest)
    layer.read(_ino(layer, "etc/b"), 0, 10)
    assert len(rec.finish_all()) == 2
    layer.read(_ino(layer, "etc/a"), 0, 10)  # sessions are over until the next use
    assert rec.close() == []
    images = sorted(parse_profile(p.read_bytes()).image for p in rec.written)
    assert images == sorted([REF, REF2])  # the shared layer's reads count for both images
    assert all(parse_profile(p.read_bytes()).layers[0].paths == ["etc/b"] for p in rec.written)


def test_operator_stops_recording_through_the_control_operation(
    client: FakeClient, cache: ChunkCache, tmp_path: Path
) -> None:
    """``stargz-store profiles --stop`` (control op ``record_stop``): the sessions end now and
    their profiles are written, long before the period; a daemon not recording says so."""
    from stargz_store.control import RequestError
    from stargz_store.status import StatusSource

    blob = make_layer(client, REF, FILES)
    rec = AccessRecorder(tmp_path / "p", RecordSettings(period_seconds=3600))
    mgr = LayerManager(client, cache, quiet(), recorder=rec)
    mgr.use(REF, blob.digest)
    layer = mgr.get(REF, blob.digest)
    layer.read(_ino(layer, "etc/c"), 0, 10)
    src = StatusSource(root=str(tmp_path), manager=mgr, cache=cache)
    result = src.handle({"v": 1, "op": "record_stop"})
    (written,) = result["written"]
    assert parse_profile(Path(written).read_bytes()).layers[0].paths == ["etc/c"]
    assert src.handle({"v": 1, "op": "record_stop"}) == {"written": []}
    idle = StatusSource(root=str(tmp_path), manager=LayerManager(client, cache, quiet()))
    with pytest.raises(RequestError, match="not recording"):
        idle.handle({"v": 1, "op": "record_stop"})


def test_recording_is_off_by_default(client: FakeClient, cache: ChunkCache) -> None:
    blob = make_layer(client, REF, FILES)
    mgr = LayerManager(client, cache, quiet())
    mgr.use(REF, blob.digest)
    assert mgr.get(REF, blob.digest).observer is None and mgr.recorder is None


# --- profile prefetch --------------------------------------------------------------------------


class Source:
    """Profiles by manifest digest; counts lookups."""

    def __init__(self) -> None:
        self.docs: dict[str, bytes | Exception] = {}
        self.lookups: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()  # answers wait for it
        self.gate.set()

    def find(self, reference: Reference, manifest_digest: str) -> bytes | None:
        with self.lock:
            self.lookups.append((str(reference), manifest_digest))
        assert self.gate.wait(30)
        got = self.docs.get(manifest_digest)
        if isinstance(got, Exception):
            raise got
        return got


def profile_doc(toc: str, paths: list[str]) -> bytes:
    entries = [{"path": p, "first_access_ms": i, "bytes": 1} for i, p in enumerate(paths)]
    return json.dumps(
        {"media_type": PROFILE_MEDIA_TYPE, "layers": [{"toc_digest": toc, "entries": entries}]}
    ).encode()


def _chunks(layer: Layer, path: str) -> list[Any]:
    return list(layer.index.chunks(_ino(layer, path)))


def test_profile_prefetch_plans_in_access_order_and_skips_what_the_layer_lacks(
    client: FakeClient, cache: ChunkCache
) -> None:
    blob = make_layer(client, REF, FILES)
    settings = ProfilePrefetchSettings(first_batch_bytes=100, max_batch_bytes=64 * 1024)
    mgr = LayerManager(client, cache, quiet(profile_prefetch=settings), profiles=Source())
    layer = mgr.get(REF, blob.digest)
    section = parse_profile(
        profile_doc(
            blob.toc_digest, ["etc/c", "nope/missing", "bin", "bin/link", "bin/tool", "etc/a"]
        )
    ).layers[0]
    batches, files, skipped = mgr.profiles.plan(layer, section)
    # the directory and the missing path are skipped; the symlink is not a regular file
    assert (files, skipped) == (3, 3)
    flat = [c for b in batches for c in b]
    assert flat == _chunks(layer, "etc/c") + _chunks(layer, "bin/tool") + _chunks(layer, "etc/a")
    # a batch ends once it holds first_batch_bytes (then twice that, ...): small first
    size = [sum(c.compressed_end - c.offset for c in b) for b in batches]
    assert sum(c.compressed_end - c.offset for c in batches[0][:-1]) < 100 <= size[0]
    assert len(batches) > 2
    # already cached chunks are left out
    mgr.profiles.fetch_layer(layer, section)
    assert all(c.digest in cache for c in flat)
    assert mgr.profiles.plan(layer, section)[0] == []


def test_profile_prefetch_takes_all_layers_batches_in_access_order(
    client: FakeClient, cache: ChunkCache
) -> None:
    """One queue for all layers: the batch whose first file was read first goes first,
    whichever layer it is in (with one worker, the order is exact)."""
    blob_a = make_layer(client, REF, {f"a/{i}": os.urandom(3000) for i in range(3)})
    blob_b = make_layer(client, REF2, {f"b/{i}": os.urandom(3000) for i in range(3)})
    settings = ProfilePrefetchSettings(parallel=1, first_batch_bytes=1, max_batch_bytes=1)
    mgr = LayerManager(client, cache, quiet(profile_prefetch=settings), profiles=Source())
    layer_a, layer_b = mgr.get(REF, blob_a.digest), mgr.get(REF2, blob_b.digest)
    fetched: list[str] = []
    for layer, tag in ((layer_a, "a"), (layer_b, "b")):
        real = layer.fetcher.get_chunks

        def recording(chunks: Any, *a: Any, _real: Any = real, _tag: str = tag, **kw: Any) -> Any:
            fetched.append(f"{_tag}@{chunks[0].offset}")
            return _real(chunks, *a, **kw)

        layer.fetcher.get_chunks = recording  # type: ignore[method-assign]

    def section(toc: str, times: dict[str, int]) -> LayerProfile:
        entries = [{"path": p, "first_access_ms": t, "bytes": 1} for p, t in times.items()]
        doc = {
            "media_type": PROFILE_MEDIA_TYPE,
            "layers": [{"toc_digest": toc, "entries": entries}],
        }
        return parse_profile(json.dumps(doc).encode()).layers[0]

    sec_a = section(blob_a.toc_digest, {"a/0": 0, "a/1": 20, "a/2": 40})
    sec_b = section(blob_b.toc_digest, {"b/0": 10, "b/1": 30, "b/2": 50})
    jobs = mgr.profiles._submit([(layer_a, sec_a), (layer_b, sec_b)])
    for job in jobs:
        assert job.done.wait(30)
    offs_a = [_chunks(layer_a, f"a/{i}")[0].offset for i in range(3)]
    offs_b = [_chunks(layer_b, f"b/{i}")[0].offset for i in range(3)]
    expected = [f"{t}@{o}" for pair in zip(offs_a, offs_b) for t, o in zip("ab", pair)]
    assert fetched == expected
    assert all(c.digest in cache for i in range(3) for c in _chunks(layer_a, f"a/{i}"))
    assert all(c.digest in cache for i in range(3) for c in _chunks(layer_b, f"b/{i}"))
    mgr.close()


def _wait_for(cond: Any, what: Any = None) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.01)


@pytest.mark.parametrize("slow_answer", [False, True])
def test_profile_is_looked_up_on_resolution_and_fetched_on_first_use(
    client: FakeClient, cache: ChunkCache, slow_answer: bool
) -> None:
    """The lookup starts when the image resolves (before podman puts a layer to use); the
    prefetch starts on the first use: at once when the profile is known by then, or when the
    lookup ends (*slow_answer*: the layer is put to use while the registry has not answered)."""
    blob = make_layer(client, REF, FILES)
    source = Source()
    digest = client.images[REF].digest
    source.docs[digest] = profile_doc(blob.toc_digest, ["etc/b", "bin/tool"])
    if slow_answer:
        source.gate.clear()
    mgr = LayerManager(client, cache, quiet(), profiles=source)
    with structlog.testing.capture_logs() as logs:
        layer = mgr.get(REF, blob.digest)
        _wait_for(lambda: source.lookups == [(REF, digest)], source.lookups)  # no use yet
        if not slow_answer:
            _wait_for(lambda: any(e["event"] == "profile_found" for e in logs), logs)
        wanted = _chunks(layer, "etc/b") + _chunks(layer, "bin/tool")
        others = _chunks(layer, "etc/a") + _chunks(layer, "etc/c")
        assert not any(c.digest in cache for c in wanted)  # known, but nothing is in use
        assert not layer.planned
        mgr.use(REF, blob.digest)
        if not slow_answer:  # planned before the dependency prefetch looks at the layer
            assert layer.planned
        source.gate.set()
        _wait_for(lambda: all(c.digest in cache for c in wanted))
        assert layer.planned  # the dependency fetch leaves it to the profile
        _wait_for(lambda: any(e["event"] == "profile_prefetched" for e in logs), logs)
        mgr.use(REF, blob.digest)  # a second use: no second lookup
    assert not any(c.digest in cache for c in others)  # read-ahead is not part of it
    assert source.lookups == [(REF, digest)]
    found = [e for e in logs if e["event"] == "profile_found"]
    assert len(found) == 1 and found[0]["files"] == 2
    done = [e for e in logs if e["event"] == "profile_prefetched"]
    assert len(done) == 1 and done[0]["files"] == 2 and done[0]["skipped"] == 0
    mgr.close()


@pytest.mark.parametrize(
    ("answer", "event"),
    [
        (None, "profile_not_found"),
        (b'{"media_type": "something/else", "layers": []}', "profile_ignored"),
        (ValueError("not a LayerStoreError"), "profile_lookup_crashed"),
    ],
)
def test_missing_or_bad_profiles_are_logged_and_ignored(
    client: FakeClient, cache: ChunkCache, answer: Any, event: str
) -> None:
    from layerstore.errors import VerificationError

    blob = make_layer(client, REF, FILES)
    source = Source()
    digest = client.images[REF].digest
    if answer is not None:
        source.docs[digest] = answer
    mgr = LayerManager(client, cache, quiet(), profiles=source)
    with structlog.testing.capture_logs() as logs:
        mgr.get(REF, blob.digest)  # the TOC request; the lookup starts
        calls = len(client.sources[blob.digest].calls)
        mgr.use(REF, blob.digest)
        deadline = time.monotonic() + 30
        while not any(e["event"] == event for e in logs):
            assert time.monotonic() < deadline, logs
            time.sleep(0.01)
    assert len(client.sources[blob.digest].calls) == calls  # nothing fetched for it
    assert not any(e["event"] in ("profile_found", "profile_prefetched") for e in logs)
    # A digest mismatch from the source (a tampered blob) is ignored the same way.
    source.docs[digest] = VerificationError("profile blob has digest sha256:00; refusing it")
    mgr2 = LayerManager(
        client, ChunkCache(cache.root.parent / "c2", 1 << 30), quiet(), profiles=source
    )
    with structlog.testing.capture_logs() as logs2:
        mgr2.use(REF, blob.digest)
        deadline = time.monotonic() + 30
        while not any(e["event"] == "profile_ignored" for e in logs2):
            assert time.monotonic() < deadline, logs2
            time.sleep(0.01)
    assert "digest" in next(e for e in logs2 if e["event"] == "profile_ignored")["reason"]


def test_profile_prefetch_can_be_turned_off(client: FakeClient, cache: ChunkCache) -> None:
    blob = make_layer(client, REF, FILES)
    source = Source()
    off = quiet(profile_prefetch=ProfilePrefetchSettings(enabled=False))
    LayerManager(client, cache, off, profiles=source).use(REF, blob.digest)
    LayerManager(client, cache, quiet()).use(REF, blob.digest)  # no source: off
    time.sleep(0.1)
    assert source.lookups == []
