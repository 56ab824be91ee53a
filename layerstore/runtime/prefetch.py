"""Dependency prefetch: the image's entrypoint executable, then the ELF loader and shared
libraries it needs, fetched when a layer is first used.

Why: a container's first reads are its entrypoint, then (for a dynamic executable) the loader
and the libraries the loader maps one after the other, each a round trip on a cold layer. The
pull and the container set-up leave the link idle for a few hundred ms before that; fetching
these files in that window removes those round trips from the container's start.

What, in order:

1. when a layer is first used, the image's entrypoint (``Entrypoint[0]``, else ``Cmd[0]``,
   looked up in the config's ``PATH``) if this layer has it and it is at most
   ``entrypoint_bytes`` compressed. Layers with prioritized files too: their list often lacks
   what the kernel reads (a list made with strace has no ELF loader), and what it does hold
   is not fetched twice (the landmark prefetch and this one share the fetcher's single
   flight); measured on the harness's python image: the loader's and ``/etc/passwd``'s waits
   (60 + 37 + 24 ms) gone;
2. then its ``PT_INTERP`` and ``DT_NEEDED`` names (:mod:`layerstore.runtime.elfdeps`), looked
   up in :data:`LIBRARY_DIRS` of this layer, a level at a time (each level in one
   ``get_chunks`` call), recursively, up to ``library_files`` files and ``library_bytes``
   compressed bytes per layer;
3. names this layer lacks stay *wanted* for the reference: the image's other layers in use
   are searched at once, and layers used later when they are first used.

Everything here is best effort and runs on its own threads: a failure is logged and the
container's own reads fetch what they need. The other mechanisms that fetch ahead of readers
have their own names (see ``docs/CONCURRENCY.md``): *landmark prefetch* (the prioritized
region, :meth:`~layerstore.runtime.fetcher.ChunkFetcher.landmark_prefetch`), *read-ahead* /
*read-behind* / *continuation* (neighbours of a miss, in the fetcher), *sequential read-ahead*
(:class:`~layerstore.runtime.layer.Layer`) and the *background fill* (the whole blob).

Profile prefetch (:class:`ProfilePrefetcher`), the second policy here: on the first use of an
image, its attached workload profile (an OCI artifact whose ``subject`` is the image's
manifest, see :mod:`layerstore.registry.referrers` and :mod:`layerstore.estargz.profile`) is
looked up once (the answer, found or not, is remembered per manifest digest), and each layer's
recorded files are fetched in the order the workload first read them, a few batches in
parallel, while the container starts. The profile is only a hint: paths the layer does not have
(or that are not regular files) are skipped, and every byte is fetched and verified through the
layer's fetcher against the TOC like any read. A profile that cannot be fetched, fails its
digest or does not parse is logged and ignored.
"""

from __future__ import annotations

import heapq
import itertools
import posixpath
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from layerstore.common.redact import describe_error
from layerstore.errors import LayerStoreError
from layerstore.estargz.profile import LayerProfile, Profile, ProfileError, parse_profile
from layerstore.estargz.toc import Chunk, TOCIndex
from layerstore.registry.client import ResolvedImage
from layerstore.registry.reference import Reference
from layerstore.runtime.elfdeps import LIBRARY_DIRS, elf_dependencies
from layerstore.runtime.layer import Layer

log = structlog.get_logger(__name__)

