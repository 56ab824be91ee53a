"""Layer identity and whole-blob verification, at the manager's level (issue 9, finding 1 and
the background-fill part of finding 4; the idle sweep of finding 6).

The registry here is in memory and knows which repository serves which bytes, so an image on
one registry can claim another's blob digest; the blobs are real eStargz
(``tests/estargz_util.py``) read by the real reader. ``tests/test_trust_identity.py`` runs the
same attacks through the daemon and the FUSE mount.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import structlog

from layerstore.errors import (
    LayerNotFoundError,
    NotFoundError,
    TOCDigestMismatchError,
    VerificationError,
)
from layerstore.registry.client import ResolvedImage
from layerstore.registry.manifest import Descriptor
from layerstore.registry.reference import Reference, parse_reference
from layerstore.runtime.blobcheck import BlobVerifier, TOCClaim
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.fetcher import FetcherSettings
from layerstore.runtime.layer import LayerSettings
from layerstore.runtime.manager import (
    TOC_DIGEST_ANNOTATION,
    LayerManager,
    ManagerSettings,
)
from layerstore.source import BytesSource
from testbed.resolved import resolved_image
from tests.estargz_util import build_blob
from tests.test_fetcher import CountingSource

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
VICTIM = "victim.example/app:v1"
ATTACKER = "evil.example/app:v1"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    digest: str
    toc: str
    diff_id: str
    toc_offset: int


def make_blob(files: list[tuple[str, bytes]], chunk_size: int = 0) -> Blob:
    b = build_blob(files, chunk_size=chunk_size)
    return Blob(b.blob, sha(b.blob), b.toc_digest, sha(gzip.decompress(b.blob)), b.toc_offset)


def layer_desc(digest: str, size: int, toc: str) -> Descriptor:
    return Descriptor(GZIP, digest, size, {TOC_DIGEST_ANNOTATION: toc})


class Registries:
    """Images and blobs per repository: ``blob_source`` answers with the bytes of the
    repository the image came from, whatever digest it is asked for."""

    def __init__(self) -> None:
        self.images: dict[str, ResolvedImage] = {}
        self.sources: dict[tuple[str, str], CountingSource] = {}

    def add(self, ref: str, desc: Descriptor, diff_id: str, data: bytes) -> None:
        image = resolved_image(ref, [desc], [diff_id])
        self.images[ref] = image
        key = (image.source.location, desc.digest)
        if key not in self.sources:
            self.sources[key] = CountingSource(BytesSource(data))

    def source(self, ref: str, digest: str) -> CountingSource:
        return self.sources[(parse_reference(ref).name, digest)]

    def resolve(self, ref: Reference, platform: str | None = None) -> ResolvedImage:
        try:
            return self.images[str(ref)]
        except KeyError:
            raise NotFoundError(f"{ref}: manifest unknown") from None

    def blob_source(self, image: ResolvedImage, digest: str, size: int) -> CountingSource:
        return self.sources[(image.source.location, digest)]


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", 1 << 30)


def settings(**kw: object) -> ManagerSettings:
    base = ManagerSettings(layer=LayerSettings(landmark_prefetch=False))
    return replace(base, **kw)  # type: ignore[arg-type]


def filling(**kw: object) -> ManagerSettings:
    return settings(
        layer=LayerSettings(landmark_prefetch=False, background_fill=True),
        fetcher=FetcherSettings(
            background_idle_seconds=0.0, background_share=1.0, background_range_bytes=4096
        ),
        **kw,
    )


VICTIM_FILES = [("etc/motd", b"victim motd\n"), ("bin/tool", b"victim tool " * 500)]
ATTACKER_FILES = [("etc/motd", b"ATTACKER MOTD\n"), ("bin/tool", b"ATTACKER TOOL " * 500)]


def read_file(mgr: LayerManager, ref: str, key: str, path: str) -> bytes:
    layer = mgr.get(ref, key)
    ino = layer.index.find(path)
    assert ino is not None
    return layer.read(ino, 0, 1 << 20)


# --- finding 1: a compressed digest is a claim of one manifest --------------------------------


@pytest.mark.parametrize("attacker_first", [True, False])
def test_a_claimed_digest_with_another_toc_cannot_poison_the_victim(
    cache: ChunkCache, attacker_first: bool
) -> None:
    victim, evil = make_blob(VICTIM_FILES), make_blob(ATTACKER_FILES)
    reg = Registries()
    reg.add(
        VICTIM, layer_desc(victim.digest, len(victim.data), victim.toc), victim.diff_id, victim.data
    )
    # The attacker's registry serves its own blob under the victim's digest.
    reg.add(ATTACKER, layer_desc(victim.digest, len(evil.data), evil.toc), evil.diff_id, evil.data)
    mgr = LayerManager(reg, cache, settings())
    order = [ATTACKER, VICTIM] if attacker_first else [VICTIM, ATTACKER]
    layers = {ref: mgr.get(ref, victim.digest) for ref in order}
    reads = {ref: read_file(mgr, ref, victim.digest, "etc/motd") for ref in order}
    assert layers[VICTIM] is not layers[ATTACKER]
    assert reads[VICTIM] == b"victim motd\n"
    assert reads[ATTACKER] == b"ATTACKER MOTD\n"  # its own image, its own claims
    assert layers[VICTIM].toc_digest == victim.toc
    assert mgr.get(VICTIM, victim.toc) is layers[VICTIM]
    with pytest.raises(LayerNotFoundError):
        mgr.get(VICTIM, evil.toc)  # not a key of the victim's manifest
    info = json.loads(layers[VICTIM].info_json("compressed"))
    assert info["diff-digest"] == victim.diff_id
    # Each layer read only from the repository its own manifest came from.
    victim_src = reg.source(VICTIM, victim.digest)
    evil_src = reg.source(ATTACKER, victim.digest)
    assert victim_src.calls and evil_src.calls
    n = len(evil_src.calls)
    assert read_file(mgr, VICTIM, victim.digest, "bin/tool") == VICTIM_FILES[1][1]
    assert len(evil_src.calls) == n


def test_a_wrong_toc_annotation_is_refused_while_the_blob_is_loaded(cache: ChunkCache) -> None:
    victim = make_blob(VICTIM_FILES)
    reg = Registries()
    reg.add(
        VICTIM, layer_desc(victim.digest, len(victim.data), victim.toc), victim.diff_id, victim.data
    )
    liar = "victim.example/app:liar"
    wrong = sha(b"not the TOC")
    reg.add(liar, layer_desc(victim.digest, len(victim.data), wrong), victim.diff_id, victim.data)
    mgr = LayerManager(reg, cache, settings())
    assert read_file(mgr, VICTIM, victim.digest, "etc/motd") == b"victim motd\n"
    for key in (victim.digest, wrong):
        with pytest.raises(TOCDigestMismatchError):
            mgr.get(liar, key)
    assert len(mgr.loaded()) == 1


def test_a_toc_cached_for_another_registry_is_not_taken_for_this_blob(
    cache: ChunkCache,
) -> None:
    """The TOC cache is shared (by blob digest and TOC digest, re-verified against the TOC
    digest on load): an image naming the victim's digest with the attacker's TOC digest finds
    the attacker's TOC there. The reader checks it against this blob's geometry, fetches the
    blob's own TOC, and refuses the claim; had the geometry matched, the whole-blob check
    compares the blob's TOC member with the one the layer was built from
    (``test_verifier_checks_the_toc_member_and_footer``)."""
    victim, evil = make_blob(VICTIM_FILES), make_blob(ATTACKER_FILES)
    reg = Registries()
    reg.add(ATTACKER, layer_desc(victim.digest, len(evil.data), evil.toc), evil.diff_id, evil.data)
    mixed = "victim.example/app:mixed"
    reg.add(
        mixed, layer_desc(victim.digest, len(victim.data), evil.toc), victim.diff_id, victim.data
    )
    mgr = LayerManager(reg, cache, settings())
    mgr.get(ATTACKER, victim.digest)
    with pytest.raises(TOCDigestMismatchError):
        mgr.get(mixed, victim.digest)
    assert reg.source(mixed, victim.digest).calls  # its own registry was asked


def test_sharing_needs_the_same_claims_and_the_same_repository(cache: ChunkCache) -> None:
    victim = make_blob(VICTIM_FILES)
    d = layer_desc(victim.digest, len(victim.data), victim.toc)
    reg = Registries()
    reg.add(VICTIM, d, victim.diff_id, victim.data)
    reg.add("victim.example/app:v2", d, victim.diff_id, victim.data)  # same repository
    reg.add("victim.example/other:v1", d, victim.diff_id, victim.data)  # another repository
    reg.add("victim.example/app:odd", d, sha(b"another DiffID"), victim.data)
    mgr = LayerManager(reg, cache, settings())
    a = mgr.get(VICTIM, victim.digest)
    assert mgr.get("victim.example/app:v2", victim.toc) is a
    other = mgr.get("victim.example/other:v1", victim.digest)
    odd = mgr.get("victim.example/app:odd", victim.digest)
    assert other is not a and odd is not a and odd is not other
    # info renders each image's own DiffID.
    assert json.loads(odd.info_json("compressed"))["diff-digest"] == sha(b"another DiffID")
    assert json.loads(a.info_json("toc"))["flags"]["expected-layer-diffid"] == victim.diff_id
    # The other repository's layer reads its own blob, but what is cached is shared: its TOC
    # came from the TOC cache, and a file read through the first layer costs it nothing.
    assert read_file(mgr, VICTIM, victim.digest, "bin/tool") == VICTIM_FILES[1][1]
    other_src = reg.source("victim.example/other:v1", victim.digest)
    assert other_src.calls == []
    assert read_file(mgr, "victim.example/other:v1", victim.digest, "bin/tool")
    assert other_src.calls == []


# --- finding 4 (fill): blob digest and DiffID when the whole blob has been seen -----------------


def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_background_fill_verifies_and_remembers_a_good_blob(cache: ChunkCache) -> None:
    victim = make_blob(VICTIM_FILES, chunk_size=1000)
    reg = Registries()
    reg.add(
        VICTIM, layer_desc(victim.digest, len(victim.data), victim.toc), victim.diff_id, victim.data
    )
    mgr = LayerManager(reg, cache, filling())
    layer = mgr.get(VICTIM, victim.digest)
    mgr.use(VICTIM, victim.digest)
    wait_for(lambda: layer.verified)
    assert layer.verified and layer.bad is None
    src = reg.source(VICTIM, victim.digest)
    assert src.nbytes >= len(victim.data)  # every byte went through the check
    mgr.close()
    # Another process on the same cache: known good, nothing cached is fetched again.
    src.calls.clear()
    mgr2 = LayerManager(reg, cache, filling())
    layer2 = mgr2.get(VICTIM, victim.digest)
    assert layer2.known_verified()
    mgr2.use(VICTIM, victim.digest)
    wait_for(lambda: getattr(layer2.fetcher._fill_thread, "ident", None) is not None)
    layer2.fetcher.join_background_fill(10)
    assert src.calls == []
    mgr2.close()


def tampered_outside_chunks(blob: bytes) -> bytes:
    """The gzip MTIME of the first member (tar headers only, before any payload): every chunk
    and the TOC still verify, the DiffID too; only the blob digest can tell."""
    out = bytearray(blob)
    assert out[:3] == b"\x1f\x8b\x08"
    out[5] ^= 0x40
    assert gzip.decompress(bytes(out)) == gzip.decompress(blob)
    return bytes(out)


@pytest.mark.parametrize("what", ["blob bytes", "DiffID"])
def test_background_fill_marks_a_lying_layer_bad(cache: ChunkCache, what: str) -> None:
    victim = make_blob(VICTIM_FILES, chunk_size=1000)
    reg = Registries()
    data, diff_id = victim.data, victim.diff_id
    if what == "blob bytes":
        data = tampered_outside_chunks(victim.data)
    else:
        diff_id = sha(b"a DiffID the blob does not have")
    reg.add(VICTIM, layer_desc(victim.digest, len(data), victim.toc), diff_id, data)
    mgr = LayerManager(reg, cache, filling(negative_ttl=0.5))
    layer = mgr.get(VICTIM, victim.digest)
    with structlog.testing.capture_logs() as events:
        mgr.use(VICTIM, victim.digest)  # starts the fill (as a first read would)
        wait_for(lambda: layer.bad is not None)
    assert layer.bad is not None and not layer.verified
    failed = [e for e in events if e["event"] == "layer_verification_failed"]
    assert len(failed) == 1 and failed[0]["refs"] == [VICTIM], failed
    assert ("blob digest" if what == "blob bytes" else "DiffID") in failed[0]["reason"]
    ino = layer.index.find("etc/motd")
    assert ino is not None
    motd = layer.index.chunks(ino)[0]
    assert motd.digest in cache  # the fill verified and cached it ...
    with pytest.raises(VerificationError):
        layer.read(ino, 0, 100)  # ... and it is refused all the same
    assert layer.read_nowait(ino, 0, 100) is None
    with pytest.raises(VerificationError):
        layer.read_blob(0, 100)
    with pytest.raises(VerificationError):
        mgr.get(VICTIM, victim.digest)
    assert mgr.loaded() == []
    time.sleep(0.6)  # negative_ttl: then resolved again, a new object
    again = mgr.get(VICTIM, victim.digest)
    assert again is not layer and again.bad is None
    mgr.close()


def test_verifier_inflates_in_bounded_steps_and_rejects_garbage() -> None:
    zeros = gzip.compress(b"\0" * (64 << 20), mtime=0)  # ~64 KB -> 64 MiB
    two = zeros + gzip.compress(b"tail", mtime=0)
    diff = sha(b"\0" * (64 << 20) + b"tail")
    v = BlobVerifier(sha(two), diff, len(two))
    for i in range(0, len(two), 7000):
        v.feed(i, two[i : i + 7000])
    verdict = v.finish()
    assert verdict.ok and verdict.uncompressed_size == (64 << 20) + 4
    for data, why in (
        (two + b"junk", "does not decode"),
        (two[:-3], "ends inside"),
    ):
        v = BlobVerifier(sha(data), diff, len(data))
        v.feed(0, data)
        verdict = v.finish()
        assert verdict.complete and not verdict.ok and why in " ".join(verdict.errors)
    gap = BlobVerifier(sha(two), diff, len(two))
    gap.feed(0, two[:100])
    gap.feed(200, two[200:])
    assert not gap.finish().complete


def test_verifier_checks_the_toc_member_and_footer() -> None:
    b = make_blob(VICTIM_FILES)
    member = b.data[b.toc_offset : len(b.data) - 51]
    good = TOCClaim(b.toc_offset, 51, sha(member))
    for claim, ok in ((good, True), (replace(good, member_digest=sha(b"x")), False)):
        v = BlobVerifier(b.digest, b.diff_id, len(b.data), claim)
        v.feed(0, b.data)
        assert v.finish().ok is ok
    v = BlobVerifier(b.digest, b.diff_id, len(b.data), replace(good, toc_offset=b.toc_offset - 1))
    v.feed(0, b.data)
    assert any("footer" in e for e in v.finish().errors)


# --- finding 6 (sweep): a layer the mount holds is never closed ------------------------------


def test_sweep_keeps_held_layers_and_use_builds_no_duplicate(cache: ChunkCache) -> None:
    victim = make_blob(VICTIM_FILES, chunk_size=1000)
    reg = Registries()
    reg.add(
        VICTIM, layer_desc(victim.digest, len(victim.data), victim.toc), victim.diff_id, victim.data
    )
    mgr = LayerManager(reg, cache, settings(idle_drop_seconds=0.0))
    layer = mgr.get(VICTIM, victim.digest)
    assert layer.hold()  # what the FUSE adapter does for every layer it has inodes of
    time.sleep(0.01)
    assert mgr.sweep() == 0
    assert mgr.get(VICTIM, victim.digest) is layer
    assert not layer.fetcher._closed.is_set()
    mgr.use(VICTIM, victim.digest)
    mgr.release(VICTIM, victim.digest)
    assert mgr.loaded() == [layer]
    layer.unhold()
    time.sleep(0.01)
    assert mgr.sweep() == 1
    assert layer.fetcher._closed.is_set()
    assert not layer.hold()  # retired: a holder must look it up again
    fresh = mgr.get(VICTIM, victim.digest)
    assert fresh is not layer and fresh.hold()
