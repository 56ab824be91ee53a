"""Read-triggered dependency prefetch: when a container reads a shared object or a Python
module, fetch what it will read next, in a few parallel requests.

Why: a cold container start is a chain of reads, each of which names the next: the loader maps
the libraries in ``DT_NEEDED`` one after the other, then each of theirs; Python imports a module,
runs it, and it imports the next. On a cold layer each link of the chain is a round trip. The
bytes already read name the next links, so fetching them at once turns a chain of N serial
misses into about one round trip per *level* of the dependency graph, run ahead of the reader.

What, for every regular file read from offset 0 (:meth:`DependencyFetcher.file_read`, called by
:class:`~layerstore.runtime.layer.Layer`), once per file:

* an ELF file (by its magic): its ``PT_INTERP`` and ``DT_NEEDED`` libraries, looked up like the
  loader does (``DT_RPATH`` when there is no ``DT_RUNPATH``, then ``DT_RUNPATH``, ``$ORIGIN``
  expanded, then the usual library directories); a large file whose dynamic segment is not in
  its first chunk gets those chunks fetched, then is scanned again;
* a ``.py`` or ``.pyc`` file: its module-level imports (:mod:`layerstore.runtime.pyimports`),
  resolved like Python's path finder in the image's ``sys.path``-like directories (the standard
  library and site/dist-packages directories present in the image, plus the root of every
  package read), relative imports in the file's package; each package's ``__init__`` on the
  way, the ``__pycache__`` bytecode of the interpreter's cache tag when there is one (else the
  source), extension modules (``.so``).

Files found are fetched in groups of at most ``group_bytes`` (the blob-adjacent files of one
layer share a request), up to ``concurrency`` requests at once, without the fetcher's read-ahead;
each group is scanned in turn as soon as it arrives, recursively, within per-image budgets
(``max_files``, ``max_bytes``). Lookups see the merged view of the image's layers
(:class:`~layerstore.runtime.stackview.StackView`), so a module in one layer importing one in
another is followed.

Best effort throughout: nothing here raises to a reader, errors are logged, a reader that needs
a chunk being prefetched waits for that fetch instead of starting another (the fetcher's
single flight), and the prefetch holds back the background fill like any foreground fetch.
"""

from __future__ import annotations

import posixpath
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, cast

import structlog

from layerstore.common.redact import describe_error
from layerstore.estargz.toc import Chunk
from layerstore.runtime.elfdeps import LIBRARY_DIRS, elf_info
from layerstore.runtime.layer import Layer
from layerstore.runtime.pyimports import (
    MAX_PYC_BYTES,
    MAX_SOURCE_BYTES,
    dotted_names_in_binary,
    scan_pyc,
    scan_source,
)
from layerstore.runtime.stackview import Found, StackView

log = structlog.get_logger(__name__)

KiB = 1024
MiB = 1024 * KiB


PYTHON_PREFIXES = ("usr/local/lib", "usr/lib", "opt/conda/lib", "usr/lib64", "usr/local/lib64")
FROZEN_311 = frozenset(
    (
        "_collections_abc",
        "_sitebuiltins",
        "abc",
        "codecs",
        "genericpath",
        "importlib.machinery",
        "importlib.util",
        "io",
        "ntpath",
        "os",
        "os.path",
        "posixpath",
        "runpy",
        "site",
        "stat",
        "zipimport",
    )
)
"""Standard-library modules CPython 3.11 and later run from frozen copies at start-up: the
files are not read."""

MAX_PENDING = 4096
"""Reads of new files are not scanned while this many prefetch tasks wait (a reader sweeping
through a whole layer must not queue work without bound)."""
LAYERS_WAIT = 30.0
"""Seconds a scan waits for the image's other layers being built (their TOCs), so that names
in lower or upper layers are found."""

_PY_DIR = re.compile(r"python3\.(\d+)\Z")
_EXT_MODULE = re.compile(r"\.(cpython-[^/]*|abi3)\.so\Z")
_TAG = re.compile(r"\.(cpython-3\d+)\.pyc\Z")