MiB = 1024 * 1024
_MAX_LOOKUPS = 1024
"""Images whose profile lookup is remembered; beyond that the finished lookups are forgotten
(an image used again is asked about again: a few small requests)."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


START_FILES = ("/etc/passwd", "/etc/group")
"""Read by podman while it creates any container (user and group lookup in the image), before
the entrypoint runs."""


def entrypoint_candidates(config_raw: Mapping[str, Any] | None) -> list[str]:
    """Absolute paths the image's default command may run (``Entrypoint[0]``, else
    ``Cmd[0]``, looked up in its ``PATH``); empty when the config names none."""
    cfg = config_raw.get("config") if isinstance(config_raw, Mapping) else None
    if not isinstance(cfg, Mapping):
        return []
    argv = cfg.get("Entrypoint") or cfg.get("Cmd") or []
    if not isinstance(argv, list) or not argv or not isinstance(argv[0], str) or not argv[0]:
        return []
    prog = argv[0]
    if "/" in prog:
        return [posixpath.normpath(posixpath.join("/", cfg.get("WorkingDir") or "/", prog))]
    path = DEFAULT_PATH
    env = cfg.get("Env")
    if isinstance(env, list):
        for item in env:
            if isinstance(item, str) and item.startswith("PATH="):
                path = item[5:]
    return [posixpath.join(d, prog) for d in path.split(":") if d.startswith("/")]


def command_line(config_raw: Mapping[str, Any] | None) -> tuple[list[str], str]:
    """The image's default command line (``Entrypoint`` + ``Cmd``, or ``Cmd``) and working
    directory; ``([], "/")`` when the config has none or an odd one."""
    cfg = config_raw.get("config") if isinstance(config_raw, Mapping) else None
    if not isinstance(cfg, Mapping):
        return [], "/"
    entry, cmd = cfg.get("Entrypoint") or [], cfg.get("Cmd") or []
    argv = [*entry, *cmd] if isinstance(entry, list) and isinstance(cmd, list) else []
    workdir = cfg.get("WorkingDir") or "/"
    if not all(isinstance(a, str) for a in argv) or not isinstance(workdir, str):
        return [], "/"
    return argv, workdir


def resolve_regular_file(index: TOCIndex, path: str, hops: int = 16) -> int | None:
    """The inode of the regular file *path* names in this layer's view, following symlinks
    inside the layer in any component, as the kernel would (absolute targets from the layer's
    root, ``..`` stopping at the root), at most *hops* of them; None when it is not there.

    Directory symlinks matter: on merged-``/usr`` images (Debian 12, Fedora, Ubuntu) ``/lib64``
    and ``/lib`` are symlinks, so the loader's path ``/lib64/ld-linux-x86-64.so.2`` only
    resolves through them."""
    root = index.root_ino
    todo = [c for c in reversed(path.split("/")) if c not in ("", ".")]  # next one last
    dirs = [root]  # the directories from the root to the current one
    ino = root
    while todo:
        comp = todo.pop()
        if comp == "..":
            if len(dirs) > 1:
                dirs.pop()
            ino = dirs[-1]
            continue
        nxt = index.lookup(dirs[-1], comp)
        if nxt is None:
            return None
        mode = index.getattr(nxt).mode
        if stat.S_ISLNK(mode):
            hops -= 1
            if hops < 0:
                return None
            target = index.readlink(nxt)
            if target.startswith("/"):
                dirs = [root]
            todo.extend(c for c in reversed(target.split("/")) if c not in ("", "."))
            ino = dirs[-1]
            continue
        if todo and not stat.S_ISDIR(mode):
            return None
        dirs.append(nxt)
        ino = nxt
    return ino if ino != root and stat.S_ISREG(index.getattr(ino).mode) else None


def resolve_library(index: TOCIndex, name: str) -> int | None:
    """The inode of the shared library *name* (a ``DT_NEEDED`` entry, or an absolute path such
    as the loader) in this layer's view: the first of :data:`LIBRARY_DIRS` that has it."""
    if not name or "\0" in name:
        return None
    if "/" in name:
        return resolve_regular_file(index, posixpath.normpath(posixpath.join("/", name)))
    for d in LIBRARY_DIRS:
        ino = resolve_regular_file(index, f"{d}/{name}")
        if ino is not None:
            return ino
    return None


def _compressed_bytes(chunks: Sequence[Chunk]) -> int:
    return sum(c.compressed_end - c.offset for c in chunks)


@dataclass(frozen=True)
class DependencyPrefetchSettings:
    entrypoint_bytes: int = 32 * MiB
    """The entrypoint is fetched only when it is at most this large (compressed); 0 disables
    the dependency prefetch altogether."""
    library_files: int = 64
    library_bytes: int = 64 * MiB
    """Per layer, at most this many loader and library files and compressed bytes are fetched
    after the entrypoint; 0 (either) fetches the entrypoint only."""


