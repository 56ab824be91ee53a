"""A real distribution registry (``docker-registry serve``) on loopback, for tests.

Use the fixtures from a test module (``from tests.registry_fixtures import registry``) or list
this module in a conftest's ``pytest_plugins``. Three session-scoped registries:

- ``registry``: anonymous;
- ``registry_htpasswd``: Basic auth (``registry_htpasswd.username`` / ``.password``);
- ``registry_token``: Bearer tokens from an in-process token server (:class:`TokenServer`)
  whose JWTs are signed with an RSA key made by the ``openssl`` CLI. It also hands out
  identity (refresh) tokens: ``registry_token.token_server.identity_token``.

Push images without the code under test: ``handle.push_image(repo, tag, [layer_bytes, ...])``
returns a :class:`PushedImage`; ``handle.push_index(repo, tag, [img, ...])`` builds an index.
``gzip_tar({"path": b"data"})`` makes a small gzip layer.

The binary is ``/usr/bin/docker-registry`` (Debian, package docker-registry) or ``registry``
(Fedora); tests skip, saying so, when neither exists.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import secret_guard
from tests.faultserver import QuietHTTPHandler

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

TOKEN_SERVICE = "stargz-test-registry"
TOKEN_ISSUER = "stargz-test-issuer"


def registry_binary() -> str | None:
    for name in ("docker-registry", "registry"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_tar(files: Mapping[str, bytes], *, mtime: int = 0) -> bytes:
    """A gzip-compressed tar of regular files (deterministic)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=mtime) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- token server -------------------------------------------------------------------------------
