"""CredentialStore: the one place the registry client asks for credentials.

``lookup(host, repository)`` answers, in order:

1. credentials podman handed over through the additional-layer-store-auth-helper channel, for
   exactly this registry host (``host/repository`` first, then the most recent for ``host``).
   They are never used for any other host; a mirror has its own host, so it only gets helper
   credentials when podman pulled from that mirror (the helper receives the *physical*
   reference). The docker.io aliases (``index.docker.io``, ``registry-1.docker.io``) count as
   one host.
2. registries.conf's global ``credential-helpers`` in their order (default: only
   ``containers-auth.json``), where ``containers-auth.json`` stands for the containers-auth.json(5)
   chain (``auth.authfile``; each file re-read when its stat signature changes) and any other
   name for ``docker-credential-<name>`` asked for the registry host,
3. the extra files from our configuration (e.g. the kubelet's config.json), searched last.

A malformed file, a failing credential helper or a bad ``auth`` value is recorded
(``errors()``), logged without contents and skipped: the search goes on with the next file.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from auth.authfile import (
    AuthEnvironment,
    AuthFile,
    AuthPath,
    HelperRunner,
    auth_file_paths,
    canonical_host,
    find_in_file,
    read_auth_file,
)
from auth.credhelper import DEFAULT_TIMEOUT, get_credentials
from auth.errors import AuthError, HelperChannelError
from auth.types import Credentials

log = structlog.get_logger(__name__)

#: At most this many helper-channel entries are kept (least recently added dropped first).
MAX_HELPER_ENTRIES = 4096
#: registries.conf ``credential-helpers`` entry meaning the containers-auth.json(5) files.
AUTH_FILE_HELPER = "containers-auth.json"
#: Seconds a credential helper's answer is reused.
HELPER_CACHE_TTL = 60.0
#: At most this many recent errors are kept for diagnostics.
MAX_ERRORS = 64

_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_HELPER_FIELDS = {"username": "username", "password": "password", "identityToken": "identity_token"}


def split_reference(ref: str) -> tuple[str, str]:
    """``host[:port]/path[:tag][@digest]`` -> (canonical host, path). Raises ValueError.

    The reference must be fully qualified (podman always sends the resolved physical
    reference): a first component that does not look like a host is refused rather than
    guessed, so credentials never land on the wrong registry.
    """
    name = ref
    if "@" in name:
        name, digest = name.split("@", 1)
        if not _DIGEST.match(digest):
            raise ValueError("invalid digest")
    last = name.rfind("/")
    colon = name.rfind(":")
    if colon > last and last != -1:
        tag = name[colon + 1 :]
        if not _TAG.match(tag):
            raise ValueError("invalid tag")
        name = name[:colon]
    host, sep, path = name.partition("/")
    if not sep or not path:
        raise ValueError("reference has no repository path")
    if not _HOST.match(host) or not ("." in host or ":" in host or host == "localhost"):
        raise ValueError("reference does not start with a registry host")
    for comp in path.split("/"):
        if not _PATH_COMPONENT.match(comp):
            raise ValueError("invalid repository path")
    return canonical_host(host), path


def parse_helper_payload(payload: Mapping[str, Any]) -> list[tuple[str, str, Credentials]]:
    """Validate podman's helper JSON: ``{"<ref>": {"username", "password", "identityToken"}}``.

    Returns ``(host, repository, credentials)`` per reference, skipping entries without any
    secret (anonymous pulls). Raises HelperChannelError; messages name references, never values.
    """
    if not isinstance(payload, Mapping):
        raise HelperChannelError("payload is not a JSON object")
    out: list[tuple[str, str, Credentials]] = []
    for ref, entry in payload.items():
        if not isinstance(ref, str):
            raise HelperChannelError("payload key is not a string")
        try:
            host, repository = split_reference(ref)
        except ValueError as e:
            raise HelperChannelError(f"invalid image reference {ref[:300]!r}: {e}") from None
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            raise HelperChannelError(f"entry for {ref!r} is not a JSON object")
        values: dict[str, str] = {}
        for json_name, attr in _HELPER_FIELDS.items():
            value = entry.get(json_name)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise HelperChannelError(f"entry for {ref!r}: {json_name!r} is not a string")
            values[attr] = value
        creds = Credentials(**values)
        if not creds.is_empty():
            out.append((host, repository, creds))
    return out


@dataclass
class _CachedFile:
    signature: tuple[int, int, int, int]
    content: AuthFile | None
    error: AuthError | None


class CredentialStore:
    """Thread-safe credential lookup (see the module docstring for the order).

    *environment* defaults to this process's (``AuthEnvironment.from_os``); *helper_runner*
    replaces the docker-credential-* runner (tests). *credential_helpers* is registries.conf's
    ``credential-helpers`` list (or a callable returning the current one, e.g.
    ``lambda: watched_conf.credential_helpers``). Helper answers are reused for
    *helper_cache_ttl* seconds (shorter for "not found" and errors).
    """

    def __init__(
        self,
        environment: AuthEnvironment | None = None,
        *,
        extra_files: Sequence[str | os.PathLike[str]] = (),
        helper_runner: HelperRunner | None = None,
        helper_timeout: float = DEFAULT_TIMEOUT,
        max_helper_entries: int = MAX_HELPER_ENTRIES,
        helper_cache_ttl: float = HELPER_CACHE_TTL,
        credential_helpers: Sequence[str] | Callable[[], Sequence[str]] = (AUTH_FILE_HELPER,),
    ) -> None:
        if environment is None:
            environment = AuthEnvironment.from_os(extra_files)
        elif extra_files:
            environment = AuthEnvironment(
                env=environment.env,
                uid=environment.uid,
                home=environment.home,
                extra_files=environment.extra_files + tuple(Path(p) for p in extra_files),
            )
        self._environment = environment
        self._helper_timeout = helper_timeout
        self._helper_runner = helper_runner or self._run_helper
        self._helper_cache_ttl = helper_cache_ttl
        self._global_helpers = credential_helpers
        # (helper, server) -> (expiry, credentials or the error), see _cached_helper.
        self._helper_cache: dict[
            tuple[str, str], tuple[float, Credentials | None, AuthError | None]
        ] = {}
        self._max_helper_entries = max_helper_entries
        self._lock = threading.Lock()
        # (host, repository) and (host, "") -> Credentials, most recently added last.
        self._helper: OrderedDict[tuple[str, str], Credentials] = OrderedDict()
        self._files: dict[str, _CachedFile] = {}
        self._errors: list[AuthError] = []
        self._on_added: list[Callable[[str, str], None]] = []

    @property
    def environment(self) -> AuthEnvironment:
        return self._environment

    # --- the helper channel ---------------------------------------------------------------
    def on_credentials_added(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(host, repository)`` whenever credentials for that repository arrive
        through the helper channel (changed or not: podman sends them before every pull).

        It runs in the delivering thread, before ``add_helper_credentials`` returns and so
        before podman's helper gets its answer and podman looks any layer up: what it forgets
        (failed lookups made without these credentials) is gone by then. It may block briefly;
        an exception is logged and does not fail the delivery."""
        with self._lock:
            self._on_added.append(callback)

    def add_helper_credentials(self, payload: Mapping[str, Any]) -> int:
        """Remember the credentials of podman's auth-helper JSON; returns how many references
        carried credentials. Raises HelperChannelError for a malformed payload (nothing is
        stored then)."""
        entries = parse_helper_payload(payload)
        with self._lock:
            for host, repository, creds in entries:
                for key in ((host, repository), (host, "")):
                    self._helper.pop(key, None)
                    self._helper[key] = creds
            while len(self._helper) > self._max_helper_entries:
                self._helper.popitem(last=False)
            callbacks = list(self._on_added)
        for host, repository in dict.fromkeys((h, r) for h, r, _ in entries):
            log.info("auth_helper_credentials_received", host=host, repository=repository)
            for callback in callbacks:
                try:
                    callback(host, repository)
                except Exception as e:
                    log.warning(
                        "credentials_added_callback_failed",
                        host=host,
                        repository=repository,
                        error=f"{type(e).__name__}: {e}",
                    )
        return len(entries)

    def clear_helper_credentials(self) -> None:
        with self._lock:
            self._helper.clear()

    # --- lookup ---------------------------------------------------------------------------
    def lookup(self, host: str, repository: str) -> Credentials | None:
        """Credentials for ``host/repository`` (repository without host, tag or digest), or
        None for anonymous access."""
        chost = canonical_host(host)
        repository = repository.strip("/")
        with self._lock:
            for key in ((chost, repository), (chost, "")):
                found = self._helper.get(key)
                if found is not None:
                    return found
        helpers = self._credential_helpers()
        for helper in helpers:
            if helper == AUTH_FILE_HELPER:
                creds = self._search_files(
                    auth_file_paths(self._environment, include_extra=False), chost, repository
                )
            else:
                try:
                    creds = self._cached_helper(helper, chost)
                except AuthError as e:
                    self._record(e)
                    continue
            if creds is not None:
                return creds
        extra = [AuthPath(p) for p in self._environment.extra_files]
        return self._search_files(extra, chost, repository)

    def _credential_helpers(self) -> Sequence[str]:
        helpers = self._global_helpers
        if callable(helpers):
            try:
                helpers = helpers()
            except Exception as e:  # a broken registries.conf: keep to the auth files
                log.warning("credential_helpers_unreadable", error=str(e))
                helpers = (AUTH_FILE_HELPER,)
        return helpers or (AUTH_FILE_HELPER,)

    def _search_files(
        self, paths: Sequence[AuthPath], chost: str, repository: str
    ) -> Credentials | None:
        for auth_path in paths:
            content = self._load(auth_path)
            if content is None:
                continue
            try:
                creds = find_in_file(content, chost, repository, self._cached_helper)
            except AuthError as e:
                self._record(e)
                continue
            if creds is not None:
                log.debug(
                    "credentials_found", host=chost, repository=repository, file=str(auth_path.path)
                )
                return creds
        return None

    def errors(self) -> list[AuthError]:
        """Recent errors (malformed files, failing helpers), oldest first."""
        with self._lock:
            return list(self._errors)

    # --- internals ------------------------------------------------------------------------
    def _run_helper(self, name: str, server: str) -> Credentials | None:
        return get_credentials(name, server, timeout=self._helper_timeout)

    def _cached_helper(self, name: str, server: str) -> Credentials | None:
        """Helper answers are kept for a while: the registry client may ask for every request
        (Basic auth), and a process per request is too much. "Not found" and errors are kept
        for a shorter time so a fresh login or a fixed helper is noticed soon."""
        key = (name, server)
        now = time.monotonic()
        with self._lock:
            hit = self._helper_cache.get(key)
        if hit is not None and hit[0] > now:
            if hit[2] is not None:
                raise hit[2]
            return hit[1]
        try:
            creds = self._helper_runner(name, server)
        except AuthError as e:
            self._store_helper_answer(key, now + min(self._helper_cache_ttl, 5.0), None, e)
            raise
        ttl = self._helper_cache_ttl if creds is not None else min(self._helper_cache_ttl, 10.0)
        self._store_helper_answer(key, now + ttl, creds, None)
        return creds

    def _store_helper_answer(
        self,
        key: tuple[str, str],
        expiry: float,
        creds: Credentials | None,
        error: AuthError | None,
    ) -> None:
        with self._lock:
            if len(self._helper_cache) > 1024:
                self._helper_cache.clear()
            self._helper_cache[key] = (expiry, creds, error)

    def _record(self, error: AuthError) -> None:
        with self._lock:
            if any(type(e) is type(error) and str(e) == str(error) for e in self._errors):
                return  # the same error again (cached, or per request): logged already
            self._errors.append(error)
            del self._errors[:-MAX_ERRORS]
        # Messages of the auth errors never contain secrets or file contents.
        log.warning("credential_lookup_failed", error=str(error))

    def _load(self, auth_path: AuthPath) -> AuthFile | None:
        key = str(auth_path.path)
        try:
            st = os.stat(auth_path.path)
        except OSError:
            with self._lock:
                self._files.pop(key, None)
            return None
        signature = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        with self._lock:
            cached = self._files.get(key)
        if cached is None or cached.signature != signature:
            content: AuthFile | None = None
            error: AuthError | None = None
            try:
                content = read_auth_file(auth_path)
            except AuthError as e:
                error = e
            cached = _CachedFile(signature, content, error)
            with self._lock:
                self._files[key] = cached
            if error is not None:
                self._record(error)  # once per change of the file, not per lookup
        return cached.content
