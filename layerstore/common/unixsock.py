"""Private Unix stream sockets: what the daemon's two local channels share.

The control socket (``stargz_store.control``: status and cache operations) and the auth-helper
socket (``auth.helper_channel``: credentials from podman) both serve one JSON request per
connection to root and the daemon's own uid only. Both must never be reachable with looser
permissions, even for an instant, and neither may take over a socket that another daemon still
answers on (its clients would be cut off without a word). So both bind the same way
(:func:`bind_private_unix`), check the peer the same way (:func:`peer_uid`), and run the same
accept loop (:class:`UnixSocketServer`); each keeps its own wire format, limits and messages.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import stat
import struct
import tempfile
import threading
from pathlib import Path
from typing import Callable, TypeVar

import structlog

log = structlog.get_logger(__name__)

PROBE_TIMEOUT = 2.0
SUN_PATH_MAX = 107
"""Bytes of a Unix socket path (``sun_path`` holds 108, the last one a NUL)."""


class UnixSocketError(Exception):
    """A socket cannot be set up; the message is one user-facing line."""


class MessageTooLarge(UnixSocketError):
    """The peer sent more than the limit (:func:`read_to_end`)."""


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux), else None."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:  # pragma: no cover - not Linux
        return None
    raw = conn.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def socket_is_live(path: str | os.PathLike[str], timeout: float = PROBE_TIMEOUT) -> bool:
    """Does a process listen on the Unix socket ``path``? Only a refused connection (or a
    vanished file) means no: any other failure (a full backlog, a timeout, no permission) is
    taken as live, so that an unclear answer never leads to unlinking someone's socket."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def bind_private_unix(path: Path, *, backlog: int = 16, in_use_hint: str = "") -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start (bound in a private 0700
    temporary directory beside it, then renamed into place). A stale socket at ``path`` is
    replaced; a live one, or anything that is not a socket, is refused with
    :class:`UnixSocketError` (*in_use_hint* is appended to the message about a live one)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UnixSocketError(f"cannot use {path}: {e.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise UnixSocketError(f"{path} exists and is not a socket")
        if socket_is_live(path):
            raise UnixSocketError(f"{path} is in use (a process answers on it){in_use_hint}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket from an earlier run
    # The temporary name below is at most 18 bytes longer than the parent's.
    limit = SUN_PATH_MAX
    if len(os.fsencode(str(path.parent))) + 18 > limit or len(os.fsencode(str(path))) > limit:
        raise UnixSocketError(f"socket path too long for a Unix socket: {path}")
    try:
        private = tempfile.mkdtemp(prefix=".s", dir=path.parent)  # mode 0700
    except OSError as e:
        raise UnixSocketError(f"cannot create a socket under {path.parent}: {e.strerror}") from None
    tmp = os.path.join(private, "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(tmp)
        os.chmod(tmp, 0o600)
        listener.listen(backlog)
        os.rename(tmp, path)
    except OSError as e:
        listener.close()
        raise UnixSocketError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return listener


_S = TypeVar("_S", bound="UnixSocketServer")


def read_to_end(conn: socket.socket, limit: int) -> bytes:
    """All the peer sends until it shuts down its write side (one message each way per
    connection). Raises :class:`MessageTooLarge` past *limit* bytes; ``socket.timeout`` and
    OSError as ``recv`` raises them."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise MessageTooLarge(f"larger than {limit} bytes")
        chunks.append(chunk)


class UnixSocketServer:
    """Accepts on a private socket (:func:`bind_private_unix`) in one thread and serves each
    connection in a thread of its own, at most *max_connections* at once (one more is answered
    by :meth:`reply_busy` and closed). The accepting thread waits in a selector with a wake-up
    socketpair, so :meth:`stop` is prompt; ``stop`` removes the socket file only while it is
    still the one this server bound.

    Subclasses implement :meth:`handle_connection` (the peer check, the request and the answer)
    and :meth:`reply_busy`. :meth:`start` raises *error* (one line) when the socket cannot be
    set up and logs *listening_event* when it can. An exception from a handler is logged as
    *failure_event* and ends that connection only.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        accept_thread: str,
        connection_thread: str,
        max_connections: int,
        listening_event: str,
        failure_event: str,
        error: Callable[[str], Exception] = UnixSocketError,
        in_use_hint: str = "",
    ) -> None:
        self._path = Path(path)
        self._accept_thread = accept_thread
        self._connection_thread = connection_thread
        self._listening_event = listening_event
        self._failure_event = failure_event
        self._error = error
        self._in_use_hint = in_use_hint
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._inode: int | None = None

    @property
    def path(self) -> Path:
        return self._path

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind and start accepting; raises the server's *error*."""
        if self._listener is not None:
            raise self._error(f"already serving {self._path}")
        try:
            self._listener = bind_private_unix(self._path, in_use_hint=self._in_use_hint)
        except UnixSocketError as e:
            raise self._error(str(e)) from None
        self._inode = os.lstat(self._path).st_ino
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=self._accept_thread, daemon=True)
        self._thread.start()
        log.info(self._listening_event, socket=str(self._path))

    def stop(self) -> None:
        self._stop.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._listener = self._wake_r = self._wake_w = None
        with contextlib.suppress(OSError):  # only if it is still ours
            if self._inode is not None and os.lstat(self._path).st_ino == self._inode:
                os.unlink(self._path)
        self._inode = None

    def handle_connection(self, conn: socket.socket) -> None:
        """Serve one accepted connection (public for tests)."""
        raise NotImplementedError

    def reply_busy(self, conn: socket.socket) -> None:
        """Tell a connection over the limit that the server is busy (best effort)."""
        raise NotImplementedError

    def _serve(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._stop.is_set():
                        return
                    try:
                        conn, _addr = self._listener.accept()
                    except OSError:
                        continue
                    if not self._slots.acquire(blocking=False):
                        self.reply_busy(conn)
                        conn.close()
                        continue
                    threading.Thread(
                        target=self._serve_one,
                        args=(conn,),
                        name=self._connection_thread,
                        daemon=True,
                    ).start()
        finally:
            sel.close()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handle_connection(conn)
        except Exception as e:  # one connection never ends the server
            log.error(self._failure_event, error=repr(e), exc_info=True)
        finally:
            self._slots.release()
