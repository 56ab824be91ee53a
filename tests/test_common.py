"""layerstore.common: atomic writes, single-flight, negative cache, redaction, RFC 3339,
private Unix sockets."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from layerstore.common.atomicfile import atomic_output, write_atomic
from layerstore.common.negcache import NegativeCache
from layerstore.common.redact import describe_error, redact, redact_url
from layerstore.common.singleflight import SingleFlight
from layerstore.common.timefmt import parse_rfc3339, parse_rfc3339_ns
from layerstore.common.unixsock import (
    MessageTooLarge,
    UnixSocketError,
    UnixSocketServer,
    bind_private_unix,
    read_to_end,
    socket_is_live,
)


def test_write_atomic_replaces_and_sets_mode(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"old")
    write_atomic(p, b"new", durable=True, mode=0o640)
    assert p.read_bytes() == b"new"
    assert p.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_output_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(p, durable=False) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_single_flight_runs_once_for_concurrent_callers() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    calls = []
    gate = threading.Event()

    def work() -> int:
        calls.append(1)
        gate.wait(5)
        return 42

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(sf.do("k", work))) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while not sf.running("k") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join(5)
    assert results == [42] * 8
    assert len(calls) == 1
    assert len(sf) == 0
    assert sf.do("k", lambda: 7) == 7  # not a cache


def test_single_flight_shares_exceptions_and_waiter_timeout() -> None:
    sf: SingleFlight[str, int] = SingleFlight()
    gate = threading.Event()
    errors: list[BaseException] = []

    def fail() -> int:
        gate.wait(5)
        raise KeyError("x")

    def call() -> None:
        try:
            sf.do("k", fail)
        except BaseException as e:
            errors.append(e)

    owner = threading.Thread(target=call)
    owner.start()
    while not sf.running("k"):
        time.sleep(0.01)
    with pytest.raises(TimeoutError):
        sf.do("k", lambda: 1, timeout=0.05)
    waiter = threading.Thread(target=call)
    waiter.start()
    time.sleep(0.05)
    gate.set()
    owner.join(5)
    waiter.join(5)
    assert len(errors) == 2 and all(isinstance(e, KeyError) for e in errors)


def test_negative_cache_expires_and_is_bounded() -> None:
    now = [100.0]
    nc: NegativeCache[str, str] = NegativeCache(max_entries=3, clock=lambda: now[0])
    nc.put("a", "A", ttl=10)
    assert nc.get("a") == "A" and nc.hits == 1
    assert nc.expires_in("a") == pytest.approx(10)
    now[0] += 10
    assert nc.get("a") is None
    for k in "bcde":
        nc.put(k, k.upper(), ttl=5)
    assert len(nc) == 3 and nc.get("b") is None and nc.get("e") == "E"
    nc.put("z", "Z", ttl=0)
    assert nc.get("z") is None


def test_negative_cache_discard_if() -> None:
    nc: NegativeCache[tuple[str, str], int] = NegativeCache(max_entries=10)
    for i, k in enumerate([("a", "1"), ("b", "1"), ("a", "2")]):
        nc.put(k, i, ttl=60)
    assert sorted(nc.discard_if(lambda k, v: k[0] == "a")) == [("a", "1"), ("a", "2")]
    assert nc.get(("a", "1")) is None and nc.get(("b", "1")) == 1
    assert nc.discard_if(lambda k, v: v == 5) == [] and len(nc) == 1


def test_redaction() -> None:
    text = "GET https://user:pw@blob.example/x/y?X-Amz-Signature=SECRET#frag failed"
    out = redact(text)
    assert "SECRET" not in out and "pw" not in out and "https://blob.example/x/y" in out
    assert redact_url("https://u:p@h.example:8443/v2/a?sig=1") == "https://h.example:8443/v2/a"
    assert redact_url("http://[::1") == "<unparseable url>"
    assert (
        describe_error(ValueError("see http://h/p?token=abc"))
        == "ValueError: see http://h/p?<redacted>"
    )
    assert describe_error(ValueError()) == "ValueError"
    assert redact("GET https://h/p?sig=1#f done") == "GET https://h/p?<redacted> done"
    assert redact("http://a:b@h/p") == "http://h/p"
    assert redact("no url here") == "no url here"


def test_rfc3339() -> None:
    assert parse_rfc3339_ns("1970-01-01T00:00:00Z") == 0
    assert parse_rfc3339_ns("1970-01-01T01:00:00.123456789123+01:00") == 123_456_789
    assert parse_rfc3339(" 2020-01-01T00:00:01Z ") == 1577836801.0
    for bad in ("2020-13-01T00:00:00Z", "2020-01-01T25:00:00Z", "2020-01-01T00:00:00", "x"):
        with pytest.raises(ValueError):
            parse_rfc3339_ns(bad)


def test_private_socket_is_0600_and_never_takes_over_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = bind_private_unix(path)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert os.listdir(tmp_path) == ["s.sock"]  # the private directory is gone
        assert socket_is_live(path)
        with pytest.raises(UnixSocketError, match=r"in use .*: hint"):
            bind_private_unix(path, in_use_hint=": hint")
    finally:
        first.close()
    assert not socket_is_live(path)  # still there, nothing answers: stale
    bind_private_unix(path).close()  # a stale one is replaced
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UnixSocketError, match="not a socket"):
        bind_private_unix(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"


def test_read_to_end_stops_at_the_limit() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x" * 10)
        b.shutdown(socket.SHUT_WR)
        assert read_to_end(a, 10) == b"x" * 10
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x" * 11)
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(MessageTooLarge):
            read_to_end(a, 10)


class _Echo(UnixSocketServer):
    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(
            path,
            accept_thread="test-accept",
            connection_thread="test-conn",
            max_connections=1,
            listening_event="test_listening",
            failure_event="test_failed",
            error=RuntimeError,
        )
        self.gate = gate
        self.entered = threading.Event()

    def handle_connection(self, conn: socket.socket) -> None:
        self.entered.set()
        self.gate.wait(10)
        conn.sendall(read_to_end(conn, 100))

    def reply_busy(self, conn: socket.socket) -> None:
        conn.sendall(b"busy")


def _ask(path: Path, body: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(path))
        c.sendall(body)
        c.shutdown(socket.SHUT_WR)
        return read_to_end(c, 100)


def test_unix_socket_server_bounds_connections_and_removes_its_socket(tmp_path: Path) -> None:
    path = tmp_path / "e.sock"
    gate = threading.Event()
    with _Echo(path, gate) as server:
        with pytest.raises(RuntimeError, match="already serving"):
            server.start()
        held = threading.Thread(target=_ask, args=(path, b"first"))
        held.start()
        assert server.entered.wait(10)  # the one slot is taken
        with socket.socket(socket.AF_UNIX) as c:  # answered at once, before any request
            c.settimeout(10)
            c.connect(str(path))
            assert read_to_end(c, 100) == b"busy"
        gate.set()
        held.join(10)
        # The slot comes back once the first handler has returned (just after its answer).
        answer: bytes | None = None
        for _ in range(200):
            try:
                answer = _ask(path, b"third")
            except OSError:  # "busy" and closed before our request was read
                answer = None
            if answer == b"third":
                break
            time.sleep(0.05)
        assert answer == b"third"
    assert not path.exists()
