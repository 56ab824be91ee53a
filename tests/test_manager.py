"""LayerManager over the Go reference blobs, the real reader, and a fake registry client."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from layerstore.errors import (
    AuthenticationError,
    ChunkDigestMismatchError,
    ImageReferenceError,
    LayerNotFoundError,
    NotEStargzError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
    TOCDigestMismatchError,
)
from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from layerstore.estargz.reader import EStargzReader
from layerstore.registry.client import ResolvedImage
from layerstore.registry.manifest import Descriptor
from layerstore.registry.reference import Reference
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.depfetch import DependencyFetchSettings
from layerstore.runtime.fetcher import FetcherSettings
from layerstore.runtime.layer import LayerSettings
from layerstore.runtime.manager import (
    LayerManager,
    ManagerSettings,
)
from layerstore.runtime.prefetch import (
    DependencyPrefetchSettings,
    entrypoint_candidates,
    resolve_library,
    resolve_regular_file,
)
from layerstore.source import BytesSource, RangeSource
from testbed.resolved import resolved_image
from tests.test_fetcher import CountingSource
from tests.test_layer import tamper_member, tar_files

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_A = "registry.example/app:v1"
REF_B = "registry.example/other:v2"


@dataclass(frozen=True)
class Blob:
    data: bytes
    digest: str
    toc_digest: str
    diff_id: str
    uncompressed: int


def load(ref: Path, name: str) -> Blob:
    m = json.loads((ref / f"{name}.json").read_text())
    return Blob(
        (ref / f"{name}.esgz").read_bytes(),
        m["digest"],
        m["tocDigest"],
        m["diffID"],
        len(gzip.decompress((ref / f"{name}.esgz").read_bytes())),
    )


def desc(b: Blob, *, toc: str | None = None, size_ann: bool = True, mt: str = GZIP) -> Descriptor:
    ann = {TOC_DIGEST_ANNOTATION: toc or b.toc_digest}
    if size_ann:
        ann[UNCOMPRESSED_SIZE_ANNOTATION] = str(b.uncompressed)
    return Descriptor(mt, b.digest, len(b.data), ann)


class FakeClient:
    """A registry in memory: real ResolvedImage answers, blobs from bytes."""

    def __init__(self, blobs: dict[str, bytes], delay: float = 0.0) -> None:
        self.images: dict[str, ResolvedImage] = {}
        self.sources = {d: CountingSource(BytesSource(b)) for d, b in blobs.items()}
        self.resolve_calls = 0
        self.delay = delay
        self.fail: Exception | None = None
        self.lock = threading.Lock()

    def add(
        self,
        ref: str,
        layers: list[tuple[Descriptor, str]],
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.images[ref] = resolved_image(
            ref, [d for d, _ in layers], [i for _, i in layers], run_config
        )

    def resolve(self, ref: Reference, platform: str | None = None) -> ResolvedImage:
        with self.lock:
            self.resolve_calls += 1
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        try:
            return self.images[str(ref)]
        except KeyError:
            raise NotFoundError(f"{ref}: manifest unknown") from None

    def blob_source(self, image: ResolvedImage, digest: str, size: int) -> CountingSource:
        assert isinstance(image, ResolvedImage)
        return self.sources[digest]


@pytest.fixture
def blobs(go_reference: Path) -> dict[str, Blob]:
    return {n: load(go_reference, n) for n in ("ref-small", "ref-chunked-64k", "ref-prioritized")}


@pytest.fixture
def plain(go_reference: Path) -> Blob:
    data = gzip.compress((go_reference / "small.tar").read_bytes(), mtime=0)
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    return Blob(data, d, "", "sha256:" + "1" * 64, 0)


@pytest.fixture
def client(blobs: dict[str, Blob], plain: Blob) -> FakeClient:
    c = FakeClient({b.digest: b.data for b in [*blobs.values(), plain]})
    small, chunked, prio = blobs["ref-small"], blobs["ref-chunked-64k"], blobs["ref-prioritized"]
    c.add(
        REF_A,
        [
            (Descriptor(GZIP, plain.digest, len(plain.data), {}), plain.diff_id),
            (desc(small), small.diff_id),
            (desc(chunked, size_ann=False), chunked.diff_id),
        ],
    )
    c.add(REF_B, [(desc(chunked), chunked.diff_id), (desc(prio), prio.diff_id)])
    return c


def quiet(**kw: Any) -> ManagerSettings:
    """No fetch nobody asked for: no landmark prefetch, no building of the image's other
    layers, no dependency fetch on reads (tests of those turn them on)."""
    base = ManagerSettings(
        layer=LayerSettings(landmark_prefetch=False),
        resolve_siblings=False,
        dependency_fetch=DependencyFetchSettings(enabled=False),
    )
    return replace(base, **kw)


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", 1 << 30)


def test_both_key_schemes_resolve_the_same_layer(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob], go_reference: Path
) -> None:
    mgr = LayerManager(client, cache, quiet())
    small = blobs["ref-small"]
    by_digest = mgr.get(REF_A, small.digest)
    by_toc = mgr.get(REF_A, small.toc_digest)
    assert by_digest is by_toc
    assert by_digest.scheme_for(small.digest) == "compressed"
    assert mgr.scheme(REF_A, small.toc_digest) == "toc"
    comp = json.loads(by_digest.info_json("compressed"))
    assert comp["compressed-diff-digest"] == small.digest
    assert comp["diff-digest"] == small.diff_id
    assert comp["diff-size"] == small.uncompressed
    assert comp["compression"] == 2
    assert comp["uidset"] == [0, 1000] and comp["gidset"] == [0, 1000]
    toc = json.loads(by_toc.info_json("toc"))
    assert toc["toc-digest"] == small.toc_digest
    assert toc["flags"] == {"expected-layer-diffid": small.diff_id}
    assert toc["diff-size"] == small.uncompressed
    assert toc["compressed-size"] == len(small.data)
    # Real index, real data.
    files = tar_files(go_reference)
    ino = by_digest.index.find("app/data.bin")
    assert ino is not None
    assert by_digest.read(ino, 0, 400_000) == files["app/data.bin"]
    # One tail request (the TOC fits the 64 KiB guess) plus the data.
    assert mgr.tail_requests == 1


def test_toc_scheme_without_size_annotation(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    mgr = LayerManager(client, cache, quiet())
    chunked = blobs["ref-chunked-64k"]
    layer = mgr.get(REF_A, chunked.toc_digest)
    assert json.loads(layer.info_json("toc"))["diff-size"] == -1
    est = json.loads(layer.info_json("compressed"))["diff-size"]
    assert 0.9 * chunked.uncompressed <= est <= 1.1 * chunked.uncompressed


def test_same_layer_under_two_refs_is_shared(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    """Shared when two manifests of one repository make the same claims; another repository
    (or other claims) gets its own object, which finds the TOC in the TOC cache and the
    chunks in the chunk cache (docs/ARCHITECTURE.md, "Layer identity and the whole-blob check")."""
    chunked = blobs["ref-chunked-64k"]
    client.add("registry.example/app:v2", [(desc(chunked, size_ann=False), chunked.diff_id)])
    mgr = LayerManager(client, cache, quiet())
    a = mgr.get(REF_A, chunked.digest)
    a2 = mgr.get("registry.example/app:v2", chunked.toc_digest)
    assert a is a2 and a.fetcher is a2.fetcher
    b = mgr.get(REF_B, chunked.toc_digest)  # another repository
    assert b is not a and b.identity != a.identity
    assert len(client.sources[chunked.digest].calls) == 1  # the TOC came from the cache
    ino = a.index.find("app/data.bin")
    assert ino is not None
    whole = a.read(ino, 0, 1 << 30)  # every chunk: no read-ahead beyond it
    n = len(client.sources[chunked.digest].calls)
    assert b.read(ino, 0, 1 << 30) == whole
    assert len(client.sources[chunked.digest].calls) == n  # b's read hit the chunk cache
    assert len(mgr.loaded()) == 2


def test_tail_guess_grows_with_the_blob(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    # A guess of 512 bytes would need two requests (above); a share of the blob makes one.
    mgr = LayerManager(client, cache, quiet(tail_guess_bytes=512, tail_guess_share=1.0))
    mgr.get(REF_A, blobs["ref-small"].digest)
    assert mgr.tail_requests == 1
    capped = quiet(tail_guess_bytes=512, tail_guess_share=1.0, tail_guess_max_bytes=512)
    mgr2 = LayerManager(client, ChunkCache(cache.root.parent / "c2", 1 << 30), capped)
    mgr2.get(REF_A, blobs["ref-small"].digest)
    assert mgr2.tail_requests == 2


def test_small_tail_guess_needs_two_requests(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob], go_reference: Path
) -> None:
    mgr = LayerManager(client, cache, quiet(tail_guess_bytes=512, tail_guess_share=0.0))
    layer = mgr.get(REF_A, blobs["ref-small"].digest)
    assert mgr.tail_requests == 2
    ino = layer.index.find("app/main.py")
    assert ino is not None
    assert layer.read(ino, 0, 100) == tar_files(go_reference)["app/main.py"]


def test_lookup_failures(client: FakeClient, cache: ChunkCache, plain: Blob) -> None:
    mgr = LayerManager(client, cache, quiet())
    with pytest.raises(NotEStargzError):
        mgr.get(REF_A, plain.digest)
    with pytest.raises(LayerNotFoundError):
        mgr.get(REF_A, "sha256:" + "ab" * 32)
    with pytest.raises(LayerNotFoundError):
        mgr.get(REF_A, "not-a-digest")
    with pytest.raises(ImageReferenceError):
        mgr.get("Registry.example/UPPER CASE", plain.digest)
    with pytest.raises(NotFoundError):
        mgr.get("registry.example/missing:v1", plain.digest)
    # Not eStargz fails before any blob byte is fetched.
    assert client.sources[plain.digest].calls == []


def test_non_gzip_media_type_refused(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    small = blobs["ref-small"]
    client.add("registry.example/zstd:v1", [(desc(small, mt=GZIP[:-4] + "zstd"), small.diff_id)])
    mgr = LayerManager(client, cache, quiet())
    with pytest.raises(NotEStargzError):
        mgr.get("registry.example/zstd:v1", small.digest)


def unchecked_open_toc(
    source: RangeSource, member: bytes, toc_offset: int, footer_size: int, expected: str
) -> EStargzReader:
    """Fault injection: a reader that does NOT check the TOC digest (the manager must)."""
    return EStargzReader.from_toc_bytes(source, member, toc_offset, footer_size, None)


@pytest.mark.parametrize("checking_reader", [True, False])
def test_toc_digest_mismatch(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob], checking_reader: bool
) -> None:
    small = blobs["ref-small"]
    wrong = "sha256:" + "cd" * 32
    client.add("registry.example/liar:v1", [(desc(small, toc=wrong), small.diff_id)])
    kw: dict[str, Any] = {} if checking_reader else {"open_toc": unchecked_open_toc}
    mgr = LayerManager(client, cache, quiet(), **kw)
    for key in (small.digest, wrong):
        with pytest.raises(TOCDigestMismatchError):
            mgr.get("registry.example/liar:v1", key)
    assert mgr.loaded() == []


def test_negative_cache_expires(client: FakeClient, cache: ChunkCache) -> None:
    mgr = LayerManager(client, cache, quiet(negative_ttl=0.3))
    key = "sha256:" + "ef" * 32
    with pytest.raises(LayerNotFoundError):
        mgr.get(REF_A, key)
    n = client.resolve_calls
    for _ in range(5):
        with pytest.raises(LayerNotFoundError):
            mgr.get(REF_A, key)
    assert client.resolve_calls == n
    time.sleep(0.35)
    client.fail = RegistryUnavailableError("registry.example: connection refused")
    mgr2 = mgr  # same manager: the negative entry expired, a new attempt is made
    with pytest.raises(RegistryError):
        mgr2.get("registry.example/fresh:v1", key)
    assert client.resolve_calls == n + 1


def test_forget_failures_of_one_repository(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    """Credentials arrived for registry.example/app: its remembered failures go (the next
    lookup asks the registry), other repositories' stay for their negative_ttl."""
    mgr = LayerManager(client, cache, quiet(negative_ttl=60))
    small, chunked = blobs["ref-small"], blobs["ref-chunked-64k"]
    client.fail = AuthenticationError("registry.example: anonymous access refused (HTTP 401)")
    lookups = [(REF_A, small.digest), (REF_A, small.toc_digest), (REF_B, chunked.digest)]
    for ref, key in lookups:
        with pytest.raises(AuthenticationError):
            mgr.get(ref, key)
    client.fail = None
    n = client.resolve_calls
    for ref, key in lookups:
        with pytest.raises(AuthenticationError):  # remembered: the registry is not asked
            mgr.get(ref, key)
    assert client.resolve_calls == n
    assert mgr.forget_failures("registry.example", "other/app") == 0
    assert mgr.forget_failures("Registry.Example", "app") == 2
    assert mgr.get(REF_A, small.digest).compressed_digest == small.digest
    assert mgr.get(REF_A, small.toc_digest).compressed_digest == small.digest
    assert client.resolve_calls == n + 1
    with pytest.raises(AuthenticationError):
        mgr.get(REF_B, chunked.digest)
    assert mgr.forget_failures("registry.example", "app") == 0


