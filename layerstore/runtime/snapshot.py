"""Read-only views of the runtime's state for operators (``stargz-store status``, metrics).

:meth:`LayerManager.snapshot <layerstore.runtime.manager.LayerManager.snapshot>` fills these
from copies taken under each component's own lock, one at a time (no lock is held while
another is taken), so a snapshot is cheap and never waits on I/O; the parts may be a few
microseconds apart, which no reader of a status page can notice.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerstore.runtime.fetcher import FetcherSnapshot
from layerstore.runtime.meter import MeterSnapshot


@dataclass(frozen=True)
class KeyUse:
    """One (image reference, key) through which a layer was looked up."""

    ref: str
    key: str
    scheme: str
    """``"compressed"`` (the key is the blob digest) or ``"toc"`` (the TOC digest)."""
    users: int


@dataclass(frozen=True)
class LayerSnapshot:
    digest: str
    toc_digest: str
    blob_size: int
    keys: tuple[KeyUse, ...]
    fetcher: FetcherSnapshot
    idle_seconds: float
    """Since the layer was last read or looked up."""

    @property
    def users(self) -> int:
        return sum(k.users for k in self.keys)

    @property
    def schemes(self) -> list[str]:
        return sorted({k.scheme for k in self.keys})


@dataclass(frozen=True)
class ImageSnapshot:
    """An image reference with layers held, or resolved within its ``resolve_ttl``."""

    ref: str
    manifest_digest: str | None
    """None when the reference's resolution is no longer in memory."""
    layers: tuple[str, ...]
    """Compressed digests of the layers looked up through this reference."""
    users: int


@dataclass(frozen=True)
class ManagerSnapshot:
    images: tuple[ImageSnapshot, ...]
    layers: tuple[LayerSnapshot, ...]
    meter: MeterSnapshot
    lookups_in_flight: int
    """(reference, key) resolutions running now."""
    foreground_fetches: int
    """Readers' fetches and landmark prefetches in flight, across layers."""
    tail_requests: int
    """Range requests made for TOCs (blob tails)."""

    @property
    def layers_in_use(self) -> int:
        return sum(1 for layer in self.layers if layer.users > 0)
