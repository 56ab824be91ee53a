"""Workload profiles: which files of each eStargz layer a container read at start, in order.

A profile is a small JSON document of our own media type (:data:`PROFILE_MEDIA_TYPE`). The
store writes one when recording (``[record]``, ``stargz-store serve --record``), ``stargz-store
optimize`` turns one into prioritized files (the layers are rewritten with those files first),
and ``optimize --attach`` pushes one next to an image as an OCI artifact that the daemon
fetches and follows (*profile prefetch*). Layers are named by their TOC digest, which is what
the files' paths are relative to; the compressed digest is informational.

::

    {"media_type": "application/vnd.stargz-store.profile.v1+json",
     "created": "2024-05-01T12:00:00Z", "tool": "stargz-store 0.1.0",
     "image": "registry.example/app:1", "manifest_digest": "sha256:...",
     "period_seconds": 10.0,
     "layers": [{"toc_digest": "sha256:...", "digest": "sha256:...",
                 "entries": [{"path": "usr/bin/python3.11", "first_access_ms": 3,
                              "bytes": 6831736}, ...]}]}

A profile is only ever a hint: readers that follow it still verify every byte against the
TOC, and paths a layer does not have are skipped. Because one may come from a registry, parsing
is strict and bounded (:data:`MAX_PROFILE_BYTES`, :data:`MAX_ENTRIES`, path length, digest
grammar); anything else is a :class:`ProfileError`. Unknown keys are ignored, so a later v1
writer may add fields; a new media type means an incompatible change.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from layerstore.digest import is_valid
from layerstore.errors import FormatError

PROFILE_MEDIA_TYPE = "application/vnd.stargz-store.profile.v1+json"
"""The media type of the document, and the ``artifactType`` of an attached profile."""

MAX_PROFILE_BYTES = 1 << 20
MAX_ENTRIES = 100_000
"""Across all layers of one profile."""
MAX_LAYERS = 1024
MAX_PATH_CHARS = 4096


class ProfileError(FormatError):
    """A document that is not a valid profile (or exceeds its limits)."""


@dataclass(frozen=True)
class ProfileEntry:
    path: str
    """TOC name of a regular file: no leading ``/``."""
    first_access_ms: int
    """Milliseconds from the recording's first read to this file's first read."""
    bytes: int
    """Distinct bytes of the file that were read."""


@dataclass(frozen=True)
class LayerProfile:
    toc_digest: str
    entries: tuple[ProfileEntry, ...]
    digest: str = ""
    """The layer's compressed digest when known (informational)."""

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]


