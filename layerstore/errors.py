"""The layerstore exception tree.

Every error raised by this package derives from :class:`LayerStoreError`. The FUSE adapter maps
the branches to errno values at its boundary (see ``stargz_store.fusefs``); nothing below it
knows about errno.
"""

from __future__ import annotations


class LayerStoreError(Exception):
    """Base of every layerstore error."""


# --- format: eStargz reading and writing --------------------------------------------------------
class FormatError(LayerStoreError):
    """The blob is not a well-formed eStargz / stargz layer (footer, TOC, names, limits)."""


class NotEStargzError(FormatError):
    """The blob has no eStargz or stargz footer: an ordinary layer."""


class TOCError(FormatError):
    """The TOC is malformed, too large, or has unacceptable entries."""


class LimitExceededError(TOCError):
    """A size or count limit was exceeded (TOC bytes, entries, name length, depth)."""


class VerificationError(LayerStoreError):
    """Bytes did not match their expected digest. Such bytes are never returned."""


class TOCDigestMismatchError(VerificationError):
    """The TOC's sha256 differs from the expected TOC digest."""


class ChunkDigestMismatchError(VerificationError):
    """A chunk's sha256 differs from its ``chunkDigest``."""


class DigestError(LayerStoreError, ValueError):
    """A string is not a valid OCI digest."""


# --- references, manifests, registries ----------------------------------------------------------
class ReferenceError_(LayerStoreError, ValueError):
    """An image reference could not be parsed."""


class ManifestError(LayerStoreError):
    """A manifest, index or config is malformed, unsupported or too large."""


class RegistryError(LayerStoreError):
    """A registry answered with an error or an invalid response."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(RegistryError):
    """The registry refused our credentials (401/403 after authenticating)."""


class NotFoundError(RegistryError):
    """The registry has no such repository, manifest or blob."""


class BlockedRegistryError(RegistryError):
    """registries.conf marks the registry as blocked."""


class RangeError(RegistryError):
    """A range response was short, overlong, or carried a wrong Content-Range."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached (connection refused, timeout) after retries."""


class DeadlineExceededError(RegistryUnavailableError):
    """A registry request (connect, headers and whole body, retries included) did not finish
    within its total deadline: the registry is too slow, or sends a byte now and then."""


# --- layers and the cache ----------------------------------------------------------------------
class LayerNotFoundError(LayerStoreError):
    """The image has no layer with the requested key."""


class CacheError(LayerStoreError):
    """The on-disk cache failed (I/O error, corrupt entry)."""


# Friendlier public name; the trailing underscore avoids shadowing the builtin ReferenceError.
ImageReferenceError = ReferenceError_
