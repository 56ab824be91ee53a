"""The registry client against a real ``docker-registry`` (anonymous, htpasswd, token auth)."""

from __future__ import annotations

import random
import ssl
from pathlib import Path
from typing import Any

import pytest

from auth.types import Credentials
from layerstore.errors import (
    AuthenticationError,
    ImageReferenceError,
    ManifestError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
    VerificationError,
)
from layerstore.registry import manifest as m
from layerstore.registry.client import PullSource, RegistryClient, RegistrySettings
from layerstore.registry.reference import parse_reference
from layerstore.source import RangeSource
from tests.registry_fixtures import (  # noqa: F401 - fixtures
    DOCKER_MANIFEST,
    PushedImage,
    RegistryHandle,
    gzip_tar,
    registry,
    registry_htpasswd,
    registry_token,
    sha256,
)

pytestmark = pytest.mark.registry


class Creds:
    """A CredentialProvider that records what it was asked."""

    def __init__(self, mapping: dict[str, Credentials]) -> None:
        self.mapping = mapping
        self.calls: list[tuple[str, str]] = []

    def lookup(self, host: str, repository: str) -> Credentials | None:
        self.calls.append((host, repository))
        return self.mapping.get(host)


def client_for(
    handle: RegistryHandle, creds: Creds | None = None, **settings: object
) -> RegistryClient:
    s = RegistrySettings(insecure_registries=frozenset({handle.host}), **settings)  # type: ignore[arg-type]
    return RegistryClient(creds, settings=s)


def layer(seed: int, n: int = 40) -> bytes:
    """A gzip layer of *n* files of incompressible bytes (about n KiB)."""
    rnd = random.Random(seed)
    return gzip_tar({f"file{i}": rnd.randbytes(1000 + i * 37) for i in range(n)})


@pytest.fixture(scope="module")
def image(registry: RegistryHandle) -> PushedImage:  # noqa: F811
    return registry.push_image("test/app", "v1", [layer(1), layer(2, 5)])


def test_resolve_by_tag_and_digest(registry: RegistryHandle, image: PushedImage) -> None:  # noqa: F811
    c = client_for(registry)
    r = c.resolve(registry.ref("test/app", "v1"))
    assert r.manifest_digest == image.manifest_digest == r.digest
    assert r.raw_manifest == image.manifest
    assert r.media_type == m.OCI_MANIFEST
    assert [x.digest for x in r.manifest.layers] == image.layer_digests
    assert [x.size for x in r.manifest.layers] == [len(b) for b in image.layers]
    assert r.config.diff_ids == tuple(image.diff_ids)
    assert r.raw_config == image.config
    assert r.source == PullSource(f"{registry.host}/test/app", insecure=True)
    by_digest = c.resolve(registry.ref("test/app", digest=image.manifest_digest))
    assert by_digest.manifest_digest == image.manifest_digest
    assert by_digest.index_digest is None
    got = c.get_manifest(parse_reference(registry.ref("test/app", "v1")))
    assert got.raw == image.manifest and got.digest == image.manifest_digest


def test_docker_schema2(registry: RegistryHandle) -> None:  # noqa: F811
    img = registry.push_image(
        "test/docker", "d1", [layer(3, 3)], manifest_media_type=DOCKER_MANIFEST
    )
    r = client_for(registry).resolve(registry.ref("test/docker", "d1"))
    assert r.media_type == m.DOCKER_MANIFEST
    assert r.manifest.layers[0].media_type == m.DOCKER_LAYER_GZIP
    assert r.manifest_digest == img.manifest_digest


def test_index_platform_selection(registry: RegistryHandle) -> None:  # noqa: F811
    amd = registry.push_image("test/multi", None, [layer(4, 2)], platform=("linux", "amd64", ""))
    arm = registry.push_image("test/multi", None, [layer(5, 2)], platform=("linux", "arm64", "v8"))
    index_digest, _ = registry.push_index("test/multi", "latest", [amd, arm])
    c = client_for(registry)
    r = c.resolve(registry.ref("test/multi", "latest"), platform="linux/arm64")
    assert r.manifest_digest == arm.manifest_digest
    assert r.index_digest == index_digest
    assert r.index is not None and len(r.index.manifests) == 2
    assert r.config.architecture == "arm64"
    r = c.resolve(registry.ref("test/multi", "latest"), platform="linux/amd64")
    assert r.manifest_digest == amd.manifest_digest
    default = client_for(registry, platform="linux/arm64/v8")
    assert default.resolve(registry.ref("test/multi")).manifest_digest == arm.manifest_digest
    with pytest.raises(ManifestError, match="s390x"):
        c.resolve(registry.ref("test/multi", "latest"), platform="linux/s390x")


