"""(image reference, key) -> verified :class:`~layerstore.runtime.layer.Layer`.

Both key schemes are served by one daemon: a key matches a manifest layer when it equals the
layer's compressed digest (podman <= 5.0) or its ``containerd.io/snapshot/stargz/toc.digest``
annotation (podman >= 5.1). Use :meth:`Layer.scheme_for` to know which ``info`` to render.

Resolving a layer:

1. the reference is parsed (:class:`ImageReferenceError`) and resolved through the registry
   client (resolutions are cached per reference for ``resolve_ttl`` seconds, single-flight);
2. the key is looked up in the manifest (:class:`LayerNotFoundError`); a layer without the TOC
   digest annotation, or not gzip, is refused at once (:class:`NotEStargzError`) so podman falls
   back to an ordinary pull;
3. the TOC comes from the TOC cache, or from the blob's tail: ONE range request for the last
   ``tail_guess_bytes`` (or 1% of the blob, up to 1 MiB) bytes, and only when the TOC starts
   before that, one more for the rest;
4. the TOC digest is checked against the annotation (which for TOC keys is the key) inside the
   reader; nothing of the layer is served before that;
5. a :class:`Layer` (index + fetcher + cache) is built once per compressed digest and shared by
   every reference and key that name it.

Concurrent ``get`` calls of the same (ref, key) share one resolution; failures are remembered for
``negative_ttl`` seconds and then forgotten. ``use``/``release`` count users per (ref, key); the
first ``use`` starts the landmark prefetch (and the background fill when enabled); for a layer
without prioritized files it also fetches the image's entrypoint executable when the layer has
it (the container's first read). Layers without
users that have been idle for ``idle_drop_seconds`` are dropped from memory by :meth:`sweep`
(their chunks stay in the disk cache).
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import functools
import hashlib
import json
import posixpath
import stat
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Protocol, TypeVar, cast

import structlog

from layerstore import digest as _digest
from layerstore.common.bulkhead import Bulkhead, share_limit
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
)
from layerstore.estargz.footer import ESTARGZ_FOOTER_SIZE, LEGACY_FOOTER_SIZE, parse_footer
from layerstore.estargz.reader import DEFAULT_MAX_TOC_SIZE, EStargzReader, decode_chunk, toc_region
from layerstore.estargz.toc import TOCIndex
from layerstore.registry.client import PullSource, ResolvedImage
from layerstore.registry.manifest import ImageManifest, parse_image_config, parse_manifest
from layerstore.registry.reference import Reference, parse_reference
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.elfdeps import elf_dependencies
from layerstore.runtime.fetcher import (
    Activity,
    ChunkFetcher,
    ChunkLike,
    DecodeFn,
    FetcherSettings,
    describe_error,
)
from layerstore.runtime.layer import Layer, LayerSettings
from layerstore.source import RangeSource

log = structlog.get_logger(__name__)

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
MAX_TOC_BYTES = DEFAULT_MAX_TOC_SIZE

K = TypeVar("K")
V = TypeVar("V")


class ClientLike(Protocol):
    """What the manager needs of ``layerstore.registry.client.RegistryClient``."""

    def resolve(self, ref: Reference, platform: Any = None) -> Any: ...

    def blob_source(self, ref: Any, digest: str, size: int) -> RangeSource:
        """*ref* is the ResolvedImage (so no extra HEAD request is needed)."""
        ...


class ReaderLike(Protocol):
    @property
    def toc_digest(self) -> str: ...

    @property
    def index(self) -> Any: ...


OpenTOC = Callable[[RangeSource, bytes, int, int, str], ReaderLike]
"""(source, toc member bytes, toc offset, footer size, expected TOC digest) -> verified reader."""


def _default_open_toc(
    source: RangeSource, member: bytes, toc_offset: int, footer_size: int, expected: str
) -> ReaderLike:
    reader: ReaderLike = EStargzReader.from_toc_bytes(
        source, member, toc_offset, footer_size, expected
    )
    return reader


def _default_decode() -> DecodeFn:
    # The fetcher only hands decode the index's own Chunk objects.
    return cast(DecodeFn, decode_chunk)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    return cast("Callable[[int], int] | None", fn)


def release_free_memory() -> None:
    """Give the heap freed by a TOC parse back to the OS (glibc keeps it otherwise: tens of MB
    of RSS for a large layer)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _registry_unreachable(e: RegistryError) -> bool:
    """A failure that says nothing about the image: the registry could not answer."""
    if isinstance(e, (AuthenticationError, NotFoundError, BlockedRegistryError)):
        return False
    return isinstance(e, RegistryUnavailableError) or (e.status or 0) >= 500


