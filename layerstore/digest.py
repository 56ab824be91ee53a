"""OCI content digests (``algorithm:hex``); sha256 is the only algorithm we accept."""

from __future__ import annotations

import hashlib
import re

from layerstore.errors import DigestError

SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
"""The one digest grammar of the project (use with ``fullmatch``): the OCI ``sha256`` form,
lowercase hex only, which is also the only form containers/storage uses for layer keys."""


def validate(digest: str) -> str:
    """Return *digest* if it is a well-formed ``sha256:<64 lowercase hex>`` digest."""
    if not isinstance(digest, str) or not SHA256_DIGEST.fullmatch(digest):
        raise DigestError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return digest


def is_valid(digest: str) -> bool:
    return isinstance(digest, str) and SHA256_DIGEST.fullmatch(digest) is not None


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hex_part(digest: str) -> str:
    return validate(digest)[len("sha256:") :]