@dataclass(frozen=True)
class Profile:
    layers: tuple[LayerProfile, ...]
    created: str = ""
    tool: str = ""
    image: str = ""
    manifest_digest: str = ""
    period_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Keys of the document this version does not know (kept, not interpreted)."""

    def layer(self, toc_digest: str) -> LayerProfile | None:
        for lp in self.layers:
            if lp.toc_digest == toc_digest:
                return lp
        return None

    @property
    def files(self) -> int:
        return sum(len(lp.entries) for lp in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(lp.total_bytes for lp in self.layers)

    def to_json(self) -> bytes:
        """The document, compact, keys in a fixed order (the same profile gives the same
        bytes, so the same digest when attached twice)."""
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            {
                "media_type": PROFILE_MEDIA_TYPE,
                "created": self.created,
                "tool": self.tool,
                "image": self.image,
                "manifest_digest": self.manifest_digest,
                "period_seconds": self.period_seconds,
                "layers": [
                    {
                        "toc_digest": lp.toc_digest,
                        "digest": lp.digest,
                        "entries": [
                            {"path": e.path, "first_access_ms": e.first_access_ms, "bytes": e.bytes}
                            for e in lp.entries
                        ],
                    }
                    for lp in self.layers
                ],
            }
        )
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def clean_path(path: str) -> str | None:
    """The TOC form of *path* (no leading ``/``, ``.``/``..`` resolved, never above the root),
    or None when it names the root or holds a NUL."""
    if not path or "\0" in path:
        return None
    p = posixpath.normpath("/" + path).lstrip("/")
    return p or None


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProfileError(f"profile: {what} must be a non-negative integer")
    return value


def _str(value: Any, what: str, limit: int = 512) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ProfileError(f"profile: {what} must be a string of at most {limit} characters")
    return value


def parse_profile(data: bytes, *, max_bytes: int = MAX_PROFILE_BYTES) -> Profile:
    """Parse and validate a profile document. Raises :class:`ProfileError`."""
    if len(data) > max_bytes:
        raise ProfileError(f"profile is {len(data)} bytes, over the {max_bytes} byte limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProfileError(f"profile is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ProfileError("profile is not a JSON object")
    mt = doc.get("media_type")
    if mt != PROFILE_MEDIA_TYPE:
        raise ProfileError(f"profile media type is {str(mt)[:80]!r}, not {PROFILE_MEDIA_TYPE}")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list):
        raise ProfileError("profile: 'layers' must be a list")
    if len(layers_doc) > MAX_LAYERS:
        raise ProfileError(f"profile: more than {MAX_LAYERS} layers")
    count = 0
    layers: list[LayerProfile] = []
    seen: set[str] = set()
    for i, ld in enumerate(layers_doc):
        if not isinstance(ld, dict):
            raise ProfileError(f"profile: layer {i} is not an object")
        toc = ld.get("toc_digest")
        if not isinstance(toc, str) or not is_valid(toc):
            raise ProfileError(f"profile: layer {i} has no valid toc_digest")
        if toc in seen:
            raise ProfileError(f"profile: layer {toc} is listed twice")
        seen.add(toc)
        digest = _str(ld.get("digest"), f"layer {i} digest", 80)
        if digest and not is_valid(digest):
            raise ProfileError(f"profile: layer {i} has an invalid digest")
        entries_doc = ld.get("entries")
        if not isinstance(entries_doc, list):
            raise ProfileError(f"profile: layer {i} 'entries' must be a list")
        count += len(entries_doc)
        if count > MAX_ENTRIES:
            raise ProfileError(f"profile: more than {MAX_ENTRIES} entries")
        entries: list[ProfileEntry] = []
        for j, ed in enumerate(entries_doc):
            if not isinstance(ed, dict):
                raise ProfileError(f"profile: layer {i} entry {j} is not an object")
            raw_path = _str(ed.get("path"), f"layer {i} entry {j} path", MAX_PATH_CHARS)
            path = clean_path(raw_path)
            if path is None:
                raise ProfileError(f"profile: layer {i} entry {j} has no valid path")
            entries.append(
                ProfileEntry(
                    path,
                    _int(ed.get("first_access_ms", 0), "first_access_ms"),
                    _int(ed.get("bytes", 0), "bytes"),
                )
            )
        layers.append(LayerProfile(toc, tuple(entries), digest))
    period = doc.get("period_seconds", 0.0)
    if not isinstance(period, (int, float)) or isinstance(period, bool) or period < 0:
        raise ProfileError("profile: period_seconds must be a non-negative number")
    manifest_digest = _str(doc.get("manifest_digest"), "manifest_digest", 80)
    if manifest_digest and not is_valid(manifest_digest):
        raise ProfileError("profile: invalid manifest_digest")
    known = {"media_type", "created", "tool", "image", "manifest_digest", "period_seconds"}
    return Profile(
        layers=tuple(layers),
        created=_str(doc.get("created"), "created", 64),
        tool=_str(doc.get("tool"), "tool", 128),
        image=_str(doc.get("image"), "image", 1024),
        manifest_digest=manifest_digest,
        period_seconds=float(period),
        extra={k: v for k, v in doc.items() if k not in known and k != "layers"},
    )


def fit(profile: Profile, max_bytes: int = MAX_PROFILE_BYTES) -> Profile:
    """*profile* with its latest entries dropped until the document is within *max_bytes*
    and :data:`MAX_ENTRIES` (what the store writes must be readable by the store)."""
    order = sorted(
        (e.first_access_ms, li, j)
        for li, lp in enumerate(profile.layers)
        for j, e in enumerate(lp.entries)
    )
    keep = min(len(order), MAX_ENTRIES)
    while True:
        chosen = {(li, j) for _, li, j in order[:keep]}
        layers = tuple(
            LayerProfile(
                lp.toc_digest,
                tuple(e for j, e in enumerate(lp.entries) if (li, j) in chosen),
                lp.digest,
            )
            for li, lp in enumerate(profile.layers)
        )
        kept = dataclasses.replace(profile, layers=layers)
        if keep == 0 or len(kept.to_json()) <= max_bytes:
            return kept
        keep = keep * 9 // 10
