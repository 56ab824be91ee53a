"""A real :class:`~layerstore.registry.client.ResolvedImage` without a registry.

Tests and benchmarks that drive a :class:`~layerstore.runtime.manager.LayerManager` with a
registry-less client answer ``resolve`` with this: the manifest and the config JSON are written
here and read back by the product's own parsers, so the object is exactly what the registry
client returns (digests included), and the manager needs no code path for stand-ins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from layerstore import digest
from layerstore.registry.client import PullSource, ResolvedImage
from layerstore.registry.manifest import (
    Descriptor,
    ImageManifest,
    parse_image_config,
    parse_manifest,
)
from layerstore.registry.reference import Reference, parse_reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def resolved_image(
    ref: str | Reference,
    layers: Sequence[Descriptor],
    diff_ids: Sequence[str],
    run_config: Mapping[str, Any] | None = None,
) -> ResolvedImage:
    """*ref* with the layer descriptors *layers* and the config's ``rootfs.diff_ids``;
    *run_config* is the config's ``config`` object (``Entrypoint``, ``Cmd``, ``Env``,
    ``WorkingDir``)."""
    reference = ref if isinstance(ref, Reference) else parse_reference(ref)
    config_obj: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    if run_config is not None:
        config_obj["config"] = dict(run_config)
    raw_config = json.dumps(config_obj).encode()
    raw_manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": digest.sha256_digest(raw_config),
                "size": len(raw_config),
            },
            "layers": [d.to_dict() for d in layers],
        }
    ).encode()
    manifest = parse_manifest(raw_manifest, OCI_MANIFEST)
    assert isinstance(manifest, ImageManifest)
    return ResolvedImage(
        reference=reference,
        source=PullSource(reference.name),
        manifest_digest=digest.sha256_digest(raw_manifest),
        manifest=manifest,
        config=parse_image_config(raw_config),
        raw_manifest=raw_manifest,
        media_type=OCI_MANIFEST,
        raw_config=raw_config,
    )
