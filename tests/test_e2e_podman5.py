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

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from testbed import StoreDaemon, store_config_toml, write_auth_json
from testbed.podman5 import (
    Podman5,
    TrixieChroot,
    chroot_problem,
    inside,
    mounts_below,
    store_daemon,
    sweep_stale_sessions,
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

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
DATA_SIZE = 512 * 1024
DATA_FILES = 3


def _busybox_sha256() -> str:
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
    """``make(reg, auth_helper=False, credentials=None, store=True, share=None,
    negative_timeout=None)``: a podman 5.4 with a store daemon of its own (none with
    ``store=False``, ``share``'s with ``share``). At teardown: podman cleaned up first (its overlays
    use the store's mount), then the daemon stopped (exit status 0 and no mount left), then the
    chroot's mounts checked to be the session's set again."""
    stack = ExitStack()
    statuses: list[tuple[StoreDaemon, int | None]] = []

    def factory(
        reg: RegistryHandle,
        *,
        auth_helper: bool = False,
        credentials: tuple[str, str] | None = None,
        store: bool = True,
        share: Lazy | None = None,
        negative_timeout: float | None = None,
    ) -> Lazy:
        name = trixie.new_name()
        if share is not None:
            daemon = share.daemon
        else:
            registries_conf = trixie.host_path(f"/var/lib/stargz-store/{name}/registries.conf")
            config_text = None
            if negative_timeout is not None:
                config_text = (
                    store_config_toml(
                        registries_conf=registries_conf,
                        registries_conf_d=trixie.work / (name + "d") / "registries.conf.d",
                        insecure=[reg.host],
                    )
                    + f"[fuse]\nnegative_timeout = {negative_timeout}\n"
                )
            daemon = store_daemon(
                trixie,
                name + "d",
                registries_conf=registries_conf,
                insecure=[reg.host],
                config_text=config_text,
            )
        where = inside(trixie, daemon)
        podman = Podman5(
            trixie,
            name,
            layer_store=where["mountpoint"] if store else None,
            insecure=[reg.host],
            auth_helper="stargz-store-helper" if auth_helper else None,
            helper_socket=where["socket"] if auth_helper else None,
        )
        if credentials is not None:
            # An auth.json inside the chroot, for podman only (the daemon's is empty).
            write_auth_json(podman.workdir / "auth.json", {reg.host: credentials})
            podman.authfile = f"{podman.inside}/auth.json"
        if store and share is None:
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
        for lazy in lazies:
            sys.stderr.write(f"--- daemon log {lazy.daemon.workdir.name} ---\n")
            sys.stderr.write(lazy.daemon.log_tail(8000) + "\n")
        raise


def _check_lazy_pull(lazy: Lazy, ref: str, image: ImageInfo) -> None:
    """Every layer of ``ref`` is a symlink into the store, the graphroot holds less than one data
    file, and the lookups were by TOC digest."""
    assert lazy.podman.store_links(ref) == [True] * len(image.layers), (
        lazy.podman.layer_diff_links()
    )
    assert lazy.podman.graphroot_usage() < DATA_SIZE, lazy.podman.graphroot_usage()
    _check_toc_lookups(lazy, image)


def _check_toc_lookups(lazy: Lazy, image: ImageInfo) -> None:
    """The store resolved every layer by its TOC digest, and was never asked for a compressed
    digest."""
    toc_digests = {
        layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"] for layer in image.layers
    }
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


def test_chroot_is_read_only_and_a_killed_session_is_swept(trixie: TrixieChroot) -> None:
    """The cached tree is shared by every session of the machine: it is mounted read-only. A
    session killed before its clean-up leaves its mounts (recursive binds of /dev and /sys
    among them); the next session unmounts and deletes them."""
    with pytest.raises(OSError) as err:
        (trixie.root / "etc" / "stargz-test").write_text("x")
    assert err.value.errno == errno.EROFS
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from testbed.podman5 import TrixieChroot\n"
            "c = TrixieChroot().start()\n"
            "print(c.base, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        base = Path(child.stdout.readline().strip())
        assert base.name.startswith("sgz5-")
        assert {str(base / "root" / "dev"), str(base / "root" / "sys")} <= set(
            mounts_below(str(base))
        )
    finally:
        child.kill()
        child.wait()
    assert base in sweep_stale_sessions()
    assert not mounts_below(str(base)) and not base.exists()
    assert trixie.base.exists()  # a live session is left alone
    trixie.check_clean()


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


def test_auth_helper_hands_podmans_credentials_to_the_store(
    make: Maker,
    registry_htpasswd: RegistryHandle,  # noqa: F811
    esgz: ImageInfo,
    request: pytest.FixtureRequest,
) -> None:
    """htpasswd registry; the credentials are in an auth.json for podman only, and the daemon's
    credential chain is empty. With ``additional-layer-store-auth-helper`` (our
    ``stargz-store-helper``, reaching the daemon's socket through the chroot) podman hands
    them over and every layer comes from the store; without it, the daemon cannot read the
    registry and podman pulls every layer itself."""
    reg = registry_htpasswd
    assert reg.username and reg.password
    creds = (reg.username, reg.password)
    repo = _repo(request)
    push_image(esgz, _client(reg), repo, "v1")
    ref = f"{reg.host}/{repo}:v1"

    without = make(reg, credentials=creds)
    with daemon_log_on_failure(without):
        assert json.loads(without.daemon.authfile.read_text()) == {"auths": {}}
        without.podman.pull(ref)
        assert without.podman.store_links(ref) == [False, False]
        assert without.podman.run(ref).strip() == CHECK_OK
        assert not _helper_deliveries(without)
        failed = without.events("layer_lookup_failed")
        assert failed and all(rec.get("error_type") == "AuthenticationError" for rec in failed), (
            failed
        )

    lazy = make(reg, credentials=creds, auth_helper=True)
    with daemon_log_on_failure(lazy):
        assert json.loads(lazy.daemon.authfile.read_text()) == {"auths": {}}
        lazy.podman.pull(ref)
        _check_lazy_pull(lazy, ref, esgz)
        assert lazy.podman.run(ref).strip() == CHECK_OK
        assert len(_helper_deliveries(lazy)) >= 1
        log = lazy.daemon.log_tail(1 << 24)
        assert reg.password not in log, "the daemon logged the registry password"


def test_helper_credentials_override_a_recent_auth_failure(
    make: Maker,
    registry_htpasswd: RegistryHandle,  # noqa: F811
    esgz: ImageInfo,
    request: pytest.FixtureRequest,
) -> None:
    """Two podmans on one store: the first has no auth helper configured, so the store's lookups
    fail (no credentials) and that podman pulls the layers itself; the second pulls the same
    image right after with the helper, which hands the store the credentials before any
    lookup. The store serves the layers: the failed lookups were remembered (the manager, the
    FUSE adapter, the kernel's negative dentries; ``[fuse] negative_timeout``, 60 s here so the
    test does not depend on timing) and are forgotten when the credentials arrive."""
    reg = registry_htpasswd
    assert reg.username and reg.password
    creds = (reg.username, reg.password)
    repo = _repo(request)
    push_image(esgz, _client(reg), repo, "v1")
    ref = f"{reg.host}/{repo}:v1"
    first = make(reg, credentials=creds, negative_timeout=60)
    with daemon_log_on_failure(first):
        first.podman.pull(ref)
        assert first.podman.store_links(ref) == [False, False]
        second = make(reg, credentials=creds, auth_helper=True, share=first)
        second.podman.pull(ref)
        assert len(_helper_deliveries(second)) >= 1
        assert second.podman.store_links(ref) == [True, True], second.podman.layer_diff_links()


def _helper_deliveries(lazy: Lazy) -> list[str]:
    """The daemon's log lines saying credentials arrived through the auth-helper channel."""
    pattern = re.compile(r"auth.helper.credentials.received", re.IGNORECASE)
    return [line for line in lazy.daemon.log_tail(1 << 24).splitlines() if pattern.search(line)]


def test_save_and_push_of_a_lazily_pulled_image(
    make: Maker,
    registry: RegistryHandle,  # noqa: F811
    esgz: ImageInfo,
    request: pytest.FixtureRequest,
) -> None:
    """podman 5.4 reads the store's layers back for ``save`` (both archive formats) and
    ``push``: the layers' content must be the eStargz layers' exact content (same DiffIDs,
    recomputed from the bytes). The pushed copy is then pulled by a podman without the store
    (every layer fetched and checked by containers/image) and run."""
    repo = _repo(request)
    push_image(esgz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    copy = f"{registry.host}/{repo}-copy:v1"
    lazy = make(registry)
    with daemon_log_on_failure(lazy):
        lazy.podman.pull(ref)
        _check_lazy_pull(lazy, ref, esgz)
        for fmt in ("docker-archive", "oci-archive"):
            archive = lazy.podman.save(ref, f"{lazy.podman.inside}/saved-{fmt}.tar", fmt)
            config_ids, blob_ids = archive_layer_diff_ids(archive)
            assert config_ids == esgz.diff_ids, fmt
            assert blob_ids == esgz.diff_ids, fmt
            archive.unlink()
        lazy.podman.push(ref, copy)
        got = registry_diff_ids(_client(registry), f"{repo}-copy", "v1")
        assert got["config_diff_ids"] == esgz.diff_ids
        assert got["blob_diff_ids"] == esgz.diff_ids
        # Still lazy after save and push: nothing of the layers was copied into the graphroot.
        assert lazy.podman.store_links(ref) == [True, True]
        assert lazy.podman.graphroot_usage() < DATA_SIZE

    full = make(registry, store=False)
    full.podman.pull(copy)
    assert full.podman.layer_diff_links() == {}
    assert full.podman.graphroot_usage() > DATA_SIZE * DATA_FILES
    assert full.podman.run(copy).strip() == CHECK_OK
    assert full.podman.run(copy, "sha256sum", "/bin/busybox").split()[0] == _busybox_sha256()


def test_build_from_an_estargz_image(
    make: Maker,
    registry: RegistryHandle,  # noqa: F811
    esgz: ImageInfo,
    request: pytest.FixtureRequest,
) -> None:
    """``podman build`` FROM an eStargz image pulls the base through the store (TOC keys, no
    layer fetched by podman); a COPY and a RUN (which reads every data file of the base through
    the store) add layers; the result runs and prints the right things.

    podman 5.4 quirk, not the store's: at commit, buildah cannot reuse base layers that
    containers/image identified by TOC digest (their DiffID is "untrusted", by design, and the
    store's TOC-scheme ``info`` carries it only as ``expected-layer-diffid``, as the Go store's
    does), so it copies them into the graphroot, reading them through the store's ``blob``
    files (each verified by the store against its digest). The base image stays lazy; the built
    image's layers are all real directories."""
    repo = _repo(request)
    push_image(esgz, _client(registry), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    lazy = make(registry)
    podman = lazy.podman
    ctx = podman.workdir / "context"
    ctx.mkdir()
    (ctx / "added.txt").write_text("added by podman build\n")
    (ctx / "Containerfile").write_text(
        f"FROM {ref}\n"
        "COPY added.txt /added.txt\n"
        "RUN /data/check.sh > /check.out && sha256sum /bin/busybox >> /check.out\n"
        'CMD ["/bin/sh", "-c", "cat /added.txt /check.out"]\n'
    )
    built = "localhost/p5/built:v1"
    with daemon_log_on_failure(lazy):
        podman.run_podman(
            "build", "--tls-verify=false", "--network", "none", "--tag", built,
            f"{podman.inside}/context",
        )  # fmt: skip
        assert podman.store_links(ref) == [True, True], podman.layer_diff_links()
        _check_toc_lookups(lazy, esgz)
        out = podman.run(built).splitlines()
        assert out[:2] == ["added by podman build", CHECK_OK]
        assert out[2].split()[0] == _busybox_sha256()
        # The quirk: the built image's base layers are copies, made from the store's blobs.
        assert podman.store_links(built) == [False, False, False, False]
        verified = {rec.get("digest") for rec in lazy.events("blob_spooled")}
        assert {layer["digest"] for layer in esgz.layers} <= verified
        assert podman.graphroot_usage() > DATA_SIZE * DATA_FILES