def test_blob_source_ranges(registry: RegistryHandle, image: PushedImage) -> None:  # noqa: F811
    c = client_for(registry, max_ranges_per_request=3)
    r = c.resolve(registry.ref("test/app", "v1"))
    data = image.layers[0]
    src = c.blob_source(r, image.layer_digests[0], len(data))
    assert src.size() == len(data)
    assert src.read_at(0, 10) == data[:10]
    assert src.read_at(len(data) - 7, 7) == data[-7:]
    assert src.read_at(0, len(data)) == data
    assert src.read_at(5, 0) == b""
    ranges = [(100, 50), (10, 5), (120, 100), (len(data) - 1, 1), (400, 3), (900, 30), (2, 0)]
    assert src.read_ranges(ranges) == [data[o : o + n] for o, n in ranges]
    # docker-registry (Go's http.ServeContent) answers multipart/byteranges
    assert c.transport.host_state(registry.host).multirange is True
    from layerstore.errors import FormatError

    with pytest.raises(FormatError):
        src.read_at(len(data) - 1, 2)
    # by reference (HEAD picks the source) too
    src2 = c.blob_source(
        registry.ref("test/app", "v1"), image.layer_digests[1], len(image.layers[1])
    )
    assert src2.read_ranges([(0, 4), (50, 4)]) == [image.layers[1][0:4], image.layers[1][50:54]]
    with pytest.raises(RegistryError, match="expected"):
        c.blob_source(registry.ref("test/app", "v1"), image.layer_digests[1], 5)


def test_get_blob(registry: RegistryHandle, image: PushedImage) -> None:  # noqa: F811
    c = client_for(registry)
    ref = registry.ref("test/app", "v1")
    assert c.get_blob(ref, image.config_digest, 1 << 20) == image.config
    with pytest.raises(RegistryError, match="limit"):
        c.get_blob(ref, image.layer_digests[0], 100)
    with pytest.raises(NotFoundError) as info:
        c.get_blob(ref, "sha256:" + "0" * 64, 100)
    assert registry.host in str(info.value) and "test/app" in str(info.value)
    with pytest.raises(ImageReferenceError):
        c.get_blob(ref, "sha256:short", 100)


def test_not_found(registry: RegistryHandle, image: PushedImage) -> None:  # noqa: F811
    c = client_for(registry)
    with pytest.raises(NotFoundError) as info:
        c.resolve(registry.ref("test/app", "nope"))
    assert info.value.status == 404
    assert "MANIFEST_UNKNOWN" in str(info.value)
    with pytest.raises(NotFoundError):
        c.resolve(registry.ref("test/absent", "v1"))


def test_push_with_client(registry: RegistryHandle) -> None:  # noqa: F811
    c = client_for(registry, upload_chunk_size=1000)
    ref = registry.ref("test/pushed", "p1")
    blob = layer(9, 10)
    d = sha256(blob)
    assert c.push_blob(ref, blob, d) is True
    assert c.push_blob(ref, blob, d) is False  # exists: HEAD skips it
    assert c.blob_exists(ref, d)
    with pytest.raises(VerificationError):
        c.push_blob(ref, b"other bytes", d)
    import json

    config = json.dumps({"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": [d]}})
    cd = sha256(config.encode())
    c2 = client_for(registry)  # monolithic upload
    assert c2.push_blob(ref, config.encode(), cd)
    man = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": m.OCI_MANIFEST,
            "config": {"mediaType": m.OCI_CONFIG, "digest": cd, "size": len(config)},
            "layers": [{"mediaType": m.OCI_LAYER_GZIP, "digest": d, "size": len(blob)}],
        }
    ).encode()
    assert c.put_manifest(ref, man, m.OCI_MANIFEST) == sha256(man)
    r = c.resolve(ref)
    assert r.manifest_digest == sha256(man)
    assert c.get_blob(ref, d, 1 << 20) == blob


def test_push_blob_from_file(registry: RegistryHandle, tmp_path: Path) -> None:  # noqa: F811
    blob = layer(11, 20)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    for chunk in (0, 4096):
        c = client_for(registry, upload_chunk_size=chunk)
        repo_ref = registry.ref(f"test/file{chunk}", "f")
        assert c.push_blob(repo_ref, path, sha256(blob)) is True
        assert c.get_blob(repo_ref, sha256(blob), 1 << 20) == blob


