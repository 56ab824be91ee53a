"""Persistent, content-addressed, verified chunk cache with LRU eviction.

Layout under *root*::

    chunks/<2 hex>/<64 hex>   one decompressed, verified chunk, named by its sha256
    toc/<name>                verified TOC members (opaque bytes; re-verified by whoever
                              reads them), kept under their own budget (``max_toc_bytes``),
                              oldest dropped

Rules:

* An entry is only ever created by ``os.replace`` of a fully written temp file in the same
  directory (:func:`layerstore.common.atomicfile.write_atomic`, not fsynced: a lost entry is
  fetched again, and a torn one is never visible), so a reader never sees a partial entry.
  Stale temp files (``.tmp-*``) are removed when the cache opens, and so are the image
  resolutions older versions kept in ``toc/`` (``resolved-*``; see
  :mod:`layerstore.runtime.resolutions`).
* ``put`` accepts only bytes whose sha256 equals the key. Callers that have just verified the
  bytes themselves (the fetcher, via ``decode_chunk``) pass ``verified=True`` to skip the rehash.
* Entries found on disk at start-up are trusted for their size only; each one is re-hashed on its
  first read in this process. A corrupt or truncated entry is deleted and reported as a miss.
  That first read reads the whole entry once (one thread at a time per entry) and keeps the
  verified bytes in a small in-memory LRU (``max_hot_bytes``), so the following slices of the
  chunk are served from memory instead of being read again; an entry larger than
  ``max_hot_entry_bytes`` is read and hashed in pieces instead, and never held whole.
  ``verify_ahead(digests)`` verifies entries a sequential reader will want next on a background
  thread; ``peek`` answers from memory only (pending writes and verified bytes), without
  blocking, or None.
* **Bytes read back from disk are checked before they are served.** When an entry's bytes are
  verified in this process and will be read back from its file (written by
  ``put``/``store_stream`` after the caller checked them; re-hashed at first use when too large
  to keep in memory, or when read again after leaving the hot LRU), the cache keeps keyed tags
  of its 64 KiB blocks in memory (:mod:`layerstore.runtime.blocktags`, a random key per
  process); every pread hashes the blocks it covers and compares. A mismatch (the file was
  altered after it was verified) removes the entry, logs ``chunk_cache_entry_altered`` (an
  error) and answers a miss, so the caller fetches the chunk again; the altered bytes are never
  returned. Slices served from memory (pending writes, the hot LRU) need no check. See
  ``docs/ARCHITECTURE.md``, "Cached chunks".
* ``store_stream`` writes a large chunk piece by piece as it is decoded (temp file + rename, tags
  computed on the way): the fetcher never holds a whole large chunk in memory. The daemon-wide
  :class:`~layerstore.runtime.membudget.MemoryBudget` (``memory_budget``) bounds the bytes held
  by fetches and by first-use checks together.
* The total size of ``chunks/`` is kept under ``max_bytes``: sizes and the use order live in
  memory (rebuilt from the directory listing, oldest mtime first); a hit moves the entry to the
  young end and touches its mtime at most once a minute so the order survives a restart.
* ``read(digest, offset, length)`` preads a slice through a small LRU of open descriptors, so a
  128 KiB FUSE read does not read a whole 4 MiB chunk.
* ``put_async`` hands the write to a small writer pool (creating a file costs ~1 ms on a
  journaling file system, more than fetching a small chunk). Until it is on disk the entry is
  served from memory (``get``, ``read``, ``in``); pending bytes are bounded
  (``max_pending_bytes``, 16 MiB: a cold walk that reads many small files otherwise held up to
  64 MiB of decoded chunks, and the heap stayed that large; beyond it the caller writes
  synchronously). ``flush`` waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from layerstore.common.atomicfile import TMP_PREFIX, atomic_output, write_atomic
from layerstore.errors import CacheError, VerificationError
from layerstore.runtime.blocktags import BLOCK, BlockTagger
from layerstore.runtime.membudget import MemoryBudget

log = structlog.get_logger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOC_NAME = re.compile(r"[0-9A-Za-z._-]{1,200}")
_LEGACY_RESOLUTION_PREFIX = "resolved-"  # image resolutions, now in ResolutionStore
_TOUCH_INTERVAL = 60.0
_VERIFY_PIECE = 1 << 20  # first-use check of a large entry: read and hashed this much at a time
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024


def _hex_of(digest: str) -> str:
    if not digest.startswith("sha256:") or not _HEX64.fullmatch(digest[7:]):
        raise CacheError(f"invalid cache key {digest!r}: expected sha256:<64 hex digits>")
    return digest[7:]


class _Fd:
    """An open descriptor shared by concurrent preads; closed when unused and dropped."""

    __slots__ = ("dropped", "fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.dropped = False


class _Entry:
    """``tags``: the block tags of the entry's verified bytes (set once, never changed), or
    None while preads of the file cannot be checked: not verified in this process yet, or
    verified once with its bytes kept in the hot LRU (``seen``), where no check is needed."""

    __slots__ = ("seen", "size", "tags", "touched")

    def __init__(self, size: int, touched: float, tags: bytes | None) -> None:
        self.size = size
        self.touched = touched
        self.tags = tags
        self.seen = False


class ChunkCache:
    """Thread-safe on-disk cache of verified chunks, keyed by ``sha256:`` digest."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int,
        *,
        max_open_files: int = 64,
        max_pending_bytes: int = 16 * 1024 * 1024,
        writer_threads: int = 4,
        max_toc_bytes: int | None = None,
        max_hot_bytes: int = 32 * 1024 * 1024,
        max_hot_entry_bytes: int = 8 * 1024 * 1024,
        verify_threads: int = 4,
        memory_budget: MemoryBudget | None = None,
        memory_wait_seconds: float = 60.0,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")  # 0: nothing is cached
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._max_fds = max(1, max_open_files)
        self._chunks = self.root / "chunks"
        self._tocs = self.root / "toc"
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # hex -> entry, oldest first
        self._fds: OrderedDict[str, _Fd] = OrderedDict()
        self._total = 0
        self._pending: dict[str, bytes] = {}
        self._pending_bytes = 0
        self._max_pending = max_pending_bytes
        self._pending_done = threading.Condition(self._lock)
        self._writer_threads = max(1, writer_threads)
        self._executor: ThreadPoolExecutor | None = None
        self._shards: set[str] = set()
        # Verified bytes of entries read whole (first use), newest last; bounded in bytes.
        self._hot: OrderedDict[str, bytes] = OrderedDict()
        self._hot_bytes = 0
        self.max_hot_bytes = max(0, max_hot_bytes)
        self.max_hot_entry_bytes = min(self.max_hot_bytes, max(0, max_hot_entry_bytes))
        # Bytes held in memory by fetches and first-use checks, daemon-wide (the fetchers of
        # every layer take their grants from this one too).
        self.memory_budget = memory_budget or MemoryBudget(DEFAULT_MEMORY_BUDGET)
        self.memory_wait_seconds = memory_wait_seconds
        # Keyed block tags of verified entries (the key lives in this object only).
        self._tagger = BlockTagger()
        self._reserved = 0  # bytes of store_stream writes in progress, counted against max_bytes
        self._altered = 0
        # Single flight of first-use checks: hex -> set when done. Not a SingleFlight: the
        # claim is made under self._lock together with the look at _entries and _hot (so an
        # entry verified a moment ago is not read and hashed again), verify_ahead consults it
        # under that lock too, and a waiter re-examines the entry rather than share a result
        # (the bytes are in _hot, or the entry was dropped, or is too large to keep hot).
        self._verifying: dict[str, threading.Event] = {}
        self._verify_threads = max(1, verify_threads)
        self._verifier: ThreadPoolExecutor | None = None
        self._verify_queued = 0
        # TOC members: name -> size, oldest first; budget defaults to 5 % of the chunk budget.
        self._toc_entries: OrderedDict[str, int] = OrderedDict()
        self._toc_total = 0
        self.max_toc_bytes = (
            max_toc_bytes if max_toc_bytes is not None else max(64 << 20, max_bytes // 20)
        )
        self._hits = 0
        self._misses = 0
        self._evicted = 0  # entries evicted by the size limit (LRU)
        self._removed_by_operator = 0  # entries removed by prune() and clear()
        try:
            self._chunks.mkdir(parents=True, exist_ok=True)
            self._tocs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create cache directory {self.root}: {e}") from e
        self._rebuild()

    # --- start-up --------------------------------------------------------------------------
    def _rebuild(self) -> None:
        found: list[tuple[float, str, int]] = []
        tocs: list[tuple[float, str, int]] = []
        removed = legacy = 0
        for d in (self._chunks, self._tocs):
            for dirpath, _dirs, files in os.walk(d):
                for name in files:
                    path = os.path.join(dirpath, name)
                    if name.startswith(TMP_PREFIX):
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                            removed += 1
                        continue
                    if d is self._tocs and name.startswith(_LEGACY_RESOLUTION_PREFIX):
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                            legacy += 1
                        continue
                    if d is self._tocs:
                        if _TOC_NAME.fullmatch(name):
                            with contextlib.suppress(OSError):
                                st = os.stat(path)
                                tocs.append((st.st_mtime, name, st.st_size))
                        continue
                    if not _HEX64.fullmatch(name):
                        continue
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    if os.path.basename(dirpath) != name[:2]:
                        continue
                    found.append((max(st.st_mtime, st.st_atime), name, st.st_size))
        for _stamp, name, size in sorted(tocs):
            self._toc_entries[name] = size
            self._toc_total += size
        found.sort()
        for stamp, name, size in found:
            self._entries[name] = _Entry(size, stamp, tags=None)
            self._total += size
        log.info(
            "chunk_cache_opened",
            root=str(self.root),
            entries=len(self._entries),
            bytes=self._total,
            max_bytes=self.max_bytes,
            stale_temp_files_removed=removed,
            old_resolutions_removed=legacy,
        )
        with self._lock:
            victims = self._evict_locked(keep=None)
        self._unlink(victims)

    # --- paths -----------------------------------------------------------------------------
    def _path(self, hexd: str) -> Path:
        return self._chunks / hexd[:2] / hexd

    # --- queries ---------------------------------------------------------------------------
    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            return False
        with self._lock:
            return digest[7:] in self._entries or digest[7:] in self._pending

    def contains(self, digest: str) -> bool:
        return digest in self

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._total,
                "max_bytes": self.max_bytes,
                "hits": self._hits,
                "misses": self._misses,
                "altered": self._altered,
            }

    # --- reads -----------------------------------------------------------------------------
    def get(self, digest: str) -> bytes | None:
        """The whole verified entry, or None (absent, or found corrupt or altered and removed).

        Holds the whole entry in memory: meant for chunks of ordinary size; slices of large
        ones are read with :meth:`read`."""
        hexd = _hex_of(digest)
        with self._lock:
            pending = self._pending.get(hexd)
            if pending is None:
                pending = self._hot.get(hexd)
            if pending is not None:
                self._hits += 1
                return pending
            entry = self._entries.get(hexd)
            if entry is None:
                self._misses += 1
                return None
        if entry.tags is None:
            found, data = self._verify(hexd, entry)
            if found is None or data is not None:
                return data
            entry = found
        return self._pread_checked(hexd, entry, 0, entry.size)

    def _verify(self, hexd: str, entry: _Entry) -> tuple[_Entry | None, bytes | None]:
        """First use of an entry found on disk: check its sha256 and record its block tags.
        One thread checks a given entry; others wait for it.

        Returns ``(None, None)`` when the entry is gone (corrupt, unreadable, evicted);
        ``(entry, bytes)`` when its verified bytes are in memory; ``(entry, None)`` when it is
        verified but on disk only (larger than ``max_hot_entry_bytes``): read it with tags."""
        while True:
            with self._lock:
                hot = self._hot.get(hexd)
                current = self._entries.get(hexd)
                if hot is not None:
                    self._hot.move_to_end(hexd)
                    self._hits += 1
                    return current or entry, hot
                if current is None:
                    self._misses += 1
                    return None, None
                entry = current
                if entry.tags is not None:
                    return entry, None  # verified meanwhile (hot bytes since evicted, or large)
                done = self._verifying.get(hexd)
                if done is None:
                    done = self._verifying[hexd] = threading.Event()
                    mine = True
                else:
                    mine = False
            if not mine:
                done.wait()
                continue
            try:
                if entry.size <= self.max_hot_entry_bytes:
                    data = self._verify_whole(hexd, entry)
                    return (entry, data) if data is not None else (None, None)
                return (entry, None) if self._verify_pieces(hexd, entry) else (None, None)
            finally:
                with self._lock:
                    self._verifying.pop(hexd, None)
                done.set()

    def _verify_whole(self, hexd: str, entry: _Entry) -> bytes | None:
        with self.memory_budget.acquire(
            entry.size, self.memory_wait_seconds, "first use of a cached chunk"
        ):
            try:
                with open(self._path(hexd), "rb") as f:
                    data = f.read()
            except OSError:
                self._drop(hexd, entry, reason="unreadable")
                return None
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != hexd:
                self._drop(hexd, entry, reason="corrupt")
                return None
            # Tags only when the entry is verified a second time (its bytes left the hot LRU
            # and it is read again): most entries found on disk are read once after a restart,
            # and their slices come from memory, which needs no check.
            if entry.seen:
                entry.tags = self._tagger.tags(data)
            entry.seen = True
        self._keep_hot(hexd, data)
        self._hit(hexd, entry)
        return data

    def _verify_pieces(self, hexd: str, entry: _Entry) -> bool:
        """The first-use check of a large entry in bounded memory (nothing kept hot)."""
        h = hashlib.sha256()
        tags = self._tagger.builder()
        with self.memory_budget.acquire(
            _VERIFY_PIECE, self.memory_wait_seconds, "first use of a cached chunk"
        ):
            try:
                with open(self._path(hexd), "rb", buffering=0) as f:
                    buf = bytearray(_VERIFY_PIECE)
                    view = memoryview(buf)
                    while True:
                        n = f.readinto(buf)
                        if not n:
                            break
                        piece = view[:n]
                        h.update(piece)
                        tags.add(piece)
                        if tags.size > entry.size:
                            break
            except OSError:
                self._drop(hexd, entry, reason="unreadable")
                return False
        if tags.size != entry.size or h.hexdigest() != hexd:
            self._drop(hexd, entry, reason="corrupt")
            return False
        entry.tags = tags.finish()
        self._hit(hexd, entry)
        return True

    def _keep_hot(self, hexd: str, data: bytes) -> None:
        if len(data) > self.max_hot_bytes:
            return
        with self._lock:
            old = self._hot.pop(hexd, None)
            if old is not None:
                self._hot_bytes -= len(old)
            self._hot[hexd] = data
            self._hot_bytes += len(data)
            while self._hot_bytes > self.max_hot_bytes:
                _h, victim = self._hot.popitem(last=False)
                self._hot_bytes -= len(victim)

    def peek(self, digest: str, offset: int, length: int) -> memoryview | None:
        """Like :meth:`read` from memory only (pending writes, verified hot bytes), as a
        read-only view (no copy): never blocks on I/O; None when the bytes are not in memory."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if not digest.startswith("sha256:"):
            return None
        hexd = digest[7:]
        with self._lock:
            data = self._pending.get(hexd)
            if data is None:
                data = self._hot.get(hexd)
                if data is None:
                    return None
                self._hot.move_to_end(hexd)
                entry = self._entries.get(hexd)
                if entry is not None:
                    self._entries.move_to_end(hexd)
            self._hits += 1
        return memoryview(data)[offset : offset + length]

    def verify_ahead(self, digests: list[str]) -> int:
        """Verify (first use) the cached entries among *digests* on a background thread, for
        a reader expected soon. Returns how many were queued."""
        todo: list[tuple[str, _Entry]] = []
        with self._lock:
            for digest in digests:
                hexd = digest[7:] if digest.startswith("sha256:") else ""
                entry = self._entries.get(hexd)
                if (
                    entry is None
                    or entry.tags is not None
                    or hexd in self._hot
                    or hexd in self._verifying
                    or self._verify_queued >= 4 * self._verify_threads
                ):
                    continue
                todo.append((hexd, entry))
                self._verify_queued += 1
            if not todo:
                return 0
            if self._verifier is None:
                self._verifier = ThreadPoolExecutor(
                    self._verify_threads, thread_name_prefix="chunk-cache-verify"
                )
            verifier = self._verifier
        for n, (hexd, entry) in enumerate(todo):
            try:
                verifier.submit(self._verify_ahead_one, hexd, entry)
            except RuntimeError:  # shut down
                with self._lock:
                    self._verify_queued -= len(todo) - n
                return n
        return len(todo)

    def _verify_ahead_one(self, hexd: str, entry: _Entry) -> None:
        try:
            self._verify(hexd, entry)
        except Exception as e:  # the reader verifies it again and sees the problem
            log.warning("chunk_cache_verify_failed", digest="sha256:" + hexd, error=str(e))
        finally:
            with self._lock:
                self._verify_queued -= 1

    def read(self, digest: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of the entry (short at its end), or None on a miss
        (absent, or found corrupt or altered and removed)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        hexd = _hex_of(digest)
        with self._lock:
            pending = self._pending.get(hexd)
            if pending is None:
                pending = self._hot.get(hexd)
                if pending is not None:
                    self._hot.move_to_end(hexd)
            if pending is not None:
                self._hits += 1
                return pending[offset : offset + length]
            entry = self._entries.get(hexd)
            if entry is None:
                self._misses += 1
                return None
        # First use in this process: verify the whole entry once (serve from those bytes when
        # it is small enough to keep them).
        if entry.tags is None:
            found, data = self._verify(hexd, entry)
            if found is None or data is not None:
                return None if data is None else data[offset : offset + length]
            entry = found
        if offset >= entry.size or length == 0:
            self._hit(hexd, entry)
            return b""
        return self._pread_checked(hexd, entry, offset, min(length, entry.size - offset))

    def _pread_checked(self, hexd: str, entry: _Entry, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of a verified entry (``entry.tags`` set), read from
        its file together with the rest of the blocks they touch, every block compared with
        its tag. None (the entry dropped) when the file is short, unreadable or altered."""
        tags = entry.tags
        assert tags is not None
        first = offset // BLOCK
        start = first * BLOCK
        stop = min(entry.size, -(-(offset + length) // BLOCK) * BLOCK)
        want = stop - start
        handle = self._acquire_fd(hexd)
        if handle is None:
            self._drop(hexd, entry, reason="unreadable")
            return None
        try:
            data = os.pread(handle.fd, want, start)
            if 0 < len(data) < want:  # a short read is legal: go on
                parts = [data]
                done = len(data)
                while done < want:
                    piece = os.pread(handle.fd, want - done, start + done)
                    if not piece:
                        break
                    parts.append(piece)
                    done += len(piece)
                data = b"".join(parts)
        except OSError:
            data = b""
        finally:
            self._release_fd(handle)
        if len(data) != want:
            self._drop(hexd, entry, reason="short")
            return None
        bad = self._tagger.check(tags, first, data)
        if bad >= 0:
            self._altered_entry(hexd, entry, bad)
            return None
        self._hit(hexd, entry)
        if start == offset and want == length:
            return data
        return data[offset - start : offset - start + length]

    def _altered_entry(self, hexd: str, entry: _Entry, block: int) -> None:
        with self._lock:
            self._altered += 1
        log.error(
            "chunk_cache_entry_altered",
            digest="sha256:" + hexd,
            path=str(self._path(hexd)),
            block=block,
            block_size=BLOCK,
            detail="the file changed after its bytes were verified; removed, fetched again",
        )
        self._drop(hexd, entry, reason="altered")

    def _hit(self, hexd: str, entry: _Entry) -> None:
        now = time.time()
        touch = False
        with self._lock:
            if self._entries.get(hexd) is not entry:
                return
            self._entries.move_to_end(hexd)
            self._hits += 1
            if now - entry.touched > _TOUCH_INTERVAL:
                entry.touched = now
                touch = True
        if touch:
            with contextlib.suppress(OSError):
                os.utime(self._path(hexd))

    # --- writes ----------------------------------------------------------------------------
    def put(self, digest: str, data: bytes, *, verified: bool = False) -> bool:
        """Store *data* under *digest*. Returns False when it is too large to cache.

        Without ``verified=True`` the sha256 is checked here; a mismatch raises
        :class:`VerificationError` and nothing is stored.
        """
        hexd = _hex_of(digest)
        if not verified and hashlib.sha256(data).hexdigest() != hexd:
            raise VerificationError(f"refusing to cache bytes that do not match {digest}")
        size = len(data)
        if size > self.max_bytes:
            return False
        with self._lock:
            if hexd in self._entries:
                return True
        path = self._path(hexd)
        try:
            self._shard(hexd)
            write_atomic(path, data, durable=False)
        except OSError as e:
            log.warning("chunk_cache_write_failed", digest=digest, error=str(e))
            return False
        tags = self._tagger.tags(data)
        self._add_entry(hexd, size, tags)
        return True

    def store_stream(
        self, digest: str, size: int, fill: Callable[[Callable[[bytes], object]], None]
    ) -> bool:
        """Store a chunk of *size* bytes that *fill* writes piece by piece (it is called with a
        ``write(piece)`` function), without ever holding it whole.

        *fill* must verify what it writes (``decode_chunk_into``) and raise if it does not
        match: the temporary file is then removed and the exception propagates; nothing is
        stored. Returns False (and does not call *fill*) when *size* exceeds the cache; True
        when the entry is in the cache (already, or now). ``OSError`` (disk full) propagates.
        """
        hexd = _hex_of(digest)
        if size > self.max_bytes:
            return False
        with self._lock:
            if hexd in self._entries:
                return True
            # Counted at once, so that what is evicted to make room is evicted now rather than
            # after the disk has held both.
            self._reserved += size
            victims = self._evict_locked(keep=None)
        self._unlink(victims)
        tags = self._tagger.builder()
        try:
            self._shard(hexd)
            with atomic_output(self._path(hexd), durable=False) as f:

                def write(piece: bytes) -> object:
                    f.write(piece)
                    tags.add(piece)
                    return None

                fill(write)
                if tags.size != size:
                    raise CacheError(f"{digest}: {tags.size} bytes written, expected {size}")
        finally:
            with self._lock:
                self._reserved -= size
        self._add_entry(hexd, size, tags.finish())
        return True

    def _shard(self, hexd: str) -> None:
        if hexd[:2] not in self._shards:
            self._path(hexd).parent.mkdir(exist_ok=True)
            self._shards.add(hexd[:2])

    def _add_entry(self, hexd: str, size: int, tags: bytes) -> None:
        """Record a file just written (renamed into place) from verified bytes."""
        with self._lock:
            entry = self._entries.get(hexd)
            if entry is None:
                self._entries[hexd] = _Entry(size, time.time(), tags)
                self._total += size
            elif entry.tags is None and entry.size == size:
                # The file now holds our verified bytes (same name: same content).
                entry.tags = tags
            victims = self._evict_locked(keep=hexd)
        self._unlink(victims)

    def put_async(self, digest: str, data: bytes, *, verified: bool = False) -> None:
        """Like :meth:`put`, but written by the writer pool; served from memory meanwhile."""
        hexd = _hex_of(digest)
        if not verified and hashlib.sha256(data).hexdigest() != hexd:
            raise VerificationError(f"refusing to cache bytes that do not match {digest}")
        size = len(data)
        if size > self.max_bytes:
            return
        with self._lock:
            if hexd in self._entries or hexd in self._pending:
                return
            if self._pending_bytes + size > self._max_pending:
                sync = True
            else:
                sync = False
                self._pending[hexd] = data
                self._pending_bytes += size
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self._writer_threads, thread_name_prefix="chunk-cache-writer"
                    )
                executor = self._executor
        if sync:
            self.put(digest, data, verified=True)
            return
        try:
            executor.submit(self._write_pending, digest, hexd, data)
        except RuntimeError:  # shut down: write here
            self._write_pending(digest, hexd, data)

    def _write_pending(self, digest: str, hexd: str, data: bytes) -> None:
        try:
            self.put(digest, data, verified=True)
        except Exception as e:  # never lose the pending slot
            log.warning("chunk_cache_write_failed", digest=digest, error=str(e))
        finally:
            with self._lock:
                if self._pending.pop(hexd, None) is not None:
                    self._pending_bytes -= len(data)
                self._pending_done.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every pending write is on disk. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._pending_done.wait(left)
        return True

    def _evict_locked(self, keep: str | None) -> list[Path]:
        """Forget the oldest entries until under the limit; returns the files to unlink
        (after the lock is released: unlinking can take a millisecond)."""
        victims: list[Path] = []
        freed = 0
        while self._total + self._reserved > self.max_bytes and self._entries:
            hexd, entry = next(iter(self._entries.items()))
            if hexd == keep:
                if len(self._entries) == 1:
                    break
                self._entries.move_to_end(hexd)
                continue
            del self._entries[hexd]
            self._total -= entry.size
            self._forget_fd_locked(hexd)
            victims.append(self._path(hexd))
            freed += entry.size
        self._evicted += len(victims)
        if victims:
            log.debug("chunk_cache_evicted", entries=len(victims), bytes=freed, total=self._total)
        return victims

    @staticmethod
    def _unlink(paths: list[Path]) -> None:
        for p in paths:
            with contextlib.suppress(OSError):
                os.unlink(p)

    def _drop(self, hexd: str, entry: _Entry, *, reason: str) -> None:
        """Remove *entry* (unless it was already evicted or replaced meanwhile)."""
        with self._lock:
            self._misses += 1
            if self._entries.get(hexd) is not entry:
                return  # evicted (or rewritten) by someone else: just a miss
            del self._entries[hexd]
            self._total -= entry.size
            self._forget_fd_locked(hexd)
        with contextlib.suppress(OSError):
            os.unlink(self._path(hexd))
        log.warning("chunk_cache_entry_removed", digest="sha256:" + hexd, reason=reason)

    # --- descriptors -----------------------------------------------------------------------
    def _acquire_fd(self, hexd: str) -> _Fd | None:
        with self._lock:
            handle = self._fds.get(hexd)
            if handle is not None:
                self._fds.move_to_end(hexd)
                handle.refs += 1
                return handle
        try:
            fd = os.open(self._path(hexd), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        with self._lock:
            existing = self._fds.get(hexd)
            if existing is not None:
                os.close(fd)
                existing.refs += 1
                return existing
            handle = _Fd(fd)
            handle.refs = 1
            self._fds[hexd] = handle
            while len(self._fds) > self._max_fds:
                old_hex = next(iter(self._fds))
                self._forget_fd_locked(old_hex)
            return handle

    def _release_fd(self, handle: _Fd) -> None:
        with self._lock:
            handle.refs -= 1
            if handle.dropped and handle.refs == 0:
                os.close(handle.fd)

    def _forget_fd_locked(self, hexd: str) -> None:
        handle = self._fds.pop(hexd, None)
        if handle is not None:
            handle.dropped = True
            if handle.refs == 0:
                os.close(handle.fd)

    def close(self) -> None:
        self.flush()
        with self._lock:
            executor, self._executor = self._executor, None
            verifier, self._verifier = self._verifier, None
        if executor is not None:
            executor.shutdown(wait=True)
        if verifier is not None:
            verifier.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for hexd in list(self._fds):
                self._forget_fd_locked(hexd)

    # --- TOC members -----------------------------------------------------------------------
    def put_toc(self, name: str, data: bytes) -> None:
        """Persist a TOC member (its reader re-verifies it against the TOC digest on load)."""
        if not _TOC_NAME.fullmatch(name):
            raise CacheError(f"invalid TOC cache name {name!r}")
        if len(data) > self.max_toc_bytes:
            return
        try:
            write_atomic(self._tocs / name, data, durable=False)
        except OSError as e:
            log.warning("toc_cache_write_failed", name=name, error=str(e))
            return
        victims: list[Path] = []
        with self._lock:
            old = self._toc_entries.pop(name, None)
            if old is not None:
                self._toc_total -= old
            self._toc_entries[name] = len(data)
            self._toc_total += len(data)
            while self._toc_total > self.max_toc_bytes and len(self._toc_entries) > 1:
                victim, size = self._toc_entries.popitem(last=False)
                self._toc_total -= size
                victims.append(self._tocs / victim)
        self._unlink(victims)

    def get_toc(self, name: str) -> bytes | None:
        if not _TOC_NAME.fullmatch(name):
            raise CacheError(f"invalid TOC cache name {name!r}")
        try:
            data = (self._tocs / name).read_bytes()
        except OSError:
            return None
        with self._lock:
            if name in self._toc_entries:
                self._toc_entries.move_to_end(name)
        return data

    def remove_toc(self, name: str) -> None:
        if _TOC_NAME.fullmatch(name):
            with self._lock:
                size = self._toc_entries.pop(name, None)
                if size is not None:
                    self._toc_total -= size
            with contextlib.suppress(OSError):
                (self._tocs / name).unlink()

    # --- operator maintenance: ``stargz-store cache prune`` / ``cache clear`` ------------------
    # Kept apart from the read and write paths above. Entries leave the bookkeeping under the
    # lock first (as an eviction does), their descriptors are closed once no pread uses them,
    # and the files are unlinked afterwards: a reader racing with this gets either the bytes
    # (an open descriptor reads an unlinked file) or a miss, which the fetcher refetches. It
    # never reads a half-removed entry.

    def snapshot(self) -> CacheSnapshot:
        """Sizes and counters (read-only, one lock)."""
        with self._lock:
            return CacheSnapshot(
                root=str(self.root),
                entries=len(self._entries),
                bytes=self._total,
                max_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses,
                evicted=self._evicted,
                removed_by_operator=self._removed_by_operator,
                toc_entries=len(self._toc_entries),
                toc_bytes=self._toc_total,
                pending_bytes=self._pending_bytes,
                hot_bytes=self._hot_bytes,
            )

    def prune(self, max_bytes: int) -> PruneResult:
        """Remove the least recently used chunks until at most *max_bytes* remain."""
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        victims: list[Path] = []
        freed = 0
        with self._lock:
            while self._total > max_bytes and self._entries:
                hexd, entry = self._entries.popitem(last=False)
                freed += entry.size
                victims.append(self._remove_locked(hexd, entry))
            self._removed_by_operator += len(victims)
            left = self._total
        self._unlink(victims)
        log.info("chunk_cache_pruned", entries=len(victims), bytes=freed, total=left)
        return PruneResult(entries=len(victims), bytes=freed, tocs=0, remaining_bytes=left)

    def clear(self) -> PruneResult:
        """Remove every chunk and TOC member (pending writes are waited for first, up to 10 s,
        so that they are removed too)."""
        self.flush(timeout=10.0)
        victims: list[Path] = []
        freed = 0
        with self._lock:
            while self._entries:
                hexd, entry = self._entries.popitem(last=False)
                freed += entry.size
                victims.append(self._remove_locked(hexd, entry))
            self._removed_by_operator += len(victims)
            self._hot.clear()
            self._hot_bytes = 0
            tocs = [self._tocs / name for name in self._toc_entries]
            toc_bytes = self._toc_total
            self._toc_entries.clear()
            self._toc_total = 0
            left = self._total
        self._unlink(victims)
        self._unlink(tocs)
        log.info(
            "chunk_cache_cleared", entries=len(victims), bytes=freed + toc_bytes, tocs=len(tocs)
        )
        return PruneResult(
            entries=len(victims), bytes=freed + toc_bytes, tocs=len(tocs), remaining_bytes=left
        )

    def _remove_locked(self, hexd: str, entry: _Entry) -> Path:
        """Forget an entry already taken out of ``_entries``; the caller unlinks the path."""
        self._total -= entry.size
        self._forget_fd_locked(hexd)
        hot = self._hot.pop(hexd, None)
        if hot is not None:
            self._hot_bytes -= len(hot)
        return self._path(hexd)


@dataclass(frozen=True)
class CacheSnapshot:
    root: str
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evicted: int
    """Entries evicted to stay under ``max_bytes``."""
    removed_by_operator: int
    """Entries removed by ``prune``/``clear``."""
    toc_entries: int
    toc_bytes: int
    pending_bytes: int
    """Verified chunks waiting for the writer pool."""
    hot_bytes: int
    """Verified bytes kept in memory."""


@dataclass(frozen=True)
class PruneResult:
    entries: int
    """Chunks removed."""
    bytes: int
    """Bytes removed (chunks and TOC members)."""
    tocs: int
    """TOC members removed."""
    remaining_bytes: int
    """Bytes of chunks left in the cache."""
