"""containers-auth.json(5) files: which files, in which order, and what one file says for a
registry.

The file chain (as containers/image ``pkg/docker/config`` builds it on Linux):

1. ``$REGISTRY_AUTH_FILE`` when set and non-empty. It *replaces* the whole chain (podman turns the
   variable into ``SystemContext.AuthFilePath``, which marks the path as user-specified).
2. ``$XDG_RUNTIME_DIR/containers/auth.json`` when ``XDG_RUNTIME_DIR`` is set (skipped with a
   warning when that directory does not exist, as upstream does), else
   ``/run/containers/<uid>/auth.json`` (``/run/containers/0/auth.json`` for root).
3. ``${XDG_CONFIG_HOME:-$HOME/.config}/containers/auth.json``
4. ``$DOCKER_CONFIG/config.json`` when ``DOCKER_CONFIG`` is set, else ``$HOME/.docker/config.json``
5. ``$HOME/.dockercfg`` in the legacy format (the top level *is* the map of auth entries).

Our own extension: extra files from the daemon configuration (e.g. the kubelet's
``/var/lib/kubelet/config.json``) are searched after the chain, even when ``REGISTRY_AUTH_FILE``
is set. They use the ordinary (non-legacy) format.

Within one file (``find_in_file``):

1. ``credHelpers[<registry host>]``: ask ``docker-credential-<name>``; whatever it answers (also
   "not found") ends the search *in this file*.
2. ``auths`` keys from the most to the least specific: ``host/ns/repo``, ``host/ns``, ``host``
   (a legacy file is searched for ``host`` only). The first key present ends the search in this
   file, even when its entry turns out empty (Docker writes ``{}`` entries next to helpers).
3. Keys normalised the way containers/image does: a key with an ``http://``/``https://`` scheme
   (or any key of a legacy file) is cut to its host, and ``docker.io`` /
   ``registry-1.docker.io`` / ``index.docker.io`` are one registry, so
   ``https://index.docker.io/v1/`` matches ``docker.io``.

``auth`` is base64 of ``user:password`` split at the first colon (NULs trimmed from the
password); an ``auth`` without a colon yields nothing (a helper marker). ``identitytoken`` is an
OAuth2 refresh token.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pwd
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from auth.errors import AuthFileError
from auth.types import Credentials

#: docker.io and the host names that mean the same registry.
DOCKER_IO = "docker.io"
DOCKER_IO_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

#: Auth files larger than this are refused (real ones are a few KiB).
MAX_AUTH_FILE_SIZE = 4 << 20

#: ``(helper name, server) -> Credentials | None``; raises CredentialHelperError.
HelperRunner = Callable[[str, str], Optional[Credentials]]


@dataclass(frozen=True)
class AuthEnvironment:
    """Everything the file chain depends on, injected so tests do not read the real machine.

    ``env`` is the process environment (only the variables named in the module docstring are
    used); ``home`` is the home directory (``$HOME``, else the password database);
    ``extra_files`` are searched after the chain.
    """

    env: Mapping[str, str] = field(default_factory=dict)
    uid: int = 0
    home: str = ""
    extra_files: tuple[Path, ...] = ()

    @classmethod
    def from_os(cls, extra_files: Sequence[str | os.PathLike[str]] = ()) -> AuthEnvironment:
        """The environment of this process."""
        env = dict(os.environ)
        uid = os.getuid()
        home = env.get("HOME", "")
        if not home:
            try:
                home = pwd.getpwuid(uid).pw_dir
            except KeyError:
                home = ""
        return cls(env=env, uid=uid, home=home, extra_files=tuple(Path(p) for p in extra_files))

    @property
    def home_dir(self) -> str:
        return self.home or self.env.get("HOME", "")


@dataclass(frozen=True)
class AuthPath:
    """One file of the chain and whether it is in the legacy ``.dockercfg`` format."""

    path: Path
    legacy: bool = False


def auth_file_paths(environment: AuthEnvironment, *, include_extra: bool = True) -> list[AuthPath]:
    """The files to search, in order (they need not exist). Extra files come last."""
    env = environment.env
    paths: list[AuthPath] = []
    user_file = env.get("REGISTRY_AUTH_FILE", "")
    if user_file:
        paths.append(AuthPath(Path(user_file)))
    else:
        runtime_dir = env.get("XDG_RUNTIME_DIR", "")
        if runtime_dir:
            # Upstream warns and goes on without this entry when the directory is missing.
            if os.path.isdir(runtime_dir):
                paths.append(AuthPath(Path(runtime_dir) / "containers" / "auth.json"))
        else:
            paths.append(AuthPath(Path(f"/run/containers/{environment.uid}/auth.json")))
        home = environment.home_dir
        config_home = env.get("XDG_CONFIG_HOME", "") or os.path.join(home, ".config")
        paths.append(AuthPath(Path(config_home) / "containers" / "auth.json"))
        docker_config = env.get("DOCKER_CONFIG", "")
        if docker_config:
            paths.append(AuthPath(Path(docker_config) / "config.json"))
        else:
            paths.append(AuthPath(Path(home) / ".docker" / "config.json"))
        paths.append(AuthPath(Path(home) / ".dockercfg", legacy=True))
    if include_extra:
        paths.extend(AuthPath(Path(p)) for p in environment.extra_files)
    return paths


@dataclass(frozen=True)
class AuthEntry:
    """One ``auths`` value, undecoded. ``repr`` hides both fields."""

    auth: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)


@dataclass(frozen=True)
class AuthFile:
    """The parsed content of one auth file (key order preserved)."""

    path: Path
    legacy: bool
    auths: Mapping[str, AuthEntry]
    cred_helpers: Mapping[str, str]


def _parse_entry(path: Path, key: str, value: Any) -> AuthEntry:
    if value is None:
        return AuthEntry()
    if not isinstance(value, dict):
        raise AuthFileError(f"{path}: auth entry {key!r} is not a JSON object")
    auth = value.get("auth") or ""
    token = value.get("identitytoken") or ""
    if not isinstance(auth, str) or not isinstance(token, str):
        raise AuthFileError(f"{path}: auth entry {key!r} has a non-string field")
    return AuthEntry(auth=auth, identity_token=token)


def _parse_auths(path: Path, value: Any) -> dict[str, AuthEntry]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AuthFileError(f"{path}: 'auths' is not a JSON object")
    return {str(k): _parse_entry(path, str(k), v) for k, v in value.items()}


def parse_auth_file(path: Path, data: bytes, *, legacy: bool = False) -> AuthFile:
    """Parse one file's bytes. Raises AuthFileError (whose message never quotes the content)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        # The JSON error text can quote the document: keep only the position.
        where = ""
        if isinstance(e, json.JSONDecodeError):
            where = f" (line {e.lineno}, column {e.colno})"
        raise AuthFileError(f"{path}: not valid JSON{where}") from None
    if not isinstance(doc, dict):
        raise AuthFileError(f"{path}: the top level is not a JSON object")
    if legacy:
        return AuthFile(path=path, legacy=True, auths=_parse_auths(path, doc), cred_helpers={})
    helpers_raw = doc.get("credHelpers")
    helpers: dict[str, str] = {}
    if helpers_raw is not None:
        if not isinstance(helpers_raw, dict):
            raise AuthFileError(f"{path}: 'credHelpers' is not a JSON object")
        for k, v in helpers_raw.items():
            if not isinstance(v, str):
                raise AuthFileError(f"{path}: credHelpers entry {k!r} is not a string")
            helpers[str(k)] = v
    return AuthFile(
        path=path, legacy=False, auths=_parse_auths(path, doc.get("auths")), cred_helpers=helpers
    )


