"""The FUSE protocol adapter: containers/storage's additional layer store (ALS) tree.

This module only translates between pyfuse3 requests and the layer provider (the
``layerstore.runtime.manager.LayerManager`` in the daemon, a fake in tests). It owns the inode
table and
the mapping of exceptions to errno; it knows nothing about registries or the eStargz format.
Every call that may block (resolving a layer, reading bytes) runs in a worker thread via
``trio.to_thread.run_sync`` with a capacity limiter, so the trio loop only does table look-ups.
Before it takes a thread, a call takes a slot of its registry host's share of that limiter
(``host_share``, :mod:`layerstore.common.bulkhead`): a slow registry holds at most its share of
the lookup or read threads, and images on other registries keep being served.

The tree::

    /                                   root (readdir is empty)
    /<base64(ref)>/                     any canonical std-base64 of a valid reference
    /<base64(ref)>/<key>/               key = compressed blob digest or TOC digest
    /<base64(ref)>/<key>/diff/          the layer's overlay view (the provider's TOCIndex)
    /<base64(ref)>/<key>/info           JSON for the key's scheme
    /<base64(ref)>/<key>/blob           the registry blob, from a verified whole copy
    create(<key>/use)                   -> provider.use(ref, key); answers ENOENT
    rmdir(<base64(ref)>/<key>)          -> provider.release(ref, key); answers ENOENT

Inode numbers are global and stable for the life of the daemon: the store's own directories and
files get numbers from a counter; each layer (by its ``identity``, else its compressed digest)
gets a block ``[base, base + num_inodes]`` once, and a node of its index with local number ``i``
is ``base + i`` (the same layer seen under two references or two keys has the same inodes; two
layer objects that merely claim the same compressed digest do not). When the kernel forgets
every inode of a layer, the adapter drops its reference to the layer object (the block's numbers
stay reserved, so the numbers do not change if the layer comes back).

Every reference the adapter keeps to a layer object (a key directory, an inode block, an open
file) is announced with ``layer.hold()`` and given back with ``layer.unhold()`` when the layer
has them: the manager's idle sweep never closes a layer the mount still serves. A key directory
whose layer turned out bad (``layer.bad``) is resolved again on its next lookup.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import errno
import functools
import inspect
import os
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar, cast

import pyfuse3
import trio

from layerstore import errors as lse
from layerstore.common.bulkhead import KeyedLimiters, share_limit
from layerstore.common.negcache import NegativeCache
from layerstore.digest import is_valid as is_valid_digest
from stargz_store.config import FuseSettings
from stargz_store.log import get_logger

log = get_logger(__name__)

# --- the collaborator interface (structural) ----------------------------------------------------


class EntryAttrLike(Protocol):
    @property
    def ino(self) -> int: ...
    @property
    def mode(self) -> int: ...
    @property
    def nlink(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def rdev(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...


class TOCIndexLike(Protocol):
    @property
    def root_ino(self) -> int: ...
    @property
    def num_inodes(self) -> int: ...
    def lookup(self, parent_ino: int, name: str) -> int | None: ...
    def getattr(self, ino: int) -> EntryAttrLike: ...
    def readdir(self, ino: int) -> Sequence[tuple[str, int]]: ...
    def readlink(self, ino: int) -> str: ...
    def xattrs(self, ino: int) -> Mapping[str, bytes]: ...


class LayerLike(Protocol):
    @property
    def compressed_digest(self) -> str: ...
    @property
    def toc_digest(self) -> str: ...
    @property
    def blob_size(self) -> int: ...
    @property
    def index(self) -> TOCIndexLike: ...
    def info_json(self, scheme: str) -> bytes: ...
    def read(self, ino: int, offset: int, size: int) -> bytes: ...
    def read_blob(self, offset: int, size: int) -> bytes: ...


class LayerProvider(Protocol):
    def get(self, ref: str, key: str) -> LayerLike: ...
    def use(self, ref: str, key: str) -> object: ...  # the result (a count) is not used
    def release(self, ref: str, key: str) -> object: ...


def _layer_key(layer: LayerLike) -> str:
    """What inode blocks are numbered by: the layer's identity when it has one."""
    identity = getattr(layer, "identity", None)
    return identity if isinstance(identity, str) and identity else layer.compressed_digest


def _hold(layer: LayerLike) -> bool:
    """Announce a reference to *layer*; False if it was retired (look it up again)."""
    hold = getattr(layer, "hold", None)
    return True if hold is None else bool(hold())


def _unhold(layer: LayerLike | None) -> None:
    if layer is not None:
        unhold = getattr(layer, "unhold", None)
        if unhold is not None:
            unhold()


def _is_bad(layer: LayerLike) -> bool:
    return getattr(layer, "bad", None) is not None


# --- mount options ------------------------------------------------------------------------------


