"""The daemon's control socket, ``<root>/control.sock``: how ``stargz-store status`` and
``stargz-store cache`` talk to the running daemon.

Protocol (version 1), one request per connection, JSON over a Unix stream socket:

* the client sends one JSON object, ``{"v": 1, "op": "status"}`` (or ``"cache_prune"`` with
  ``"max_bytes"``: an integer or null; or ``"cache_clear"``), at most ``MAX_REQUEST`` bytes, and
  shuts down its write side;
* the server answers one JSON object and closes: ``{"v": 1, "ok": true, "result": {...}}`` or
  ``{"v": 1, "ok": false, "error": "one line"}``.

A request with another ``"v"`` is refused with an error naming the versions served, so a newer
CLI can tell an older daemon apart. Within a version, fields are only ever added.

Security: the status names images (possibly private ones) and the cache operations change the
daemon's state, so the socket is root's alone. It is created 0600 inside a private (0700)
temporary directory and renamed into place (never reachable with looser permissions), and
each connection's peer uid (SO_PEERCRED) must be root or the daemon's own uid; others get
"permission denied" and a warning in the log. A socket already at the path is replaced only
when nothing answers on it: a live one belongs to another daemon on the same ``--root``.

Threads: ``stargz-control`` accepts (a selector with a wake-up socketpair, so ``stop`` is
prompt); each connection is served by a ``stargz-control-conn`` thread, at most
``MAX_CONNECTIONS`` at once (more are answered "busy"). A handler runs library calls that may
take a while (``cache clear`` unlinks every cached file), never on the trio thread.
"""

from __future__ import annotations

import contextlib
import errno
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
from typing import Any, Callable

from stargz_store.log import get_logger

log = get_logger(__name__)

SOCKET_NAME = "control.sock"
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_REQUEST = 64 * 1024
MAX_RESPONSE = 64 * 1024 * 1024
CONNECTION_TIMEOUT = 10.0
MAX_CONNECTIONS = 4
PROBE_TIMEOUT = 2.0

Handler = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""A request (already checked for its version) -> the result; raise :class:`RequestError`."""


class ControlError(Exception):
    """The control socket cannot be used; the message is one user-facing line."""


class NoDaemonError(ControlError):
    """No daemon listens on the socket (missing, or nothing answers)."""


class RequestError(Exception):
    """A request the daemon refuses (unknown op, bad argument); one line for the client."""


def socket_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / SOCKET_NAME


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux), else None."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:  # pragma: no cover - not Linux
        return None
    raw = conn.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def socket_is_live(path: str | os.PathLike[str], timeout: float = PROBE_TIMEOUT) -> bool:
    """Does a process listen on ``path``? Only a refused connection or a missing file means no:
    an unclear answer (timeout, full backlog) is taken as live, never to unlink a live socket."""
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


def bind_private_unix(path: Path, backlog: int = 16) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start (bound in a private
    temporary directory beside it, then renamed into place). A stale socket at ``path`` is
    replaced; a live one, or anything that is not a socket, is refused (ControlError)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ControlError(f"cannot use {path}: {e.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{path} exists and is not a socket")
        if socket_is_live(path):
            raise ControlError(f"{path} is in use (a process answers on it)")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    # sun_path holds 107 bytes; the temporary name below is at most 10 bytes longer.
    if len(os.fsencode(str(path.parent))) + 18 > 107 or len(os.fsencode(str(path))) > 107:
        raise ControlError(f"socket path too long for a Unix socket: {path}")
    try:
        private = tempfile.mkdtemp(prefix=".s", dir=path.parent)  # mode 0700
    except OSError as e:
        raise ControlError(f"cannot create a socket under {path.parent}: {e.strerror}") from None
    tmp = os.path.join(private, "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(tmp)
        os.chmod(tmp, 0o600)
        listener.listen(backlog)
        os.rename(tmp, path)
    except OSError as e:
        listener.close()
        raise ControlError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return listener


def _send(conn: socket.socket, doc: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(doc, separators=(",", ":")).encode("utf-8") + b"\n")


def _error(message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": message}


class ControlServer:
    """Serves :data:`Handler` requests on ``path`` until :meth:`stop`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Handler,
        *,
        timeout: float = CONNECTION_TIMEOUT,
        allowed_uids: set[int] | None = None,
    ) -> None:
        self._path = Path(path)
        self._handler = handler
        self._timeout = timeout
        self._allowed = allowed_uids if allowed_uids is not None else {0, os.getuid()}
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._inode: int | None = None

    @property
    def path(self) -> Path:
        return self._path

    def start(self) -> None:
        """Bind and start accepting; raises ControlError."""
        if self._listener is not None:
            raise ControlError("control server already started")
        self._listener = bind_private_unix(self._path)
        self._inode = os.lstat(self._path).st_ino
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="stargz-control", daemon=True)
        self._thread.start()
        log.info("control_socket_listening", socket=str(self._path))

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
                        _send(conn, _error("busy: too many control connections"))
                        conn.close()
                        continue
                    threading.Thread(
                        target=self._serve_one,
                        args=(conn,),
                        name="stargz-control-conn",
                        daemon=True,
                    ).start()
        finally:
            sel.close()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handle_connection(conn)
        except Exception as e:  # one connection never ends the server
            log.error("control_connection_failed", error=repr(e), exc_info=True)
        finally:
            self._slots.release()

    def handle_connection(self, conn: socket.socket) -> None:
        """Serve one accepted connection (public for tests)."""
        conn.settimeout(self._timeout)
        uid = peer_uid(conn)
        if uid is not None and uid not in self._allowed:
            log.warning("control_connection_refused", uid=uid)
            # Read (and drop) the request first: closing with unread bytes resets the
            # connection, and the client would see ECONNRESET instead of the answer.
            with contextlib.suppress(RequestError, OSError):
                self._receive(conn)
            _send(conn, _error("permission denied"))
            return
        try:
            request = self._receive(conn)
        except RequestError as e:
            _send(conn, _error(str(e)))
            return
        version = request.get("v")
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            _send(conn, _error(f"unsupported protocol version {version!r} (served: {supported})"))
            return
        op = request.get("op")
        try:
            result = self._handler(request)
        except RequestError as e:
            log.info("control_request_refused", op=str(op)[:40], error=str(e))
            _send(conn, _error(str(e)))
            return
        except Exception as e:
            log.error("control_request_failed", op=str(op)[:40], error=repr(e), exc_info=True)
            _send(conn, _error(f"the daemon failed to answer: {type(e).__name__}: {e}"))
            return
        _send(conn, {"v": PROTOCOL_VERSION, "ok": True, "result": dict(result)})

    @staticmethod
    def _receive(conn: socket.socket) -> dict[str, Any]:
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                raise RequestError("timed out reading the request") from None
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_REQUEST:
                raise RequestError(f"request larger than {MAX_REQUEST} bytes")
            chunks.append(chunk)
        try:
            doc = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise RequestError("request is not valid JSON") from None
        if not isinstance(doc, dict):
            raise RequestError("request is not a JSON object")
        return doc


