"""Image conversion to eStargz: manifests, configs, annotations, per platform.

:func:`convert_image` reads an image (a manifest, or an index of them) from an
:class:`ImageSource` and writes the converted image to an :class:`ImageDestination`:

* each gzip or uncompressed tar layer (OCI or Docker schema2 media types) becomes an eStargz
  blob with the annotations ``containerd.io/snapshot/stargz/toc.digest`` and
  ``io.containers.estargz.uncompressed-size``, media type gzip of the manifest's flavour;
* layers that already carry a TOC digest annotation are kept as they are (``keep_estargz``);
* the config's ``rootfs.diff_ids`` get the new DiffIDs (the landmark and TOC entries change the
  tar), and new config, manifest and index blobs are written;
* manifests and configs are handled as JSON dicts, so fields we do not know are preserved.

Transports: ``oci:DIR[:TAG]`` (:class:`OCISource`, :class:`OCIDestination`) and
``docker://REF`` (:class:`RegistrySource`, :class:`RegistryDestination`, over
:class:`layerstore.registry.client.RegistryClient`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from layerstore.digest import sha256_digest, validate
from layerstore.errors import ManifestError, VerificationError
from layerstore.estargz.constants import (
    PREFETCH_SIZE_ANNOTATION,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION,
)
from layerstore.estargz.writer import WriteResult, WriterOptions, write_estargz
from layerstore.image.ocilayout import OCILayout
from layerstore.registry import manifest as mf

if TYPE_CHECKING:
    from layerstore.registry.client import RegistryClient
    from layerstore.registry.reference import Reference

__all__ = [
    "ConvertOptions",
    "ConvertResult",
    "ImageDestination",
    "ImageSource",
    "LayerReport",
    "OCIDestination",
    "OCISource",
    "ProgressListener",
    "RegistryDestination",
    "RegistrySource",
    "UnsupportedLayerError",
    "convert_image",
]

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
_CONVERTIBLE = {
    # source media type -> (gzip media type for OCI manifests, for Docker manifests)
    mf.OCI_LAYER_GZIP: mf.OCI_LAYER_GZIP,
    mf.OCI_LAYER_TAR: mf.OCI_LAYER_GZIP,
    mf.DOCKER_LAYER_GZIP: mf.DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR: mf.DOCKER_LAYER_GZIP,
}
_FOREIGN = frozenset(
    {
        mf.OCI_LAYER_ND_TAR,
        mf.OCI_LAYER_ND_GZIP,
        mf.OCI_LAYER_ND_ZSTD,
        mf.DOCKER_LAYER_FOREIGN_GZIP,
    }
)
# annotations describing the old encoding of a layer, wrong after conversion
_STALE_ANNOTATIONS = (
    "containerd.io/uncompressed",
    ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION,
    "io.github.containers.zstd-chunked.manifest-position",
    "io.github.containers.zstd-chunked.tarsplit-position",
    PREFETCH_SIZE_ANNOTATION,
)
_READ_PIECE = 1 << 20


class UnsupportedLayerError(ManifestError):
    """A layer has a media type we cannot convert (zstd, unknown)."""


# --- transports --------------------------------------------------------------------------------


class ImageSource(Protocol):
    def describe(self) -> str: ...

    def get_root(self) -> tuple[bytes, str | None]:
        """The top-level manifest or index and its media type, when the transport knows it."""
        ...

    def get_manifest(self, digest: str, max_size: int) -> bytes:
        """A manifest by digest, verified."""
        ...

    def get_blob(self, digest: str, max_size: int) -> bytes:
        """A small blob (config) by digest, verified."""
        ...

    def open_blob(self, digest: str, size: int) -> BinaryIO:
        """A stream of a (large) blob; the caller verifies the digest while reading."""
        ...


class ImageDestination(Protocol):
    def describe(self) -> str: ...

    def has_blob(self, digest: str) -> bool: ...

    def staging_file(self) -> tuple[BinaryIO, str]:
        """An open temporary file for a blob being written, and its path."""
        ...

    def commit_blob(self, path: str, digest: str) -> None:
        """Store the staged file *path* as blob *digest* (verifying it); consumes the file."""
        ...

    def put_blob(self, data: bytes) -> str:
        """Store a small blob (config); returns its digest."""
        ...

    def put_manifest(self, body: bytes, media_type: str) -> str:
        """Store a manifest referenced by digest from an index; returns its digest."""
        ...

    def commit(self, body: bytes, media_type: str) -> str:
        """Store the top-level manifest or index under the destination's name."""
        ...


