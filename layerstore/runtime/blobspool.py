"""Disk space for whole-blob copies behind the ``blob`` file.

Why: the ``blob`` file (read by ``podman push`` and ``podman save``) must serve only bytes the
blob digest covers, and that digest is known to match only once the whole blob has been read.
So a layer fetches the whole blob into a spool file, verifying it as it goes
(:class:`~layerstore.runtime.blobcheck.BlobVerifier`), and serves reads from that file
afterwards (``Layer.read_blob``). Its readers read it whole anyway.

A :class:`BlobSpool` is the directory and the disk budget those files share:

* files are created in ``directory`` (under the daemon's ``--root``) and unlinked at once: the
  open descriptor is the only reference, so the space comes back when the layer closes it (idle,
  dropped, daemon exit or crash) and nothing is ever left behind;
* ``reserve(n)`` / ``release(n)`` keep the sum of the blobs being spooled or spooled under
  ``max_bytes``; a blob that does not fit is refused (the reader gets EIO) rather than filling
  the disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import structlog

from layerstore.errors import CacheError

log = structlog.get_logger(__name__)

_PREFIX = "blob-"


class BlobSpool:
    """Thread-safe."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._used = 0
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create {self.directory}: {e}") from e
        # Files are unlinked as soon as they are created; a name here is from a crash between
        # the two calls.
        with contextlib.suppress(OSError), os.scandir(self.directory) as it:
            for d in it:
                if d.name.startswith(_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(d.path)

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def reserve(self, n: int) -> None:
        """Count *n* bytes against the budget, or raise :class:`CacheError`."""
        with self._lock:
            if self._used + n > self.max_bytes:
                raise CacheError(
                    f"blob spool full: {n} bytes wanted, {self._used} of {self.max_bytes} in use"
                )
            self._used += n

    def release(self, n: int) -> None:
        with self._lock:
            self._used = max(0, self._used - n)

    def open_file(self) -> int:
        """A new, already unlinked, read-write file; the caller owns the descriptor."""
        try:
            fd, path = tempfile.mkstemp(prefix=_PREFIX, dir=self.directory)
        except OSError as e:
            raise CacheError(f"cannot create a spool file in {self.directory}: {e}") from e
        try:
            os.unlink(path)
        except OSError as e:
            os.close(fd)
            raise CacheError(f"cannot unlink spool file {path}: {e}") from e
        return fd
