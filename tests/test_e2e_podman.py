"""podman end to end: real images, a real registry on 127.0.0.1, the store daemon, podman 4.x.

The first group proves the harness alone (image layouts, byte-exact pushes, private podman,
clean-up). The second needs ``stargz-store convert`` and the daemon: images are converted to
eStargz, the daemon is mounted and given to podman as an additional layer store, and podman
pulls and runs them. Evidence that a layer came from the store: its ``diff`` under podman's
graphroot is a symlink into the mount, and the graphroot stays small.

Every podman runs with private containers.conf/storage.conf/registries.conf and its own
graphroot under the test's tmp_path; the daemon's credential chain is confined to the test's
files too (see ``testbed.StoreDaemon``).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import LoopbackRegistry, skopeo_push, write_auth_json
from tests.image_util import (
    CHECK_OK,
    ImageInfo,
    RegistryHTTP,
    archive_layer_diff_ids,
    build_test_image,
    convert_image,
    decompressed_digest,
    mix_layers,
    push_image,
    read_image,
    registry_diff_ids,
)
from tests.podman_util import (
    Podman,
    StoreDaemon,
    mounts_below,
    need_podman,
    static_layer_store,
)
from tests.registry_fixtures import (  # noqa: F401 - pytest fixtures
    RegistryHandle,
    registry,
    registry_htpasswd,
)

pytestmark = [pytest.mark.podman, pytest.mark.registry, pytest.mark.timeout(600)]

BUSYBOX = Path("/bin/busybox")
BUSYBOX_SHA256 = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest() if BUSYBOX.is_file() else ""

# Small but real: busybox (about 2 MB) and three 512 KiB incompressible data files.
DATA_SIZE = 512 * 1024
DATA_FILES = 3


def _need_busybox() -> None:
    if not BUSYBOX.is_file():
        pytest.skip("/bin/busybox is missing: the test images are built from busybox-static")


def _repo(request: pytest.FixtureRequest, suffix: str = "") -> str:
    """A repository name unique to the test (the registries are shared by the session)."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"e2e/{name}{suffix}"


def _client(reg: RegistryHandle) -> RegistryHTTP:
    return RegistryHTTP(reg.host, reg.username or "", reg.password or "")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageInfo]:
    """The test image, plain gzip (tag ``gzip``), in an OCI layout."""
    _need_busybox()
    layout = tmp_path_factory.mktemp("layout")
    return {"gzip": build_test_image(layout, "gzip", data_size=DATA_SIZE, data_files=DATA_FILES)}


@pytest.fixture(scope="module")
def esgz_images(images: dict[str, ImageInfo]) -> dict[str, ImageInfo]:
    """The test image converted by ``stargz-store convert`` (tag ``estargz``), and the two
    mixed images: ``mixed-top-plain`` (eStargz base, gzip data layer) and
    ``mixed-base-plain`` (gzip base, eStargz data layer)."""
    gz = images["gzip"]
    esgz = convert_image(gz, "estargz")
    return {
        "gzip": gz,
        "estargz": esgz,
        "mixed-top-plain": mix_layers(esgz, gz, [1], "mixed-top-plain"),
        "mixed-base-plain": mix_layers(esgz, gz, [0], "mixed-base-plain"),
    }


@pytest.fixture
def podmans(tmp_path: Path) -> Iterator[list[Podman]]:
    """Podmans made by a test are cleaned up (containers, mounts, graphroot) at teardown."""
    need_podman()
    made: list[Podman] = []
    yield made
    errors = []
    for p in reversed(made):
        try:
            p.cleanup()
        except RuntimeError as e:
            errors.append(str(e))
    assert not errors, errors


@dataclass
class Lazy:
    """A podman whose additional layer store is a running store daemon."""

    podman: Podman
    daemon: StoreDaemon

    def links(self) -> dict[str, str]:
        return self.podman.layer_diff_links()

    def store_links(self, image: str) -> list[bool]:
        """Per image layer (base first): does its ``diff`` point into the store's mount?"""
        links = self.links()
        mount = str(self.daemon.mountpoint.resolve()) + "/"
        return [links.get(layer, "").startswith(mount) for layer in self.podman.layer_ids(image)]


