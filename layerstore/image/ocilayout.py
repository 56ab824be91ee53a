"""OCI image layout directories (``oci-layout``, ``index.json``, ``blobs/sha256/...``).

Used by ``stargz-store convert`` for the ``oci:DIR[:TAG]`` transport (skopeo's syntax: the
directory ends at the first ``:``). Tags are the ``org.opencontainers.image.ref.name``
annotation of the descriptors in ``index.json``. Blobs are written atomically (temporary file in
the layout, fsync, rename) after their sha256 has been checked; ``index.json`` likewise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from layerstore.common.atomicfile import TMP_PREFIX, TMP_SUFFIX, fsync_dir, write_atomic
from layerstore.digest import hex_part, is_valid, sha256_digest, validate
from layerstore.errors import DigestError, LayerStoreError, ManifestError, VerificationError
from layerstore.registry.manifest import OCI_INDEX

__all__ = [
    "REF_NAME_ANNOTATION",
    "OCILayout",
    "OCILayoutError",
    "parse_oci_reference",
]

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"
MAX_INDEX_SIZE = 4 << 20
_COPY_PIECE = 1 << 20


class OCILayoutError(LayerStoreError):
    """The directory is not a usable OCI image layout, or the tag is not in it."""


def parse_oci_reference(text: str) -> tuple[str, str | None]:
    """``DIR[:TAG]`` (the part after ``oci:``) -> (directory, tag or None)."""
    directory, sep, tag = text.partition(":")
    if not directory:
        raise OCILayoutError(f"oci:{text}: no directory given")
    if sep and not tag:
        raise OCILayoutError(f"oci:{text}: empty tag after ':'")
    return directory, (tag if sep else None)


class OCILayout:
    """One OCI image layout directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # --- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> OCILayout:
        """An existing layout; raises :class:`OCILayoutError` when *root* is not one."""
        layout = cls(root)
        marker = layout.root / "oci-layout"
        if not layout.root.is_dir():
            raise OCILayoutError(f"{layout.root}: no such directory")
        try:
            data = json.loads(marker.read_bytes())
        except FileNotFoundError:
            raise OCILayoutError(
                f"{layout.root}: not an OCI image layout (no oci-layout file)"
            ) from None
        except (OSError, ValueError) as e:
            raise OCILayoutError(f"{marker}: unreadable: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("imageLayoutVersion"), str):
            raise OCILayoutError(f"{marker}: no imageLayoutVersion")
        layout.index()  # validates index.json
        return layout

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> OCILayout:
        """Open *root* as a layout, creating an empty one when the directory is missing or
        empty. A non-empty directory that is not a layout is refused."""
        layout = cls(root)
        r = layout.root
        if r.exists() and not r.is_dir():
            raise OCILayoutError(f"{r}: exists and is not a directory")
        if r.is_dir() and (r / "oci-layout").exists():
            return cls.open(r)
        if r.is_dir() and any(r.iterdir()):
            raise OCILayoutError(f"{r}: not empty and not an OCI image layout")
        try:
            (r / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            layout._write_atomic(
                r / "oci-layout", json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()
            )
            if not (r / "index.json").exists():
                layout._write_index({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        except OSError as e:
            raise OCILayoutError(f"{r}: cannot create an OCI layout: {e}") from None
        return layout

    # --- index.json ---------------------------------------------------------------------------
    def index(self) -> dict[str, Any]:
        path = self.root / "index.json"
        try:
            with open(path, "rb") as f:
                body = f.read(MAX_INDEX_SIZE + 1)
        except FileNotFoundError:
            raise OCILayoutError(f"{self.root}: no index.json") from None
        except OSError as e:
            raise OCILayoutError(f"{path}: unreadable: {e}") from None
        if len(body) > MAX_INDEX_SIZE:
            raise OCILayoutError(f"{path}: larger than {MAX_INDEX_SIZE} bytes")
        try:
            idx = json.loads(body)
        except ValueError as e:
            raise OCILayoutError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(idx, dict) or not isinstance(idx.get("manifests", []), list):
            raise OCILayoutError(f"{path}: not an image index")
        for d in idx.get("manifests", []):
            if not isinstance(d, dict) or not is_valid(d.get("digest", "")):
                raise OCILayoutError(f"{path}: invalid descriptor {d!r}")
        return idx

    def _write_index(self, idx: dict[str, Any]) -> None:
        self._write_atomic(self.root / "index.json", json.dumps(idx, indent=None).encode())

    def tags(self) -> list[str]:
        out = []
        for d in self.index().get("manifests", []):
            name = (d.get("annotations") or {}).get(REF_NAME_ANNOTATION)
            if isinstance(name, str):
                out.append(name)
        return out

    def resolve(self, tag: str | None) -> dict[str, Any]:
        """The descriptor in index.json for *tag*; without a tag, the only descriptor."""
        manifests = self.index().get("manifests", [])
        if tag is None:
            if len(manifests) == 1:
                return dict(manifests[0])
            if not manifests:
                raise OCILayoutError(f"{self.root}: the layout holds no image")
            raise OCILayoutError(
                f"{self.root}: holds {len(manifests)} images; name one with oci:DIR:TAG "
                f"(tags: {', '.join(self.tags()) or 'none'})"
            )
        found = [
            d for d in manifests if (d.get("annotations") or {}).get(REF_NAME_ANNOTATION) == tag
        ]
        if not found:
            raise OCILayoutError(
                f"{self.root}: no image tagged {tag!r} (tags: {', '.join(self.tags()) or 'none'})"
            )
        return dict(found[-1])

    def set_ref(self, descriptor: dict[str, Any], tag: str | None) -> None:
        """Add *descriptor* to index.json, under *tag* (replacing that tag's old entry)."""
        desc = dict(descriptor)
        annotations = dict(desc.get("annotations") or {})
        if tag is not None:
            annotations[REF_NAME_ANNOTATION] = tag
        else:
            annotations.pop(REF_NAME_ANNOTATION, None)
        if annotations:
            desc["annotations"] = annotations
        else:
            desc.pop("annotations", None)
        idx = self.index()
        kept = []
        for d in idx.get("manifests", []):
            name = (d.get("annotations") or {}).get(REF_NAME_ANNOTATION)
            if tag is not None and name == tag:
                continue
            if tag is None and name is None and d.get("digest") == desc["digest"]:
                continue
            kept.append(d)
        kept.append(desc)
        idx["manifests"] = kept
        idx.setdefault("schemaVersion", 2)
        self._write_index(idx)

    # --- blobs --------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        try:
            return self.root / "blobs" / "sha256" / hex_part(digest)
        except DigestError as e:
            raise OCILayoutError(str(e)) from None

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        path = self.blob_path(digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise OCILayoutError(f"{self.root}: blob {digest} is missing") from None
        except OSError as e:
            raise OCILayoutError(f"{path}: unreadable: {e}") from None

    def read_blob(self, digest: str, max_size: int) -> bytes:
        """A whole blob of at most *max_size* bytes, verified against *digest*."""
        with self.open_blob(digest) as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise ManifestError(f"blob {digest} is larger than {max_size} bytes")
        actual = sha256_digest(data)
        if actual != digest:
            raise VerificationError(f"{self.root}: blob {digest} is corrupt (content is {actual})")
        return data

    def write_blob(self, data: bytes, expected_digest: str | None = None) -> str:
        """Store *data*; returns its digest (checked against *expected_digest* if given)."""
        actual = sha256_digest(data)
        if expected_digest is not None and validate(expected_digest) != actual:
            raise VerificationError(f"blob to write is {actual}, expected {expected_digest}")
        path = self.blob_path(actual)
        if not path.is_file():
            self._write_atomic(path, data)
        return actual

    def staging_file(self) -> tuple[BinaryIO, str]:
        """An open temporary file inside the layout (same file system as the blobs) and its
        path; pass the path to :meth:`commit_staged` or delete it."""
        d = self.root / "blobs" / "sha256"
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)
        return os.fdopen(fd, "w+b"), tmp

    def commit_staged(self, tmp_path: str, expected_digest: str) -> None:
        """Verify the staged file's sha256 and rename it into place, durably (the staged file
        is written by the caller, so :func:`~layerstore.common.atomicfile.atomic_output` does
        not fit; the steps are the same)."""
        validate(expected_digest)
        h = hashlib.sha256()
        try:
            with open(tmp_path, "rb") as f:
                for piece in iter(lambda: f.read(_COPY_PIECE), b""):
                    h.update(piece)
                os.fsync(f.fileno())
            actual = "sha256:" + h.hexdigest()
            if actual != expected_digest:
                raise VerificationError(f"staged blob is {actual}, expected {expected_digest}")
            os.replace(tmp_path, self.blob_path(expected_digest))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            raise
        fsync_dir(self.blob_path(expected_digest).parent)

    def copy_blob_from(self, src: BinaryIO, expected_digest: str) -> None:
        """Stream *src* into the layout as blob *expected_digest* (verified)."""
        if self.has_blob(expected_digest):
            return
        f, tmp = self.staging_file()
        try:
            with f:
                shutil.copyfileobj(src, f, _COPY_PIECE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.commit_staged(tmp, expected_digest)

    def blobs(self) -> Iterator[str]:
        d = self.root / "blobs" / "sha256"
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if len(p.name) == 64 and not p.name.startswith("."):
                    yield "sha256:" + p.name

    # --- helpers ------------------------------------------------------------------------------
    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, durable=True)
