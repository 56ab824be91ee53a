"""Manifests, indexes and image configs: media types, parsing with limits, platform selection.

Plain frozen dataclasses; parsing validates what we rely on (digests, sizes, media types) and
keeps the raw JSON objects where a caller (``convert``) needs to carry unknown fields along.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from layerstore import digest as _digest
from layerstore.errors import DigestError, ManifestError

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_CONFIG_SIZE = 4 * 1024 * 1024

# --- media types --------------------------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
GZIP_LAYER_MEDIA_TYPES = frozenset(
    {OCI_LAYER_GZIP, OCI_LAYER_ND_GZIP, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN_GZIP}
)
ZSTD_LAYER_MEDIA_TYPES = frozenset({OCI_LAYER_ZSTD, OCI_LAYER_ND_ZSTD})
TAR_LAYER_MEDIA_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_ND_TAR})
LAYER_MEDIA_TYPES = GZIP_LAYER_MEDIA_TYPES | ZSTD_LAYER_MEDIA_TYPES | TAR_LAYER_MEDIA_TYPES


# --- platforms ----------------------------------------------------------------------------------
_GOARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v7"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "loongarch64": ("loong64", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return f"{out}/{self.variant}" if self.variant else out

    def to_dict(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]``, e.g. ``linux/arm64/v8``."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ManifestError(f"invalid platform {text!r}: expected os/arch[/variant]")
    os_name, arch = parts[0].lower(), parts[1].lower()
    variant = parts[2].lower() if len(parts) == 3 else ""
    if arch in _GOARCH and _GOARCH[arch][0] != arch:  # accept uname spellings too
        arch, default_variant = _GOARCH[arch]
        variant = variant or default_variant
    return Platform(os_name, arch, variant)


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    arch, variant = _GOARCH.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


def _variant_preference(p: Platform) -> list[str] | None:
    """Acceptable variants in order of preference; ``None`` means any variant."""
    if p.architecture == "arm64":
        if p.variant in ("", "v8"):
            return ["v8", ""]
        return [p.variant, "v8", ""]
    if p.architecture == "arm":
        ladder = ["v8", "v7", "v6", "v5"]
        start = ladder.index(p.variant) if p.variant in ladder else 1
        return [*ladder[start:], ""]
    if not p.variant:
        return None
    return [p.variant, ""]


def platform_matches(candidate: Platform, wanted: Platform) -> int | None:
    """Rank of *candidate* for *wanted* (lower is better), or ``None`` when it does not fit."""
    if candidate.os != wanted.os or candidate.architecture != wanted.architecture:
        return None
    prefs = _variant_preference(wanted)
    if prefs is None:
        return 0 if not candidate.variant else 1
    if candidate.variant in prefs:
        return prefs.index(candidate.variant)
    return None


# --- descriptors, manifests, indexes, configs ---------------------------------------------------
@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_dict()
        return out


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def select(self, wanted: Platform | str | None = None) -> Descriptor:
        return select_manifest(self, wanted)


@dataclass(frozen=True)
class ImageConfig:
    os: str
    architecture: str
    variant: str
    diff_ids: tuple[str, ...]
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


Manifest = Union[ImageManifest, ImageIndex]


def load_json_object(body: bytes, what: str, limit: int | None = None) -> dict[str, Any]:
    """*body* as a JSON object, or ManifestError naming *what* (over *limit* bytes, not JSON,
    not an object). The image converter reads manifests and configs with it too."""
    if limit is not None and len(body) > limit:
        raise ManifestError(f"{what} is {len(body)} bytes, over the {limit} byte limit")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{what} is not a JSON object")
    return obj


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestError(f"{what} must be an object of strings")
    return dict(value)


def _parse_descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ManifestError(f"{what} is not a JSON object")
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{what} has no mediaType")
    digest = obj.get("digest")
    try:
        _digest.validate(digest)  # type: ignore[arg-type]
    except DigestError:
        raise ManifestError(f"{what} has an invalid digest {digest!r}") from None
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{what} has an invalid size {size!r}")
    plat: Platform | None = None
    p = obj.get("platform")
    if p is not None:
        if not isinstance(p, dict):
            raise ManifestError(f"{what} has an invalid platform")
        os_name, arch, variant = p.get("os"), p.get("architecture"), p.get("variant", "")
        if (
            not isinstance(os_name, str)
            or not isinstance(arch, str)
            or not isinstance(variant, str)
        ):
            raise ManifestError(f"{what} has an invalid platform")
        plat = Platform(os_name, arch, variant)
    urls = obj.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestError(f"{what} has invalid urls")
    return Descriptor(
        media_type=media_type,
        digest=digest,  # type: ignore[arg-type]
        size=size,
        annotations=_str_map(obj.get("annotations"), f"{what} annotations"),
        platform=plat,
        urls=tuple(urls),
    )


def parse_manifest(
    body: bytes, content_type: str | None = None, *, limit: int = MAX_MANIFEST_SIZE
) -> Manifest:
    """Parse an image manifest or an index. *content_type* (the HTTP header) is used when the
    body has no ``mediaType``; a body ``mediaType`` that contradicts it is refused."""
    obj = load_json_object(body, "manifest", limit)
    if obj.get("schemaVersion") != 2:
        raise ManifestError(
            f"unsupported manifest schemaVersion {obj.get('schemaVersion')!r} (need 2)"
        )
    header_type = (content_type or "").split(";")[0].strip().lower() or None
    media_type = obj.get("mediaType")
    if media_type is not None and not isinstance(media_type, str):
        raise ManifestError("manifest mediaType is not a string")
    if (
        media_type
        and header_type
        and header_type in ACCEPT_MEDIA_TYPES
        and media_type != header_type
    ):
        raise ManifestError(
            f"manifest mediaType {media_type!r} contradicts Content-Type {header_type!r}"
        )
    if not media_type:
        if header_type in ACCEPT_MEDIA_TYPES:
            media_type = header_type
        elif "manifests" in obj and "layers" not in obj:
            media_type = OCI_INDEX
        elif "layers" in obj and "manifests" not in obj:
            media_type = OCI_MANIFEST
        else:
            raise ManifestError("cannot tell whether the document is a manifest or an index")
    annotations = _str_map(obj.get("annotations"), "manifest annotations")
    if media_type in INDEX_MEDIA_TYPES:
        entries = obj.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError("index has no manifests list")
        manifests = tuple(_parse_descriptor(m, f"index entry {i}") for i, m in enumerate(entries))
        return ImageIndex(media_type, manifests, annotations, obj)
    if media_type in MANIFEST_MEDIA_TYPES:
        config = _parse_descriptor(obj.get("config"), "manifest config")
        layers_obj = obj.get("layers")
        if not isinstance(layers_obj, list):
            raise ManifestError("manifest has no layers list")
        layers = tuple(_parse_descriptor(x, f"layer {i}") for i, x in enumerate(layers_obj))
        return ImageManifest(media_type, config, layers, annotations, obj)
    raise ManifestError(f"unsupported manifest media type {media_type!r}")


def parse_image_config(body: bytes, *, limit: int = MAX_CONFIG_SIZE) -> ImageConfig:
    obj = load_json_object(body, "image config", limit)
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict):
        raise ManifestError("image config has no rootfs")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise ManifestError("image config has no rootfs.diff_ids list")
    for d in diff_ids:
        if not _digest.is_valid(d):
            raise ManifestError(f"image config has an invalid diff_id {d!r}")
    fields = {k: obj.get(k, "") for k in ("os", "architecture", "variant")}
    for k, v in fields.items():
        if not isinstance(v, str):
            raise ManifestError(f"image config field {k!r} is not a string")
    return ImageConfig(
        os=str(fields["os"]),
        architecture=str(fields["architecture"]),
        variant=str(fields["variant"]),
        diff_ids=tuple(diff_ids),
        raw=obj,
    )


def select_manifest(index: ImageIndex, wanted: Platform | str | None = None) -> Descriptor:
    """The index entry for *wanted* (default: the host platform); best variant wins, then the
    first entry in index order."""
    if wanted is None:
        target = host_platform()
    elif isinstance(wanted, str):
        target = parse_platform(wanted)
    else:
        target = wanted
    best: tuple[int, int] | None = None
    chosen: Descriptor | None = None
    for pos, desc in enumerate(index.manifests):
        if desc.platform is None or desc.media_type not in MANIFEST_MEDIA_TYPES:
            continue
        rank = platform_matches(desc.platform, target)
        if rank is None:
            continue
        if best is None or (rank, pos) < best:
            best, chosen = (rank, pos), desc
    if chosen is None:
        available = ", ".join(str(d.platform) for d in index.manifests if d.platform) or "none"
        raise ManifestError(f"no manifest for platform {target} in the index (has: {available})")
    return chosen


def layer_compression(media_type: str) -> str:
    """``gzip``, ``zstd`` or ``none`` for a layer media type; ManifestError otherwise."""
    if media_type in GZIP_LAYER_MEDIA_TYPES:
        return "gzip"
    if media_type in ZSTD_LAYER_MEDIA_TYPES:
        return "zstd"
    if media_type in TAR_LAYER_MEDIA_TYPES:
        return "none"
    raise ManifestError(f"unsupported layer media type {media_type!r}")


def iter_platforms(index: ImageIndex) -> Sequence[Platform]:
    return [d.platform for d in index.manifests if d.platform is not None]