@contextmanager
def lazy_env(
    workdir: Path,
    reg: RegistryHandle,
    *,
    store_auth: Path | None = None,
    podman_auth: Path | None = None,
) -> Iterator[Lazy]:
    """Start a store daemon and a podman that uses it; stop both (podman first: its overlay
    mounts use the store's mount) and check that no mount is left and the daemon exited 0."""
    need_podman()
    with ExitStack() as stack:
        podman = Podman(
            workdir / "podman",
            layer_store=workdir / "daemon" / "store",
            insecure=[reg.host],
            authfile=podman_auth,
        )
        daemon = StoreDaemon(
            workdir / "daemon",
            registries_conf=podman.registries_conf,
            insecure=[reg.host],
            authfile=store_auth,
        )
        exit_status: list[int | None] = []
        stack.callback(lambda: exit_status.append(daemon.stop()))
        stack.callback(podman.cleanup)  # runs first: podman's overlays use the store's mount
        daemon.start()
        podman.check_storage()
        try:
            yield Lazy(podman, daemon)
        except BaseException:
            sys.stderr.write("--- store daemon log (tail) ---\n" + daemon.log_tail(6000) + "\n")
            raise
    assert not mounts_below(str(workdir.resolve())), mounts_below(str(workdir.resolve()))
    # SIGTERM is a clean stop: unmounted by the daemon itself, exit status 0.
    assert exit_status == [0], f"daemon exit status {exit_status}: {daemon.log_tail()}"


# --------------------------------------------------------------------------------------------
# The harness alone
# --------------------------------------------------------------------------------------------


