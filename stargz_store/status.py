"""What the running daemon tells ``stargz-store status`` and the metrics: one JSON-ready
document built from the components' snapshot APIs, and the cache operations.

The document (``"schema": 1``; fields are only ever added within a schema)::

    daemon      pid, version, uptime_seconds, root, mountpoint
    images      [{ref, manifest_digest, layers: [digest], users}]
    layers      [{digest, toc_digest, schemes, keys: [{ref, key, scheme, users}], users,
                  blob_size, bytes_fetched, requests, chunks, chunks_fetched,
                  verification_failures, chunks_in_flight, background_fill_running,
                  idle_seconds}]
    cache       {dir, entries, bytes, max_bytes, hits, misses, hit_rate, evicted,
                 removed_by_operator, toc_entries, toc_bytes}      (null: no cache)
    fetch       {mechanisms: {name: {requests, bytes, chunks, failures, seconds}},
                 latency_buckets: [upper bounds], latency_counts: {name: [per bucket]},
                 verification_failures, toc_requests}
    lookups     {layer_lookups, outcomes: {outcome: count}}
    in_flight   {lookups, foreground_fetches, chunks}
    fuse        the FUSE adapter's counters
    errors      {counts: {level: n}, recent: [{time, level, event, logger, fields}]}

Everything is read without waiting on I/O: the manager, fetchers and cache copy their
counters under their own (leaf) locks; the FUSE adapter's counters, which only the trio thread
writes, are copied without a lock (plain ints and one small dict, copied whole: at worst one
request behind).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any, Callable

from layerstore import errors as lse
from stargz_store.cmdline import version
from stargz_store.control import RequestError
from stargz_store.log import RECENT_EVENTS, RecentEvents

SCHEMA = 1

# Lookup failures by exception class, most specific first (the FUSE adapter counts them by
# class name). Anything else is "error".
_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (lse.NotEStargzError, "not_estargz"),
    (lse.VerificationError, "verification_failed"),
    (lse.FormatError, "invalid_layer"),
    (lse.LayerNotFoundError, "not_found"),
    (lse.NotFoundError, "not_found"),
    (lse.BlockedRegistryError, "blocked"),
    (lse.AuthenticationError, "unauthorized"),
    (lse.RegistryUnavailableError, "registry_unreachable"),
    (lse.RegistryError, "registry_error"),
    (lse.ManifestError, "invalid_image"),
    (lse.ImageReferenceError, "invalid_reference"),
    (lse.DigestError, "invalid_reference"),
)
_CLASSES = {cls.__name__: cls for cls, _ in _OUTCOMES}
OUTCOMES = (
    "resolved",
    "negative_cached",
    *dict.fromkeys(o for _, o in _OUTCOMES),
    "registries_conf_invalid",
    "error",
)
"""Every ``lookups.outcomes`` key (and metric label), in display order."""


def outcome_of(error_class: str) -> str:
    """The lookup outcome for a failure of this exception class name."""
    if error_class == "RegistriesConfError":
        return "registries_conf_invalid"
    cls = _CLASSES.get(error_class) or getattr(lse, error_class, None)
    if isinstance(cls, type):
        for base, outcome in _OUTCOMES:
            if issubclass(cls, base):
                return outcome
    return "error"


def _hit_rate(hits: int, misses: int) -> float | None:
    total = hits + misses
    return round(hits / total, 4) if total else None


class StatusSource:
    """The daemon's side: built in ``daemon.build_wiring`` from what it wired; any part may
    be None (a provider factory serves without a manager or cache)."""

    def __init__(
        self,
        *,
        root: str,
        manager: Any = None,
        cache: Any = None,
        fuse_stats: Callable[[], Any] | None = None,
        recent: RecentEvents = RECENT_EVENTS,
        started: float | None = None,
    ) -> None:
        self.root = root
        self.manager = manager
        self.cache = cache
        self.fuse_stats = fuse_stats
        self.mountpoint = ""
        self._recent = recent
        self._started = time.monotonic() if started is None else started

    def attach_fuse(self, stats: Any, mountpoint: str) -> None:
        """The FUSE adapter's counters (``StoreOperations.stats``) and the mount point."""
        self.fuse_stats = lambda: stats
        self.mountpoint = mountpoint

    # --- the protocol's operations ---------------------------------------------------------
    def handle(self, req: Mapping[str, Any]) -> Mapping[str, Any]:
        """:data:`stargz_store.control.Handler`."""
        op = req.get("op")
        if op == "status":
            return self.status()
        if op == "cache_prune":
            max_bytes = req.get("max_bytes")
            if max_bytes is not None and (
                not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0
            ):
                raise RequestError("max_bytes must be a non-negative integer or null")
            return self.cache_prune(max_bytes)
        if op == "cache_clear":
            return self.cache_clear()
        if op == "record_stop":
            return self.record_stop()
        raise RequestError(f"unknown operation {str(op)[:40]!r}")

    def cache_prune(self, max_bytes: int | None) -> dict[str, Any]:
        cache = self._need_cache()
        target = cache.max_bytes if max_bytes is None else max_bytes
        done = cache.prune(target)
        return {"target_bytes": target, **dataclasses.asdict(done), **self._cache_sizes()}

    def record_stop(self) -> dict[str, Any]:
        """End every recording session now and write its profile (``profiles --stop``)."""
        recorder = getattr(self.manager, "recorder", None) if self.manager is not None else None
        if recorder is None:
            raise RequestError("this daemon is not recording ([record] enabled, serve --record)")
        return {"written": [str(p) for p in recorder.finish_all()]}

    def cache_clear(self) -> dict[str, Any]:
        done = self._need_cache().clear()
        return {**dataclasses.asdict(done), **self._cache_sizes()}

    def _need_cache(self) -> Any:
        if self.cache is None:
            raise RequestError("this daemon has no chunk cache")
        return self.cache

    def _cache_sizes(self) -> dict[str, Any]:
        snap = self.cache.snapshot()
        return {
            "cache_bytes": snap.bytes,
            "cache_entries": snap.entries,
            "max_bytes": snap.max_bytes,
        }

    # --- the status document ---------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        fuse = self._fuse()
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "daemon": {
                "pid": os.getpid(),
                "version": version(),
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "root": self.root,
                "mountpoint": self.mountpoint,
            },
            "images": [],
            "layers": [],
            "cache": self._cache(),
            "fetch": None,
            "lookups": self._lookups(fuse),
            "in_flight": {"lookups": 0, "foreground_fetches": 0, "chunks": 0},
            "fuse": fuse,
            "errors": {"counts": self._recent.counts(), "recent": self._recent.recent()},
        }
        snapshot = getattr(self.manager, "snapshot", None)
        if snapshot is None:
            return doc
        snap = snapshot()
        doc["images"] = [
            {
                "ref": i.ref,
                "manifest_digest": i.manifest_digest,
                "layers": list(i.layers),
                "users": i.users,
            }
            for i in snap.images
        ]
        doc["layers"] = [
            {
                "digest": layer.digest,
                "toc_digest": layer.toc_digest,
                "schemes": layer.schemes,
                "keys": [dataclasses.asdict(k) for k in layer.keys],
                "users": layer.users,
                "blob_size": layer.blob_size,
                "bytes_fetched": layer.fetcher.stats.bytes_fetched,
                "requests": layer.fetcher.stats.requests,
                "chunks": layer.fetcher.chunks,
                "chunks_fetched": layer.fetcher.stats.chunks_fetched,
                "verification_failures": layer.fetcher.stats.verification_failures,
                "chunks_in_flight": layer.fetcher.chunks_in_flight,
                "background_fill_running": layer.fetcher.background_fill_running,
                "idle_seconds": round(layer.idle_seconds, 3),
            }
            for layer in snap.layers
        ]
        meter = snap.meter
        doc["fetch"] = {
            "mechanisms": {
                name: {
                    "requests": t.requests,
                    "bytes": t.bytes,
                    "chunks": t.chunks,
                    "failures": t.failures,
                    "seconds": round(t.seconds, 6),
                }
                for name, t in meter.by_mechanism.items()
            },
            "latency_buckets": list(meter.bucket_bounds),
            "latency_counts": {name: list(t.buckets) for name, t in meter.by_mechanism.items()},
            "verification_failures": meter.verification_failures,
            "toc_requests": snap.tail_requests,
        }
        doc["in_flight"] = {
            "lookups": snap.lookups_in_flight,
            "foreground_fetches": snap.foreground_fetches,
            "chunks": sum(layer.fetcher.chunks_in_flight for layer in snap.layers),
        }
        return doc

    def _cache(self) -> dict[str, Any] | None:
        snapshot = getattr(self.cache, "snapshot", None)
        if snapshot is None:
            return None
        c = snapshot()
        return {
            "dir": c.root,
            "entries": c.entries,
            "bytes": c.bytes,
            "max_bytes": c.max_bytes,
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": _hit_rate(c.hits, c.misses),
            "evicted": c.evicted,
            "removed_by_operator": c.removed_by_operator,
            "toc_entries": c.toc_entries,
            "toc_bytes": c.toc_bytes,
        }

    def _fuse(self) -> dict[str, Any] | None:
        stats = self.fuse_stats() if self.fuse_stats is not None else None
        if stats is None:
            return None
        out = dict(vars(stats))  # a copy: the trio thread keeps counting
        failed = out.get("failed_by_error")
        if isinstance(failed, dict):
            out["failed_by_error"] = dict(failed)
        return out

    @staticmethod
    def _lookups(fuse: Mapping[str, Any] | None) -> dict[str, Any]:
        outcomes = dict.fromkeys(OUTCOMES, 0)
        if fuse is None:
            return {"layer_lookups": 0, "outcomes": outcomes}
        outcomes["resolved"] = int(fuse.get("resolved", 0))
        outcomes["negative_cached"] = int(fuse.get("negative_hits", 0))
        for name, count in (fuse.get("failed_by_error") or {}).items():
            key = outcome_of(name)
            outcomes[key] = outcomes.get(key, 0) + int(count)
        return {"layer_lookups": int(fuse.get("lookups", 0)), "outcomes": outcomes}