def all_chunks(index: Any) -> list[ChunkLike]:
    """Every chunk of every regular file in the index."""
    for name in ("all_chunks", "iter_chunks"):
        fn = getattr(index, name, None)
        if callable(fn):
            return list(fn())
    out: list[ChunkLike] = []
    for ino in index.file_inodes():
        out.extend(index.chunks(ino))
    return out


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def entrypoint_candidates(config_raw: Any) -> list[str]:
    """Absolute paths the image's default command may run (``Entrypoint[0]``, else
    ``Cmd[0]``, looked up in its ``PATH``); empty when the config names none."""
    cfg = config_raw.get("config") if isinstance(config_raw, dict) else None
    if not isinstance(cfg, dict):
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


def resolve_regular_file(index: Any, path: str, hops: int = 8) -> int | None:
    """The inode of the regular file *path* names in this layer's view, following symlinks
    (of the last component) inside the layer; None when it is not there."""
    for _ in range(hops):
        ino = index.find(path.lstrip("/"))
        if ino is None:
            return None
        mode = index.getattr(ino).mode
        if stat.S_ISREG(mode):
            return int(ino)
        if not stat.S_ISLNK(mode):
            return None
        target = index.readlink(ino)
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return None


LIBRARY_DIRS = (
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
    "usr/local/lib",
)


def resolve_library(index: Any, name: str) -> int | None:
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
    max_toc_bytes: int = MAX_TOC_BYTES
    """Cap on the TOC JSON (containers/storage: 150 MiB); the compressed region is checked too."""
    idle_drop_seconds: float = 600.0
    background_concurrency: int = 2
    """Background-fill range requests in flight across all layers."""
    host_share: float = 1.0
    """Share (0 < x <= 1) of the foreground range requests (``fetcher.max_concurrent_requests``,
    across all layers) one registry host may have in flight: a registry that answers slowly
    holds at most that many, and the other registries keep the rest. 1.0: no split."""
    entrypoint_prefetch_bytes: int = 32 * 1024 * 1024
    """When a layer without prioritized files (no prefetch landmark) is first used, the image's
    entrypoint executable, if this layer has it and it is at most this large (compressed), is
    fetched at once: it is the first file the container reads, and the pull and the container
    set-up leave the link idle for a few hundred ms. 0 disables."""
    library_prefetch_files: int = 64
    library_prefetch_bytes: int = 64 * 1024 * 1024
    """After the entrypoint prefetch, the loader and the shared libraries it names (ELF
    ``PT_INTERP`` / ``DT_NEEDED``, recursively) that this layer has are fetched too, up to this
    many files and compressed bytes per layer, so the dynamic loader does not wait on the
    network for each in turn. 0 disables."""
    platform: Any = None
    fetcher: FetcherSettings = field(default_factory=FetcherSettings)
    layer: LayerSettings = field(default_factory=LayerSettings)


