"""After a restart, a reference resolved before is served from disk while the registry is
unreachable; other registry answers (not found, refused) are never papered over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from layerstore import digest
from layerstore.errors import NotFoundError, RegistryError, RegistryUnavailableError
from layerstore.registry.client import PullSource, ResolvedImage
from layerstore.registry.manifest import parse_image_config, parse_manifest
from layerstore.registry.reference import Reference, parse_reference
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.manager import LayerManager
from layerstore.runtime.resolutions import ResolutionStore
from layerstore.source import BytesSource
from tests.test_layer import tar_files
from tests.test_manager import Blob, desc, load, quiet

REF = "registry.example/app:v1"


class Client:
    """Answers with real ResolvedImage objects until told to fail."""

    def __init__(self, blob: Blob) -> None:
        self.blob = blob
        self.fail: Exception | None = None
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [blob.diff_id]},
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": digest.sha256_digest(config),
                    "size": len(config),
                },
                "layers": [desc(blob).to_dict()],
            }
        ).encode()
        self.config, self.manifest = config, manifest

    def resolve(self, ref: Reference, platform: Any = None) -> ResolvedImage:
        if self.fail is not None:
            raise self.fail
        m = parse_manifest(self.manifest, "application/vnd.oci.image.manifest.v1+json")
        return ResolvedImage(
            reference=ref,
            source=PullSource(ref.name),
            manifest_digest=digest.sha256_digest(self.manifest),
            manifest=m,  # type: ignore[arg-type]
            config=parse_image_config(self.config),
            raw_manifest=self.manifest,
            media_type="application/vnd.oci.image.manifest.v1+json",
            raw_config=self.config,
        )

    def blob_source(self, image: Any, d: str, size: int) -> BytesSource:
        assert isinstance(image, ResolvedImage) and d == self.blob.digest
        return BytesSource(self.blob.data)


@pytest.fixture
def blob(go_reference: Path) -> Blob:
    return load(go_reference, "ref-small")


def manager(client: Client, root: Path) -> LayerManager:
    """A manager as the daemon builds it after a (re)start: cache and resolutions on disk."""
    return LayerManager(
        client,
        ChunkCache(root / "cache", 1 << 30),
        quiet(),
        resolutions=ResolutionStore(root / "resolutions"),
    )


def test_restart_with_registry_unreachable_uses_the_stored_resolution(
    blob: Blob, tmp_path: Path, go_reference: Path
) -> None:
    client = Client(blob)
    first = manager(client, tmp_path)
    first.get(REF, blob.digest)
    first.close()

    client.fail = RegistryUnavailableError("registry.example: connection refused")
    again = manager(client, tmp_path)
    layer = again.get(REF, blob.toc_digest)
    assert layer.compressed_digest == blob.digest
    ino = layer.index.find("app/data.bin")
    assert ino is not None
    assert layer.read(ino, 0, 1 << 20) == tar_files(go_reference)["app/data.bin"]


@pytest.mark.parametrize(
    "error",
    [NotFoundError("manifest unknown", status=404), RegistryError("denied", status=403)],
)
def test_answers_from_the_registry_are_not_replaced_by_the_stored_one(
    blob: Blob, tmp_path: Path, error: RegistryError
) -> None:
    client = Client(blob)
    manager(client, tmp_path).get(REF, blob.digest)
    client.fail = error
    again = manager(client, tmp_path)
    with pytest.raises(type(error)):
        again.get(REF, blob.digest)


def test_a_tampered_stored_resolution_is_discarded(blob: Blob, tmp_path: Path) -> None:
    client = Client(blob)
    manager(client, tmp_path).get(REF, blob.digest)
    stored = list((tmp_path / "resolutions").iterdir())
    assert len(stored) == 1
    record = json.loads(stored[0].read_text())
    record["manifest"] = record["manifest"][:-8] + "AAAAAAA="
    stored[0].write_text(json.dumps(record))
    client.fail = RegistryUnavailableError("registry.example: connection refused")
    again = manager(client, tmp_path)
    with pytest.raises(RegistryUnavailableError):
        again.get(REF, blob.digest)
    assert not stored[0].exists()


def test_without_a_resolution_store_nothing_is_kept(blob: Blob, tmp_path: Path) -> None:
    client = Client(blob)
    LayerManager(client, ChunkCache(tmp_path / "cache", 1 << 30), quiet()).get(REF, blob.digest)
    client.fail = RegistryUnavailableError("registry.example: connection refused")
    again = manager(client, tmp_path)
    with pytest.raises(RegistryUnavailableError):
        again.get(REF, blob.digest)


def test_resolution_store_keeps_the_newest_records(blob: Blob, tmp_path: Path) -> None:
    image = Client(blob).resolve(parse_reference(REF))
    store = ResolutionStore(tmp_path / "r", max_entries=2)
    (tmp_path / "r" / ".tmp-x.partial").write_bytes(b"interrupted write")
    for tag in ("a", "b", "c"):
        store.save(f"registry.example/app:{tag}", image)
    reopened = ResolutionStore(tmp_path / "r", max_entries=2)
    names = [p.name for p in (tmp_path / "r").iterdir()]
    assert len(names) == 2 and not any(n.startswith(".tmp-") for n in names)
    found = {
        tag: reopened.load(f"registry.example/app:{tag}", parse_reference(REF)) is not None
        for tag in ("a", "b", "c")
    }
    assert found == {"a": False, "b": True, "c": True}
