"""The daemon side of podman's ``additional-layer-store-auth-helper`` channel.

podman (containers/image >= v5.32) runs the program named by registries.conf
``additional-layer-store-auth-helper`` on every ``docker://`` pull, with the credentials it
used on stdin. That program is ``stargz-store-helper`` (``auth.helper_client``), which forwards
the JSON over this Unix socket.

Wire protocol (one request per connection): the client sends one JSON document (at most
``MAX_PAYLOAD`` bytes) and shuts down its write side; the server answers one JSON document,
``{"ok": true, "count": N}`` or ``{"ok": false, "error": "..."}``, and closes. Error texts name
references, never credentials.

Security: the socket is created with mode 0600 inside a private (0700) temporary directory and
renamed into place, so it is never reachable with looser permissions; on Linux the peer's uid
(SO_PEERCRED) must also be root or the daemon's own uid. A socket already at the path is
replaced only when nothing answers on it (connect refused): a live one belongs to another
daemon, whose podman clients would otherwise be silently cut off.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from auth.errors import HelperChannelError
from auth.helper_protocol import DEFAULT_SOCKET_PATH, MAX_PAYLOAD, SOCKET_NAME

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "MAX_PAYLOAD",
    "SOCKET_NAME",
    "HelperChannelServer",
    "HelperCredentialSink",
    "socket_is_live",
]

log = structlog.get_logger(__name__)

CONNECTION_TIMEOUT = 5.0
MAX_CONCURRENT_CONNECTIONS = 16
PROBE_TIMEOUT = 2.0


class HelperCredentialSink(Protocol):
    def add_helper_credentials(self, payload: Mapping[str, Any]) -> int: ...


def _peer_uid(conn: socket.socket) -> int | None:
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


def _reply(conn: socket.socket, doc: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(doc).encode("utf-8") + b"\n")


class HelperChannelServer:
    """A Unix socket server feeding ``sink.add_helper_credentials``.

    ``start()`` binds and starts the accepting thread; ``stop()`` (or leaving the ``with``
    block) stops it and removes the socket file.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        sink: HelperCredentialSink,
        *,
        connection_timeout: float = CONNECTION_TIMEOUT,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self._path = Path(socket_path)
        self._sink = sink
        self._timeout = connection_timeout
        self._max_payload = max_payload
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_CONNECTIONS)
        self._inode: int | None = None
        self._allowed_uids = {0, os.getuid()}

    @property
    def path(self) -> Path:
        return self._path

    def __enter__(self) -> HelperChannelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._listener is not None:
            raise HelperChannelError("helper channel already started")
        self._listener = self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="auth-helper-channel", daemon=True)
        self._thread.start()
        log.info("auth_helper_channel_listening", socket=str(self._path))

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
        # Remove the socket file only if it is still ours.
        try:
            if self._inode is not None and os.lstat(self._path).st_ino == self._inode:
                os.unlink(self._path)
        except OSError:
            pass
        self._inode = None

    # --- binding ----------------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        path = self._path
        parent = path.parent
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise HelperChannelError(f"cannot use {path}: {e.strerror}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise HelperChannelError(f"{path} exists and is not a socket")
            if socket_is_live(path):
                raise HelperChannelError(
                    f"{path} is in use (a process answers on it): is another stargz-store "
                    "using the same socket?"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket from an earlier run
        try:
            private = tempfile.mkdtemp(prefix=".auth-helper-", dir=parent)  # mode 0700
        except OSError as e:
            raise HelperChannelError(f"cannot create the socket under {parent}: {e}") from None
        tmp = os.path.join(private, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if len(os.fsencode(tmp)) >= 108 or len(os.fsencode(str(path))) >= 108:
                raise HelperChannelError(f"socket path too long: {path}")
            listener.bind(tmp)
            os.chmod(tmp, 0o600)
            listener.listen(16)
            os.rename(tmp, path)
            self._inode = os.lstat(path).st_ino
        except HelperChannelError:
            listener.close()
            raise
        except OSError as e:
            listener.close()
            raise HelperChannelError(f"cannot listen on {path}: {e.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.rmdir(private)
        return listener

    # --- serving ----------------------------------------------------------------------------
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
                        _reply(conn, {"ok": False, "error": "busy"})
                        conn.close()
                        continue
                    threading.Thread(
                        target=self._handle_and_release,
                        args=(conn,),
                        name="auth-helper-conn",
                        daemon=True,
                    ).start()
        finally:
            sel.close()

    def _handle_and_release(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handle_connection(conn)
        except Exception:  # never let one connection kill the thread silently
            log.exception("auth_helper_connection_failed")
        finally:
            self._slots.release()

    def handle_connection(self, conn: socket.socket) -> None:
        """Serve one accepted connection (public for tests)."""
        conn.settimeout(self._timeout)
        uid = _peer_uid(conn)
        if uid is not None and uid not in self._allowed_uids:
            log.warning("auth_helper_connection_refused", uid=uid)
            _reply(conn, {"ok": False, "error": "permission denied"})
            return
        try:
            data = self._receive(conn)
            payload = self._decode(data)
            count = self._sink.add_helper_credentials(payload)
        except HelperChannelError as e:
            log.warning("auth_helper_payload_refused", error=str(e))
            _reply(conn, {"ok": False, "error": str(e)})
            return
        _reply(conn, {"ok": True, "count": count})

    def _receive(self, conn: socket.socket) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                raise HelperChannelError("timed out reading the request") from None
            except OSError as e:
                raise HelperChannelError(f"reading the request failed: {e.strerror}") from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self._max_payload:
                raise HelperChannelError(f"request larger than {self._max_payload} bytes")
            chunks.append(chunk)

    @staticmethod
    def _decode(data: bytes) -> Mapping[str, Any]:
        if not data.strip():
            raise HelperChannelError("empty request")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise HelperChannelError("request is not valid JSON") from None
        if not isinstance(doc, dict):
            raise HelperChannelError("request is not a JSON object")
        return doc
