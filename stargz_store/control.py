"""The daemon's control socket, ``<root>/control.sock``: how ``stargz-store status`` and
``stargz-store cache`` talk to the running daemon.

Protocol (version 1), one request per connection, JSON over a Unix stream socket:

* the client sends one JSON object, ``{"v": 1, "op": "status"}`` (or ``"cache_prune"`` with
  ``"max_bytes"``: an integer or null; or ``"cache_clear"``; or ``"record_stop"``), at most
  ``MAX_REQUEST`` bytes, and shuts down its write side;
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
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from layerstore.common.unixsock import MessageTooLarge, UnixSocketServer, peer_uid, read_to_end
from stargz_store.log import get_logger

log = get_logger(__name__)

SOCKET_NAME = "control.sock"
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_REQUEST = 64 * 1024
MAX_RESPONSE = 64 * 1024 * 1024
CONNECTION_TIMEOUT = 10.0
MAX_CONNECTIONS = 4

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


def _send(conn: socket.socket, doc: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(doc, separators=(",", ":")).encode("utf-8") + b"\n")


def _error(message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": message}


class ControlServer(UnixSocketServer):
    """Serves :data:`Handler` requests on ``path`` until :meth:`stop`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Handler,
        *,
        timeout: float = CONNECTION_TIMEOUT,
        allowed_uids: set[int] | None = None,
    ) -> None:
        super().__init__(
            path,
            accept_thread="stargz-control",
            connection_thread="stargz-control-conn",
            max_connections=MAX_CONNECTIONS,
            listening_event="control_socket_listening",
            failure_event="control_connection_failed",
            error=ControlError,
        )
        self._handler = handler
        self._timeout = timeout
        self._allowed = allowed_uids if allowed_uids is not None else {0, os.getuid()}

    def reply_busy(self, conn: socket.socket) -> None:
        _send(conn, _error("busy: too many control connections"))

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
        try:
            body = read_to_end(conn, MAX_REQUEST)
        except socket.timeout:
            raise RequestError("timed out reading the request") from None
        except MessageTooLarge:
            raise RequestError(f"request larger than {MAX_REQUEST} bytes") from None
        try:
            doc = json.loads(body)
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
            answer = read_to_end(sock, MAX_RESPONSE)
        except MessageTooLarge:
            raise ControlError(f"the daemon's answer is larger than {MAX_RESPONSE} bytes") from None
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