# --- htpasswd ---------------------------------------------------------------------------------
def test_htpasswd_basic(registry_htpasswd: RegistryHandle) -> None:  # noqa: F811
    h = registry_htpasswd
    img = h.push_image("sec/app", "v1", [layer(6, 3)])
    creds = Creds({h.host: Credentials(h.username or "", h.password or "")})
    c = client_for(h, creds)
    r = c.resolve(h.ref("sec/app", "v1"))
    assert r.manifest_digest == img.manifest_digest
    src = c.blob_source(r, img.layer_digests[0], len(img.layers[0]))
    assert src.read_ranges([(0, 5), (30, 5)]) == [img.layers[0][:5], img.layers[0][30:35]]
    assert creds.calls and all(host == h.host for host, _ in creds.calls)
    assert c.push_blob(h.ref("sec/app", "v1"), b"pushed", sha256(b"pushed"))


def test_htpasswd_wrong_password(registry_htpasswd: RegistryHandle) -> None:  # noqa: F811
    h = registry_htpasswd
    h.push_image("sec/wrong", "v1", [layer(7, 2)])
    bad = "WrongPassword-123"
    c = client_for(h, Creds({h.host: Credentials(h.username or "", bad)}))
    with pytest.raises(AuthenticationError) as info:
        c.resolve(h.ref("sec/wrong", "v1"))
    msg = str(info.value)
    assert h.host in msg and bad not in msg and (h.password or "") not in msg
    with pytest.raises(AuthenticationError) as info:
        client_for(h).resolve(h.ref("sec/wrong", "v1"))
    assert "no credentials" in str(info.value) and h.host in str(info.value)


# --- token auth -------------------------------------------------------------------------------
def test_token_auth(registry_token: RegistryHandle) -> None:  # noqa: F811
    h = registry_token
    assert h.token_server is not None
    img = h.push_image("tok/app", "v1", [layer(8, 3)])
    creds = Creds({h.host: Credentials(h.username or "", h.password or "")})
    c = client_for(h, creds)
    before = len(h.token_server.requests)
    r = c.resolve(h.ref("tok/app", "v1"))
    assert r.manifest_digest == img.manifest_digest
    src = c.blob_source(r, img.layer_digests[0], len(img.layers[0]))
    assert src.read_at(3, 9) == img.layers[0][3:12]
    c.resolve(h.ref("tok/app", "v1"))
    fetched = h.token_server.requests[before:]
    assert len(fetched) == 1, "the token is cached per (host, scope)"
    assert fetched[0]["basic"] is True
    assert fetched[0]["query"]["scope"] == ["repository:tok/app:pull"]
    # push needs a pull,push token
    assert c.push_blob(h.ref("tok/app", "v1"), b"tokblob", sha256(b"tokblob"))
    assert h.token_server.requests[-1]["query"]["scope"] == ["repository:tok/app:pull,push"]


def test_token_wrong_password_and_anonymous(registry_token: RegistryHandle) -> None:  # noqa: F811
    h = registry_token
    h.push_image("tok/wrong", "v1", [layer(9, 2)])
    bad = "Bad-Password-xyz"
    c = client_for(h, Creds({h.host: Credentials(h.username or "", bad)}))
    with pytest.raises(AuthenticationError) as info:
        c.resolve(h.ref("tok/wrong", "v1"))
    msg = str(info.value)
    assert h.host in msg and bad not in msg
    # anonymous: the token server grants nothing, the registry keeps answering 401
    with pytest.raises(AuthenticationError) as info:
        client_for(h).resolve(h.ref("tok/wrong", "v1"))
    assert h.host in str(info.value)


def test_token_identity_token(registry_token: RegistryHandle) -> None:  # noqa: F811
    h = registry_token
    assert h.token_server is not None
    img = h.push_image("tok/idt", "v1", [layer(10, 2)])
    idt = Credentials("<token>", "", identity_token=h.token_server.identity_token)
    c = client_for(h, Creds({h.host: idt}))
    assert c.resolve(h.ref("tok/idt", "v1")).manifest_digest == img.manifest_digest
    assert h.token_server.requests[-1]["method"] == "POST"
    bad = Credentials("<token>", "", identity_token="not-the-token")
    with pytest.raises(AuthenticationError):
        client_for(h, Creds({h.host: bad})).resolve(h.ref("tok/idt", "v1"))


