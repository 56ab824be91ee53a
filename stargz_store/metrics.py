"""Prometheus metrics: off unless ``[metrics] listen`` is set, to ``"HOST:PORT"`` (TCP) or
``"unix:PATH"`` (a Unix socket, mode 0600, relative to ``--root`` unless absolute).

The metrics are not counters kept beside the code they count: one custom collector reads the
same snapshot as ``stargz-store status`` (:class:`stargz_store.status.StatusSource`) at each
scrape, into a private :class:`~prometheus_client.CollectorRegistry` (nothing of the process
default registry, no global state). The fetch latency histogram comes from the fetchers'
shared meter (:mod:`layerstore.runtime.meter`), which counts requests into fixed buckets.

Families (all ``stargz_store_*``; counters restart at 0 with the daemon):

==========================================  =======  ===========================================
``layer_lookups_total{outcome}``            counter  layer lookups by outcome (``resolved``,
                                                     ``negative_cached``, ``not_estargz``, ...)
``fetch_duration_seconds{mechanism}``       histo.   range requests to registries
``fetch_requests_total{mechanism}``         counter  answered range requests
``fetch_bytes_total{mechanism}``            counter  compressed bytes received
``fetch_failures_total{mechanism}``         counter  failed range requests
``chunk_verification_failures_total``       counter  chunks that did not match their digest
``toc_requests_total``                      counter  range requests for TOCs (blob tails)
``cache_hits_total``, ``cache_misses_total``  counter  chunk cache lookups
``cache_evictions_total{reason}``           counter  ``size_limit`` (LRU) or ``operator`` (prune,
                                                     clear)
``cache_bytes``, ``cache_max_bytes``,       gauge    the chunk cache
``cache_entries``
``layers_held``, ``layers_in_use``,         gauge    layers in memory, those with users; images
``images``
``in_flight{what}``                         gauge    ``lookups``, ``foreground_fetches``,
                                                     ``chunks``
``fuse_reads_total``,                       counter  FUSE read requests, failed ones
``fuse_read_errors_total``
``log_events_total{level}``                 counter  warning and error log events
``info{version}``                           gauge    always 1
==========================================  =======  ===========================================

``mechanism`` is one of ``foreground``, ``read_ahead``, ``landmark_prefetch``,
``dependency_prefetch``, ``dependency_fetch``, ``profile_prefetch``, ``background_fill``
(``docs/CONCURRENCY.md``).

The HTTP server is wsgiref serving prometheus_client's WSGI app, on one thread
(``stargz-metrics-http``; a scrape takes milliseconds, and a client that stalls is cut off
after ``CONNECTION_TIMEOUT``), on TCP or on an ``AF_UNIX`` socket.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from layerstore.common.unixsock import UnixSocketError, bind_private_unix
from stargz_store.config import parse_metrics_listen
from stargz_store.log import get_logger
from stargz_store.status import StatusSource

log = get_logger(__name__)

PREFIX = "stargz_store"
CONNECTION_TIMEOUT = 10.0


class MetricsError(Exception):
    """The metrics listener cannot start; one user-facing line."""


# --- the collector -------------------------------------------------------------------------------


class StoreCollector(Collector):
    """Metric families from one status snapshot per scrape."""

    def __init__(self, source: StatusSource) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []  # no collection at registration time

    def collect(self) -> Iterator[Metric]:
        doc = self._source.status()
        yield from _lookups(doc)
        yield from _fetch(doc)
        yield from _cache(doc)
        yield from _layers(doc)
        yield from _fuse_and_log(doc)


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def _lookups(doc: dict[str, Any]) -> Iterator[Metric]:
    m = _counter("layer_lookups", "Layer lookups by outcome.", ["outcome"])
    for outcome, count in doc["lookups"]["outcomes"].items():
        m.add_metric([outcome], count)
    yield m


def _fetch(doc: dict[str, Any]) -> Iterator[Metric]:
    fetch = doc.get("fetch")
    if fetch is None:
        return
    mechanisms = fetch["mechanisms"]
    hist = HistogramMetricFamily(
        f"{PREFIX}_fetch_duration_seconds",
        "Range requests to registries, from the wait for a request slot to the last byte.",
        labels=["mechanism"],
    )
    bounds = fetch["latency_buckets"]
    for name, counts in fetch["latency_counts"].items():
        cumulative, buckets = 0, []
        for bound, n in zip([*bounds, float("inf")], counts):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        hist.add_metric([name], buckets, mechanisms[name]["seconds"])
    yield hist
    for key, name, text in (
        ("requests", "fetch_requests", "Answered range requests to registries."),
        ("bytes", "fetch_bytes", "Compressed bytes received from registries."),
        ("failures", "fetch_failures", "Failed range requests (after retries)."),
    ):
        m = _counter(name, text, ["mechanism"])
        for mech, totals in mechanisms.items():
            m.add_metric([mech], totals[key])
        yield m
    m = _counter("chunk_verification_failures", "Chunks that did not match their digest.")
    m.add_metric([], fetch["verification_failures"])
    yield m
    m = _counter("toc_requests", "Range requests for layer TOCs (blob tails).")
    m.add_metric([], fetch["toc_requests"])
    yield m


def _cache(doc: dict[str, Any]) -> Iterator[Metric]:
    cache = doc.get("cache")
    if cache is None:
        return
    for key, name, text in (
        ("hits", "cache_hits", "Chunk cache hits."),
        ("misses", "cache_misses", "Chunk cache misses."),
    ):
        m = _counter(name, text)
        m.add_metric([], cache[key])
        yield m
    m = _counter("cache_evictions", "Chunks removed from the cache.", ["reason"])
    m.add_metric(["size_limit"], cache["evicted"])
    m.add_metric(["operator"], cache["removed_by_operator"])
    yield m
    for key, name, text in (
        ("bytes", "cache_bytes", "Bytes of chunks in the cache."),
        ("max_bytes", "cache_max_bytes", "The cache's size limit."),
        ("entries", "cache_entries", "Chunks in the cache."),
    ):
        g = _gauge(name, text)
        g.add_metric([], cache[key])
        yield g


def _layers(doc: dict[str, Any]) -> Iterator[Metric]:
    layers = doc["layers"]
    for name, text, value in (
        ("layers_held", "Layers held in memory.", len(layers)),
        ("layers_in_use", "Layers with users.", sum(1 for x in layers if x["users"] > 0)),
        ("images", "Image references resolved and held.", len(doc["images"])),
    ):
        g = _gauge(name, text)
        g.add_metric([], value)
        yield g
    g = _gauge("in_flight", "Work in flight.", ["what"])
    for what, value in doc["in_flight"].items():
        g.add_metric([what], value)
    yield g


def _fuse_and_log(doc: dict[str, Any]) -> Iterator[Metric]:
    fuse = doc.get("fuse")
    if fuse is not None:
        for key, name, text in (
            ("reads", "fuse_reads", "FUSE read requests."),
            ("read_errors", "fuse_read_errors", "FUSE read requests answered with an error."),
        ):
            m = _counter(name, text)
            m.add_metric([], fuse.get(key, 0))
            yield m
    m = _counter("log_events", "Warning and error log events.", ["level"])
    for level, count in doc["errors"]["counts"].items():
        m.add_metric([level], count)
    yield m
    g = _gauge("info", "The daemon's version.", ["version"])
    g.add_metric([doc["daemon"]["version"]], 1)
    yield g


def make_registry(source: StatusSource) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(source))
    return registry


# --- the listener --------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would flood the log


class _TCPServer(WSGIServer):
    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        conn.settimeout(CONNECTION_TIMEOUT)
        return conn, addr


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(_TCPServer):
    """wsgiref on a Unix socket: the listener comes from :func:`bind_private_unix` (0600),
    and peers get a placeholder address (wsgiref puts ``client_address[0]`` in
    ``REMOTE_ADDR``)."""

    address_family = socket.AF_UNIX

    def __init__(self, path: Path) -> None:
        # (typeshed types server_address as (host, port); AF_UNIX takes a path)
        super().__init__(str(path), _QuietHandler, bind_and_activate=False)  # type: ignore[arg-type]
        self.socket.close()
        self.socket = bind_private_unix(path)
        self.server_name, self.server_port = "localhost", 0
        self.setup_environ()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        conn.settimeout(CONNECTION_TIMEOUT)
        return conn, ("unix", 0)


class MetricsServer:
    """``/metrics`` (any path) over HTTP on TCP or a Unix socket; ``start`` then ``stop``."""

    def __init__(self, listen: str, source: StatusSource, root: str | os.PathLike[str]) -> None:
        try:
            self._kind, self._address = parse_metrics_listen(listen, root)
        except ValueError as e:
            raise MetricsError(f"[metrics] listen: {e}") from None
        self._listen = listen
        self._app = make_wsgi_app(make_registry(source))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    @property
    def address(self) -> Any:
        """(host, port) actually bound (port 0 picks one), or the socket path."""
        if self._server is None or self._kind == "unix":
            return self._address
        host, port = self._server.server_address[:2]
        return host, port

    def start(self) -> None:
        try:
            if self._kind == "unix":
                path: Path = self._address
                server: WSGIServer = _UnixServer(path)
                self._inode = os.lstat(path).st_ino
            else:
                host, port = self._address
                cls = _TCP6Server if ":" in host else _TCPServer
                server = cls((host, port), _QuietHandler)
        except UnixSocketError as e:
            raise MetricsError(f"[metrics] listen = {self._listen!r}: {e}") from None
        except OSError as e:
            raise MetricsError(f"[metrics] listen = {self._listen!r}: {e.strerror or e}") from None
        server.set_app(self._app)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5},
            name="stargz-metrics-http", daemon=True,
        )  # fmt: skip
        self._thread.start()
        log.info("metrics_listening", listen=self._listen, address=str(self.address))

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._kind == "unix":
            with contextlib.suppress(OSError):
                if self._inode is not None and os.lstat(self._address).st_ino == self._inode:
                    os.unlink(self._address)