@dataclass(frozen=True)
class DependencyFetchSettings:
    enabled: bool = True
    max_files: int = 8192
    """Files fetched per image (layer stack), all triggers together."""
    max_bytes: int = 512 * MiB
    """Compressed bytes fetched per image."""
    file_bytes: int = 8 * MiB
    """Files up to this many compressed bytes are fetched whole; a larger shared object gets
    the chunks the loader reads first (headers, dynamic segment)."""
    group_bytes: int = 512 * KiB
    """Compressed bytes of one request: a reader waiting for one file of a group waits for the
    whole group, so groups stay about one bandwidth-delay product."""
    concurrency: int = 4
    """Requests (and scans) in flight at once; the fetcher's foreground limit is shared with
    readers, so this stays below it."""
    judge_reads: int = 16
    """The fetch's guesses are judged per layer over the last this many first reads of files
    it could have fetched (Python modules, shared objects, programs): a hit is a read of a
    file it queued, or of one that was in the cache before (another prefetch fetched it). A
    container importing its modules reads mostly such files (plain numpy/scipy and pandas
    starts: 50-70% of them, counting only the files this fetch queued); a reader picking
    files at random (a crawler, a backup, ``find -exec``) reads almost none of them (the
    filesystem benchmark's random reads: 3 of 64), and each of its reads of a module brings
    that module's imports, dozens of files the reader never asks for, whose requests compete
    with its own misses for the link."""
    min_hit_rate: float = 0.25
    """Below this share of hits over ``judge_reads`` reads, the fetch pauses for the layer:
    its reads trigger nothing and no file of it is fetched."""
    pause_seconds: float = 30.0
    """How long a pause lasts; the hit rate is then judged afresh."""


class Stacks(Protocol):
    """What the dependency fetch needs of the manager."""

    def stacks_of(self, layer: Layer, wait: float = 0.0) -> list[Sequence[Layer]]:
        """The layer stacks (top first) of the images that contain *layer*, after waiting up
        to *wait* seconds for the image's layers being built."""
        ...


_PY_EXE = re.compile(r"python(3\.\d+)\Z")
_LIBPYTHON = re.compile(r"libpython(3\.\d+)")


def _python_version(path: str, needed: Sequence[str]) -> str | None:
    """``"3.11"`` when the ELF file at *path* is a CPython interpreter (by its name, or the
    ``libpython`` it links), else None."""
    m = _PY_EXE.search(posixpath.basename(path))
    if m:
        return m.group(1)
    for n in needed:
        m = _LIBPYTHON.match(n)
        if m:
            return m.group(1)
    return None


def _may_name_others(layer: Layer, ino: int) -> bool:
    """Whether file *ino* can be one this module reads names from: Python source or bytecode,
    a shared object (by name), or an executable file (an ELF program). In-memory checks only:
    any other file read costs the dependency fetch nothing."""
    try:
        mode = layer.index.getattr(ino).mode
        path = layer.index.path_of(ino) or ""
    except (KeyError, ValueError):
        return False
    if not stat.S_ISREG(mode):
        return False
    base = posixpath.basename(path)
    return base.endswith((".py", ".pyc", ".so")) or ".so." in base or bool(mode & 0o111)


def _source_of(img: _Image, pyc_path: str) -> Found | None:
    """The source ``d/m.py`` of ``d/__pycache__/m.<tag>.pyc``, if present."""
    d, base = posixpath.split(pyc_path)
    if posixpath.basename(d) != "__pycache__":
        return None
    src = img.view.listdir(posixpath.dirname(d)).get(base.split(".", 1)[0] + ".py")
    return src if src is not None and stat.S_ISREG(src.mode) else None


