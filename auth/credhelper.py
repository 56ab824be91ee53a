"""docker-credential-* helpers, the ``get`` verb only.

The protocol (docker/docker-credential-helpers, as containers/image uses it): run
``docker-credential-<name> get`` with the server (the registry host as written in
``credHelpers``) on stdin; on success stdout is ``{"ServerURL": ..., "Username": ...,
"Secret": ...}``. A username of ``<token>`` means the secret is an identity (refresh) token. On
failure the helper exits non-zero and prints the error on stdout; exactly
``credentials not found in native keychain`` means "no credentials", which is not an error.

Stdout may hold secrets, so no error message here ever contains it. The helper runs in its own
session (process group) and the whole group is killed when it overruns the timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Mapping

from auth.errors import CredentialHelperError
from auth.types import Credentials

DEFAULT_TIMEOUT = 10.0
NOT_FOUND_MESSAGE = "credentials not found in native keychain"
TOKEN_USERNAME = "<token>"
MAX_OUTPUT = 1 << 20

_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def helper_program(name: str) -> str:
    """The executable name for helper *name*; refuses names that could escape ``$PATH``."""
    if not _HELPER_NAME.match(name):
        raise CredentialHelperError(f"invalid credential helper name {name!r}")
    return f"docker-credential-{name}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def get_credentials(
    name: str,
    server: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Credentials | None:
    """Ask helper *name* for *server*'s credentials.

    Returns None when the helper has none. Raises CredentialHelperError when the helper is
    missing, fails, times out (it is killed) or answers something that is not the expected JSON.
    *env* replaces the environment of the helper (and its ``PATH`` is used to find it).
    """
    program = helper_program(name)
    try:
        proc = subprocess.Popen(
            [program, "get"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            close_fds=True,
        )
    except FileNotFoundError:
        raise CredentialHelperError(f"credential helper {program} not found in PATH") from None
    except OSError as e:
        raise CredentialHelperError(
            f"credential helper {program} could not be started: {e.strerror or type(e).__name__}"
        ) from None
    try:
        out, _ = proc.communicate(server.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise CredentialHelperError(
            f"credential helper {program} timed out after {timeout:g} s for {server}"
        ) from None
    finally:
        if proc.poll() is None:  # pragma: no cover - only on unexpected exceptions
            _kill_group(proc)
            proc.wait()

    if proc.returncode != 0:
        if out.strip().decode("utf-8", "replace") == NOT_FOUND_MESSAGE:
            return None
        raise CredentialHelperError(
            f"credential helper {program} failed for {server} (exit status {proc.returncode})"
        )
    if len(out) > MAX_OUTPUT:
        raise CredentialHelperError(f"credential helper {program} answered too much for {server}")
    try:
        doc = json.loads(out)
    except (ValueError, UnicodeDecodeError):
        raise CredentialHelperError(
            f"credential helper {program} answered invalid JSON for {server}"
        ) from None
    if not isinstance(doc, dict):
        raise CredentialHelperError(
            f"credential helper {program} answered a non-object for {server}"
        )
    username = doc.get("Username") or ""
    secret = doc.get("Secret") or ""
    if not isinstance(username, str) or not isinstance(secret, str):
        raise CredentialHelperError(
            f"credential helper {program} answered non-string fields for {server}"
        )
    if username == TOKEN_USERNAME:
        creds = Credentials(identity_token=secret)
    else:
        creds = Credentials(username=username, password=secret)
    return None if creds.is_empty() else creds
