"""A resolved, verified eStargz layer: TOC index + chunk fetcher + cache.

``Layer.read(ino, offset, size)`` serves file data: every byte comes from a chunk whose
``chunkDigest`` matched (from the cache's pread fast path, each block checked against the tag
recorded when it was verified, or fetched and verified by the
:class:`~layerstore.runtime.fetcher.ChunkFetcher`). Slices of large chunks (``streamed``) are
always read from the cache file, never from a whole chunk in memory. Every read asks the kernel
to read ahead the file's next chunks already in the cache (``ChunkCache.advise``), and a read
that ends in the second half of a chunk starts the *sequential read-ahead* of the file's next
chunks (``fetch_async``).
``start()`` (first use) runs the *landmark prefetch* and then, when enabled, the *background
fill*.

``Layer.read_blob`` serves the registry blob for the ``blob`` file (``podman push/save``) from a
*blob spool*: on the first read the whole blob is fetched into an unlinked file under the
daemon's root (:mod:`layerstore.runtime.blobspool`), in order, while its sha256 and DiffID are
checked; no byte is served before both match (a tampered blob answers its first read with an
error). Concurrent readers share that one fetch; the file goes when it has been idle for
``blob_spool_idle_seconds`` or the layer closes.

Identity and verification (``docs/ARCHITECTURE.md``): a layer object is what one manifest
claims for one blob in one repository (``identity``, built by the manager). Its TOC is verified
before it exists; its blob digest and DiffID are verified when the whole blob has been seen, by
the streaming background fill or by the blob spool (:mod:`layerstore.runtime.blobcheck`). A
mismatch makes the layer *bad* (:meth:`mark_bad`): every read fails from then on and the
manager drops it. A match is recorded in the cache's TOC area (``verified-<hash>``) so a later
fill of the same blob, TOC and DiffID fetches only what is not cached.

``hold``/``unhold`` count the FUSE adapter's references (inode tables, open files): the manager's
idle sweep retires only a layer nobody holds (:meth:`retire_if_idle`), so a layer the mount
still serves keeps its fetcher and read-ahead, and a later lookup finds the same object.

``info_json(scheme)`` renders the ``info`` file, decoded by containers/storage into its
``Layer`` struct (json tags from ``layers.go``):

* ``"compressed"`` (key = compressed digest, podman <= 5.0): ``compressed-diff-digest``,
  ``compressed-size``, ``diff-digest`` (the DiffID), ``diff-size``, ``compression`` (2 = gzip),
  ``uidset``, ``gidset``.
* ``"toc"`` (key = TOC digest, podman >= 5.1): ``toc-digest``, ``diff-size`` (-1 when unknown,
  which containers/storage allows only with a TOC digest), ``compressed-size``, ``compression``,
  ``flags: {"expected-layer-diffid": DiffID}``, ``uidset``, ``gidset``.

The uncompressed size (``diff-size``): the layer annotation
``io.containers.estargz.uncompressed-size`` when the manifest has it (our converter writes
it). Without it, the TOC scheme says -1 (allowed there), and the compressed-digest scheme, which
needs a number, gets an estimate from the TOC (:func:`estimate_tar_size`), meant for size
reporting only. An exact
figure would need the whole blob: the gzip member trailers do not help, because the Go writer
also starts members where the TOC records no offset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import structlog

from layerstore.common.redact import describe_error
from layerstore.common.singleflight import SingleFlight
from layerstore.errors import (
    CacheError,
    FormatError,
    LayerStoreError,
    RegistryError,
    VerificationError,
)
from layerstore.estargz.toc import TOCIndex
from layerstore.runtime.blobcheck import BlobVerdict, BlobVerifier, TOCClaim
from layerstore.runtime.blobspool import BlobSpool
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.fetcher import ChunkFetcher, ChunkLike
from layerstore.source import RangeSource

log = structlog.get_logger(__name__)

GZIP_COMPRESSION = 2  # containers/storage pkg/archive Gzip
SCHEME_COMPRESSED = "compressed"
SCHEME_TOC = "toc"
MiB = 1024 * 1024


class ReadObserver(Protocol):
    """Told of every file read a layer serves (the recorder of workload profiles,
    :class:`~layerstore.runtime.recorder.AccessRecorder`). Called on the FUSE event loop for
    reads served from memory: memory and leaf locks only."""

    def note(self, layer: Layer, ino: int, offset: int, length: int) -> None: ...


@dataclass(frozen=True)
class LayerSettings:
    landmark_prefetch: bool = True
    """On first use, fetch the prioritized files (everything before ``.prefetch.landmark``) in
    one request (config key ``[fetch] prefetch_landmark``)."""
    background_fill: bool = False
    """On first use, start the background fill of the whole blob (config key ``[fetch]
    background_fetch``)."""
    sequential_readahead_chunks: int = 2
    """When a read ends in the second half of a chunk, fetch this many following chunks of the
    file ahead (0 disables): sequential readers of large files do not wait a round trip per
    chunk."""
    open_advise_chunks: int = 2
    """When a file is opened, this many of its first chunks that are in the cache are advised
    to the kernel (read from disk ahead of the first ``read``); 0 disables."""
    blob_fetch_bytes: int = 8 * MiB
    """Range per request when the ``blob`` file's spool is filled (two in flight)."""
    blob_spool_idle_seconds: float = 60.0
    """A spooled blob nobody has read for this long is removed (by the manager's sweep)."""


