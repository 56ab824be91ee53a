"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

The socket path may be a filesystem path or an abstract socket written with a leading ``@``.
Without ``$NOTIFY_SOCKET`` (not started by systemd with ``Type=notify``) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def _address(path: str) -> str | bytes:
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); True when a datagram was sent.

    Errors (socket gone, permission) return False: notification is best effort.
    """
    environ = os.environ if env is None else env
    path = environ.get("NOTIFY_SOCKET", "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(path))
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    msg = "READY=1" if not status else f"READY=1\nSTATUS={status}"
    return sd_notify(msg)


def stopping() -> bool:
    return sd_notify("STOPPING=1")
