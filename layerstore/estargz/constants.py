"""eStargz protocol names, defined once. A leaf module: any package may import it.

Sources: the Go reference (containerd/stargz-snapshotter ``estargz/types.go``) and the
containers/storage lookup contract (``../shared/notes/``).
"""

from __future__ import annotations

# --- the blob -----------------------------------------------------------------------------------
TOC_TAR_NAME = "stargz.index.json"
"""The last tar entry of an eStargz blob: the TOC JSON."""

PREFETCH_LANDMARK = ".prefetch.landmark"
"""Follows the prioritized files: blob bytes ``[0, its offset)`` hold all of them."""

NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
"""First entry of a blob that has no prioritized files."""

LANDMARK_CONTENT = b"\x0f"
"""The one-byte content of either landmark file."""

RESERVED_ROOT_NAMES = frozenset((TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK))
"""Root entries the format itself writes: the writer drops them from its input, and the overlay
view hides them (as regular files at the root)."""

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47

MAX_TOC_JSON_SIZE = 150 << 20
"""The largest TOC JSON readers accept (containers/storage refuses more): our reader's default
cap, and the writer refuses to write a larger one."""

# --- annotations on the layer descriptor --------------------------------------------------------
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
"""sha256 of the uncompressed TOC JSON; podman >= 5.1 asks for layers by this digest."""

UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
"""The layer's decompressed (tar) size, as a decimal string."""

PREFETCH_SIZE_ANNOTATION = "io.stargz-store.prefetch-size"
"""Ours (written by ``stargz-store convert``/``optimize``, read by the store): the blob offset
of the ``.prefetch.landmark`` entry, i.e. the compressed size of the prioritized region, as a
decimal string. A hint only (the TOC says the same once it is read): the store starts fetching
that region when the manifest arrives instead of after the TOC (``runtime.headstart``)."""

ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.manifest-checksum"
"""The TOC-digest key of zstd:chunked layers (which this store does not serve)."""

# --- overlayfs conventions inside diff/ ---------------------------------------------------------
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
"""xattrs overlayfs reads from its lower layers (opaque, redirect, metacopy, origin, whiteout...).
An image must not steer the overlay mount it is part of: ``diff/`` shows none of them from the
image, only the opaque marker the store derives from ``.wh..wh..opq``."""