class ImageLayers(Protocol):
    """What the dependency prefetch needs of the
    :class:`~layerstore.runtime.manager.LayerManager`."""

    def resolution(self, ref: str) -> ResolvedImage | None:
        """The last resolution of *ref* in memory (expired or not), if any."""
        ...

    def layers_in_use(self, ref: str) -> list[Layer]:
        """The layers of *ref* with at least one user."""
        ...


class Handoff(Protocol):
    """The read-triggered dependency fetch (:mod:`layerstore.runtime.depfetch`)."""

    def file_read(self, layer: Layer, ino: int) -> None: ...

    def expect(self, layer: Layer, ino: int, args: list[str], workdir: str) -> None: ...


class DependencyPrefetcher:
    """Thread-safe. One per :class:`~layerstore.runtime.manager.LayerManager`."""

    def __init__(
        self,
        images: ImageLayers,
        settings: DependencyPrefetchSettings,
        handoff: Handoff | None = None,
    ) -> None:
        self._images = images
        self.settings = settings
        # Given the entrypoint once fetched: the read-triggered dependency fetch
        # (layerstore.runtime.depfetch), which then follows its libraries (and, for an
        # interpreter, what it reads at start) itself. Without it, the libraries are followed
        # here (_after_entrypoint).
        self._handoff = handoff
        # Guards the four maps below; never held while calling the manager or a fetcher.
        self._lock = threading.Lock()
        self._considered: set[str] = set()  # layer digests whose entrypoint was considered
        self._wanted: dict[str, set[str]] = {}  # ref -> library names not found yet
        self._queued: dict[str, set[int]] = {}  # layer digest -> inodes queued
        self._spent: dict[str, list[int]] = {}  # layer digest -> [files, bytes] queued

    def layer_used(self, ref: str, layer: Layer) -> None:
        """A user of *layer* (of image *ref*) arrived. Never blocks on the network: the
        fetches run on threads of their own."""
        self._entrypoint(ref, layer)
        with self._lock:
            wanted = bool(self._wanted.get(ref))
        if wanted:  # libraries an entrypoint in another layer of this image needs
            self._spawn_libraries(ref, layer)

    # --- the entrypoint ---------------------------------------------------------------------
    def _entrypoint(self, ref: str, layer: Layer) -> None:
        limit = self.settings.entrypoint_bytes
        with self._lock:
            if limit <= 0 or layer.compressed_digest in self._considered:
                return
            self._considered.add(layer.compressed_digest)
        image = self._images.resolution(ref)
        try:
            if image is None:
                return
            self._start_files(layer)
            for path in entrypoint_candidates(image.config.raw):
                ino = resolve_regular_file(layer.index, path)
                if ino is not None:
                    break
            else:
                return
            chunks = list(layer.index.chunks(ino))
        except (LookupError, ValueError, TypeError) as e:  # a config or TOC of odd shape
            log.warning("dependency_prefetch_skipped", ref=ref, error=describe_error(e))
            return
        size = _compressed_bytes(chunks)
        if not chunks or size > limit:
            return

        # A layer with a plan of its own (prioritized files, an attached profile) is not handed
        # to the read-triggered dependency fetch, which leaves it alone: its libraries are
        # followed here, as when that fetch is off (strace lists lack the loader).
        handoff = None if layer.planned else self._handoff
        if handoff is not None:
            argv, workdir = command_line(image.config.raw)
            handoff.expect(layer, ino, argv[1:], workdir)

        def run() -> None:
            t0 = time.monotonic()
            try:
                data = layer.fetcher.get_chunks(chunks, reason="entrypoint")
            except Exception as e:  # readers see errors themselves
                log.warning("dependency_prefetch_failed", path=path, error=describe_error(e))
                return
            log.info(
                "dependency_prefetched",
                what="entrypoint",
                digest=layer.compressed_digest,
                path=path,
                bytes=size,
                seconds=round(time.monotonic() - t0, 3),
            )
            try:
                if handoff is not None:
                    handoff.file_read(layer, ino)
                else:
                    self._after_entrypoint(ref, layer, ino, data)
            except Exception as e:  # best effort: readers fetch what they need themselves
                log.warning("dependency_prefetch_failed", path=path, error=describe_error(e))

        threading.Thread(target=run, name="stargz-dependency-prefetch", daemon=True).start()

    def _start_files(self, layer: Layer) -> None:
        """Fetch :data:`START_FILES` this layer has, in a request of their own (they are read
        while the container is created, before its entrypoint runs)."""
        chunks: list[Chunk] = []
        for path in START_FILES:
            ino = resolve_regular_file(layer.index, path)
            if ino is not None:
                cs = layer.index.chunks(ino)
                if _compressed_bytes(cs) <= 1 * MiB:
                    chunks.extend(cs)
        if chunks:
            layer.fetcher.fetch_async(chunks)

    def _after_entrypoint(self, ref: str, layer: Layer, ino: int, data: Sequence[bytes]) -> None:
        """Fetch the loader and the shared libraries the ELF file *ino* (whose verified chunks
        are *data*) needs, then theirs; names this layer lacks are looked up in the image's
        other layers in use (and in those used later)."""
        with self._lock:
            self._queued.setdefault(layer.compressed_digest, set()).add(ino)
        interp, needed = elf_dependencies(b"".join(data))
        self._libraries(ref, layer, ([interp] if interp else []) + needed)
        others = [other for other in self._images.layers_in_use(ref) if other is not layer]
        for other in dict.fromkeys(others):  # in parallel: one thread per layer
            self._spawn_libraries(ref, other)

    # --- the libraries ----------------------------------------------------------------------
    def _spawn_libraries(self, ref: str, layer: Layer) -> None:
        threading.Thread(
            target=self._libraries_quietly,
            args=(ref, layer),
            name="stargz-dependency-prefetch",
            daemon=True,
        ).start()

    def _libraries_quietly(self, ref: str, layer: Layer) -> None:
        try:
            self._libraries(ref, layer, [])
        except Exception as e:  # best effort: readers fetch what they need themselves
            log.warning("dependency_prefetch_failed", ref=ref, error=describe_error(e))

    def _libraries(self, ref: str, layer: Layer, names: list[str]) -> None:
        """Fetch the libraries *names* (and those this ref still wants) that *layer* has, a
        level at a time (each level's files in one go), then the ones they name."""
        max_files, max_bytes = self.settings.library_files, self.settings.library_bytes
        if max_files <= 0 or max_bytes <= 0:
            return
        t0 = time.monotonic()
        digest = layer.compressed_digest
        files = fetched = 0
        while True:
            todo: list[Sequence[Chunk]] = []
            with self._lock:
                wanted = self._wanted.setdefault(ref, set())
                wanted.update(names)
                names = sorted(wanted)
                queued = self._queued.setdefault(digest, set())
                spent = self._spent.setdefault(digest, [0, 0])
            for name in names:
                if spent[0] >= max_files:
                    break
                lib = resolve_library(layer.index, name)
                if lib is None:
                    continue
                cs = layer.index.chunks(lib)
                n = _compressed_bytes(cs)
                with self._lock:
                    wanted.discard(name)
                    if lib in queued:
                        continue
                    queued.add(lib)
                    if not cs or spent[1] + n > max_bytes:
                        continue
                    spent[0] += 1
                    spent[1] += n
                files += 1
                fetched += n
                todo.append(cs)
            if not todo:
                break
            got = layer.fetcher.get_chunks([c for cs in todo for c in cs], reason="libraries")
            names = []
            i = 0
            for cs in todo:
                interp, needed = elf_dependencies(b"".join(got[i : i + len(cs)]))
                names += ([interp] if interp else []) + needed
                i += len(cs)
        if files:
            log.info(
                "dependency_prefetched",
                what="libraries",
                digest=digest,
                files=files,
                bytes=fetched,
                seconds=round(time.monotonic() - t0, 3),
            )