def mount_options(settings: FuseSettings) -> set[str]:
    """The option set for ``pyfuse3.init``, built explicitly.

    ``nosuid`` and ``nodev``: the images are chosen by whoever names them, so a setuid-root
    binary or a device node must not work when executed or opened straight from this mount.
    Containers are unaffected: overlayfs applies the flags of its own mount (which podman and
    CRI-O make without them), not those of its lower layers; tried with podman 4.3.1, a
    ``--user 65534`` container still gets euid 0 from a setuid-root binary of the image and can
    use its device nodes (``docs/ARCHITECTURE.md``). The mount is not ``ro``: the kernel would
    then refuse create(use) and rmdir(key) before asking us.
    """
    opts = {
        "fsname=stargz-store",
        "subtype=stargz-store",
        "default_permissions",
        "nosuid",
        "nodev",
    }
    if settings.allow_other:
        opts.add("allow_other")
    return opts


# --- errno mapping ------------------------------------------------------------------------------

# Errors that mean "this layer cannot be served here": the lookup fails with ENOENT and podman
# pulls the layer itself. Expected ones are logged at info level, the rest as warnings.
_EXPECTED_LOOKUP_ERRORS: tuple[type[BaseException], ...] = (
    lse.NotEStargzError,
    lse.LayerNotFoundError,
    lse.NotFoundError,
    lse.BlockedRegistryError,
    lse.ImageReferenceError,
    lse.DigestError,
)


T = TypeVar("T")

# trio >= 0.23 calls it abandon_on_cancel; older releases (Debian 12 ships 0.22) cancellable.
_ABANDON_KW = (
    "abandon_on_cancel"
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
    else "cancellable"
)


async def run_in_thread(
    fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
) -> T:
    """``fn(*args)`` in a worker thread. If the caller is cancelled (only at shutdown), the
    thread is abandoned: it finishes on its own and its result is dropped."""
    kwargs: dict[str, Any] = {"limiter": limiter, _ABANDON_KW: True}
    return cast(T, await trio.to_thread.run_sync(fn, *args, **kwargs))


def _fuse_error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _guarded(fn: F) -> F:
    """Answer EIO (logged) for any exception that is not a FUSEError: never crash the loop."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except lse.LayerStoreError as exc:
            log.warning(
                "fuse_op_failed", op=fn.__name__, error=str(exc), error_type=type(exc).__name__
            )
            raise _fuse_error(errno.EIO) from None
        except Exception as exc:
            log.error("fuse_op_crashed", op=fn.__name__, error=repr(exc), exc_info=True)
            raise _fuse_error(errno.EIO) from None

    return cast(F, wrapper)


# --- the inode table ----------------------------------------------------------------------------

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
_FILE_MODE = stat.S_IFREG | 0o444
NEGATIVE_CACHE_MAX = 4096


@dataclass
class _RefDir:
    ino: int
    name: str  # the base64 name
    ref: str
    lookups: int = 0  # kernel references
    keys: int = 0  # resolved key dirs below it (kept for good)


@dataclass
class _KeyDir:
    ino: int  # info = ino + 1, blob = ino + 2
    ref_dir: _RefDir
    key: str
    layer: LayerLike | None = None
    scheme: str = ""
    info: bytes = b""
    blob_size: int = 0
    content_base: int = 0
    lookups: int = 0  # kernel references to ino, ino+1, ino+2


@dataclass
class _Block:
    base: int
    size: int  # local numbers 0..size-1 are valid (0 unused)
    digest: str
    layer: LayerLike | None = None
    lookups: int = 0
    # Local inode -> its attributes, built once from the (immutable) index and handed out as
    # is by lookup, getattr and readdirplus, which pyfuse3 copies into the reply: nothing may
    # change a cached object. About 0.25 KiB per inode the kernel has seen; dropped with the
    # layer when the kernel forgets every inode of the block.
    attrs: dict[int, pyfuse3.EntryAttributes] = field(default_factory=dict)


@dataclass
class _Handle:
    kind: str  # "file", "info", "blob"
    layer: LayerLike | None = None
    local: int = 0
    size: int = 0
    data: bytes = b""
    # The layer's read_nowait(ino, offset, size, disk=False), if it has one: verified bytes
    # without a network wait (from memory or the page cache; with disk=True the disk cache).
    nowait: Callable[..., bytes | memoryview | None] | None = None


class _Absent(Exception):
    """A lookup miss the kernel may remember for ``timeout`` seconds (a negative dentry)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        self.timeout = timeout


@dataclass
class _Negative:
    reason: str
    errno: int


@dataclass
class _Stats:
    fuse_lookups: int = 0  # every LOOKUP request
    lookups: int = 0  # layer (key dir) lookups
    resolved: int = 0
    failed: int = 0
    negative_hits: int = 0
    reads: int = 0
    fast_reads: int = 0  # served on the event loop (no thread hop)
    disk_reads_inline: int = 0  # of those, read from the disk cache on the event loop
    read_ns: int = 0  # wall time spent answering file and blob reads
    read_errors: int = 0
    failed_by_error: dict[str, int] = field(default_factory=dict)  # failed, by exception class


def _default_validate_ref(ref: str) -> None:
    """A syntactic sanity check, used when no reference parser is injected."""
    if not ref or len(ref) > 4096 or any(c.isspace() or not c.isprintable() for c in ref):
        raise lse.ImageReferenceError(f"invalid image reference {ref!r}")