def test_single_flight_get_under_16_threads(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    client.delay = 0.2
    mgr = LayerManager(client, cache, quiet())
    chunked = blobs["ref-chunked-64k"]
    barrier = threading.Barrier(16)
    got: list[Any] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        layer = mgr.get(REF_B, chunked.digest if i % 2 else chunked.toc_digest)
        with lock:
            got.append(layer)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 16 and all(g is got[0] for g in got)
    assert client.resolve_calls == 1
    assert len(client.sources[chunked.digest].calls) == 1


def test_toc_cache_survives_restart(
    client: FakeClient, tmp_path: Path, blobs: dict[str, Blob], go_reference: Path
) -> None:
    small = blobs["ref-small"]
    files = tar_files(go_reference)
    mgr = LayerManager(client, ChunkCache(tmp_path / "c", 1 << 30), quiet())
    layer = mgr.get(REF_A, small.toc_digest)
    ino = layer.index.find("app/data.bin")
    assert ino is not None
    layer.read(ino, 0, 300_000)
    calls = len(client.sources[small.digest].calls)
    mgr.cache.close()
    # Restart with the blob unreachable: TOC and data come from the disk cache.
    client.sources[small.digest].fail = RegistryUnavailableError("blob store down")
    mgr2 = LayerManager(client, ChunkCache(tmp_path / "c", 1 << 30), quiet())
    layer2 = mgr2.get(REF_A, small.digest)
    assert layer2 is not layer
    assert mgr2.tail_requests == 0
    assert layer2.read(ino, 0, 300_000) == files["app/data.bin"]
    assert len(client.sources[small.digest].calls) == calls
    # A damaged TOC cache entry is discarded and the TOC fetched again.
    client.sources[small.digest].fail = None
    for p in (tmp_path / "c" / "toc").iterdir():
        p.write_bytes(p.read_bytes()[:-10] + b"0123456789")
    mgr3 = LayerManager(client, ChunkCache(tmp_path / "c", 1 << 30), quiet())
    assert mgr3.get(REF_A, small.digest).toc_digest == small.toc_digest
    assert mgr3.tail_requests == 1


def test_use_release_prefetch_and_sweep(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    prio = blobs["ref-prioritized"]
    settings = ManagerSettings(
        layer=LayerSettings(landmark_prefetch=True), idle_drop_seconds=0, resolve_siblings=False
    )
    mgr = LayerManager(client, cache, settings)
    layer = mgr.get(REF_B, prio.toc_digest)
    src = client.sources[prio.digest]
    assert len(src.calls) == 1  # lookups do not prefetch
    assert mgr.use(REF_B, prio.toc_digest) == 1
    assert mgr.use(REF_B, prio.toc_digest) == 2
    ino = layer.index.find("app/main.py")
    assert ino is not None
    wanted = layer.index.chunks(ino)[0]
    deadline = time.monotonic() + 5
    while wanted.digest not in cache and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wanted.digest in cache
    assert len(src.calls) == 2  # one landmark request
    assert mgr.sweep() == 0  # in use
    assert mgr.release(REF_B, prio.toc_digest) == 1
    assert mgr.release(REF_B, prio.toc_digest) == 0
    assert mgr.release(REF_B, prio.toc_digest) == 0
    assert mgr.users(REF_B, prio.toc_digest) == 0
    assert mgr.sweep() == 1
    assert mgr.loaded() == []
    # Dropped from memory only: the chunks stay on disk.
    assert wanted.digest in cache


def test_background_fill_after_use(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    chunked = blobs["ref-chunked-64k"]
    settings = ManagerSettings(
        layer=LayerSettings(landmark_prefetch=True, background_fill=True),
        fetcher=FetcherSettings(background_idle_seconds=0.0, background_share=1.0),
    )
    mgr = LayerManager(client, cache, settings)
    layer = mgr.get(REF_A, chunked.digest)
    mgr.use(REF_A, chunked.digest)
    n = len(layer.fetcher.chunks)

    def done() -> bool:
        # the fetcher puts a chunk in the cache before it counts it: wait for both
        cached = all(c.digest in cache for c in layer.fetcher.chunks)
        return cached and layer.fetcher.stats.background_chunks == n

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not done():
        time.sleep(0.01)
    assert all(c.digest in cache for c in layer.fetcher.chunks)
    assert layer.fetcher.stats.background_chunks == n
    mgr.close()


def test_corrupted_chunk_real_reader(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob], go_reference: Path
) -> None:
    chunked = blobs["ref-chunked-64k"]
    files = tar_files(go_reference)
    probe = LayerManager(client, ChunkCache(cache.root.parent / "probe", 1 << 30), quiet())
    ino = probe.get(REF_B, chunked.digest).index.find("app/data.bin")
    assert ino is not None
    bad = probe.get(REF_B, chunked.digest).index.chunks(ino)[3]
    src = client.sources[chunked.digest]
    src.inner = BytesSource(tamper_member(chunked.data, bad.offset, bad.compressed_end))
    mgr = LayerManager(client, cache, quiet())
    layer = mgr.get(REF_B, chunked.toc_digest)
    with pytest.raises(ChunkDigestMismatchError):
        layer.read(ino, 0, 300_000)
    assert layer.read(ino, 0, bad.chunk_offset) == files["app/data.bin"][: bad.chunk_offset]
    main = layer.index.find("app/main.py")
    assert main is not None
    assert layer.read(main, 0, 100) == files["app/main.py"]
    assert bad.digest not in cache


@pytest.mark.parametrize("cache_bytes", [200_000, 2_000_000])
def test_concurrent_random_reads_with_background_fill(
    client: FakeClient,
    tmp_path: Path,
    blobs: dict[str, Blob],
    go_reference: Path,
    cache_bytes: int,
) -> None:
    """16 threads of random reads racing the landmark prefetch, the sequential read-ahead and
    either LRU eviction (a cache smaller than the layer: no background fill) or the
    background fill (a large cache)."""
    import random

    chunked = blobs["ref-chunked-64k"]
    files = tar_files(go_reference)
    client.sources[chunked.digest].delay = 0.01
    cache = ChunkCache(tmp_path / "small", cache_bytes, max_open_files=2)
    settings = ManagerSettings(
        layer=LayerSettings(landmark_prefetch=True, background_fill=True),
        fetcher=FetcherSettings(
            background_idle_seconds=0.0, background_share=1.0, readahead_bytes=70_000
        ),
    )
    mgr = LayerManager(client, cache, settings)
    layer = mgr.get(REF_A, chunked.digest)
    mgr.use(REF_A, chunked.digest)
    names = sorted(p for p in files if layer.index.find(p) is not None)
    errors: list[str] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(60):
            path = rnd.choice(names)
            ino = layer.index.find(path)
            assert ino is not None
            want = files[path]
            off = rnd.randrange(0, max(1, len(want)))
            n = rnd.randrange(1, 140_000)
            if layer.read(ino, off, n) != want[off : off + n]:
                errors.append(f"{path} {off} {n}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    if cache_bytes > 1_000_000:
        deadline = time.monotonic() + 10
        while layer.fetcher._fill_thread is None and time.monotonic() < deadline:
            time.sleep(0.01)
        layer.fetcher.join_background_fill(10)
        assert all(c.digest in cache for c in layer.fetcher.chunks)
    else:
        assert layer.fetcher.stats.background_chunks == 0
    mgr.close()
    cache.close()
    assert cache.total_bytes <= cache_bytes


def test_request_limit_is_shared_across_layers(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    lock = threading.Lock()
    active = [0, 0]  # current, max

    class Gate:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def read_ranges(self, ranges: Any) -> list[bytes]:
            with lock:
                active[0] += 1
                active[1] = max(active[1], active[0])
            try:
                time.sleep(0.05)
                return self.inner.read_ranges(ranges)  # type: ignore[no-any-return]
            finally:
                with lock:
                    active[0] -= 1

    settings = quiet(fetcher=FetcherSettings(max_concurrent_requests=2, readahead_bytes=0))
    mgr = LayerManager(client, cache, settings)
    layers = [
        mgr.get(REF_B, blobs["ref-chunked-64k"].digest),
        mgr.get(REF_B, blobs["ref-prioritized"].digest),
    ]
    for layer in layers:
        layer.fetcher._source = Gate(layer.fetcher._source)  # type: ignore[assignment]
    jobs = [(layer, c) for layer in layers for c in layer.fetcher.chunks]
    threads = [threading.Thread(target=lay.fetcher.get_chunk, args=(c,)) for lay, c in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(jobs) >= 8
    assert active[1] == 2
    assert all(c.digest in cache for _, c in jobs)


def test_entrypoint_candidates() -> None:
    assert entrypoint_candidates({"config": {"Cmd": ["/usr/bin/python3", "-c", "x"]}}) == [
        "/usr/bin/python3"
    ]
    cfg = {"config": {"Entrypoint": ["tini"], "Cmd": ["/x"], "Env": ["PATH=/a:/b:rel"]}}
    assert entrypoint_candidates(cfg) == ["/a/tini", "/b/tini"]
    rel = {"config": {"Cmd": ["./run.sh"], "WorkingDir": "/app"}}
    assert entrypoint_candidates(rel) == ["/app/run.sh"]
    assert entrypoint_candidates({"config": {}}) == []
    assert entrypoint_candidates({}) == []
    assert entrypoint_candidates(None) == []
    assert entrypoint_candidates({"config": {"Cmd": [3]}}) == []


def test_dependency_prefetch_fetches_the_entrypoint_of_a_layer_without_landmark(
    client: FakeClient, cache: ChunkCache, blobs: dict[str, Blob]
) -> None:
    chunked = blobs["ref-chunked-64k"]
    ref = "registry.example/entry:v1"
    client.add(ref, [(desc(chunked, size_ann=False), chunked.diff_id)], {"Cmd": ["/app/data.bin"]})
    mgr = LayerManager(client, cache, quiet())
    layer = mgr.get(ref, chunked.digest)
    ino = resolve_regular_file(layer.index, "/app/data.bin")
    assert ino is not None and resolve_regular_file(layer.index, "/app/nothing") is None
    wanted = list(layer.index.chunks(ino))
    assert len(wanted) > 1
    assert not any(c.digest in cache for c in wanted)
    mgr.use(ref, chunked.digest)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(c.digest in cache for c in wanted):
        time.sleep(0.01)
    assert all(c.digest in cache for c in wanted)
    # Disabled: nothing fetched on use.
    mgr2 = LayerManager(
        client,
        ChunkCache(cache.root.parent / "c2", 1 << 30),
        quiet(dependency_prefetch=DependencyPrefetchSettings(entrypoint_bytes=0)),
    )
    layer2 = mgr2.get(ref, chunked.digest)
    calls = len(client.sources[chunked.digest].calls)
    mgr2.use(ref, chunked.digest)
    time.sleep(0.1)
    assert len(client.sources[chunked.digest].calls) == calls
    assert layer2 is not layer


def _elf_layer(
    client: FakeClient, files: dict[str, bytes | str], prioritized: tuple[str, ...] = ()
) -> Blob:
    import io
    import tarfile

    from layerstore.estargz.writer import WriterOptions, write_estargz

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, v in files.items():
            ti = tarfile.TarInfo(name)
            if isinstance(v, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, v
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(v), 0o755
                tf.addfile(ti, io.BytesIO(v))
    out = io.BytesIO()
    res = write_estargz(
        io.BytesIO(buf.getvalue()),
        out,
        WriterOptions(chunk_size=1024, prioritized_files=prioritized),
    )
    data = out.getvalue()
    blob = Blob(data, res.blob_digest, res.toc_digest, res.diff_id, res.uncompressed_size)
    client.sources[blob.digest] = CountingSource(BytesSource(data))
    return blob


@pytest.mark.parametrize("split", [False, True])
def test_dependency_prefetch_fetches_the_entrypoints_shared_libraries(
    client: FakeClient, cache: ChunkCache, split: bool
) -> None:
    from tests.test_elfdeps import make_elf

    top: dict[str, bytes | str] = {
        "app/bin/prog": make_elf("/lib64/ld-linux.so.2", ["libfoo.so.1"], pad=3000),
        "usr/lib/libfoo.so.1": "libfoo.so.1.2",  # relative symlink
        "usr/lib/libfoo.so.1.2": make_elf(None, ["libbar.so"], pad=2500),  # recursive
        "usr/lib/libunused.so": make_elf(None, [], pad=5000),
    }
    base: dict[str, bytes | str] = {
        "lib64/ld-linux.so.2": "/lib/x86_64-linux-gnu/ld-2.36.so",  # absolute symlink
        "lib/x86_64-linux-gnu/ld-2.36.so": make_elf(None, [], pad=2000),
        "lib/x86_64-linux-gnu/libbar.so": make_elf(None, ["libmissing.so"], pad=1500),
    }
    # split: the base libraries in a lower layer of the image (used before the top one)
    blobs_ = [_elf_layer(client, base), _elf_layer(client, top)] if split else []
    if not split:
        blobs_ = [_elf_layer(client, {**top, **base})]

    ref = f"registry.example/elf:{int(split)}"
    client.add(
        ref,
        [(desc(b), b.diff_id) for b in blobs_],
        {"Entrypoint": ["prog"], "Env": ["PATH=/app/bin"]},
    )
    mgr = LayerManager(client, cache, quiet())
    layers = [mgr.get(ref, b.digest) for b in blobs_]

    def chunks_of(path: str) -> list[Any]:
        for layer in layers:
            ino = resolve_regular_file(layer.index, path)
            if ino is not None:
                return list(layer.index.chunks(ino))
        raise AssertionError(path)

    wanted = [
        c
        for p in (
            "/app/bin/prog",
            "/lib/x86_64-linux-gnu/ld-2.36.so",
            "/usr/lib/libfoo.so.1.2",
            "/lib/x86_64-linux-gnu/libbar.so",
        )
        for c in chunks_of(p)
    ]
    assert len(wanted) > 4 and not any(c.digest in cache for c in wanted)
    for b in blobs_:
        mgr.use(ref, b.digest)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(c.digest in cache for c in wanted):
        time.sleep(0.01)
    assert all(c.digest in cache for c in wanted)  # (neighbours may come along: read-ahead)
    mgr.close()


def test_malloc_arenas_capped_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from layerstore.runtime.manager import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False  # the operator's setting stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas(0) is False
    assert limit_malloc_arenas(2) is True  # glibc (Debian, Fedora)


def test_idle_trim_once_after_fetching_stops() -> None:
    """The heap is trimmed once per quiet period that follows fetching: not while the memory
    budget keeps granting, not again while nothing happens, and again after the next burst."""
    from layerstore.runtime.manager import IdleTrim
    from layerstore.runtime.membudget import MemoryBudget

    budget = MemoryBudget(1 << 20)
    trims: list[int] = []
    rss = iter(range(100, 0, -1))
    trim = IdleTrim(lambda: budget.granted, trim=lambda: trims.append(1), rss=lambda: next(rss))
    assert trim.tick() is None and not trims  # nothing fetched yet
    budget.acquire(1000).release()
    assert trim.tick() is None and not trims  # busy in this period
    budget.acquire(10).release()
    assert trim.tick() is None and not trims  # still busy
    assert trim.tick() == (100, 99) and trims == [1]  # quiet: trimmed, RSS before and after
    assert trim.tick() is None and trim.tick() is None and trims == [1]  # once
    budget.acquire(1).release()
    assert trim.tick() is None
    assert trim.tick() == (98, 97) and len(trims) == 2


def test_resolve_regular_file_follows_directory_symlinks(
    client: FakeClient, cache: ChunkCache
) -> None:
    """Merged-/usr images: the loader's path resolves through /lib64 -> usr/lib64, then a
    relative symlink with "..", as the kernel resolves it; loops and dangling links give
    None."""
    blob = _elf_layer(
        client,
        {
            "lib64": "usr/lib64",
            "lib": "/usr/lib",
            "usr/lib64/ld-linux-x86-64.so.2": "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": b"\x7fELF" + b"x" * 500,
            "usr/lib/x86_64-linux-gnu/libc.so.6": b"\x7fELF" + b"c" * 500,
            "usr/bin/python3": "python3.11",
            "usr/bin/python3.11": b"\x7fELF" + b"p" * 500,
            "loop/a": "b",
            "loop/b": "a",
            "up": "../../../../usr/bin/python3",
            "dangling": "/nowhere/file",
        },
    )
    client.add("registry.example/merged:v1", [(desc(blob), blob.diff_id)])
    index = (
        LayerManager(client, cache, quiet()).get("registry.example/merged:v1", blob.digest).index
    )
    ld = index.find("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    assert ld is not None
    assert resolve_regular_file(index, "/lib64/ld-linux-x86-64.so.2") == ld
    assert resolve_library(index, "/lib64/ld-linux-x86-64.so.2") == ld
    libc = index.find("usr/lib/x86_64-linux-gnu/libc.so.6")
    assert resolve_regular_file(index, "/lib/x86_64-linux-gnu/libc.so.6") == libc
    assert resolve_library(index, "libc.so.6") == libc
    py = index.find("usr/bin/python3.11")
    assert resolve_regular_file(index, "/usr/bin/python3") == py
    assert resolve_regular_file(index, "/up") == py  # ".." stops at the root
    assert resolve_regular_file(index, "/usr/bin/../bin/./python3.11") == py
    for missing in ("/loop/a", "/dangling", "/lib64", "/usr/bin/python3.11/x", "/", ""):
        assert resolve_regular_file(index, missing) is None, missing


def test_dependency_prefetch_fetches_what_a_prioritized_list_lacks(
    client: FakeClient, cache: ChunkCache
) -> None:
    """A layer with prioritized files still has its entrypoint's loader and libraries
    fetched when they are outside the prioritized region: lists made with strace miss what
    the kernel reads (the ELF loader), here reached through a /lib64 directory symlink."""
    from tests.test_elfdeps import make_elf

    files: dict[str, bytes | str] = {
        "app/bin/prog": make_elf("/lib64/ld-linux-x86-64.so.2", ["libfoo.so.1"], pad=3000),
        "usr/lib/libfoo.so.1": make_elf(None, [], pad=2500),
        "lib64": "usr/lib64",
        "usr/lib64/ld-linux-x86-64.so.2": make_elf(None, [], pad=2000),
        "usr/lib/libunused.so": make_elf(None, [], pad=5000),
    }
    blob = _elf_layer(client, files, prioritized=("app/bin/prog", "usr/lib/libfoo.so.1"))
    ref = "registry.example/prio-elf:v1"
    client.add(ref, [(desc(blob), blob.diff_id)], {"Cmd": ["/app/bin/prog"]})
    settings = replace(quiet(), layer=replace(quiet().layer, landmark_prefetch=True))
    mgr = LayerManager(client, cache, settings)
    layer = mgr.get(ref, blob.digest)
    landmark = layer.index.prefetch_landmark_offset
    assert landmark is not None

    def chunks(path: str) -> list[Any]:
        ino = resolve_regular_file(layer.index, path)
        assert ino is not None, path
        return list(layer.index.chunks(ino))

    loader = chunks("/lib64/ld-linux-x86-64.so.2")
    assert all(c.offset > landmark for c in loader)  # not in the prioritized region
    mgr.use(ref, blob.digest)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(c.digest in cache for c in loader):
        time.sleep(0.01)
    assert all(c.digest in cache for c in loader)
    assert all(c.digest in cache for c in chunks("/app/bin/prog") + chunks("/usr/lib/libfoo.so.1"))
    mgr.close()
