"""Image conversion: OCI layouts built by hand (and a real registry), via the CLI entry point."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from layerstore.estargz.reader import EStargzReader
from layerstore.image.convert import ConvertOptions, OCIDestination, OCISource, convert_image
from layerstore.image.ocilayout import REF_NAME_ANNOTATION, OCILayout, parse_oci_reference
from layerstore.source import FileSource
from stargz_store.convert_cmd import main
from tests.registry_fixtures import (  # noqa: F401 - fixtures
    RegistryHandle,
    registry,
    registry_htpasswd,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
PREFETCH_SIZE = "io.stargz-store.prefetch-size"
SIZE_ANN = "io.containers.estargz.uncompressed-size"
REPO = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1600000000
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


LAYER1 = {"bin/hello": b"#!/bin/sh\necho hello\n", "etc/os-release": b"ID=test\n"}
LAYER2 = {"app/data.bin": bytes(range(256)) * 100, "app/main.py": b"print(1)\n"}


class Layout:
    """Writes an OCI layout by hand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index: dict[str, Any] = {"schemaVersion": 2, "manifests": []}
        self.save()

    def blob(self, data: bytes) -> str:
        d = sha(data)
        (self.root / "blobs" / "sha256" / d[7:]).write_bytes(data)
        return d

    def save(self) -> None:
        (self.root / "index.json").write_text(json.dumps(self.index))

    def image(
        self,
        layers: list[tuple[bytes, str]],
        *,
        docker: bool = False,
        arch: str = "amd64",
        layer_annotations: list[dict[str, str]] | None = None,
    ) -> tuple[str, bytes]:
        diff_ids = [sha(gzip.decompress(b)) if b[:2] == b"\x1f\x8b" else sha(b) for b, _ in layers]
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {"Env": ["PATH=/bin"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created_by": "test"}],
                "x-unknown-config-field": {"kept": True},
            }
        ).encode()
        descs = []
        for i, (b, mt) in enumerate(layers):
            d: dict[str, Any] = {"mediaType": mt, "digest": self.blob(b), "size": len(b)}
            if layer_annotations and layer_annotations[i]:
                d["annotations"] = layer_annotations[i]
            descs.append(d)
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                "digest": self.blob(config),
                "size": len(config),
            },
            "layers": descs,
            "annotations": {"org.example.kept": "yes"},
        }
        body = json.dumps(manifest, indent=2).encode()
        return self.blob(body), body

    def tag(self, tag: str, digest: str, body: bytes, mt: str, **extra: Any) -> None:
        d = {"mediaType": mt, "digest": digest, "size": len(body), **extra}
        d["annotations"] = {REF_NAME_ANNOTATION: tag}
        self.index["manifests"].append(d)
        self.save()


def std_image(root: Path, docker: bool = False) -> Layout:
    lay = Layout(root)
    layers = [
        (gzip.compress(tar_of(LAYER1), mtime=0), DOCKER_GZIP if docker else OCI_GZIP),
        (tar_of(LAYER2), OCI_TAR),
    ]
    digest, body = lay.image(layers, docker=docker)
    lay.tag("v1", digest, body, DOCKER_MANIFEST if docker else OCI_MANIFEST)
    return lay


def load(layout: Path, digest: str) -> Any:
    return json.loads((layout / "blobs" / "sha256" / digest[7:]).read_bytes())


def resolve(layout: Path, tag: str) -> dict[str, Any]:
    idx = json.loads((layout / "index.json").read_text())
    found = [
        m for m in idx["manifests"] if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag
    ]
    assert len(found) == 1
    return dict(found[0])


def check_image(dst: Path, manifest: dict[str, Any], layer_files: list[dict[str, bytes]]) -> None:
    """Every layer is eStargz with right annotations, DiffIDs and readable files."""
    blobs = dst / "blobs" / "sha256"
    config_raw = (blobs / manifest["config"]["digest"][7:]).read_bytes()
    assert sha(config_raw) == manifest["config"]["digest"]
    assert len(config_raw) == manifest["config"]["size"]
    config = json.loads(config_raw)
    assert config["x-unknown-config-field"] == {"kept": True}
    assert config["history"] == [{"created_by": "test"}]
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    for i, (layer, files) in enumerate(zip(manifest["layers"], layer_files)):
        path = blobs / layer["digest"][7:]
        blob = path.read_bytes()
        assert sha(blob) == layer["digest"] and len(blob) == layer["size"]
        plain = gzip.decompress(blob)
        assert config["rootfs"]["diff_ids"][i] == sha(plain)
        assert layer["annotations"][SIZE_ANN] == str(len(plain))
        with FileSource(path) as src:
            r = EStargzReader.open(src, expected_toc_digest=layer["annotations"][TOC_ANN])
            for name, data in files.items():
                assert r.read_file(name) == data


