"""One atomic file write: a temporary file in the target's directory, then ``os.replace``.

Readers see either the old file or the whole new one, never a part. With ``durable=True`` the
data and the directory entry are fsynced, so the new file also survives a power loss; without
it (cache entries that can be fetched again) a crash may lose the file but never leaves a torn
one under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Union

PathLike = Union[str, "os.PathLike[str]"]

TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".partial"


def fsync_dir(path: PathLike) -> None:
    """fsync a directory (makes a rename in it durable); errors are ignored (not every
    filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(
    path: PathLike, *, durable: bool, mode: int | None = None, prefix: str = TMP_PREFIX
) -> Iterator[BinaryIO]:
    """Yields a binary file; when the block ends without an exception the file replaces
    *path*, otherwise it is removed. *mode* sets the permission bits (default: mkstemp's 0600).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=TMP_SUFFIX)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def write_atomic(path: PathLike, data: bytes, *, durable: bool, mode: int | None = None) -> None:
    """Write *data* to *path* atomically (see :func:`atomic_output`)."""
    with atomic_output(path, durable=durable, mode=mode) as f:
        f.write(data)
