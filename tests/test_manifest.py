from __future__ import annotations

import json
from typing import Any

import pytest

from layerstore.errors import ManifestError
from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
from layerstore.registry import manifest as m

D1 = "sha256:" + "11" * 32
D2 = "sha256:" + "22" * 32
D3 = "sha256:" + "33" * 32


def _manifest(media_type: str | None = m.OCI_MANIFEST, **extra: Any) -> bytes:
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": m.OCI_CONFIG, "digest": D1, "size": 10},
        "layers": [
            {
                "mediaType": m.OCI_LAYER_GZIP,
                "digest": D2,
                "size": 123,
                "annotations": {TOC_DIGEST_ANNOTATION: D3},
            }
        ],
    }
    if media_type:
        obj["mediaType"] = media_type
    obj.update(extra)
    return json.dumps(obj).encode()


def _index(entries: list[tuple[str, str, str, str]]) -> bytes:
    manifests = []
    for digest, os_, arch, variant in entries:
        plat = {"os": os_, "architecture": arch}
        if variant:
            plat["variant"] = variant
        manifests.append(
            {"mediaType": m.OCI_MANIFEST, "digest": digest, "size": 100, "platform": plat}
        )
    return json.dumps(
        {"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": manifests}
    ).encode()


def test_parse_oci_manifest() -> None:
    parsed = m.parse_manifest(_manifest())
    assert isinstance(parsed, m.ImageManifest)
    assert parsed.config.digest == D1
    (layer,) = parsed.layers
    assert (layer.digest, layer.size, layer.media_type) == (D2, 123, m.OCI_LAYER_GZIP)
    assert layer.annotations[TOC_DIGEST_ANNOTATION] == D3
    assert m.layer_compression(layer.media_type) == "gzip"
    assert layer.to_dict()["annotations"] == {TOC_DIGEST_ANNOTATION: D3}


def test_media_type_from_header_and_shape() -> None:
    body = _manifest(media_type=None)
    assert m.parse_manifest(body, m.DOCKER_MANIFEST).media_type == m.DOCKER_MANIFEST
    assert m.parse_manifest(body).media_type == m.OCI_MANIFEST
    with pytest.raises(ManifestError, match="contradicts"):
        m.parse_manifest(_manifest(), m.DOCKER_MANIFEST + "; charset=utf-8")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"schemaVersion": 1}).encode(),
        _manifest(media_type="application/x-unknown"),
        _manifest(layers=[{"mediaType": m.OCI_LAYER_GZIP, "digest": "sha256:zz", "size": 1}]),
        _manifest(layers=[{"mediaType": m.OCI_LAYER_GZIP, "digest": D2, "size": -1}]),
        _manifest(layers=[{"mediaType": m.OCI_LAYER_GZIP, "digest": D2, "size": True}]),
        _manifest(layers="nope"),
        _manifest(annotations={"a": 1}),
    ],
)
def test_bad_manifests(body: bytes) -> None:
    with pytest.raises(ManifestError):
        m.parse_manifest(body)


def test_size_cap() -> None:
    big = _manifest(annotations={"pad": "x" * (m.MAX_MANIFEST_SIZE + 1)})
    with pytest.raises(ManifestError, match="limit"):
        m.parse_manifest(big)
    with pytest.raises(ManifestError, match="limit"):
        m.parse_manifest(_manifest(), limit=50)


def test_config() -> None:
    body = json.dumps(
        {"architecture": "arm64", "os": "linux", "variant": "v8", "rootfs": {"diff_ids": [D1]}}
    ).encode()
    cfg = m.parse_image_config(body)
    assert cfg.diff_ids == (D1,)
    assert (cfg.os, cfg.architecture, cfg.variant) == ("linux", "arm64", "v8")
    with pytest.raises(ManifestError):
        m.parse_image_config(json.dumps({"rootfs": {"diff_ids": ["bad"]}}).encode())
    with pytest.raises(ManifestError):
        m.parse_image_config(b"{}")


def test_platform_parsing_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    assert m.parse_platform("linux/arm64/v8") == m.Platform("linux", "arm64", "v8")
    assert m.parse_platform("linux/amd64") == m.Platform("linux", "amd64", "")
    assert m.parse_platform("linux/x86_64") == m.Platform("linux", "amd64", "")
    assert m.parse_platform("linux/aarch64") == m.Platform("linux", "arm64", "v8")
    with pytest.raises(ManifestError):
        m.parse_platform("linux")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert m.host_platform() == m.Platform("linux", "amd64", "")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert m.host_platform() == m.Platform("linux", "arm64", "v8")
    monkeypatch.setattr("platform.machine", lambda: "armv7l")
    assert str(m.host_platform()) == "linux/arm/v7"


def test_index_selection() -> None:
    a, b, c, d, e = ("sha256:" + ch * 64 for ch in "abcde")
    index = m.parse_manifest(
        _index(
            [
                (a, "linux", "amd64", ""),
                (b, "linux", "arm64", "v8"),
                (c, "linux", "arm", "v6"),
                (d, "linux", "arm", "v7"),
                (e, "unknown", "unknown", ""),
            ]
        )
    )
    assert isinstance(index, m.ImageIndex)
    assert index.select("linux/amd64").digest == a
    assert index.select("linux/arm64").digest == b
    assert index.select("linux/arm64/v8").digest == b
    assert index.select("linux/arm/v7").digest == d
    assert index.select("linux/arm/v6").digest == c
    with pytest.raises(ManifestError, match="linux/s390x"):
        index.select("linux/s390x")
    with pytest.raises(ManifestError):
        index.select("windows/amd64")


def test_arm64_without_variant_in_index() -> None:
    a = "sha256:" + "a" * 64
    index = m.parse_manifest(_index([(a, "linux", "arm64", "")]))
    assert isinstance(index, m.ImageIndex)
    assert m.select_manifest(index, m.Platform("linux", "arm64", "v8")).digest == a


def test_layer_compression_unknown() -> None:
    assert m.layer_compression(m.OCI_LAYER_ZSTD) == "zstd"
    assert m.layer_compression(m.DOCKER_LAYER_GZIP) == "gzip"
    assert m.layer_compression(m.OCI_LAYER_TAR) == "none"
    with pytest.raises(ManifestError):
        m.layer_compression("application/x-foo")
