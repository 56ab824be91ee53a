"""``stargz-store-helper``: podman's additional-layer-store-auth-helper, forwarding to the daemon.

How podman calls it (containers/image ``docker/docker_image_src.go``, ``newImageSource``, read
at containers/image HEAD; the option exists since v5.32 = podman 5.2):

- registries.conf top-level ``additional-layer-store-auth-helper = "<program>"`` (drop-ins
  can set it too; the last non-empty value wins). No ``[[registry]]`` scoping.
- After the manifest of a ``docker://`` source was loaded (i.e. once per pull, per image),
  it runs ``exec.Command(<program>)``: **no arguments**, the program is found via ``$PATH`` if
  the value has no slash, the environment is podman's, and there is no timeout.
- stdin is one JSON object, no trailing newline: ``{"<physical ref>": {"username": ...,
  "password": ..., "identityToken": ...}}``, each field omitted when empty. The reference is the
  *physical* one (after registries.conf rewriting / the mirror actually used) in
  ``reference.String()`` form, ``host/path:tag`` or ``host/path@sha256:...``. The credentials
  are the ones podman's client used for that registry (``--creds``, ``--authfile``, auth.json,
  helpers; an anonymous pull sends an entry with no fields).
- A non-zero exit (or a failure to start) is only logged as a warning (``Failed to call
  additional-layer-store-auth-helper``); the pull goes on. stdout and stderr are not read.

So this program: reads stdin (at most 1 MiB), checks it is a JSON object, connects to the
daemon's socket (``--socket``, else ``$STARGZ_STORE_HELPER_SOCKET``, else
``/var/lib/stargz-store/auth-helper.sock``), sends it, shuts down its write side and waits for
``{"ok": true}``. Exit status 0 on success; otherwise a warning on stderr (never the payload)
and exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence

from auth.helper_protocol import DEFAULT_SOCKET_PATH, MAX_PAYLOAD

ENV_SOCKET = "STARGZ_STORE_HELPER_SOCKET"
DEFAULT_TIMEOUT = 10.0
MAX_REPLY = 64 * 1024


class _Failure(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stargz-store-helper",
        description=(
            "Forward the registry credentials podman passes to an "
            "additional-layer-store-auth-helper (JSON on stdin) to the stargz-store daemon."
        ),
    )
    p.add_argument(
        "--socket",
        help=f"the daemon's socket (default: ${ENV_SOCKET} or {DEFAULT_SOCKET_PATH})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the daemon (default: %(default)s)",
    )
    return p


def _read_stdin() -> bytes:
    data = sys.stdin.buffer.read(MAX_PAYLOAD + 1)
    if len(data) > MAX_PAYLOAD:
        raise _Failure(f"input larger than {MAX_PAYLOAD} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _Failure("input is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _Failure("input is not a JSON object")
    return data


def forward(data: bytes, socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, object]:
    """Send *data* to the daemon at *socket_path*; the daemon's JSON answer. Raises OSError or
    ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused early; its answer may still be readable
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_REPLY:
                raise ValueError("reply too large")
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks))
    if not isinstance(reply, dict):
        raise ValueError("reply is not a JSON object")
    return reply


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    socket_path = args.socket or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET_PATH
    try:
        data = _read_stdin()
        try:
            reply = forward(data, socket_path, args.timeout)
        except socket.timeout:
            raise _Failure(f"no answer from {socket_path} within {args.timeout:g} s") from None
        except OSError as e:
            raise _Failure(f"cannot reach {socket_path}: {e.strerror or e}") from None
        except ValueError:
            raise _Failure(f"invalid answer from {socket_path}") from None
        if reply.get("ok") is not True:
            error = reply.get("error")
            raise _Failure(f"the daemon refused the credentials: {error}")
    except _Failure as e:
        print(f"stargz-store-helper: warning: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