def test_image_layout_is_real_and_deterministic(tmp_path: Path) -> None:
    _need_busybox()
    a = build_test_image(tmp_path / "a", "t", data_size=4096, data_files=2)
    b = build_test_image(tmp_path / "b", "t", data_size=4096, data_files=2)
    assert a.manifest_digest == b.manifest_digest
    assert a.layers == b.layers
    c = build_test_image(tmp_path / "a", "other", data_size=4096, data_files=2, seed=2)
    assert c.layers[0] == a.layers[0] and c.layers[1] != a.layers[1]
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    tags = sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])
    assert tags == ["other", "t"]
    assert json.loads((tmp_path / "a" / "oci-layout").read_text())["imageLayoutVersion"]
    back = read_image(tmp_path / "a", "t")
    assert back.manifest_digest == a.manifest_digest
    for i, layer in enumerate(back.layers):
        blob = back.blob_path(layer["digest"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == layer["digest"].split(":")[1]
        assert len(blob) == layer["size"]
        assert decompressed_digest(blob) == back.diff_ids[i]
    assert back.config["os"] == "linux" and back.config["architecture"]
    assert back.config["config"]["Cmd"] == ["/data/check.sh"]


def test_push_is_byte_exact(registry: RegistryHandle, images: dict[str, ImageInfo]) -> None:  # noqa: F811
    gz = images["gzip"]
    client = _client(registry)
    assert push_image(gz, client, "e2e/push-exact", "v1") == gz.manifest_digest
    got = registry_diff_ids(client, "e2e/push-exact", "v1")
    assert got["manifest_digest"] == gz.manifest_digest
    assert got["layer_digests"] == [layer["digest"] for layer in gz.layers]
    assert got["config_diff_ids"] == got["blob_diff_ids"] == gz.diff_ids


def test_plain_pull_and_run(
    registry: RegistryHandle,  # noqa: F811
    images: dict[str, ImageInfo],
    podmans: list[Podman],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    gz = images["gzip"]
    repo = _repo(request)
    push_image(gz, _client(registry), repo, "v1")
    podman = Podman(tmp_path / "podman", insecure=[registry.host])
    podmans.append(podman)
    store = podman.check_storage()
    assert store["graphOptions"] == {} and store["graphRoot"].startswith(str(tmp_path))
    ref = f"{registry.host}/{repo}:v1"
    podman.pull(ref)
    assert podman.run(ref).strip() == CHECK_OK
    assert podman.run(ref, "echo", "hello").strip() == "hello"
    assert podman.run(ref, "sha256sum", "/bin/busybox").split()[0] == BUSYBOX_SHA256
    # Without a store every layer is a real directory, and the layers take real space.
    assert podman.layer_diff_links() == {}
    assert len(podman.layer_ids(ref)) == 2
    assert podman.graphroot_usage() > DATA_SIZE * DATA_FILES + 1_000_000


def test_cleanup_unmounts_running_containers(
    registry: RegistryHandle,  # noqa: F811
    images: dict[str, ImageInfo],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    need_podman()
    gz = images["gzip"]
    repo = _repo(request)
    push_image(gz, _client(registry), repo, "v1")
    podman = Podman(tmp_path / "podman", insecure=[registry.host])
    try:
        podman.pull(f"{registry.host}/{repo}:v1")
        podman.run_podman(
            "run", "-d", "--network", "none", f"{registry.host}/{repo}:v1", "sleep", "600"
        )
        assert mounts_below(str(podman.workdir.resolve())), "expected an overlay mount"
    finally:
        podman.cleanup()
    assert not mounts_below(str(tmp_path.resolve()))
    assert not podman.workdir.exists()


def test_plain_save_and_push_keep_layer_content(
    registry: RegistryHandle,  # noqa: F811
    images: dict[str, ImageInfo],
    podmans: list[Podman],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Baseline for the lazy case: what podman 4.x's save and push do with a plain pull."""
    gz = images["gzip"]
    repo = _repo(request)
    push_image(gz, _client(registry), repo, "v1")
    podman = Podman(tmp_path / "podman", insecure=[registry.host])
    podmans.append(podman)
    ref = f"{registry.host}/{repo}:v1"
    podman.pull(ref)
    _check_save_and_push(podman, ref, gz, registry, repo, same_blobs=True)


def _check_save_and_push(
    podman: Podman,
    ref: str,
    image: ImageInfo,
    reg: RegistryHandle,
    repo: str,
    *,
    same_blobs: bool,
) -> None:
    """``podman save`` in both archive formats and ``podman push`` to another repository: the
    layers' content must be the original's, byte for byte (same DiffIDs, recomputed from the
    archive's and the registry's blobs). With ``same_blobs`` the pushed compressed blobs must
    be the original blobs too (podman reuses them when it pulled them itself)."""
    for fmt in ("docker-archive", "oci-archive"):
        archive = podman.save(ref, podman.workdir / f"saved.{fmt}.tar", fmt)
        config_ids, blob_ids = archive_layer_diff_ids(archive)
        assert config_ids == image.diff_ids, fmt
        assert blob_ids == image.diff_ids, fmt
        archive.unlink()
    podman.push(ref, f"{reg.host}/{repo}-copy:v1", *_creds(reg))
    got = registry_diff_ids(_client(reg), f"{repo}-copy", "v1")
    assert got["config_diff_ids"] == image.diff_ids
    assert got["blob_diff_ids"] == image.diff_ids
    if same_blobs:
        assert got["layer_digests"] == [layer["digest"] for layer in image.layers]


def _creds(reg: RegistryHandle) -> list[str]:
    return [f"--creds={reg.username}:{reg.password}"] if reg.username else []


def test_static_layer_store_contract(
    registry: RegistryHandle,  # noqa: F811
    images: dict[str, ImageInfo],
    podmans: list[Podman],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """podman's side of the ALS contract, with a plain directory as the store: it asks for
    ``<base64(host/repo:tag)>/<compressed digest>``, links ``diff`` instead of pulling, and
    reads ``blob`` back for save and push. This checks the harness (``store_links``, disk
    usage, save/push checks) independently of the daemon."""
    gz = images["gzip"]
    repo = _repo(request)
    push_image(gz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    store = tmp_path / "store"
    layer_dirs = static_layer_store(store, ref, gz)
    podman = Podman(tmp_path / "podman", layer_store=store, insecure=[registry.host])
    podmans.append(podman)
    podman.check_storage()
    podman.pull(ref)
    links = podman.layer_diff_links()
    assert [links.get(layer) for layer in podman.layer_ids(ref)] == [
        str(d / "diff") for d in layer_dirs
    ]
    assert podman.graphroot_usage() < DATA_SIZE
    assert podman.run(ref).strip() == CHECK_OK
    _check_save_and_push(podman, ref, gz, registry, repo, same_blobs=False)


# --------------------------------------------------------------------------------------------
# With the store (needs `stargz-store convert` and the daemon)
# --------------------------------------------------------------------------------------------


def test_lazy_run(
    registry: RegistryHandle,  # noqa: F811
    esgz_images: dict[str, ImageInfo],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    esgz = esgz_images["estargz"]
    repo = _repo(request)
    push_image(esgz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    with lazy_env(tmp_path, registry) as lazy:
        lazy.podman.pull(ref)
        assert lazy.store_links(ref) == [True, True], lazy.links()
        # The layers are symlinks into the mount: nothing of their content is in the graphroot.
        for layer_dir in lazy.podman.image_layer_dirs(ref):
            assert (layer_dir / "diff").is_symlink()
        usage_after_pull = lazy.podman.graphroot_usage()
        assert usage_after_pull < DATA_SIZE, usage_after_pull
        # Every file is read through the store and checked against checksums in the image.
        assert lazy.podman.run(ref).strip() == CHECK_OK
        assert lazy.podman.run(ref, "sha256sum", "/bin/busybox").split()[0] == BUSYBOX_SHA256
        assert lazy.podman.run(ref, "readlink", "/bin/sh").strip() == "busybox"
        assert lazy.podman.graphroot_usage() < DATA_SIZE
        # The store's landmark and TOC files stay hidden from the container.
        listing = lazy.podman.run(ref, "ls", "-a", "/").split()
        assert not {".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"} & set(
            listing
        )
        # Removing the image releases the store's layers (rmdir answered with ENOENT).
        lazy.podman.run_podman("rmi", ref)
        assert lazy.podman.storage_layers() == []
        assert lazy.links() == {}


@pytest.mark.parametrize("which", ["mixed-top-plain", "mixed-base-plain"])
def test_mixed_estargz_and_gzip_layers(
    registry: RegistryHandle,  # noqa: F811
    esgz_images: dict[str, ImageInfo],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    which: str,
) -> None:
    image = esgz_images[which]
    expect = [image.is_estargz(i) for i in range(len(image.layers))]
    assert sorted(expect) == [False, True]
    repo = _repo(request)
    push_image(image, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    with lazy_env(tmp_path, registry) as lazy:
        lazy.podman.pull(ref)
        # The eStargz layer comes from the store, the gzip layer is pulled by podman.
        assert lazy.store_links(ref) == expect, lazy.links()
        assert lazy.podman.run(ref).strip() == CHECK_OK
        assert lazy.podman.run(ref, "sha256sum", "/bin/busybox").split()[0] == BUSYBOX_SHA256


def test_two_containers_in_parallel(
    registry: RegistryHandle,  # noqa: F811
    esgz_images: dict[str, ImageInfo],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    esgz = esgz_images["estargz"]
    repo = _repo(request)
    push_image(esgz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    with lazy_env(tmp_path, registry) as lazy:
        lazy.podman.pull(ref)
        assert lazy.store_links(ref) == [True, True]
        outs = lazy.podman.run_many(
            ref,
            [
                ["/data/check.sh"],
                ["sh", "-c", "sha256sum /bin/busybox /data/file2.bin /data/file0.bin"],
            ],
        )
        assert outs[0].strip() == CHECK_OK
        sums = [line.split()[0] for line in outs[1].splitlines()]
        assert sums[0] == BUSYBOX_SHA256
        expected = _data_sums(esgz)
        assert sums[1:] == [expected["/data/file2.bin"], expected["/data/file0.bin"]]


def test_two_podmans_share_one_store(
    registry: RegistryHandle,  # noqa: F811
    esgz_images: dict[str, ImageInfo],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Two podmans (two graphroots, as two users of one machine would have) pull and run the
    same image through one store at the same time."""
    esgz = esgz_images["estargz"]
    repo = _repo(request)
    push_image(esgz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    with lazy_env(tmp_path, registry) as lazy:
        other = Podman(
            tmp_path / "podman2", layer_store=lazy.daemon.mountpoint, insecure=[registry.host]
        )
        try:

            def pull_and_run(podman: Podman) -> str:
                podman.pull(ref)
                return podman.run(ref)

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                outs = list(pool.map(pull_and_run, [lazy.podman, other]))
            assert [o.strip() for o in outs] == [CHECK_OK, CHECK_OK]
            assert lazy.store_links(ref) == [True, True]
            mount = str(lazy.daemon.mountpoint.resolve()) + "/"
            assert [t.startswith(mount) for t in other.layer_diff_links().values()] == [True] * 2
        finally:
            other.cleanup()


def _data_sums(image: ImageInfo) -> dict[str, str]:
    """The SHA256SUMS the test image carries (read back from the original gzip layer)."""
    gz = read_image(image.layout, "gzip")
    blob = gz.blob_path(gz.layers[1]["digest"]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        member = tar.extractfile("data/SHA256SUMS")
        assert member is not None
        text = member.read().decode()
    return {path: digest for digest, path in (line.split() for line in text.splitlines())}


def test_save_and_push_of_a_lazily_pulled_image(
    registry: RegistryHandle,  # noqa: F811
    esgz_images: dict[str, ImageInfo],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """podman reads the layers back through the store (its ``blob`` files): the saved and
    pushed layers must be the eStargz layers' exact content (same DiffIDs).

    podman 4.3.1 (containers/image 5.23) does not reuse the compressed blob of a layer it took
    from an additional layer store: it decompresses ``blob`` and compresses it again, so the
    pushed layer digests differ from the eStargz blobs' (seen with a plain-directory store in
    ``test_static_layer_store_contract``); only the content can be compared."""
    esgz = esgz_images["estargz"]
    repo = _repo(request)
    push_image(esgz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    with lazy_env(tmp_path, registry) as lazy:
        lazy.podman.pull(ref)
        assert lazy.store_links(ref) == [True, True]
        _check_save_and_push(lazy.podman, ref, esgz, registry, repo, same_blobs=False)


def test_private_registry_with_auth_file(
    registry_htpasswd: RegistryHandle,  # noqa: F811
    esgz_images: dict[str, ImageInfo],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """htpasswd registry; credentials in an auth.json given as REGISTRY_AUTH_FILE to podman and
    to the daemon. A daemon without them cannot serve the layers, and podman falls back to an
    ordinary pull (which is what proves the daemon used the file)."""
    reg = registry_htpasswd
    assert reg.username and reg.password
    esgz = esgz_images["estargz"]
    repo = _repo(request)
    push_image(esgz, _client(reg), repo, "v1")
    ref = f"{reg.host}/{repo}:v1"
    authfile = write_auth_json(tmp_path / "auth.json", {reg.host: (reg.username, reg.password)})

    with lazy_env(tmp_path / "with", reg, store_auth=authfile, podman_auth=authfile) as lazy:
        lazy.podman.pull(ref)
        assert lazy.store_links(ref) == [True, True], lazy.links()
        assert lazy.podman.run(ref).strip() == CHECK_OK
        log = lazy.daemon.log_tail(1 << 20)
        assert reg.password not in log, "the daemon logged the registry password"

    with lazy_env(tmp_path / "without", reg, podman_auth=authfile) as lazy:
        lazy.podman.pull(ref)
        assert lazy.store_links(ref) == [False, False], lazy.links()
        assert lazy.podman.run(ref).strip() == CHECK_OK


def test_estargz_image_pulls_without_the_store(
    registry: RegistryHandle,  # noqa: F811
    esgz_images: dict[str, ImageInfo],
    podmans: list[Podman],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A converted image stays an ordinary gzip image: podman without the store pulls and runs
    it (containers/image checks every layer's DiffID while it pulls)."""
    esgz = esgz_images["estargz"]
    repo = _repo(request)
    push_image(esgz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    podman = Podman(tmp_path / "podman", insecure=[registry.host])
    podmans.append(podman)
    podman.pull(ref)
    assert podman.layer_diff_links() == {}
    assert podman.run(ref).strip() == CHECK_OK
    # The landmark and TOC files are ordinary files of the layers, visible without the store.
    assert "stargz.index.json" in podman.run(ref, "ls", "-a", "/").split()


def test_skopeo_copy_preserves_estargz_blobs(
    registry: RegistryHandle,  # noqa: F811
    esgz_images: dict[str, ImageInfo],
    request: pytest.FixtureRequest,
) -> None:
    """``skopeo copy --preserve-digests`` (skopeo 1.9) keeps a converted image byte for byte:
    how users push what ``stargz-store convert`` wrote to an OCI layout. (skopeo as root writes
    containers/image's blob-info cache below /var/lib/containers/cache, as podman does.)"""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (./run setup installs it)")
    esgz = esgz_images["estargz"]
    repo = _repo(request)
    skopeo_push(esgz.layout, esgz.tag, f"{registry.host}/{repo}:v1")
    got = registry_diff_ids(_client(registry), repo, "v1")
    assert got["manifest_digest"] == esgz.manifest_digest
    assert got["layer_digests"] == [layer["digest"] for layer in esgz.layers]
    assert got["manifest"]["layers"][0]["annotations"] == esgz.layers[0]["annotations"]


def test_lazy_pull_fetches_only_what_is_read(
    esgz_images: dict[str, ImageInfo], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Without background filling, starting a container that reads only busybox makes the
    store fetch far less than the image, and podman itself fetches no layer at all. Measured
    on the registry's side (its access log: bytes per request and user agent), so this needs a
    registry of our own rather than the shared fixture (whose access log is off)."""
    need_podman()
    big = build_test_image(
        tmp_path_factory.mktemp("big"), "gzip", data_size=4 << 20, data_files=3, seed=7
    )
    esgz = convert_image(big, "estargz")
    with LoopbackRegistry(tmp_path / "registry") as reg:
        push_image(esgz, reg, "e2e/lazy-bytes", "v1")
        ref = f"{reg.host}/e2e/lazy-bytes:v1"
        podman = Podman(
            tmp_path / "podman", layer_store=tmp_path / "daemon" / "store", insecure=[reg.host]
        )
        daemon = StoreDaemon(
            tmp_path / "daemon",
            registries_conf=podman.registries_conf,
            insecure=[reg.host],
            background_fetch=False,
        )
        try:
            daemon.start()
            mark = len(reg.requests())
            podman.pull(ref)
            assert podman.run(ref, "echo", "hello").strip() == "hello"
            requests = [r for r in reg.requests()[mark:] if r.is_blob_get]
        finally:
            podman.cleanup()
            daemon.stop()
    layer_digests = {layer["digest"] for layer in esgz.layers}
    by_podman = [r for r in requests if r.agent.startswith("containers/")]
    assert {r.digest for r in by_podman} == {esgz.config_digest}, by_podman
    by_store = sum(r.size for r in requests if r.digest in layer_digests)
    data_layer = esgz.layers[1]["size"]
    assert 0 < by_store < data_layer // 4, (by_store, data_layer)


def test_prioritized_files_are_prefetched_at_pull(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``stargz-store convert --prioritized-files`` puts a file before the prefetch landmark;
    the store fetches it as soon as podman looks the layer up, before any container reads it.
    The same image converted without the list is the control: nothing of its data is fetched.
    Background filling is off, so only the landmark prefetch can fetch data."""
    need_podman()
    size = 2 << 20
    big = build_test_image(
        tmp_path_factory.mktemp("prio"), "gzip", data_size=size, data_files=3, seed=11
    )
    plain = convert_image(big, "estargz")
    prio_list = tmp_path / "prioritized.txt"
    prio_list.write_text("/data/file1.bin\n")
    prio = convert_image(big, "prio", "--prioritized-files", str(prio_list))
    assert prio.layers[1]["digest"] != plain.layers[1]["digest"]
    with LoopbackRegistry(tmp_path / "registry") as reg:
        push_image(plain, reg, "e2e/prio", "control")
        push_image(prio, reg, "e2e/prio", "prio")
        podman = Podman(
            tmp_path / "podman", layer_store=tmp_path / "daemon" / "store", insecure=[reg.host]
        )
        daemon = StoreDaemon(
            tmp_path / "daemon",
            registries_conf=podman.registries_conf,
            insecure=[reg.host],
            background_fetch=False,
        )

        def fetched(digest: str) -> int:
            return sum(r.size for r in reg.requests() if r.is_blob_get and r.digest == digest)

        try:
            daemon.start()
            podman.pull(f"{reg.host}/e2e/prio:control")
            podman.pull(f"{reg.host}/e2e/prio:prio")
            deadline = time.monotonic() + 30
            while fetched(prio.layers[1]["digest"]) < size and time.monotonic() < deadline:
                time.sleep(0.2)
            prio_bytes = fetched(prio.layers[1]["digest"])
            control_bytes = fetched(plain.layers[1]["digest"])
        finally:
            podman.cleanup()
            daemon.stop()
    assert size <= prio_bytes < 2 * size, prio_bytes
    assert control_bytes < size // 2, control_bytes


DEMO_ROWS = (
    "image size (compressed)",
    "bytes over the WAN link",
    "layer bytes from registry",
    "fetched by podman",
    "fetched by the store",
    "pull time",
    "pull + run time",
    "graphroot disk usage",
)


def test_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    """``./run demo`` end to end through the WAN emulator (small assets), leaving nothing
    behind: the comparison table has both columns, a value in each for every line, and every
    line is explained under it. (Which side wins is for the demo's reader, not a test: the
    assets here are small and the machine may be busy.)"""
    need_podman()
    out = subprocess.run(
        [sys.executable, "-m", "testbed.demo", "--data-mib", "2", "--rtt-ms", "10",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=500, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "hello from the container" in text
    assert "2 of 2 layers served by the store" in text
    assert "through the WAN emulator (10 ms round trip, 150 Mbit/s)" in text
    header = next(line for line in text.splitlines() if "lazy (eStargz + store)" in line)
    assert "full pull (gzip)" in header
    lines = text.splitlines()
    for row in DEMO_ROWS:
        values = [line for line in lines if line.strip().startswith(row + "  ")]
        assert len(values) == 1, (row, text)
        cells = re.findall(r"\d+\.\d\d (?:MiB|s)|(?<= )-(?= |$)", values[0].strip()[len(row) :])
        assert len(cells) == 2, (row, values[0])  # a value in both columns
        legend = [line for line in lines if line.strip().startswith(row + ":")]
        assert len(legend) == 1 and len(legend[0].split(":", 1)[1].strip()) > 10, (row, text)
    podman_row = next(line for line in lines if line.strip().startswith("fetched by podman  "))
    assert podman_row.split()[3:5] == ["0.00", "MiB"], podman_row  # all served by the store
    assert list(tmp_path.iterdir()) == []
    assert not mounts_below(str(tmp_path.resolve()))