# --- profile prefetch ---------------------------------------------------------------------------


class ProfileSource(Protocol):
    """Where attached workload profiles come from
    (:class:`layerstore.registry.referrers.ArtifactSource` in the daemon)."""

    def find(self, reference: Reference, manifest_digest: str) -> bytes | None:
        """The newest profile document attached to manifest *manifest_digest* of
        *reference*'s repository, verified against its digest; None when there is none.
        Raises :class:`~layerstore.errors.LayerStoreError` when one is there but broken."""
        ...


@dataclass(frozen=True)
class ProfilePrefetchSettings:
    enabled: bool = True
    """Look for an attached profile on an image's first use (config key ``[fetch]
    prefetch_profile``)."""
    parallel: int = 2
    """Batches fetched at once, across all layers (each one coalesced request, taken from the
    foreground request budget, ``[fetch] concurrency``, whose rest stays free for the
    container's own reads). Batches wait in one queue for all layers, ordered by the recorded
    first access of their first file, so a layer whose files the workload reads first is not
    held up behind another's later files. Two: one batch's request starts while the other's
    bytes arrive, and the earliest batch gets half the link, not a quarter (large image,
    attached profile, 3 runs each, twice: 5.56 / 5.38 s with 2, 6.13 / 5.77 with 4, 6.25 with
    1; python and pandas the same within noise)."""
    first_batch_bytes: int = 256 * 1024
    """Compressed bytes of the first batch; each later batch doubles, up to
    ``max_batch_bytes``: the first files are needed first, so they travel in small requests
    that arrive early, the rest in fewer, larger ones."""
    max_batch_bytes: int = 4 * MiB
    max_layer_bytes: int = 1024 * MiB
    """Compressed bytes fetched per layer at most (the rest stays lazy)."""
    not_found_ttl: float = 600.0
    """Seconds an image without a profile (or with a broken one) is not asked about again."""


