"""podman for the end-to-end tests: private configuration, storage and clean-up.

``Podman`` extends ``stargz_store.demo.PodmanEnv`` (private containers.conf with runc and
ulimits that this machine allows, storage.conf with its own graphroot/runroot and optionally
the store as ``additionallayerstores``, registries.conf marking the loopback registry insecure)
with what the tests inspect: which layers podman took from the store, disk usage, save, push.

podman 4.3.1 quirk: as root it writes containers/image's blob-info cache to
/var/lib/containers/cache whatever the configuration says (nothing else global is touched).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from stargz_store.demo import PodmanEnv, PodmanError, StoreDaemon, disk_usage, mounts_below

__all__ = [
    "Podman",
    "PodmanError",
    "StoreDaemon",
    "mounts_below",
    "need_podman",
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