class OCISource:
    def __init__(self, layout: OCILayout, tag: str | None) -> None:
        self.layout = layout
        self.tag = tag
        self._root = layout.resolve(tag)

    def describe(self) -> str:
        return f"oci:{self.layout.root}" + (f":{self.tag}" if self.tag else "")

    def get_root(self) -> tuple[bytes, str | None]:
        desc = self._root
        body = self.layout.read_blob(desc["digest"], mf.MAX_MANIFEST_SIZE)
        mt = desc.get("mediaType")
        return body, mt if isinstance(mt, str) else None

    def get_manifest(self, digest: str, max_size: int) -> bytes:
        return self.layout.read_blob(digest, max_size)

    def get_blob(self, digest: str, max_size: int) -> bytes:
        return self.layout.read_blob(digest, max_size)

    def open_blob(self, digest: str, size: int) -> BinaryIO:
        return self.layout.open_blob(digest)


class OCIDestination:
    def __init__(self, layout: OCILayout, tag: str | None) -> None:
        self.layout = layout
        self.tag = tag

    def describe(self) -> str:
        return f"oci:{self.layout.root}" + (f":{self.tag}" if self.tag else "")

    def has_blob(self, digest: str) -> bool:
        return self.layout.has_blob(digest)

    def staging_file(self) -> tuple[BinaryIO, str]:
        return self.layout.staging_file()

    def commit_blob(self, path: str, digest: str) -> None:
        if self.layout.has_blob(digest):
            with contextlib.suppress(OSError):
                os.unlink(path)
            return
        self.layout.commit_staged(path, digest)

    def put_blob(self, data: bytes) -> str:
        return self.layout.write_blob(data)

    def put_manifest(self, body: bytes, media_type: str) -> str:
        return self.layout.write_blob(body)

    def commit(self, body: bytes, media_type: str) -> str:
        digest = self.layout.write_blob(body)
        self.layout.set_ref(
            {"mediaType": media_type, "digest": digest, "size": len(body)}, self.tag
        )
        return digest


