"""Total deadlines and bulkheads below the daemon: the arithmetic, the budget scopes, the
watchdog against fault-injecting servers (tests/faultserver.py), token-server redirects, and
the per-key shares of shared pools. The daemon-level tests are in test_registry_hangs.py.

Time bounds here are generous functional limits: without a total deadline each case takes
minutes (a dribbling server) or the sum of every retry's backoff.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from auth.types import Credentials
from layerstore.common.bulkhead import Bulkhead, KeyedLimiters, share_limit
from layerstore.errors import (
    AuthenticationError,
    DeadlineExceededError,
    RegistryError,
    RegistryUnavailableError,
)
from layerstore.registry import deadline as dl
from layerstore.registry.client import RegistryClient, RegistrySettings
from tests.faultserver import FakeRegistry, FaultServer, Reply, Request, range_reply, sha256

BLOB = bytes(range(256)) * 1024  # 256 KiB


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer("127.0.0.1") as srv:
        yield srv


@pytest.fixture
def other() -> Iterator[FaultServer]:
    with FaultServer("127.0.0.2") as srv:
        yield srv


class Creds:
    def __init__(self, creds: Credentials) -> None:
        self.creds = creds

    def lookup(self, host: str, repository: str) -> Credentials | None:
        return self.creds


def client(*servers: FaultServer, creds: Credentials | None = None, **kw: object) -> RegistryClient:
    settings: dict[str, object] = {
        "insecure_registries": frozenset(s.netloc for s in servers),
        "connect_timeout": 2.0,
        "read_timeout": 3.0,
        "retries": 2,
        "backoff_factor": 0.01,
        "max_backoff": 0.2,
        "request_deadline": 1.5,
    }
    settings.update(kw)
    provider = Creds(creds) if creds is not None else None
    return RegistryClient(provider, settings=RegistrySettings(**settings))  # type: ignore[arg-type]


def image(reg: FakeRegistry) -> tuple[str, str]:
    reg.add_image("v1", [BLOB])
    return f"{reg.server.netloc}/app:v1", sha256(BLOB)


def timed(fn: object) -> tuple[BaseException | None, float]:
    t0 = time.monotonic()
    try:
        fn()  # type: ignore[operator]
    except Exception as exc:
        return exc, time.monotonic() - t0
    return None, time.monotonic() - t0


# --- the arithmetic -------------------------------------------------------------------------------
def test_budget_seconds() -> None:
    assert dl.budget_seconds(30.0) == 30.0
    assert dl.budget_seconds(30.0, 0, 131072) == 30.0
    # 50 MB over the 128 KiB/s floor: 30 s + 381.5 s
    assert dl.budget_seconds(30.0, 50_000_000, 131072) == pytest.approx(30.0 + 381.47, abs=0.01)
    assert dl.budget_seconds(2.0, 1024, 512) == 4.0
    assert dl.budget_seconds(2.0, 1024, 0) == 2.0  # no rate: no allowance for the body
    with pytest.raises(ValueError):
        dl.budget_seconds(-1.0)


def test_deadline_arithmetic() -> None:
    d = dl.Deadline.after(10.0, now=100.0)
    assert (d.at, d.seconds) == (110.0, 10.0)
    assert d.remaining(now=104.0) == 6.0
    assert d.remaining(now=111.0) == 0.0
    assert not d.expired(now=109.9) and d.expired(now=110.0)
    assert d.cap(30.0, now=104.0) == 6.0  # a socket timeout never outlives the deadline
    assert d.cap(2.0, now=104.0) == 2.0
    assert d.cap(2.0, now=120.0) == dl.MIN_SOCKET_TIMEOUT  # never 0 (non-blocking)


def test_nested_budgets_never_extend_the_outer_one() -> None:
    assert dl.current() is None
    with dl.budget(1.0) as outer:
        assert dl.current() is outer
        with dl.budget(100.0) as inner:
            assert inner.at == outer.at  # capped by the caller's budget
        with dl.budget(0.2) as shorter:
            assert shorter.at < outer.at
            assert dl.current() is shorter
        assert dl.current() is outer
    assert dl.current() is None


def test_share_limit() -> None:
    assert share_limit(16, 0.5) == 8
    assert share_limit(32, 0.5) == 16
    assert share_limit(3, 0.5) == 2
    assert share_limit(1, 0.1) == 1
    assert share_limit(8, 1.0) == 8
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            share_limit(8, bad)
    with pytest.raises(ValueError):
        share_limit(0, 0.5)


# --- bulkheads ------------------------------------------------------------------------------------
def test_bulkhead_key_share_and_total() -> None:
    b = Bulkhead(total=4, per_key=2)
    assert b.acquire("a", timeout=0) and b.acquire("a", timeout=0)
    assert not b.acquire("a", timeout=0.05)  # registry a is at its share
    assert b.acquire("b", timeout=0) and b.acquire("b", timeout=0)  # b still gets its own
    assert not b.acquire("c", timeout=0.05)  # the pool is full
    assert (b.in_use(), b.in_use("a"), b.in_use("c")) == (4, 2, 0)
    b.release("a")
    assert b.acquire("c", timeout=0)
    with pytest.raises(RuntimeError):
        b.release("zzz")


def test_bulkhead_slot_wakes_a_waiter() -> None:
    b = Bulkhead(total=2, per_key=1)
    slot = b.slot("a")
    got: list[str] = []
    with slot:
        t = threading.Thread(target=lambda: (slot.__enter__(), got.append("in"), slot.__exit__()))
        t.start()
        t.join(0.2)
        assert got == []  # waits for registry a's only slot
        assert b.acquire("b", timeout=0)  # while registry b is served
        b.release("b")
    t.join(5)
    assert got == ["in"]
    assert b.in_use() == 0


def test_keyed_limiters_live_while_borrowed() -> None:
    made: list[int] = []

    def factory(n: int) -> object:
        made.append(n)
        return object()

    kl: KeyedLimiters[object] = KeyedLimiters(3, factory)
    with kl.borrow("a") as first, kl.borrow("a") as second:
        assert first is second
        with kl.borrow("b") as third:
            assert third is not first
        assert len(kl) == 1
    assert len(kl) == 0  # nothing kept for keys no longer in use
    assert made == [3, 3]


# --- the watchdog against misbehaving servers -----------------------------------------------------
def test_dribbling_range_body_is_cut_at_the_deadline(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    ref, digest = image(reg)

    def dribble(req: Request, data: bytes) -> Reply:
        reply = range_reply(data, req.header("Range"))
        reply.dribble_body = 0.5  # under read_timeout: an idle timeout never fires
        return reply

    with client(fault) as c:
        src = c.blob_source(c.resolve(ref), digest, len(BLOB))
        reg.blob_reply = dribble
        err, took = timed(lambda: src.read_at(0, 4096))
    assert isinstance(err, DeadlineExceededError), err
    assert took < 10, took  # 4096 bytes at 2 B/s would take 34 minutes
    assert fault.netloc in str(err) and "deadline" in str(err)


@pytest.mark.parametrize("mode", ["headers", "body", "never"])
def test_manifest_that_never_completes_is_cut_at_the_deadline(
    fault: FaultServer, mode: str
) -> None:
    reg = FakeRegistry(fault)
    ref, _ = image(reg)

    def misbehave(req: Request, body: bytes, media_type: str) -> Reply:
        reply = Reply(200, [("Content-Type", media_type)], body)
        if mode == "headers":
            reply.dribble_headers = 0.5
        elif mode == "body":
            reply.dribble_body = 0.5
        else:
            reply.never_answer = True
        return reply

    reg.manifest_reply = misbehave
    with client(fault, read_retries=3) as c:
        err, took = timed(lambda: c.resolve(ref))
    assert isinstance(err, DeadlineExceededError), err
    # request_deadline 1.5 s for the whole resolution, retries included
    assert took < 10, took


def test_slow_but_honest_range_completes(fault: FaultServer) -> None:
    """64 KiB at ~20 KiB/s (3.2 s): over request_deadline alone, inside the size-scaled
    budget (2 s + 64 KiB at 8 KiB/s)."""
    reg = FakeRegistry(fault)
    ref, digest = image(reg)

    def paced(req: Request, data: bytes) -> Reply:
        reply = range_reply(data, req.header("Range"))
        reply.dribble_body, reply.dribble_chunk = 0.4, 8192
        return reply

    with client(fault, request_deadline=2.0, min_bytes_per_second=8192) as c:
        src = c.blob_source(c.resolve(ref), digest, len(BLOB))
        reg.blob_reply = paced
        assert src.read_at(1000, 65536) == BLOB[1000 : 1000 + 65536]


def test_retries_count_against_the_budget(fault: FaultServer) -> None:
    """Five retries of a 503 with long backoffs: the budget ends them, not the retry count."""
    fault.route("GET", r"/v2/.*", lambda req: Reply(503, [("Retry-After", "8")]))
    with client(fault, retries=5, backoff_factor=4.0, max_backoff=8.0) as c:
        err, took = timed(lambda: c.resolve(f"{fault.netloc}/app:v1"))
    assert isinstance(err, RegistryUnavailableError), err
    assert took < 10, took  # without the budget: 5 sleeps of 8 s
    assert fault.count("GET") <= 3


def test_a_connection_back_in_the_pool_survives_its_scope(fault: FaultServer) -> None:
    """The watchdog only ends connections still in use by the scope whose deadline passed."""
    reg = FakeRegistry(fault)
    ref, _ = image(reg)
    with client(fault, retries=0, read_retries=0) as c:
        with dl.budget(2.0):
            c.resolve(ref)
            time.sleep(2.3)  # the scope's deadline passes; its connection is in the pool
        c.resolve(ref)  # a fresh scope: the pooled connection is reused, not cut
    ports = [r.client_port for r in fault.requests if "/manifests/" in r.path]
    assert len(ports) == 2 and ports[0] == ports[1], ports


def test_a_request_past_the_deadline_is_not_sent(fault: FaultServer) -> None:
    reg = FakeRegistry(fault)
    ref, _ = image(reg)
    with client(fault) as c, dl.budget(0.05):
        time.sleep(0.1)
        with pytest.raises(DeadlineExceededError):
            c.resolve(ref)
    assert fault.count(path=r"/v2/.*/manifests/.*") == 0


# --- token server redirects -----------------------------------------------------------------------
REFRESH = "refresh-token-" + "9c3e" * 6


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_token_post_is_never_redirected(
    fault: FaultServer, other: FaultServer, status: int
) -> None:
    reg = FakeRegistry(fault, auth="bearer")
    ref, _ = image(reg)
    fault.route("POST", r"/token", lambda req: Reply(status, [("Location", f"{other.url}/t")]))
    other.route("*", r"/t", lambda req: Reply(200, [], b'{"token": "stolen"}'))
    creds = Credentials(username="alice", identity_token=REFRESH)
    with client(fault, other, creds=creds) as c, pytest.raises(AuthenticationError) as info:
        c.resolve(ref)
    assert f"token server {fault.netloc}" in str(info.value)
    assert other.netloc in str(info.value)
    assert REFRESH not in str(info.value)
    assert not other.requests, [(r.method, r.path) for r in other.requests]
    posts = [r for r in fault.requests if r.method == "POST"]
    assert len(posts) == 1 and REFRESH.encode() in posts[0].body


def test_token_get_redirect_drops_credentials_on_another_origin(
    fault: FaultServer, other: FaultServer
) -> None:
    reg = FakeRegistry(fault, auth="bearer")
    ref, _ = image(reg)
    fault.clear_routes()
    fault.route("GET", r"/token", lambda req: Reply(302, [("Location", f"{other.url}/issue")]))
    FakeRegistry.__post_init__(reg)  # the registry's own routes after the redirecting one
    other.route(
        "GET",
        r"/issue",
        lambda req: Reply(200, [("Content-Type", "application/json")], b'{"token": "%s"}'
                          % reg.token.encode()),
    )  # fmt: skip
    creds = Credentials(username=reg.username, password=reg.password)
    with client(fault, other, creds=creds) as c:
        assert c.resolve(ref).manifest.layers[0].digest == sha256(BLOB)
    issued = [r for r in other.requests if r.path == "/issue"]
    assert issued, "the redirect was not followed"
    assert all(r.header("Authorization") is None for r in issued)
    assert any(r.header("Authorization") == reg.basic_header() for r in fault.requests)


def test_token_get_redirect_loop_is_bounded(fault: FaultServer) -> None:
    reg = FakeRegistry(fault, auth="bearer")
    ref, _ = image(reg)
    fault.clear_routes()
    fault.route("GET", r"/token", lambda req: Reply(302, [("Location", "/token")]))
    FakeRegistry.__post_init__(reg)
    with client(fault, max_redirects=3) as c, pytest.raises(RegistryError):
        c.resolve(ref)
    assert fault.count("GET", r"/token") == 4
