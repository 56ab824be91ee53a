"""podman for the end-to-end tests: private configuration, storage and clean-up.

``Podman`` extends ``testbed.PodmanEnv`` (private containers.conf with runc and
ulimits that this machine allows, storage.conf with its own graphroot/runroot and optionally
the store as ``additionallayerstores``, registries.conf marking the loopback registry insecure)
with what the tests inspect: which layers podman took from the store, disk usage, save, push.

podman 4.3.1 quirks met here:
- as root it writes containers/image's blob-info cache to /var/lib/containers/cache whatever
  the configuration says (nothing else global is touched);
- ``--root``/``--runroot`` on the command line make it drop every option of storage.conf,
  additionallayerstores included: only CONTAINERS_STORAGE_CONF is used (``check_storage``);
- the runroot may not be longer than 50 characters.
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from testbed import (
    ImageInfo,
    PodmanEnv,
    PodmanError,
    StoreDaemon,
    disk_usage,
    mounts_below,
)

__all__ = [
    "Podman",
    "PodmanError",
    "StoreDaemon",
    "mounts_below",
    "need_podman",
    "static_layer_store",
]


def need_podman() -> None:
    """Skip (with the reason) when the tools the podman tests need are missing or not root."""
    if os.geteuid() != 0:
        pytest.skip("podman e2e tests run rootful podman and FUSE with allow_other: need root")
    for tool in ("podman", "runc", "conmon", "fusermount3", "busybox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (./run setup installs it)")
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing")


class Podman(PodmanEnv):
    """A podman with everything under ``workdir``; call ``cleanup()`` (the fixture does)."""

    def layer_diff_links(self) -> dict[str, str]:
        """{layer id: target} for every layer whose ``diff`` is a symlink (a layer that the
        additional layer store served)."""
        links = {}
        overlay = self.graphroot / "overlay"
        for layer in sorted(overlay.iterdir()) if overlay.is_dir() else []:
            diff = layer / "diff"
            if diff.is_symlink():
                links[layer.name] = os.readlink(diff)
        return links

    def layer_ids(self, image: str) -> list[str]:
        """containers/storage layer ids of ``image``, base first (from its json records; call
        only while no podman command runs)."""
        image_id = self.inspect(image)["Id"]
        images = json.loads((self.graphroot / "overlay-images" / "images.json").read_text())
        top = next(i["layer"] for i in images if i["id"] == image_id)
        parents = {layer["id"]: layer.get("parent", "") for layer in self.storage_layers()}
        chain: list[str] = []
        while top:
            chain.append(top)
            top = parents[top]
        return chain[::-1]

    def storage_layers(self) -> list[dict[str, Any]]:
        """containers/storage's records of its layers (``overlay-layers/layers.json``)."""
        path = self.graphroot / "overlay-layers" / "layers.json"
        if not path.exists():
            return []
        layers: list[dict[str, Any]] = json.loads(path.read_text() or "[]")
        return layers

    def image_layer_dirs(self, image: str) -> list[Path]:
        return [self.graphroot / "overlay" / layer for layer in self.layer_ids(image)]

    def graphroot_usage(self) -> int:
        """Bytes allocated in the graphroot (symlinks into the store's mount are not followed)."""
        return disk_usage(self.graphroot)

    def inspect(self, image: str) -> dict[str, Any]:
        out = self.run_podman("image", "inspect", image)
        data: list[dict[str, Any]] = json.loads(out.stdout)
        return data[0]

    def save(self, image: str, dest: Path, fmt: str = "docker-archive") -> Path:
        self.run_podman("save", "--format", fmt, "--output", str(dest), image)
        return dest

    def push(self, image: str, dest: str, *extra: str) -> None:
        """``podman push --tls-verify=false IMAGE docker://DEST``."""
        self.run_podman("push", "--quiet", "--tls-verify=false", *extra, image, f"docker://{dest}")

    def run_many(self, image: str, cmds: Sequence[Sequence[str]]) -> list[str]:
        """Start one container per command at the same time; their stdout, in order."""
        with concurrent.futures.ThreadPoolExecutor(len(cmds)) as pool:
            futures = [pool.submit(self.run, image, *cmd) for cmd in cmds]
            return [f.result() for f in futures]

    def run_result(self, image: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return self.run_podman(
            "run", "--rm", "--network", "none", "--pull", "never", image, *cmd, check=False
        )


def static_layer_store(store: Path, ref: str, image: ImageInfo) -> list[Path]:
    """Lay out ``image``'s layers as a plain-directory additional layer store for ``ref``
    (compressed-digest keys, podman <= 5.0): ``<store>/<base64(ref)>/<digest>/{diff,info,blob}``.
    Not the product: a known-good store to check the harness and podman's side of the contract
    (which reference string podman asks for, what it reads for save and push)."""
    layer_dirs = []
    refdir = store / base64.b64encode(ref.encode()).decode()
    for i, layer in enumerate(image.layers):
        blob = image.blob_path(layer["digest"]).read_bytes()
        tar = gzip.decompress(blob)
        d = refdir / layer["digest"]
        (d / "diff").mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            # Our own image: every member is trusted (devices, ownership and modes kept).
            if hasattr(tarfile, "fully_trusted_filter"):
                t.extractall(d / "diff", numeric_owner=True, filter="fully_trusted")
            else:  # Python < 3.9.17 / 3.10.12 / 3.11.4
                t.extractall(d / "diff", numeric_owner=True)
        (d / "blob").write_bytes(blob)
        info = {
            "compressed-diff-digest": layer["digest"],
            "compressed-size": len(blob),
            "diff-digest": image.diff_ids[i],
            "diff-size": len(tar),
            "compression": 2,
        }
        (d / "info").write_text(json.dumps(info))
        layer_dirs.append(d)
    return layer_dirs
