"""Small real OCI images for the podman end-to-end tests, built without the network.

The layout writer itself lives in ``testbed`` (the demo needs it and the product must
not import ``tests/``); this module adds what only tests need: the standard test images, mixed
images (some layers eStargz, some plain gzip), converting with ``stargz-store convert``, pushing,
and checks on what a registry or an archive holds.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
from testbed import (
    MEDIA_OCI_LAYER_GZIP,
    BuiltLayer,
    Entry,
    ImageInfo,
    LoopbackRegistry,
    RegistryHTTP,
    busybox_rootfs,
    data_layer,
    directory,
    file,
    hardlink,
    image_config,
    layer_of,
    push_image,
    read_image,
    sha256_digest,
    skopeo_push,
    symlink,
    write_image,
)

__all__ = [
    "BuiltLayer",
    "Entry",
    "ImageInfo",
    "LoopbackRegistry",
    "RegistryHTTP",
    "archive_layer_diff_ids",
    "build_test_image",
    "convert",
    "convert_image",
    "decompressed_digest",
    "directory",
    "file",
    "hardlink",
    "mix_layers",
    "push_image",
    "read_image",
    "registry_diff_ids",
    "sha256_digest",
    "skopeo_push",
    "symlink",
    "write_image",
]

#: What ``/data/check.sh`` prints when every data file has the right content.
CHECK_OK = "data-ok"


def build_test_image(
    layout: Path,
    tag: str = "gzip",
    *,
    data_size: int = 512 * 1024,
    data_files: int = 3,
    seed: int = 1,
    extra_layers: Sequence[Sequence[Entry]] = (),
) -> ImageInfo:
    """Layer 0: busybox-static rootfs. Layer 1: ``/data`` with ``data_files`` incompressible
    files of ``data_size`` bytes, ``SHA256SUMS`` and ``check.sh`` (prints ``data-ok`` when
    ``sha256sum -c`` passes). Then ``extra_layers``. Default command: ``/data/check.sh``.
    ``seed`` changes the data (and so every digest but the busybox layer's)."""
    layers = [
        BuiltLayer.from_entries(busybox_rootfs()),
        BuiltLayer.from_entries(data_layer("data", size=data_size, seed=seed, files=data_files)),
        *(BuiltLayer.from_entries(entries) for entries in extra_layers),
    ]
    cfg = image_config([layer.diff_id for layer in layers], cmd=["/data/check.sh"])
    return write_image(layout, tag, layers, cfg)


def convert(src: str, dst: str, *extra: str, timeout: float = 600) -> None:
    """``stargz-store convert [extra] SRC DST`` as a child process (``python -m stargz_store``);
    raises with its stderr when it fails."""
    cmd = [sys.executable, "-m", "stargz_store", "convert", *extra, src, dst]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr}"


def convert_image(image: ImageInfo, tag: str, *extra: str) -> ImageInfo:
    """Convert ``image`` to eStargz into the same layout under ``tag``; checks that every layer
    of the result carries a TOC digest annotation and that the config has one diff_id per
    layer."""
    convert(f"oci:{image.layout}:{image.tag}", f"oci:{image.layout}:{tag}", *extra)
    out = read_image(image.layout, tag)
    assert len(out.layers) == len(image.layers)
    assert len(out.diff_ids) == len(out.layers)
    for i in range(len(out.layers)):
        assert out.is_estargz(i), f"layer {i} of {tag} has no {TOC_DIGEST_ANNOTATION}"
        assert out.layers[i]["digest"] != image.layers[i]["digest"]
    return out


def mix_layers(
    estargz: ImageInfo, plain: ImageInfo, plain_indexes: Sequence[int], tag: str
) -> ImageInfo:
    """An image whose layers come from ``estargz`` except those in ``plain_indexes``, which are
    swapped back to ``plain``'s gzip layers (blob, media type, no annotations, and the config's
    ``rootfs.diff_ids`` entry). Written to ``estargz``'s layout under ``tag``."""
    assert len(estargz.layers) == len(plain.layers)
    layers: list[BuiltLayer] = []
    for i in range(len(estargz.layers)):
        src = plain if i in plain_indexes else estargz
        layer = layer_of(src, i)
        if src is plain:
            layer.media_type = MEDIA_OCI_LAYER_GZIP
            layer.annotations = {}
        layers.append(layer)
    cfg = json.loads(json.dumps(estargz.config))
    cfg["rootfs"]["diff_ids"] = [layer.diff_id for layer in layers]
    out = write_image(estargz.layout, tag, layers, cfg)
    for i in range(len(layers)):
        assert out.is_estargz(i) == (i not in plain_indexes)
    return out


def decompressed_digest(blob: bytes) -> str:
    """sha256 of a layer blob's uncompressed tar (the blob itself when it is not gzip)."""
    if blob[:2] == b"\x1f\x8b":
        d = zlib.decompressobj(wbits=31)
        h = hashlib.sha256()
        data = blob
        while data:
            h.update(d.decompress(data))
            data = d.unused_data
            if data:  # concatenated gzip members (eStargz is a sequence of them)
                h.update(d.flush())
                d = zlib.decompressobj(wbits=31)
        h.update(d.flush())
        return "sha256:" + h.hexdigest()
    return sha256_digest(blob)


def registry_diff_ids(client: RegistryHTTP, repo: str, ref: str) -> dict[str, Any]:
    """Manifest digest, layer digests, config diff_ids and the diff_ids recomputed from the
    layer blobs of ``repo:ref``."""
    raw, digest = client.manifest(repo, ref)
    manifest = json.loads(raw)
    config = json.loads(client.blob(repo, manifest["config"]["digest"]))
    blobs = [client.blob(repo, layer["digest"]) for layer in manifest["layers"]]
    return {
        "manifest_digest": digest,
        "manifest": manifest,
        "layer_digests": [layer["digest"] for layer in manifest["layers"]],
        "config_diff_ids": config["rootfs"]["diff_ids"],
        "blob_diff_ids": [decompressed_digest(b) for b in blobs],
    }


def archive_layer_diff_ids(archive: Path) -> tuple[list[str], list[str]]:
    """From a ``podman save`` archive (docker-archive or oci-archive): the config's diff_ids and
    the diff_ids recomputed from the layer files it holds, in manifest order."""
    with tarfile.open(archive) as tar:
        names = tar.getnames()

        def read(name: str) -> bytes:
            member = tar.extractfile(name.lstrip("./") if name not in names else name)
            assert member is not None, name
            return member.read()

        if "manifest.json" in names:  # docker-archive
            entry = json.loads(read("manifest.json"))[0]
            config = json.loads(read(entry["Config"]))
            layers = [read(name) for name in entry["Layers"]]
        else:  # oci-archive
            index = json.loads(read("index.json"))
            mdigest = index["manifests"][0]["digest"].replace(":", "/")
            manifest = json.loads(read(f"blobs/{mdigest}"))
            config = json.loads(read("blobs/" + manifest["config"]["digest"].replace(":", "/")))
            layers = [read("blobs/" + x["digest"].replace(":", "/")) for x in manifest["layers"]]
    return list(config["rootfs"]["diff_ids"]), [decompressed_digest(b) for b in layers]
