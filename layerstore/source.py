"""Random-access byte sources: the one small interface every reader of a blob uses.

A source is a local file now, an HTTP range reader later (``layerstore.registry.client``). Offsets
are
absolute blob offsets; a read past the end is an error, never a short answer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from layerstore.errors import FormatError


@runtime_checkable
class RangeSource(Protocol):
    """A blob readable at arbitrary offsets. Implementations must be thread-safe."""

    def size(self) -> int:
        """Total blob size in bytes."""
        ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly *length* bytes at *offset*; raise if the range is not inside the blob."""
        ...

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(offset, length)`` ranges at once (one request where the source can)."""
        ...


def check_range(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise FormatError(f"range {offset}+{length} is outside the blob of {size} bytes")


class FileSource:
    """A :class:`RangeSource` over a local file, using ``os.pread`` (thread-safe, no seek)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self._closed = False

    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(offset, length, self._size)
        parts: list[bytes] = []
        done = 0
        while done < length:
            piece = os.pread(self._fd, length - done, offset + done)
            if not piece:
                raise FormatError(f"file ended at {offset + done}, expected {offset + length}")
            parts.append(piece)
            done += len(piece)
        return b"".join(parts)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self.read_at(off, ln) for off, ln in ranges]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BytesSource:
    """A :class:`RangeSource` over bytes in memory (tests, small blobs)."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        check_range(offset, length, len(self._data))
        return self._data[offset : offset + length]

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self.read_at(off, ln) for off, ln in ranges]