class _SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[K, Future[V]] = {}

    def do(self, key: K, fn: Callable[[], V]) -> V:
        with self._lock:
            fut = self._calls.get(key)
            owner = fut is None
            if fut is None:
                fut = Future()
                self._calls[key] = fut
        if not owner:
            return fut.result()
        try:
            value = fn()
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            with self._lock:
                self._calls.pop(key, None)


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
        open_toc: OpenTOC | None = None,
        decode: DecodeFn | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.settings = settings or ManagerSettings()
        self._open_toc = open_toc or _default_open_toc
        self._decode = decode
        self._lock = threading.Lock()
        self._resolved: dict[str, tuple[float, Any]] = {}
        self._negative: dict[tuple[str, str], tuple[float, LayerStoreError]] = {}
        self._by_ref_key: dict[tuple[str, str], _Entry] = {}
        self._by_digest: dict[str, Layer] = {}
        self._sf_resolve: _SingleFlight[str, Any] = _SingleFlight()
        self._sf_get: _SingleFlight[tuple[str, str], Layer] = _SingleFlight()
        self._sf_layer: _SingleFlight[str, Layer] = _SingleFlight()
        self._bg_slots = threading.Semaphore(max(1, self.settings.background_concurrency))
        total = max(1, self.settings.fetcher.max_concurrent_requests)
        self._request_slots = Bulkhead(total, share_limit(total, self.settings.host_share))
        self._activity = Activity()  # foreground work of every layer holds back every fill
        self._stored: dict[str, str] = {}  # ref -> manifest digest written to disk
        self._entrypoints: set[str] = set()  # layers whose entrypoint prefetch was considered
        self._wanted_libs: dict[str, set[str]] = {}  # ref -> library names not found yet
        self._lib_queued: dict[str, set[int]] = {}  # layer digest -> inodes queued
        self._lib_spent: dict[str, list[int]] = {}  # layer digest -> [files, bytes] queued
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
            neg = self._negative.get(rk)
            if neg is not None:
                if neg[0] > time.monotonic():
                    raise neg[1].with_traceback(None)
                del self._negative[rk]
        try:
            return self._sf_get.do(rk, lambda: self._get(ref, key))
        except LayerStoreError as e:
            with self._lock:
                if len(self._negative) > 4096:
                    now = time.monotonic()
                    self._negative = {k: v for k, v in self._negative.items() if v[0] > now}
                self._negative[rk] = (time.monotonic() + self.settings.negative_ttl, e)
            raise

    @staticmethod
    def registry_host(ref: str) -> str:
        """The registry host *ref* names ("" when it does not parse): the FUSE adapter's key
        for its per-registry share of lookup threads."""
        try:
            return parse_reference(ref).domain
        except LayerStoreError:
            return ""

    def scheme(self, ref: str, key: str) -> str:
        return self.get(ref, key).scheme_for(key)

    def _get(self, ref: str, key: str) -> Layer:
        bound = log.bind(ref=ref, key=key)
        if not _digest.is_valid(key):
            raise LayerNotFoundError(f"{key!r} is not a layer digest")
        reference = parse_reference(ref)
        image = self._resolve(ref, reference)
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
        layer = self._sf_layer.do(
            desc.digest, lambda: self._layer(reference, image, desc, toc_digest, diff_id)
        )
        if layer.diff_id != diff_id:
            bound.warning("layer_diff_id_differs", digest=desc.digest, other=diff_id)
        if key not in (layer.compressed_digest, layer.toc_digest):
            raise TOCDigestMismatchError(f"layer {desc.digest}: TOC digest is not {key}")
        with self._lock:
            self._by_ref_key.setdefault((ref, key), _Entry(layer))
        bound.info("layer_resolved", digest=layer.compressed_digest, scheme=layer.scheme_for(key))
        return layer

    def _resolve(self, ref: str, reference: Reference) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._resolved.get(ref)
            if hit is not None and hit[0] > now:
                return hit[1]

        def do() -> Any:
            ttl = self.settings.resolve_ttl
            try:
                image = self.client.resolve(reference, self.settings.platform)
            except RegistryError as e:
                if not _registry_unreachable(e):
                    raise
                image = self._stored_resolution(ref, reference)
                if image is None:
                    raise
                log.warning(
                    "resolution_from_disk",
                    ref=ref,
                    manifest=image.manifest_digest,
                    error=describe_error(e),
                )
                ttl = min(ttl, self.settings.negative_ttl)  # try the registry again soon
            else:
                self._store_resolution(ref, image)
            with self._lock:
                self._resolved[ref] = (time.monotonic() + ttl, image)
                if len(self._resolved) > 1024:
                    t = time.monotonic()
                    self._resolved = {k: v for k, v in self._resolved.items() if v[0] > t}
            return image

        return self._sf_resolve.do(ref, do)

    # --- resolutions on disk ---------------------------------------------------------------
    # The last good resolution of each reference is kept beside the TOCs, so that after a
    # restart layers already in use keep being served from the cache while the registry is
    # unreachable. Manifest and config are re-verified against their digests when loaded.
    @staticmethod
    def _resolution_name(ref: str) -> str:
        return "resolved-" + hashlib.sha256(ref.encode()).hexdigest()

    def _store_resolution(self, ref: str, image: Any) -> None:
        if not isinstance(image, ResolvedImage):
            return
        with self._lock:
            if self._stored.get(ref) == image.manifest_digest:
                return
            self._stored[ref] = image.manifest_digest
        record = {
            "ref": ref,
            "location": image.source.location,
            "insecure": image.source.insecure,
            "mirror": image.source.mirror,
            "manifest_digest": image.manifest_digest,
            "media_type": image.media_type,
            "manifest": base64.b64encode(image.raw_manifest).decode(),
            "config": base64.b64encode(image.raw_config).decode(),
        }
        self.cache.put_toc(self._resolution_name(ref), json.dumps(record).encode())

    def _stored_resolution(self, ref: str, reference: Reference) -> ResolvedImage | None:
        name = self._resolution_name(ref)
        data = self.cache.get_toc(name)
        if data is None:
            return None
        try:
            record = json.loads(data)
            if record["ref"] != ref:
                return None
            raw_manifest = base64.b64decode(record["manifest"], validate=True)
            raw_config = base64.b64decode(record["config"], validate=True)
            if _digest.sha256_digest(raw_manifest) != record["manifest_digest"]:
                raise ManifestError("stored manifest does not match its digest")
            manifest = parse_manifest(raw_manifest, record["media_type"])
            if not isinstance(manifest, ImageManifest):
                raise ManifestError("stored manifest is an index")
            if _digest.sha256_digest(raw_config) != manifest.config.digest:
                raise ManifestError("stored config does not match its digest")
            return ResolvedImage(
                reference=reference,
                source=PullSource(
                    str(record["location"]), bool(record["insecure"]), bool(record["mirror"])
                ),
                manifest_digest=str(record["manifest_digest"]),
                manifest=manifest,
                config=parse_image_config(raw_config),
                raw_manifest=raw_manifest,
                media_type=str(record["media_type"]),
                raw_config=raw_config,
            )
        except (ValueError, KeyError, TypeError, LayerStoreError) as e:
            log.warning("stored_resolution_discarded", ref=ref, error=describe_error(e))
            self.cache.remove_toc(name)
            return None

    # --- building a layer -----------------------------------------------------------------
    def _layer(
        self, reference: Reference, image: Any, desc: Any, toc_digest: str, diff_id: str
    ) -> Layer:
        with self._lock:
            existing = self._by_digest.get(desc.digest)
        if existing is not None:
            return existing
        bound = log.bind(ref=str(reference), digest=desc.digest, toc_digest=toc_digest)
        t0 = time.monotonic()
        blob_size = int(desc.size)
        source = self.client.blob_source(image, desc.digest, blob_size)
        toc_name = f"{_digest.hex_part(desc.digest)}-{_digest.hex_part(toc_digest)}"
        reader, toc_offset, footer_size, from_cache = None, 0, 0, False
        stored = self.cache.get_toc(toc_name)
        if stored is not None:
            try:
                header, member = stored.split(b"\n", 1)
                meta = json.loads(header)
                toc_offset, footer_size = int(meta["toc_offset"]), int(meta["footer_size"])
                reader = self._open_toc(source, member, toc_offset, footer_size, toc_digest)
                from_cache = True
            except (ValueError, KeyError, TypeError, LayerStoreError) as e:
                bound.warning("toc_cache_entry_discarded", error=describe_error(e))
                self.cache.remove_toc(toc_name)
                reader = None
        if reader is None:
            member, toc_offset, footer_size = self._fetch_toc_member(source, blob_size)
            reader = self._open_toc(source, member, toc_offset, footer_size, toc_digest)
            header = json.dumps({"toc_offset": toc_offset, "footer_size": footer_size}).encode()
            self.cache.put_toc(toc_name, header + b"\n" + member)
        if reader.toc_digest != toc_digest:
            raise TOCDigestMismatchError(
                f"layer {desc.digest}: TOC digest {reader.toc_digest} is not {toc_digest}"
            )
        index: TOCIndex = reader.index
        decode = self._decode or _default_decode()
        fetcher = ChunkFetcher(
            source,
            self.cache,
            all_chunks(index),
            decode,
            self.settings.fetcher,
            background_slots=self._bg_slots,
            request_slots=self._request_slots.slot(getattr(source, "registry_host", "")),
            activity=self._activity,
            name=desc.digest,
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
        )
        with self._lock:
            self._by_digest[desc.digest] = layer
        release_free_memory()
        bound.info(
            "layer_loaded",
            toc_from_cache=from_cache,
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
        tail = self._read(source, [(tail_start, tail_len)])[0]
        toc_offset, footer_size = parse_footer(tail)
        # Offset inside the blob, compressed TOC region within the cap (else FormatError /
        # LimitExceededError) before any larger request is made.
        toc_region(blob_size, toc_offset, footer_size, self.settings.max_toc_bytes)
        if toc_offset >= tail_start:
            return tail[toc_offset - tail_start : tail_len - footer_size], toc_offset, footer_size
        head = self._read(source, [(toc_offset, tail_start - toc_offset)])[0]
        return head + tail[: tail_len - footer_size], toc_offset, footer_size

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
        layer.start()
        self._prefetch_entrypoint(ref, layer)
        with self._lock:
            wanted = bool(self._wanted_libs.get(ref))
        if wanted:  # libraries an entrypoint in another layer of this image needs
            threading.Thread(
                target=self._prefetch_names_quietly,
                args=(ref, layer),
                name="stargz-libraries",
                daemon=True,
            ).start()
        return users

    def _prefetch_names_quietly(self, ref: str, layer: Layer) -> None:
        try:
            self._prefetch_names(ref, layer, [])
        except Exception as e:  # best effort: readers fetch what they need themselves
            log.warning("library_prefetch_failed", ref=ref, error=describe_error(e))

    def _prefetch_entrypoint(self, ref: str, layer: Layer) -> None:
        limit = self.settings.entrypoint_prefetch_bytes
        with self._lock:
            if limit <= 0 or layer.compressed_digest in self._entrypoints:
                return
            self._entrypoints.add(layer.compressed_digest)
            hit = self._resolved.get(ref)
        try:
            if hit is None or layer.index.prefetch_landmark_offset:
                return
            raw = getattr(getattr(hit[1], "config", None), "raw", None)
            for path in entrypoint_candidates(raw):
                ino = resolve_regular_file(layer.index, path)
                if ino is not None:
                    break
            else:
                return
            chunks = list(layer.index.chunks(ino))
        except (LookupError, ValueError, TypeError, AttributeError) as e:
            log.warning("entrypoint_prefetch_skipped", ref=ref, error=describe_error(e))
            return
        size = sum(c.compressed_end - c.offset for c in chunks)
        if not chunks or size > limit:
            return

        def run() -> None:
            t0 = time.monotonic()
            try:
                data = layer.fetcher.get_chunks(chunks)
            except Exception as e:  # readers see errors themselves
                log.warning("entrypoint_prefetch_failed", path=path, error=describe_error(e))
                return
            log.info(
                "entrypoint_prefetched",
                digest=layer.compressed_digest,
                path=path,
                bytes=size,
                seconds=round(time.monotonic() - t0, 3),
            )
            try:
                self._prefetch_libraries(ref, layer, ino, data)
            except Exception as e:  # best effort: readers fetch what they need themselves
                log.warning("library_prefetch_failed", path=path, error=describe_error(e))

        threading.Thread(target=run, name="stargz-entrypoint", daemon=True).start()

    def _prefetch_libraries(self, ref: str, layer: Layer, ino: int, data: Sequence[bytes]) -> None:
        """Fetch the loader and the shared libraries the ELF file *ino* (whose verified chunks
        are *data*) needs, then theirs; names this layer lacks are looked up in the image's
        other layers in use (and in those used later)."""
        with self._lock:
            self._lib_queued.setdefault(layer.compressed_digest, set()).add(ino)
        interp, needed = elf_dependencies(b"".join(data))
        names = ([interp] if interp else []) + needed
        self._prefetch_names(ref, layer, names)
        with self._lock:
            others = [
                e.layer
                for (r, _), e in self._by_ref_key.items()
                if r == ref and e.users > 0 and e.layer is not layer
            ]
        for other in dict.fromkeys(others):  # in parallel: one thread per layer
            threading.Thread(
                target=self._prefetch_names_quietly,
                args=(ref, other),
                name="stargz-libraries",
                daemon=True,
            ).start()

    def _prefetch_names(self, ref: str, layer: Layer, names: list[str]) -> None:
        """Fetch the libraries *names* (and those this ref still wants) that *layer* has, a
        level at a time (each level's files in one go), then the ones they name."""
        max_files = self.settings.library_prefetch_files
        if max_files <= 0 or self.settings.library_prefetch_bytes <= 0:
            return
        t0 = time.monotonic()
        digest = layer.compressed_digest
        files = fetched = 0
        while True:
            todo: list[tuple[int, list[ChunkLike]]] = []
            with self._lock:
                wanted = self._wanted_libs.setdefault(ref, set())
                wanted.update(names)
                names = sorted(wanted)
                queued = self._lib_queued.setdefault(digest, set())
                spent = self._lib_spent.setdefault(digest, [0, 0])
            for name in names:
                if spent[0] >= max_files:
                    break
                lib = resolve_library(layer.index, name)
                if lib is None:
                    continue
                with self._lock:
                    wanted.discard(name)
                    if lib in queued:
                        continue
                    queued.add(lib)
                cs: list[ChunkLike] = list(layer.index.chunks(lib))
                n = sum(c.compressed_end - c.offset for c in cs)
                if not cs or spent[1] + n > self.settings.library_prefetch_bytes:
                    continue
                spent[0] += 1
                spent[1] += n
                files += 1
                fetched += n
                todo.append((lib, cs))
            if not todo:
                break
            got = layer.fetcher.get_chunks([c for _, cs in todo for c in cs])
            names = []
            i = 0
            for _, cs in todo:
                interp, needed = elf_dependencies(b"".join(got[i : i + len(cs)]))
                names += ([interp] if interp else []) + needed
                i += len(cs)
        if files:
            log.info(
                "libraries_prefetched",
                digest=digest,
                files=files,
                bytes=fetched,
                seconds=round(time.monotonic() - t0, 3),
            )

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

    def users(self, ref: str, key: str) -> int:
        with self._lock:
            entry = self._by_ref_key.get((ref, key))
            return entry.users if entry is not None else 0

    def sweep(self) -> int:
        """Drop from memory the layers without users idle for ``idle_drop_seconds``."""
        cutoff = time.monotonic() - self.settings.idle_drop_seconds
        dropped: list[Layer] = []
        with self._lock:
            busy = {id(e.layer) for e in self._by_ref_key.values() if e.users > 0}
            for digest, layer in list(self._by_digest.items()):
                if id(layer) in busy or layer.last_used > cutoff:
                    continue
                del self._by_digest[digest]
                dropped.append(layer)
            gone = {id(layer) for layer in dropped}
            self._by_ref_key = {
                k: e for k, e in self._by_ref_key.items() if id(e.layer) not in gone
            }
        for layer in dropped:
            layer.close()
            log.info("layer_dropped", digest=layer.compressed_digest)
        return len(dropped)

    def loaded(self) -> list[Layer]:
        with self._lock:
            return list(self._by_digest.values())

    def close(self) -> None:
        with self._lock:
            layers = list(self._by_digest.values())
        for layer in layers:
            layer.close()
