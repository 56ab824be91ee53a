"""Path lookups in the merged view of an image's layers, for the dependency prefetch.

The container sees the image's layers stacked by overlayfs; a library or a Python module it
reads may live in any of them, behind symlinks in any path component (``/lib64`` -> ``usr/lib64``
in one layer, the file itself in another). :class:`StackView` answers "which file of which
layer would the container read at this path" closely enough to fetch it ahead: the top-most
layer with an entry wins, a whiteout hides what is below, symlinks are followed in every
component (a bounded number of times). Opaque directories are not honoured: at worst a file of
a lower layer the container cannot see is fetched for nothing.

Only in-memory TOC index lookups; thread-safe (the caches are filled idempotently).
"""

from __future__ import annotations

import posixpath
import stat
import threading
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from layerstore.estargz.toc import TOCIndex

_MAX_HOPS = 24
_MAX_LISTINGS = 4096


class LayerLike(Protocol):
    @property
    def compressed_digest(self) -> str: ...

    @property
    def identity(self) -> str: ...

    @property
    def index(self) -> TOCIndex: ...


class Found(NamedTuple):
    layer: LayerLike
    ino: int
    path: str
    """Canonical path (no symlink in it, no leading slash)."""
    mode: int


def _is_whiteout(index: TOCIndex, ino: int) -> bool:
    a = index.getattr(ino)
    return stat.S_ISCHR(a.mode) and a.rdev == 0


class StackView:
    """The merged view of *layers* (top first)."""

    def __init__(self, layers: Sequence[LayerLike]) -> None:
        self.layers = list(layers)
        self._lock = threading.Lock()
        self._listings: dict[str, dict[str, Found]] = {}

    def _entry(self, path: str) -> Found | None:
        """The top-most entry at the exact *path* (its components are not followed)."""
        for layer in self.layers:
            ino = layer.index.find(path)
            if ino is None:
                continue
            if _is_whiteout(layer.index, ino):
                return None
            return Found(layer, ino, path, layer.index.getattr(ino).mode)
        return None

    def resolve(self, path: str, follow: bool = True) -> Found | None:
        """The entry at *path*, following symlinks in every component (and in the last one
        when *follow*)."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        done: list[str] = []
        hops = 0
        found: Found | None = None
        i = 0
        while i < len(parts):
            comp = parts[i]
            if comp == "..":
                if done:
                    done.pop()
                i += 1
                found = None
                continue
            cur = "/".join([*done, comp])
            found = self._entry(cur)
            if found is None:
                return None
            last = i == len(parts) - 1
            if stat.S_ISLNK(found.mode) and (follow or not last):
                hops += 1
                if hops > _MAX_HOPS:
                    return None
                try:
                    target = found.layer.index.readlink(found.ino)
                except (KeyError, ValueError):
                    return None
                rest = parts[i + 1 :]
                base = [] if target.startswith("/") else done
                parts = [*base, *[p for p in target.split("/") if p not in ("", ".")], *rest]
                done = []
                i = 0
                found = None
                continue
            if not last and not stat.S_ISDIR(found.mode):
                return None
            done.append(comp)
            i += 1
        if found is None:  # the root, or a path ending in ".."
            joined = "/".join(done)
            return self._entry(joined) if joined else None
        return found

    def file(self, path: str) -> Found | None:
        """The regular file *path* names, symlinks followed."""
        f = self.resolve(path)
        return f if f is not None and stat.S_ISREG(f.mode) else None

    def realdir(self, path: str) -> str | None:
        """The canonical path of the directory *path* names ("" for the root)."""
        if path.strip("/") in ("", "."):
            return ""
        f = self.resolve(path)
        return f.path if f is not None and stat.S_ISDIR(f.mode) else None

    def listdir(self, canonical: str) -> dict[str, Found]:
        """The merged entries of the directory at the canonical path (whiteouts applied, not
        followed); empty when it is not a directory anywhere."""
        with self._lock:
            hit = self._listings.get(canonical)
        if hit is not None:
            return hit
        out: dict[str, Found] = {}
        hidden: set[str] = set()
        for layer in self.layers:
            ino = layer.index.find(canonical)
            if ino is None or not layer.index.is_dir(ino):
                if ino is not None:  # a file or whiteout hides the directories below
                    break
                continue
            for name, child in layer.index.readdir(ino):
                if name in out or name in hidden:
                    continue
                if _is_whiteout(layer.index, child):
                    hidden.add(name)
                    continue
                path = f"{canonical}/{name}" if canonical else name
                out[name] = Found(layer, child, path, layer.index.getattr(child).mode)
        with self._lock:
            if len(self._listings) < _MAX_LISTINGS:
                self._listings[canonical] = out
        return out

    def dirname(self, path: str) -> str:
        return posixpath.dirname(path.strip("/"))
