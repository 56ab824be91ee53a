"""A resolved, verified eStargz layer: TOC index + chunk fetcher + cache.

``Layer.read(ino, offset, size)`` serves file data: every byte comes from a chunk whose
``chunkDigest`` matched (from the cache's pread fast path, or fetched and verified by the
:class:`~layerstore.runtime.fetcher.ChunkFetcher`). Every read asks the cache to *verify ahead*
the file's next chunks already on disk, and a read that ends in the second half of a chunk
starts the *sequential read-ahead* of the file's next chunks (``fetch_async``). ``start()``
(first use) runs the *landmark prefetch* and then, when enabled, the *background fill*.

``Layer.read_blob`` serves the raw registry blob for the ``blob`` file (``podman push/save``):
large ranges through a few *blob read-ahead* windows, and the whole-blob sha256 is checked when
the blob is read from start to end (the read that completes a mismatching blob fails, as does
every later one).

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

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from layerstore.common.redact import describe_error
from layerstore.errors import FormatError, LayerStoreError, RegistryError, VerificationError
from layerstore.estargz.toc import TOCIndex
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.fetcher import ChunkFetcher, ChunkLike
from layerstore.source import RangeSource

log = structlog.get_logger(__name__)

GZIP_COMPRESSION = 2  # containers/storage pkg/archive Gzip
SCHEME_COMPRESSED = "compressed"
SCHEME_TOC = "toc"
MiB = 1024 * 1024


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
    blob_readahead_bytes: int = 4 * MiB
    """Minimum range fetched for the ``blob`` file; later sequential reads hit the window."""
    blob_windows: int = 4
    """Windows kept for concurrent sequential readers of the ``blob`` file."""
    blob_reorder_bytes: int = 16 * MiB
    """Out-of-order ``blob`` reads buffered for the whole-blob digest check."""


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
    ) -> None:
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
        self._windows: OrderedDict[int, bytes] = OrderedDict()  # start offset -> bytes
        # Blob read-ahead windows being fetched: start -> (length, done). Not a SingleFlight:
        # a reader waits for any window that contains its range, whatever its start, and the
        # window is fetched for no caller in particular (the reader that triggered it goes on).
        self._blob_inflight: dict[int, tuple[int, threading.Event]] = {}
        self._blob_hash = hashlib.sha256()
        self._blob_pos = 0
        self._blob_pending: dict[int, bytes] = {}
        self._blob_pending_bytes = 0
        self._blob_bad = False
        self._blob_verified = False
        self.last_used = time.monotonic()
        self._log = log.bind(digest=compressed_digest, toc_digest=toc_digest)
        self.on_read: Callable[[Layer, int], None] | None = None
        """Called (must not block) after a read from offset 0 of a file: the manager hands it
        to the dependency fetch (:mod:`layerstore.runtime.depfetch`)."""

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> bool:
        """Start the landmark prefetch and (if enabled) then the background fill, once, in a
        thread."""
        with self._lock:
            if self._started:
                return False
            self._started = True
        if not (self.settings.landmark_prefetch or self._background_fill_enabled):
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
        if self._background_fill_enabled:
            self.fetcher.start_background_fill()

    def close(self) -> None:
        self.fetcher.close()

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
        i = self.index.chunk_at(ino, offset)
        needed: list[ChunkLike] = []
        while i < len(chunks) and chunks[i].chunk_offset < end:
            needed.append(chunks[i])
            i += 1
        pieces: list[bytes | None] = []
        misses: list[int] = []
        for n, c in enumerate(needed):
            lo, hi = self._span(c, offset, end, fsize)
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
            datas = self.fetcher.get_chunks([needed[n] for n in misses])
            for n, data in zip(misses, datas):
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
        if offset == 0 and self.on_read is not None:
            self.on_read(self, ino)
        ahead = self.settings.sequential_readahead_chunks
        if ahead > 0 and i < len(chunks):
            self._verify_ahead(chunks, i, ahead)
            last = needed[-1]
            lo, hi = self._span(last, last.chunk_offset, fsize, fsize)
            if end - last.chunk_offset > (hi - lo) // 2:
                self.fetcher.fetch_async(list(chunks[i : i + ahead]))
        return out

    def _verify_ahead(self, chunks: Sequence[ChunkLike], i: int, ahead: int) -> None:
        """Chunks a sequential reader wants next that are on disk but not yet verified in
        this process: verify them in the background (the cache keeps the bytes)."""
        self.cache.verify_ahead([c.digest for c in chunks[i : i + ahead + 2]])

    def read_nowait(self, ino: int, offset: int, size: int) -> bytes | memoryview | None:
        """:meth:`read` when every byte is already verified and in memory (pending cache
        writes, hot cache bytes); None otherwise (then call :meth:`read` in a thread). Never
        blocks on I/O: meant for the event loop. A read within one chunk is a read-only view
        of the cached bytes (no copy)."""
        if not self._started or offset < 0 or size < 0:
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
            piece = self.cache.peek(c.digest, lo, hi - lo)
            if piece is None or len(piece) != hi - lo:
                return None
            pieces.append(piece)
            i += 1
        out: bytes | memoryview = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if len(out) != end - offset:
            return None
        self.last_used = time.monotonic()
        if offset == 0 and self.on_read is not None:
            self.on_read(self, ino)
        ahead = self.settings.sequential_readahead_chunks
        if ahead > 0 and i < len(chunks):
            self._verify_ahead(chunks, i, ahead)
        return out

    @staticmethod
    def _span(c: ChunkLike, offset: int, end: int, fsize: int) -> tuple[int, int]:
        csize = c.chunk_size if c.chunk_size > 0 else fsize - c.chunk_offset
        lo = max(offset, c.chunk_offset) - c.chunk_offset
        hi = min(end, c.chunk_offset + csize) - c.chunk_offset
        return lo, max(lo, hi)

    # --- raw blob --------------------------------------------------------------------------
    def read_blob(self, offset: int, size: int) -> bytes:
        """Raw registry bytes of the blob at *offset* (short at the end).

        Served from a few read-ahead windows (``blob_readahead_bytes`` each); a read in the
        second half of a window starts fetching the next one in the background, so a
        sequential reader (``podman push``) rarely waits a full round trip.
        """
        self.last_used = time.monotonic()
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(self.blob_size, offset + size)
        if offset >= end:
            return b""
        if self._blob_bad:
            raise VerificationError(f"blob {self.compressed_digest} does not match its digest")
        hit = self._from_windows(offset, end)
        if hit is None:
            self._wait_inflight_window(offset, end)
            hit = self._from_windows(offset, end)
        if hit is None:
            length = max(end - offset, self.settings.blob_readahead_bytes)
            window = self._fetch_window(offset, min(length, self.blob_size - offset))
            hit = (offset, window)
        start, window = hit
        data = window[offset - start : end - start]
        if self.settings.blob_readahead_bytes > 0 and end - start > len(window) // 2:
            self._read_ahead_window(start + len(window))
        self._track_digest(offset, data)
        return data

    def _fetch_window(self, start: int, length: int) -> bytes:
        try:
            window = self.source.read_at(start, length)
        except LayerStoreError:
            raise
        except Exception as e:
            raise RegistryError(f"reading the blob failed: {describe_error(e)}") from None
        if len(window) != length:
            raise RegistryError(f"blob range of {length} bytes answered with {len(window)}")
        with self._lock:
            self._windows[start] = window
            while len(self._windows) > max(2, self.settings.blob_windows):
                self._windows.popitem(last=False)
        return window

    def _read_ahead_window(self, start: int) -> None:
        length = min(self.settings.blob_readahead_bytes, self.blob_size - start)
        if length <= 0:
            return
        with self._lock:
            if start in self._windows or start in self._blob_inflight:
                return
            done = threading.Event()
            self._blob_inflight[start] = (length, done)

        def run() -> None:
            try:
                self._fetch_window(start, length)
            except Exception as e:  # the reader fetches it again and sees the error
                self._log.warning("blob_readahead_failed", offset=start, error=describe_error(e))
            finally:
                with self._lock:
                    self._blob_inflight.pop(start, None)
                done.set()

        threading.Thread(target=run, name="stargz-blob-readahead", daemon=True).start()

    def _wait_inflight_window(self, offset: int, end: int) -> None:
        with self._lock:
            waits = [
                ev for s, (n, ev) in self._blob_inflight.items() if s <= offset and end <= s + n
            ]
        for ev in waits:
            ev.wait(timeout=120)

    def _from_windows(self, offset: int, end: int) -> tuple[int, bytes] | None:
        with self._lock:
            for start, window in self._windows.items():
                if start <= offset and end <= start + len(window):
                    self._windows.move_to_end(start)
                    return start, window
        return None

    def _track_digest(self, offset: int, data: bytes) -> None:
        with self._lock:
            if self._blob_verified or offset + len(data) <= self._blob_pos:
                return
            if offset > self._blob_pos:
                fits = self._blob_pending_bytes + len(data) <= self.settings.blob_reorder_bytes
                if fits and offset not in self._blob_pending:
                    self._blob_pending[offset] = data
                    self._blob_pending_bytes += len(data)
                return
            self._blob_hash.update(data[self._blob_pos - offset :])
            self._blob_pos = offset + len(data)
            while self._blob_pending:
                ready = [o for o in self._blob_pending if o <= self._blob_pos]
                if not ready:
                    break
                for o in sorted(ready):
                    piece = self._blob_pending.pop(o)
                    self._blob_pending_bytes -= len(piece)
                    if o + len(piece) > self._blob_pos:
                        self._blob_hash.update(piece[self._blob_pos - o :])
                        self._blob_pos = o + len(piece)
            if self._blob_pos < self.blob_size:
                return
            got = "sha256:" + self._blob_hash.hexdigest()
            if got == self.compressed_digest:
                self._blob_verified = True
                self._log.info("blob_read_verified")
                return
            self._blob_bad = True
        self._log.error("blob_digest_mismatch", got=got)
        raise VerificationError(f"blob {self.compressed_digest} does not match its digest")
