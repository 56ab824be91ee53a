"""(image reference, key) -> verified :class:`~layerstore.runtime.layer.Layer`: the layer
lifecycle (resolve, build once, count users, drop when idle).

Both key schemes are served by one daemon: a key matches a manifest layer when it equals the
layer's compressed digest (podman <= 5.0) or its ``containerd.io/snapshot/stargz/toc.digest``
annotation (podman >= 5.1). Use :meth:`Layer.scheme_for` to know which ``info`` to render.

Resolving a layer:

1. the reference is parsed (:class:`ImageReferenceError`) and resolved through the registry
   client (resolutions are cached per reference for ``resolve_ttl`` seconds, single-flight; the
   last good one is kept in a :class:`~layerstore.runtime.resolutions.ResolutionStore` and used
   when the registry cannot be reached);
2. the key is looked up in the manifest (:class:`LayerNotFoundError`); a layer without the TOC
   digest annotation, or not gzip, is refused at once (:class:`NotEStargzError`) so podman falls
   back to an ordinary pull;
3. the TOC comes from the TOC cache, or from the blob's tail: ONE range request for the last
   ``tail_guess_bytes`` (or 1% of the blob, up to 1 MiB) bytes, and only when the TOC starts
   before that, one more for the rest (for a blob of ``footer_first_min_bytes`` or more, the
   footer is also asked for alone, so that this one leaves as soon as the footer is in, while
   the tail still arrives). With ``early_toc`` this starts as soon as the manifest
   has arrived, while the registry client fetches the config (one round trip saved on every
   pull; the result is only taken by a build from a manifest making the same claims);
4. the TOC digest is checked against the annotation (which for TOC keys is the key) inside the
   reader; nothing of the layer is served before that;
5. a :class:`Layer` (index + fetcher + cache) is built once per *identity* and shared by every
   reference and key whose own manifest makes the same claims (see below).

Identity (``docs/ARCHITECTURE.md``). A compressed digest in a manifest is a claim the store
cannot check until it has the whole blob, so it is never enough to share a layer: an image on
any registry could name another image's blob digest with its own TOC. A layer object is shared
by :func:`layer_identity`: the TOC digest of the requesting manifest's annotation (verified
against the TOC fetched before the layer exists), the compressed digest and size, the DiffID of
the requesting image's config (rendered in ``info``), the uncompressed-size annotation, and the
repository the blob is read from (a layer object reads ONE registry blob: an image on another
registry or repository never makes the store read from a place it did not name). (ref, key) ->
layer is recorded only after that ref's own manifest named the layer. Chunk data stays shared
through the chunk cache (by chunk digest, verified per chunk) and TOCs through the TOC cache
(re-verified against the TOC digest on load), so a second identity for the same content costs a
TOC index in memory, not a download. When the whole blob has been seen (background fill, or the
``blob`` spool) its digest and DiffID are verified; a mismatch marks the layer bad (every read
fails), logs ``layer_verification_failed`` with the references that named it, and drops it here,
so that a new lookup resolves again (after ``negative_ttl``).

Concurrent ``get`` calls of the same (ref, key) share one resolution; failures are remembered for
``negative_ttl`` seconds and then forgotten. ``use``/``release`` count users per (ref, key); the
first ``use`` starts the layer's landmark prefetch (and its background fill when enabled) and
hands the layer to the dependency prefetch (:mod:`layerstore.runtime.prefetch`: the image's
entrypoint and its shared libraries), to the profile prefetch (the files of a workload profile
attached to the image) and, while recording, to the recorder of workload profiles
(:mod:`layerstore.runtime.recorder`). Layers without users that nobody holds (the FUSE adapter
holds every layer it has inodes or open files of: :meth:`Layer.hold`) and that have been idle
for ``idle_drop_seconds`` are dropped from memory by :meth:`sweep` (their chunks stay in the
disk cache); a held layer is never closed, so a lookup or ``use`` finds the same object.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, cast

import structlog

from layerstore import digest as _digest
from layerstore.common.bulkhead import Bulkhead, share_limit
from layerstore.common.negcache import NegativeCache
from layerstore.common.redact import describe_error
from layerstore.common.singleflight import SingleFlight
from layerstore.errors import (
    AuthenticationError,
    BlockedRegistryError,
    LayerNotFoundError,
    LayerStoreError,
    ManifestError,
    NotEStargzError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
    TOCDigestMismatchError,
    VerificationError,
)
from layerstore.estargz import tocbuild as _tocbuild
from layerstore.estargz.constants import (
    PREFETCH_SIZE_ANNOTATION,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
)
from layerstore.estargz.footer import ESTARGZ_FOOTER_SIZE, LEGACY_FOOTER_SIZE, parse_footer
from layerstore.estargz.reader import (
    DEFAULT_MAX_TOC_SIZE,
    EStargzReader,
    decode_chunk,
    landmark_offset_hint,
    toc_region,
)
from layerstore.registry.client import ResolvedImage
from layerstore.registry.manifest import Descriptor, ImageManifest
from layerstore.registry.reference import Reference, in_repository, parse_reference
from layerstore.registry.transport import PullSource
from layerstore.runtime.blobspool import BlobSpool
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.depfetch import DependencyFetcher, DependencyFetchSettings
from layerstore.runtime.fetcher import Activity, ChunkFetcher, DecodeFn, FetcherSettings
from layerstore.runtime.headstart import HeadStartBudget, HeadStartSource
from layerstore.runtime.layer import Layer, LayerSettings
from layerstore.runtime.meter import FetchMeter
from layerstore.runtime.prefetch import (
    DependencyPrefetcher,
    DependencyPrefetchSettings,
    ProfilePrefetcher,
    ProfilePrefetchSettings,
    ProfileSource,
)
from layerstore.runtime.recorder import AccessRecorder
from layerstore.runtime.resolutions import ResolutionStore
from layerstore.runtime.snapshot import ImageSnapshot, KeyUse, LayerSnapshot, ManagerSnapshot
from layerstore.source import RangeSource

log = structlog.get_logger(__name__)

MiB = 1024 * 1024

# The TOC index builder (and msgspec) is imported with the daemon, not on the first lookup:
# about 50 ms on a pull's critical path (measured in a cold start's import log).
_TOC_BUILDER = _tocbuild.build_index

MAX_TOC_BYTES = DEFAULT_MAX_TOC_SIZE
NEGATIVE_CACHE_MAX = 4096
"""Failed (ref, key) lookups remembered at once."""
GiB = 1024**3


def layer_identity(
    image: ResolvedImage, desc: Descriptor, toc_digest: str, diff_id: str, uncompressed: str
) -> str:
    """What a layer object is shared by: every claim the requesting manifest and config make
    about the layer, and where its blob is read from (see the module docstring)."""
    parts = (
        toc_digest,
        desc.digest,
        str(int(desc.size)),
        diff_id,
        uncompressed,
        image.source.location,
        "insecure" if image.source.insecure else "",
    )
    return "layer-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _identity_of(image: ResolvedImage, desc: Descriptor, toc_digest: str, diff_id: str) -> str:
    uncompressed = desc.annotations.get(UNCOMPRESSED_SIZE_ANNOTATION, "")
    return layer_identity(image, desc, toc_digest, diff_id, uncompressed)


def _image_layers(image: ResolvedImage) -> list[tuple[Descriptor, str, str | None]]:
    """Each layer of *image* (bottom first) with its DiffID and its identity, or None when the
    store could not serve it (not eStargz, a bad annotation, DiffIDs not matching layers)."""
    layers = tuple(image.manifest.layers)
    diff_ids = tuple(image.config.diff_ids)
    if len(diff_ids) != len(layers):
        return [(d, "", None) for d in layers]
    out: list[tuple[Descriptor, str, str | None]] = []
    for desc, diff_id in zip(layers, diff_ids):
        toc_digest = desc.annotations.get(TOC_DIGEST_ANNOTATION) or ""
        ok = _digest.is_valid(toc_digest) and "gzip" in desc.media_type
        identity = _identity_of(image, desc, toc_digest, diff_id) if ok else None
        out.append((desc, diff_id, identity))
    return out


def _identities(image: ResolvedImage) -> list[str | None]:
    return [identity for _, _, identity in _image_layers(image)]


class ClientLike(Protocol):
    """What the manager needs of ``layerstore.registry.client.RegistryClient``."""

    def resolve(self, ref: Reference, platform: str | None = None) -> ResolvedImage: ...

    def blob_source(self, ref: ResolvedImage, digest: str, size: int) -> RangeSource:
        """*ref* is the ResolvedImage (so no extra HEAD request is needed)."""
        ...


class EarlyClientLike(ClientLike, Protocol):
    """A client that can say when a manifest has arrived (``RegistryClient`` does): the
    manager then fetches TOCs while the config is fetched."""

    def resolve(  # type: ignore[override]
        self,
        ref: Reference,
        platform: str | None = None,
        *,
        on_manifest: Callable[[PullSource, ImageManifest, str], None] | None = None,
    ) -> ResolvedImage: ...

    def blob_source_at(self, source: PullSource, digest: str, size: int) -> RangeSource: ...


@dataclass(frozen=True)
class _LoadedTOC:
    """A layer's TOC, its digest checked against the manifest's annotation."""

    source: RangeSource
    reader: EStargzReader
    member: bytes
    toc_offset: int
    footer_size: int
    from_cache: bool


EARLY_TOC_MAX = 16
"""TOCs loaded ahead of their layer at once (an image's layers, a few images at a time)."""
HEAD_START_MIN_BYTES = 64 * 1024
"""A prioritized region smaller than this gets no head start (one more request, no gain)."""
EARLY_TOC_TTL = 120.0
"""Seconds a TOC loaded ahead waits for its layer to be built before it is dropped."""


OpenTOC = Callable[[RangeSource, bytes, int, int, str], EStargzReader]
"""(source, toc member bytes, toc offset, footer size, expected TOC digest) -> verified reader.
Replaceable for fault injection (a reader that skips its own digest check: the manager checks
again)."""


def _start_head(source: RangeSource) -> None:
    """Start the head's fetch of a head-start source (:meth:`LayerManager._head_start`) now
    that its TOC's bytes have arrived: the head's transfer then overlaps the TOC's inflate
    and index build, and does not share the link with the TOC's own transfer. Started any
    earlier, it slowed the TOC as much as it saved (python image: pull phase +0.07 s, run
    -0.06 s)."""
    if isinstance(source, HeadStartSource) and not source.start():
        source.release_head()


def _release_head(source: RangeSource) -> None:
    release = getattr(source, "release_head", None)
    if release is not None:
        release()


def _default_open_toc(
    source: RangeSource, member: bytes, toc_offset: int, footer_size: int, expected: str
) -> EStargzReader:
    return EStargzReader.from_toc_bytes(source, member, toc_offset, footer_size, expected)


# The fetcher only hands decode the index's own Chunk objects.
_DECODE = cast(DecodeFn, decode_chunk)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    return cast("Callable[[int], int] | None", fn)


MALLOC_ARENAS = 4
"""glibc malloc arenas for the daemon (glibc's default is 8 per core): every thread that
allocates may get an arena of its own up to that number, and each keeps the memory freed in
it. Measured with ``./run bench --runs 2 --images large,pandas --modes lazy-esgz-opt,lazy-esgz``
(the environment's ``MALLOC_ARENA_MAX`` against 16, glibc's default here): peak RSS of the
numpy/scipy start 150 -> 121 MB, its ``-opt`` start 245 -> 202 MB, pandas 151 -> 117 MB,
pandas ``-opt`` 314 -> 259 MB, start times the same or shorter (2 arenas cut more, 105-245
MB, but the starts were 7-20% slower in one of two pairs of runs: threads waited for the
arenas' locks)."""

_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (call before starting threads). Not done when the
    environment sets ``MALLOC_ARENA_MAX`` (the operator's choice) or libc is not glibc.
    Returns whether the cap was set."""
    if os.environ.get("MALLOC_ARENA_MAX") or arenas <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_ARENA_MAX, int(arenas)))


def release_free_memory() -> None:
    """Give the heap freed by a TOC parse back to the OS (glibc keeps it otherwise: tens of MB
    of RSS for a large layer)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class IdleTrim:
    """Gives freed heap back to the OS once fetching has quieted down.

    A container start decodes tens to hundreds of MB of chunks in a few seconds; glibc keeps
    most of what they occupied once they are freed (the prioritized numpy/scipy start leaves
    the daemon at ~170 MB of RSS with ~20 MB in use). :meth:`tick`, called every few seconds,
    trims once after a period in which the daemon-wide memory budget granted nothing, following
    one in which it granted something: a busy daemon is never trimmed, an idle one once.
    Thread-safe enough for one caller."""

    def __init__(
        self,
        activity: Callable[[], int],
        trim: Callable[[], None] = release_free_memory,
        rss: Callable[[], int] | None = None,
    ) -> None:
        self._activity = activity
        self._trim = trim
        self._rss = rss or _rss_bytes
        self._last = activity()
        self._dirty = False

    def tick(self) -> tuple[int, int] | None:
        """Trim when due; returns the RSS bytes before and after, else None."""
        now = self._activity()
        if now != self._last:
            self._last, self._dirty = now, True
            return None
        if not self._dirty:
            return None
        self._dirty = False
        before = self._rss()
        self._trim()
        return before, self._rss()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _registry_unreachable(e: RegistryError) -> bool:
    """A failure that says nothing about the image: the registry could not answer."""
    if isinstance(e, (AuthenticationError, NotFoundError, BlockedRegistryError)):
        return False
    return isinstance(e, RegistryUnavailableError) or (e.status or 0) >= 500


@dataclass(frozen=True)
class ManagerSettings:
    resolve_ttl: float = 60.0
    """Seconds a reference's resolution (manifest + config) is reused."""
    negative_ttl: float = 10.0
    """Seconds a failed (ref, key) lookup is answered from memory."""
    tail_guess_bytes: int = 64 * 1024
    """First range request at the blob's end (at least): the TOC of most small layers fits."""
    tail_guess_share: float = 0.01
    """... or this share of the blob, up to ``tail_guess_max_bytes``: a TOC grows with the
    number of files, and so, roughly, does the blob (a 56 MB, 6,000-file layer has a 380 KB
    TOC). A second round trip for the rest costs more than the extra bytes."""
    tail_guess_max_bytes: int = 1024 * 1024
    footer_first_min_bytes: int = 32 * 1024 * 1024
    """Blobs at least this large also get their footer asked for on its own, alongside the
    tail guess: when the TOC begins before the tail, the request for the TOC's head leaves
    as soon as the footer is in, while the tail's bytes still arrive, instead of after them
    (pandas layer, 1.39 GB, 18,655 entries: a 1,058,774-byte TOC behind a 1 MiB guess, one
    round trip saved). One small request more per large layer; 0 disables."""
    max_toc_bytes: int = MAX_TOC_BYTES
    """Cap on the TOC JSON (containers/storage: 150 MiB); the compressed region is checked too."""
    idle_drop_seconds: float = 600.0
    """A layer without users that nobody holds is dropped from memory after this long idle
    (config key ``[cache] layer_idle_seconds``)."""
    blob_spool_max_bytes: int = 8 * GiB
    """Disk for verified copies of blobs being read through the ``blob`` file."""
    background_fill_concurrency: int = 2
    """Background-fill range requests in flight across all layers."""
    host_share: float = 1.0
    """Share (0 < x <= 1) of the foreground range requests (``fetcher.max_concurrent_requests``,
    across all layers) one registry host may have in flight: a registry that answers slowly
    holds at most that many, and the other registries keep the rest. 1.0: no split."""
    dependency_prefetch: DependencyPrefetchSettings = field(
        default_factory=DependencyPrefetchSettings
    )
    """The image's entrypoint and its ELF loader and libraries, fetched on a layer's first use
    (see :mod:`layerstore.runtime.prefetch`)."""
    profile_prefetch: ProfilePrefetchSettings = field(default_factory=ProfilePrefetchSettings)
    """The files of an attached workload profile, fetched on an image's first use (when the
    manager is given a profile source)."""
    dependency_fetch: DependencyFetchSettings = field(default_factory=DependencyFetchSettings)
    """What a file being read will make the container read next (its shared libraries, the
    modules it imports), fetched when it is read (see :mod:`layerstore.runtime.depfetch`)."""
    resolve_siblings: bool = True
    """On the first lookup of a layer of an image, build the image's other eStargz layers too
    (in the background): podman asks for them one at a time, each a TOC fetch and parse."""
    early_toc: bool = True
    """Fetch and check the TOCs of an image's eStargz layers (the asked one, and the others
    with ``resolve_siblings``) as soon as its manifest has arrived, while its config is
    fetched: the config's round trip then overlaps the TOC's (see :meth:`LayerManager.
    _start_early_tocs`)."""
    head_start_bytes: int = 16 * MiB
    """With ``early_toc`` and the landmark prefetch on: when a layer's descriptor says how
    long its prioritized region is (``PREFETCH_SIZE_ANNOTATION``, our converter's), up to this
    many of its first bytes are fetched in one request as soon as the TOC's bytes are in,
    while the TOC is inflated and indexed (:mod:`layerstore.runtime.headstart`); 0 disables
    (``[fetch] head_start_bytes``)."""
    head_start_total_bytes: int = 32 * MiB
    """The memory all such head buffers may hold at once."""
    platform: str | None = None
    """``os/arch[/variant]`` chosen from image indexes (None: the client's default)."""
    fetcher: FetcherSettings = field(default_factory=FetcherSettings)
    layer: LayerSettings = field(default_factory=LayerSettings)


@dataclass
class _Entry:
    layer: Layer
    users: int = 0


class LayerManager:
    """Thread-safe resolver and owner of layers."""

    def __init__(
        self,
        client: ClientLike,
        cache: ChunkCache,
        settings: ManagerSettings | None = None,
        *,
        resolutions: ResolutionStore | None = None,
        open_toc: OpenTOC | None = None,
        spool: BlobSpool | None = None,
        recorder: AccessRecorder | None = None,
        profiles: ProfileSource | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.settings = settings or ManagerSettings()
        self.resolutions = resolutions
        """Where the last good resolutions are kept (None: not kept)."""
        self._open_toc = open_toc or _default_open_toc
        if spool is None:
            root = Path(cache.root)
            spool = BlobSpool(
                root.parent / f"{root.name}-spool", self.settings.blob_spool_max_bytes
            )
        self.spool = spool
        """Disk for the ``blob`` file's verified copies."""
        # Guards _resolved, _by_ref_key, _by_identity, tail_requests. Nothing else is locked
        # or awaited while it is held, except Layer._lock (a leaf) in sweep.
        self._lock = threading.Lock()
        self._resolved: dict[str, tuple[float, ResolvedImage]] = {}  # ref -> (expiry, image)
        self._negative: NegativeCache[tuple[str, str], LayerStoreError] = NegativeCache(
            NEGATIVE_CACHE_MAX
        )
        self._by_ref_key: dict[tuple[str, str], _Entry] = {}
        self._by_identity: dict[str, Layer] = {}  # layer_identity() -> layer
        self._sf_resolve: SingleFlight[str, ResolvedImage] = SingleFlight()
        self._sf_get: SingleFlight[tuple[str, str], Layer] = SingleFlight()
        self._sf_layer: SingleFlight[str, Layer] = SingleFlight()  # by identity
        self._fill_slots = threading.Semaphore(max(1, self.settings.background_fill_concurrency))
        total = max(1, self.settings.fetcher.max_concurrent_requests)
        self._request_slots = Bulkhead(total, share_limit(total, self.settings.host_share))
        self._activity = Activity()  # foreground work of every layer holds back every fill
        self.meter = FetchMeter()  # fetch totals per mechanism, across layers (status, metrics)
        self.recorder = recorder
        """Records workload profiles while set (``[record]``): every layer put to use reports
        its reads to it."""
        self.profiles = ProfilePrefetcher(self, profiles, self.settings.profile_prefetch)
        self._depfetch = DependencyFetcher(self, self.settings.dependency_fetch)
        self._dependencies = DependencyPrefetcher(
            self,
            self.settings.dependency_prefetch,
            self._depfetch if self.settings.dependency_fetch.enabled else None,
        )
        self._siblings_started: set[str] = set()  # manifest digests whose layers were started
        self._siblings_pending: dict[str, int] = {}  # manifest digest -> builds in flight
        # (source location, blob digest, size, TOC digest) -> (started, the TOC loaded early)
        self._early: dict[tuple[str, str, int, str], tuple[float, Future[_LoadedTOC]]] = {}
        self._head_budget = HeadStartBudget(self.settings.head_start_total_bytes)
        self.tail_requests = 0
        self._last_sweep = time.monotonic()

    # --- lookups ---------------------------------------------------------------------------
    def get(self, ref: str, key: str) -> Layer:
        """The verified layer *key* of image *ref*; raises a :class:`LayerStoreError`."""
        rk = (ref, key)
        now = time.monotonic()
        if now - self._last_sweep > min(60.0, max(1.0, self.settings.idle_drop_seconds)):
            self._last_sweep = now
            self.sweep()
        with self._lock:
            entry = self._by_ref_key.get(rk)
            if entry is not None:
                entry.layer.last_used = time.monotonic()
                return entry.layer
        failed = self._negative.get(rk)
        if failed is not None:
            raise failed.with_traceback(None)
        try:
            return self._sf_get.do(rk, lambda: self._get(ref, key))
        except LayerStoreError as e:
            self._negative.put(rk, e, self.settings.negative_ttl)
            raise

    @staticmethod
    def registry_host(ref: str) -> str:
        """The registry host *ref* names ("" when it does not parse): the FUSE adapter's key
        for its per-registry share of lookup threads."""
        try:
            return parse_reference(ref).domain
        except LayerStoreError:
            return ""

    def forget_failures(self, host: str, repository: str) -> int:
        """Forget the remembered failed lookups of images in *repository* on *host* (their next
        lookup asks the registry again); returns how many. For when credentials arrive: the
        failure may have been for want of them."""
        gone = self._negative.discard_if(lambda rk, _e: in_repository(rk[0], host, repository))
        if gone:
            log.info("lookup_failures_forgotten", host=host, repository=repository, count=len(gone))
        return len(gone)

    def scheme(self, ref: str, key: str) -> str:
        return self.get(ref, key).scheme_for(key)

    def _get(self, ref: str, key: str) -> Layer:
        bound = log.bind(ref=ref, key=key)
        if not _digest.is_valid(key):
            raise LayerNotFoundError(f"{key!r} is not a layer digest")
        reference = parse_reference(ref)
        image = self._resolve(ref, reference, key)
        layers = tuple(image.manifest.layers)
        diff_ids = tuple(image.config.diff_ids)
        index = -1
        for i, desc in enumerate(layers):
            if desc.digest == key or desc.annotations.get(TOC_DIGEST_ANNOTATION) == key:
                index = i
                break
        if index < 0:
            raise LayerNotFoundError(f"image {ref} has no layer {key}")
        desc = layers[index]
        toc_digest = desc.annotations.get(TOC_DIGEST_ANNOTATION)
        if not toc_digest:
            raise NotEStargzError(f"layer {desc.digest} of {ref} is not eStargz (no TOC digest)")
        if not _digest.is_valid(toc_digest):
            raise NotEStargzError(f"layer {desc.digest} has an invalid TOC digest annotation")
        if "gzip" not in desc.media_type:
            raise NotEStargzError(f"layer {desc.digest} has media type {desc.media_type}")
        if len(diff_ids) != len(layers):
            raise ManifestError(
                f"image {ref}: {len(layers)} layers but {len(diff_ids)} diff_ids in its config"
            )
        diff_id = diff_ids[index]
        identity = _identity_of(image, desc, toc_digest, diff_id)
        if self.settings.resolve_siblings:
            self._start_siblings(ref, reference, image, identity)
        layer = self._sf_layer.do(
            identity, lambda: self._layer(reference, image, desc, toc_digest, diff_id, identity)
        )
        # The layer was built from exactly this manifest's claims (its identity): the same
        # blob digest, the TOC verified against this manifest's annotation, this DiffID.
        if key not in (layer.compressed_digest, layer.toc_digest):
            raise TOCDigestMismatchError(f"layer {desc.digest}: TOC digest is not {key}")
        if layer.bad is not None:
            raise VerificationError(f"layer {desc.digest} of {ref} is bad: {layer.bad}")
        bound.debug("layer_mapped", identity=identity, digest=desc.digest)
        with self._lock:
            entry = self._by_ref_key.get((ref, key))
            if entry is None or (entry.layer is not layer and entry.users == 0):
                self._by_ref_key[(ref, key)] = _Entry(layer)
        return layer

    def _resolve(self, ref: str, reference: Reference, key: str) -> ResolvedImage:
        now = time.monotonic()
        with self._lock:
            hit = self._resolved.get(ref)
            if hit is not None and hit[0] > now:
                return hit[1]

        def do() -> ResolvedImage:
            ttl = self.settings.resolve_ttl
            try:
                if self.settings.early_toc and hasattr(self.client, "blob_source_at"):
                    image = cast(EarlyClientLike, self.client).resolve(
                        reference,
                        self.settings.platform,
                        on_manifest=functools.partial(self._on_manifest, ref, reference, key),
                    )
                else:
                    image = self.client.resolve(reference, self.settings.platform)
            except RegistryError as e:
                if not _registry_unreachable(e) or self.resolutions is None:
                    raise
                stored = self.resolutions.load(ref, reference)
                if stored is None:
                    raise
                image = stored
                log.warning(
                    "resolution_from_disk",
                    ref=ref,
                    manifest=image.manifest_digest,
                    error=describe_error(e),
                )
                ttl = min(ttl, self.settings.negative_ttl)  # try the registry again soon
            else:
                if self.resolutions is not None:
                    self.resolutions.save(ref, image)
                # (started already from _on_manifest when the client says when it has one)
                self.profiles.image_found(ref, image.reference, image.manifest_digest)
            with self._lock:
                self._resolved[ref] = (time.monotonic() + ttl, image)
                if len(self._resolved) > 1024:
                    t = time.monotonic()
                    self._resolved = {k: v for k, v in self._resolved.items() if v[0] > t}
            return image

        return self._sf_resolve.do(ref, do)

    def _on_manifest(
        self,
        ref: str,
        reference: Reference,
        key: str,
        source: PullSource,
        manifest: ImageManifest,
        digest: str,
    ) -> None:
        """*reference*'s manifest has arrived, before its config: start what needs only the
        manifest. The attached profile is looked for now, not on the first use of a layer, so
        that it is known (and its prefetch starts) as soon as podman puts a layer to use,
        about a round trip and a TOC load earlier."""
        self.profiles.image_found(ref, reference, digest)
        self._start_early_tocs(reference, key, source, manifest)

    def _start_early_tocs(
        self, reference: Reference, key: str, source: PullSource, manifest: ImageManifest
    ) -> None:
        """Called by the registry client when *reference*'s manifest has arrived, before its
        config: load the TOC of layer *key* (and, with ``resolve_siblings``, of the image's
        other eStargz layers) in the background, each its own thread. :meth:`_layer` takes
        the result when it builds that layer from a manifest making the same claims (source,
        blob digest and size, TOC digest); the TOC's digest is checked against the annotation
        as always, and nothing is shared before the layer's identity is known. Layers already
        built or being loaded are skipped; unclaimed results are dropped after
        ``EARLY_TOC_TTL`` seconds."""
        client = cast(EarlyClientLike, self.client)
        wanted: list[tuple[Descriptor, str]] = []
        for desc in manifest.layers:
            toc_digest = desc.annotations.get(TOC_DIGEST_ANNOTATION)
            if (
                not toc_digest
                or not _digest.is_valid(toc_digest)
                or not _digest.is_valid(desc.digest)
                or "gzip" not in desc.media_type
                or desc.size < 0
            ):
                continue
            if key in (desc.digest, toc_digest):
                wanted.insert(0, (desc, toc_digest))
            elif self.settings.resolve_siblings:
                wanted.append((desc, toc_digest))
        now = time.monotonic()
        started: list[tuple[Descriptor, str, Future[_LoadedTOC]]] = []
        with self._lock:
            for k, (t, old) in list(self._early.items()):
                if now - t > EARLY_TOC_TTL and old.done():
                    del self._early[k]
                    if old.exception() is None:
                        _release_head(old.result().source)
            built = {(x.compressed_digest, x.toc_digest) for x in self._by_identity.values()}
            for desc, toc_digest in wanted:
                ek = (source.location, desc.digest, int(desc.size), toc_digest)
                if ek in self._early or (desc.digest, toc_digest) in built:
                    continue
                if len(self._early) >= EARLY_TOC_MAX:
                    break
                fut: Future[_LoadedTOC] = Future()
                self._early[ek] = (now, fut)
                started.append((desc, toc_digest, fut))
        for desc, toc_digest, fut in started:
            try:
                blob = client.blob_source_at(source, desc.digest, int(desc.size))
            except Exception as e:
                fut.set_exception(e)
                continue
            blob = self._head_start(blob, desc, toc_digest)
            threading.Thread(
                target=self._early_toc,
                args=(reference, blob, desc, toc_digest, fut),
                name="stargz-early-toc",
                daemon=True,
            ).start()

    def _head_start(self, blob: RangeSource, desc: Descriptor, toc_digest: str) -> RangeSource:
        """*blob*, wrapped to fetch the prioritized region its descriptor announces right away
        (:mod:`layerstore.runtime.headstart`), when that is on and worth it: not when the TOC
        is already in the TOC cache (the layer was used before: its chunks are likely cached
        too), nor beyond the head-start budget."""
        st = self.settings
        raw = desc.annotations.get(PREFETCH_SIZE_ANNOTATION)
        if raw is None or st.head_start_bytes <= 0 or not st.layer.landmark_prefetch:
            return blob
        try:
            announced = int(raw)
        except ValueError:
            log.info("bad_prefetch_size_annotation", digest=desc.digest, value=raw[:40])
            return blob
        if announced <= 0 or announced > int(desc.size):
            log.info("bad_prefetch_size_annotation", digest=desc.digest, value=raw[:40])
            return blob
        toc_name = f"{_digest.hex_part(desc.digest)}-{_digest.hex_part(toc_digest)}"
        if self.cache.has_toc(toc_name):
            return blob
        if announced < HEAD_START_MIN_BYTES:  # the landmark prefetch's first range will do
            return blob
        head = self._head_budget.take(min(announced, st.head_start_bytes))
        if head <= 0:
            return blob
        log.debug("head_start", digest=desc.digest, bytes=head, announced=announced)
        # started by _load_toc once the TOC's bytes are in (_start_head)
        return HeadStartSource(blob, head, self._head_budget, name=desc.digest)

    def _head_start_from_toc(
        self, source: RangeSource, desc: Descriptor, member: bytes, toc_offset: int
    ) -> RangeSource:
        """*source*, wrapped for a head start (:meth:`_head_start`) of the prioritized region
        that the TOC's first bytes say ends at the landmark, for a blob whose descriptor did
        not announce it (images written by other tools: the Go library's, ``ctr-remote``):
        their region is then fetched in one stream in its order, from the moment the TOC's
        bytes are in, instead of in parallel ranges once the layer has been built and used."""
        st = self.settings
        if (
            isinstance(source, HeadStartSource)
            or st.head_start_bytes <= 0
            or not st.layer.landmark_prefetch
        ):
            return source
        end = landmark_offset_hint(member)
        if end is None or end < HEAD_START_MIN_BYTES or end > toc_offset:
            return source
        head = self._head_budget.take(min(end, st.head_start_bytes))
        if head <= 0:
            return source
        log.debug("head_start", digest=desc.digest, bytes=head, landmark=end, from_toc=True)
        return HeadStartSource(source, head, self._head_budget, name=desc.digest)

    def _early_toc(
        self,
        reference: Reference,
        source: RangeSource,
        desc: Descriptor,
        toc_digest: str,
        fut: Future[_LoadedTOC],
    ) -> None:
        bound = log.bind(ref=str(reference), digest=desc.digest, toc_digest=toc_digest)
        try:
            fut.set_result(self._load_toc(bound, source, desc, toc_digest))
        except BaseException as e:  # the layer's build sees it and loads the TOC itself
            _release_head(source)
            fut.set_exception(e)

    def _take_early(
        self, image: ResolvedImage, desc: Descriptor, toc_digest: str
    ) -> _LoadedTOC | None:
        """The TOC loaded ahead for this layer of *image*, if any (waiting for it to arrive);
        None when there is none or loading it failed."""
        ek = (image.source.location, desc.digest, int(desc.size), toc_digest)
        with self._lock:
            hit = self._early.pop(ek, None)
        if hit is None:
            return None
        try:
            return hit[1].result()
        except Exception as e:
            log.debug("early_toc_failed", digest=desc.digest, error=describe_error(e))
            return None

    def _load_toc(
        self, bound: structlog.BoundLogger, source: RangeSource, desc: Descriptor, toc_digest: str
    ) -> _LoadedTOC:
        """The TOC of blob *desc* from the TOC cache or the blob's tail, checked against
        *toc_digest*; a fetched TOC is put into the TOC cache."""
        blob_size = int(desc.size)
        toc_name = f"{_digest.hex_part(desc.digest)}-{_digest.hex_part(toc_digest)}"
        stored = self.cache.get_toc(toc_name)
        if stored is not None:
            try:
                header, member = stored.split(b"\n", 1)
                meta = json.loads(header)
                toc_offset, footer_size = int(meta["toc_offset"]), int(meta["footer_size"])
                reader = self._open_toc(source, member, toc_offset, footer_size, toc_digest)
                return _LoadedTOC(source, reader, member, toc_offset, footer_size, True)
            except (ValueError, KeyError, TypeError, LayerStoreError) as e:
                bound.warning("toc_cache_entry_discarded", error=describe_error(e))
                self.cache.remove_toc(toc_name)
        member, toc_offset, footer_size = self._fetch_toc_member(source, blob_size)
        source = self._head_start_from_toc(source, desc, member, toc_offset)
        _start_head(source)
        reader = self._open_toc(source, member, toc_offset, footer_size, toc_digest)
        header = json.dumps({"toc_offset": toc_offset, "footer_size": footer_size}).encode()
        self.cache.put_toc(toc_name, header + b"\n" + member)
        return _LoadedTOC(source, reader, member, toc_offset, footer_size, False)

    def _start_siblings(
        self, ref: str, reference: Reference, image: ResolvedImage, asked: str
    ) -> None:
        """Build the image's other eStargz layers in the background (once per manifest), so
        that podman's next lookups find them built: each is a TOC fetch (a round trip) and a
        parse, which then overlap with this one and with podman's own work in between."""
        key = image.manifest_digest or ref
        with self._lock:
            if key in self._siblings_started:
                return
            if len(self._siblings_started) > 4096:
                self._siblings_started.clear()
            self._siblings_started.add(key)
            have = set(self._by_identity)
        for desc, diff_id, identity in _image_layers(image):
            if identity is None or identity == asked or identity in have:
                continue
            toc_digest = desc.annotations[TOC_DIGEST_ANNOTATION]

            with self._lock:
                self._siblings_pending[key] = self._siblings_pending.get(key, 0) + 1
            threading.Thread(
                target=self._build_sibling,
                args=(key, reference, image, desc, toc_digest, diff_id, identity),
                name="stargz-sibling-layer",
                daemon=True,
            ).start()

    def _build_sibling(
        self,
        key: str,
        reference: Reference,
        image: ResolvedImage,
        desc: Descriptor,
        toc_digest: str,
        diff_id: str,
        identity: str,
    ) -> None:
        try:
            self._sf_layer.do(
                identity,
                lambda: self._layer(reference, image, desc, toc_digest, diff_id, identity),
            )
        except Exception as e:  # the lookup of that layer will say so itself
            log.info("sibling_layer_failed", digest=desc.digest, error=describe_error(e))
        finally:
            with self._lock:
                left = self._siblings_pending.get(key, 1) - 1
                if left > 0:
                    self._siblings_pending[key] = left
                else:
                    self._siblings_pending.pop(key, None)

    def stacks_of(self, layer: Layer, wait: float = 0.0) -> list[Sequence[Layer]]:
        """The layer stacks (top first, the layers built so far) of the images known to
        contain *layer*, those in use first (for the dependency fetch). With *wait*, first
        wait up to that many seconds for the builds of those images' other layers started on
        their first lookup."""
        identity = layer.identity
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                images = [(r, img) for r, (_, img) in self._resolved.items()]
                pending = any(
                    self._siblings_pending.get(img.manifest_digest or r)
                    for r, img in images
                    if identity in _identities(img)
                )
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        with self._lock:
            in_use = {r for (r, _), e in self._by_ref_key.items() if e.users > 0}
            images = [(r, img) for r, (_, img) in self._resolved.items()]
            built = dict(self._by_identity)
        out: list[tuple[bool, tuple[str, ...], list[Layer]]] = []
        for ref, img in images:
            ids = _identities(img)
            if identity not in ids:
                continue
            stack = [built[i] for i in reversed(ids) if i is not None and i in built]
            key = tuple(x.identity for x in stack)
            if any(k == key for _, k, _ in out):
                continue
            out.append((ref in in_use, key, stack))
        out.sort(key=lambda x: not x[0])
        return [stack for _, _, stack in out]

    def resolution(self, ref: str) -> ResolvedImage | None:
        """The last resolution of *ref* in memory, expired or not (for the dependency
        prefetch, which must not wait on the registry)."""
        with self._lock:
            hit = self._resolved.get(ref)
        return None if hit is None else hit[1]

    # --- building a layer -----------------------------------------------------------------
    def _layer(
        self,
        reference: Reference,
        image: ResolvedImage,
        desc: Descriptor,
        toc_digest: str,
        diff_id: str,
        identity: str,
    ) -> Layer:
        with self._lock:
            existing = self._by_identity.get(identity)
        if existing is not None:
            return existing
        bound = log.bind(ref=str(reference), digest=desc.digest, toc_digest=toc_digest)
        t0 = time.monotonic()
        blob_size = int(desc.size)
        loaded = self._take_early(image, desc, toc_digest)
        early = loaded is not None
        if loaded is None:
            source = self.client.blob_source(image, desc.digest, blob_size)
            loaded = self._load_toc(bound, source, desc, toc_digest)
        source, reader, member = loaded.source, loaded.reader, loaded.member
        toc_offset, footer_size, from_cache = (
            loaded.toc_offset,
            loaded.footer_size,
            loaded.from_cache,
        )
        del loaded
        if reader.toc_digest != toc_digest:
            raise TOCDigestMismatchError(
                f"layer {desc.digest}: TOC digest {reader.toc_digest} is not {toc_digest}"
            )
        index = reader.index
        fetcher = ChunkFetcher(
            source,
            self.cache,
            # the index's compact view: a Chunk is built when the fetcher looks at it (a few per
            # miss), not 50,000 of them up front (time and ~10 MB per large layer)
            index.all_chunks(),
            _DECODE,
            self.settings.fetcher,
            fill_slots=self._fill_slots,
            request_slots=self._request_slots.slot(getattr(source, "registry_host", "")),
            activity=self._activity,
            name=desc.digest,
            meter=self.meter,
        )
        size_ann = desc.annotations.get(UNCOMPRESSED_SIZE_ANNOTATION)
        uncompressed: int | None = None
        if size_ann is not None:
            try:
                uncompressed = int(size_ann)
            except ValueError:
                bound.warning("bad_uncompressed_size_annotation", value=size_ann[:40])
            if uncompressed is not None and uncompressed < 0:
                uncompressed = None
        layer = Layer(
            compressed_digest=desc.digest,
            toc_digest=toc_digest,
            diff_id=diff_id,
            blob_size=blob_size,
            index=index,
            source=source,
            cache=self.cache,
            fetcher=fetcher,
            toc_offset=toc_offset,
            footer_size=footer_size,
            uncompressed_size=uncompressed,
            settings=self.settings.layer,
            identity=identity,
            spool=self.spool,
            toc_member_digest=_digest.sha256_digest(member),
        )
        layer.on_bad = self._layer_bad
        layer.on_read = self._depfetch.file_read
        with self._lock:
            self._by_identity[identity] = layer
        release_free_memory()
        bound.info(
            "layer_loaded",
            identity=identity,
            source=image.source.location,
            toc_from_cache=from_cache,
            toc_early=early,
            chunks=len(fetcher.chunks),
            seconds=round(time.monotonic() - t0, 3),
        )
        return layer

    def _fetch_toc_member(self, source: RangeSource, blob_size: int) -> tuple[bytes, int, int]:
        """The TOC member bytes, in one tail request (two when the TOC is larger)."""
        if blob_size < LEGACY_FOOTER_SIZE:
            raise NotEStargzError(f"blob of {blob_size} bytes is too small for eStargz")
        st = self.settings
        guess = max(
            st.tail_guess_bytes, min(int(blob_size * st.tail_guess_share), st.tail_guess_max_bytes)
        )
        tail_len = min(blob_size, max(ESTARGZ_FOOTER_SIZE, guess))
        tail_start = blob_size - tail_len
        early: Future[tuple[int, bytes] | None] | None = None
        if 0 < st.footer_first_min_bytes <= blob_size and tail_start > 0:
            early = Future()
            try:
                threading.Thread(
                    target=self._toc_head_early,
                    args=(source, blob_size, tail_start, early),
                    name="stargz-toc-head",
                    daemon=True,
                ).start()
            except RuntimeError:  # no thread to be had: the tail alone will do
                early = None
        tail = self._read(source, [(tail_start, tail_len)])[0]
        toc_offset, footer_size = parse_footer(tail)
        # Offset inside the blob, compressed TOC region within the cap (else FormatError /
        # LimitExceededError) before any larger request is made.
        toc_region(blob_size, toc_offset, footer_size, self.settings.max_toc_bytes)
        if toc_offset >= tail_start:
            return tail[toc_offset - tail_start : tail_len - footer_size], toc_offset, footer_size
        head: bytes | None = None
        if early is not None:
            got = early.result()
            # (the footer it read is the tail's own bytes: the same offset, else not used)
            if got is not None and got[0] == toc_offset:
                head = got[1]
        if head is None:
            head = self._read(source, [(toc_offset, tail_start - toc_offset)])[0]
        return head + tail[: tail_len - footer_size], toc_offset, footer_size

    def _toc_head_early(
        self,
        source: RangeSource,
        blob_size: int,
        tail_start: int,
        out: Future[tuple[int, bytes] | None],
    ) -> None:
        """The footer on its own, then, when the TOC begins before *tail_start*, the TOC's
        head ``(toc_offset, bytes [toc_offset, tail_start))``; None when there is nothing
        to add or anything went wrong (the caller then asks for it itself). Checked like the
        tail's: the region is bounded before it is asked for."""
        got: tuple[int, bytes] | None = None
        try:
            n = min(blob_size, ESTARGZ_FOOTER_SIZE)
            footer = self._read(source, [(blob_size - n, n)])[0]
            toc_offset, footer_size = parse_footer(footer)
            toc_region(blob_size, toc_offset, footer_size, self.settings.max_toc_bytes)
            if toc_offset < tail_start:
                got = (toc_offset, self._read(source, [(toc_offset, tail_start - toc_offset)])[0])
        except Exception as e:  # the caller's own requests decide
            log.debug("toc_head_early_failed", error=describe_error(e))
        finally:
            out.set_result(got)

    def _read(self, source: RangeSource, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        with self._lock:
            self.tail_requests += 1
        try:
            out = source.read_ranges(ranges)
        except LayerStoreError:
            raise
        except Exception as e:
            raise RegistryError(f"reading the blob tail failed: {describe_error(e)}") from None
        if [len(b) for b in out] != [n for _, n in ranges]:
            raise RegistryError("blob tail range answered with the wrong length")
        return out

    # --- users -----------------------------------------------------------------------------
    def use(self, ref: str, key: str) -> int:
        layer = self.get(ref, key)
        with self._lock:
            entry = self._by_ref_key.setdefault((ref, key), _Entry(layer))
            entry.users += 1
            users = entry.users
        log.info("layer_use", ref=ref, key=key, digest=layer.compressed_digest, users=users)
        if self.recorder is not None:
            layer.observer = self.recorder
            self.recorder.layer_used(ref, layer, self.resolution(ref))
        layer.start()
        # The profile first: a layer its profile covers is planned (Layer.planned) before the
        # dependency prefetch decides whether to hand the entrypoint to the dependency fetch.
        self.profiles.layer_used(ref, layer)
        self._dependencies.layer_used(ref, layer)
        return users

    def release(self, ref: str, key: str) -> int:
        with self._lock:
            entry = self._by_ref_key.get((ref, key))
            if entry is None:
                users = 0
            else:
                entry.users = max(0, entry.users - 1)
                entry.layer.last_used = time.monotonic()
                users = entry.users
        log.info("layer_release", ref=ref, key=key, users=users)
        return users

    def layers_in_use(self, ref: str) -> list[Layer]:
        """The layers of *ref* that have users (one per (ref, key) in use)."""
        with self._lock:
            return [e.layer for (r, _), e in self._by_ref_key.items() if r == ref and e.users > 0]

    def users(self, ref: str, key: str) -> int:
        with self._lock:
            entry = self._by_ref_key.get((ref, key))
            return entry.users if entry is not None else 0

    def _layer_bad(self, layer: Layer, reason: str) -> None:
        """A layer's whole blob did not match its digest or DiffID: name every reference that
        maps to it, forget it (a new lookup resolves again once the negative entry expires)
        and stop its fetching. Readers holding it get errors from the layer itself."""
        err = VerificationError(f"layer {layer.compressed_digest} is bad: {reason}")
        with self._lock:
            keys = [rk for rk, e in self._by_ref_key.items() if e.layer is layer]
            for rk in keys:
                del self._by_ref_key[rk]
            if self._by_identity.get(layer.identity) is layer:
                del self._by_identity[layer.identity]
        for rk in keys:
            self._negative.put(rk, err, self.settings.negative_ttl)
        log.error(
            "layer_verification_failed",
            refs=sorted({r for r, _ in keys}),
            keys=sorted({k for _, k in keys}),
            digest=layer.compressed_digest,
            toc_digest=layer.toc_digest,
            reason=reason,
        )
        layer.fetcher.close()

    def sweep(self) -> int:
        """Drop from memory the layers without users, not held by the FUSE adapter, idle for
        ``idle_drop_seconds``; and the ``blob`` spools idle for their own time."""
        now = time.monotonic()
        cutoff = now - self.settings.idle_drop_seconds
        dropped: list[Layer] = []
        kept_held = 0
        with self._lock:
            busy = {id(e.layer) for e in self._by_ref_key.values() if e.users > 0}
            layers = list(self._by_identity.values())
            for layer in layers:
                if id(layer) in busy or layer.last_used > cutoff:
                    continue
                # Retired under our lock and the layer's: no hold can be taken on it after
                # this, and no lookup can find it in the maps.
                if not layer.retire_if_idle(cutoff):
                    kept_held += 1
                    continue
                del self._by_identity[layer.identity]
                dropped.append(layer)
            gone = {id(layer) for layer in dropped}
            self._by_ref_key = {
                k: e for k, e in self._by_ref_key.items() if id(e.layer) not in gone
            }
        for layer in layers:
            if id(layer) not in gone:
                layer.drop_spool(idle_before=layer.spool_idle_cutoff(now))
        for layer in dropped:
            layer.close()
            self._depfetch.forget(layer.identity)
            log.info("layer_dropped", digest=layer.compressed_digest, identity=layer.identity)
        if dropped or kept_held:
            log.debug("layers_swept", dropped=len(dropped), kept_held=kept_held)
        return len(dropped)

    def loaded(self) -> list[Layer]:
        with self._lock:
            return list(self._by_identity.values())

    def close(self) -> None:
        self._depfetch.close()
        with self._lock:
            layers = list(self._by_identity.values())
            early = [f for _, f in self._early.values()]
            self._early.clear()
        for layer in layers:
            layer.close()
        for fut in early:
            if fut.done() and fut.exception() is None:
                _release_head(fut.result().source)
        # One line per process life: what each fetch mechanism cost (the same totals as
        # ``stargz-store status`` and the metrics), for logs read after the fact.
        snap = self.meter.snapshot()
        log.info(
            "fetch_totals",
            tail_requests=self.tail_requests,
            verification_failures=snap.verification_failures,
            **{
                m: {"requests": t.requests, "bytes": t.bytes, "chunks": t.chunks}
                for m, t in snap.by_mechanism.items()
                if t.requests or t.failures
            },
        )

    # --- snapshot (stargz-store status, metrics) ------------------------------------------
    def snapshot(self) -> ManagerSnapshot:
        """What the manager holds now: images, layers with their keys and users, fetch totals.
        Read-only and cheap (copies under ``_lock``, then each fetcher's own lock in turn)."""
        now = time.monotonic()
        with self._lock:
            resolved = {ref: image.manifest_digest for ref, (_, image) in self._resolved.items()}
            fresh = {ref for ref, (expiry, _) in self._resolved.items() if expiry > now}
            keys = [(ref, key, e.layer, e.users) for (ref, key), e in self._by_ref_key.items()]
            loaded = list(self._by_identity.values())
            tail_requests = self.tail_requests
        uses: dict[int, list[KeyUse]] = {}
        per_ref: dict[str, list[tuple[str, int]]] = {}
        for ref, key, layer, users in keys:
            try:
                scheme = layer.scheme_for(key)
            except ValueError:  # not reachable: _get checked the key against the layer
                continue
            uses.setdefault(id(layer), []).append(KeyUse(ref, key, scheme, users))
            per_ref.setdefault(ref, []).append((layer.compressed_digest, users))
        layers = tuple(
            LayerSnapshot(
                digest=layer.compressed_digest,
                toc_digest=layer.toc_digest,
                blob_size=layer.blob_size,
                keys=tuple(sorted(uses.get(id(layer), []), key=lambda k: (k.ref, k.key))),
                fetcher=layer.fetcher.snapshot(),
                idle_seconds=max(0.0, now - layer.last_used),
            )
            for layer in sorted(loaded, key=lambda x: x.compressed_digest)
        )
        images = tuple(
            ImageSnapshot(
                ref=ref,
                manifest_digest=resolved.get(ref),
                layers=tuple(dict.fromkeys(d for d, _ in per_ref.get(ref, []))),
                users=sum(u for _, u in per_ref.get(ref, [])),
            )
            for ref in sorted(fresh | set(per_ref))  # not every reference ever resolved
        )
        with self._activity.cond:
            foreground = self._activity.active
        return ManagerSnapshot(
            images=images,
            layers=layers,
            meter=self.meter.snapshot(),
            lookups_in_flight=len(self._sf_get),
            foreground_fetches=foreground,
            tail_requests=tail_requests,
        )
