"""Recording workload profiles: the files each image's layers serve after a container starts.

When recording is on (``[record] enabled``, ``stargz-store serve --record``), the
:class:`~layerstore.runtime.manager.LayerManager` hands every layer it puts to use to an
:class:`AccessRecorder` (:meth:`AccessRecorder.layer_used`), and the layer reports every read it
serves (:meth:`AccessRecorder.note`, from ``Layer.read`` and ``Layer.read_nowait``). Because the
store sees the reads themselves, the record includes what a tracer of system calls misses: the
kernel's own reads for ``execve`` (the executable, the ELF loader) and the page-ins of
``mmap``-ed libraries.

One *session* per image reference: it collects the layers ``use``-d under that reference, its
clock starts at the first read of any of them (the container's first read; a pull reads
nothing), and it ends ``period_seconds`` later, or when the recorder is closed (daemon
shutdown). Then its profile (:mod:`layerstore.estargz.profile`: per layer, by TOC digest, the
files in first-access order with the distinct bytes read) is written atomically to
``<directory>/<UTC time>-<12 hex of sha256(reference)>.json``. A session without reads writes
nothing. A reference used again after its session ended starts a new session (containers/storage
asks for a layer's ``use`` when it looks the layer up, not at every container start, so a second
container of an image already pulled is not recorded again).

:meth:`note` runs on the FUSE event loop for reads served from memory: it only takes the
recorder's lock (a leaf) and touches memory; files are written on the session's timer thread
(``stargz-recorder``) or by :meth:`close`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from layerstore.common.atomicfile import atomic_output
from layerstore.estargz.profile import (
    MAX_ENTRIES,
    LayerProfile,
    Profile,
    ProfileEntry,
    fit,
    now_rfc3339,
)

if TYPE_CHECKING:
    from layerstore.registry.client import ResolvedImage
    from layerstore.runtime.layer import Layer

log = structlog.get_logger(__name__)

MAX_SPANS = 64
"""Byte ranges remembered per file to count distinct bytes; past that, reads are summed."""
UNSTARTED_SESSION_SECONDS = 3600.0
"""A session whose layers are never read is forgotten after this long."""


@dataclass(frozen=True)
class RecordSettings:
    period_seconds: float = 10.0
    """How long after a session's first read files are still recorded."""
    max_entries: int = MAX_ENTRIES
    """Files recorded per session at most (later ones are left out)."""


class _File:
    __slots__ = ("extra", "first_ns", "path", "spans")

    def __init__(self, path: str, first_ns: int) -> None:
        self.path = path
        self.first_ns = first_ns
        self.spans: list[list[int]] = []
        self.extra = 0  # bytes read after MAX_SPANS ranges were taken (may double count)

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        end = offset + length
        spans = self.spans
        for s in spans:
            if offset <= s[1] and end >= s[0]:  # overlaps or touches: merge
                s[0] = min(s[0], offset)
                s[1] = max(s[1], end)
                self._coalesce()
                return
        if len(spans) >= MAX_SPANS:
            self.extra += length
            return
        spans.append([offset, end])

    def _coalesce(self) -> None:
        self.spans.sort()
        out: list[list[int]] = []
        for s in self.spans:
            if out and s[0] <= out[-1][1]:
                out[-1][1] = max(out[-1][1], s[1])
            else:
                out.append(s)
        self.spans = out

    @property
    def bytes(self) -> int:
        return sum(e - s for s, e in self.spans) + self.extra


class _Session:
    def __init__(self, ref: str, manifest_digest: str, order: list[str]) -> None:
        self.ref = ref
        self.manifest_digest = manifest_digest
        self.order = order  # the image's layer digests, manifest order (may be empty)
        self.layers: dict[str, tuple[str, str]] = {}  # compressed digest -> (toc, compressed)
        self.files: dict[tuple[str, int], _File] = {}
        self.created = time.monotonic()
        self.t0_ns: int | None = None
        self.done = False
        self.truncated = False


