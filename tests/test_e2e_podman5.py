"""podman 5.4 end to end: Debian trixie's podman in a chroot (``testbed.podman5``), the store
daemon on the host mounted inside it, a real registry on 127.0.0.1.

podman >= 5.1 looks eStargz layers up in an additional layer store by their TOC digest (the
``containerd.io/snapshot/stargz/toc.digest`` annotation), never by the compressed digest that
podman 4.3 (``test_e2e_podman.py``) asks for; podman >= 5.2 hands its registry credentials to
the store through ``additional-layer-store-auth-helper``. Each test proves its layers came from
the store (``diff`` symlinks into the mount, a graphroot smaller than the data) and that the
container's output is right.

The chroot is built by ``./run setup`` (debootstrap, cached outside the checkout); one set of
mounts serves the module, and every test checks at its end that the mounts are back to that set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from testbed import StoreDaemon, write_auth_json
from testbed.podman5 import (
    Podman5,
    TrixieChroot,
    chroot_problem,
    inside,
    mounts_below,
    store_daemon,
)
from tests.image_util import (
    CHECK_OK,
    ImageInfo,
    RegistryHTTP,
    archive_layer_diff_ids,
    build_test_image,
    convert_image,
    push_image,
    registry_diff_ids,
)
from tests.registry_fixtures import (  # noqa: F401 - pytest fixtures
    RegistryHandle,
    registry,
    registry_htpasswd,
)

pytestmark = [pytest.mark.podman, pytest.mark.registry, pytest.mark.timeout(600)]

BUSYBOX = Path("/bin/busybox")
DATA_SIZE = 512 * 1024
DATA_FILES = 3


def _busybox_sha256() -> str:
    import hashlib

    return hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trixie() -> Iterator[TrixieChroot]:
    """The session's mounts of the cached chroot. Not root: skipped (rootful podman, FUSE with
    allow_other, mounts). Root without the chroot: a failure, since ``./run setup`` builds it."""
    if os.geteuid() != 0:
        pytest.skip("podman 5.4 runs rootful from a chroot with bind mounts: needs root")
    for tool in ("chroot", "mount", "umount", "fusermount3"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (./run setup installs it)")
    if not BUSYBOX.is_file():
        pytest.fail("/bin/busybox is missing (./run setup installs busybox-static)")
    problem = chroot_problem()
    if problem:
        pytest.fail(problem)
    chroot = TrixieChroot().start()
    try:
        yield chroot
    finally:
        chroot.stop()
    assert not chroot.base.exists()


@pytest.fixture(scope="module")
def esgz(tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    """The test image (busybox layer, data layer with a self-checking script), converted to
    eStargz by ``stargz-store convert``."""
    gz = build_test_image(
        tmp_path_factory.mktemp("layout5"), "gzip", data_size=DATA_SIZE, data_files=DATA_FILES
    )
    return convert_image(gz, "estargz")


def _repo(request: pytest.FixtureRequest, suffix: str = "") -> str:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"p5/{name}{suffix}"


def _client(reg: RegistryHandle) -> RegistryHTTP:
    return RegistryHTTP(reg.host, reg.username or "", reg.password or "")


@dataclass
class Lazy:
    """podman 5.4 in the chroot with a store daemon on the host as its additional layer store."""

    podman: Podman5
    daemon: StoreDaemon
    mount: str  # the daemon's mountpoint as podman sees it

    def events(self, name: str) -> list[dict[str, Any]]:
        """The daemon's JSON log records whose event is ``name``."""
        out = []
        for line in self.daemon.log_tail(1 << 24).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == name:
                out.append(rec)
        return out


Maker = Callable[..., Lazy]


