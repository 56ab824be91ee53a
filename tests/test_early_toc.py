"""Early TOCs: the manager loads an image's TOCs while the registry client fetches its config.

A real :class:`RegistryClient` against :class:`FakeRegistry` whose config blob answers after a
stall: the layer's tail request must reach the registry during the stall (before, the client
asked for the TOC only after the config had arrived, one round trip later), and the layer built
from it serves its files. A wrong TOC annotation still fails the lookup, and a layer whose
early load failed is loaded again by its own build.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore.errors import LayerStoreError
from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
from layerstore.estargz.writer import write_estargz
from layerstore.registry.client import RegistryClient
from layerstore.registry.settings import RegistrySettings
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.layer import LayerSettings
from layerstore.runtime.manager import LayerManager, ManagerSettings
from layerstore.runtime.prefetch import ProfileSource
from tests.faultserver import FakeRegistry, FaultServer, Reply, Request, range_reply, sha256

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
STALL = 0.6


def layer_blob(files: dict[str, bytes]) -> tuple[bytes, str, str]:
    """(eStargz blob, TOC digest, DiffID) of a tar of *files*."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(raw.getvalue()), out)
    return out.getvalue(), res.toc_digest, res.diff_id


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer("127.0.0.1") as srv:
        yield srv


def setup(
    fault: FaultServer, *, toc_override: str | None = None
) -> tuple[FakeRegistry, str, list[tuple[bytes, str]], dict[str, float]]:
    """Two eStargz layers; the config blob stalls STALL seconds. Returns the registry, the
    reference, [(blob, toc digest)] and the arrival time of each blob GET (by digest, first)."""
    layers = [
        layer_blob({"etc/motd": b"hello from the base\n", "bin/tool": b"\x7fELF" + b"x" * 5000}),
        layer_blob({"app/main.py": b"print('top')\n" * 100}),
    ]
    reg = FakeRegistry(fault)
    arrived: dict[str, float] = {}
    config_digest: list[str] = []

    def blob_reply(req: Request, data: bytes) -> Reply:
        d = req.path.rsplit("/", 1)[1]
        arrived.setdefault(d, time.monotonic())
        if config_digest and d == config_digest[0]:
            return Reply(200, [("Content-Type", "application/json")], data, stall=STALL)
        return range_reply(data, req.header("Range"))

    reg.blob_reply = blob_reply
    annotations = [{TOC_DIGEST_ANNOTATION: toc_override or toc} for _, toc, _ in layers]
    _, manifest = reg.add_image(
        "v1",
        [b for b, _, _ in layers],
        layer_media_type=GZIP,
        layer_annotations=annotations,
        diff_ids=[diff for _, _, diff in layers],
    )
    config_digest.append(json.loads(manifest)["config"]["digest"])
    return reg, f"{fault.netloc}/app:v1", [(b, toc) for b, toc, _ in layers], arrived


def make_manager(
    fault: FaultServer, root: Path, profiles: ProfileSource | None = None, **kw: object
) -> LayerManager:
    client = RegistryClient(
        None,
        settings=RegistrySettings(
            insecure_registries=frozenset({fault.netloc}), read_timeout=5.0, retries=0
        ),
    )
    settings = ManagerSettings(layer=LayerSettings(landmark_prefetch=False), **kw)  # type: ignore[arg-type]
    return LayerManager(
        client, ChunkCache(str(root / "cache"), 1 << 30), settings, profiles=profiles
    )


def test_the_toc_is_fetched_while_the_config_is(fault: FaultServer, tmp_path: Path) -> None:
    _, ref, layers, arrived = setup(fault)
    m = make_manager(fault, tmp_path)
    try:
        t0 = time.monotonic()
        layer = m.get(ref, sha256(layers[1][0]))
        assert layer.toc_digest == layers[1][1]
        config_at = min(arrived.values())
        # every layer's tail request (the asked one and its sibling) came during the stall
        for blob, _ in layers:
            assert arrived[sha256(blob)] < config_at + STALL - 0.1, "TOC waited for the config"
        assert time.monotonic() - t0 < 2 * STALL
        ino = layer.index.lookup(1, "app")
        assert ino is not None
        main = layer.index.lookup(ino, "main.py")
        assert main is not None
        assert layer.read(main, 0, 13) == b"print('top')\n"
        # the sibling was built from its early TOC too, and reads
        base = m.get(ref, layers[0][1])
        etc = base.index.lookup(1, "etc")
        assert etc is not None
        motd = base.index.lookup(etc, "motd")
        assert motd is not None
        assert base.read(motd, 0, 100) == b"hello from the base\n"
    finally:
        m.close()


def test_the_attached_profile_is_looked_for_while_the_config_is(
    fault: FaultServer, tmp_path: Path
) -> None:
    """The profile lookup needs only the manifest's digest: it is asked for during the config's
    stall, once, for the digest the image then resolves to (before, on the first use of a
    layer, after the config and the TOC)."""
    _, ref, layers, arrived = setup(fault)
    asked: list[tuple[str, float]] = []

    class Source:
        def find(self, reference: object, manifest_digest: str) -> bytes | None:
            asked.append((manifest_digest, time.monotonic()))
            return None

    m = make_manager(fault, tmp_path, profiles=Source())
    try:
        m.get(ref, sha256(layers[1][0]))
        config_at = min(arrived.values())
        image = m.resolution(ref)
        assert image is not None
        assert [d for d, _ in asked] == [image.manifest_digest]
        assert asked[0][1] < config_at + STALL - 0.1, "the lookup waited for the config"
    finally:
        m.close()


def test_without_early_tocs_the_toc_waits_for_the_config(
    fault: FaultServer, tmp_path: Path
) -> None:
    """The control: the same setup with ``early_toc`` off asks for the TOC after the config."""
    _, ref, layers, arrived = setup(fault)
    m = make_manager(fault, tmp_path, early_toc=False, resolve_siblings=False)
    try:
        m.get(ref, sha256(layers[1][0]))
        config_at = min(arrived.values())
        assert arrived[sha256(layers[1][0])] >= config_at + STALL - 0.05
        assert sha256(layers[0][0]) not in arrived
    finally:
        m.close()


def test_a_wrong_toc_annotation_still_fails_the_lookup(fault: FaultServer, tmp_path: Path) -> None:
    wrong = "sha256:" + "ab" * 32
    _, ref, layers, _ = setup(fault, toc_override=wrong)
    m = make_manager(fault, tmp_path)
    try:
        for blob, _ in layers:
            with pytest.raises(LayerStoreError):
                m.get(ref, sha256(blob))
        assert not m.loaded()
    finally:
        m.close()


def test_an_early_load_that_failed_is_done_again_by_the_build(
    fault: FaultServer, tmp_path: Path
) -> None:
    reg, ref, layers, _ = setup(fault)
    inner = reg.blob_reply
    assert inner is not None
    failed: list[str] = []

    def flaky(req: Request, data: bytes) -> Reply:
        d = req.path.rsplit("/", 1)[1]
        if d == sha256(layers[1][0]) and not failed:
            failed.append(d)  # the first (early) tail request fails
            return Reply(404)
        return inner(req, data)

    reg.blob_reply = flaky
    m = make_manager(fault, tmp_path)
    try:
        layer = m.get(ref, sha256(layers[1][0]))
        assert failed
        assert layer.toc_digest == layers[1][1]
    finally:
        m.close()
