"""The operator's tools piece by piece, without FUSE or a registry: the fetch meter, the
cache's prune and clear, the control protocol, the status document and its readable form,
the metrics collector and listener, the log ring, and the daemon's registries.conf wiring."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from layerstore.errors import (
    BlockedRegistryError,
    LayerStoreError,
    NotEStargzError,
    VerificationError,
)
from layerstore.runtime import meter as m
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.fetcher import ChunkFetcher
from layerstore.source import BytesSource
from stargz_store import control, status_cmd
from stargz_store.config import ConfigError, parse_config_text, parse_metrics_listen
from stargz_store.log import RecentEvents
from stargz_store.metrics import MetricsError, MetricsServer
from stargz_store.status import OUTCOMES, StatusSource, outcome_of


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the fetch meter ------------------------------------------------------------------------------


def in_thread(name: str, fn: Any) -> None:
    t = threading.Thread(target=fn, name=name)
    t.start()
    t.join()


def test_meter_tells_mechanisms_by_thread_name() -> None:
    meter = m.FetchMeter()
    meter.observe(100, 2, 0.003)  # the test's own thread: a reader
    in_thread("stargz-background-fill", lambda: meter.observe(1000, 4, 0.2))
    in_thread("stargz-landmark-prefetch", lambda: meter.observe(10, 1, 40.0))
    in_thread("stargz-dependency-prefetch", meter.failed)
    in_thread("stargz-readahead_1", lambda: meter.observe(7, 1, 0.01))
    meter.verification_failed()
    snap = meter.snapshot()
    t = snap.by_mechanism
    assert list(t) == list(m.MECHANISMS)
    assert (t["foreground"].requests, t["foreground"].bytes, t["foreground"].chunks) == (1, 100, 2)
    assert t["background_fill"].bytes == 1000 and t["read_ahead"].bytes == 7
    assert t["dependency_prefetch"].failures == 1 and t["dependency_prefetch"].requests == 0
    assert snap.verification_failures == 1
    # buckets: 0.003 <= 0.005 (first), 0.2 <= 0.25, 0.01 <= 0.01 (inclusive), 40 > 30 (+Inf)
    assert t["foreground"].buckets[0] == 1
    assert t["background_fill"].buckets[m.LATENCY_BUCKETS.index(0.25)] == 1
    assert t["read_ahead"].buckets[m.LATENCY_BUCKETS.index(0.01)] == 1
    assert t["landmark_prefetch"].buckets[-1] == 1 and sum(t["landmark_prefetch"].buckets) == 1
    meter.observe(1, 1, 0.001)
    assert snap.by_mechanism["foreground"].requests == 1  # a snapshot is a copy


def test_fetcher_reports_each_mechanism_to_the_meter(tmp_path: Path) -> None:
    """Real fetcher threads: the reader's own request, ``fetch_async`` (the read-ahead pool),
    the background fill's thread; a chunk failing verification and a failed request."""
    from tests.test_fetcher import CountingSource, build_blob, fake_decode, small_settings

    payloads = [os.urandom(5000) for _ in range(12)]
    blob, chunks = build_blob(payloads)
    meter = m.FetchMeter()
    cache = ChunkCache(tmp_path, 1 << 30)
    settings = small_settings(background_idle_seconds=0.0, background_share=1.0)
    f = ChunkFetcher(CountingSource(BytesSource(blob)), cache, chunks, fake_decode, settings,
                     meter=meter)  # fmt: skip
    assert f.get_chunks(chunks[:2]) == payloads[:2]
    assert f.fetch_async(chunks[2:4]) == 2
    deadline = time.monotonic() + 30
    while not all(c.digest in cache for c in chunks[2:4]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert f.start_background_fill()
    f.join_background_fill(30)
    snap = meter.snapshot().by_mechanism
    sizes = [c.compressed_end - c.offset for c in chunks]
    assert snap["foreground"].bytes == sum(sizes[:2]) and snap["foreground"].chunks == 2
    assert snap["read_ahead"].bytes == sum(sizes[2:4]) and snap["read_ahead"].chunks == 2
    assert snap["background_fill"].chunks == 8 and snap["background_fill"].bytes >= sum(sizes[4:])
    assert f.snapshot().stats.bytes_fetched == sum(t.bytes for t in snap.values())
    f.close()

    bad = [dataclasses.replace(chunks[0], digest=dg(b"something else"))]
    g = ChunkFetcher(BytesSource(blob), cache, bad, fake_decode, small_settings(), meter=meter)
    with pytest.raises(VerificationError):
        g.get_chunks(bad)
    assert meter.snapshot().verification_failures == 1
    empty = ChunkCache(tmp_path / "empty", 1 << 20)  # chunk 5 is in the first cache
    short = ChunkFetcher(BytesSource(blob[:100]), empty, chunks[5:6], fake_decode,
                         small_settings(), meter=meter)  # fmt: skip
    with pytest.raises(LayerStoreError):
        short.get_chunks(chunks[5:6])
    assert meter.snapshot().by_mechanism["foreground"].failures == 1
    cache.close()
    empty.close()


# --- the cache: prune and clear -------------------------------------------------------------------


def filled(tmp_path: Path, n: int = 8, size: int = 1000) -> tuple[ChunkCache, list[bytes]]:
    c = ChunkCache(tmp_path, 1 << 20)
    blobs = [bytes([i]) * size for i in range(n)]
    for b in blobs:
        assert c.put(dg(b), b)
    return c, blobs


def files(root: Path) -> list[Path]:
    """The pack files (one per ``put``)."""
    return [p for p in (root / "packs").iterdir() if p.is_file()]


def pack_names(c: ChunkCache, blobs: list[bytes]) -> list[str]:
    """The pack files that hold *blobs* (all cached)."""
    out = []
    for b in blobs:
        loc = c.locate(dg(b))
        assert loc is not None
        out.append(loc[0].name)
    return sorted(out)


def test_prune_removes_least_recently_used_first(tmp_path: Path) -> None:
    c, blobs = filled(tmp_path)
    assert c.get(dg(blobs[0])) == blobs[0]  # now the most recently used
    done = c.prune(3500)
    assert (done.entries, done.bytes, done.tocs, done.remaining_bytes) == (5, 5000, 0, 3000)
    kept = [b for b in blobs if dg(b) in c]
    assert kept == [blobs[0], blobs[6], blobs[7]]
    assert sorted(p.name for p in files(tmp_path)) == pack_names(c, kept)
    snap = c.snapshot()
    assert (snap.bytes, snap.entries, snap.removed_by_operator, snap.evicted) == (3000, 3, 5, 0)
    assert c.prune(10**9).entries == 0
    with pytest.raises(ValueError):
        c.prune(-1)
    # a pruned chunk is simply a miss, and can be stored again
    assert c.get(dg(blobs[1])) is None and c.put(dg(blobs[1]), blobs[1])
    c.close()


def test_lru_evictions_are_counted_apart(tmp_path: Path) -> None:
    c = ChunkCache(tmp_path, 2500)
    for i in range(4):
        c.put(dg(bytes([i]) * 1000), bytes([i]) * 1000)
    snap = c.snapshot()
    assert (snap.evicted, snap.removed_by_operator, snap.entries) == (2, 0, 2)
    c.close()


def test_clear_removes_chunks_tocs_and_memory(tmp_path: Path) -> None:
    c, blobs = filled(tmp_path, n=4)
    c.put_toc("a-b", b"toc member")
    c.put_async(dg(b"pending" * 10), b"pending" * 10)
    done = c.clear()
    assert done.entries == 5 and done.tocs == 1 and done.remaining_bytes == 0
    assert done.bytes == 4000 + 70 + len(b"toc member")
    assert files(tmp_path) == [] and list((tmp_path / "toc").iterdir()) == []
    assert all(c.get(dg(b)) is None for b in blobs) and c.get_toc("a-b") is None
    snap = c.snapshot()
    assert (snap.entries, snap.bytes, snap.toc_entries, snap.packs) == (0, 0, 0, 0)
    # the shard directories stay: writing again works at once
    assert c.put(dg(blobs[2]), blobs[2]) and c.read(dg(blobs[2]), 10, 5) == blobs[2][10:15]
    c.close()


def test_clear_drops_chunks_not_written_yet(tmp_path: Path) -> None:
    data = os.urandom(3000)
    c = ChunkCache(tmp_path, 1 << 20)
    c.put_async(dg(data), data)  # pending (in memory) or just written: cleared either way
    c.clear()
    assert c.peek(dg(data), 0, 10) is None and c.read(dg(data), 0, 10) is None
    assert files(tmp_path) == []
    c.close()


def test_readers_during_clear_get_right_bytes_or_a_miss(tmp_path: Path) -> None:
    """Readers hammer the cache while it is cleared and refilled: every answer is either the
    exact bytes or None (never short, never another chunk's bytes), and the bookkeeping ends
    consistent with the directory."""
    c = ChunkCache(tmp_path, 1 << 30, max_open_files=4)
    blobs = [os.urandom(20000) for _ in range(24)]
    for b in blobs:
        c.put(dg(b), b)
    stop = threading.Event()
    bad: list[str] = []

    def reader(seed: int) -> None:
        i = seed
        while not stop.is_set():
            b = blobs[i % len(blobs)]
            got = c.read(dg(b), 100, 5000)
            if got is not None and got != b[100:5100]:
                bad.append(f"read {i}")
            whole = c.get(dg(b))
            if whole is not None and whole != b:
                bad.append(f"get {i}")
            i += 7

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            c.clear()
            for b in blobs[::2]:
                c.put(dg(b), b)
            c.prune(5 * 20000)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == []
    c.flush()
    on_disk = {p.name for p in files(tmp_path)}
    kept = [b for b in blobs if dg(b) in c]
    assert on_disk == set(pack_names(c, kept))
    assert c.total_bytes == sum(len(b) for b in kept)
    c.close()


# --- the control protocol -------------------------------------------------------------------------


@contextlib.contextmanager
def server(
    root: Path, handler: control.Handler, allowed: set[int] | None = None
) -> Iterator[control.ControlServer]:
    s = control.ControlServer(control.socket_path(root), handler, allowed_uids=allowed)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def raw_exchange(path: Path, body: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(body)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    doc: dict[str, Any] = json.loads(out)
    return doc


def test_control_protocol(tmp_path: Path) -> None:
    seen: list[Mapping[str, Any]] = []

    def handler(req: Mapping[str, Any]) -> Mapping[str, Any]:
        seen.append(req)
        if req.get("op") == "boom":
            raise RuntimeError("exploded")
        if req.get("op") != "echo":
            raise control.RequestError(f"unknown operation {req.get('op')!r}")
        return {"echo": req.get("x")}

    with server(tmp_path, handler) as s:
        st = os.lstat(s.path)
        assert oct(st.st_mode & 0o777) == "0o600"
        assert control.request(tmp_path, "echo", x=[1, "a"]) == {"echo": [1, "a"]}
        with pytest.raises(control.ControlError, match=r"the daemon refused: unknown operation"):
            control.request(tmp_path, "nope")
        with pytest.raises(control.ControlError, match=r"RuntimeError: exploded"):
            control.request(tmp_path, "boom")
        answer = raw_exchange(s.path, b'{"v": 2, "op": "echo"}')
        assert answer == {
            "v": 1,
            "ok": False,
            "error": "unsupported protocol version 2 (served: 1)",
        }
        assert raw_exchange(s.path, b"not json")["error"] == "request is not valid JSON"
        assert raw_exchange(s.path, b"[1]")["error"] == "request is not a JSON object"
        big = json.dumps({"v": 1, "op": "echo", "x": "y" * control.MAX_REQUEST}).encode()
        assert "larger than" in raw_exchange(s.path, big)["error"]
        # a second server on the same live socket is refused; the first keeps it
        other = control.ControlServer(s.path, handler)
        with pytest.raises(control.ControlError, match="in use"):
            other.start()
        assert control.request(tmp_path, "echo", x=1) == {"echo": 1}
    assert not s.path.exists()
    assert [r["op"] for r in seen] == ["echo", "nope", "boom", "echo"]
    with pytest.raises(control.NoDaemonError, match="no stargz-store daemon is running"):
        control.request(tmp_path, "echo")


def test_control_refuses_peers_not_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SO_PEERCRED: this process's uid is not in the allowed set here (the real set is root and
    the daemon's own uid; tests/test_operator_tools.py refuses a real other user)."""
    called: list[object] = []
    refused = pytest.raises(control.ControlError, match="permission denied by the daemon")
    with server(tmp_path, lambda r: called.append(r) or {}, allowed=set()), refused:
        control.request(tmp_path, "status")
    assert called == []


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = control.socket_path(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: what a killed daemon leaves
    with pytest.raises(control.NoDaemonError, match="nothing answers"):
        control.request(tmp_path, "status")
    with server(tmp_path, lambda r: {"ok": 1}):
        assert control.request(tmp_path, "status") == {"ok": 1}
    path.write_text("not a socket")
    with pytest.raises(control.ControlError, match="is not a socket"):
        control.ControlServer(path, lambda r: {}).start()


# --- the status document --------------------------------------------------------------------


def test_lookup_outcomes() -> None:
    assert outcome_of("NotEStargzError") == "not_estargz"
    assert outcome_of("BlockedRegistryError") == "blocked"
    assert outcome_of("AuthenticationError") == "unauthorized"
    assert outcome_of("NotFoundError") == outcome_of("LayerNotFoundError") == "not_found"
    assert outcome_of("TOCDigestMismatchError") == "verification_failed"
    assert outcome_of("ChunkDigestMismatchError") == "verification_failed"
    assert outcome_of("LimitExceededError") == "invalid_layer"
    assert outcome_of("RegistryUnavailableError") == "registry_unreachable"
    assert outcome_of("RangeError") == "registry_error"
    assert outcome_of("ReferenceError_") == "invalid_reference"
    assert outcome_of("RegistriesConfError") == "registries_conf_invalid"
    assert outcome_of("KeyError") == outcome_of("Nonsense") == "error"
    assert {outcome_of(n) for n in ("NotEStargzError", "KeyError")} <= set(OUTCOMES)


class FakeStats:
    def __init__(self) -> None:
        self.lookups, self.resolved, self.negative_hits, self.reads, self.read_errors = (
            9,
            4,
            2,
            5,
            1,
        )
        self.failed_by_error = {
            NotEStargzError.__name__: 2,
            BlockedRegistryError.__name__: 1,
            "ZeroDivisionError": 1,
        }


def test_status_without_manager_and_cache_operations(tmp_path: Path) -> None:
    source = StatusSource(root=str(tmp_path))
    source.attach_fuse(FakeStats(), "/mnt/x")
    doc = source.status()
    assert doc["schema"] == 1 and doc["layers"] == [] and doc["cache"] is None
    assert doc["daemon"]["mountpoint"] == "/mnt/x"
    out = doc["lookups"]["outcomes"]
    assert (out["resolved"], out["negative_cached"], out["not_estargz"]) == (4, 2, 2)
    assert (out["blocked"], out["error"], out["not_found"]) == (1, 1, 0)
    assert list(out) == list(OUTCOMES)
    with pytest.raises(control.RequestError, match="no chunk cache"):
        source.handle({"v": 1, "op": "cache_clear"})
    source.cache = ChunkCache(tmp_path / "c", 1 << 20)
    for b in (b"a" * 100, b"b" * 100, b"c" * 100):
        source.cache.put(dg(b), b)
    for bad in (-1, "10", True, 1.5):
        with pytest.raises(control.RequestError, match="non-negative integer"):
            source.handle({"op": "cache_prune", "max_bytes": bad})
    got = source.handle({"op": "cache_prune", "max_bytes": 150})
    assert (got["entries"], got["cache_bytes"], got["target_bytes"]) == (2, 100, 150)
    got = source.handle({"op": "cache_prune", "max_bytes": None})  # the cache's own limit
    assert got["entries"] == 0 and got["target_bytes"] == 1 << 20
    got = source.handle({"op": "cache_clear"})
    assert got["entries"] == 1 and got["cache_entries"] == 0
    with pytest.raises(control.RequestError, match="unknown operation"):
        source.handle({"op": "shutdown"})
    source.cache.close()
    json.dumps(source.status())  # JSON-ready throughout


def sample_doc() -> dict[str, Any]:
    layer = {
        "digest": "sha256:" + "a" * 64,
        "toc_digest": "sha256:" + "b" * 64,
        "schemes": ["compressed", "toc"],
        "keys": [
            {
                "ref": "r.example/app:1",
                "key": "sha256:" + "a" * 64,
                "scheme": "compressed",
                "users": 1,
            },
            {"ref": "r.example/app:2", "key": "sha256:" + "b" * 64, "scheme": "toc", "users": 2},
        ],
        "users": 3,
        "blob_size": 4 << 20,
        "bytes_fetched": 1 << 20,
    }
    return {
        "daemon": {
            "version": "9.9",
            "pid": 1,
            "uptime_seconds": 3725,
            "root": "/r",
            "mountpoint": "/m",
        },
        "images": [
            {
                "ref": "r.example/app:1",
                "manifest_digest": "sha256:" + "c" * 64,
                "layers": [layer["digest"]],
                "users": 1,
            }
        ],
        "layers": [layer],
        "cache": {
            "dir": "/r/cache",
            "entries": 3,
            "bytes": 3 << 20,
            "max_bytes": 10 << 30,
            "hits": 3,
            "misses": 1,
            "hit_rate": 0.75,
            "evicted": 0,
            "removed_by_operator": 2,
            "toc_entries": 1,
            "toc_bytes": 10,
        },
        "fetch": {
            "mechanisms": {
                "foreground": {"requests": 2, "bytes": 1 << 20, "failures": 0},
                "background_fill": {"requests": 1, "bytes": 5, "failures": 1},
            },
            "toc_requests": 1,
            "verification_failures": 0,
        },
        "lookups": {"layer_lookups": 4, "outcomes": {"resolved": 3, "blocked": 1, "error": 0}},
        "in_flight": {"lookups": 0, "foreground_fetches": 1, "chunks": 2},
        "errors": {
            "counts": {"warning": 1, "error": 0},
            "recent": [
                {
                    "time": "T",
                    "level": "warning",
                    "event": "chunk_fetch_failed",
                    "fields": {"error": "boom"},
                }
            ],
        },
    }


def test_render_readable_status() -> None:
    out = status_cmd.render(sample_doc())
    lines = out.splitlines()
    assert lines[0] == "stargz-store 9.9 (pid 1), up 1h02m; mount /m, root /r"
    assert "IMAGES (1)" in lines and "LAYERS (1 held, 1 in use)" in lines
    rows = [x for x in lines if "r.example/app:" in x and "sha256:aaaaaaaaaaaa" in x]
    assert len(rows) == 1 and "1.0 MiB / 4.0 MiB (25%)" in rows[0] and "compressed" in rows[0]
    second = next(x for x in lines if x.rstrip().endswith("r.example/app:2"))
    assert second.split() == ["toc", "2", "r.example/app:2"]  # same layer, second key
    assert any(
        x.startswith("CACHE      3.0 MiB of 10.0 GiB") and "hit rate 75.0%" in x for x in lines
    )
    assert "background fill 5 B (1 req, 1 failed)" in out
    assert "LOOKUPS    4 layer lookups: 3 resolved, 1 blocked" in lines
    assert "IN FLIGHT  0 lookups, 1 foreground fetches, 2 chunks" in lines
    assert lines[-1] == "  T warning chunk_fetch_failed error=boom"
    assert status_cmd.human_bytes(0) == "0 B" and status_cmd.human_bytes(1536) == "1.5 KiB"
    assert (
        status_cmd.human_duration(59.5) == "59.5s" and status_cmd.human_duration(90000) == "1d01h"
    )


# --- the log ring ---------------------------------------------------------------------------------


def test_recent_events_ring() -> None:
    ring = RecentEvents(size=3, value_chars=10)
    for i in range(5):
        ring(
            None,
            "warning",
            {
                "event": f"e{i}",
                "level": "warning",
                "timestamp": "t",
                "error": "x" * 50,
                "_record": object(),
            },
        )
    ring(None, "info", {"event": "quiet", "level": "info"})
    ring(None, "error", {"event": "bad", "level": "error", "exc_info": True})
    got = ring.recent()
    assert [e["event"] for e in got] == ["e3", "e4", "bad"]
    assert got[0]["fields"] == {"error": "x" * 10}
    assert got[-1]["fields"] == {}
    assert ring.counts() == {"warning": 5, "error": 1, "critical": 0}


def test_configured_logging_feeds_the_daemon_ring(capsys: pytest.CaptureFixture[str]) -> None:
    from stargz_store.log import RECENT_EVENTS, scoped_logging

    before = RECENT_EVENTS.counts()["warning"]
    with scoped_logging("info", "json"):
        structlog.stdlib.get_logger("t").warning("ring_test_event", ref="x")
        logging.getLogger("urllib3").warning("foreign %s", "line")
    assert RECENT_EVENTS.counts()["warning"] == before + 2
    events = [e["event"] for e in RECENT_EVENTS.recent()]
    assert "ring_test_event" in events and "foreign line" in events


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_listen_values(tmp_path: Path) -> None:
    assert parse_metrics_listen("127.0.0.1:9101", tmp_path) == ("tcp", ("127.0.0.1", 9101))
    assert parse_metrics_listen("[::1]:9", tmp_path) == ("tcp", ("::1", 9))
    assert parse_metrics_listen("localhost:9", tmp_path) == ("tcp", ("localhost", 9))
    assert parse_metrics_listen("unix:m.sock", tmp_path) == ("unix", tmp_path / "m.sock")
    assert parse_metrics_listen("unix:/run/m.sock", tmp_path) == ("unix", Path("/run/m.sock"))
    for bad in ("9101", "host:9", "1.2.3.4:x", "1.2.3.4:70000", "unix:", ":9"):
        with pytest.raises(ValueError):
            parse_metrics_listen(bad, tmp_path)
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse_config_text('[metrics]\nlisten = "example.com:80"\n')
    assert parse_config_text("").metrics.listen == ""


def scrape(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        text = resp.read().decode()
    finally:
        conn.close()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_server_over_tcp(tmp_path: Path) -> None:
    source = StatusSource(root=str(tmp_path))
    source.attach_fuse(FakeStats(), "/m")
    source.cache = ChunkCache(tmp_path / "c", 1 << 20)
    source.cache.put(dg(b"x" * 10), b"x" * 10)
    source.cache.get(dg(b"x" * 10))
    server = MetricsServer("127.0.0.1:0", source, tmp_path)
    server.start()
    try:
        port = server.address[1]
        fams = scrape(port)
        lookups = {s.labels["outcome"]: s.value for s in fams["stargz_store_layer_lookups"].samples}
        assert lookups["resolved"] == 4 and lookups["blocked"] == 1 and lookups["error"] == 1
        assert fams["stargz_store_cache_hits"].samples[0].value == 1
        assert fams["stargz_store_cache_bytes"].samples[0].value == 10
        assert fams["stargz_store_fuse_read_errors"].samples[0].value == 1
        assert "stargz_store_fetch_duration_seconds" not in fams  # no manager: no fetching
        # a second listener on the same port: one readable error
        with pytest.raises(MetricsError, match=r"\[metrics\] listen = '127.0.0.1:\d+': "):
            MetricsServer(f"127.0.0.1:{port}", source, tmp_path).start()
    finally:
        server.stop()
        source.cache.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_daemon_fails_to_start_when_metrics_cannot_listen(tmp_path: Path) -> None:
    from stargz_store import daemon

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        cfg = parse_config_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        wiring = daemon.Wiring(provider=object())
        with pytest.raises(daemon.DaemonError, match="Address already in use"):
            daemon.start_operator_services(wiring, cfg, tmp_path)
        wiring.close()  # the control socket it had started is closed again
        assert not (tmp_path / "control.sock").exists()
    finally:
        busy.close()


# --- the daemon's registries.conf wiring ---------------------------------------------------


def test_wiring_watches_registries_conf_and_its_credential_helpers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stargz_store import daemon

    monkeypatch.delenv(daemon.PROVIDER_FACTORY_ENV, raising=False)
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
    conf = tmp_path / "registries.conf"
    conf.write_text('credential-helpers = ["one", "containers-auth.json"]\n')
    text = (
        f'[registry]\nregistries_conf = "{conf}"\nregistries_conf_d = "{tmp_path}/d"\n'
        "registries_conf_check_seconds = 0.01\n[auth]\nextra_auth_files = []\nhelper_socket = ''\n"
    )
    wiring = daemon.build_wiring(parse_config_text(text), tmp_path)
    try:
        creds = wiring.provider.client.auth._credentials  # the CredentialStore
        assert tuple(creds._credential_helpers()) == ("one", "containers-auth.json")
        replaced = tmp_path / "new.conf"
        replaced.write_text(
            'credential-helpers = ["two"]\n[[registry]]\nlocation = "x.example"\nblocked = true\n'
        )
        os.replace(replaced, conf)
        time.sleep(0.05)  # past the check interval
        assert tuple(creds._credential_helpers()) == ("two",)
        with pytest.raises(BlockedRegistryError):
            wiring.provider.get("x.example/a:1", "sha256:" + "a" * 64)
    finally:
        wiring.close()
    # 0: read once at start (a plain RegistriesConf)
    wiring = daemon.build_wiring(parse_config_text(text.replace("= 0.01", "= 0")), tmp_path)
    try:
        assert type(wiring.provider.client._registries).__name__ == "RegistriesConf"
    finally:
        wiring.close()