def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_convert_oci_single_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    std_image(tmp_path / "src")
    rc, err = run(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:v1-esgz", capsys=capsys)
    assert rc == 0, err
    assert "layer 1/2" in err and "layer 2/2" in err and "2 of 2 layers converted" in err
    desc = resolve(tmp_path / "dst", "v1-esgz")
    assert desc["mediaType"] == OCI_MANIFEST
    manifest = load(tmp_path / "dst", desc["digest"])
    assert manifest["annotations"] == {"org.example.kept": "yes"}
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_GZIP, OCI_GZIP]
    check_image(tmp_path / "dst", manifest, [LAYER1, LAYER2])
    # deterministic: converting again gives the same manifest digest
    rc, err = run(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst2'}", capsys=capsys)
    assert rc == 0, err
    assert (
        json.loads((tmp_path / "dst2" / "index.json").read_text())["manifests"][0]["digest"]
        == desc["digest"]
    )


def test_convert_docker_flavour_and_in_place(tmp_path: Path) -> None:
    std_image(tmp_path / "img", docker=True)
    layout = OCILayout.open(tmp_path / "img")
    res = convert_image(OCISource(layout, "v1"), OCIDestination(layout, "esgz"))
    assert res.media_type == DOCKER_MANIFEST
    desc = resolve(tmp_path / "img", "esgz")
    manifest = load(tmp_path / "img", desc["digest"])
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [DOCKER_GZIP, DOCKER_GZIP]
    check_image(tmp_path / "img", manifest, [LAYER1, LAYER2])
    assert resolve(tmp_path / "img", "v1")  # the source tag is still there


def test_already_estargz_layers_are_kept_and_reconvert_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    std_image(tmp_path / "src")
    assert run(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'a'}:t", capsys=capsys)[0] == 0
    rc, err = run(f"oci:{tmp_path / 'a'}:t", f"oci:{tmp_path / 'b'}:t", capsys=capsys)
    assert rc == 0, err
    assert "kept as is" in err and "0 of 2 layers converted" in err
    # copied into the new layout as they are: never said to be converting
    assert ": copying " in err and "converting" not in err
    rc, err = run(
        "--reconvert", f"oci:{tmp_path / 'a'}:t", f"oci:{tmp_path / 'c'}:t", capsys=capsys
    )
    assert rc == 0, err
    a, b, c = (resolve(tmp_path / x, "t")["digest"] for x in "abc")
    assert a == b == c  # re-converting our own output reproduces it byte for byte


def test_layer_priorities_reorder_one_layer_even_when_it_is_estargz(tmp_path: Path) -> None:
    """``ConvertOptions.layer_priorities`` (what ``optimize`` uses): per source layer, the
    files to put first; that layer is rewritten even though it is eStargz already, the others
    are copied as they are."""
    from layerstore.estargz.constants import PREFETCH_LANDMARK

    std_image(tmp_path / "src")
    src = OCILayout.open(tmp_path / "src")
    mid = OCILayout.create(tmp_path / "mid")
    convert_image(OCISource(src, "v1"), OCIDestination(mid, "t"))
    before = load(tmp_path / "mid", resolve(tmp_path / "mid", "t")["digest"])
    second = before["layers"][1]["digest"]
    res = convert_image(
        OCISource(mid, "t"),
        OCIDestination(OCILayout.create(tmp_path / "out"), "t"),
        ConvertOptions(layer_priorities={second: ["app/main.py", "nope"]}),
    )
    assert [(r.action, r.prioritized, r.missed_prioritized) for r in res.layers] == [
        ("kept", 0, ()),
        ("converted", 2, ("nope",)),
    ]
    after = load(tmp_path / "out", resolve(tmp_path / "out", "t")["digest"])
    assert after["layers"][0] == before["layers"][0]
    assert after["layers"][1]["digest"] != second
    check_image(tmp_path / "out", after, [LAYER1, LAYER2])
    blob = (tmp_path / "out" / "blobs" / "sha256" / after["layers"][1]["digest"][7:]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        names = [m.name for m in tf]
    assert names[:3] == ["app/main.py", PREFETCH_LANDMARK, "app/data.bin"]
    # the prioritized region's size is announced on the rewritten layer only
    with FileSource(tmp_path / "out" / "blobs" / "sha256" / after["layers"][1]["digest"][7:]) as f:
        landmark = EStargzReader.open(f).index.prefetch_landmark_offset
    assert landmark and after["layers"][1]["annotations"][PREFETCH_SIZE] == str(landmark)
    assert PREFETCH_SIZE not in after["layers"][0].get("annotations", {})


def test_index_all_platforms_and_one_platform(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lay = Layout(tmp_path / "src")
    shared = gzip.compress(tar_of(LAYER1), mtime=0)
    m1 = lay.image([(shared, OCI_GZIP)], arch="amd64")
    m2 = lay.image([(shared, OCI_GZIP), (tar_of(LAYER2), OCI_TAR)], arch="arm64")
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": m1[0],
                "size": len(m1[1]),
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": m2[0],
                "size": len(m2[1]),
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
        ],
        "annotations": {"x": "y"},
    }
    att = {
        "mediaType": OCI_MANIFEST,
        "digest": m1[0],
        "size": len(m1[1]),
        "platform": {"os": "unknown", "architecture": "unknown"},
    }
    index["manifests"].append(att)  # type: ignore[attr-defined]
    body = json.dumps(index).encode()
    lay.tag("multi", lay.blob(body), body, OCI_INDEX)
    rc, err = run(f"oci:{tmp_path / 'src'}:multi", f"oci:{tmp_path / 'dst'}:multi", capsys=capsys)
    assert rc == 0, err
    assert "shared with an earlier manifest" in err
    assert "left out of the new index (not an image)" in err
    desc = resolve(tmp_path / "dst", "multi")
    assert desc["mediaType"] == OCI_INDEX
    new_index = load(tmp_path / "dst", desc["digest"])
    assert new_index["annotations"] == {"x": "y"}
    assert [m["platform"]["architecture"] for m in new_index["manifests"]] == ["amd64", "arm64"]
    for m, files in zip(new_index["manifests"], [[LAYER1], [LAYER1, LAYER2]]):
        raw = (tmp_path / "dst" / "blobs" / "sha256" / m["digest"][7:]).read_bytes()
        assert sha(raw) == m["digest"] and len(raw) == m["size"]
        check_image(tmp_path / "dst", json.loads(raw), files)
    rc, err = run(
        "--platform",
        "linux/arm64",
        f"oci:{tmp_path / 'src'}:multi",
        f"oci:{tmp_path / 'one'}",
        capsys=capsys,
    )
    assert rc == 0, err
    one = json.loads((tmp_path / "one" / "index.json").read_text())["manifests"][0]
    sub = load(tmp_path / "one", one["digest"])
    assert [m["platform"]["architecture"] for m in sub["manifests"]] == ["arm64"]
    rc, err = run(
        "--platform",
        "linux/s390x",
        f"oci:{tmp_path / 'src'}:multi",
        f"oci:{tmp_path / 'none'}",
        capsys=capsys,
    )
    assert rc == 1 and "no manifest for platform linux/s390x" in err


def test_prioritized_files_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    std_image(tmp_path / "src")
    plist = tmp_path / "prio.txt"
    plist.write_text("# start-up files\napp/main.py\n")
    rc, err = run(
        "--prioritized-files",
        str(plist),
        "--chunk-size",
        "4KiB",
        f"oci:{tmp_path / 'src'}:v1",
        f"oci:{tmp_path / 'dst'}:v1",
        capsys=capsys,
    )
    assert rc == 0, err
    manifest = load(tmp_path / "dst", resolve(tmp_path / "dst", "v1")["digest"])
    layer = manifest["layers"][1]
    with FileSource(tmp_path / "dst" / "blobs" / "sha256" / layer["digest"][7:]) as src:
        r = EStargzReader.open(src)
        assert r.index.prefetch_landmark_offset is not None
        assert layer["annotations"][PREFETCH_SIZE] == str(r.index.prefetch_landmark_offset)
    assert PREFETCH_SIZE not in manifest["layers"][0]["annotations"]  # nothing prioritized
    with FileSource(tmp_path / "dst" / "blobs" / "sha256" / layer["digest"][7:]) as src:
        r = EStargzReader.open(src)
        names = [e.name for e in r.index.entries()]
        assert names[:2] == ["app/main.py", ".prefetch.landmark"]  # no dir entries in LAYER2
        assert (
            sum(1 for e in r.index.entries() if e.type == "chunk") == 25 * 256 * 100 // 4096 // 25
        )
    check_image(tmp_path / "dst", manifest, [LAYER1, LAYER2])


def test_errors_are_messages_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lay = std_image(tmp_path / "src")
    src = f"oci:{tmp_path / 'src'}"
    dst = f"oci:{tmp_path / 'dst'}"
    cases = [
        ((f"oci:{tmp_path / 'missing'}", dst), 1, "no such directory"),
        ((f"{src}:nope", dst), 1, "no image tagged 'nope' (tags: v1)"),
        ((f"tarball:{tmp_path}", dst), 2, "unknown or missing transport"),
        ((src + ":v1", "dir:/tmp/x"), 2, "unknown or missing transport"),
        (("--chunk-size", "-5", src, dst), 2, "size must be positive"),
        (("--chunk-size", "4X", src, dst), 2, "invalid size"),
        (("--prioritized-files", str(tmp_path / "nofile"), src, dst), 2, "No such file"),
        (("--platform", "bad", src, dst), 1, "invalid platform"),
        ((src,), 2, "usage"),
        (("--min-chunk-size", "-1", src, dst), 2, "must not be negative"),
    ]
    for argv, code, msg in cases:
        rc, err = run(*argv, capsys=capsys)
        assert rc == code, (argv, err)
        assert msg in err, (argv, err)
        assert "Traceback" not in err
    # a corrupt layer blob: detected while converting, nothing left behind
    manifest = load(tmp_path / "src", resolve(tmp_path / "src", "v1")["digest"])
    victim = tmp_path / "src" / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    data = bytearray(victim.read_bytes())
    data[600] ^= 1
    victim.write_bytes(bytes(data))
    rc, err = run(f"{src}:v1", f"{dst}:v1", capsys=capsys)
    assert rc == 1 and "corrupt" in err, err
    assert not [
        p for p in (tmp_path / "dst" / "blobs" / "sha256").iterdir() if p.name.startswith(".")
    ]
    # a zstd layer cannot be converted
    zdigest, zbody = lay.image([(b"(\xb5/\xfd not really zstd", OCI_ZSTD)])
    lay.tag("zstd", zdigest, zbody, OCI_MANIFEST)
    rc, err = run(f"{src}:zstd", f"{dst}:z", capsys=capsys)
    assert rc == 1 and "cannot be converted" in err
    # a layer that is not a tar
    gdigest, gbody = lay.image([(gzip.compress(b"hello" * 1000), OCI_GZIP)])
    lay.tag("notar", gdigest, gbody, OCI_MANIFEST)
    rc, err = run(f"{src}:notar", f"{dst}:n", capsys=capsys)
    assert rc == 1 and "tar" in err, err
    # destination directory that is not a layout
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    rc, err = run(f"{src}:v1", f"oci:{tmp_path / 'junk'}", capsys=capsys)
    assert rc == 1 and "not an OCI image layout" in err


def test_parse_oci_reference() -> None:
    assert parse_oci_reference("/a/b") == ("/a/b", None)
    assert parse_oci_reference("/a/b:tag") == ("/a/b", "tag")
    assert parse_oci_reference("rel:v1.2") == ("rel", "v1.2")


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_accepts_the_converted_layout(tmp_path: Path) -> None:
    std_image(tmp_path / "src")
    assert main([f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:v1"]) == 0
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'dst'}:v1"],
        check=True,
        capture_output=True,
    ).stdout
    assert json.loads(out)["layers"][0]["annotations"][TOC_ANN].startswith("sha256:")
    # skopeo copy verifies every blob digest and size
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{tmp_path / 'dst'}:v1", f"dir:{tmp_path / 'copy'}"],
        check=True,
        capture_output=True,
    )


