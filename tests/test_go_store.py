"""The Go reference store (``go-stargz-store``: our main around the ``store`` package of
Debian's stargz-snapshotter 0.12) serves lazy layers from a loopback docker-registry, so the
benchmark harness's Go contender is known to work: images written by the Go writer and by our
converter, read through its ALS mount directly and by podman 4.3.1."""

from __future__ import annotations

import base64
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.gopeer import GoPeerUnavailable, GoStoreDaemon, ensure_built, go_convert_image
from tests import fuse_util as fu
from tests.image_util import (
    ImageInfo,
    LoopbackRegistry,
    build_test_image,
    convert_image,
    push_image,
    read_image,
)
from tests.podman_util import Podman, need_podman
from tests.registry_fixtures import registry_binary

ok, why = fu.fuse_available()
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.registry,
    pytest.mark.skipif(not ok, reason=why),
    pytest.mark.skipif(registry_binary() is None, reason="no docker-registry binary"),
    pytest.mark.timeout(300),
]

DATA_SIZE = 2 << 20  # per data file: big enough that a lazy read is visibly partial
# Only what is read is fetched: no prefetch of the landmark region, no background fill.
LAZY_ONLY = "noprefetch = true\nno_background_fetch = true\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageInfo]:
    try:
        ensure_built()
    except GoPeerUnavailable as exc:
        pytest.skip(f"the Go peers cannot be built here ({exc}); ./run setup installs them")
    layout = tmp_path_factory.mktemp("go-store-images")
    gz = build_test_image(layout, "gzip", data_size=DATA_SIZE, data_files=3, seed=5)
    go_convert_image(layout, "gzip", layout, "go")
    return {"gzip": gz, "go": read_image(layout, "go"), "ours": convert_image(gz, "ours")}


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, ImageInfo]
) -> Iterator[LoopbackRegistry]:
    with LoopbackRegistry(tmp_path_factory.mktemp("go-store-registry")) as reg:
        for name in ("go", "ours"):
            push_image(images[name], reg, "go-store/img", name)
        yield reg


def _data_files(image: ImageInfo) -> dict[str, bytes]:
    """The data layer's regular files, from the gzip image's blob."""
    blob = image.blob_path(image.layers[1]["digest"])
    out = {}
    with tarfile.open(blob, "r:gz") as tf:
        for m in tf.getmembers():
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


@pytest.mark.parametrize("writer", ["go", "ours"])
def test_go_store_serves_one_lazy_layer(
    tmp_path: Path, images: dict[str, ImageInfo], registry: LoopbackRegistry, writer: str
) -> None:
    """Reading one file of the data layer through the Go store's mount gives its bytes and
    fetches a fraction of the layer; ``info`` describes the layer as the manifest does."""
    image = images[writer]
    ref = f"{registry.host}/go-store/img:{writer}"
    layer = image.layers[1]
    want = _data_files(images["gzip"])
    with GoStoreDaemon(tmp_path / "go", config_text=LAZY_ONLY, log_level="debug") as d:
        mark = len(registry.requests())
        keydir = d.mountpoint / base64.b64encode(ref.encode()).decode() / layer["digest"]
        fu.run_with_timeout(lambda: os.stat(keydir / "diff"), 60)
        info = json.loads((keydir / "info").read_text())
        assert info["compressed-diff-digest"] == layer["digest"]
        assert info["compressed-size"] == layer["size"]
        assert info["diff-digest"] == image.diff_ids[1]
        assert (
            str(info["diff-size"])
            == layer["annotations"]["io.containers.estargz.uncompressed-size"]
        )
        assert sorted(os.listdir(keydir / "diff" / "data")) == sorted(
            p.split("/", 1)[1] for p in want
        )
        got = fu.run_with_timeout(lambda: (keydir / "diff/data/file1.bin").read_bytes(), 60)
        assert got == want["data/file1.bin"]
        fetched = sum(
            r.size
            for r in registry.requests()[mark:]
            if r.is_blob_get and r.digest == layer["digest"]
        )
    assert DATA_SIZE <= fetched < layer["size"] * 2 // 3, (fetched, layer["size"])


def test_podman_runs_an_image_through_the_go_store(
    tmp_path: Path, images: dict[str, ImageInfo], registry: LoopbackRegistry
) -> None:
    """podman 4.3.1 with ``additionallayerstores`` on the Go store's mount takes every layer
    of the Go-written image from the store (``diff`` symlinks into the mount) and the
    container's self-check of its data passes."""
    need_podman()
    ref = f"{registry.host}/go-store/img:go"
    with GoStoreDaemon(tmp_path / "go") as d:
        podman = Podman(tmp_path / "podman", layer_store=d.mountpoint, insecure=[registry.host])
        try:
            podman.check_storage()
            podman.pull(ref)
            assert podman.run(ref).strip() == "data-ok"
            links = podman.layer_diff_links()
        finally:
            podman.cleanup()
    prefix = str(d.mountpoint.resolve()) + "/"
    assert len(links) == 2 and all(t.startswith(prefix) for t in links.values()), links
