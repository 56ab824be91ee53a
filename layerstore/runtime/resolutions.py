"""The last good resolution of each image reference, kept on disk.

Why: after a restart, layers podman already uses must keep being served while the registry is
unreachable; the chunks and TOCs are in the cache, but the reference -> manifest -> layer
mapping would otherwise need the registry. The
:class:`~layerstore.runtime.manager.LayerManager` saves each new resolution here and loads it
only when the registry cannot answer at all (never in place of an answer such as "not found").

Layout: ``<directory>/<sha256 of the reference>.json``, one JSON record per reference with the
raw manifest and config (base64), their media type, digests and where they were pulled from.
The directory is the daemon's ``<root>/resolutions`` (beside the chunk cache, not in it: these
are not cache entries of the chunk budget). A record is trusted for nothing: on load the
manifest must match its digest, be an image manifest (not an index), and the config must match
the digest the manifest names; a record that fails any check is deleted and reported as
absent. At most ``max_entries`` records are kept (the least recently saved go first).

Before this store existed the records lived in the chunk cache's ``toc/`` directory as
``resolved-<hex>``; they are not read (the cache deletes them when it opens), so a reference
resolved by an older daemon is simply resolved again from the registry.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import structlog

from layerstore import digest as _digest
from layerstore.common.atomicfile import TMP_PREFIX, write_atomic
from layerstore.common.redact import describe_error
from layerstore.errors import CacheError, LayerStoreError, ManifestError
from layerstore.registry.client import PullSource, ResolvedImage
from layerstore.registry.manifest import ImageManifest, parse_image_config, parse_manifest
from layerstore.registry.reference import Reference

log = structlog.get_logger(__name__)

_SUFFIX = ".json"


class ResolutionStore:
    """Thread-safe; every method is best effort (I/O errors are logged, never raised)."""

    def __init__(self, directory: str | os.PathLike[str], max_entries: int = 1024) -> None:
        self.directory = Path(directory)
        self.max_entries = max(1, max_entries)
        self._lock = threading.Lock()
        self._saved: dict[str, str] = {}  # ref -> manifest digest written by this process
        self._names: OrderedDict[str, None] = OrderedDict()  # file names, oldest first
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create {self.directory}: {e}") from e
        found: list[tuple[float, str]] = []
        with contextlib.suppress(OSError), os.scandir(self.directory) as it:
            for d in it:
                if d.name.startswith(TMP_PREFIX):  # a write interrupted by a crash
                    with contextlib.suppress(OSError):
                        os.unlink(d.path)
                elif d.name.endswith(_SUFFIX):
                    with contextlib.suppress(OSError):
                        found.append((d.stat().st_mtime, d.name))
        for _mtime, name in sorted(found):
            self._names[name] = None

    @staticmethod
    def _name(ref: str) -> str:
        return hashlib.sha256(ref.encode()).hexdigest() + _SUFFIX

    def save(self, ref: str, image: ResolvedImage) -> None:
        """Keep *image* as the last good resolution of *ref* (written only when it changed)."""
        with self._lock:
            if self._saved.get(ref) == image.manifest_digest:
                return
            self._saved[ref] = image.manifest_digest
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
        name = self._name(ref)
        try:
            write_atomic(self.directory / name, json.dumps(record).encode(), durable=False)
        except OSError as e:
            log.warning("resolution_write_failed", ref=ref, error=describe_error(e))
            return
        victims: list[str] = []
        with self._lock:
            self._names.pop(name, None)
            self._names[name] = None
            while len(self._names) > self.max_entries:
                victims.append(self._names.popitem(last=False)[0])
        for victim in victims:
            with contextlib.suppress(OSError):
                os.unlink(self.directory / victim)

    def load(self, ref: str, reference: Reference) -> ResolvedImage | None:
        """The stored resolution of *ref*, re-verified; None when there is none or it is bad
        (then it is deleted)."""
        name = self._name(ref)
        try:
            data = (self.directory / name).read_bytes()
        except OSError:
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
            self._discard(ref, name)
            return None

    def _discard(self, ref: str, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)
            self._saved.pop(ref, None)
        with contextlib.suppress(OSError):
            os.unlink(self.directory / name)
