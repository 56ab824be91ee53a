"""Persistent, content-addressed, verified chunk cache with LRU eviction.

Layout under *root*::

    packs/<32 hex>            verified chunks, many per file, with their block tags and an
                              authenticated index (:mod:`layerstore.runtime.packfile`)
    toc/<name>                verified TOC members (opaque bytes; re-verified by whoever
                              reads them), kept under their own budget (``max_toc_bytes``),
                              oldest dropped
    key                       (default place; the daemon keeps it in ``--root``) the 32-byte
                              key the block tags and the pack indexes are keyed with, mode 0600

Rules:

* **Only verified bytes go in.** ``put``/``put_async`` accept only bytes whose sha256 equals
  the key (callers that have just verified them, the fetcher via ``decode_chunk``, pass
  ``verified=True``); ``store_stream`` takes a *fill* that verifies as it writes.
* **Packs.** Chunks waiting to be written (``put_async``) are written together, as one pack
  file per batch, by a small writer pool: creating a file costs ~1 ms on a journaling file
  system, and a cold small-file read brings a few hundred small chunks (read-ahead and
  read-behind), which as one file each bounded cold reads to ~25 files/s. A pack is written to
  a temporary file and renamed into place whole (:func:`layerstore.common.atomicfile.
  atomic_output`, not fsynced: a lost pack is fetched again, a torn one is never used), so a
  reader never sees a partial pack. Until its pack is in place a chunk is served from memory
  (``get``, ``read``, ``read_nowait``, ``peek``, ``in``); pending bytes are bounded
  (``max_pending_bytes``): beyond it the caller writes a batch itself.
* **Every read from disk is checked.** Each chunk has keyed tags of its 64 KiB blocks
  (:mod:`layerstore.runtime.blocktags`), computed from its verified bytes when written and
  stored in its pack under the index MAC. Every pread hashes the blocks it covers and
  compares: a mismatch (bytes altered after they were verified) drops the entry, logs
  ``chunk_cache_entry_altered`` (an error) and answers a miss, so the caller fetches the chunk
  again; altered bytes are never returned. A short or unreadable pack is a miss too.
* **Restart.** The key persists (``key_path``, root-only), so the tags of packs found at
  start-up are trusted once their index MAC matches: no chunk is re-hashed after a restart.
  A pack whose tail does not parse or whose MAC does not match (torn by a crash, altered,
  written under another key) is removed when the cache opens. With ``persistent=False`` the
  key lives in memory only, and every pack found at start-up is removed. Temporary files
  (``.tmp-*``) are removed at start-up, and so are the one-file-per-chunk directory of older
  versions (``chunks/``) and the image resolutions they kept in ``toc/`` (``resolved-*``).
  See ``docs/ARCHITECTURE.md``, "Cached chunks".
* **LRU per pack.** The total of the packs' chunk bytes is kept under ``max_bytes`` (the
  index and tags, ~64 bytes per chunk, are not counted). A hit moves its pack to the young
  end and touches the pack's mtime at most once a minute, so the order survives a restart;
  eviction removes the oldest packs whole. A chunk dropped from a pack (altered, unreadable)
  leaves dead bytes there until the pack goes; a pack whose chunks are all dropped goes at
  once.
* ``read(digest, offset, length)`` preads a slice (and the rest of the blocks it touches)
  through a small LRU of open pack descriptors, so a 128 KiB FUSE read does not read a whole
  4 MiB chunk. ``read_nowait`` does the same for the event loop when no disk wait is needed
  (pending bytes, or blocks in the page cache: ``preadv2(RWF_NOWAIT)``). ``advise(digests)``
  (``advise_soon`` from the loop) asks the kernel to read ahead the chunks a sequential reader
  wants next.
* The daemon-wide :class:`~layerstore.runtime.membudget.MemoryBudget` (``memory_budget``)
  bounds the bytes held by the fetches of every layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from layerstore.common.atomicfile import TMP_PREFIX, atomic_output, write_atomic
from layerstore.errors import CacheError, VerificationError
from layerstore.runtime import packfile
from layerstore.runtime.blocktags import BLOCK, BlockTagger
from layerstore.runtime.membudget import MemoryBudget
from layerstore.runtime.packfile import PackEntry, PackError, PackKeys

log = structlog.get_logger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_PACK_NAME = re.compile(r"[0-9a-f]{32}")
_TOC_NAME = re.compile(r"[0-9A-Za-z._-]{1,200}")
_LEGACY_RESOLUTION_PREFIX = "resolved-"  # image resolutions, now in ResolutionStore
_LEGACY_CHUNKS = "chunks"  # one file per chunk, before packs
_OLD_PREFIX = ".old-"  # a legacy directory being removed in the background
_TOUCH_INTERVAL = 60.0
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024
DEFAULT_PACK_BYTES = 16 * 1024 * 1024
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14 (buffered reads: 5.9 and later)
DAEMON_KEY_NAME = "cache.key"
"""The daemon keeps the cache's key in its ``--root`` under this name (outside the cache
directory: a process given only the cache directory cannot read it)."""


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


class _Pack:
    """A pack file: ``data_size`` chunk bytes (what counts against ``max_bytes``), the chunks
    it was written with (``hexes``; some may have been dropped since, or be served by an older
    pack), how many of them the index still points here (``live``)."""

    __slots__ = ("data_size", "hexes", "live", "name", "touched")

    def __init__(self, name: str, data_size: int, hexes: list[str], touched: float) -> None:
        self.name = name
        self.data_size = data_size
        self.hexes = hexes
        self.live = 0
        self.touched = touched


class _Entry:
    """Where a chunk is (``pack``, ``offset``, ``size``) and the block tags of its verified
    bytes (set once, never changed)."""

    __slots__ = ("advised", "offset", "pack", "size", "tags")

    def __init__(self, pack: _Pack, offset: int, size: int, tags: bytes) -> None:
        self.pack = pack
        self.offset = offset
        self.size = size
        self.tags = tags
        self.advised = False


class ChunkCache:
    """Thread-safe on-disk cache of verified chunks, keyed by ``sha256:`` digest."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int,
        *,
        max_open_files: int = 64,
        max_pending_bytes: int = 16 * 1024 * 1024,
        writer_threads: int = 2,
        max_toc_bytes: int | None = None,
        memory_budget: MemoryBudget | None = None,
        memory_wait_seconds: float = 60.0,
        max_pack_bytes: int = DEFAULT_PACK_BYTES,
        key_path: str | os.PathLike[str] | None = None,
        persistent: bool = True,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")  # 0: nothing is cached
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._max_fds = max(1, max_open_files)
        self._packs_dir = self.root / "packs"
        self._tocs = self.root / "toc"
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._packs: OrderedDict[str, _Pack] = OrderedDict()  # name -> pack, oldest first
        self._fds: OrderedDict[str, _Fd] = OrderedDict()  # pack name -> descriptor
        self._total = 0
        # Verified chunks not yet in a pack: served from here meanwhile; written in order.
        self._pending: dict[str, bytes] = {}
        self._queue: deque[str] = deque()
        self._pending_bytes = 0
        self._max_pending = max_pending_bytes
        self._pending_done = threading.Condition(self._lock)
        self._writer_threads = max(1, writer_threads)
        self._writers = 0  # writer loops running (or submitted)
        self._executor: ThreadPoolExecutor | None = None
        self._advisor: ThreadPoolExecutor | None = None  # advise_soon
        self.max_pack_bytes = max(1, max_pack_bytes)
        # Bytes held in memory by fetches, daemon-wide (the fetchers of every layer take
        # their grants from this one).
        self.memory_budget = memory_budget or MemoryBudget(DEFAULT_MEMORY_BUDGET)
        self.memory_wait_seconds = memory_wait_seconds
        self._reserved = 0  # bytes of store_stream writes in progress, counted against max_bytes
        self._altered = 0
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
            self._packs_dir.mkdir(parents=True, exist_ok=True)
            self._tocs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create cache directory {self.root}: {e}") from e
        self.key_path = Path(key_path) if key_path is not None else self.root / "key"
        self._keys = PackKeys.derive(self._load_key(persistent))
        # Keyed block tags of verified chunks (the key is the cache's, derived).
        self._tagger = BlockTagger(self._keys.tags)
        self._rebuild()

    # --- start-up --------------------------------------------------------------------------
    def _load_key(self, persistent: bool) -> bytes:
        if not persistent:
            return os.urandom(packfile.KEY_SIZE)
        try:
            key, created = packfile.load_key(self.key_path)
        except packfile.KeyFileError as e:
            log.warning(
                "chunk_cache_key_not_saved",
                error=str(e),
                detail="the cache will not be trusted after a restart",
            )
            return os.urandom(packfile.KEY_SIZE)
        if created:
            log.info("chunk_cache_key_created", path=str(self.key_path))
        return key

    def _rebuild(self) -> None:
        found: list[tuple[float, str, packfile.PackIndex]] = []
        removed = dropped = 0
        reasons: dict[str, int] = {}
        try:
            names = os.listdir(self._packs_dir)
        except OSError as e:
            raise CacheError(f"cannot list {self._packs_dir}: {e.strerror}") from None
        for name in names:
            path = self._packs_dir / name
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
                continue
            if not _PACK_NAME.fullmatch(name):
                continue
            try:
                st = os.stat(path)
                index = packfile.read_index(path, self._keys)
            except (OSError, PackError) as e:
                reason = str(e).split(" (")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    dropped += 1
                continue
            # mtime only: the cache touches it on hits (at most once a minute); atime moves
            # whenever anyone reads the file, this start-up's index reads included.
            found.append((st.st_mtime, name, index))
        found.sort(key=lambda t: (t[0], t[1]))
        for stamp, name, index in found:
            pack = _Pack(name, index.data_size, [e.hexd for e in index.entries], stamp)
            self._packs[name] = pack
            self._total += pack.data_size
            for pe in index.entries:
                if pe.hexd not in self._entries:
                    self._entries[pe.hexd] = _Entry(pack, pe.offset, pe.size, pe.tags)
                    pack.live += 1
        legacy = self._remove_legacy()
        tocs, old_resolutions = self._rebuild_tocs()
        for _stamp, name, size in sorted(tocs):
            self._toc_entries[name] = size
            self._toc_total += size
        log.info(
            "chunk_cache_opened",
            root=str(self.root),
            entries=len(self._entries),
            packs=len(self._packs),
            bytes=self._total,
            max_bytes=self.max_bytes,
            stale_temp_files_removed=removed,
            old_resolutions_removed=old_resolutions,
            old_layout_removed=legacy,
        )
        if dropped:
            # Many at once after a key change (or with persistent=False): one line, not one
            # per pack. A crash can leave a torn pack too.
            log.warning("chunk_cache_packs_dropped", packs=dropped, reasons=reasons)
        with self._lock:
            victims = self._evict_locked(keep=None)
        self._unlink(victims)

    def _rebuild_tocs(self) -> tuple[list[tuple[float, str, int]], int]:
        tocs: list[tuple[float, str, int]] = []
        legacy = 0
        for name in os.listdir(self._tocs):
            path = self._tocs / name
            if name.startswith(TMP_PREFIX) or name.startswith(_LEGACY_RESOLUTION_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    legacy += not name.startswith(TMP_PREFIX)
                continue
            if _TOC_NAME.fullmatch(name):
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    tocs.append((st.st_mtime, name, st.st_size))
        return tocs, legacy

    def _remove_legacy(self) -> bool:
        """Older versions kept one file per chunk in ``chunks/``. Those files carry no tags
        this version can trust; they are moved aside at once and deleted by a background
        thread (a large old cache takes a while to unlink). Returns whether one was found."""
        old = self.root / _LEGACY_CHUNKS
        doomed: list[Path] = []
        if old.is_dir():
            aside = self.root / f"{_OLD_PREFIX}{_LEGACY_CHUNKS}-{secrets.token_hex(4)}"
            with contextlib.suppress(OSError):
                os.rename(old, aside)
        with contextlib.suppress(OSError):
            doomed = [p for p in self.root.iterdir() if p.name.startswith(_OLD_PREFIX)]
        if doomed:

            def remove() -> None:
                for p in doomed:
                    shutil.rmtree(p, ignore_errors=True)

            threading.Thread(target=remove, name="chunk-cache-legacy-removal", daemon=True).start()
        return bool(doomed)

    # --- paths -----------------------------------------------------------------------------
    def _pack_path(self, name: str) -> Path:
        return self._packs_dir / name

    def locate(self, digest: str) -> tuple[Path, int, int] | None:
        """Where the chunk's bytes are on disk: ``(pack file, offset, size)``, or None (not
        cached, or still pending). For tests and diagnostics."""
        hexd = _hex_of(digest)
        with self._lock:
            entry = self._entries.get(hexd)
            if entry is None:
                return None
            return self._pack_path(entry.pack.name), entry.offset, entry.size

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
                "packs": len(self._packs),
                "bytes": self._total,
                "max_bytes": self.max_bytes,
                "hits": self._hits,
                "misses": self._misses,
                "altered": self._altered,
            }

    # --- reads -----------------------------------------------------------------------------
    def _find(self, hexd: str) -> tuple[bytes | None, _Entry | None]:
        """Pending bytes, or the entry; counts a miss when neither."""
        with self._lock:
            pending = self._pending.get(hexd)
            if pending is not None:
                self._hits += 1
                return pending, None
            entry = self._entries.get(hexd)
            if entry is None:
                self._misses += 1
            return None, entry

    def get(self, digest: str) -> bytes | None:
        """The whole verified entry, or None (absent, or found altered and removed).

        Holds the whole entry in memory: meant for chunks of ordinary size; slices of large
        ones are read with :meth:`read`."""
        pending, entry = self._find(_hex_of(digest))
        if pending is not None:
            return pending
        if entry is None:
            return None
        return self._pread_checked(digest[7:], entry, 0, entry.size)

    def peek(self, digest: str, offset: int, length: int) -> memoryview | None:
        """Like :meth:`read` from memory only (chunks not yet written), as a read-only view
        (no copy): never blocks on I/O; None when the bytes are not in memory."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if not digest.startswith("sha256:"):
            return None
        with self._lock:
            data = self._pending.get(digest[7:])
            if data is None:
                return None
            self._hits += 1
        return memoryview(data)[offset : offset + length]

    def read_nowait(self, digest: str, offset: int, length: int) -> memoryview | None:
        """Like :meth:`read`, but only what needs no waiting for the disk: a chunk not written
        yet (from memory), or one whose blocks are in the kernel's page cache, read through a
        pack descriptor already open with ``preadv2(RWF_NOWAIT)`` and checked against its tags.
        None otherwise (not cached, not in the page cache, at or past the end, a tag that does
        not match: :meth:`read` in a thread then answers, and reports). Meant for the event loop:
        a cached read served here costs no thread hop (two thread wake-ups per FUSE request,
        each several milliseconds on a loaded machine)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if not digest.startswith("sha256:"):
            return None
        hexd = digest[7:]
        with self._lock:
            data = self._pending.get(hexd)
            if data is not None:
                self._hits += 1
                return memoryview(data)[offset : offset + length]
            entry = self._entries.get(hexd)
            if entry is None or not _RWF_NOWAIT or offset >= entry.size or length == 0:
                return None
            handle = self._fds.get(entry.pack.name)
            if handle is None:  # opening a file may wait for the disk
                return None
            handle.refs += 1
        length = min(length, entry.size - offset)
        first = offset // BLOCK
        start = first * BLOCK
        want = min(entry.size, -(-(offset + length) // BLOCK) * BLOCK) - start
        buf = bytearray(want)
        try:
            got = os.preadv(handle.fd, [buf], entry.offset + start, _RWF_NOWAIT)
        except OSError:  # EAGAIN: not (all) in the page cache
            got = -1
        finally:
            self._release_fd(handle)
        if got != want or self._tagger.check(entry.tags, first, buf) >= 0:
            return None
        with self._lock:
            if self._entries.get(hexd) is entry:
                self._hits += 1
                if self._packs.get(entry.pack.name) is entry.pack:
                    self._packs.move_to_end(entry.pack.name)
        return memoryview(buf)[offset - start : offset - start + length]

    def read(self, digest: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of the entry (short at its end), or None on a miss
        (absent, or found altered and removed)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        hexd = _hex_of(digest)
        pending, entry = self._find(hexd)
        if pending is not None:
            return pending[offset : offset + length]
        if entry is None:
            return None
        if offset >= entry.size or length == 0:
            self._hit(hexd, entry)
            return b""
        return self._pread_checked(hexd, entry, offset, min(length, entry.size - offset))

    def advise(self, digests: list[str]) -> int:
        """Ask the kernel to read ahead the cached chunks among *digests* (a sequential reader
        wants them next), once per chunk: the preads that follow find them in the page cache.
        May block briefly on I/O: not for the event loop. Returns how many were advised."""
        todo = self._to_advise(digests)
        self._advise_entries(todo)
        return len(todo)

    def advise_soon(self, digests: list[str]) -> int:
        """:meth:`advise` on a helper thread: for the event loop (nothing is done, nor
        submitted, for chunks advised before). Returns how many were queued."""
        todo = self._to_advise(digests)
        if not todo:
            return 0
        with self._lock:
            if self._advisor is None:
                self._advisor = ThreadPoolExecutor(1, thread_name_prefix="chunk-cache-advise")
            advisor = self._advisor
        try:
            advisor.submit(self._advise_entries, todo)
        except RuntimeError:  # shut down
            return 0
        return len(todo)

    def _to_advise(self, digests: list[str]) -> list[_Entry]:
        if getattr(os, "posix_fadvise", None) is None:
            return []
        todo: list[_Entry] = []
        with self._lock:
            for digest in digests:
                entry = self._entries.get(digest[7:]) if digest.startswith("sha256:") else None
                if entry is not None and not entry.advised:
                    entry.advised = True
                    todo.append(entry)
        return todo

    def _advise_entries(self, todo: list[_Entry]) -> None:
        fadvise = os.posix_fadvise
        for entry in todo:
            handle = self._acquire_fd(entry.pack.name)
            if handle is None:
                continue
            try:
                fadvise(handle.fd, entry.offset, entry.size, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                self._release_fd(handle)

    def _pread_checked(self, hexd: str, entry: _Entry, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of *entry*, read from its pack together with the rest
        of the blocks they touch, every block compared with its tag. None (the entry dropped)
        when the pack is short, unreadable or altered."""
        first = offset // BLOCK
        start = first * BLOCK
        stop = min(entry.size, -(-(offset + length) // BLOCK) * BLOCK)
        want = stop - start
        handle = self._acquire_fd(entry.pack.name)
        if handle is None:
            self._drop(hexd, entry, reason="unreadable")
            return None
        at = entry.offset + start
        try:
            data = os.pread(handle.fd, want, at)
            if 0 < len(data) < want:  # a short read is legal: go on
                parts = [data]
                done = len(data)
                while done < want:
                    piece = os.pread(handle.fd, want - done, at + done)
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
        bad = self._tagger.check(entry.tags, first, data)
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
            path=str(self._pack_path(entry.pack.name)),
            offset=entry.offset,
            block=block,
            block_size=BLOCK,
            detail="the file changed after its bytes were verified; removed, fetched again",
        )
        self._drop(hexd, entry, reason="altered")

    def _hit(self, hexd: str, entry: _Entry) -> None:
        now = time.time()
        touch = False
        pack = entry.pack
        with self._lock:
            if self._entries.get(hexd) is not entry:
                return
            if self._packs.get(pack.name) is pack:
                self._packs.move_to_end(pack.name)
            self._hits += 1
            if now - pack.touched > _TOUCH_INTERVAL:
                pack.touched = now
                touch = True
        if touch:
            with contextlib.suppress(OSError):
                os.utime(self._pack_path(pack.name))

    # --- writes ----------------------------------------------------------------------------
    def put(self, digest: str, data: bytes, *, verified: bool = False) -> bool:
        """Store *data* under *digest* now (a pack of its own). Returns False when it is too
        large to cache or cannot be written.

        Without ``verified=True`` the sha256 is checked here; a mismatch raises
        :class:`VerificationError` and nothing is stored.
        """
        hexd = _hex_of(digest)
        if not verified and hashlib.sha256(data).hexdigest() != hexd:
            raise VerificationError(f"refusing to cache bytes that do not match {digest}")
        if len(data) > self.max_bytes:
            return False
        with self._lock:
            if hexd in self._entries:
                return True
        return self._write_pack([(hexd, data)])

    def _write_pack(self, batch: list[tuple[str, bytes]]) -> bool:
        """One pack of *batch* (verified chunks), renamed into place whole, then indexed."""
        name = secrets.token_hex(16)
        entries: list[PackEntry] = []
        offset = 0
        for hexd, data in batch:
            entries.append(PackEntry(hexd, offset, len(data), self._tagger.tags(data)))
            offset += len(data)
        try:
            with atomic_output(self._pack_path(name), durable=False) as f:
                for _hexd, data in batch:
                    f.write(data)
                f.write(packfile.encode_tail(self._keys, entries, offset))
        except OSError as e:
            log.warning("chunk_cache_write_failed", chunks=len(batch), error=str(e))
            return False
        self._publish(name, offset, entries)
        return True

    def store_stream(
        self, digest: str, size: int, fill: Callable[[Callable[[bytes], object]], None]
    ) -> bool:
        """Store a chunk of *size* bytes that *fill* writes piece by piece (it is called with a
        ``write(piece)`` function), without ever holding it whole (a pack of its own).

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
        name = secrets.token_hex(16)
        try:
            with atomic_output(self._pack_path(name), durable=False) as f:

                def write(piece: bytes) -> object:
                    f.write(piece)
                    tags.add(piece)
                    return None

                fill(write)
                if tags.size != size:
                    raise CacheError(f"{digest}: {tags.size} bytes written, expected {size}")
                entry = PackEntry(hexd, 0, size, tags.finish())
                f.write(packfile.encode_tail(self._keys, [entry], size))
        finally:
            with self._lock:
                self._reserved -= size
        self._publish(name, size, [entry])
        return True

    def _publish(self, name: str, data_size: int, entries: list[PackEntry]) -> None:
        """Index a pack just renamed into place (its chunks verified before they were
        written); chunks another pack already serves stay served from there."""
        pack = _Pack(name, data_size, [e.hexd for e in entries], time.time())
        with self._lock:
            self._packs[name] = pack
            self._total += data_size
            for e in entries:
                if e.hexd not in self._entries:
                    self._entries[e.hexd] = _Entry(pack, e.offset, e.size, e.tags)
                    pack.live += 1
            victims = self._evict_locked(keep=name) if pack.live else [self._remove_pack(pack)]
        self._unlink(victims)

    def put_async(self, digest: str, data: bytes, *, verified: bool = False) -> None:
        """Like :meth:`put`, but written with other pending chunks into one pack by the writer
        pool; served from memory meanwhile."""
        hexd = _hex_of(digest)
        if not verified and hashlib.sha256(data).hexdigest() != hexd:
            raise VerificationError(f"refusing to cache bytes that do not match {digest}")
        size = len(data)
        if size > self.max_bytes:
            return
        with self._lock:
            if hexd in self._entries or hexd in self._pending:
                return
            self._pending[hexd] = data
            self._pending_bytes += size
            self._queue.append(hexd)
            over = self._pending_bytes > self._max_pending
            start = self._writers < self._writer_threads
            if start:
                self._writers += 1
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self._writer_threads, thread_name_prefix="chunk-cache-writer"
                    )
                executor = self._executor
        if start:
            try:
                executor.submit(self._writer_loop)
            except RuntimeError:  # shut down: write here
                self._writer_loop()
        if over:
            # The writers are behind: write a batch here (this caller's chunk, with others).
            self._write_batch()

    def _take_batch(self) -> list[tuple[str, bytes]]:
        """Under the lock: pending chunks from the queue, up to ``max_pack_bytes`` (at least
        one). They stay in ``_pending`` (served from memory) until their pack is indexed."""
        batch: list[tuple[str, bytes]] = []
        size = 0
        while self._queue and (not batch or size < self.max_pack_bytes):
            hexd = self._queue.popleft()
            data = self._pending.get(hexd)
            if data is None:
                continue
            if hexd in self._entries:  # put() wrote it meanwhile
                self._unpend_locked(hexd)
                continue
            if batch and size + len(data) > self.max_pack_bytes:
                self._queue.appendleft(hexd)
                break
            batch.append((hexd, data))
            size += len(data)
        return batch

    def _unpend_locked(self, hexd: str) -> None:
        data = self._pending.pop(hexd, None)
        if data is not None:
            self._pending_bytes -= len(data)

    def _write_batch(self) -> bool:
        """Write one batch of pending chunks; False when there was none."""
        with self._lock:
            batch = self._take_batch()
        if not batch:
            return False
        try:
            self._write_pack(batch)
        except Exception as e:  # never lose the pending slots
            log.warning("chunk_cache_write_failed", chunks=len(batch), error=str(e))
        finally:
            with self._lock:
                for hexd, _data in batch:
                    self._unpend_locked(hexd)
                self._pending_done.notify_all()
        return True

    def _writer_loop(self) -> None:
        """A writer: batches until the queue is empty (checked under the lock that
        ``put_async`` counts writers under, so no chunk is left without one)."""
        while True:
            with self._lock:
                if not self._queue:
                    self._writers -= 1
                    return
            try:
                self._write_batch()
            except Exception as e:  # keep going: the batch's slots were released
                log.warning("chunk_cache_write_failed", error=str(e))

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

    # --- removal ---------------------------------------------------------------------------
    def _remove_pack(self, pack: _Pack) -> Path:
        """Under the lock: forget *pack* and every entry it serves; the caller unlinks the
        returned path (after releasing the lock). Returns the number of entries through
        ``pack.live`` (left as it was)."""
        if self._packs.get(pack.name) is pack:
            del self._packs[pack.name]
            self._total -= pack.data_size
        live = 0
        for hexd in pack.hexes:
            entry = self._entries.get(hexd)
            if entry is not None and entry.pack is pack:
                del self._entries[hexd]
                live += 1
        pack.live = live
        self._forget_fd_locked(pack.name)
        return self._pack_path(pack.name)

    def _evict_locked(self, keep: str | None) -> list[Path]:
        """Forget the oldest packs until under the limit; returns the files to unlink (after
        the lock is released: unlinking can take a millisecond)."""
        victims: list[Path] = []
        freed = entries = 0
        while self._total + self._reserved > self.max_bytes and self._packs:
            name, pack = next(iter(self._packs.items()))
            if name == keep and len(self._packs) > 1:
                self._packs.move_to_end(name)
                continue
            # (the kept pack goes too when it alone is over the limit: a batch of pending
            # chunks larger than the whole cache; its chunks are fetched again when read)
            victims.append(self._remove_pack(pack))
            freed += pack.data_size
            entries += pack.live
        self._evicted += entries
        if victims:
            log.debug(
                "chunk_cache_evicted",
                packs=len(victims),
                entries=entries,
                bytes=freed,
                total=self._total,
            )
        return victims

    @staticmethod
    def _unlink(paths: list[Path]) -> None:
        for p in paths:
            with contextlib.suppress(OSError):
                os.unlink(p)

    def _drop(self, hexd: str, entry: _Entry, *, reason: str) -> None:
        """Remove *entry* (unless it was already evicted or replaced meanwhile); its pack goes
        too when nothing else of it is served."""
        victims: list[Path] = []
        with self._lock:
            self._misses += 1
            if self._entries.get(hexd) is not entry:
                return  # evicted (or rewritten) by someone else: just a miss
            del self._entries[hexd]
            pack = entry.pack
            pack.live -= 1
            if pack.live <= 0:
                victims.append(self._remove_pack(pack))
        self._unlink(victims)
        log.warning("chunk_cache_entry_removed", digest="sha256:" + hexd, reason=reason)

    # --- descriptors -----------------------------------------------------------------------
    def _acquire_fd(self, name: str) -> _Fd | None:
        with self._lock:
            handle = self._fds.get(name)
            if handle is not None:
                self._fds.move_to_end(name)
                handle.refs += 1
                return handle
        try:
            fd = os.open(self._pack_path(name), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        with self._lock:
            existing = self._fds.get(name)
            if existing is not None:
                os.close(fd)
                existing.refs += 1
                return existing
            if name not in self._packs:  # removed while we opened it
                os.close(fd)
                return None
            handle = _Fd(fd)
            handle.refs = 1
            self._fds[name] = handle
            while len(self._fds) > self._max_fds:
                self._forget_fd_locked(next(iter(self._fds)))
            return handle

    def _release_fd(self, handle: _Fd) -> None:
        with self._lock:
            handle.refs -= 1
            if handle.dropped and handle.refs == 0:
                os.close(handle.fd)

    def _forget_fd_locked(self, name: str) -> None:
        handle = self._fds.pop(name, None)
        if handle is not None:
            handle.dropped = True
            if handle.refs == 0:
                os.close(handle.fd)

    def close(self) -> None:
        self.flush()
        with self._lock:
            executor, self._executor = self._executor, None
            advisor, self._advisor = self._advisor, None
        if executor is not None:
            executor.shutdown(wait=True)
        if advisor is not None:
            advisor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for name in list(self._fds):
                self._forget_fd_locked(name)

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

    def has_toc(self, name: str) -> bool:
        """Whether a TOC member is stored under *name* (no I/O)."""
        with self._lock:
            return name in self._toc_entries

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
    # Kept apart from the read and write paths above. Packs leave the bookkeeping under the
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
                packs=len(self._packs),
            )

    def prune(self, max_bytes: int) -> PruneResult:
        """Remove the least recently used packs until at most *max_bytes* remain."""
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        victims: list[Path] = []
        freed = entries = 0
        with self._lock:
            while self._total > max_bytes and self._packs:
                pack = next(iter(self._packs.values()))
                victims.append(self._remove_pack(pack))
                freed += pack.data_size
                entries += pack.live
            self._removed_by_operator += entries
            left = self._total
        self._unlink(victims)
        log.info("chunk_cache_pruned", entries=entries, packs=len(victims), bytes=freed, total=left)
        return PruneResult(entries=entries, bytes=freed, tocs=0, remaining_bytes=left)

    def clear(self) -> PruneResult:
        """Remove every chunk and TOC member (pending writes are waited for first, up to 10 s,
        so that they are removed too)."""
        self.flush(timeout=10.0)
        victims: list[Path] = []
        freed = entries = 0
        with self._lock:
            while self._packs:
                pack = next(iter(self._packs.values()))
                victims.append(self._remove_pack(pack))
                freed += pack.data_size
                entries += pack.live
            self._removed_by_operator += entries
            tocs = [self._tocs / name for name in self._toc_entries]
            toc_bytes = self._toc_total
            self._toc_entries.clear()
            self._toc_total = 0
            left = self._total
        self._unlink(victims)
        self._unlink(tocs)
        log.info(
            "chunk_cache_cleared",
            entries=entries,
            packs=len(victims),
            bytes=freed + toc_bytes,
            tocs=len(tocs),
        )
        return PruneResult(
            entries=entries, bytes=freed + toc_bytes, tocs=len(tocs), remaining_bytes=left
        )


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
    packs: int
    """Pack files."""


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
