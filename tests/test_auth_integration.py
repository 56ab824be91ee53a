"""Credentials end to end, against the real ``docker-registry`` (htpasswd Basic and Bearer
tokens): every containers-auth.json(5) location, credential helpers, extra files, the podman
auth-helper channel, ``stargz-store convert`` with ``docker://`` and the daemon.

Logging runs at DEBUG here so that the secret guard (tests/secret_guard.py) sees the most the
code can log; every password used here is registered with it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth.authfile import AuthEnvironment
from auth.helper_channel import HelperChannelServer
from auth.store import CredentialStore
from layerstore.errors import AuthenticationError
from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from layerstore.registry.client import RegistryClient, RegistrySettings
from layerstore.registry.registries_conf import RegistriesConf
from tests import fuse_util as fu
from tests import secret_guard
from tests.estargz_util import build_blob
from tests.faultserver import FakeRegistry, FaultServer
from tests.registry_fixtures import (  # noqa: F401 - fixtures
    PushedImage,
    RegistryHandle,
    gzip_tar,
    registry,
    registry_htpasswd,
    registry_token,
)

pytestmark = [pytest.mark.registry, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WRONG = "Wrong-Password-5f3a9c"
secret_guard.register(WRONG, "wrong password")

LOCATIONS = [
    "REGISTRY_AUTH_FILE",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "HOME/.config",
    "DOCKER_CONFIG",
    "HOME/.docker",
    "HOME/.dockercfg",
    "credHelpers",
    "extra file",
]


@pytest.fixture(autouse=True)
def debug_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")  # other tests may have quietened it


def layer(seed: int, n: int = 6) -> bytes:
    rnd = random.Random(seed)
    return gzip_tar({f"f{i}": rnd.randbytes(3000) for i in range(n)})


@pytest.fixture(scope="module")
def handles(
    registry_htpasswd: RegistryHandle,  # noqa: F811
    registry_token: RegistryHandle,  # noqa: F811
) -> dict[str, RegistryHandle]:
    return {"htpasswd": registry_htpasswd, "token": registry_token}


@pytest.fixture(scope="module")
def images(handles: dict[str, RegistryHandle]) -> dict[str, PushedImage]:
    out = {}
    for name, h in handles.items():
        out[name] = h.push_image("auth/app", "v1", [layer(1), layer(2, 3)])
        h.push_image("auth/other", "v1", [layer(3, 2)])
    return out


def b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def confined_env(tmp_path: Path) -> dict[str, str]:
    """HOME and XDG_RUNTIME_DIR in tmp_path: the machine's own auth files are never read."""
    home, run = tmp_path / "home", tmp_path / "run"
    home.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "XDG_RUNTIME_DIR": str(run)}


def client_for(store: object, *hosts: str, registries: object = None) -> RegistryClient:
    settings = RegistrySettings(insecure_registries=frozenset(hosts), retries=0)
    return RegistryClient(store, registries, settings=settings)  # type: ignore[arg-type]


def check_pull(client: RegistryClient, h: RegistryHandle, img: PushedImage) -> None:
    """Resolve the image and read a byte range of its first layer through *client*."""
    r = client.resolve(h.ref("auth/app", "v1"))
    assert r.manifest_digest == img.manifest_digest
    data = img.layers[0]
    src = client.blob_source(r, img.layer_digests[0], len(data))
    assert src.read_at(100, 257) == data[100:357]
    assert src.read_ranges([(0, 4), (len(data) - 9, 9)]) == [data[:4], data[-9:]]