class _Lookup:
    __slots__ = ("done", "expires", "profile")

    def __init__(self) -> None:
        self.done = False
        self.profile: Profile | None = None
        self.expires = float("inf")


class _Job:
    """One layer's profile prefetch: its batches in the shared queue, and what to log."""

    __slots__ = ("batches", "done", "failed", "files", "layer", "left", "size", "skipped", "t0")

    def __init__(
        self, layer: Layer, files: int, skipped: int, batches: int, size: int, t0: float
    ) -> None:
        self.layer = layer
        self.files = files
        self.skipped = skipped
        self.batches = self.left = batches
        self.size = size
        self.t0 = t0
        self.failed = 0
        self.done = threading.Event()


class ProfilePrefetcher:
    """Thread-safe. One per :class:`~layerstore.runtime.manager.LayerManager`."""

    def __init__(
        self,
        images: ImageLayers,
        source: ProfileSource | None,
        settings: ProfilePrefetchSettings | None = None,
    ) -> None:
        self._images = images
        self._source = source
        self.settings = settings or ProfilePrefetchSettings()
        # Guards _lookups and _started; never held while calling the source, the manager or
        # a fetcher (a leaf).
        self._lock = threading.Lock()
        self._lookups: dict[str, _Lookup] = {}  # manifest digest -> lookup
        self._started: set[str] = set()  # layer digests whose profile prefetch started
        # Batches waiting, all layers together: (first access in ms, sequence, job, chunks),
        # taken earliest first by up to ``parallel`` worker threads (``_workers`` running).
        self._queue: list[tuple[int, int, _Job, list[Chunk]]] = []
        self._seq = itertools.count()
        self._workers = 0

    @property
    def enabled(self) -> bool:
        return self._source is not None and self.settings.enabled

    def image_found(self, ref: str, reference: Reference, manifest_digest: str) -> None:
        """Image *ref* resolved to manifest *manifest_digest* (of *reference*'s repository):
        look its profile up now, once, so that it is known when podman puts the first layer
        to use. Never blocks on the network."""
        if self.enabled:
            self._lookup_once(ref, reference, manifest_digest)

    def layer_used(self, ref: str, layer: Layer) -> None:
        """A user of *layer* (of image *ref*) arrived: look the image's profile up (once),
        or, when it is known, start this layer's part. Never blocks on the network."""
        if not self.enabled:
            return
        image = self._images.resolution(ref)
        if image is None:
            return
        profile = self._lookup_once(ref, image.reference, image.manifest_digest)
        if profile is not None:
            self._start_layer(layer, profile)

    def _lookup_once(self, ref: str, reference: Reference, manifest_digest: str) -> Profile | None:
        """The profile of *manifest_digest* when its lookup is done and found one; the lookup
        starts on a thread of its own when there is none (or its "none" expired).

        A layer put to use while the lookup runs is started by the lookup when it ends: the
        layer is in use (``layers_in_use``) before this is called, and the lookup reads the
        layers in use after it has stored the profile under the same lock."""
        start = False
        with self._lock:
            lookup = self._lookups.get(manifest_digest)
            if lookup is None or (lookup.done and lookup.expires < time.monotonic()):
                if len(self._lookups) >= _MAX_LOOKUPS:  # those running stay
                    self._lookups = {k: v for k, v in self._lookups.items() if not v.done}
                lookup = self._lookups[manifest_digest] = _Lookup()
                start = True
            profile = lookup.profile
        if start:
            threading.Thread(
                target=self._lookup,
                args=(ref, reference, manifest_digest, lookup),
                name="stargz-profile-prefetch",
                daemon=True,
            ).start()
        return profile

    def _lookup(
        self, ref: str, reference: Reference, manifest_digest: str, lookup: _Lookup
    ) -> None:
        assert self._source is not None
        t0 = time.monotonic()
        profile: Profile | None = None
        try:
            raw = self._source.find(reference, manifest_digest)
            if raw is None:
                log.info("profile_not_found", ref=ref, manifest=manifest_digest)
            else:
                profile = parse_profile(raw)
        except ProfileError as e:
            log.warning("profile_ignored", ref=ref, reason=describe_error(e))
        except LayerStoreError as e:
            log.warning("profile_ignored", ref=ref, reason=describe_error(e))
        except Exception as e:  # best effort: the container reads what it needs itself
            log.warning("profile_lookup_crashed", ref=ref, error=describe_error(e))
        with self._lock:
            lookup.profile = profile
            lookup.done = True
            if profile is None:
                lookup.expires = time.monotonic() + self.settings.not_found_ttl
        if profile is None:
            return
        log.info(
            "profile_found",
            ref=ref,
            manifest=manifest_digest,
            layers=len(profile.layers),
            files=profile.files,
            created=profile.created,
            seconds=round(time.monotonic() - t0, 3),
        )
        self._start_layers(list(dict.fromkeys(self._images.layers_in_use(ref))), profile)

    def _start_layer(self, layer: Layer, profile: Profile) -> None:
        self._start_layers([layer], profile)

    def _start_layers(self, layers: list[Layer], profile: Profile) -> None:
        """Start the prefetch of *layers*' sections (those not started yet), planned on a
        thread of their own and queued together, so that their batches are taken in access
        order from the start."""
        todo: list[tuple[Layer, LayerProfile]] = []
        for layer in layers:
            section = profile.layer(layer.toc_digest)
            if section is None or not section.entries:
                continue
            with self._lock:
                if layer.compressed_digest in self._started:
                    continue
                self._started.add(layer.compressed_digest)
            layer.profile_planned = True
            todo.append((layer, section))
        if todo:
            threading.Thread(
                target=self._submit_quietly,
                args=(todo,),
                name="stargz-profile-prefetch",
                daemon=True,
            ).start()

    def _submit_quietly(self, todo: list[tuple[Layer, LayerProfile]]) -> None:
        try:
            self._submit(todo)
        except Exception as e:  # best effort: the container reads what it needs itself
            log.warning(
                "profile_prefetch_failed",
                digest=",".join(layer.compressed_digest for layer, _ in todo),
                error=describe_error(e),
            )

    def plan(self, layer: Layer, section: LayerProfile) -> tuple[list[list[Chunk]], int, int]:
        """The batches of chunks to fetch for *section* (access order, chunks already cached
        left out), the files taken and the paths skipped (not in this layer's TOC, or not
        regular files)."""
        timed, files, skipped = self._plan_timed(layer, section)
        return [b for _, b in timed], files, skipped

    def _plan_timed(
        self, layer: Layer, section: LayerProfile
    ) -> tuple[list[tuple[int, list[Chunk]]], int, int]:
        """:meth:`plan`, each batch with the recorded first access (ms) of its first file."""
        st = self.settings
        index = layer.index
        seen: set[tuple[int, int]] = set()
        batches: list[tuple[int, list[Chunk]]] = []
        cur: list[Chunk] = []
        cur_ms = 0
        cur_bytes = total = files = skipped = 0
        limit = max(1, st.first_batch_bytes)
        for entry in section.entries:
            ino = index.find(entry.path)
            if ino is None or not stat.S_ISREG(index.getattr(ino).mode):
                skipped += 1
                continue
            chunks = index.chunks(ino)
            n = _compressed_bytes(chunks)
            if total + n > st.max_layer_bytes:
                break
            files += 1
            for c in chunks:
                k = (c.offset, c.chunk_offset)
                if k in seen or c.digest in layer.cache:
                    continue
                seen.add(k)
                if not cur:
                    cur_ms = entry.first_access_ms
                cur.append(c)
                cur_bytes += c.compressed_end - c.offset
                total += c.compressed_end - c.offset
                if cur_bytes >= limit:
                    batches.append((cur_ms, cur))
                    cur, cur_bytes = [], 0
                    limit = min(limit * 2, max(limit, st.max_batch_bytes))
        if cur:
            batches.append((cur_ms, cur))
        return batches, files, skipped

    def fetch_layer(self, layer: Layer, section: LayerProfile) -> int:
        """Fetch the files of *section* in *layer* (through the shared queue) and wait for
        them; returns the compressed bytes asked for."""
        (job,) = self._submit([(layer, section)])
        job.done.wait()
        return job.size

    def _submit(self, todo: list[tuple[Layer, LayerProfile]]) -> list[_Job]:
        """Plan each layer's section, queue all their batches at once and start workers as
        needed."""
        jobs: list[_Job] = []
        queued: list[tuple[int, _Job, list[Chunk]]] = []
        for layer, section in todo:
            t0 = time.monotonic()
            timed, files, skipped = self._plan_timed(layer, section)
            size = sum(c.compressed_end - c.offset for _, b in timed for c in b)
            job = _Job(layer, files, skipped, len(timed), size, t0)
            jobs.append(job)
            if not timed:
                self._finished(job)
            queued.extend((first_ms, job, batch) for first_ms, batch in timed)
        if not queued:
            return jobs
        with self._lock:
            for first_ms, job, batch in queued:
                heapq.heappush(self._queue, (first_ms, next(self._seq), job, batch))
            start = max(0, min(max(1, self.settings.parallel) - self._workers, len(self._queue)))
            self._workers += start
        for _ in range(start):
            threading.Thread(target=self._work, name="stargz-profile-prefetch", daemon=True).start()
        return jobs

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._workers -= 1
                    return
                _, _, job, batch = heapq.heappop(self._queue)
            failed = False
            try:
                job.layer.fetcher.get_chunks(batch, speculate=False)
            except Exception as e:  # readers see (and retry) errors themselves
                failed = True
                log.warning(
                    "profile_prefetch_failed",
                    digest=job.layer.compressed_digest,
                    error=describe_error(e),
                )
            with self._lock:
                job.failed += failed
                job.left -= 1
                last = job.left == 0
            if last:
                self._finished(job)

    @staticmethod
    def _finished(job: _Job) -> None:
        log.info(
            "profile_prefetched",
            digest=job.layer.compressed_digest,
            toc_digest=job.layer.toc_digest,
            files=job.files,
            skipped=job.skipped,
            batches=job.batches,
            failed_batches=job.failed,
            bytes=job.size,
            seconds=round(time.monotonic() - job.t0, 3),
        )
        job.done.set()
