"""OCI content digests (``algorithm:hex``); sha256 is the only algorithm we accept."""

from __future__ import annotations

import hashlib
import re

from layerstore.errors import DigestError

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def validate(digest: str) -> str:
    """Return *digest* if it is a well-formed ``sha256:<64 lowercase hex>`` digest."""
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise DigestError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return digest


def is_valid(digest: str) -> bool:
    return isinstance(digest, str) and _SHA256.fullmatch(digest) is not None


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hex_part(digest: str) -> str:
    return validate(digest)[len("sha256:") :]