class TokenServer:
    """A distribution token server: ``GET /token`` with Basic auth (or anonymous), and
    ``POST /token`` with ``grant_type=refresh_token``. Signs RS256 JWTs with ``openssl``."""

    def __init__(self, workdir: Path, users: Mapping[str, str], *, anonymous_pull: bool) -> None:
        self.workdir = workdir
        self.users = dict(users)
        self.anonymous_pull = anonymous_pull
        self.expires_in = 300
        self.identity_token = "idtok-" + secrets.token_hex(8)
        secret_guard.register(self.identity_token, "identity token")
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
                "-subj", "/CN=stargz-test-token-issuer",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        pem = self.cert.read_text()
        body = pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
        self._x5c = "".join(body.split())
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def mint(self, subject: str, access: Sequence[Mapping[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": list(access),
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        token = signing_input + "." + _b64url(sig)
        secret_guard.register(token, "bearer token")
        return token

    def full_access(self, repo: str) -> list[dict[str, Any]]:
        return [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]

    def _grant(self, subject: str | None, scopes: Sequence[str]) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) != 3 or parts[0] != "repository":
                continue
            wanted = parts[2].split(",")
            allowed = ["pull", "push"] if subject else (["pull"] if self.anonymous_pull else [])
            actions = [a for a in wanted if a in allowed]
            access.append({"type": "repository", "name": parts[1], "actions": actions})
        return access

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(QuietHTTPHandler):
            def _reply(self, status: int, obj: Mapping[str, Any]) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                subject: str | None = None
                auth = self.headers.get("Authorization", "")
                with server._lock:
                    server.requests.append(
                        {"method": "GET", "basic": auth.startswith("Basic "), "query": query}
                    )
                if auth.startswith("Basic "):
                    try:
                        user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    except ValueError:
                        user, pw = "", ""
                    if server.users.get(user) != pw or not user:
                        self._reply(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                        return
                    subject = user
                self._issue(subject, query.get("scope", []), with_refresh=bool(subject))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                with server._lock:
                    server.requests.append({"method": "POST", "basic": False, "query": form})
                if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [
                    server.identity_token
                ]:
                    self._reply(401, {"error": "invalid_grant"})
                    return
                scopes = [s for v in form.get("scope", []) for s in v.split(" ")]
                self._issue("identity-user", scopes, with_refresh=False, oauth=True)

            def _issue(
                self,
                subject: str | None,
                scopes: Sequence[str],
                *,
                with_refresh: bool,
                oauth: bool = False,
            ) -> None:
                tok = server.mint(subject or "", server._grant(subject, scopes))
                out: dict[str, Any] = {
                    "expires_in": server.expires_in,
                    "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                if oauth:
                    out["access_token"] = tok
                else:
                    out["token"] = tok
                if with_refresh:
                    out["refresh_token"] = server.identity_token
                self._reply(200, out)

        return Handler


# --- the registry process -----------------------------------------------------------------------
@dataclass
class PushedImage:
    repo: str
    tag: str | None
    manifest: bytes
    manifest_digest: str
    media_type: str
    config: bytes
    config_digest: str
    layers: list[bytes]
    layer_digests: list[str]
    diff_ids: list[str]
    platform: tuple[str, str, str] = ("linux", "amd64", "")


@dataclass
class RegistryHandle:
    host: str
    process: subprocess.Popen[bytes]
    root: Path
    auth: str = "none"
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None
    tls_cert: Path | None = None
    """The self-signed certificate when the registry serves https (``tls=True``)."""
    _session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        # Environment CA bundles (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) and proxies would override
        # session.verify and reach for the network: this session talks to loopback only.
        self._session.trust_env = False
        if self.tls_cert is not None:
            self._session.verify = str(self.tls_cert)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.host}"

    def ref(self, repo: str, tag: str | None = None, digest: str | None = None) -> str:
        out = f"{self.host}/{repo}"
        if tag:
            out += f":{tag}"
        if digest:
            out += f"@{digest}"
        return out

    def _headers(self, repo: str) -> dict[str, str]:
        if self.auth == "htpasswd":
            raw = f"{self.username}:{self.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        if self.auth == "token":
            assert self.token_server is not None
            tok = self.token_server.mint("fixture", self.token_server.full_access(repo))
            return {"Authorization": f"Bearer {tok}"}
        return {}

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        hdrs = self._headers(repo)
        r = self._session.post(f"{self.url}/v2/{repo}/blobs/uploads/", headers=hdrs, timeout=30)
        assert r.status_code == 202, (r.status_code, r.text)
        loc = urllib.parse.urljoin(self.url, r.headers["Location"])
        sep = "&" if "?" in loc else "?"
        r = self._session.put(
            f"{loc}{sep}digest={digest}",
            data=data,
            headers={**hdrs, "Content-Type": "application/octet-stream"},
            timeout=60,
        )
        assert r.status_code == 201, (r.status_code, r.text)
        return digest

    def push_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        r = self._session.put(
            f"{self.url}/v2/{repo}/manifests/{reference}",
            data=body,
            headers={**self._headers(repo), "Content-Type": media_type},
            timeout=30,
        )
        assert r.status_code == 201, (r.status_code, r.text)
        return sha256(body)

    def push_image(
        self,
        repo: str,
        tag: str | None,
        layers: Sequence[bytes],
        *,
        diff_ids: Sequence[str] | None = None,
        layer_media_type: str = OCI_LAYER_GZIP,
        layer_annotations: Sequence[Mapping[str, str]] | None = None,
        manifest_media_type: str = OCI_MANIFEST,
        platform: tuple[str, str, str] = ("linux", "amd64", ""),
        config_extra: Mapping[str, Any] | None = None,
    ) -> PushedImage:
        """Push config + layers (compressed blobs as given) + manifest; tag it when *tag*."""
        if diff_ids is None:
            diff_ids = [
                sha256(gzip.decompress(b)) if b[:2] == b"\x1f\x8b" else sha256(b) for b in layers
            ]
        os_name, arch, variant = platform
        config_obj: dict[str, Any] = {
            "architecture": arch,
            "os": os_name,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "config": {},
        }
        if variant:
            config_obj["variant"] = variant
        config_obj.update(config_extra or {})
        config = json.dumps(config_obj, sort_keys=True).encode()
        docker = manifest_media_type == DOCKER_MANIFEST
        config_digest = self.push_blob(repo, config)
        layer_digests = [self.push_blob(repo, b) for b in layers]
        layer_descs = []
        for i, (b, d) in enumerate(zip(layers, layer_digests)):
            desc: dict[str, Any] = {
                "mediaType": DOCKER_LAYER_GZIP if docker else layer_media_type,
                "digest": d,
                "size": len(b),
            }
            if layer_annotations and layer_annotations[i]:
                desc["annotations"] = dict(layer_annotations[i])
            layer_descs.append(desc)
        manifest_obj = {
            "schemaVersion": 2,
            "mediaType": manifest_media_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": layer_descs,
        }
        manifest = json.dumps(manifest_obj, indent=2).encode()
        digest = self.push_manifest(repo, tag or sha256(manifest), manifest, manifest_media_type)
        return PushedImage(
            repo=repo,
            tag=tag,
            manifest=manifest,
            manifest_digest=digest,
            media_type=manifest_media_type,
            config=config,
            config_digest=config_digest,
            layers=list(layers),
            layer_digests=layer_digests,
            diff_ids=list(diff_ids),
            platform=platform,
        )

    def push_index(self, repo: str, tag: str, images: Sequence[PushedImage]) -> tuple[str, bytes]:
        entries = []
        for img in images:
            plat = {"os": img.platform[0], "architecture": img.platform[1]}
            if img.platform[2]:
                plat["variant"] = img.platform[2]
            entries.append(
                {
                    "mediaType": img.media_type,
                    "digest": img.manifest_digest,
                    "size": len(img.manifest),
                    "platform": plat,
                }
            )
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        raw = body.encode()
        return self.push_manifest(repo, tag, raw, OCI_INDEX), raw

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_server is not None:
            self.token_server.close()
        self._session.close()


def start_registry(
    workdir: Path,
    *,
    auth: str = "none",
    username: str = "alice",
    password: str | None = None,
    anonymous_pull: bool = False,
    tls: bool = False,
) -> RegistryHandle:
    """Start ``docker-registry serve`` on 127.0.0.1:<free port>; *auth* is ``none``,
    ``htpasswd`` or ``token``; *tls* serves https with a self-signed certificate for
    127.0.0.1 (``handle.tls_cert``). Waits until ``/v2/`` answers."""
    binary = registry_binary()
    if binary is None:
        pytest.skip("no docker-registry/registry binary (apt-get install docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    password = password or "pw-" + secrets.token_hex(8)
    if auth != "none":
        secret_guard.register_basic(username, password, "registry password")
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    token_server: TokenServer | None = None
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    tls_cert: Path | None = None
    if tls:
        tls_cert, tls_key = workdir / "tls.crt", workdir / "tls.key"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048",  # P-256: "bad record MAC"
                "-nodes", "-keyout", str(tls_key), "-out", str(tls_cert), "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        lines += ["  tls:", f"    certificate: {tls_cert}", f"    key: {tls_key}"]
    if auth == "htpasswd":
        out = subprocess.run(
            ["htpasswd", "-Bbn", username, password], check=True, capture_output=True
        ).stdout
        (workdir / "htpasswd").write_bytes(out)
        lines += ["auth:", "  htpasswd:", "    realm: stargz-test", f"    path: {workdir}/htpasswd"]
    elif auth == "token":
        token_server = TokenServer(workdir, {username: password}, anonymous_pull=anonymous_pull)
        lines += [
            "auth:",
            "  token:",
            f"    realm: {token_server.realm}",
            f"    service: {TOKEN_SERVICE}",
            f"    issuer: {TOKEN_ISSUER}",
            f"    rootcertbundle: {token_server.cert}",
        ]
    elif auth != "none":
        raise ValueError(f"unknown auth mode {auth!r}")
    config = workdir / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [binary, "serve", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
    )
    log.close()
    handle = RegistryHandle(
        host=f"127.0.0.1:{port}",
        process=proc,
        root=workdir,
        auth=auth,
        username=username if auth != "none" else None,
        password=password if auth != "none" else None,
        token_server=token_server,
        tls_cert=tls_cert,
    )
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            handle.stop()
            raise RuntimeError(
                f"docker-registry exited: {(workdir / 'registry.log').read_text()[-2000:]}"
            )
        try:
            r = handle._session.get(f"{handle.url}/v2/", timeout=1)
            if r.status_code in (200, 401):
                return handle
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError("docker-registry did not come up within 20 s")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryHandle]:
    handle = start_registry(tmp_path_factory.mktemp("registry-anon"))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def registry_htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryHandle]:
    handle = start_registry(tmp_path_factory.mktemp("registry-htpasswd"), auth="htpasswd")
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryHandle]:
    handle = start_registry(tmp_path_factory.mktemp("registry-token"), auth="token")
    yield handle
    handle.stop()
