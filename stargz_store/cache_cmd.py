"""``stargz-store cache prune [--max-size SIZE]`` and ``stargz-store cache clear``.

Both are safe while the daemon runs: when its control socket (``<root>/control.sock``)
answers, the daemon does the work on its own :class:`~layerstore.runtime.cache.ChunkCache`, so
entries leave its bookkeeping before their files go and readers refetch what they miss. When no
daemon answers, the cache directory is opened here, the same way the daemon opens it, under
``<root>/lock`` when that file exists (the daemon holds it with ``flock`` for its life: taken
here, no daemon can start on this root meanwhile; held by someone, a daemon runs that does not
answer on the socket, and nothing is touched).

``prune`` removes the least recently used chunks until the cache holds at most SIZE (default:
``[cache] max_size_bytes`` of the configuration, which a running daemon enforces already; a
smaller SIZE frees disk now). ``clear`` removes every chunk and TOC; layers in use keep
working and fetch again what they read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from stargz_store.cmdline import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    SIZE_HELP,
    ArgParser,
    parse_command_line,
    parse_size_or_zero,
)
from stargz_store.config import DEFAULT_CONFIG_PATH, DEFAULT_ROOT, ConfigError, load_config

PROG = "stargz-store cache"
LOCK_NAME = "lock"
"""``<root>/lock``, the daemon's ``flock`` (see ``stargz_store.daemon``)."""


class CacheCommandError(Exception):
    """One user-facing line; exit status 1."""


def build_parser() -> ArgParser:
    p = ArgParser(
        prog=PROG,
        description="Shrink or empty the chunk cache under --root, safely while the daemon "
        "runs (it is asked over ROOT/control.sock and removes the chunks itself; readers "
        "fetch again what they miss) and also when no daemon runs (the cache directory is "
        "changed here, holding ROOT/lock when it exists). Needs root.",
        epilog="Exit status: 0, 1 when the cache cannot be changed, 2 for bad usage.",
    )
    common = ArgParser(add_help=False)
    common.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        metavar="DIR",
        help=f"the daemon's --root (default {DEFAULT_ROOT})",
    )
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"the daemon's configuration, for [cache] dir and max_size_bytes when no daemon "
        f"runs (default {DEFAULT_CONFIG_PATH}, when present)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up waiting for the daemon after this long (default 600)",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    prune = sub.add_parser(
        "prune",
        parents=[common],
        help="remove least recently used chunks until the cache holds at most SIZE",
        description="Remove the least recently used chunks until the cache holds at most "
        "SIZE bytes.",
    )
    prune.add_argument(
        "--max-size",
        type=parse_size_or_zero,
        default=None,
        metavar="SIZE",
        help=f"{SIZE_HELP}; 0 removes every chunk (default: the configured [cache] max_size_bytes)",
    )
    sub.add_parser(
        "clear",
        parents=[common],
        help="remove every chunk and TOC from the cache",
        description="Remove every chunk and TOC from the cache.",
    )
    return p


def main(argv: Sequence[str]) -> int:
    args = parse_command_line(build_parser(), argv, PROG)
    if isinstance(args, int):
        return args
    if args.action is None:
        print(f"{PROG}: say prune or clear (see {PROG} --help)", file=sys.stderr)
        return EXIT_USAGE
    max_bytes = args.max_size if args.action == "prune" else None
    try:
        done, how = run(args.action, args.root, args.config, max_bytes, args.timeout)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CacheCommandError as exc:
        print(f"{PROG} {args.action}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(describe(args.action, done, how))
    return EXIT_OK


def run(
    action: str,
    root: Path,
    config_path: Path | None,
    max_bytes: int | None,
    timeout: float = 600.0,
) -> tuple[dict[str, Any], str]:
    """Do *action* (``prune``/``clear``); returns the result and how it was done."""
    from stargz_store.control import ControlError, NoDaemonError, request

    root = root.absolute()
    try:
        if action == "prune":
            return request(root, "cache_prune", max_bytes=max_bytes, timeout=timeout), "daemon"
        return request(root, "cache_clear", timeout=timeout), "daemon"
    except NoDaemonError:
        pass
    except ControlError as exc:
        raise CacheCommandError(str(exc)) from None
    return _direct(action, root, config_path, max_bytes), "direct"


def _direct(
    action: str, root: Path, config_path: Path | None, max_bytes: int | None
) -> dict[str, Any]:
    import dataclasses

    from layerstore.errors import LayerStoreError
    from layerstore.runtime.cache import DAEMON_KEY_NAME, ChunkCache
    from stargz_store.log import configure_logging

    config = load_config(config_path)
    cache_dir = Path(config.cache.dir)
    if not cache_dir.is_absolute():
        cache_dir = root / cache_dir
    if not (cache_dir / "packs").is_dir() and not (cache_dir / "chunks").is_dir():
        return {"entries": 0, "bytes": 0, "tocs": 0, "cache_bytes": 0, "missing": str(cache_dir)}
    target = config.cache.max_size_bytes if max_bytes is None else max_bytes
    configure_logging("warning", "auto")  # the cache's own info lines are the daemon's
    with _root_lock(root):
        try:
            # No limit while opening: what goes is decided below, not by the open.
            cache = ChunkCache(
                cache_dir,
                1 << 62,
                key_path=root / DAEMON_KEY_NAME,
                persistent=config.cache.keep_across_restarts,
            )
        except (OSError, LayerStoreError, ValueError) as exc:
            raise CacheCommandError(f"cannot open the cache in {cache_dir}: {exc}") from None
        try:
            done = cache.prune(target) if action == "prune" else cache.clear()
            snap = cache.snapshot()
        finally:
            cache.close()
    return {
        **dataclasses.asdict(done),
        "target_bytes": target,
        "cache_bytes": snap.bytes,
        "cache_entries": snap.entries,
        "max_bytes": config.cache.max_size_bytes,
    }


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield  # a root no daemon with a lock has used
        return
    except OSError as exc:
        raise CacheCommandError(f"cannot open {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise CacheCommandError(
                    f"a stargz-store daemon (pid {holder}) holds {path} but does not answer "
                    f"on {root}/control.sock; nothing was changed"
                ) from None
            raise CacheCommandError(f"cannot lock {path}: {exc.strerror}") from None
        yield
    finally:
        os.close(fd)


def describe(action: str, done: dict[str, Any], how: str) -> str:
    from stargz_store.status_cmd import count, human_bytes

    if "missing" in done:
        return f"no cache in {done['missing']}: nothing to do"
    via = "by the running daemon" if how == "daemon" else "directly (no daemon running)"
    if action == "prune":
        what = f"pruned {count(done['entries'], 'chunk')} ({human_bytes(done['bytes'])})"
    else:
        what = (
            f"cleared {count(done['entries'], 'chunk')} and {count(done['tocs'], 'TOC')} "
            f"({human_bytes(done['bytes'])})"
        )
    return (
        f"{what} {via}; the cache now holds {human_bytes(done['cache_bytes'])} in "
        f"{count(done['cache_entries'], 'chunk')} (limit {human_bytes(done['max_bytes'])})"
    )