def test_registry_to_layout_and_back(
    tmp_path: Path,
    registry: RegistryHandle,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    img = registry.push_image(
        "conv/src",
        "v1",
        [gzip.compress(tar_of(LAYER1), mtime=0), gzip.compress(tar_of(LAYER2))],
        config_extra={
            "x-unknown-config-field": {"kept": True},
            "history": [{"created_by": "test"}],
        },
    )
    assert img.tag == "v1"
    rc, err = run(
        "--src-tls-verify=false",
        f"docker://{registry.ref('conv/src', 'v1')}",
        f"oci:{tmp_path / 'dst'}:v1",
        capsys=capsys,
    )
    assert rc == 0, err
    manifest = load(tmp_path / "dst", resolve(tmp_path / "dst", "v1")["digest"])
    check_image(tmp_path / "dst", manifest, [LAYER1, LAYER2])
    rc, err = run(
        "--dest-tls-verify=false",
        f"oci:{tmp_path / 'dst'}:v1",
        f"docker://{registry.ref('conv/esgz', 'v1')}",
        capsys=capsys,
    )
    assert rc == 0, err
    # registry -> registry: the converted image pulled back converts to the same digest
    rc, err = run(
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        f"docker://{registry.ref('conv/src', 'v1')}",
        f"docker://{registry.ref('conv/esgz2', 'v1')}",
        capsys=capsys,
    )
    assert rc == 0, err
    assert resolve(tmp_path / "dst", "v1")["digest"] in err


def test_progress_display_tty_and_log() -> None:
    from layerstore.image.convert import LayerReport
    from stargz_store.convert_cmd import Progress

    rep = LayerReport(
        "linux/amd64",
        0,
        "sha256:" + "a" * 64,
        10_000_000,
        "sha256:" + "b" * 64,
        5_000_000,
        "converted",
        "sha256:" + "c" * 64,
        "sha256:" + "d" * 64,
        2.0,
    )
    out = io.StringIO()
    p = Progress(out, tty=True)
    p.layer_start("linux/amd64", 0, 3, rep.source_digest, 10_000_000)
    p._last -= 1  # as if 1 s had passed since the last refresh
    p.layer_progress(5_000_000)
    p.layer_done(rep)
    text = out.getvalue()
    assert "\r\x1b[Klinux/amd64 layer 1/3 aaaaaaaaaaaa: 5.0 MB / 10.0 MB (50%)" in text
    assert "10.0 MB -> 5.0 MB eStargz in 2.0 s (5.0 MB/s)" in text
    out = io.StringIO()
    p = Progress(out, tty=False, log_interval=0.0)
    p.layer_start("", 1, 2, rep.source_digest, 10_000_000)
    p.layer_progress(1_000_000)
    p.layer_done(rep)
    lines = out.getvalue().splitlines()
    assert lines[0] == "layer 2/2 aaaaaaaaaaaa: converting 10.0 MB"
    assert lines[1].startswith("layer 2/2 aaaaaaaaaaaa: 1.0 MB / 10.0 MB (10%)")
    assert "\r" not in out.getvalue() and len(lines) == 3
    out = io.StringIO()
    p = Progress(out, tty=False, log_interval=0.0)
    p.layer_start("", 0, 1, rep.source_digest, 10_000_000)
    p.layer_done(dataclasses.replace(rep, action="kept"))
    assert out.getvalue() == "layer 1/1 aaaaaaaaaaaa: kept as is (already eStargz)\n"
    out = io.StringIO()
    p = Progress(out, tty=False, log_interval=60.0)
    p.layer_start("", 0, 1, rep.source_digest, 10_000_000)
    p.layer_progress(4_000_000, copying=True)
    p.layer_done(dataclasses.replace(rep, action="kept"))
    assert out.getvalue() == (
        "layer 1/1 aaaaaaaaaaaa: copying 10.0 MB\n"
        "layer 1/1 aaaaaaaaaaaa: kept as is (already eStargz)\n"
    )


def test_registry_docker_index_to_registry(
    tmp_path: Path,
    registry: RegistryHandle,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    import requests

    amd = registry.push_image(
        "conv/dsrc", None, [gzip.compress(tar_of(LAYER1))], manifest_media_type=DOCKER_MANIFEST
    )
    arm = registry.push_image(
        "conv/dsrc",
        None,
        [gzip.compress(tar_of(LAYER2))],
        manifest_media_type=DOCKER_MANIFEST,
        platform=("linux", "arm64", "v8"),
    )
    registry.push_index("conv/dsrc", "multi", [amd, arm])
    rc, err = run(
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--platform=linux/arm64",
        f"docker://{registry.ref('conv/dsrc', 'multi')}",
        f"docker://{registry.ref('conv/ddst', 'arm')}",
        capsys=capsys,
    )
    assert rc == 0, err
    s = requests.Session()
    s.trust_env = False
    accept = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST}"
    r = s.get(f"{registry.url}/v2/conv/ddst/manifests/arm", headers={"Accept": accept}, timeout=30)
    assert r.status_code == 200, r.text
    index = r.json()
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["arm64"]
    d = index["manifests"][0]["digest"]
    m = s.get(
        f"{registry.url}/v2/conv/ddst/manifests/{d}", headers={"Accept": accept}, timeout=30
    ).json()
    assert m["mediaType"] == DOCKER_MANIFEST
    layer = m["layers"][0]
    assert layer["mediaType"] == DOCKER_GZIP
    blob = s.get(f"{registry.url}/v2/conv/ddst/blobs/{layer['digest']}", timeout=30).content
    assert sha(blob) == layer["digest"]
    path = tmp_path / "layer.esgz"
    path.write_bytes(blob)
    with FileSource(path) as src:
        rd = EStargzReader.open(src, expected_toc_digest=layer["annotations"][TOC_ANN])
        assert rd.read_file("app/main.py") == LAYER2["app/main.py"]
    config = s.get(f"{registry.url}/v2/conv/ddst/blobs/{m['config']['digest']}", timeout=30).json()
    assert config["rootfs"]["diff_ids"] == [sha(gzip.decompress(blob))]


# --- registries as skopeo reaches them: registries.conf, TLS flags, credentials, push check -----


def registries_conf(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def insecure_conf(tmp_path: Path, host: str) -> Path:
    return registries_conf(
        tmp_path / "registries.conf", f'[[registry]]\nlocation = "{host}"\ninsecure = true\n'
    )


def test_insecure_registry_from_registries_conf_only(
    tmp_path: Path,
    registry: RegistryHandle,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry.push_image("rc/src", "v1", [gzip.compress(tar_of(LAYER1))])
    src = f"docker://{registry.ref('rc/src', 'v1')}"
    dst = f"docker://{registry.ref('rc/dst', 'v1')}"
    # No registries.conf entry: the plain-http registry fails TLS, and the message says which
    # side and which registry (the destination is checked first, before any conversion).
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(registries_conf(tmp_path / "e", "")))
    rc, err = run(src, dst, capsys=capsys)
    assert rc == 1
    assert f"destination {dst}: TLS failure talking to {registry.host}" in err, err
    assert "layer 1/" not in err
    rc, err = run(src, f"oci:{tmp_path / 'out'}", capsys=capsys)
    assert rc == 1 and f"source {src}: TLS failure talking to {registry.host}" in err, err
    assert "--src-tls-verify=false" in err  # the hint names the side's flag
    # insecure = true in the file named by CONTAINERS_REGISTRIES_CONF is enough for both sides
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(insecure_conf(tmp_path, registry.host)))
    rc, err = run(src, dst, capsys=capsys)
    assert rc == 0, err
    assert "1 of 1 layers converted" in err
    # an explicit --src-tls-verify=true overrides registries.conf for the source only
    rc, err = run("--src-tls-verify=true", src, dst, capsys=capsys)
    assert rc == 1 and f"source {src}: TLS failure" in err, err
    rc, err = run("--dest-tls-verify", "true", src, dst, capsys=capsys)
    assert rc == 1 and f"destination {dst}: TLS failure" in err, err
    # the converted image is there, and is eStargz
    rc, err = run(src.replace("rc/src", "rc/dst"), f"oci:{tmp_path / 'back'}:v1", capsys=capsys)
    assert rc == 0, err
    manifest = load(tmp_path / "back", resolve(tmp_path / "back", "v1")["digest"])
    assert TOC_ANN in manifest["layers"][0]["annotations"]


def test_registries_conf_mirror_and_blocked(
    tmp_path: Path,
    registry: RegistryHandle,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry.push_image(
        "mirrored/app",
        "v1",
        [gzip.compress(tar_of(LAYER2))],
        config_extra={
            "x-unknown-config-field": {"kept": True},
            "history": [{"created_by": "test"}],
        },
    )
    conf = registries_conf(
        tmp_path / "registries.conf",
        '[[registry]]\nlocation = "blocked.invalid"\nblocked = true\n'
        '[[registry]]\nprefix = "upstream.invalid"\nlocation = "upstream.invalid"\n'
        f'[[registry.mirror]]\nlocation = "{registry.host}/mirrored"\ninsecure = true\n',
    )
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    # the source is read from its mirror (the upstream name does not even resolve)
    rc, err = run("docker://upstream.invalid/app:v1", f"oci:{tmp_path / 'out'}:v1", capsys=capsys)
    assert rc == 0, err
    manifest = load(tmp_path / "out", resolve(tmp_path / "out", "v1")["digest"])
    check_image(tmp_path / "out", manifest, [LAYER2])
    # a blocked registry is refused on either side, naming the registry and the file
    for argv, side in (
        (("docker://blocked.invalid/a:1", f"oci:{tmp_path / 'b'}"), "source"),
        ((f"oci:{tmp_path / 'out'}:v1", "docker://blocked.invalid/a:1"), "destination"),
    ):
        rc, err = run(*argv, capsys=capsys)
        assert rc == 1, err
        assert f"{side} docker://blocked.invalid/a:1: registry blocked.invalid is blocked" in err
        assert str(conf) in err
    # --registries-conf replaces $CONTAINERS_REGISTRIES_CONF: no mirror any more
    empty = registries_conf(tmp_path / "empty.conf", "")
    rc, err = run(
        "--registries-conf", str(empty), "docker://upstream.invalid/app:v1",
        f"oci:{tmp_path / 'out2'}", capsys=capsys,
    )  # fmt: skip
    assert rc == 1 and "source docker://upstream.invalid/app:v1" in err, err


def test_push_check_fails_fast_on_a_wrong_password(
    tmp_path: Path,
    registry_htpasswd: RegistryHandle,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg = registry_htpasswd
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(insecure_conf(tmp_path, reg.host)))
    std_image(tmp_path / "src")
    src = f"oci:{tmp_path / 'src'}:v1"
    dst = f"docker://{reg.ref('pushcheck/app', 'v1')}"
    rc, err = run("--dest-creds", f"{reg.username}:wrong-password-xyz", src, dst, capsys=capsys)
    assert rc == 1
    assert f"destination {dst}: registry {reg.host} refused the credentials" in err, err
    assert "converting" not in err and "layer 1/" not in err  # no layer was converted
    assert "wrong-password-xyz" not in err
    # an auth file without credentials for the registry: also refused before converting
    authfile = tmp_path / "auth.json"
    authfile.write_text('{"auths": {}}')
    rc, err = run("--dest-authfile", str(authfile), src, dst, capsys=capsys)
    assert rc == 1 and "no credentials are configured" in err and "layer 1/" not in err, err
    # the right credentials (from an auth file, as skopeo --dest-authfile) convert and push
    auth = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    rc, err = run("--dest-authfile", str(authfile), src, dst, capsys=capsys)
    assert rc == 0, err
    assert "2 of 2 layers converted" in err


def test_quiet_sizes_and_digestfile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    std_image(tmp_path / "src")
    digestfile = tmp_path / "digest"
    rc, err = run(
        "-q", "--chunk-size", "512K", "--min-chunk-size", "4K", "--digestfile", str(digestfile),
        f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:v1", capsys=capsys,
    )  # fmt: skip
    assert rc == 0 and err == ""
    assert digestfile.read_text() == resolve(tmp_path / "dst", "v1")["digest"]
    rc, err = run("--chunk-size", "4Q", "a", "b", capsys=capsys)
    assert rc == 2 and "invalid size '4Q'" in err


def test_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    from stargz_store.convert_cmd import _parser

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for action in _parser()._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, action.option_strings or action.dest
    for word in ("registries.conf", "4M", "USER[:PASSWORD]", "OS/ARCH", "insecure"):
        assert word in out, word


def test_stdout_has_no_log_lines(
    tmp_path: Path,
    registry: RegistryHandle,  # noqa: F811 - the fixture
) -> None:
    registry.push_image("clean/src", "v1", [gzip.compress(tar_of(LAYER1))])
    env = dict(
        os.environ,
        CONTAINERS_REGISTRIES_CONF=str(insecure_conf(tmp_path, registry.host)),
        PYTHONUNBUFFERED="1",
    )
    out = subprocess.run(
        [
            sys.executable, "-m", "stargz_store", "convert", "--log-level", "debug",
            f"docker://{registry.ref('clean/src', 'v1')}",
            f"docker://{registry.ref('clean/dst', 'v1')}",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    events = [json.loads(x) for x in out.stderr.splitlines() if x.startswith("{")]
    names = {e["event"] for e in events}
    assert {"registry_response", "registry_push_checked"} <= names, names
    assert "layer 1/1" in out.stderr and "wrote docker://" in out.stderr