# --- the client ----------------------------------------------------------------------------------


def request(
    root: str | os.PathLike[str], op: str, *, timeout: float = 30.0, **args: Any
) -> dict[str, Any]:
    """Send one request to the daemon on *root*; its ``result``. Raises :class:`NoDaemonError`
    when no daemon answers there, :class:`ControlError` for every other failure (permission,
    timeout, an error answered by the daemon)."""
    path = socket_path(root)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise NoDaemonError(
                f"no stargz-store daemon is running on {root} (no {path})"
            ) from None
        except ConnectionRefusedError:
            raise NoDaemonError(
                f"no stargz-store daemon is running on {root} (nothing answers on {path})"
            ) from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run this as root") from None
        except socket.timeout:
            raise ControlError(f"the daemon did not accept a connection on {path}") from None
        except OSError as e:
            if e.errno == errno.ENOTSOCK:
                raise NoDaemonError(f"{path} is not a socket") from None
            raise ControlError(f"cannot connect to {path}: {e.strerror}") from None
        body = json.dumps({"v": PROTOCOL_VERSION, "op": op, **args}).encode("utf-8")
        try:
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            answer = _read_all(sock)
        except socket.timeout:
            raise ControlError(f"the daemon did not answer within {timeout:g} s") from None
        except OSError as e:
            raise ControlError(f"talking to the daemon failed: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        doc = json.loads(answer)
    except (ValueError, UnicodeDecodeError):
        raise ControlError("the daemon's answer is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ControlError("the daemon's answer is not a JSON object")
    if not doc.get("ok"):
        message = str(doc.get("error") or "request failed")
        if message == "permission denied":
            raise ControlError(f"permission denied by the daemon on {path}: run this as root")
        raise ControlError(f"the daemon refused: {message}")
    result = doc.get("result")
    if not isinstance(result, dict):
        raise ControlError("the daemon's answer has no result")
    return result


def _read_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_RESPONSE:
            raise ControlError(f"the daemon's answer is larger than {MAX_RESPONSE} bytes")
        chunks.append(chunk)
