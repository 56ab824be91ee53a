"""What both ends of the auth-helper channel agree on (``auth.helper_channel`` serves it,
``auth.helper_client`` calls it). Standard library only, like the client: podman runs the
helper with whatever Python the host (or a test chroot) has, without the daemon's
dependencies."""

from __future__ import annotations

SOCKET_NAME = "auth-helper.sock"
DEFAULT_SOCKET_PATH = "/var/lib/stargz-store/" + SOCKET_NAME
MAX_PAYLOAD = 1 << 20
"""Largest request (podman's JSON) in bytes."""