def read_auth_file(auth_path: AuthPath) -> AuthFile | None:
    """Read and parse one file; None when it does not exist. Raises AuthFileError."""
    path = auth_path.path
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_AUTH_FILE_SIZE + 1)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        raise AuthFileError(f"{path}: cannot read: {e.strerror or type(e).__name__}") from None
    if len(data) > MAX_AUTH_FILE_SIZE:
        raise AuthFileError(f"{path}: larger than {MAX_AUTH_FILE_SIZE} bytes")
    return parse_auth_file(path, data, legacy=auth_path.legacy)


def canonical_host(host: str) -> str:
    """Lower-case *host*; the docker.io aliases become ``docker.io``."""
    h = host.lower()
    return DOCKER_IO if h in DOCKER_IO_ALIASES else h


def _normalize_registry(registry: str) -> str:
    # containers/image compares docker.io entries as "index.docker.io".
    return "index.docker.io" if registry in DOCKER_IO_ALIASES else registry


def normalize_auth_key(key: str, legacy: bool) -> str:
    """An ``auths`` key as a registry host: scheme and path dropped (for URL keys and legacy
    files), docker.io aliases unified."""
    stripped = key
    for scheme in ("http://", "https://"):
        if stripped.startswith(scheme):
            stripped = stripped[len(scheme) :]
            break
    if legacy or stripped != key:
        stripped = stripped.split("/", 1)[0]
    return _normalize_registry(stripped)


def lookup_keys(host: str, repository: str, legacy: bool) -> list[str]:
    """``auths`` keys to try, best first: ``host/a/b``, ``host/a``, ``host`` (legacy: ``host``)."""
    if legacy:
        return [host]
    key = f"{host}/{repository}" if repository else host
    keys = [key]
    while "/" in key:
        key = key.rsplit("/", 1)[0]
        keys.append(key)
    return keys


def decode_entry(path: Path, key: str, entry: AuthEntry) -> Credentials | None:
    """The credentials of one entry, or None when it holds none. Raises AuthFileError for
    ``auth`` values that are not base64 (the message never contains the value)."""
    try:
        decoded = base64.b64decode(entry.auth, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthFileError(f"{path}: the 'auth' field of entry {key!r} is not base64") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        # Docker writes empty entries next to credential helpers; a non-empty value without a
        # colon is skipped too, as Docker does.
        return None
    creds = Credentials(
        username=user, password=password.strip("\x00"), identity_token=entry.identity_token
    )
    return None if creds.is_empty() else creds


def find_in_file(
    auth_file: AuthFile,
    host: str,
    repository: str,
    helper_runner: HelperRunner | None = None,
) -> Credentials | None:
    """What *auth_file* says for ``host/repository`` (see the module docstring for the order).

    *host* should already be canonical (``canonical_host``). Raises AuthFileError or
    CredentialHelperError.
    """
    helper = auth_file.cred_helpers.get(host)
    if helper is not None:
        if helper_runner is None:
            from auth.credhelper import get_credentials

            return get_credentials(helper, host)
        return helper_runner(helper, host)

    for key in lookup_keys(host, repository, auth_file.legacy):
        entry = auth_file.auths.get(key)
        if entry is not None:
            return decode_entry(auth_file.path, key, entry)

    wanted = _normalize_registry(host)
    for key, entry in auth_file.auths.items():
        if normalize_auth_key(key, auth_file.legacy) == wanted:
            return decode_entry(auth_file.path, key, entry)
    return None