def test_mirror_falls_through_to_primary(registry: RegistryHandle, image: PushedImage) -> None:  # noqa: F811
    primary = PullSource(f"{registry.host}/test/app", insecure=True)
    mirror = PullSource(f"{registry.host}/mirror/missing", insecure=True, mirror=True)

    class Conf:
        def pull_sources(self, name: str, *, by_digest: bool) -> list[PullSource]:
            return [mirror, primary]

    c = RegistryClient(None, Conf(), settings=RegistrySettings())
    r = c.resolve(registry.ref("test/app", "v1"))
    assert r.source == primary
    assert r.manifest_digest == image.manifest_digest
    data = c.get_blob(registry.ref("test/app", "v1"), image.layer_digests[1], 1 << 20)
    assert data == image.layers[1]


def test_concurrent_reads_share_one_token(registry_token: RegistryHandle) -> None:  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    h = registry_token
    assert h.token_server is not None
    img = h.push_image("tok/conc", "v1", [layer(12, 60)])
    data = img.layers[0]
    creds = Creds({h.host: Credentials(h.username or "", h.password or "")})
    resolved = client_for(h, creds).resolve(h.ref("tok/conc", "v1"))
    c = client_for(h, creds)  # a fresh client: no challenge known, no token yet
    src = c.blob_source(resolved, img.layer_digests[0], len(data))
    before = len(h.token_server.requests)
    step = len(data) // 64
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: src.read_at(i * step, step), range(64)))
    assert b"".join(got) == data[: 64 * step]
    assert len(h.token_server.requests) - before == 1, "one token fetch for 16 threads"


def test_tls_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import urllib3.connection

    from tests.registry_fixtures import start_registry

    # urllib3 building (and loading CAs into) a context per connection: never, the transport
    # shares one per TLS configuration
    per_connection: list[object] = []
    real_create = urllib3.connection.create_urllib3_context

    def counting_create(*a: Any, **kw: Any) -> Any:
        per_connection.append(a)
        return real_create(*a, **kw)

    monkeypatch.setattr(urllib3.connection, "create_urllib3_context", counting_create)
    h = start_registry(tmp_path / "tls", tls=True)
    try:
        img = h.push_image("tls/app", "v1", [layer(13, 3)])
        per_connection.clear()  # the fixture's own session
        # insecure: https is probed first and used without verification
        c = client_for(h)
        r = c.resolve(h.ref("tls/app", "v1"))
        assert r.manifest_digest == img.manifest_digest
        assert c.transport.host_state(h.host).scheme == "https"
        src = c.blob_source(r, img.layer_digests[0], len(img.layers[0]))
        assert isinstance(src, RangeSource)
        assert src.read_at(1, 5) == img.layers[0][1:6]
        # several connections at once, one context (no CA loaded: nothing is verified)
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda i: src.read_at(i, 3), range(12)))
        assert got == [img.layers[0][i : i + 3] for i in range(12)]
        (ctx,) = c.transport.tls_contexts.contexts()
        assert ctx.verify_mode == ssl.CERT_NONE and ctx.cert_store_stats()["x509_ca"] == 0
        assert per_connection == []
        # secure (the default): the self-signed certificate is refused
        no_certs = RegistrySettings(retries=0, certs_dirs=(str(tmp_path / "none"),))
        with pytest.raises(RegistryUnavailableError, match="TLS"):
            RegistryClient(settings=no_certs).resolve(h.ref("tls/app", "v1"))
        # ... unless certs.d has a CA for that host
        assert h.tls_cert is not None
        host_dir = tmp_path / "certs.d" / h.host
        host_dir.mkdir(parents=True)
        (host_dir / "ca.crt").write_bytes(h.tls_cert.read_bytes())
        with RegistryClient(
            settings=RegistrySettings(retries=0, certs_dirs=(str(tmp_path / "certs.d"),))
        ) as secure:
            r = secure.resolve(h.ref("tls/app", "v1"))
            assert r.manifest_digest == img.manifest_digest
            src = secure.blob_source(r, img.layer_digests[0], len(img.layers[0]))
            with ThreadPoolExecutor(6) as pool:
                got = list(pool.map(lambda i: src.read_at(i, 3), range(12)))
            assert got == [img.layers[0][i : i + 3] for i in range(12)]
            (ctx,) = secure.transport.tls_contexts.contexts()
            assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
            assert ctx.cert_store_stats()["x509_ca"] >= 1
            assert per_connection == []
            bundles = list(secure.transport._tls_files)
            assert bundles and all(Path(b).exists() for b in bundles)
        assert not any(Path(b).exists() for b in bundles), "temporary CA bundles removed"
    finally:
        h.stop()