@pytest.fixture
def make(trixie: TrixieChroot) -> Iterator[Maker]:
    """``make(reg, auth_helper=False, authfile=None, store=True)``: a podman 5.4 (with a store
    daemon of its own unless ``store=False``). At teardown: podman cleaned up first (its overlays
    use the store's mount), then the daemon stopped (exit status 0 and no mount left), then the
    chroot's mounts checked to be the session's set again."""
    stack = ExitStack()
    statuses: list[tuple[StoreDaemon, int | None]] = []

    def factory(
        reg: RegistryHandle,
        *,
        auth_helper: bool = False,
        authfile: str | None = None,
        store: bool = True,
    ) -> Lazy:
        name = trixie.new_name()
        daemon = store_daemon(
            trixie,
            name + "d",
            registries_conf=trixie.host_path(f"/var/lib/stargz-store/{name}/registries.conf"),
            insecure=[reg.host],
        )
        where = inside(trixie, daemon)
        podman = Podman5(
            trixie,
            name,
            layer_store=where["mountpoint"] if store else None,
            insecure=[reg.host],
            authfile=authfile,
            auth_helper="stargz-store-helper" if auth_helper else None,
            helper_socket=where["socket"] if auth_helper else None,
        )
        if store:
            stack.callback(lambda: statuses.append((daemon, daemon.stop())))
            daemon.start()
        stack.callback(podman.cleanup)
        podman.check_storage()
        return Lazy(podman, daemon, where["mountpoint"])

    try:
        yield factory
    finally:
        stack.close()
    for daemon, status in statuses:
        assert status == 0, f"daemon exit status {status}: {daemon.log_tail()}"
        assert not mounts_below(str(daemon.workdir.resolve()))
    trixie.check_clean()


@contextmanager
def daemon_log_on_failure(*lazies: Lazy) -> Iterator[None]:
    try:
        yield
    except BaseException:
        import sys

        for lazy in lazies:
            sys.stderr.write(f"--- daemon log {lazy.daemon.workdir.name} ---\n")
            sys.stderr.write(lazy.daemon.log_tail(8000) + "\n")
        raise


def _check_lazy_pull(lazy: Lazy, ref: str, image: ImageInfo) -> None:
    """Every layer of ``ref`` is a symlink into the store; the graphroot holds less than one data
    file; and the store was asked for the layers' TOC digests and nothing else."""
    assert lazy.podman.store_links(ref) == [True] * len(image.layers), lazy.podman.layer_diff_links()
    assert lazy.podman.graphroot_usage() < DATA_SIZE, lazy.podman.graphroot_usage()
    toc_digests = {layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"] for layer in image.layers}
    compressed = {layer["digest"] for layer in image.layers}
    resolved = lazy.events("layer_resolved")
    keys = {rec["key"] for rec in resolved if "key" in rec}
    assert keys == toc_digests, resolved
    assert {rec["scheme"] for rec in resolved if "key" in rec} == {"toc"}
    # No lookup by compressed digest at all: podman 5 asks TOC digests only.
    failed = lazy.events("layer_lookup_failed")
    assert not [rec for rec in failed if rec.get("key") in compressed], failed


def test_podman_is_5_4(make: Maker, registry: RegistryHandle) -> None:  # noqa: F811
    """The chroot's podman is what this module is about (TOC keys need >= 5.1, the auth helper
    >= 5.2); and it uses our private storage and the store's mount."""
    lazy = make(registry)
    major, minor = (int(x) for x in lazy.podman.version().split(".")[:2])
    assert (major, minor) >= (5, 2)
    store = lazy.podman.check_storage()
    assert store["graphRoot"] == lazy.podman.graphroot


def test_lazy_run_by_toc_digest(
    make: Maker,
    registry: RegistryHandle,  # noqa: F811
    esgz: ImageInfo,
    request: pytest.FixtureRequest,
) -> None:
    repo = _repo(request)
    push_image(esgz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    lazy = make(registry)
    with daemon_log_on_failure(lazy):
        lazy.podman.pull(ref)
        _check_lazy_pull(lazy, ref, esgz)
        assert lazy.podman.run(ref).strip() == CHECK_OK
        assert lazy.podman.run(ref, "sha256sum", "/bin/busybox").split()[0] == _busybox_sha256()
        listing = lazy.podman.run(ref, "ls", "-a", "/").split()
        assert not {".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"} & set(
            listing
        )
        assert lazy.podman.graphroot_usage() < DATA_SIZE
        # Removing the image releases the store's layers.
        lazy.podman.run_podman("rmi", ref)
        assert lazy.podman.storage_layers() == []
        assert lazy.podman.layer_diff_links() == {}