class AccessRecorder:
    """Thread-safe. One per :class:`~layerstore.runtime.manager.LayerManager`."""

    def __init__(
        self, directory: Path, settings: RecordSettings | None = None, *, tool: str = ""
    ) -> None:
        self.directory = Path(directory)
        self.settings = settings or RecordSettings()
        self.tool = tool
        # Guards the maps and every session's fields. A leaf: no I/O, no other lock, nothing
        # waited for while it is held (note() runs on the FUSE event loop).
        self._lock = threading.Lock()
        self._by_ref: dict[str, _Session] = {}
        self._by_layer: dict[str, list[_Session]] = {}
        self._timers: list[threading.Timer] = []
        self._closed = False
        self.written: list[Path] = []

    # --- the manager's side -------------------------------------------------------------------
    def layer_used(self, ref: str, layer: Layer, image: ResolvedImage | None) -> None:
        """*layer* was put to use for image *ref* (resolved as *image*, when known)."""
        digest = layer.compressed_digest
        with self._lock:
            if self._closed:
                return
            self._forget_stale()
            session = self._by_ref.get(ref)
            if session is None or session.done:
                order = [d.digest for d in image.manifest.layers] if image is not None else []
                session = _Session(ref, image.manifest_digest if image else "", order)
                self._by_ref[ref] = session
            if digest not in session.layers:
                session.layers[digest] = (layer.toc_digest, digest)
                self._by_layer.setdefault(digest, []).append(session)

    def _forget_stale(self) -> None:
        cutoff = time.monotonic() - UNSTARTED_SESSION_SECONDS
        for ref, s in list(self._by_ref.items()):
            if s.t0_ns is None and s.created < cutoff:
                self._drop(s)
                del self._by_ref[ref]

    def _drop(self, session: _Session) -> None:
        for digest in session.layers:
            lst = self._by_layer.get(digest)
            if lst is not None:
                lst[:] = [s for s in lst if s is not session]
                if not lst:
                    del self._by_layer[digest]

    # --- the read path ---------------------------------------------------------------------
    def note(self, layer: Layer, ino: int, offset: int, length: int) -> None:
        """*length* bytes of file *ino* of *layer* at *offset* were served. Memory only."""
        digest = layer.compressed_digest
        if digest not in self._by_layer:  # racy read: a miss only skips a read not recorded
            return
        now = time.monotonic_ns()
        period_ns = int(self.settings.period_seconds * 1e9)
        to_start: list[_Session] = []
        with self._lock:
            sessions = self._by_layer.get(digest)
            if not sessions:
                return
            for s in sessions:
                if s.done:
                    continue
                if s.t0_ns is None:
                    s.t0_ns = now
                    to_start.append(s)
                elif now - s.t0_ns > period_ns:
                    continue
                f = s.files.get((digest, ino))
                if f is None:
                    if len(s.files) >= self.settings.max_entries:
                        s.truncated = True
                        continue
                    path = layer.index.path(ino)
                    if path is None:
                        continue
                    f = s.files[(digest, ino)] = _File(path, now)
                f.add(offset, length)
        for s in to_start:
            self._start_timer(s)

    def _start_timer(self, session: _Session) -> None:
        log.info(
            "recording_started",
            ref=session.ref,
            period_seconds=self.settings.period_seconds,
        )
        t = threading.Timer(self.settings.period_seconds, self._finish, args=(session,))
        t.name = "stargz-recorder"
        t.daemon = True
        with self._lock:
            if self._closed:
                return
            self._timers = [x for x in self._timers if x.is_alive()] + [t]
        t.start()

    # --- ending a session ------------------------------------------------------------------
    def _finish(self, session: _Session) -> Path | None:
        with self._lock:
            if session.done:
                return None
            session.done = True
            self._drop(session)
            if self._by_ref.get(session.ref) is session:
                del self._by_ref[session.ref]
            if session.t0_ns is None or not session.files:
                return None
            profile = self._profile(session)
            truncated = session.truncated
        try:
            path = self._write(session.ref, profile)
        except OSError as e:
            log.warning("profile_write_failed", ref=session.ref, error=str(e))
            return None
        log.info(
            "profile_recorded",
            ref=session.ref,
            path=str(path),
            layers=len(profile.layers),
            files=profile.files,
            bytes=profile.total_bytes,
            truncated=truncated,
        )
        with self._lock:
            self.written.append(path)
        return path

    def _profile(self, session: _Session) -> Profile:
        t0 = session.t0_ns or 0
        per_layer: dict[str, list[_File]] = {}
        for (digest, _ino), f in session.files.items():
            per_layer.setdefault(digest, []).append(f)
        rank = {d: i for i, d in enumerate(session.order)}
        layers = []
        for digest in sorted(per_layer, key=lambda d: (rank.get(d, len(rank)), d)):
            files = sorted(per_layer[digest], key=lambda f: f.first_ns)
            toc, _ = session.layers[digest]
            entries = tuple(
                ProfileEntry(f.path, max(0, (f.first_ns - t0) // 1_000_000), f.bytes) for f in files
            )
            layers.append(LayerProfile(toc, entries, digest))
        return fit(
            Profile(
                tuple(layers),
                created=now_rfc3339(),
                tool=self.tool,
                image=session.ref,
                manifest_digest=session.manifest_digest,
                period_seconds=self.settings.period_seconds,
            )
        )

    def _write(self, ref: str, profile: Profile) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        tag = hashlib.sha256(ref.encode()).hexdigest()[:12]
        path = self.directory / f"{stamp}-{tag}.json"
        n = 1
        while path.exists():
            n += 1
            path = self.directory / f"{stamp}-{tag}-{n}.json"
        with atomic_output(path, durable=True, mode=0o644) as f:
            f.write(profile.to_json() + b"\n")
        return path

    def finish_all(self) -> list[Path]:
        """End every session now and write the profiles of those that read something."""
        with self._lock:
            sessions = list(self._by_ref.values())
        out = []
        for s in sessions:
            p = self._finish(s)
            if p is not None:
                out.append(p)
        return out

    def close(self) -> list[Path]:
        """:meth:`finish_all`, then record nothing more (daemon shutdown)."""
        out = self.finish_all()
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, []
        for t in timers:
            t.cancel()
        return out


def default_tool() -> str:
    """``stargz-store <version>`` for the profile's ``tool`` field, from the installed
    distribution when there is one."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"stargz-store {version('stargz-store')}"
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    return "stargz-store"


__all__ = ["AccessRecorder", "RecordSettings", "default_tool"]