class _RangeStream:
    """Sequential reads over a RangeSource (a registry blob) in large ranges."""

    def __init__(self, source: Any, size: int, piece: int = 8 << 20) -> None:
        self._src = source
        self._size = size
        self._pos = 0
        self._piece = piece
        self._buf = b""
        self._off = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._size
        if self._off >= len(self._buf) and self._pos < self._size:
            k = min(self._piece, self._size - self._pos)
            self._buf = self._src.read_at(self._pos, k)
            self._off = 0
            self._pos += k
        out = self._buf[self._off : self._off + n]
        self._off += len(out)
        return out

    def close(self) -> None:
        close = getattr(self._src, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> _RangeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegistrySource:
    """``docker://REF`` through :class:`layerstore.registry.client.RegistryClient`."""

    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self.client = client
        self.ref = ref

    def describe(self) -> str:
        return f"docker://{self.ref}"

    def get_root(self) -> tuple[bytes, str | None]:
        resp = self.client.get_manifest(self.ref)
        return resp.raw, resp.media_type

    def get_manifest(self, digest: str, max_size: int) -> bytes:
        return self.client.get_manifest(self.ref, digest=digest).raw

    def get_blob(self, digest: str, max_size: int) -> bytes:
        return self.client.get_blob(self.ref, digest, max_size)

    def open_blob(self, digest: str, size: int) -> BinaryIO:
        src = self.client.blob_source(self.ref, digest, size)
        return _RangeStream(src, size)  # type: ignore[return-value]


class RegistryDestination:
    """``docker://REF``: blobs and manifests pushed with the registry client."""

    def __init__(self, client: RegistryClient, ref: Reference, tmpdir: str | None = None) -> None:
        self.client = client
        self.ref = ref
        self.tmpdir = tmpdir

    def describe(self) -> str:
        return f"docker://{self.ref}"

    def has_blob(self, digest: str) -> bool:
        return self.client.blob_exists(self.ref, digest)

    def staging_file(self) -> tuple[BinaryIO, str]:
        fd, tmp = tempfile.mkstemp(dir=self.tmpdir, prefix="stargz-convert-", suffix=".blob")
        return os.fdopen(fd, "w+b"), tmp

    def commit_blob(self, path: str, digest: str) -> None:
        try:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for piece in iter(lambda: f.read(_READ_PIECE), b""):
                    h.update(piece)
            if "sha256:" + h.hexdigest() != digest:
                raise VerificationError(f"staged blob does not match {digest}")
            self.client.push_blob(self.ref, path, digest)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def put_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.client.push_blob(self.ref, data, digest)
        return digest

    def put_manifest(self, body: bytes, media_type: str) -> str:
        digest = sha256_digest(body)
        by_digest = dataclasses.replace(self.ref, tag=None, digest=digest)
        return self.client.put_manifest(by_digest, body, media_type)

    def commit(self, body: bytes, media_type: str) -> str:
        ref = self.ref
        if ref.tag is None:
            digest = sha256_digest(body)
            ref = dataclasses.replace(ref, digest=digest)
        return self.client.put_manifest(ref, body, media_type)


# --- options, results, progress ----------------------------------------------------------------


@dataclass(frozen=True)
class ConvertOptions:
    writer: WriterOptions = field(default_factory=WriterOptions)
    platform: str | None = None  # os/arch[/variant]: only that platform of an index
    keep_estargz: bool = True  # layers with a TOC digest annotation are copied as they are
    layer_priorities: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Source layer digest -> the files to put first in that layer (``stargz-store optimize``:
    what a workload read, per layer). Replaces ``writer.prioritized_files`` for that layer, and
    the layer is converted even when it is eStargz already (its entries are reordered)."""


@dataclass(frozen=True)
class LayerReport:
    platform: str
    index: int
    source_digest: str
    source_size: int
    digest: str
    size: int
    action: str  # "converted", "kept" (already eStargz), "foreign" (kept), "reused"
    toc_digest: str | None = None
    diff_id: str | None = None
    seconds: float = 0.0
    prioritized: int = 0  # files asked to go first
    missed_prioritized: tuple[str, ...] = ()  # of those, the ones the layer does not have


@dataclass
class ConvertResult:
    digest: str  # of the top-level manifest or index written
    media_type: str
    layers: list[LayerReport] = field(default_factory=list)
    platforms: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # index entries left out (not images)


class ProgressListener(Protocol):
    def layer_start(
        self, platform: str, index: int, count: int, digest: str, size: int
    ) -> None: ...

    def layer_progress(self, done: int, copying: bool = False) -> None:
        """*done* bytes of the layer read; *copying*: it is copied as is, not converted."""
        ...

    def layer_done(self, report: LayerReport) -> None: ...


class _NoProgress:
    def layer_start(self, platform: str, index: int, count: int, digest: str, size: int) -> None:
        pass

    def layer_progress(self, done: int, copying: bool = False) -> None:
        pass

    def layer_done(self, report: LayerReport) -> None:
        pass


class _VerifyingReader:
    """Hashes what is read and checks digest and size at the end of the stream."""

    def __init__(self, f: BinaryIO, digest: str, size: int, what: str) -> None:
        self._f = f
        self._digest = digest
        self._size = size
        self._what = what
        self._h = hashlib.sha256()
        self._n = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._h.update(data)
            self._n += len(data)
            if self._n > self._size:
                raise VerificationError(f"{self._what} is larger than its {self._size} bytes")
        elif not self._checked and n != 0:
            self._checked = True
            actual = "sha256:" + self._h.hexdigest()
            if self._n != self._size or actual != self._digest:
                raise VerificationError(
                    f"{self._what} is corrupt: read {self._n} bytes with digest {actual}, "
                    f"expected {self._size} bytes with digest {self._digest}"
                )
        return data


# --- conversion --------------------------------------------------------------------------------


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _media_type(obj: dict[str, Any], hint: str | None) -> str:
    mt = obj.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if hint in mf.ACCEPT_MEDIA_TYPES:
        return hint
    if "manifests" in obj and "layers" not in obj:
        return mf.OCI_INDEX
    if "layers" in obj:
        return mf.OCI_MANIFEST
    raise ManifestError("cannot tell whether the document is a manifest or an index")


def _platform_str(desc: dict[str, Any]) -> str:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return ""
    parts = [str(p.get("os", "")), str(p.get("architecture", ""))]
    if p.get("variant"):
        parts.append(str(p["variant"]))
    return "/".join(parts)


class _Converter:
    def __init__(
        self,
        src: ImageSource,
        dst: ImageDestination,
        opts: ConvertOptions,
        progress: ProgressListener,
    ) -> None:
        self.src = src
        self.dst = dst
        self.opts = opts
        self.progress = progress
        self.reports: list[LayerReport] = []
        self.dropped: list[str] = []
        # source layer digest -> (new descriptor, new diff_id); layers shared between platforms
        self._done: dict[str, tuple[dict[str, Any], str | None]] = {}

    def run(self) -> ConvertResult:
        body, hint = self.src.get_root()
        root = mf.load_json_object(body, f"manifest of {self.src.describe()}")
        if root.get("schemaVersion") != 2:
            raise ManifestError(
                f"{self.src.describe()}: unsupported schemaVersion {root.get('schemaVersion')!r}"
            )
        mt = _media_type(root, hint)
        if mt in mf.INDEX_MEDIA_TYPES:
            return self._index(root, mt)
        if mt not in mf.MANIFEST_MEDIA_TYPES:
            raise ManifestError(f"{self.src.describe()}: unsupported media type {mt}")
        if self.opts.platform is not None:
            self._check_single_platform(root)
        new_body = self._manifest(root, mt, "")
        digest = self.dst.commit(new_body, mt)
        return ConvertResult(digest, mt, self.reports, [""])

    def _check_single_platform(self, manifest: dict[str, Any]) -> None:
        assert self.opts.platform is not None
        wanted = mf.parse_platform(self.opts.platform)
        cfg = self._config(manifest)
        have = mf.Platform(
            str(cfg.get("os", "")), str(cfg.get("architecture", "")), str(cfg.get("variant", ""))
        )
        if mf.platform_matches(have, wanted) is None:
            raise ManifestError(
                f"{self.src.describe()} is a single-platform image for {have}, not {wanted}"
            )

    def _index(self, index: dict[str, Any], mt: str) -> ConvertResult:
        entries = index.get("manifests")
        if not isinstance(entries, list) or not entries:
            raise ManifestError(f"{self.src.describe()}: index has no manifests")
        selected: list[dict[str, Any]] = []
        if self.opts.platform is not None:
            wanted = mf.parse_platform(self.opts.platform)
            ranked: list[tuple[int, int, dict[str, Any]]] = []
            for i, d in enumerate(entries):
                p = d.get("platform") if isinstance(d, dict) else None
                if not isinstance(p, dict):
                    continue
                cand = mf.Platform(
                    str(p.get("os", "")),
                    str(p.get("architecture", "")),
                    str(p.get("variant", "")),
                )
                rank = mf.platform_matches(cand, wanted)
                if rank is not None:
                    ranked.append((rank, i, d))
            if not ranked:
                have = ", ".join(sorted({_platform_str(d) for d in entries if isinstance(d, dict)}))
                raise ManifestError(
                    f"{self.src.describe()}: no manifest for platform {wanted} (has: {have})"
                )
            best = min(r for r, _, _ in ranked)
            selected = [d for r, _, d in ranked if r == best][:1]
        else:
            for d in entries:
                if not isinstance(d, dict):
                    raise ManifestError("index entry is not an object")
                dmt = d.get("mediaType")
                if dmt in mf.INDEX_MEDIA_TYPES:
                    raise ManifestError(
                        f"{self.src.describe()}: nested image indexes are not supported"
                    )
                is_image = dmt in mf.MANIFEST_MEDIA_TYPES or dmt is None  # None: look inside
                if is_image and _platform_str(d) != "unknown/unknown":
                    selected.append(d)
                else:  # attestations, signatures, artifacts: not images, not converted
                    self.dropped.append(f"{d.get('digest')} ({dmt}, {_platform_str(d) or '-'})")
            if not selected:
                raise ManifestError(f"{self.src.describe()}: index has no image manifests")
        new_entries = []
        platforms = []
        for d in selected:
            digest = validate(str(d.get("digest", "")))
            body = self.src.get_manifest(digest, mf.MAX_MANIFEST_SIZE)
            m = mf.load_json_object(body, f"manifest {digest}")
            mmt = _media_type(m, d.get("mediaType"))
            if mmt not in mf.MANIFEST_MEDIA_TYPES:
                raise ManifestError(f"manifest {digest}: unsupported media type {mmt} in index")
            plat = _platform_str(d)
            new_body = self._manifest(m, mmt, plat)
            new_digest = self.dst.put_manifest(new_body, mmt)
            nd = copy.deepcopy(d)
            nd["mediaType"] = mmt
            nd["digest"] = new_digest
            nd["size"] = len(new_body)
            new_entries.append(nd)
            platforms.append(plat)
        new_index = copy.deepcopy(index)
        new_index["manifests"] = new_entries
        new_index_body = _dump(new_index)
        digest = self.dst.commit(new_index_body, mt)
        return ConvertResult(digest, mt, self.reports, platforms, self.dropped)

    def _config(self, manifest: dict[str, Any]) -> dict[str, Any]:
        cdesc = manifest.get("config")
        if not isinstance(cdesc, dict):
            raise ManifestError("manifest has no config descriptor")
        digest = validate(str(cdesc.get("digest", "")))
        return mf.load_json_object(
            self.src.get_blob(digest, mf.MAX_CONFIG_SIZE), f"config {digest}"
        )

    def _manifest(self, manifest: dict[str, Any], mt: str, platform: str) -> bytes:
        new = copy.deepcopy(manifest)
        config = self._config(manifest)
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise ManifestError("manifest has no layers list")
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise ManifestError(
                f"config rootfs.diff_ids has {len(diff_ids) if isinstance(diff_ids, list) else 0}"
                f" entries for {len(layers)} layers"
            )
        docker = mt == mf.DOCKER_MANIFEST
        new_layers = []
        new_diff_ids = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise ManifestError(f"layer {i} is not an object")
            nd, diff_id = self._layer(layer, i, len(layers), docker, platform)
            new_layers.append(nd)
            new_diff_ids.append(diff_id if diff_id is not None else diff_ids[i])
        new_config = copy.deepcopy(config)
        new_config["rootfs"]["diff_ids"] = new_diff_ids
        config_body = _dump(new_config)
        cdigest = self.dst.put_blob(config_body)
        new["config"]["digest"] = cdigest
        new["config"]["size"] = len(config_body)
        new["layers"] = new_layers
        return _dump(new)

    def _layer(
        self, layer: dict[str, Any], i: int, count: int, docker: bool, platform: str
    ) -> tuple[dict[str, Any], str | None]:
        digest = validate(str(layer.get("digest", "")))
        size = layer.get("size")
        if not isinstance(size, int) or size < 0:
            raise ManifestError(f"layer {i} ({digest}) has no valid size")
        lmt = str(layer.get("mediaType", ""))
        if digest in self._done:
            nd, diff_id = self._done[digest]
            self._report(platform, i, digest, size, nd, "reused", diff_id)
            return copy.deepcopy(nd), diff_id
        annotations = layer.get("annotations") or {}
        self.progress.layer_start(platform, i, count, digest, size)
        if lmt in _FOREIGN:
            if not self.dst.has_blob(digest) and not layer.get("urls"):
                self._copy_blob(digest, size)
            return self._keep(layer, platform, i, digest, size, "foreign")
        if (
            self.opts.keep_estargz
            and digest not in self.opts.layer_priorities
            and isinstance(annotations, dict)
            and TOC_DIGEST_ANNOTATION in annotations
            and lmt in (mf.OCI_LAYER_GZIP, mf.DOCKER_LAYER_GZIP)
        ):
            if not self.dst.has_blob(digest):
                self._copy_blob(digest, size)
            return self._keep(layer, platform, i, digest, size, "kept")
        if lmt not in _CONVERTIBLE:
            raise UnsupportedLayerError(
                f"layer {i} ({digest}) has media type {lmt or 'none'}, which cannot be converted"
                " (only gzip and uncompressed tar layers can)"
            )
        t0 = time.monotonic()
        res = self._convert_blob(digest, size)
        out_mt = mf.DOCKER_LAYER_GZIP if docker else mf.OCI_LAYER_GZIP
        nd = copy.deepcopy(layer)
        nd["mediaType"] = out_mt
        nd["digest"] = res.blob_digest
        nd["size"] = res.compressed_size
        nd.pop("urls", None)
        ann = dict(annotations) if isinstance(annotations, dict) else {}
        for k in _STALE_ANNOTATIONS:
            ann.pop(k, None)
        ann[TOC_DIGEST_ANNOTATION] = res.toc_digest
        ann[UNCOMPRESSED_SIZE_ANNOTATION] = str(res.uncompressed_size)
        if res.prefetch_size > 0:
            ann[PREFETCH_SIZE_ANNOTATION] = str(res.prefetch_size)
        nd["annotations"] = ann
        self._done[digest] = (nd, res.diff_id)
        self._report(
            platform, i, digest, size, nd, "converted", res.diff_id, res, time.monotonic() - t0
        )
        return copy.deepcopy(nd), res.diff_id

    def _keep(
        self, layer: dict[str, Any], platform: str, i: int, digest: str, size: int, action: str
    ) -> tuple[dict[str, Any], str | None]:
        nd = copy.deepcopy(layer)
        self._done[digest] = (nd, None)
        self._report(platform, i, digest, size, nd, action, None)
        return copy.deepcopy(nd), None

    def _report(
        self,
        platform: str,
        i: int,
        digest: str,
        size: int,
        nd: dict[str, Any],
        action: str,
        diff_id: str | None,
        res: WriteResult | None = None,
        seconds: float = 0.0,
    ) -> None:
        ann = nd.get("annotations") or {}
        rep = LayerReport(
            platform=platform,
            index=i,
            source_digest=digest,
            source_size=size,
            digest=str(nd.get("digest")),
            size=int(nd.get("size", 0)),
            action=action,
            toc_digest=ann.get(TOC_DIGEST_ANNOTATION) if isinstance(ann, dict) else None,
            diff_id=diff_id,
            seconds=seconds,
            prioritized=len(self._writer_options(digest).prioritized_files) if res else 0,
            missed_prioritized=res.missed_prioritized if res else (),
        )
        self.reports.append(rep)
        self.progress.layer_done(rep)

    def _writer_options(self, digest: str) -> WriterOptions:
        files = self.opts.layer_priorities.get(digest)
        if files is None:
            return self.opts.writer
        return dataclasses.replace(self.opts.writer, prioritized_files=tuple(files))

    def _copy_blob(self, digest: str, size: int) -> None:
        f, tmp = self.dst.staging_file()
        try:
            with f, self.src.open_blob(digest, size) as raw:
                r = _VerifyingReader(raw, digest, size, f"layer {digest}")
                while True:
                    piece = r.read(_READ_PIECE)
                    if not piece:
                        break
                    f.write(piece)
                    self.progress.layer_progress(r._n, copying=True)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.dst.commit_blob(tmp, digest)

    def _convert_blob(self, digest: str, size: int) -> WriteResult:
        f, tmp = self.dst.staging_file()
        try:
            with f, self.src.open_blob(digest, size) as raw:
                reader = _VerifyingReader(raw, digest, size, f"layer {digest}")
                res = write_estargz(
                    reader,  # type: ignore[arg-type]
                    f,
                    self._writer_options(digest),
                    self.progress.layer_progress,
                )
                f.flush()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.dst.commit_blob(tmp, res.blob_digest)
        return res


def convert_image(
    src: ImageSource,
    dst: ImageDestination,
    options: ConvertOptions | None = None,
    progress: ProgressListener | None = None,
) -> ConvertResult:
    """Convert the image of *src* to eStargz into *dst*. Raises :class:`LayerStoreError`
    subclasses (ManifestError, VerificationError, FormatError, OCILayoutError, RegistryError)."""
    opts = options or ConvertOptions()
    opts.writer.validate()
    if opts.platform is not None:
        mf.parse_platform(opts.platform)
    return _Converter(src, dst, opts, progress or _NoProgress()).run()