def _pad512(n: int) -> int:
    return (n + 511) // 512 * 512


def estimate_tar_size(chunks: Iterable[ChunkLike], index: TOCIndex) -> int:
    """Approximate decompressed size of an eStargz blob from its TOC.

    Every file with data costs a 512-byte header plus its padded size; every other entry a
    header; the TOC entry and the end-of-archive blocks about 2 KiB
    more. PAX records (long names, xattrs) are not counted, so this is a lower bound in practice.
    """
    sizes: dict[int, int] = {}
    files = 0
    for c in chunks:
        if c.chunk_offset == 0:
            files += 1
        sizes[c.offset * 1_000_003 + c.chunk_offset] = c.chunk_size
    data = sum(sizes.values())
    others = max(0, index.num_entries - files)
    return data + files * (512 + 256) + others * 512 + 2048


class Layer:
    """One eStargz layer; thread-safe."""

    def __init__(
        self,
        *,
        compressed_digest: str,
        toc_digest: str,
        diff_id: str,
        blob_size: int,
        index: TOCIndex,
        source: RangeSource,
        cache: ChunkCache,
        fetcher: ChunkFetcher,
        toc_offset: int,
        footer_size: int,
        uncompressed_size: int | None = None,
        settings: LayerSettings | None = None,
        identity: str = "",
        spool: BlobSpool | None = None,
        toc_member_digest: str = "",
    ) -> None:
        self.identity = identity or compressed_digest
        """What the manager shares this object by (blob, TOC, DiffID and the repository the
        blob is read from); the FUSE adapter numbers inodes by it."""
        self.spool = spool
        self.toc_member_digest = toc_member_digest
        """sha256 of the compressed TOC member the index was built from ("" when unknown):
        the whole-blob check makes sure the blob holds exactly that member."""
        self.on_bad: Callable[[Layer, str], None] | None = None
        """Called once when the layer turns out bad (the manager drops it and names its
        references in the error event)."""
        self.compressed_digest = compressed_digest
        self.toc_digest = toc_digest
        self.diff_id = diff_id
        self.blob_size = blob_size
        self.index = index
        self.source = source
        self.cache = cache
        self.fetcher = fetcher
        self.toc_offset = toc_offset
        self.footer_size = footer_size
        self.settings = settings or LayerSettings()
        self._uncompressed_size = uncompressed_size
        self._estimate: int | None = None
        self._lock = threading.Lock()
        self._size_lock = threading.Lock()
        self._started = False
        self._info: dict[str, bytes] = {}
        self._ids: tuple[list[int], list[int]] | None = None
        # Under _lock: the FUSE adapter's references, whether the sweep retired the layer,
        # why it is bad (None: not known bad), whether its blob and DiffID were verified, the
        # spooled blob.
        self._holds = 0
        self._retired = False
        self._bad: str | None = None
        self._verified = False
        self._spool: _Spooled | None = None
        self._spool_flight: SingleFlight[int, None] = SingleFlight()
        self.last_used = time.monotonic()
        self.observer: ReadObserver | None = None
        """Set by the manager while recording is on; None costs the read path one test."""
        self._log = log.bind(digest=compressed_digest, toc_digest=toc_digest)
        self.on_read: Callable[[Layer, int, bool], None] | None = None
        """Called (must not block) after a read from offset 0 of a file that waited for the
        network: the manager hands it to the dependency fetch
        (:mod:`layerstore.runtime.depfetch`)."""
        self.profile_planned = False
        """Set (once, by the profile prefetch) when an attached workload profile lists files
        of this layer and their prefetch has started."""

    @property
    def planned(self) -> bool:
        """Whether a workload's own plan fetches this layer's start-up files: a prioritized
        region that the landmark prefetch fetches, or an attached profile's section. The
        read-triggered dependency fetch leaves such layers alone: its guesses (every
        module-level import) compete for the link with the plan's recorded reads (pandas,
        prioritized: 8.9 s with them, 6.0 s without, ``./run bench``)."""
        return self.profile_planned or (
            self.settings.landmark_prefetch and bool(self.index.prefetch_landmark_offset)
        )

    @property
    def registry_host(self) -> str:
        """The registry host the blob's bytes come from ("" when not a registry): the key of
        the bulkheads that keep one slow registry from starving the others."""
        return str(getattr(self.source, "registry_host", ""))

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> bool:
        """Start the landmark prefetch and (if enabled) then the background fill, once, in a
        thread."""
        with self._lock:
            if self._started:
                return False
            self._started = True
        if not (self.settings.landmark_prefetch or self._background_fill_enabled):
            self._release_head()
            return True
        t = threading.Thread(
            target=self._landmark_prefetch_then_fill, name="stargz-landmark-prefetch", daemon=True
        )
        t.start()
        return True

    def _landmark_prefetch_then_fill(self) -> None:
        try:
            end = self.index.prefetch_landmark_offset
            if self.settings.landmark_prefetch and end:
                self.fetcher.landmark_prefetch(end)
        except Exception as e:  # logged; reads still work lazily
            self._log.warning("landmark_prefetch_failed", error=describe_error(e))
        finally:
            self._release_head()
        if self._background_fill_enabled:
            # Until the blob is known good, the fill streams every byte in order through a
            # verifier; afterwards it fetches only what is not cached.
            tap = None if self.known_verified() else _FillCheck(self)
            self.fetcher.start_background_fill(tap)

    def close(self) -> None:
        self.fetcher.close()
        self.drop_spool()
        self._release_head()

    def _release_head(self) -> None:
        """The bytes a head start fetched ahead of the TOC (``runtime.headstart``) are no
        longer needed once the landmark prefetch has run (or the layer is closed)."""
        release = getattr(self.source, "release_head", None)
        if release is not None:
            release()

    # --- references from the FUSE adapter (see docs/CONCURRENCY.md) ---------------------------
    def hold(self) -> bool:
        """One more reference from the FUSE adapter. False when the sweep has already retired
        this layer (then look it up again: the manager builds a new one)."""
        with self._lock:
            if self._retired:
                return False
            self._holds += 1
            return True

    def unhold(self) -> None:
        with self._lock:
            self._holds = max(0, self._holds - 1)
        self.last_used = time.monotonic()

    @property
    def holds(self) -> int:
        with self._lock:
            return self._holds

    def retire_if_idle(self, cutoff: float) -> bool:
        """For the manager's sweep (under its lock): retire the layer if nobody holds it and it
        was last used before *cutoff*. A retired layer is never held again."""
        with self._lock:
            if self._holds > 0 or self.last_used > cutoff:
                return False
            self._retired = True
            return True

    # --- verification ----------------------------------------------------------------------
    @property
    def bad(self) -> str | None:
        """Why the layer must not be served (None: nothing known against it)."""
        return self._bad

    @property
    def verified(self) -> bool:
        """The whole blob matched its digest and its DiffID (here or in an earlier run)."""
        return self._verified

    def _check_bad(self) -> None:
        reason = self._bad
        if reason is not None:
            raise VerificationError(f"layer {self.compressed_digest} is bad: {reason}")

    def mark_bad(self, reason: str) -> bool:
        """From now on every read fails; tells the manager (once). Returns whether this call
        marked it."""
        with self._lock:
            if self._bad is not None:
                return False
            self._bad = reason
        callback = self.on_bad
        if callback is not None:
            callback(self, reason)
        else:
            self._log.error("layer_verification_failed", reason=reason)
        return True

    def _marker(self) -> tuple[str, bytes]:
        text = f"{self.compressed_digest}\n{self.toc_digest}\n{self.diff_id}\n".encode()
        return "verified-" + hashlib.sha256(text).hexdigest(), text

    def blob_verifier(self) -> BlobVerifier:
        """A verifier of every claim this layer was built from: blob digest, DiffID, and (when
        known) the TOC member and footer."""
        toc = None
        if self.toc_member_digest:
            toc = TOCClaim(self.toc_offset, self.footer_size, self.toc_member_digest)
        return BlobVerifier(self.compressed_digest, self.diff_id, self.blob_size, toc)

    def known_verified(self) -> bool:
        """Verified in this process, or recorded as verified in the cache by an earlier one."""
        if self._verified:
            return True
        name, text = self._marker()
        try:
            found = self.cache.get_toc(name) == text
        except LayerStoreError:
            found = False
        if found:
            with self._lock:
                self._verified = True
        return found

    def _blob_checked(self, verdict: BlobVerdict, via: str) -> None:
        if not verdict.complete:
            self._log.info("blob_check_incomplete", via=via)
            return
        if verdict.errors:
            self._log.error("blob_check_failed", via=via, errors=list(verdict.errors))
            self.mark_bad("; ".join(verdict.errors))
            return
        if not self._verified:
            # The marker goes to the cache before the layer says it is verified, so whoever sees
            # ``verified`` also finds the marker (an idempotent write if two checks finish).
            name, text = self._marker()
            try:
                self.cache.put_toc(name, text)
            except LayerStoreError as e:
                self._log.warning("verified_marker_not_written", error=describe_error(e))
        with self._lock:
            first = not self._verified
            self._verified = True
        if self._uncompressed_size is not None and (
            verdict.uncompressed_size != self._uncompressed_size
        ):
            self._log.warning(
                "uncompressed_size_annotation_differs",
                annotation=self._uncompressed_size,
                actual=verdict.uncompressed_size,
            )
        if first:
            self._log.info("layer_verified", via=via, diff_id=verdict.diff_id)

    @property
    def _background_fill_enabled(self) -> bool:
        return self.settings.background_fill or self.fetcher.settings.background_fill

    # --- info ------------------------------------------------------------------------------
    def scheme_for(self, key: str) -> str:
        """Which ``info`` a lookup by *key* wants: ``"toc"`` or ``"compressed"``."""
        if key == self.compressed_digest:
            return SCHEME_COMPRESSED
        if key == self.toc_digest:
            return SCHEME_TOC
        raise ValueError(f"{key} names neither this layer's blob nor its TOC")

    def _idsets(self) -> tuple[list[int], list[int]]:
        if self._ids is None:
            self._ids = (sorted(set(self.index.uids())), sorted(set(self.index.gids())))
        return self._ids

    @property
    def uncompressed_size(self) -> int | None:
        """The decompressed tar size if known (annotation, or computed earlier)."""
        return self._uncompressed_size

    def compute_uncompressed_size(self) -> int:
        """The annotation value, else an estimate from the TOC (see the module docstring)."""
        with self._size_lock:
            if self._uncompressed_size is not None:
                return self._uncompressed_size
            if self._estimate is None:
                self._estimate = estimate_tar_size(self.fetcher.chunks, self.index)
                self._log.info("uncompressed_size_estimated", size=self._estimate)
            return self._estimate

    def info(self, scheme: str) -> dict[str, Any]:
        uids, gids = self._idsets()
        out: dict[str, Any]
        if scheme == SCHEME_COMPRESSED:
            out = {
                "compressed-diff-digest": self.compressed_digest,
                "compressed-size": self.blob_size,
                "diff-digest": self.diff_id,
                "diff-size": self.compute_uncompressed_size(),
                "compression": GZIP_COMPRESSION,
            }
        elif scheme == SCHEME_TOC:
            size = self._uncompressed_size
            out = {
                "toc-digest": self.toc_digest,
                "diff-size": size if size is not None else -1,
                "compressed-size": self.blob_size,
                "compression": GZIP_COMPRESSION,
                "flags": {"expected-layer-diffid": self.diff_id},
            }
        else:
            raise ValueError(f"unknown key scheme {scheme!r}")
        if uids:
            out["uidset"] = uids
        if gids:
            out["gidset"] = gids
        return out

    def info_json(self, scheme: str) -> bytes:
        with self._lock:
            cached = self._info.get(scheme)
        if cached is not None:
            return cached
        body = json.dumps(self.info(scheme), separators=(",", ":"), sort_keys=True).encode()
        with self._lock:
            self._info[scheme] = body
        return body

    # --- file data -------------------------------------------------------------------------
    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Verified bytes of file *ino* at *offset*; short or empty at and past EOF."""
        self.last_used = time.monotonic()
        if self._bad is not None:
            self._check_bad()
        if not self._started:
            self.start()
        fsize = int(self.index.getattr(ino).size)
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(fsize, offset + size)
        if offset >= end:
            return b""
        chunks = self.index.chunks(ino)
        if not chunks:
            raise FormatError(f"inode {ino} has {fsize} bytes but no chunks")
        self.fetcher.reader_seen()
        i = self.index.chunk_at(ino, offset)
        needed: list[ChunkLike] = []
        while i < len(chunks) and chunks[i].chunk_offset < end:
            needed.append(chunks[i])
            i += 1
        pieces: list[bytes | None] = []
        misses: list[int] = []
        for n, c in enumerate(needed):
            lo, hi = self._span(c, offset, end, fsize)
            if self.fetcher.streamed(c):
                pieces.append(self._read_streamed(c, lo, hi))
                continue
            piece = (
                self.cache.read(c.digest, lo, hi - lo) if c.digest.startswith("sha256:") else None
            )
            if piece is None or len(piece) != hi - lo:
                misses.append(n)
                pieces.append(None)
            else:
                pieces.append(piece)
        if misses:
            t0 = time.monotonic()
            datas = self.fetcher.fetch_chunks([needed[n] for n in misses])
            for n, data in zip(misses, datas):
                if data is None:  # cannot happen for a chunk that is not streamed
                    raise FormatError(f"inode {ino}: chunk at {needed[n].offset} has no bytes")
                lo, hi = self._span(needed[n], offset, end, fsize)
                pieces[n] = data[lo:hi]
            self._log.debug(
                "read_waited",
                path=self.index.path_of(ino),
                offset=offset,
                chunks=len(misses),
                seconds=round(time.monotonic() - t0, 4),
            )
        out = b"".join(p for p in pieces if p is not None)
        if len(out) != end - offset:
            raise FormatError(
                f"inode {ino}: chunks cover {len(out)} of {end - offset} bytes at {offset}"
            )
        observer = self.observer
        if observer is not None:
            observer.note(self, ino, offset, len(out))
        if offset == 0 and self.on_read is not None:
            # Told whether the read waited: only one that did is scanned for what it names
            # (what the cache already held was fetched by a mechanism that knew what comes
            # next, a prefetch or the dependency fetch itself, and scanning it again costs
            # the reader CPU on a start-up that is CPU-bound); every first read counts for
            # the dependency fetch's hit rate.
            self.on_read(self, ino, bool(misses))
        ahead = self.settings.sequential_readahead_chunks
        if ahead > 0 and i < len(chunks):
            self._advise(chunks, i, ahead)
            last = needed[-1]
            lo, hi = self._span(last, last.chunk_offset, fsize, fsize)
            if end - last.chunk_offset > (hi - lo) // 2:
                self.fetcher.fetch_async(list(chunks[i : i + ahead]))
        return out

    def _read_streamed(self, c: ChunkLike, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of a large chunk: from the cache file (every block checked
        against its tag), fetched into the cache first when it is not there. A few tries
        (it can be evicted, or found altered and removed, between the fetch and the read),
        then, or at once when the cache cannot hold it, decoded from the registry keeping
        only the slice."""
        if c.chunk_size <= self.cache.max_bytes:
            for _ in range(3):
                piece = self.cache.read(c.digest, lo, hi - lo)
                if piece is not None and len(piece) == hi - lo:
                    return piece
                self.fetcher.fetch_chunks([c])
        return self.fetcher.read_slice(c, lo, hi)

    def _advise(self, chunks: Sequence[ChunkLike], i: int, ahead: int) -> None:
        """Chunks a sequential reader wants next that are in the cache: the kernel reads them
        ahead into its page cache (the checked preads that follow do not wait for the disk)."""
        self.cache.advise([c.digest for c in chunks[i : i + ahead + 2]])

    def opened(self, ino: int) -> None:
        """File *ino* was opened (on the event loop): the first chunks it has in the cache are
        advised to the kernel at once, on the cache's helper thread, so the disk reads them
        while the opener's first ``read`` is still on its way: that read is then answered on
        the event loop (:meth:`read_nowait`) instead of waiting for the disk in a thread.
        Never waits; chunks not cached, or advised before, cost nothing more."""
        if not self._started or self._bad is not None:
            return
        digests = self.index.first_chunk_digests(ino, self.settings.open_advise_chunks)
        if digests:
            self.cache.advise_soon(digests)

    def read_nowait(
        self, ino: int, offset: int, size: int, disk: bool = False
    ) -> bytes | memoryview | None:
        """:meth:`read` when every byte can be answered without waiting for the disk or the
        network (``ChunkCache.read_nowait``: chunks not written yet, or blocks of packs in the
        kernel's page cache, tag-checked); None otherwise (then call :meth:`read` in a
        thread). Meant for the event loop. A read within one chunk is a view (no copy).

        With *disk*, without waiting for the network only: every chunk in the disk cache,
        read from its pack (tag-checked) even when that waits for the disk (the FUSE adapter's
        inline cached read, ``[fuse] inline_cache_reads``)."""
        if not self._started or self._bad is not None or offset < 0 or size < 0:
            return None
        fsize = int(self.index.getattr(ino).size)
        end = min(fsize, offset + size)
        if offset >= end:
            return None
        chunks = self.index.chunks(ino)
        if not chunks:
            return None
        i = self.index.chunk_at(ino, offset)
        pieces: list[memoryview] = []
        while i < len(chunks) and chunks[i].chunk_offset < end:
            c = chunks[i]
            lo, hi = self._span(c, offset, end, fsize)
            got: bytes | memoryview | None
            if not disk:
                got = self.cache.read_nowait(c.digest, lo, hi - lo)
            elif c.digest in self.cache:  # a miss is the thread path's to count
                got = self.cache.read(c.digest, lo, hi - lo)
            else:
                return None
            if got is None or len(got) != hi - lo:
                return None
            pieces.append(memoryview(got))
            i += 1
        out: bytes | memoryview = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if len(out) != end - offset:
            return None
        self.last_used = time.monotonic()
        self.fetcher.reader_seen()
        observer = self.observer
        if observer is not None:
            observer.note(self, ino, offset, len(out))
        if offset == 0 and self.on_read is not None:
            self.on_read(self, ino, False)  # (a first read counts for the hit rate)
        ahead = self.settings.sequential_readahead_chunks
        if ahead > 0 and i < len(chunks):
            # A sequential reader served here never takes the thread path that advises.
            self.cache.advise_soon([c.digest for c in chunks[i : i + ahead + 2]])
        return out

    @staticmethod
    def _span(c: ChunkLike, offset: int, end: int, fsize: int) -> tuple[int, int]:
        csize = c.chunk_size if c.chunk_size > 0 else fsize - c.chunk_offset
        lo = max(offset, c.chunk_offset) - c.chunk_offset
        hi = min(end, c.chunk_offset + csize) - c.chunk_offset
        return lo, max(lo, hi)

    # --- the blob file ---------------------------------------------------------------------
    def read_blob(self, offset: int, size: int) -> bytes:
        """Bytes of the registry blob at *offset* (short at the end), served only from a spool
        whose blob digest and DiffID matched (fetched on the first read, by one reader for
        all)."""
        self.last_used = time.monotonic()
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        self._check_bad()
        end = min(self.blob_size, offset + size)
        if offset >= end:
            return b""
        spooled = self._acquire_spool()
        try:
            data = os.pread(spooled.fd, end - offset, offset)
        except OSError as e:
            raise CacheError(f"reading the spooled blob failed: {e}") from None
        finally:
            self._release_spool(spooled)
        if len(data) != end - offset:
            raise CacheError(f"spooled blob is short at {offset}")
        return data

    def _acquire_spool(self) -> _Spooled:
        for _ in range(3):
            with self._lock:
                spooled = self._spool
                if spooled is not None:
                    spooled.refs += 1
                    spooled.last_used = time.monotonic()
                    return spooled
            self._spool_flight.do(0, self._build_spool)
            self._check_bad()
        raise CacheError(f"blob {self.compressed_digest}: spool dropped while being read")

    def _release_spool(self, spooled: _Spooled) -> None:
        with self._lock:
            spooled.refs -= 1
            close = spooled.refs == 0 and spooled.detached
        if close:
            self._close_spooled(spooled)

    def _close_spooled(self, spooled: _Spooled) -> None:
        with contextlib.suppress(OSError):
            os.close(spooled.fd)
        if self.spool is not None:
            self.spool.release(spooled.size)

    def drop_spool(self, idle_before: float | None = None) -> bool:
        """Give the spooled blob's disk space back (now, or when its last read ends); with
        *idle_before*, only if nobody has read it since then. Returns whether it was dropped."""
        with self._lock:
            spooled = self._spool
            if spooled is None:
                return False
            if idle_before is not None and (spooled.last_used > idle_before or spooled.refs):
                return False
            self._spool = None
            spooled.detached = True
            close = spooled.refs == 0
        if close:
            self._close_spooled(spooled)
        self._log.debug("blob_spool_dropped", bytes=spooled.size)
        return True

    def spool_idle_cutoff(self, now: float) -> float:
        return now - self.settings.blob_spool_idle_seconds

    def _build_spool(self) -> None:
        with self._lock:
            if self._spool is not None:
                return
        self._check_bad()
        spool = self.spool
        if spool is None:
            raise CacheError("no blob spool: the blob file cannot be served")
        size = self.blob_size
        spool.reserve(size)
        fd = -1
        t0 = time.monotonic()
        try:
            fd = spool.open_file()
            verifier = self.blob_verifier()
            self._download(fd, verifier)
            verdict = verifier.finish()
            self._blob_checked(verdict, via="blob")
            if not verdict.ok:
                raise VerificationError(
                    f"blob {self.compressed_digest}: " + ("; ".join(verdict.errors) or "incomplete")
                )
        except BaseException:
            if fd >= 0:
                os.close(fd)
            spool.release(size)
            raise
        with self._lock:
            self._spool = _Spooled(fd, size)
        self._log.info("blob_spooled", bytes=size, seconds=round(time.monotonic() - t0, 3))

    def _download(self, fd: int, verifier: BlobVerifier) -> None:
        """The whole blob into *fd*, in order through *verifier*: ranges of
        ``blob_fetch_bytes``, two in flight."""
        size = self.blob_size
        step = max(64 * 1024, self.settings.blob_fetch_bytes)
        starts = iter(range(0, size, step))
        pool = ThreadPoolExecutor(2, thread_name_prefix="stargz-blob-spool")
        queue: deque[tuple[int, Future[bytes]]] = deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                queue.append(
                    (start, pool.submit(self._fetch_range, start, min(step, size - start)))
                )

        try:
            submit()
            submit()
            while queue:
                start, fut = queue.popleft()
                data = fut.result()
                submit()
                view = memoryview(data)
                done = 0
                while done < len(view):
                    try:
                        done += os.pwrite(fd, view[done:], start + done)
                    except OSError as e:
                        raise CacheError(f"writing the blob spool failed: {e}") from None
                verifier.feed(start, data)
        finally:
            for _, fut in queue:
                fut.cancel()
            pool.shutdown(wait=False)

    def _fetch_range(self, start: int, length: int) -> bytes:
        try:
            data = self.source.read_at(start, length)
        except LayerStoreError:
            raise
        except Exception as e:
            raise RegistryError(f"reading the blob failed: {describe_error(e)}") from None
        if len(data) != length:
            raise RegistryError(f"blob range of {length} bytes answered with {len(data)}")
        return data


class _Spooled:
    """A verified copy of the blob in an unlinked spool file."""

    __slots__ = ("detached", "fd", "last_used", "refs", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.refs = 0
        self.detached = False
        self.last_used = time.monotonic()


class _FillCheck:
    """The background fill's tap: the blob's bytes in order into a :class:`BlobVerifier`;
    the verdict goes to the layer when the fill ends."""

    def __init__(self, layer: Layer) -> None:
        self._layer = layer
        self._verifier = layer.blob_verifier()

    def feed(self, offset: int, data: bytes) -> None:
        self._verifier.feed(offset, data)

    def finish(self, complete: bool) -> None:
        verdict = self._verifier.finish() if complete else BlobVerdict(complete=False)
        self._layer._blob_checked(verdict, via="background_fill")