class StoreOperations(pyfuse3.Operations):  # type: ignore[misc,unused-ignore]
    """pyfuse3 request handlers for the ALS tree. One instance per mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        provider: LayerProvider,
        settings: FuseSettings | None = None,
        *,
        validate_ref: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        host_share: float = 1.0,
    ) -> None:
        super().__init__()
        self._provider = provider
        self._settings = settings if settings is not None else FuseSettings()
        self._validate_ref = validate_ref or _default_validate_ref
        self._clock = clock
        self._lookup_limiter = trio.CapacityLimiter(self._settings.lookup_threads)
        self._read_limiter = trio.CapacityLimiter(self._settings.read_threads)
        self._thread_reads = 0  # reads waiting in (or for) a read thread; event loop only
        self._inline_disk_reads = self._settings.inline_cache_reads
        # Per registry host shares of those (the provider names a ref's host, a layer its own).
        self._lookup_hosts: KeyedLimiters[trio.CapacityLimiter] = KeyedLimiters(
            share_limit(self._settings.lookup_threads, host_share), trio.CapacityLimiter
        )
        self._read_hosts: KeyedLimiters[trio.CapacityLimiter] = KeyedLimiters(
            share_limit(self._settings.read_threads, host_share), trio.CapacityLimiter
        )
        self._host_of: Callable[[str], str] | None = getattr(provider, "registry_host", None)
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._ref_dirs: dict[str, _RefDir] = {}  # base64 name -> dir
        self._ref_by_ino: dict[int, _RefDir] = {}
        self._key_dirs: dict[tuple[str, str], _KeyDir] = {}  # (base64 name, key) -> dir
        self._key_by_ino: dict[int, _KeyDir] = {}  # keydir, info and blob inodes -> dir
        self._blocks: dict[str, _Block] = {}  # compressed digest -> block
        self._block_starts: list[int] = []
        self._block_list: list[_Block] = []
        # Failed (ref dir, key) lookups, for negative_timeout. Only the trio thread uses it.
        self._negative: NegativeCache[tuple[str, str], _Negative] = NegativeCache(
            NEGATIVE_CACHE_MAX, clock=clock
        )
        # (ref dir inode, key) -> (expiry, ref): the names answered with a negative entry for a
        # failed layer lookup, so that forget_failures can invalidate them in the kernel.
        self._negative_names: OrderedDict[tuple[int, str], tuple[float, str]] = OrderedDict()
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._started_ns = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()
        self._allowed_uids = frozenset({0, self._uid, *self._settings.allowed_uids})
        self._denied_uids: set[int] = set()  # those logged at warning level once
        # Who may use the store's own directories (see _check_caller). When only root and the
        # daemon's user may, the kernel enforces it: those directories are 0700 and owned by
        # the daemon's user, so a path walk by anyone else stops at the mount's root, cached
        # names or not, without a request. Other allowed uids need 0755 directories; then
        # only the daemon can tell users apart, and it must be asked at every walk.
        self._shared = bool(self._allowed_uids - {0, self._uid})
        self._store_dir_mode = stat.S_IFDIR | (0o755 if self._shared else 0o700)
        self.stats = _Stats()

    # -- worker threads --------------------------------------------------------------------------

    async def _lookup_thread(self, ref: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a lookup thread, within the share of *ref*'s registry host."""
        host = self._host_of(ref) if self._host_of is not None else ""
        with self._lookup_hosts.borrow(host) as share:
            async with share:
                return await run_in_thread(fn, *args, limiter=self._lookup_limiter)

    async def _read_thread(self, layer: LayerLike, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a read thread, within the share of the layer's registry host."""
        self._thread_reads += 1
        try:
            with self._read_hosts.borrow(getattr(layer, "registry_host", "")) as share:
                async with share:
                    return await run_in_thread(fn, *args, limiter=self._read_limiter)
        finally:
            self._thread_reads -= 1

    # -- inode helpers ---------------------------------------------------------------------------

    def _alloc(self, count: int) -> int:
        ino = self._next_ino
        self._next_ino += count
        return ino

    def _find_block(self, ino: int) -> _Block | None:
        i = bisect.bisect_right(self._block_starts, ino) - 1
        if i < 0:
            return None
        block = self._block_list[i]
        if ino - block.base < block.size:
            return block
        return None

    def _content(self, ino: int) -> tuple[LayerLike, int]:
        block = self._find_block(ino)
        if block is None or block.layer is None:
            raise _fuse_error(errno.ENOENT)
        return block.layer, ino - block.base

    def _content_block(self, ino: int) -> tuple[_Block, LayerLike, int]:
        block = self._find_block(ino)
        if block is None or block.layer is None:
            raise _fuse_error(errno.ENOENT)
        return block, block.layer, ino - block.base

    def _node_attr(self, block: _Block, layer: LayerLike, local: int) -> pyfuse3.EntryAttributes:
        """The (cached, never to be modified) attributes of a layer node."""
        a = block.attrs.get(local)
        if a is None:
            a = block.attrs[local] = self._content_attr(
                block.base + local, layer.index.getattr(local)
            )
        return a

    def _block_for(self, layer: LayerLike) -> _Block:
        key = _layer_key(layer)
        size = layer.index.num_inodes + 1
        block = self._blocks.get(key)
        if block is None or block.size < size:
            block = _Block(base=self._alloc(size), size=size, digest=key)
            self._blocks[key] = block
            self._block_starts.append(block.base)
            self._block_list.append(block)
        if block.layer is not layer:
            _hold(layer)
            old, block.layer = block.layer, layer
            block.attrs = {}
            _unhold(old)
        return block

    def _dir_attr(self, ino: int, timeout: float) -> pyfuse3.EntryAttributes:
        """The root, an image or a layer-key directory."""
        a = self._attr(ino, self._store_dir_mode, 2, 0, timeout)
        a.st_uid, a.st_gid = self._uid, self._gid
        return a

    def _attr(
        self, ino: int, mode: int, nlink: int, size: int, timeout: float
    ) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        a.st_mode = mode
        a.st_nlink = nlink
        a.st_uid = 0
        a.st_gid = 0
        a.st_rdev = 0
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._started_ns
        return a

    def _content_attr(self, ino: int, e: EntryAttrLike) -> pyfuse3.EntryAttributes:
        """Attributes of a layer node, as a new object (callers cache it: see _node_attr)."""
        # A new object is zeroed (uid, gid, rdev, size, blocks, times; generation): only
        # what differs is set, as each setter costs (tests check the zeroing).
        a = pyfuse3.EntryAttributes()
        a.entry_timeout = self._settings.entry_timeout
        a.attr_timeout = self._settings.attr_timeout
        a.st_blksize = 4096
        a.st_ino = ino
        a.st_mode = e.mode
        a.st_nlink = e.nlink
        if e.uid:
            a.st_uid = e.uid
        if e.gid:
            a.st_gid = e.gid
        if e.rdev:
            a.st_rdev = e.rdev
        size = e.size
        if size:
            a.st_size = size
            a.st_blocks = (size + 511) // 512
        mtime_ns = e.mtime_ns
        if mtime_ns:
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
        return a

    def _attr_of(self, ino: int) -> pyfuse3.EntryAttributes:
        short = self._settings.store_dir_timeout
        if ino == pyfuse3.ROOT_INODE:
            return self._dir_attr(ino, short)
        if ino in self._ref_by_ino:
            return self._dir_attr(ino, short)
        kd = self._key_by_ino.get(ino)
        if kd is not None:
            if ino == kd.ino:
                return self._dir_attr(ino, short)
            if ino == kd.ino + 1:
                return self._attr(ino, _FILE_MODE, 1, len(kd.info), self._settings.attr_timeout)
            return self._attr(ino, _FILE_MODE, 1, kd.blob_size, self._settings.attr_timeout)
        block, layer, local = self._content_block(ino)
        return self._node_attr(block, layer, local)

    def _count_lookup(self, ino: int) -> None:
        if ino == pyfuse3.ROOT_INODE:
            return
        rd = self._ref_by_ino.get(ino)
        if rd is not None:
            rd.lookups += 1
            return
        kd = self._key_by_ino.get(ino)
        if kd is not None:
            kd.lookups += 1
            return
        block = self._find_block(ino)
        if block is not None:
            block.lookups += 1

    # -- who may use the store's own directories -------------------------------------------------

    def _check_caller(self, inode: int, ctx: pyfuse3.RequestContext) -> None:
        """Refuse (EACCES) a request on one of the store's own nodes (the root, image and
        layer-key directories, ``info``, ``blob``) from a uid that is neither root, the
        daemon's own nor in ``fuse.allowed_uids``.

        Naming an image here makes this root daemon fetch it from a registry the caller chose
        and serve its files, and shows other users' images: only the container engines may.
        With no other uid allowed, the kernel refuses others first (0700 directories); this
        check is the only one when other uids are allowed, and the second one otherwise.
        Requests inside ``diff/`` are not checked: they are reached only through a checked
        key directory (whose name the kernel asks again at every walk when it cannot check
        itself, see :meth:`_store_entry`), and overlayfs sends some of them with the container
        process's credentials (page faults, dentry revalidation), which must keep working. The
        root's own attributes (and ``statfs``) stay visible to everyone: they reveal nothing.

        EACCES, not ENOENT: it tells a misconfigured rootless user what is wrong instead of
        looking like an unknown image, and an ENOENT would leave negative dentries behind.
        """
        uid = ctx.uid
        if uid in self._allowed_uids:
            return
        if not (
            inode == pyfuse3.ROOT_INODE or inode in self._ref_by_ino or inode in self._key_by_ino
        ):
            return
        if uid not in self._denied_uids and len(self._denied_uids) < 64:
            self._denied_uids.add(uid)
            log.warning(
                "access_denied", uid=uid, pid=ctx.pid, allowed_uids=sorted(self._allowed_uids)
            )
        else:
            log.debug("access_denied", uid=uid, pid=ctx.pid)
        raise _fuse_error(errno.EACCES)

    def _store_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        """An image or layer-key directory's entry. When uids other than root and the daemon's
        are allowed (0755 directories), its name is valid for no time (entry timeout 0): every
        path walk through it sends a LOOKUP with the walker's credentials, so
        :meth:`_check_caller` sees every user, even right after root looked the name up (at the
        cost of two round trips per walk from the mount's root; overlayfs keeps its lower
        directories and does not walk). Attributes keep ``store_dir_timeout``."""
        a = self._dir_attr(ino, self._settings.store_dir_timeout)
        if self._shared:
            a.entry_timeout = 0
        return a

    # -- lookups ---------------------------------------------------------------------------------

    @_guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.stats.fuse_lookups += 1
        self._check_caller(parent_inode, ctx)
        try:
            attr = await self._lookup(parent_inode, name)
        except _Absent as absent:
            # A negative entry: the kernel answers ENOENT itself for ``timeout`` seconds
            # (the dynamic loader and PATH searches probe many names that do not exist).
            return self._negative_entry(absent.timeout)
        self._count_lookup(attr.st_ino)
        return attr

    def _negative_entry(self, timeout: float) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = max(0.0, timeout)
        a.attr_timeout = 0
        return a

    async def _lookup(self, parent: int, name_b: bytes) -> pyfuse3.EntryAttributes:
        name = os.fsdecode(name_b)
        if name == ".":
            return self._attr_of(parent)
        if parent == pyfuse3.ROOT_INODE:
            return self._store_entry(self._ref_dir(name).ino)
        ref_dir = self._ref_by_ino.get(parent)
        if ref_dir is not None:
            resolved = await self._key_dir(ref_dir, name)
            return self._store_entry(resolved.ino)
        kd = self._key_by_ino.get(parent)
        if kd is not None:
            if parent != kd.ino:
                raise _fuse_error(errno.ENOTDIR)
            return self._key_child(kd, name)
        block, layer, local = self._content_block(parent)
        child = layer.index.lookup(local, name)
        if child is None:
            raise _Absent(self._settings.entry_timeout)  # layer content never changes
        return self._node_attr(block, layer, child)

    def _ref_dir(self, name: str) -> _RefDir:
        rd = self._ref_dirs.get(name)
        if rd is not None:
            return rd
        try:
            raw = base64.b64decode(name.encode("ascii"), validate=True)
            if base64.b64encode(raw).decode("ascii") != name:
                raise ValueError("not canonical base64")
            ref = raw.decode("utf-8")
            self._validate_ref(ref)
        except (ValueError, binascii.Error, UnicodeError, lse.LayerStoreError) as exc:
            log.debug("lookup_bad_ref_dir", name=name, error=str(exc))
            raise _Absent(self._settings.negative_timeout) from None
        rd = _RefDir(ino=self._alloc(1), name=name, ref=ref)
        self._ref_dirs[name] = rd
        self._ref_by_ino[rd.ino] = rd
        return rd

    async def _key_dir(self, ref_dir: _RefDir, key: str) -> _KeyDir:
        self.stats.lookups += 1
        if not is_valid_digest(key):  # containers/storage's keys are sha256
            raise _Absent(self._settings.negative_timeout)
        slot = (ref_dir.name, key)
        kd = self._key_dirs.get(slot)
        if kd is not None and kd.layer is not None and not _is_bad(kd.layer):
            return kd
        neg = self._negative.get(slot)
        if neg is not None:
            self.stats.negative_hits += 1
            if neg.errno == errno.ENOENT:
                remaining = self._negative.expires_in(slot)
                self._note_negative_name(ref_dir, key, remaining)
                raise _Absent(remaining)
            raise _fuse_error(neg.errno)
        ref = ref_dir.ref
        started = self._clock()
        try:
            for _attempt in range(3):
                layer, scheme, info = await self._lookup_thread(ref, self._resolve, ref, key)
                # Held before any await: the sweep may have retired it meanwhile (then the
                # manager builds a new one on the next call).
                if _hold(layer):
                    break
            else:
                raise lse.LayerStoreError(f"layer {key} of {ref} keeps being dropped")
        except Exception as exc:
            # Any failure makes containers/storage treat the layer as unknown and pull it
            # itself. Store errors answer ENOENT; anything else is a bug: logged, EIO.
            self.stats.failed += 1
            kind = type(exc).__name__
            self.stats.failed_by_error[kind] = self.stats.failed_by_error.get(kind, 0) + 1
            expected = isinstance(exc, lse.LayerStoreError)
            code = errno.ENOENT if expected else errno.EIO
            failure = _Negative(type(exc).__name__, code)
            self._negative.put(slot, failure, self._settings.negative_timeout)
            fields = {"ref": ref, "key": key, "error_type": type(exc).__name__, "error": str(exc)}
            if not expected:
                log.error("layer_lookup_crashed", exc_info=True, **fields)
            elif isinstance(exc, _EXPECTED_LOOKUP_ERRORS):
                log.info("layer_lookup_failed", **fields)
            else:
                log.warning("layer_lookup_failed", **fields)
            if code == errno.ENOENT:
                self._note_negative_name(ref_dir, key, self._settings.negative_timeout)
                raise _Absent(self._settings.negative_timeout) from None
            raise _fuse_error(code) from None
        self.stats.resolved += 1
        kd = self._key_dirs.get(slot)  # another request may have won the race
        if kd is None:
            kd = _KeyDir(ino=self._alloc(3), ref_dir=ref_dir, key=key)
            ref_dir.keys += 1
            self._key_dirs[slot] = kd
            for i in range(3):
                self._key_by_ino[kd.ino + i] = kd
        old, kd.layer, kd.scheme, kd.info = kd.layer, layer, scheme, info
        _unhold(old)  # the hold taken above replaces the directory's previous one
        kd.blob_size = layer.blob_size
        kd.content_base = self._block_for(layer).base
        log.info(
            "layer_resolved",
            ref=ref,
            key=key,
            digest=layer.compressed_digest,
            scheme=scheme,
            seconds=round(self._clock() - started, 4),
        )
        return kd

    def _resolve(self, ref: str, key: str) -> tuple[LayerLike, str, bytes]:
        """Worker thread: get the layer and its ``info`` for the key's scheme."""
        layer = self._provider.get(ref, key)
        if key == layer.compressed_digest:
            scheme = "compressed"
        elif key == layer.toc_digest:
            scheme = "toc"
        else:
            raise lse.LayerNotFoundError(
                f"layer for key {key} has digest {layer.compressed_digest} and TOC digest "
                f"{layer.toc_digest}"
            )
        info = layer.info_json(scheme)
        # Touch the index once here, off the trio loop, in case it is built lazily.
        _ = layer.index.num_inodes
        return layer, scheme, info

    def _key_child(self, kd: _KeyDir, name: str) -> pyfuse3.EntryAttributes:
        layer = kd.layer
        if layer is None:
            raise _fuse_error(errno.ENOENT)
        if name == "diff":
            return self._node_attr(self._block_for(layer), layer, layer.index.root_ino)
        if name == "info":
            return self._attr(kd.ino + 1, _FILE_MODE, 1, len(kd.info), self._settings.attr_timeout)
        if name == "blob":
            return self._attr(kd.ino + 2, _FILE_MODE, 1, kd.blob_size, self._settings.attr_timeout)
        raise _fuse_error(errno.ENOENT)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for ino, n in inode_list:
                rd = self._ref_by_ino.get(ino)
                if rd is not None:
                    rd.lookups = max(0, rd.lookups - n)
                    if rd.lookups == 0 and rd.keys == 0:
                        # Any local user can look up any valid name: do not keep them all.
                        del self._ref_by_ino[ino]
                        self._ref_dirs.pop(rd.name, None)
                    continue
                kd = self._key_by_ino.get(ino)
                if kd is not None:
                    kd.lookups = max(0, kd.lookups - n)
                    if kd.lookups == 0:
                        # the (ref, key) is resolved again on the next lookup
                        old, kd.layer = kd.layer, None
                        _unhold(old)
                    continue
                block = self._find_block(ino)
                if block is not None:
                    block.lookups = max(0, block.lookups - n)
                    if block.lookups == 0:
                        old, block.layer = block.layer, None
                        block.attrs = {}
                        _unhold(old)
        except Exception as exc:  # forget must never raise
            log.error("fuse_forget_failed", error=repr(exc), exc_info=True)

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            self._check_caller(inode, ctx)
        return self._attr_of(inode)

    @_guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        layer, local = self._content(inode)
        if not stat.S_ISLNK(layer.index.getattr(local).mode):
            raise _fuse_error(errno.EINVAL)
        return os.fsencode(layer.index.readlink(local))

    # -- directories -----------------------------------------------------------------------------

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._check_caller(inode, ctx)  # readdir gets no context: opendir decides
        # Once per directory a walk lists: answered from the attribute cache.
        block = self._find_block(inode)
        if block is not None and block.layer is not None:
            attr = self._node_attr(block, block.layer, inode - block.base)
        else:
            attr = self._attr_of(inode)
        if not stat.S_ISDIR(attr.st_mode):
            raise _fuse_error(errno.ENOTDIR)
        return inode

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino = fh
        entries: list[tuple[bytes, pyfuse3.EntryAttributes]]
        if ino == pyfuse3.ROOT_INODE or ino in self._ref_by_ino:
            return  # the store's top levels are not listed
        kd = self._key_by_ino.get(ino)
        if kd is not None:
            if kd.layer is None:
                return
            entries = [(os.fsencode(n), self._key_child(kd, n)) for n in ("blob", "diff", "info")]
            self._reply_entries(token, entries, start_id)
            return
        block, layer, local = self._content_block(ino)
        children = layer.index.readdir(local)
        end = len(children)
        if start_id >= end:  # the call that finds the end of every directory
            return
        attrs = block.attrs
        node_attr = self._node_attr
        reply = pyfuse3.readdir_reply
        i = start_id
        try:
            while i < end:
                name, child = children[i]
                a = attrs.get(child)
                if a is None:
                    a = node_attr(block, layer, child)
                # os.fsencode, without its Python-level checks (names are str)
                if not reply(token, name.encode(_FS_ENCODING, _FS_ERRORS), a, i + 1):
                    break
                i += 1
        finally:
            block.lookups += i - start_id  # one per entry the kernel took

    def _reply_entries(
        self,
        token: pyfuse3.ReaddirToken,
        entries: list[tuple[bytes, pyfuse3.EntryAttributes]],
        start_id: int,
    ) -> None:
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            self._count_lookup(attr.st_ino)

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files -----------------------------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _fuse_error(errno.EROFS)
        self._check_caller(inode, ctx)
        kd = self._key_by_ino.get(inode)
        if kd is not None:
            if inode == kd.ino:
                raise _fuse_error(errno.EISDIR)
            if kd.layer is None:
                raise _fuse_error(errno.ENOENT)
            if inode == kd.ino + 1:
                handle = _Handle("info", data=kd.info, size=len(kd.info))
            else:
                handle = _Handle("blob", layer=kd.layer, size=kd.blob_size)
        elif inode == pyfuse3.ROOT_INODE or inode in self._ref_by_ino:
            raise _fuse_error(errno.EISDIR)
        else:
            layer, local = self._content(inode)
            attr = layer.index.getattr(local)
            if not stat.S_ISREG(attr.mode):
                raise _fuse_error(errno.EISDIR if stat.S_ISDIR(attr.mode) else errno.EACCES)
            handle = _Handle(
                "file",
                layer=layer,
                local=local,
                size=attr.size,
                nowait=getattr(layer, "read_nowait", None),
            )
            opened = getattr(layer, "opened", None)
            if opened is not None and attr.size > 0:
                opened(local)
        if handle.layer is not None:
            _hold(handle.layer)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=True, nonseekable=False)

    @_guarded
    async def read(  # type: ignore[override,unused-ignore]  # pyfuse3 takes any buffer
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None:
            raise _fuse_error(errno.EBADF)
        if off >= handle.size or size <= 0:
            return b""
        size = min(size, handle.size - off)
        if handle.kind == "info":
            return handle.data[off : off + size]
        layer = handle.layer
        assert layer is not None
        self.stats.reads += 1
        t0 = time.perf_counter_ns()
        try:
            if handle.nowait is not None:
                # Bytes already verified and in memory: no thread hop.
                data = handle.nowait(handle.local, off, size)
                if data is None and self._inline_disk_reads and self._thread_reads == 0:
                    # Cached chunks not in the page cache: read from the disk cache here,
                    # unless other reads wait in threads (they keep the disk busy in parallel;
                    # this one joins them). A thread hop costs two wake-ups, more than the
                    # disk read of a chunk on a local disk (docs/CONCURRENCY.md).
                    data = handle.nowait(handle.local, off, size, True)
                    if data is not None:
                        self.stats.disk_reads_inline += 1
                if data is not None:
                    self.stats.fast_reads += 1
                    return data
            if handle.kind == "blob":
                return await self._read_thread(layer, layer.read_blob, off, size)
            return await self._read_thread(layer, layer.read, handle.local, off, size)
        except (lse.VerificationError, lse.RegistryError, lse.CacheError) as exc:
            self.stats.read_errors += 1
            log.error(
                "read_failed",
                kind=handle.kind,
                digest=layer.compressed_digest,
                ino=handle.local,
                offset=off,
                size=size,
                error_type=type(exc).__name__,
                error=str(exc),
            )
            raise _fuse_error(errno.EIO) from None
        except Exception:
            self.stats.read_errors += 1
            raise
        finally:
            self.stats.read_ns += time.perf_counter_ns() - t0

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            _unhold(handle.layer)

    async def flush(self, fh: int) -> None:
        # Nothing is ever written. ENOSYS makes the kernel stop sending FLUSH (fc->no_flush)
        # and treat it as success: every close() of a file saves a synchronous round trip.
        raise _fuse_error(errno.ENOSYS)

    # -- xattrs and statfs -----------------------------------------------------------------------

    def _xattrs(self, inode: int) -> Mapping[str, bytes]:
        if inode == pyfuse3.ROOT_INODE or inode in self._ref_by_ino or inode in self._key_by_ino:
            self._attr_of(inode)
            return {}
        layer, local = self._content(inode)
        return layer.index.xattrs(local)

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._check_caller(inode, ctx)
        value = self._xattrs(inode).get(os.fsdecode(name))
        if value is None:
            raise _fuse_error(pyfuse3.ENOATTR)
        return value

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        self._check_caller(inode, ctx)
        return [os.fsencode(n) for n in self._xattrs(inode)]

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = self._next_ino
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- forgetting failures (credentials arrived) ------------------------------------------------

    def _note_negative_name(self, ref_dir: _RefDir, key: str, timeout: float) -> None:
        """Remember that the kernel may now hold a negative dentry ``key`` in ``ref_dir`` for
        *timeout* seconds (bounded: the oldest names are dropped first; a dropped name only
        loses the early invalidation, never correctness)."""
        if timeout <= 0:
            return
        slot = (ref_dir.ino, key)
        self._negative_names.pop(slot, None)
        self._negative_names[slot] = (self._clock() + timeout, ref_dir.ref)
        while len(self._negative_names) > NEGATIVE_CACHE_MAX:
            self._negative_names.popitem(last=False)

    def forget_failures(self, matches: Callable[[str], bool]) -> list[tuple[int, bytes]]:
        """Trio thread. Forget the remembered failed layer lookups of the references for which
        ``matches(ref)`` is true; return the (parent inode, name) of the kernel's negative
        dentries that still live for them, to be invalidated (:func:`invalidate_entries`)."""

        def ref_of(name: str) -> str:
            try:
                return base64.b64decode(name.encode("ascii")).decode("utf-8")
            except (ValueError, UnicodeError):
                return ""

        dropped = self._negative.discard_if(lambda slot, _neg: matches(ref_of(slot[0])))
        now = self._clock()
        names: list[tuple[int, bytes]] = []
        for slot, (expiry, ref) in list(self._negative_names.items()):
            if expiry <= now:
                del self._negative_names[slot]
            elif matches(ref):
                del self._negative_names[slot]
                names.append((slot[0], os.fsencode(slot[1])))
        if dropped or names:
            log.info("lookup_failures_forgotten", failures=len(dropped), dentries=len(names))
        return names

    async def forget_failures_async(self, matches: Callable[[str], bool]) -> int:
        """Trio thread: :meth:`forget_failures`, then the kernel's negative dentries are
        invalidated in a worker thread (``invalidate_entry`` blocks while a request on the
        directory is in flight, which this loop must stay free to answer). Not abandoned on
        cancellation: the loop, and so the FUSE session, outlives the invalidation."""
        names = self.forget_failures(matches)
        if names:
            await trio.to_thread.run_sync(invalidate_entries, names)
        return len(names)

    def forget_failures_from_thread(self, matches: Callable[[str], bool]) -> int:
        """Any thread but the trio thread: :meth:`forget_failures_async` on the running loop,
        waiting for it, so that once this returns the kernel no longer answers those names
        negatively by itself. Without a running loop there is nothing to forget (no lookup was
        answered, or the mount is gone): returns 0."""
        token = getattr(pyfuse3, "trio_token", None)  # set by pyfuse3.main while it runs
        if token is None:
            return 0
        try:
            return trio.from_thread.run(self.forget_failures_async, matches, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled):
            return 0

    # -- use / release ---------------------------------------------------------------------------

    @_guarded
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_caller(parent_inode, ctx)
        kd = self._key_by_ino.get(parent_inode)
        if kd is None or parent_inode != kd.ino or name != b"use":
            raise _fuse_error(errno.EROFS)
        ref, key = kd.ref_dir.ref, kd.key
        try:
            await self._lookup_thread(ref, self._provider.use, ref, key)
        except Exception as exc:
            log.warning("layer_use_failed", ref=ref, key=key, error=repr(exc))
        # containers/storage expects ENOENT from a store that counts users.
        raise _fuse_error(errno.ENOENT)

    @_guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_caller(parent_inode, ctx)
        ref_dir = self._ref_by_ino.get(parent_inode)
        key = os.fsdecode(name)
        if ref_dir is None or not is_valid_digest(key):
            raise _fuse_error(errno.EROFS)
        try:
            await self._lookup_thread(ref_dir.ref, self._provider.release, ref_dir.ref, key)
        except Exception as exc:
            log.warning("layer_release_failed", ref=ref_dir.ref, key=key, error=repr(exc))
        raise _fuse_error(errno.ENOENT)

    # -- everything that would write -------------------------------------------------------------

    async def _readonly(self, *args: Any, **kwargs: Any) -> Any:
        raise _fuse_error(errno.EROFS)

    setattr = _readonly
    mknod = _readonly
    mkdir = _readonly
    unlink = _readonly
    symlink = _readonly
    rename = _readonly
    link = _readonly
    write = _readonly
    setxattr = _readonly
    removexattr = _readonly


def invalidate_entries(names: Sequence[tuple[int, bytes]]) -> None:
    """Worker thread: drop the kernel's dentries (negative ones included) ``name`` in directory
    ``parent``. ENOENT means the kernel holds no such entry (expired, or the directory was
    forgotten): nothing to do."""
    for parent, name in names:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning(
                    "dentry_invalidation_failed", parent=parent, name=os.fsdecode(name),
                    error=exc.strerror,
                )  # fmt: skip


def ino_base_of(ops: StoreOperations, key: str) -> int | None:
    """The inode block base of a layer, by identity or compressed digest (tests and
    diagnostics)."""
    block = ops._blocks.get(key)
    if block is None:
        for b in ops._block_list:
            if b.layer is not None and b.layer.compressed_digest == key:
                return b.base
    return None if block is None else block.base
