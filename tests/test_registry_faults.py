"""The registry client against misbehaving servers (tests/faultserver.py).

127.0.0.1 and 127.0.0.2 are different hosts: the registry lives on one, blob storage or a
mirror on the other.
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
import structlog

from auth.types import Credentials
from layerstore.common.redact import redact_url
from layerstore.errors import (
    AuthenticationError,
    BlockedRegistryError,
    ManifestError,
    RangeError,
    RegistryError,
    RegistryUnavailableError,
    VerificationError,
)
from layerstore.registry.client import (
    PullSource,
    RegistryClient,
    RegistrySettings,
    parse_byteranges,
    parse_content_range,
)
from layerstore.registry.transport import Endpoint
from tests.faultserver import FakeRegistry, FaultServer, Reply, Request, range_reply, sha256

BLOB = random.Random(7).randbytes(64 * 1024)


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer("127.0.0.1") as srv:
        yield srv


@pytest.fixture
def other() -> Iterator[FaultServer]:
    with FaultServer("127.0.0.2") as srv:
        yield srv


class Creds:
    def __init__(self, mapping: dict[str, Credentials]) -> None:
        self.mapping = mapping

    def lookup(self, host: str, repository: str) -> Credentials | None:
        return self.mapping.get(host)


def make_client(*servers: FaultServer, creds: Creds | None = None, **kw: object) -> RegistryClient:
    settings: dict[str, object] = {
        "insecure_registries": frozenset(s.netloc for s in servers),
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "retries": 2,
        "backoff_factor": 0.01,
        "max_backoff": 0.2,
    }
    settings.update(kw)
    return RegistryClient(creds, settings=RegistrySettings(**settings))  # type: ignore[arg-type]


def setup_image(reg: FakeRegistry, repo: str = "app") -> tuple[str, str]:
    """An image with BLOB as its only layer; returns (reference, layer digest)."""
    reg.add_image("v1", [BLOB])
    return f"{reg.server.netloc}/{repo}:v1", sha256(BLOB)


def blob_gets(srv: FaultServer) -> list[Request]:
    return [r for r in srv.requests if r.method == "GET" and "/blobs/" in r.path]


# --- redirects and credentials ------------------------------------------------------------------
@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_no_authorization_crosses_redirect(
    fault: FaultServer, other: FaultServer, auth: str
) -> None:
    reg = FakeRegistry(fault, auth=auth, redirect_blobs_to=other)
    ref, digest = setup_image(reg)
    c = make_client(fault, creds=Creds({fault.netloc: Credentials(reg.username, reg.password)}))
    resolved = c.resolve(ref)  # the config blob comes through the redirect too
    src = c.blob_source(resolved, digest, len(BLOB))
    assert src.read_at(100, 200) == BLOB[100:300]
    assert src.read_ranges([(0, 10), (5000, 10)]) == [BLOB[:10], BLOB[5000:5010]]
    storage = [r for r in other.requests if r.path.startswith("/storage/")]
    assert len(storage) >= 3
    assert all(r.header("Authorization") is None for r in storage)
    assert any(r.header("Authorization") for r in blob_gets(fault))


def test_signed_url_reused_then_reresolved_after_403(
    fault: FaultServer, other: FaultServer
) -> None:
    reg = FakeRegistry(fault, redirect_blobs_to=other)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    src = c.blob_source(c.resolve(ref), digest, len(BLOB))
    assert src.read_at(0, 16) == BLOB[:16]
    registry_hits = len(blob_gets(fault))
    assert src.read_at(16, 16) == BLOB[16:32]
    assert len(blob_gets(fault)) == registry_hits, "the signed URL is reused"
    reg.expire_signatures()
    assert src.read_at(32, 16) == BLOB[32:48]
    assert len(blob_gets(fault)) == registry_hits + 1, "one re-resolve through the registry"
    assert other.count("GET") >= 4


def test_expired_signature_at_first_redirect_reresolves_once(
    fault: FaultServer, other: FaultServer
) -> None:
    reg = FakeRegistry(fault, redirect_blobs_to=other)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    resolved = c.resolve(ref)
    # storage refuses every signature: one retry through the registry, then an error
    other.clear_routes()
    other.route("GET", r"/storage/.*", lambda req: Reply(403, body=b"expired"))
    before = len(blob_gets(fault))
    with pytest.raises(RegistryError) as info:
        c.blob_source(resolved, digest, len(BLOB)).read_at(0, 4)
    assert len(blob_gets(fault)) == before + 2
    assert "sig=" not in str(info.value)


def test_too_many_redirects(fault: FaultServer) -> None:
    fault.route("GET", r"/v2/app/manifests/v1", lambda r: Reply(302, [("Location", "/loop")]))
    fault.route("GET", r"/loop", lambda r: Reply(302, [("Location", "/loop")]))
    with pytest.raises(RegistryError, match="too many redirects"):
        make_client(fault).resolve(f"{fault.netloc}/app:v1")
    assert fault.count("GET", "/loop") == 5


def test_https_to_http_redirect_refused_for_secure_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = RegistryClient()
    ep = Endpoint("reg.example", "app", False, PullSource("reg.example/app"))

    def fake_request(*args: object, **kw: object) -> requests.Response:
        r = requests.Response()
        r.status_code = 302
        r.headers["Location"] = "http://storage.example/blob?sig=x"
        r.url = "https://reg.example/v2/app/blobs/x"
        r.raw = io.BytesIO(b"")
        return r

    sent: list[str] = []
    monkeypatch.setattr(c.auth, "request", fake_request)
    monkeypatch.setattr(c.transport, "send", lambda *a, **k: sent.append(a[1]))
    with pytest.raises(RegistryError, match="https to http"):
        c.get_following(ep, "blobs/x", {})
    assert sent == []


def test_mirror_and_upstream_credentials_stay_apart(fault: FaultServer, other: FaultServer) -> None:
    upstream = FakeRegistry(fault, auth="basic", password="upstream-secret")
    mirror = FakeRegistry(other, auth="basic", username="m", password="mirror-secret")
    upstream.add_image("v1", [BLOB])
    creds = Creds(
        {
            fault.netloc: Credentials(upstream.username, upstream.password),
            other.netloc: Credentials(mirror.username, mirror.password),
        }
    )
    sources = [
        PullSource(f"{other.netloc}/app", insecure=True, mirror=True),
        PullSource(f"{fault.netloc}/app", insecure=True),
    ]

    class Conf:
        def pull_sources(self, name: str, *, by_digest: bool) -> list[PullSource]:
            return sources

    c = RegistryClient(creds, Conf(), settings=RegistrySettings(retries=0))
    r = c.resolve(f"{fault.netloc}/app:v1")  # the mirror lacks it: falls through
    assert r.source == sources[1]
    assert {r.header("Authorization") for r in other.requests} <= {None, mirror.basic_header()}
    assert {r.header("Authorization") for r in fault.requests} <= {None, upstream.basic_header()}
    assert any(r.header("Authorization") == mirror.basic_header() for r in other.requests)
    # now the mirror has it and serves it
    mirror.add_image("v1", [BLOB])
    assert c.resolve(f"{fault.netloc}/app:v1").source == sources[0]


# --- ranges ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["refuse", "refuse416", "ignore"])
def test_multirange_fallback_remembered_per_host(fault: FaultServer, mode: str) -> None:
    reg = FakeRegistry(fault, multi=mode)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    src = c.blob_source(c.resolve(ref), digest, len(BLOB))
    ranges = [(10, 5), (1000, 100), (60000, 7)]
    expected = [BLOB[o : o + n] for o, n in ranges]
    assert src.read_ranges(ranges) == expected
    multi = [r for r in blob_gets(fault) if "," in (r.header("Range") or "")]
    assert len(multi) == 1
    assert src.read_ranges(ranges) == expected
    multi = [r for r in blob_gets(fault) if "," in (r.header("Range") or "")]
    assert len(multi) == 1, "the host is remembered as single-range only"
    assert c.transport.host_state(fault.netloc).multirange is False


def test_single_range_registry_gets_the_ranges_in_parallel(fault: FaultServer) -> None:
    """Where each range needs a request of its own, they go a few at a time (each costs a
    round trip), and every byte still comes back in place."""
    lock = threading.Lock()
    active = [0, 0]  # now, most

    def slow(req: Request, data: bytes) -> Reply:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        try:
            time.sleep(0.2)
            return range_reply(data, req.header("Range"), multi="refuse")
        finally:
            with lock:
                active[0] -= 1

    reg = FakeRegistry(fault, multi="refuse", blob_reply=slow)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    src = c.blob_source(c.resolve(ref), digest, len(BLOB))
    ranges = [(10, 5), (1000, 100), (20000, 7), (40000, 50), (60000, 7)]
    assert src.read_ranges(ranges) == [BLOB[o : o + n] for o, n in ranges]  # learns: refused
    active[1] = 0
    assert src.read_ranges(ranges) == [BLOB[o : o + n] for o, n in ranges]
    assert active[1] > 1


@pytest.mark.parametrize("mode", ["multipart", "coalesce"])
def test_multirange_supported(fault: FaultServer, mode: str) -> None:
    reg = FakeRegistry(fault, multi=mode)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    src = c.blob_source(c.resolve(ref), digest, len(BLOB))
    ranges = [(10, 5), (12, 10), (1000, 100), (60000, 7), (30, 0)]
    before = len(blob_gets(fault))
    assert src.read_ranges(ranges) == [BLOB[o : o + n] for o, n in ranges]
    assert len(blob_gets(fault)) == before + 1
    assert c.transport.host_state(fault.netloc).multirange is True


def test_short_body_is_range_error(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    resolved = c.resolve(ref)

    def short(req: Request, data: bytes) -> Reply:
        r = range_reply(data, req.header("Range"))
        r.truncate = len(r.body) // 2
        return r

    reg.blob_reply = short
    src = c.blob_source(resolved, digest, len(BLOB))
    with pytest.raises(RangeError):
        src.read_at(0, 4096)
    with pytest.raises(RangeError):
        src.read_ranges([(0, 100), (5000, 100)])


@pytest.mark.parametrize("multi", [False, True])
def test_wrong_content_range_is_range_error(fault: FaultServer, multi: bool) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    resolved = c.resolve(ref)
    reg.blob_reply = lambda req, data: range_reply(
        data, req.header("Range"), wrong_content_range=True
    )
    src = c.blob_source(resolved, digest, len(BLOB))
    with pytest.raises(RangeError):
        if multi:
            src.read_ranges([(0, 100), (5000, 100)])
        else:
            src.read_at(0, 100)


def test_overlong_and_inconsistent_bodies(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    resolved = c.resolve(ref)
    # right Content-Range, but more bytes than asked
    reg.blob_reply = lambda req, data: Reply(
        206, [("Content-Range", f"bytes 0-9/{len(data)}")], data[:20]
    )
    with pytest.raises(RangeError):
        c.blob_source(resolved, digest, len(BLOB)).read_at(0, 10)
    # a Content-Range total that is not the blob size
    reg.blob_reply = lambda req, data: Reply(206, [("Content-Range", "bytes 0-9/99")], data[:10])
    with pytest.raises(RangeError):
        c.blob_source(resolved, digest, len(BLOB)).read_at(0, 10)
    # 200 with the whole blob for a partial single range
    reg.blob_reply = lambda req, data: Reply(200, [], data)
    with pytest.raises(RangeError, match="ignored"):
        c.blob_source(resolved, digest, len(BLOB)).read_at(5, 10)
    # ... which is fine when the whole blob was asked for
    assert c.blob_source(resolved, digest, len(BLOB)).read_at(0, len(BLOB)) == BLOB


def test_multipart_missing_part_is_range_error(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault)
    resolved = c.resolve(ref)
    reg.blob_reply = lambda req, data: range_reply(data, "bytes=0-9,100-109")
    with pytest.raises(RangeError, match="lacks"):
        c.blob_source(resolved, digest, len(BLOB)).read_ranges([(0, 10), (5000, 10)])


def test_parse_byteranges_unit() -> None:
    data = bytes(range(256)) * 4
    r = range_reply(data, "bytes=0-3,1000-1023", boundary="b0undary")
    parts = parse_byteranges(r.body, "b0undary", len(data))
    assert parts == [(0, data[:4]), (1000, data[1000:1024])]
    # data that contains the boundary string does not confuse the parser
    tricky = b"--b0undary\r\n" * 10
    r = range_reply(tricky, "bytes=0-11,12-30", boundary="b0undary")
    assert parse_byteranges(r.body, "b0undary", len(tricky)) == [
        (0, tricky[:12]),
        (12, tricky[12:31]),
    ]
    with pytest.raises(RangeError):
        parse_byteranges(r.body[:-40], "b0undary", len(tricky))
    with pytest.raises(RangeError):
        parse_byteranges(r.body, "b0undary", len(tricky) + 1)
    assert parse_content_range("bytes 1-2/3") == (1, 2, 3)
    assert parse_content_range("bytes 1-2/*") == (1, 2, None)
    for bad in (None, "", "bytes 2-1/3", "bytes 0-3/3", "items 0-1/2"):
        with pytest.raises(RangeError):
            parse_content_range(bad)


# --- retries and timeouts -------------------------------------------------------------------------
def test_5xx_retried_then_success(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault, retries=3)
    resolved = c.resolve(ref)
    attempts = []

    def flaky(req: Request, data: bytes) -> Reply:
        attempts.append(1)
        if len(attempts) <= 2:
            return Reply(503, body=b"busy")
        return range_reply(data, req.header("Range"))

    reg.blob_reply = flaky
    assert c.blob_source(resolved, digest, len(BLOB)).read_at(0, 10) == BLOB[:10]
    assert len(attempts) == 3


@pytest.mark.parametrize("status", [500, 502, 429])
def test_retries_are_bounded(fault: FaultServer, status: int) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault, retries=2)
    resolved = c.resolve(ref)
    attempts = []

    def failing(req: Request, data: bytes) -> Reply:
        attempts.append(1)
        return Reply(status, body=b"no")

    reg.blob_reply = failing
    with pytest.raises(RegistryUnavailableError) as info:
        c.blob_source(resolved, digest, len(BLOB)).read_at(0, 10)
    assert info.value.status == status
    assert len(attempts) == 3


def test_retry_after_honoured_and_capped(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault, retries=2, max_backoff=0.6)
    resolved = c.resolve(ref)
    attempts: list[float] = []

    def limited(req: Request, data: bytes) -> Reply:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            return Reply(429, [("Retry-After", "3600")])
        return range_reply(data, req.header("Range"))

    reg.blob_reply = limited
    t0 = time.monotonic()
    assert c.blob_source(resolved, digest, len(BLOB)).read_at(0, 10) == BLOB[:10]
    elapsed = time.monotonic() - t0
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 0.5 and elapsed < 3, "Retry-After honoured, capped"


@pytest.mark.parametrize("read_retries", [0, 1])
def test_stalled_server_times_out(fault: FaultServer, read_retries: int) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault, read_timeout=0.5, read_retries=read_retries)
    resolved = c.resolve(ref)
    attempts = []

    def stall(req: Request, data: bytes) -> Reply:
        attempts.append(1)
        return Reply(206, body=b"x", stall=3)

    reg.blob_reply = stall
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="timed out"):
        c.blob_source(resolved, digest, len(BLOB)).read_at(0, 1)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5 * (read_retries + 1) + 0.8
    assert len(attempts) == read_retries + 1


def test_stall_inside_body_times_out(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    ref, digest = setup_image(reg)
    c = make_client(fault, read_timeout=0.5)
    resolved = c.resolve(ref)
    reg.blob_reply = lambda req, data: Reply(
        206, [("Content-Range", f"bytes 0-9/{len(data)}")], data[:10], stall_body=3
    )
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="stalled"):
        c.blob_source(resolved, digest, len(BLOB)).read_at(0, 10)
    assert time.monotonic() - t0 < 1.5


def test_connection_refused(fault: FaultServer) -> None:
    netloc = fault.netloc
    fault.stop()
    c = make_client(fault, retries=1)
    with pytest.raises(RegistryUnavailableError, match="cannot reach"):
        c.resolve(f"{netloc}/app:v1")


# --- verification -------------------------------------------------------------------------------
def test_manifest_digest_mismatch_refused(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    digest, manifest = reg.add_image("v1", [BLOB])
    c = make_client(fault)
    tampered = manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2')
    reg.manifest_reply = lambda req, body, mt: Reply(200, [("Content-Type", mt)], tampered)
    with pytest.raises(VerificationError):
        c.resolve(f"{fault.netloc}/app@{digest}")
    # by tag with a Docker-Content-Digest that does not match the body
    reg.manifest_reply = lambda req, body, mt: Reply(
        200, [("Content-Type", mt), ("Docker-Content-Digest", digest)], tampered
    )
    with pytest.raises(VerificationError):
        c.resolve(f"{fault.netloc}/app:v1")


def test_blob_and_config_digest_mismatch_refused(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    reg.add_image("v1", [BLOB])
    c = make_client(fault)
    reg.blob_reply = lambda req, data: Reply(200, [], data[:-1] + b"!")
    with pytest.raises(VerificationError):
        c.resolve(f"{fault.netloc}/app:v1")  # the config is verified
    with pytest.raises(VerificationError):
        c.get_blob(f"{fault.netloc}/app:v1", sha256(BLOB), 1 << 20)


def test_manifest_size_cap(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    reg.add_image("v1", [BLOB])
    c = make_client(fault, max_manifest_size=100)
    with pytest.raises(ManifestError, match="limit"):
        c.resolve(f"{fault.netloc}/app:v1")


# --- token refresh, and no secrets in logs -------------------------------------------------------
def test_token_refreshed_once_on_401(fault: FaultServer) -> None:
    reg = FakeRegistry(fault, auth="bearer")
    ref, digest = setup_image(reg)
    c = make_client(fault, creds=Creds({fault.netloc: Credentials(reg.username, reg.password)}))
    resolved = c.resolve(ref)
    assert fault.count("GET", "/token") == 1
    reg.token = "tok-rotated"
    assert c.blob_source(resolved, digest, len(BLOB)).read_at(0, 3) == BLOB[:3]
    assert fault.count("GET", "/token") == 2
    # the token server hands out a token the registry refuses: one refresh, then an error
    reg.issued_token = "tok-refused"
    reg.token = "tok-unobtainable"
    tokens, manifests = fault.count("GET", "/token"), fault.count("GET", ".*/manifests/.*")
    with pytest.raises(AuthenticationError) as info:
        c.resolve(ref)
    assert fault.count("GET", "/token") - tokens == 1
    assert fault.count("GET", ".*/manifests/.*") - manifests == 2
    assert "refused the credentials" in str(info.value)


def test_no_secrets_in_logs(
    fault: FaultServer, other: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")  # other tests may have quietened it
    reg = FakeRegistry(fault, auth="bearer", redirect_blobs_to=other)
    ref, digest = setup_image(reg)
    good = Creds({fault.netloc: Credentials(reg.username, reg.password)})
    messages: list[str] = []
    with structlog.testing.capture_logs() as captured:
        c = make_client(fault, creds=good)
        src = c.blob_source(c.resolve(ref), digest, len(BLOB))
        src.read_ranges([(0, 10), (100, 10)])
        reg.expire_signatures()
        src.read_at(5, 5)
        wrong = make_client(
            fault, creds=Creds({fault.netloc: Credentials(reg.username, "x-WRONG-x")})
        )
        with pytest.raises(AuthenticationError) as info:
            wrong.resolve(ref)
        messages.append(str(info.value))
        reg.blob_reply = lambda req, data: Reply(500)
        with pytest.raises(RegistryError) as info2:
            make_client(fault, creds=good, retries=1).get_blob(ref, digest, 1 << 20)
        messages.append(str(info2.value))
    assert captured, "structlog events were captured"
    assert any(e["event"] == "registry_signed_url_refused" for e in captured)
    text = "\n".join([caplog.text, *map(repr, captured), *messages])
    assert "storage" in text  # the redirect target is logged, without its query
    # urllib3's own request lines for the signed URLs were captured (and redacted)
    assert any(
        r.name.startswith("urllib3") and "/storage/" in r.getMessage() for r in caplog.records
    )
    assert any(r.name == "urllib3.util.retry" for r in caplog.records), "a retry was logged"
    import base64

    secrets = [
        reg.password,
        reg.token,
        reg.signature,
        "x-WRONG-x",
        base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode(),
        "sig=",
    ]
    for secret in secrets:
        assert secret not in text, secret


def test_redact_url() -> None:
    assert redact_url("https://u:p@h:8/a/b?sig=1#f") == "https://h:8/a/b"


def test_blocked_registry_propagates(fault: FaultServer) -> None:
    class Conf:
        def pull_sources(self, name: str, *, by_digest: bool) -> list[PullSource]:
            raise BlockedRegistryError(f"registry of {name} is blocked")

    c = RegistryClient(None, Conf())
    with pytest.raises(BlockedRegistryError):
        c.resolve(f"{fault.netloc}/app:v1")
    assert fault.requests == []


def test_registry_error_text_echoing_the_token_is_not_repeated(fault: FaultServer) -> None:
    reg = FakeRegistry(fault, auth="bearer")
    ref, _ = setup_image(reg)

    def echo(req: Request, body: bytes, media_type: str) -> Reply:
        text = json.dumps(
            {"errors": [{"code": "DENIED", "message": f"bad {req.header('Authorization')}"}]}
        ).encode()
        return Reply(400, [("Content-Type", "application/json")], text)

    reg.manifest_reply = echo
    c = make_client(fault, creds=Creds({fault.netloc: Credentials(reg.username, reg.password)}))
    with pytest.raises(RegistryError) as info:
        c.resolve(ref)
    assert "DENIED" in str(info.value)
    assert reg.token not in str(info.value)


def test_upload_location_on_another_host_refused(fault: FaultServer, other: FaultServer) -> None:
    reg = FakeRegistry(fault, auth="basic")
    fault.route(
        "POST",
        r"/v2/app/blobs/uploads/",
        lambda req: Reply(202, [("Location", f"{other.url}/upload/1")]),
    )
    c = make_client(fault, creds=Creds({fault.netloc: Credentials(reg.username, reg.password)}))
    with pytest.raises(RegistryError, match="another host"):
        c.push_blob(f"{fault.netloc}/app:v1", b"data", sha256(b"data"))
    assert other.requests == []
    assert any(r.header("Authorization") == reg.basic_header() for r in fault.requests)


def test_progressive_range_read_reports_the_body_as_it_arrives(fault: FaultServer) -> None:
    """``read_at_progressive``: the growing body after each piece, the whole range at the end
    (a 1 MiB range comes in 256 KiB pieces)."""
    big = random.Random(11).randbytes(1 << 20)
    reg = FakeRegistry(fault)
    reg.add_image("v1", [big])
    c = make_client(fault)
    src = c.blob_source(c.resolve(f"{fault.netloc}/app:v1"), sha256(big), len(big))
    seen: list[bytes] = []
    got = src.read_at_progressive(100, len(big) - 200, lambda buf: seen.append(bytes(buf)))
    assert got == big[100:-100]
    assert len(seen) >= 3
    assert all(s == big[100 : 100 + len(s)] for s in seen)
    assert [len(s) for s in seen] == sorted(len(s) for s in seen)
    assert seen[-1] == got
    assert src.round_trip() is not None


def _dribbled(multi: str) -> Callable[[Request, bytes], Reply]:
    """Range answers sent 16 KiB every millisecond (so that they arrive in pieces)."""

    def reply(req: Request, data: bytes) -> Reply:
        r = range_reply(data, req.header("Range"), multi=multi)
        r.dribble_body = 0.001
        r.dribble_chunk = 16 * 1024
        return r

    return reply


@pytest.mark.parametrize("mode", ["multipart", "coalesce", "refuse"])
def test_progressive_multi_range_read_reports_each_part_as_it_arrives(
    fault: FaultServer, mode: str
) -> None:
    """``read_ranges_progressive``: every report is ``(offset, bytes so far)`` of the blob, the
    first range's bytes are all reported before the second range's answer has all arrived
    (its part comes first in the multipart body), and the return value is what
    ``read_ranges`` gives. A registry that coalesces the ranges into one part is reported
    from that part's start; one that refuses multi-range answers gets a request per range
    (reported by the return value only, as those run in parallel)."""
    big = random.Random(12).randbytes(1 << 20)
    reg = FakeRegistry(fault, multi=mode, blob_reply=_dribbled(mode))
    reg.add_image("v1", [big])
    c = make_client(fault)
    src = c.blob_source(c.resolve(f"{fault.netloc}/app:v1"), sha256(big), len(big))
    ranges = [(100, 200_000), (600_000, 300_000)]
    seen: list[tuple[int, bytes]] = []
    got = src.read_ranges_progressive(ranges, lambda off, buf: seen.append((off, bytes(buf))))
    assert got == [big[o : o + n] for o, n in ranges]
    assert all(data == big[off : off + len(data)] for off, data in seen)
    if mode == "refuse":
        assert seen == []
        return
    starts = {off for off, _ in seen}
    assert starts == ({100, 600_000} if mode == "multipart" else {100})
    if mode == "multipart":
        first_done = next(i for i, (off, d) in enumerate(seen) if off == 100 and len(d) == 200_000)
        assert any(off == 600_000 and len(d) < 300_000 for off, d in seen[first_done:])
    assert len(seen) >= 3  # (the body is read 256 KiB at a time)


def test_progressive_multi_range_read_with_lying_part_headers_fails(fault: FaultServer) -> None:
    """Parts whose Content-Range is one byte off: the bytes reported are what the registry
    said they are (a reader that uses them checks them against their digests), and the read
    fails when the answer is in, since it lacks the bytes asked for."""
    big = random.Random(13).randbytes(300_000)

    def shifted(req: Request, data: bytes) -> Reply:
        return range_reply(data, req.header("Range"), wrong_content_range=True)

    reg = FakeRegistry(fault, blob_reply=shifted)
    reg.add_image("v1", [big])
    c = make_client(fault)
    src = c.blob_source(c.resolve(f"{fault.netloc}/app:v1"), sha256(big), len(big))
    seen: list[tuple[int, bytes]] = []
    with pytest.raises(RangeError):
        src.read_ranges_progressive(
            [(0, 1000), (200_000, 1000)], lambda off, buf: seen.append((off, bytes(buf)))
        )
    assert {off for off, _ in seen} <= {1, 200_001}
