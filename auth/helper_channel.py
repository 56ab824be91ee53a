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
import socket
from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from auth.errors import HelperChannelError
from auth.helper_protocol import DEFAULT_SOCKET_PATH, MAX_PAYLOAD, SOCKET_NAME
from layerstore.common.unixsock import MessageTooLarge, UnixSocketServer, peer_uid, read_to_end

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "MAX_PAYLOAD",
    "SOCKET_NAME",
    "HelperChannelServer",
    "HelperCredentialSink",
]

log = structlog.get_logger(__name__)

CONNECTION_TIMEOUT = 5.0
MAX_CONCURRENT_CONNECTIONS = 16


class HelperCredentialSink(Protocol):
    def add_helper_credentials(self, payload: Mapping[str, Any]) -> int: ...


def _reply(conn: socket.socket, doc: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(doc).encode("utf-8") + b"\n")


class HelperChannelServer(UnixSocketServer):
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
        super().__init__(
            socket_path,
            accept_thread="auth-helper-channel",
            connection_thread="auth-helper-conn",
            max_connections=MAX_CONCURRENT_CONNECTIONS,
            listening_event="auth_helper_channel_listening",
            failure_event="auth_helper_connection_failed",
            error=HelperChannelError,
            in_use_hint=": is another stargz-store using the same socket?",
        )
        self._sink = sink
        self._timeout = connection_timeout
        self._max_payload = max_payload
        self._allowed_uids = {0, os.getuid()}

    def reply_busy(self, conn: socket.socket) -> None:
        _reply(conn, {"ok": False, "error": "busy"})

    def handle_connection(self, conn: socket.socket) -> None:
        """Serve one accepted connection (public for tests)."""
        conn.settimeout(self._timeout)
        uid = peer_uid(conn)
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
        try:
            return read_to_end(conn, self._max_payload)
        except socket.timeout:
            raise HelperChannelError("timed out reading the request") from None
        except MessageTooLarge:
            raise HelperChannelError(f"request larger than {self._max_payload} bytes") from None
        except OSError as e:
            raise HelperChannelError(f"reading the request failed: {e.strerror}") from None

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
