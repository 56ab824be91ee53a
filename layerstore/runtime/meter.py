"""Totals of registry fetching per mechanism, for ``stargz-store status`` and the metrics.

One :class:`FetchMeter` per :class:`~layerstore.runtime.manager.LayerManager`, shared by the
fetchers of all its layers (like the manager's ``Activity``), so the totals only grow: a
layer dropped from memory keeps its bytes counted (Prometheus reads a counter that goes down as
a restart of the process).

Which mechanism a request serves is told by the thread that makes it: every thread that
fetches ahead of readers is named after its mechanism (``docs/CONCURRENCY.md``, "One name per
fetch mechanism"), and anything else is a reader's own (*foreground*) request, including the
read-ahead that rides in that request. Tagging by thread name needs no argument threaded
through the fetch path, and a new mechanism gets its name in the same place as its thread.

The latency histogram counts whole range requests (one ``read_ranges`` call, one HTTP request
where the registry allows multi-range answers), from before the wait for a request slot
(``[fetch] concurrency``) to the last byte: what a reader waits for.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

FOREGROUND = "foreground"
READ_AHEAD = "read_ahead"
LANDMARK_PREFETCH = "landmark_prefetch"
DEPENDENCY_PREFETCH = "dependency_prefetch"
DEPENDENCY_FETCH = "dependency_fetch"
PROFILE_PREFETCH = "profile_prefetch"
BACKGROUND_FILL = "background_fill"

MECHANISMS = (
    FOREGROUND,
    READ_AHEAD,
    LANDMARK_PREFETCH,
    DEPENDENCY_PREFETCH,
    DEPENDENCY_FETCH,
    PROFILE_PREFETCH,
    BACKGROUND_FILL,
)
"""Every label value, in the order the status table shows them."""

# Thread-name prefix -> mechanism. ``stargz-readahead`` is the fetcher's pool behind
# ``fetch_async`` (sequential read-ahead; read-behind and continuation companions of a miss).
_BY_THREAD = (
    ("stargz-background-fill", BACKGROUND_FILL),
    ("stargz-landmark-prefetch", LANDMARK_PREFETCH),
    ("stargz-dependency-prefetch", DEPENDENCY_PREFETCH),
    ("stargz-dependency-fetch", DEPENDENCY_FETCH),
    ("stargz-profile-prefetch", PROFILE_PREFETCH),
    ("stargz-readahead", READ_AHEAD),
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the request latency histogram; +Inf is implied."""


def current_mechanism() -> str:
    """The fetch mechanism the calling thread works for."""
    name = threading.current_thread().name
    for prefix, mechanism in _BY_THREAD:
        if name.startswith(prefix):
            return mechanism
    return FOREGROUND


@dataclass
class MechanismTotals:
    requests: int = 0
    """Range requests that answered (each may carry several ranges)."""
    bytes: int = 0
    """Compressed bytes received."""
    chunks: int = 0
    """Chunks those requests carried."""
    failures: int = 0
    """Range requests that failed (after the client's retries)."""
    seconds: float = 0.0
    """Sum of the answered requests' latencies."""
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    """Requests per latency bucket (not cumulative); the last one is +Inf."""

    def copy(self) -> MechanismTotals:
        return MechanismTotals(
            self.requests, self.bytes, self.chunks, self.failures, self.seconds, list(self.buckets)
        )


@dataclass
class MeterSnapshot:
    by_mechanism: dict[str, MechanismTotals]
    verification_failures: int
    """Chunks whose bytes did not match their ``chunkDigest`` (or did not decode)."""
    bucket_bounds: tuple[float, ...] = LATENCY_BUCKETS


class FetchMeter:
    """Thread-safe totals; every method takes one leaf lock and does no I/O."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = {m: MechanismTotals() for m in MECHANISMS}
        self._verification_failures = 0

    def observe(self, nbytes: int, chunks: int, seconds: float) -> None:
        """A range request of the calling thread's mechanism answered."""
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        mechanism = current_mechanism()
        with self._lock:
            t = self._totals[mechanism]
            t.requests += 1
            t.bytes += nbytes
            t.chunks += chunks
            t.seconds += seconds
            t.buckets[slot] += 1

    def failed(self) -> None:
        """A range request of the calling thread's mechanism failed."""
        mechanism = current_mechanism()
        with self._lock:
            self._totals[mechanism].failures += 1

    def verification_failed(self) -> None:
        with self._lock:
            self._verification_failures += 1

    def snapshot(self) -> MeterSnapshot:
        with self._lock:
            return MeterSnapshot(
                {m: t.copy() for m, t in self._totals.items()}, self._verification_failures
            )