def place_credentials(
    location: str,
    tmp_path: Path,
    host: str,
    user: str,
    password: str,
    monkeypatch: pytest.MonkeyPatch,
) -> CredentialStore:
    """Put ``user:password`` for *host* in exactly one *location*; the store that finds it."""
    env = confined_env(tmp_path)
    home, run = Path(env["HOME"]), Path(env["XDG_RUNTIME_DIR"])
    doc: dict[str, object] = {"auths": {host: {"auth": b64(user, password)}}}
    extra: list[Path] = []
    if location == "REGISTRY_AUTH_FILE":
        path = tmp_path / "custom" / "my-auth.json"
        env["REGISTRY_AUTH_FILE"] = str(path)
    elif location == "XDG_RUNTIME_DIR":
        path = run / "containers" / "auth.json"
    elif location == "XDG_CONFIG_HOME":
        env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
        path = tmp_path / "xdg-config" / "containers" / "auth.json"
    elif location == "HOME/.config":
        path = home / ".config" / "containers" / "auth.json"
    elif location == "DOCKER_CONFIG":
        env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
        path = tmp_path / "docker-config" / "config.json"
    elif location == "HOME/.docker":
        path = home / ".docker" / "config.json"
    elif location == "HOME/.dockercfg":
        path = home / ".dockercfg"
        doc = {host: {"auth": b64(user, password), "email": ""}}  # the legacy format
    elif location == "credHelpers":
        path = home / ".docker" / "config.json"
        doc = {"auths": {host: {}}, "credHelpers": {host: "stargztest"}}
        bindir = tmp_path / "bin"
        bindir.mkdir()
        helper = bindir / "docker-credential-stargztest"
        answer = json.dumps({"ServerURL": host, "Username": user, "Secret": password})
        helper.write_text(
            "#!/bin/sh\n"
            '[ "$1" = get ] || exit 2\n'
            "read -r server\n"
            f"if [ \"$server\" = \"{host}\" ]; then printf '%s' '{answer}'; exit 0; fi\n"
            'echo "credentials not found in native keychain"; exit 1\n'
        )
        helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    elif location == "extra file":
        path = tmp_path / "kubelet" / "config.json"
        extra.append(path)
    else:  # pragma: no cover
        raise AssertionError(location)
    write_json(path, doc)
    return CredentialStore(AuthEnvironment(env=env, uid=0, home=env["HOME"]), extra_files=extra)


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
@pytest.mark.parametrize("location", LOCATIONS)
def test_credentials_from_each_location(
    location: str,
    kind: str,
    tmp_path: Path,
    handles: dict[str, RegistryHandle],
    images: dict[str, PushedImage],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = handles[kind]
    assert h.username and h.password
    store = place_credentials(location, tmp_path, h.host, h.username, h.password, monkeypatch)
    with client_for(store, h.host) as client:
        check_pull(client, h, images[kind])
    assert store.errors() == []
    # without that file: no credentials, and the registry says so
    anonymous = CredentialStore(AuthEnvironment(env=confined_env(tmp_path / "none"), uid=0))
    with pytest.raises(AuthenticationError) as info, client_for(anonymous, h.host) as client:
        client.resolve(h.ref("auth/app", "v1"))
    assert h.host in str(info.value)


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_repository_keys_win_over_host_keys(
    kind: str, tmp_path: Path, handles: dict[str, RegistryHandle], images: dict[str, PushedImage]
) -> None:
    h = handles[kind]
    assert h.username and h.password
    right, wrong = {"auth": b64(h.username, h.password)}, {"auth": b64(h.username, WRONG)}
    cases = [
        # (auths, repository -> pulls?)
        ({h.host: wrong, f"{h.host}/auth/app": right}, {"auth/app": True, "auth/other": False}),
        ({h.host: wrong, f"{h.host}/auth": right}, {"auth/app": True, "auth/other": True}),
        ({h.host: right, f"{h.host}/auth/other": wrong}, {"auth/app": True, "auth/other": False}),
    ]
    for i, (auths, expected) in enumerate(cases):
        env = confined_env(tmp_path)
        env["REGISTRY_AUTH_FILE"] = str(write_json(tmp_path / f"auth{i}.json", {"auths": auths}))
        store = CredentialStore(AuthEnvironment(env=env, uid=0, home=env["HOME"]))
        for repo, ok in expected.items():
            with client_for(store, h.host) as client:
                if ok:
                    assert client.resolve(h.ref(repo, "v1")).manifest.layers, (i, repo)
                else:
                    with pytest.raises(AuthenticationError, match="refused"):
                        client.resolve(h.ref(repo, "v1"))
    with client_for(store, h.host) as client:
        check_pull(client, h, images[kind])


def assert_no_secret(text: str, h: RegistryHandle) -> None:
    assert h.password and h.username
    for secret in (WRONG, h.password, b64(h.username, WRONG), b64(h.username, h.password)):
        assert secret not in text


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_wrong_password_is_a_clear_error_without_the_secret(
    kind: str, tmp_path: Path, handles: dict[str, RegistryHandle], images: dict[str, PushedImage]
) -> None:
    h = handles[kind]
    assert h.username
    env = confined_env(tmp_path)
    auths = {h.host: {"auth": b64(h.username, WRONG)}}
    env["REGISTRY_AUTH_FILE"] = str(write_json(tmp_path / "auth.json", {"auths": auths}))
    store = CredentialStore(AuthEnvironment(env=env, uid=0, home=env["HOME"]))
    with client_for(store, h.host) as client, pytest.raises(AuthenticationError) as info:
        client.resolve(h.ref("auth/app", "v1"))
    msg = str(info.value)
    assert h.host in msg and "refused" in msg and "auth/app" in msg, msg
    assert_no_secret(msg + repr(info.value), h)


def run_helper(socket_path: Path, payload: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(BIN / "stargz-store-helper"), "--socket", str(socket_path)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=30,
    )
    secret_guard.record_output(r.stderr, "stargz-store-helper stderr")
    return r


@pytest.fixture
def helper_store(tmp_path: Path) -> Iterator[tuple[CredentialStore, Path]]:
    """A CredentialStore without any auth file, fed by a running helper channel."""
    store = CredentialStore(AuthEnvironment(env=confined_env(tmp_path), uid=0))
    sock = tmp_path / "auth-helper.sock"
    with HelperChannelServer(sock, store):
        yield store, sock


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_helper_channel_credentials(
    kind: str,
    helper_store: tuple[CredentialStore, Path],
    handles: dict[str, RegistryHandle],
    images: dict[str, PushedImage],
) -> None:
    store, sock = helper_store
    h = handles[kind]
    with client_for(store, h.host) as client, pytest.raises(AuthenticationError):
        client.resolve(h.ref("auth/app", "v1"))  # nothing known yet
    payload = {
        h.ref("auth/app", "v1"): {"username": h.username, "password": h.password},
        "127.0.0.1:1/anonymous/pull:v1": {},
    }
    r = run_helper(sock, payload)
    assert r.returncode == 0, r.stderr
    with client_for(store, h.host) as client:
        check_pull(client, h, images[kind])
    # a malformed payload: a warning and exit status 1, the secret not repeated
    r = run_helper(sock, {"not a reference": {"password": WRONG}})
    assert r.returncode == 1 and "stargz-store-helper: warning" in r.stderr
    assert WRONG not in r.stderr


def test_helper_credentials_not_sent_to_a_mirror(
    tmp_path: Path,
    helper_store: tuple[CredentialStore, Path],
    registry_htpasswd: RegistryHandle,  # noqa: F811
    images: dict[str, PushedImage],
) -> None:
    """registries.conf puts a mirror on 127.0.0.2 in front of the htpasswd registry; podman
    pulled from the registry itself, so only that host gets the helper's credentials."""
    store, sock = helper_store
    h = registry_htpasswd
    with FaultServer("127.0.0.2") as mirror:
        FakeRegistry(mirror, auth="basic")  # challenges for Basic credentials, has no images
        conf = RegistriesConf.from_string(
            f'[[registry]]\nlocation = "{h.host}"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror.netloc}"\ninsecure = true\n'
        )
        payload = {h.ref("auth/app", "v1"): {"username": h.username, "password": h.password}}
        assert run_helper(sock, payload).returncode == 0
        with client_for(store, h.host, mirror.netloc, registries=conf) as client:
            check_pull(client, h, images["htpasswd"])
        assert mirror.requests, "the mirror was tried first"
        assert all(r.header("Authorization") is None for r in mirror.requests)


def test_helper_credentials_not_sent_to_redirect_target(
    helper_store: tuple[CredentialStore, Path],
) -> None:
    """A registry (127.0.0.1) redirecting blobs to storage on 127.0.0.2: the storage host sees
    no Authorization header, only the signed URL."""
    store, sock = helper_store
    with FaultServer("127.0.0.1") as srv, FaultServer("127.0.0.2") as storage:
        reg = FakeRegistry(srv, auth="basic", redirect_blobs_to=storage)
        data = layer(7)
        digest, _ = reg.add_image("v1", [data])
        ref = f"{srv.netloc}/auth/redirect:v1"
        payload = {ref: {"username": reg.username, "password": reg.password}}
        assert run_helper(sock, payload).returncode == 0
        with client_for(store, srv.netloc, storage.netloc) as client:
            r = client.resolve(ref)
            assert r.manifest_digest == digest
            layer_digest = r.manifest.layers[0].digest
            src = client.blob_source(r, layer_digest, len(data))
            assert src.read_at(50, 500) == data[50:550]
        assert any(r.header("Authorization") == reg.basic_header() for r in srv.requests)
        assert storage.requests, "the blob came from the storage host"
        assert all(r.header("Authorization") is None for r in storage.requests)


# --- stargz-store convert with docker:// ---------------------------------------------------------
def convert(
    tmp_path: Path, src: str, dst: str, authfile: Path | None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **confined_env(tmp_path))
    for name in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_CONFIG_HOME"):
        env.pop(name, None)
    if authfile is not None:
        env["REGISTRY_AUTH_FILE"] = str(authfile)
    r = subprocess.run(
        [
            str(BIN / "stargz-store"), "convert", "--src-tls-verify=false",
            "--dest-tls-verify=false", f"docker://{src}", f"docker://{dst}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    secret_guard.record_output(r.stderr + r.stdout, "stargz-store convert output")
    return r


def check_converted(client: RegistryClient, ref: str, source: PushedImage) -> None:
    r = client.resolve(ref)
    assert len(r.manifest.layers) == len(source.layers)
    for desc in r.manifest.layers:
        assert desc.annotations.get(TOC_DIGEST_ANNOTATION, "").startswith("sha256:")
    data = client.get_blob(ref, r.manifest.layers[0].digest, 1 << 24)
    assert data[:2] == b"\x1f\x8b"


def test_convert_anonymous(tmp_path: Path, registry: RegistryHandle) -> None:  # noqa: F811
    img = registry.push_image("conv/src", "v1", [layer(11), layer(12, 2)])
    r = convert(tmp_path, registry.ref("conv/src", "v1"), registry.ref("conv/dst", "esgz"), None)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    with client_for(None, registry.host) as client:
        check_converted(client, registry.ref("conv/dst", "esgz"), img)


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_convert_authenticated_and_wrong_password(
    kind: str, tmp_path: Path, handles: dict[str, RegistryHandle]
) -> None:
    h = handles[kind]
    assert h.username and h.password
    img = h.push_image("conv/src", "v1", [layer(13), layer(14, 2)])
    src, dst = h.ref("conv/src", "v1"), h.ref("conv/dst", f"esgz-{kind}")
    good = write_json(
        tmp_path / "auth.json", {"auths": {h.host: {"auth": b64(h.username, h.password)}}}
    )
    r = convert(tmp_path, src, dst, good)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert_no_secret(r.stderr + r.stdout, h)
    store = CredentialStore(AuthEnvironment(env={"REGISTRY_AUTH_FILE": str(good)}, uid=0))
    with client_for(store, h.host) as client:
        check_converted(client, dst, img)

    bad = write_json(tmp_path / "bad.json", {"auths": {h.host: {"auth": b64(h.username, WRONG)}}})
    r = convert(tmp_path, src, h.ref("conv/dst", "never"), bad)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("stargz-store convert: "), r.stderr
    assert h.host in lines[-1] and "refused" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert_no_secret(r.stderr + r.stdout, h)


# --- the daemon ----------------------------------------------------------------------------------
def push_estargz(h: RegistryHandle, repo: str) -> tuple[str, str, bytes, int]:
    """An eStargz image in *repo*: (reference, layer digest, content of data/big, blob size)."""
    content = random.Random(5).randbytes(70_000)
    built = build_blob(
        [("etc/motd", b"lazy and authenticated\n"), ("data/big", content)], chunk_size=16384
    )
    ann = {
        TOC_DIGEST_ANNOTATION: built.toc_digest,
        UNCOMPRESSED_SIZE_ANNOTATION: str(len(gzip.decompress(built.blob))),
    }
    img = h.push_image(repo, "v1", [built.blob], layer_annotations=[ann])
    return h.ref(repo, "v1"), img.layer_digests[0], content, len(built.blob)


@contextlib.contextmanager
def store_daemon(
    tmp_path: Path, h: RegistryHandle, env: dict[str, str], config_extra: str = ""
) -> Iterator[tuple[Path, Path]]:
    """The real daemon (``python -m stargz_store``) on tmp_path/mnt with --root tmp_path/root,
    the registry insecure, debug logs in tmp_path/daemon.log (checked for secrets).
    Yields (mountpoint, log path); stops it with SIGTERM (must exit 0) and unmounts."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[registry]\nregistries_conf = "{tmp_path}/registries.conf"\n'
        f'registries_conf_d = "{tmp_path}/registries.conf.d"\n'
        f'insecure_registries = ["{h.host}"]\nretries = 0\n'
        '[auth]\nextra_auth_files = []\n[log]\nlevel = "debug"\nformat = "json"\n' + config_extra
    )
    mp, log_path = tmp_path / "mnt", tmp_path / "daemon.log"
    mp.mkdir()
    secret_guard.watch_log(log_path, "store daemon log")
    proc_env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    for name in ("DOCKER_CONFIG", "XDG_CONFIG_HOME", "STARGZ_STORE_PROVIDER_FACTORY"):
        if name not in env:
            proc_env.pop(name, None)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stargz_store", "--config", str(config), "--root",
             str(tmp_path / "root"), str(mp)],
            cwd=REPO, env=proc_env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        fu.wait_mounted(mp, 30, proc)
        yield mp, log_path
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        fu.force_unmount(mp)
    text = log_path.read_text(errors="replace")
    assert_no_secret(text, h)
    assert h.host in text  # the log does talk about the registry


@pytest.mark.fuse
@pytest.mark.skipif(not fu.fuse_available()[0], reason=fu.fuse_available()[1] or "no FUSE")
def test_daemon_serves_a_layer_from_the_htpasswd_registry(
    tmp_path: Path,
    registry_htpasswd: RegistryHandle,  # noqa: F811
) -> None:
    h = registry_htpasswd
    assert h.username and h.password
    ref, digest, content, size = push_estargz(h, "auth/estargz")
    env = confined_env(tmp_path)
    authfile = write_json(
        tmp_path / "auth.json", {"auths": {h.host: {"auth": b64(h.username, h.password)}}}
    )
    env["REGISTRY_AUTH_FILE"] = str(authfile)
    with store_daemon(tmp_path, h, env) as (mp, _log):
        layer_dir = mp / fu.b64(ref) / digest
        diff = layer_dir / "diff"
        assert fu.run_with_timeout(lambda: (diff / "etc" / "motd").read_bytes(), 30) == (
            b"lazy and authenticated\n"
        )
        got = fu.run_with_timeout(lambda: (diff / "data" / "big").read_bytes(), 30)
        assert got == content
        info = json.loads(fu.run_with_timeout(lambda: (layer_dir / "info").read_bytes(), 30))
        assert info["compressed-size"] == size


@pytest.mark.fuse
@pytest.mark.skipif(not fu.fuse_available()[0], reason=fu.fuse_available()[1] or "no FUSE")
def test_helper_credentials_end_a_remembered_lookup_failure(
    tmp_path: Path,
    registry_htpasswd: RegistryHandle,  # noqa: F811
) -> None:
    """The daemon has no credentials: a layer lookup fails (ENOENT), and with
    ``negative_timeout = 60`` the failure is remembered (by the daemon and as the kernel's
    negative dentry). Credentials then arrive through the real ``stargz-store-helper``, as
    podman sends them before a pull: the very next lookup of that image succeeds, while
    another repository's failure stays remembered."""
    h = registry_htpasswd
    assert h.username and h.password
    ref, digest, _, _ = push_estargz(h, "auth/late")
    other_ref, other_digest, _, _ = push_estargz(h, "auth/other")
    env = confined_env(tmp_path)
    with store_daemon(tmp_path, h, env, "[fuse]\nnegative_timeout = 60\n") as (mp, log_path):
        layer_dir = mp / fu.b64(ref) / digest
        other_dir = mp / fu.b64(other_ref) / other_digest
        for d in (layer_dir, other_dir, layer_dir):
            with pytest.raises(FileNotFoundError):
                fu.run_with_timeout(lambda d=d: os.stat(d), 30)  # type: ignore[misc]
        failed = [
            json.loads(line)
            for line in log_path.read_text().splitlines()
            if '"layer_lookup_failed"' in line
        ]
        assert len(failed) == 2, failed  # the third lookup was answered from memory
        assert all(f["error_type"] == "AuthenticationError" for f in failed), failed
        r = run_helper(
            tmp_path / "root" / "auth-helper.sock",
            {ref: {"username": h.username, "password": h.password}},
        )
        assert r.returncode == 0, r.stderr
        motd = fu.run_with_timeout(lambda: (layer_dir / "diff" / "etc" / "motd").read_bytes(), 30)
        assert motd == b"lazy and authenticated\n"
        with pytest.raises(FileNotFoundError):
            fu.run_with_timeout(lambda: os.stat(other_dir), 30)
    text = log_path.read_text()
    assert '"lookup_failures_forgotten"' in text
    assert text.count('"layer_lookup_failed"') == 2