def _reads_source(pyc: bytes, src: Found) -> bool:
    """Whether CPython reads the source *src* when it imports the bytecode *pyc*: a
    timestamp-based file whose recorded source mtime or size differs, or a hash-based file
    that is checked against its source."""
    if len(pyc) < 16:
        return True
    flags = int.from_bytes(pyc[4:8], "little")
    if flags & 1:  # hash-based: read when checked
        return bool(flags & 2)
    attr = src.layer.index.getattr(src.ino)
    mtime = int.from_bytes(pyc[8:12], "little")
    size = int.from_bytes(pyc[12:16], "little")
    return mtime != (attr.mtime_ns // 1_000_000_000) & 0xFFFFFFFF or size != attr.size & 0xFFFFFFFF


def _layer(f: Found) -> Layer:
    return cast(Layer, f.layer)


def _size(chunks: Sequence[Chunk]) -> int:
    return sum(c.compressed_end - c.offset for c in chunks)


class _Target:
    """A file to fetch (some or all of its chunks) and then scan."""

    __slots__ = ("chunks", "found", "read", "rescan")

    def __init__(
        self, found: Found, chunks: Sequence[Chunk], rescan: bool = False, read: bool = False
    ) -> None:
        self.found = found
        self.chunks = chunks  # fetched for it (all of the file when a reader read it)
        self.rescan = rescan  # the second scan of an ELF file: its names are complete now
        self.read = read  # a reader read it (of an ELF file, only the first chunk is scanned)


class _Image:
    """State of one layer stack (an image in use)."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.view = StackView(layers)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.seen: set[tuple[str, int]] = set()  # (digest, ino) scanned or queued
        self.files = 0
        self.bytes = 0
        self.tags: list[str] = []  # Python cache tags ("cpython-311"), learned first
        self.learned: list[str] = []  # import roots learned from files read
        self._roots: list[str] | None = None
        self._ext: dict[str, dict[str, Found]] = {}
        # Whether Python will read the source next to the bytecode (the bytecode's recorded
        # source mtime or size differs from the source's: images built with normalized
        # mtimes): None until a bytecode file next to its source was scanned.
        self.stale_pyc: bool | None = None
        self._tops: tuple[tuple[str, ...], frozenset[str]] | None = None

    def extensions(self, d: str, entries: dict[str, Found]) -> dict[str, Found]:
        """Extension modules of directory *d* by module name (``m.cpython-311-x86_64-linux-gnu.so``,
        ``m.abi3.so``, ``m.so``)."""
        with self.lock:
            hit = self._ext.get(d)
        if hit is not None:
            return hit
        out: dict[str, Found] = {}
        for n, fnd in entries.items():
            if n.endswith(".so") and stat.S_ISREG(fnd.mode):
                mod, _, rest = n[:-3].partition(".")
                if "." not in rest and mod not in out:
                    out[mod] = fnd
        with self.lock:
            if len(self._ext) < 4096:
                self._ext[d] = out
        return out

    def top_names(self, roots: list[str]) -> frozenset[str]:
        """Top-level module and package names found in *roots*."""
        key = tuple(roots)
        with self.lock:
            if self._tops is not None and self._tops[0] == key:
                return self._tops[1]
        names: set[str] = set()
        for r in roots:
            for n in self.view.listdir(r):
                names.add(n.split(".", 1)[0])
        tops = frozenset(names)
        with self.lock:
            self._tops = (key, tops)
        return tops

    def roots(self) -> list[str]:
        """``sys.path``-like directories: standard library, lib-dynload, then site and dist
        packages of every Python found in the image, then roots learned from reads."""
        if self._roots is None:
            stdlib: list[str] = []
            dyn: list[str] = []
            site: list[str] = []
            tags: list[str] = []
            for prefix in PYTHON_PREFIXES:
                real = self.view.realdir(prefix)
                if real is None:
                    continue
                for name in sorted(self.view.listdir(real)):
                    m = _PY_DIR.match(name)
                    if not m:
                        continue
                    base = self.view.realdir(f"{real}/{name}")
                    if base is None:
                        continue
                    tags.append(f"cpython-3{m.group(1)}")
                    stdlib.append(base)
                    for sub, dest in (
                        ("lib-dynload", dyn),
                        ("site-packages", site),
                        ("dist-packages", site),
                    ):
                        d = self.view.realdir(f"{base}/{sub}")
                        if d is not None:
                            dest.append(d)
            debian = self.view.realdir("usr/lib/python3/dist-packages")
            if debian is not None:
                site.append(debian)
            with self.lock:
                for t in tags:
                    if t not in self.tags:
                        self.tags.append(t)
            self._roots = list(dict.fromkeys(stdlib + dyn + site))
        with self.lock:
            return self._roots + [r for r in self.learned if r not in self._roots]


class _HitRate:
    """The last first reads of one layer's files the dependency fetch could have fetched:
    whether each was one it queued (under the fetcher's lock)."""

    __slots__ = ("paused_until", "window")

    def __init__(self, size: int) -> None:
        self.window: deque[bool] = deque(maxlen=max(1, size))
        self.paused_until = 0.0


class DependencyFetcher:
    """Thread-safe. One per :class:`~layerstore.runtime.manager.LayerManager`."""

    def __init__(self, stacks: Stacks, settings: DependencyFetchSettings | None = None) -> None:
        self._stacks = stacks
        self.settings = settings or DependencyFetchSettings()
        self._lock = threading.Lock()  # guards the fields below; a leaf
        self._triggered: set[tuple[str, int]] = set()  # files read (from offset 0) once
        self._queued: set[tuple[str, int]] = set()  # files queued for fetching, not read yet
        self._rates: dict[str, _HitRate] = {}  # layer identity -> its reads' hits
        self._images: dict[tuple[str, ...], _Image] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0  # tasks submitted and not finished
        self._closed = False
        self.stats = {
            "triggers": 0,
            "scanned": 0,
            "files": 0,
            "bytes": 0,
            "requests": 0,
            "judged_reads": 0,
            "hits": 0,
            "pauses": 0,
        }

    # --- entry points -----------------------------------------------------------------------
    def file_read(self, layer: Layer, ino: int, waited: bool = True) -> None:
        """A reader read file *ino* of *layer* from its start (*waited*: for chunks not in
        the cache). The first such read of a file is counted for the layer's hit rate; when
        it waited, the file's names are followed (unless the fetch is paused for the layer).
        Never blocks: the work is queued for the prefetch threads."""
        if not self.settings.enabled or layer.planned:
            return
        key = (layer.identity, ino)
        with self._lock:
            if key in self._triggered or self._closed:
                return
            if len(self._triggered) > 1_000_000:
                self._triggered.clear()
            self._triggered.add(key)
            hit = key in self._queued
            if hit:
                self._queued.discard(key)
            hit = hit or not waited
            busy = self._pending > MAX_PENDING
        if not _may_name_others(layer, ino):
            return
        if self._judge(layer, hit) or not waited or busy:
            return
        with self._lock:
            self.stats["triggers"] += 1
        self._submit(self._on_read, layer, ino)

    def _judge(self, layer: Layer, hit: bool) -> bool:
        """Count a first read of *layer* (*hit*: of a file a prefetch got first); True when the
        fetch is paused for the layer (now, or from now on: its guesses are not being read)."""
        st = self.settings
        now = time.monotonic()
        with self._lock:
            rate = self._rates.get(layer.identity)
            if rate is None:
                if len(self._rates) > 65_536:
                    self._rates.clear()
                rate = self._rates[layer.identity] = _HitRate(st.judge_reads)
            if rate.paused_until > now:
                return True
            rate.window.append(hit)
            self.stats["judged_reads"] += 1
            self.stats["hits"] += hit
            if len(rate.window) < st.judge_reads:
                return False
            hits = sum(rate.window)
            if hits >= st.min_hit_rate * len(rate.window):
                return False
            rate.window.clear()
            rate.paused_until = now + st.pause_seconds
            self.stats["pauses"] += 1
        log.info(
            "dependency_fetch_paused",
            digest=layer.compressed_digest,
            hits=hits,
            reads=st.judge_reads,
            seconds=st.pause_seconds,
        )
        return True

    def _paused(self, identity: str) -> bool:
        with self._lock:
            rate = self._rates.get(identity)
            return rate is not None and rate.paused_until > time.monotonic()

    def expect(self, layer: Layer, ino: int, args: Sequence[str] = (), workdir: str = "/") -> None:
        """File *ino* of *layer* is about to be run with arguments *args* in *workdir* (the
        image's entrypoint and default command, being fetched): queue what that alone says
        it will read, in parallel with its own fetch. For a Python interpreter: its start-up
        modules, and the script, ``-m`` module or ``-c`` code's imports. Never blocks."""
        if self.settings.enabled:
            self._submit(self._on_expect, layer, ino, list(args), workdir)

    def _on_expect(self, layer: Layer, ino: int, args: list[str], workdir: str) -> None:
        path = layer.index.path_of(ino)
        version = None if path is None else _python_version(path, [])
        if version is None:
            return
        stacks = self._stacks.stacks_of(layer, wait=LAYERS_WAIT) or [[layer]]
        for layers in stacks[:4]:
            img = self._image(layers)
            targets = self._python_startup(img, version)
            targets += self._python_command(img, args, workdir)
            if targets:
                self._fetch(img, targets, trigger=str(path))

    def _python_command(self, img: _Image, args: list[str], workdir: str) -> list[_Target]:
        """What ``python ARGS`` run in *workdir* imports first: the script, the ``-m`` module
        (and its ``__main__`` when it is a package) or the ``-c`` code's imports."""
        cwd = img.view.realdir(workdir)
        roots = img.roots()
        with img.lock:
            tags = list(img.tags)
        i = 0
        files: list[Found] = []
        while i < len(args):
            a = args[i]
            if a in ("-W", "-X", "--check-hash-based-pycs"):
                i += 2
                continue
            if a.startswith("-c") or a.startswith("-m"):
                arg = a[2:] or (args[i + 1] if i + 1 < len(args) else "")
                bases = ([cwd] if cwd is not None else []) + roots
                if a.startswith("-c"):
                    names = [
                        name
                        for imp in scan_source(arg)
                        if not imp.level
                        for name in [imp.module, *(f"{imp.module}.{n}" for n in imp.names)]
                    ]
                else:
                    names = [arg, arg + ".__main__"]
                for name in names:
                    if name:
                        got, _ = self._module_files(img, name, bases, tags, None)
                        files.extend(got)
                break
            if a == "-" or a == "--" or not a:
                break
            if a.startswith("-"):
                i += 1
                continue
            script = img.view.file(posixpath.join(workdir, a))
            if script is not None:
                files.append(script)
                real = posixpath.dirname(script.path)
                with img.lock:
                    if real not in img.learned:
                        img.learned.append(real)
            break
        out: list[_Target] = []
        for fnd in dict.fromkeys(files):
            out.extend(self._target(img, fnd, elf=fnd.path.endswith(".so")))
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            stats = dict(self.stats)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if stats["judged_reads"]:
            log.info("dependency_fetch_totals", **stats)

    def forget(self, identity: str) -> None:
        """Drop the state of the images that contain the layer *identity* (it was dropped)."""
        with self._lock:
            self._images = {k: v for k, v in self._images.items() if identity not in k}
            self._triggered = {k for k in self._triggered if k[0] != identity}
            self._queued = {k for k in self._queued if k[0] != identity}
            self._rates.pop(identity, None)

    # --- plumbing ---------------------------------------------------------------------------
    def _submit(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            if self._closed:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max(1, self.settings.concurrency), thread_name_prefix="stargz-dependency-fetch"
                )
            pool = self._pool
            self._pending += 1
        try:
            pool.submit(self._quietly, fn, *args)
        except RuntimeError:  # shutting down
            with self._lock:
                self._pending -= 1

    def _quietly(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except Exception as e:  # best effort: readers fetch what they need themselves
            log.warning("dependency_fetch_failed", error=describe_error(e))
        finally:
            with self._lock:
                self._pending -= 1

    def _image(self, layers: Sequence[Layer]) -> _Image:
        key = tuple(la.identity for la in layers)
        with self._lock:
            img = self._images.get(key)
            if img is None:
                img = self._images[key] = _Image(layers)
            return img

    def _on_read(self, layer: Layer, ino: int) -> None:
        path = layer.index.path_of(ino)
        if path is None:
            return
        stacks = self._stacks.stacks_of(layer, wait=LAYERS_WAIT) or [[layer]]
        for layers in stacks[:4]:
            img = self._image(layers)
            with img.lock:
                if (layer.identity, ino) in img.seen:
                    continue  # queued or scanned already (the prefetch got there first)
                img.seen.add((layer.identity, ino))
            mode = layer.index.getattr(ino).mode
            found = Found(layer, ino, path, mode)  # type: ignore[arg-type]
            log.debug("dependency_trigger", digest=layer.compressed_digest, path=path)
            target = _Target(found, layer.index.chunks(ino), read=True)
            self._scan_and_fetch(img, [target], trigger=path)

    # --- scanning ---------------------------------------------------------------------------
    def _scan_and_fetch(self, img: _Image, targets: list[_Target], trigger: str) -> None:
        """Scan *targets* (their chunks are cached or in flight), then queue the fetch of what
        they need that is not seen yet."""
        todo: list[_Target] = []
        for t in targets:
            try:
                todo.extend(self._deps(img, t))
            except Exception as e:  # an odd file: skip it
                log.debug("dependency_scan_failed", path=t.found.path, error=describe_error(e))
        if todo:
            self._fetch(img, todo, trigger)

    def _deps(self, img: _Image, t: _Target) -> list[_Target]:
        f = t.found
        layer = _layer(f)
        path = f.path
        chunks = t.chunks
        if not chunks:
            return []
        with self._lock:
            self.stats["scanned"] += 1
        if path.endswith(".py") or path.endswith(".pyc"):
            limit = MAX_SOURCE_BYTES if path.endswith(".py") else MAX_PYC_BYTES
            if layer.index.getattr(f.ino).size > limit:
                return []
            data = b"".join(layer.fetcher.get_chunks(chunks, speculate=False, reason="prefetch"))
            imports = scan_source(data) if path.endswith(".py") else scan_pyc(data)
            extra: list[_Target] = []
            m = _TAG.search(path)
            if m:
                with img.lock:
                    if m.group(1) not in img.tags:
                        img.tags.insert(0, m.group(1))
                src = _source_of(img, path)
                if src is not None:
                    stale = _reads_source(data, src)
                    with img.lock:
                        if img.stale_pyc is None or stale:
                            img.stale_pyc = stale
                    if stale:
                        extra = self._target(img, src, elf=False)
            return extra + self._python_targets(img, path, imports or [])
        # ELF: the chunks this target fetched (the first one when a reader read it)
        have = [c for c in chunks if c.chunk_offset == 0] if t.read else list(chunks)
        if not have or have[0].chunk_offset != 0:
            return []
        datas = layer.fetcher.get_chunks(have, speculate=False, reason="prefetch")
        if not datas or datas[0][:4] != b"\x7fELF":
            return []
        info = elf_info({c.chunk_offset: d for c, d in zip(have, datas)})
        later: list[_Target] = []
        if not t.rescan:
            # what the loader reads next (dynamic and writable segments, init code) and what
            # the names are in, when not fetched yet: fetched, then scanned again
            ranges = info.wants + info.early
            got = {c.chunk_offset for c in have}
            more = [
                c
                for c in layer.index.chunks(f.ino)
                if c.chunk_offset not in got
                and any(
                    c.chunk_offset < off + n and off < c.chunk_offset + max(c.chunk_size, 1)
                    for off, n in ranges
                )
            ]
            if more:
                with img.lock:
                    img.seen.discard((layer.identity, f.ino))  # let it be queued
                later = [_Target(f, [*have, *more], rescan=True)]
                if info.wants:
                    return later
        out = self._elf_targets(img, f, info.interp, info.needed, info.runpath or info.rpath)
        if _EXT_MODULE.search(f.path):
            out.extend(self._extension_imports(img, datas))
        version = _python_version(f.path, info.needed)
        if version is not None:
            out.extend(self._python_startup(img, version))
        return later + out

    def _extension_imports(self, img: _Image, datas: Sequence[bytes]) -> list[_Target]:
        """Modules a Python extension module imports by name from C (Cython's ``cimport``
        chains, ``PyImport_ImportModule``): the dotted names among its strings that name a
        module of the image."""
        roots = img.roots()
        tops = img.top_names(roots)
        with img.lock:
            tags = list(img.tags)
        stdlib = {r for r in roots if _PY_DIR.match(posixpath.basename(r))}
        files: list[Found] = []
        names: dict[str, None] = {}
        for data in datas:
            for name in dotted_names_in_binary(data):
                if name.split(".", 1)[0] in tops:
                    names[name] = None
        for name in names:
            got, _ = self._module_files(img, name, roots, tags, stdlib)
            files.extend(got)
        out: list[_Target] = []
        for fnd in dict.fromkeys(files):
            out.extend(self._target(img, fnd, elf=fnd.path.endswith(".so")))
        return out

    def _python_startup(self, img: _Image, version: str) -> list[_Target]:
        """What a CPython interpreter reads before running anything: the ``encodings``
        package for its file-system and standard-stream encodings (UTF-8), the ``.pth`` files
        of its site directories, ``sitecustomize``; before 3.11 also the modules ``site``
        imports (3.11 runs those from frozen copies)."""
        roots = img.roots()
        mine = [r for r in roots if posixpath.basename(r) == f"python{version}"] or [
            r for r in roots if _PY_DIR.match(posixpath.basename(r))
        ]
        site = [r for r in roots if posixpath.basename(r) in ("site-packages", "dist-packages")]
        with img.lock:
            tags = list(img.tags)
        tag = "cpython-" + version.replace(".", "")
        if tag in tags:
            tags.remove(tag)
        tags.insert(0, tag)
        names = ["encodings", "encodings.aliases", "encodings.utf_8", "sitecustomize"]
        minor = int(version.split(".", 1)[1]) if version.split(".", 1)[1].isdigit() else 0
        if minor < 11:
            names += sorted(n for n in FROZEN_311 if "." not in n)
        files: list[Found] = []
        for name in names:
            got, _ = self._module_files(img, name, mine + site, tags, None)
            files.extend(got)
        for d in site:
            for n, fnd in sorted(img.view.listdir(d).items()):
                if n.endswith(".pth") and stat.S_ISREG(fnd.mode):
                    files.append(fnd)
        out: list[_Target] = []
        for fnd in dict.fromkeys(files):
            out.extend(self._target(img, fnd, elf=False))
        return out

    def _elf_targets(
        self,
        img: _Image,
        f: Found,
        interp: str | None,
        needed: list[str],
        search: list[str],
    ) -> list[_Target]:
        origin = posixpath.dirname(f.path)
        dirs: list[str] = []
        for d in search:
            d = d.replace("${ORIGIN}", "$ORIGIN")
            if "$" in d.replace("$ORIGIN", ""):
                continue  # $LIB, $PLATFORM: not expanded
            d = d.replace("$ORIGIN", "/" + origin)
            if d.startswith("/"):
                dirs.append(posixpath.normpath(d).lstrip("/"))
        dirs.extend(LIBRARY_DIRS)
        # Not the loader's rule, but where it finds them in practice: a library without a
        # search path of its own next to the ones that need it (auditwheel's ".libs"
        # directories), found through the DT_RPATH of the object that loaded it.
        dirs.append(origin)
        out: list[_Target] = []
        names = ([interp] if interp else []) + needed
        for name in names:
            if not name or "\0" in name:
                continue
            found: Found | None = None
            if "/" in name:
                if name.startswith("/"):
                    found = img.view.file(name)
            else:
                for d in dirs:
                    found = img.view.file(f"{d}/{name}")
                    if found is not None:
                        break
            if found is not None:
                out.extend(self._target(img, found, elf=True))
        return out

    def _target(self, img: _Image, found: Found, elf: bool) -> list[_Target]:
        """*found* to fetch (whole, or its first chunk when large and ELF); with a bytecode
        file, its source too when this image's bytecode was seen to be stale."""
        chunks = found.layer.index.chunks(found.ino)
        if not chunks:
            return []
        if elf and len(chunks) > 3:
            # the loader reads the headers, then the dynamic and writable segments (at the
            # end, mostly) and runs the init code: the first and last chunks now, the rest
            # of that after the scan; other text pages come as the program runs
            chunks = [chunks[0], chunks[-1]]
        elif _size(chunks) > self.settings.file_bytes:
            if not elf:
                return []
            chunks = [chunks[0]]
        out = [_Target(found, chunks)]
        if img.stale_pyc and found.path.endswith(".pyc"):
            src = _source_of(img, found.path)
            if src is not None:
                out.extend(self._target(img, src, elf=False))
        return out

    # --- Python modules ---------------------------------------------------------------------
    def _python_targets(self, img: _Image, path: str, imports: list) -> list[_Target]:  # type: ignore[type-arg]
        d = posixpath.dirname(path)
        if posixpath.basename(d) == "__pycache__":
            d = posixpath.dirname(d)
        # the package this file belongs to (relative imports start there)
        package = d
        roots = img.roots()
        root = self._learn_root(img, d)
        if root is not None and root not in roots:
            roots = [*roots, root]
        with img.lock:
            tags = list(img.tags)
        frozen = any(int(t[9:]) >= 11 for t in tags if t[9:].isdigit())
        stdlib = {r for r in roots if _PY_DIR.match(posixpath.basename(r))}
        files: list[Found] = []
        for imp in imports:
            if imp.level:
                start = package
                for _ in range(imp.level - 1):
                    start = posixpath.dirname(start)
                bases = [start]
                name = imp.module
            else:
                bases = roots
                name = imp.module
            pkg_dir: str | None = None
            if name:
                got, pkg_dir = self._module_files(
                    img, name, bases, tags, stdlib if frozen else None
                )
                files.extend(got)
            else:
                pkg_dir = bases[0] if bases else None
            if pkg_dir is not None:
                for n in imp.names:
                    if n == "*":
                        continue
                    got, _ = self._module_files(img, n, [pkg_dir], tags, None)
                    files.extend(got)
        out: list[_Target] = []
        for fnd in dict.fromkeys(files):
            out.extend(self._target(img, fnd, elf=fnd.path.endswith(".so")))
        return out

    def _learn_root(self, img: _Image, d: str) -> str | None:
        """The import root of a module in directory *d*: the parent of its top-most package."""
        cur = d
        for _ in range(32):
            if self._init_file(img, cur, []) is None:
                break
            cur = posixpath.dirname(cur)
        real = img.view.realdir(cur) if cur else ""
        if real is not None:
            with img.lock:
                if real not in img.learned:
                    img.learned.append(real)
        return real

    def _init_file(self, img: _Image, d: str, tags: list[str]) -> Found | None:
        entries = img.view.listdir(d)
        return self._module_file(img, d, entries, "__init__", tags, allow_ext=False)

    def _module_file(
        self,
        img: _Image,
        d: str,
        entries: dict[str, Found],
        name: str,
        tags: list[str],
        allow_ext: bool = True,
    ) -> Found | None:
        """The file Python reads for module *name* in directory *d* (extension, else
        bytecode in ``__pycache__`` for the source, else the source, else bytecode)."""
        if allow_ext:
            ext = img.extensions(d, entries).get(name)
            if ext is not None:
                return ext
        src = entries.get(name + ".py")
        if src is not None:
            cache = entries.get("__pycache__")
            if cache is not None and stat.S_ISDIR(cache.mode):
                pyc_entries = img.view.listdir(cache.path)
                for tag in tags or self._tags_in(pyc_entries, name):
                    pyc = pyc_entries.get(f"{name}.{tag}.pyc")
                    if pyc is not None and stat.S_ISREG(pyc.mode):
                        return pyc
            return src if stat.S_ISREG(src.mode) else None
        pyc = entries.get(name + ".pyc")
        if pyc is not None and stat.S_ISREG(pyc.mode):
            return pyc
        return None

    @staticmethod
    def _tags_in(entries: dict[str, Found], name: str) -> list[str]:
        out = []
        for n in entries:
            if n.startswith(name + ".") and n.endswith(".pyc") and ".opt-" not in n:
                out.append(n[len(name) + 1 : -4])
        return out

    def _module_files(
        self,
        img: _Image,
        dotted: str,
        bases: list[str],
        tags: list[str],
        frozen_in: set[str] | None,
    ) -> tuple[list[Found], str | None]:
        """The files Python reads to import *dotted* from the first of *bases* that has its
        top-level name (each package's ``__init__``, then the module), and the directory of
        the last package (for ``from dotted import name``)."""
        parts = dotted.split(".")
        for base in bases:
            files: list[Found] = []
            d = base
            pkg_dir: str | None = None
            for i, part in enumerate(parts):
                entries = img.view.listdir(d)
                sub = entries.get(part)
                if sub is not None and stat.S_ISLNK(sub.mode):
                    real = img.view.realdir(sub.path)
                    sub = None if real is None else sub._replace(path=real, mode=stat.S_IFDIR)
                if sub is not None and stat.S_ISDIR(sub.mode):
                    init = self._init_file(img, sub.path, tags)
                    if init is not None or self._module_file(img, d, entries, part, tags) is None:
                        if init is not None:
                            files.append(init)
                        d = sub.path
                        pkg_dir = d
                        continue
                mod = self._module_file(img, d, entries, part, tags)
                if mod is not None and not (
                    frozen_in and base in frozen_in and ".".join(parts[: i + 1]) in FROZEN_311
                ):
                    files.append(mod)
                pkg_dir = None
                break
            else:
                return files, pkg_dir
            if files:
                return files, pkg_dir
        return [], None

    # --- fetching ---------------------------------------------------------------------------
    def _fetch(self, img: _Image, targets: list[_Target], trigger: str) -> None:
        """Queue the fetch of the targets not seen yet, in groups, within the image's budget."""
        st = self.settings
        fresh: list[_Target] = []
        paused = {i for i in {t.found.layer.identity for t in targets} if self._paused(i)}
        with img.lock:
            for t in targets:
                key = (t.found.layer.identity, t.found.ino)
                if key in img.seen or _layer(t.found).planned or key[0] in paused:
                    continue
                n = _size(t.chunks)
                if img.files >= st.max_files or img.bytes + n > st.max_bytes:
                    continue
                img.seen.add(key)
                img.files += 1
                img.bytes += n
                fresh.append(t)
        if not fresh:
            return
        with self._lock:
            if len(self._queued) > 1_000_000:
                self._queued.clear()
            self._queued.update((t.found.layer.identity, t.found.ino) for t in fresh)
        for t in fresh:
            log.debug("dependency_queued", path=t.found.path, trigger=trigger)
        # per layer, in blob order, cut into groups of about group_bytes
        by_layer: dict[str, list[_Target]] = {}
        for t in fresh:
            by_layer.setdefault(t.found.layer.identity, []).append(t)
        for group in by_layer.values():
            group.sort(key=lambda t: t.chunks[0].offset)
            cur: list[_Target] = []
            size = 0
            for t in group:
                n = _size(t.chunks)
                if cur and size + n > st.group_bytes:
                    self._submit(self._fetch_group, img, cur, trigger)
                    cur, size = [], 0
                cur.append(t)
                size += n
            if cur:
                self._submit(self._fetch_group, img, cur, trigger)

    def _fetch_group(self, img: _Image, group: list[_Target], trigger: str) -> None:
        layer = _layer(group[0].found)
        chunks = [c for t in group for c in t.chunks]
        t0 = time.monotonic()
        layer.fetcher.get_chunks(chunks, speculate=False, reason="prefetch")
        with self._lock:
            self.stats["requests"] += 1
            self.stats["files"] += len(group)
            self.stats["bytes"] += _size(chunks)
        log.debug(
            "dependency_fetched",
            digest=layer.compressed_digest,
            trigger=trigger,
            files=len(group),
            bytes=_size(chunks),
            first=group[0].found.path,
            seconds=round(time.monotonic() - t0, 4),
        )
        self._scan_and_fetch(img, group, trigger)
