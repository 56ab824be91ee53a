"""OCI distribution client: manifests, configs, verified blobs, lazy ranged blob reads, pushes.

Built on ``requests`` with a urllib3 ``Retry`` mounted on the adapter (429/5xx/connect errors,
backoff, ``Retry-After`` honoured but bounded). Auth is the distribution token flow
(:mod:`auth.token`) or Basic, learnt from the registry's 401 challenge and remembered per host.

Security rules kept here:

- credentials are looked up per *source host*: a mirror never sees the upstream registry's
  credentials and vice versa;
- redirects (to blob storage) are followed by hand; ``Authorization`` is only sent to the
  registry's own origin, never to another host; ``https`` -> ``http`` is refused unless the
  registry is insecure;
- URLs are logged without query strings (signed URLs), and error messages never contain
  credentials, tokens or query strings.
"""

from __future__ import annotations

import contextlib
import email.message
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import structlog
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from auth import token as _token
from auth.errors import AuthError, TokenError
from auth.types import Credentials
from layerstore import digest as _digest
from layerstore.errors import (
    AuthenticationError,
    DigestError,
    FormatError,
    ImageReferenceError,
    LayerStoreError,
    ManifestError,
    NotFoundError,
    RangeError,
    RegistryError,
    RegistryUnavailableError,
    VerificationError,
)
from layerstore.registry import manifest as _manifest
from layerstore.registry.reference import Reference, api_host, parse_reference, split_location

log = structlog.get_logger(__name__)

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_MULTIPART_OVERHEAD_PER_PART = 1024
_READ_CHUNK = 256 * 1024
_ERROR_CODE_RE = re.compile(r"[A-Z][A-Z_]{0,63}")


# --- collaborators --------------------------------------------------------------------------------
class CredentialProvider(Protocol):
    """``auth.store.CredentialStore`` implements this."""

    def lookup(self, host: str, repository: str) -> Credentials | None: ...


@dataclass(frozen=True)
class PullSource:
    """Where to pull a repository from: ``location`` is ``host[:port]/path``."""

    location: str
    insecure: bool = False
    mirror: bool = False

    @property
    def host(self) -> str:
        return split_location(self.location)[0]

    @property
    def repository(self) -> str:
        return split_location(self.location)[1]


class RegistriesConfProvider(Protocol):
    """``layerstore.registry.registries_conf`` implements this; raises BlockedRegistryError."""

    def pull_sources(self, name: str, *, by_digest: bool) -> list[PullSource]: ...


@dataclass(frozen=True)
class RegistrySettings:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 4
    """Retries for connect errors and for 429/5xx answers (attempts = retries + 1)."""
    read_retries: int = 1
    """Retries after a read error (timeout, reset) on idempotent requests."""
    backoff_factor: float = 0.5
    max_backoff: float = 8.0
    """Upper bound for one backoff sleep and for an honoured ``Retry-After``."""
    pool_size: int = 32
    insecure_registries: frozenset[str] = frozenset()
    """Hosts (``host[:port]``) reachable over plain http / unverified TLS."""
    max_manifest_size: int = _manifest.MAX_MANIFEST_SIZE
    max_config_size: int = _manifest.MAX_CONFIG_SIZE
    max_redirects: int = 5
    max_ranges_per_request: int = 32
    platform: str | None = None
    """Default platform ``os/arch[/variant]`` for image indexes (None: the host's)."""
    upload_chunk_size: int = 0
    """0: monolithic blob uploads; otherwise PATCH chunks of this many bytes."""
    user_agent: str = "stargz-store/0.1"
    ca_bundle: str | None = None
    """CA certificates for TLS; None: the system bundle when found, else certifi's."""
    certs_dirs: tuple[str, ...] = ("/etc/containers/certs.d", "/etc/docker/certs.d")
    """containers-certs.d(5): ``<dir>/<host[:port]>/*.crt`` are extra CAs for that host;
    ``*.cert`` with a matching ``*.key`` is a client certificate."""


# --- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestResponse:
    raw: bytes = field(repr=False)
    media_type: str
    digest: str
    manifest: _manifest.Manifest = field(repr=False)
    source: PullSource


@dataclass(frozen=True)
class ResolvedImage:
    reference: Reference
    source: PullSource
    manifest_digest: str
    manifest: _manifest.ImageManifest = field(repr=False)
    config: _manifest.ImageConfig = field(repr=False)
    raw_manifest: bytes = field(repr=False)
    media_type: str
    raw_config: bytes = field(repr=False)
    index_digest: str | None = None
    index: _manifest.ImageIndex | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        return self.manifest_digest


RefLike = Union[Reference, str]


# --- helpers --------------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """``scheme://host/path`` without query or fragment (signed URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _reason(exc: BaseException) -> str:
    """A short, URL-free description of a requests/urllib3 failure."""
    inner: BaseException = exc
    for _ in range(5):
        nxt = getattr(inner, "reason", None)
        if isinstance(nxt, BaseException):
            inner = nxt
            continue
        if inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
            continue
        break
    return type(inner).__name__


class _RedactQueryFilter(logging.Filter):
    """Strips query strings from urllib3's request log lines (they may be signed URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                a.split("?", 1)[0] if isinstance(a, str) and "?" in a else a for a in record.args
            )
        return True


_FILTER_INSTALLED = False
_FILTER_LOCK = threading.Lock()


def _install_log_filter() -> None:
    global _FILTER_INSTALLED
    with _FILTER_LOCK:
        if not _FILTER_INSTALLED:
            for name in ("urllib3.connectionpool", "urllib3.util.retry", "urllib3.poolmanager"):
                logging.getLogger(name).addFilter(_RedactQueryFilter())
            _FILTER_INSTALLED = True


def _silence_insecure_warnings() -> None:
    """Unverified TLS is what an insecure registry means; do not warn on every request."""
    warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)


class _BoundedRetry(Retry):
    """urllib3 Retry whose sleeps (backoff and Retry-After) never exceed ``max_wait``."""

    max_wait: float = 8.0

    def new(self, **kw: Any) -> _BoundedRetry:
        r = super().new(**kw)
        r.max_wait = self.max_wait  # type: ignore[attr-defined]
        return r  # type: ignore[return-value]

    def get_backoff_time(self) -> float:
        return float(min(super().get_backoff_time(), self.max_wait))

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else float(min(value, self.max_wait))


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """``bytes A-B/TOTAL`` -> (A, B, TOTAL or None for ``*``); RangeError when malformed."""
    m = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if not m:
        raise RangeError("missing or malformed Content-Range in a range response")
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total):
        raise RangeError(f"inconsistent Content-Range {value!r}")
    return start, end, total


def parse_byteranges(body: bytes, boundary: str, blob_size: int) -> list[tuple[int, bytes]]:
    """Parse a ``multipart/byteranges`` body into ``(start, data)`` parts.

    Each part's length comes from its Content-Range, so binary data that happens to contain the
    boundary cannot confuse the parser.
    """
    if not boundary:
        raise RangeError("multipart/byteranges answer without a boundary")
    delim = b"--" + boundary.encode("latin-1")
    pos = body.find(delim)
    if pos < 0:
        raise RangeError("multipart/byteranges answer without a boundary line")
    parts: list[tuple[int, bytes]] = []
    while True:
        pos += len(delim)
        if body.startswith(b"--", pos):
            break
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise RangeError("malformed multipart boundary line")
        pos = eol + 2
        hdr_end = body.find(b"\r\n\r\n", pos)
        if hdr_end < 0:
            raise RangeError("multipart part without a header block")
        headers: dict[str, str] = {}
        for line in body[pos:hdr_end].split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                raise RangeError("malformed multipart part header")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        start, end, total = parse_content_range(headers.get("content-range"))
        if total is not None and total != blob_size:
            raise RangeError(f"Content-Range total {total} differs from the blob size {blob_size}")
        data_start = hdr_end + 4
        data_end = data_start + (end - start + 1)
        if data_end > len(body):
            raise RangeError("multipart part is shorter than its Content-Range")
        parts.append((start, body[data_start:data_end]))
        pos = data_end
        if not body.startswith(b"\r\n" + delim, pos):
            raise RangeError("multipart part is longer than its Content-Range")
        pos += 2
    if not parts:
        raise RangeError("multipart/byteranges answer without parts")
    return parts


def _coalesce(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged ``(offset, length)`` spans covering every non-empty range."""
    spans = sorted((o, o + n) for o, n in ranges if n > 0)
    merged: list[list[int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e - s) for s, e in merged]


def _as_reference(ref: RefLike) -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(ref)


@dataclass(frozen=True)
class _Endpoint:
    domain: str
    repository: str
    insecure: bool
    source: PullSource

    @property
    def host(self) -> str:
        return api_host(self.domain)

    def describe(self) -> str:
        return f"{self.domain}/{self.repository}"


class _HostState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scheme: str | None = None
        self.challenge: _token.Challenge | None = None
        self.multirange: bool | None = None


Body = Union[bytes, Callable[[], Any], None]


_SYSTEM_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",
)


def system_ca_bundle() -> str | None:
    for path in _SYSTEM_CA_BUNDLES:
        if os.path.isfile(path):
            return path
    return None


@dataclass(frozen=True)
class _TLSConfig:
    verify: bool | str
    cert: tuple[str, str] | None = None


# --- the client -----------------------------------------------------------------------------------
class RegistryClient:
    def __init__(
        self,
        credentials: CredentialProvider | None = None,
        registries: RegistriesConfProvider | None = None,
        *,
        settings: RegistrySettings | None = None,
    ) -> None:
        self._credentials = credentials
        self._registries = registries
        self.settings = settings or RegistrySettings()
        s = self.settings
        _install_log_filter()
        retry = _BoundedRetry(
            total=max(s.retries, s.read_retries),  # one budget across kinds of failure
            connect=s.retries,
            read=s.read_retries,
            status=s.retries,
            other=0,
            redirect=False,
            backoff_factor=s.backoff_factor,
            status_forcelist=_RETRY_STATUSES,
            allowed_methods=frozenset({"GET", "HEAD"}),
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        retry.max_wait = s.max_backoff
        self._session = self._make_session(retry)
        self._probe_session = self._make_session(Retry(0, read=False, redirect=False))
        self._timeout = (s.connect_timeout, s.read_timeout)
        self._tokens = _token.TokenCache()
        self._hosts: dict[str, _HostState] = {}
        self._token_locks: dict[tuple[str, str], threading.Lock] = {}
        self._tls: dict[tuple[str, bool], _TLSConfig] = {}
        self._tls_files: list[str] = []
        self._lock = threading.Lock()

    def _make_session(self, retry: Retry) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxies or netrc credentials from the environment
        adapter = HTTPAdapter(
            pool_connections=self.settings.pool_size,
            pool_maxsize=self.settings.pool_size,
            max_retries=retry,
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = self.settings.user_agent
        session.headers["Accept-Encoding"] = "identity"
        return session

    def close(self) -> None:
        self._session.close()
        self._probe_session.close()
        with self._lock:
            files, self._tls_files = self._tls_files, []
        for path in files:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _tls_config(self, ep: _Endpoint) -> _TLSConfig:
        """Verification and client certificate for the registry host (certs.d aware)."""
        key = (ep.host, ep.insecure)
        with self._lock:
            cached = self._tls.get(key)
        if cached is not None:
            return cached
        base: bool | str = self.settings.ca_bundle or system_ca_bundle() or True
        cas: list[str] = []
        cert: tuple[str, str] | None = None
        for root in self.settings.certs_dirs:
            d = os.path.join(root, ep.host)
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            cas += [os.path.join(d, n) for n in names if n.endswith(".crt")]
            for n in names:
                if cert is None and n.endswith(".cert"):
                    keyfile = os.path.join(d, n[: -len(".cert")] + ".key")
                    if os.path.isfile(keyfile):
                        cert = (os.path.join(d, n), keyfile)
        verify: bool | str = base
        if ep.insecure:
            verify = False
        elif cas:
            parts: list[bytes] = []
            if isinstance(base, str):
                with open(base, "rb") as f:
                    parts.append(f.read())
            for path in cas:
                with open(path, "rb") as f:
                    parts.append(f.read())
            fd, bundle = tempfile.mkstemp(prefix="stargz-store-ca-", suffix=".pem")
            with os.fdopen(fd, "wb") as f:
                f.write(b"\n".join(parts))
            with self._lock:
                self._tls_files.append(bundle)
            verify = bundle
            log.info("registry_extra_cas", host=ep.host, files=len(cas))
        config = _TLSConfig(verify, cert)
        with self._lock:
            self._tls.setdefault(key, config)
            return self._tls[key]

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sources and endpoints ------------------------------------------------------------------
    def pull_sources(self, ref: RefLike) -> list[PullSource]:
        r = _as_reference(ref)
        if self._registries is None:
            return [PullSource(r.name, insecure=self._insecure_host(r.domain))]
        sources = self._registries.pull_sources(r.name, by_digest=r.digest is not None)
        if not sources:
            raise RegistryError(f"no pull source for {r.name}")
        return sources

    def _push_source(self, ref: Reference) -> PullSource:
        # Pushes go to the reference as written: registries.conf's location rewrite and mirrors
        # are for pulls (containers/image does the same); its insecure and blocked flags apply.
        for src in self.pull_sources(ref):  # raises BlockedRegistryError
            if not src.mirror:
                return PullSource(ref.name, insecure=src.insecure)
        return PullSource(ref.name, insecure=self._insecure_host(ref.domain))

    def _insecure_host(self, domain: str) -> bool:
        ins = self.settings.insecure_registries
        return domain in ins or api_host(domain) in ins

    def _endpoint(self, source: PullSource) -> _Endpoint:
        domain, repository = split_location(source.location)
        insecure = source.insecure or self._insecure_host(domain)
        return _Endpoint(domain, repository, insecure, source)

    def _state(self, host: str) -> _HostState:
        with self._lock:
            st = self._hosts.get(host)
            if st is None:
                st = self._hosts[host] = _HostState()
            return st

    def _scheme(self, ep: _Endpoint) -> str:
        if not ep.insecure:
            return "https"
        st = self._state(ep.host)
        with st.lock:
            if st.scheme is not None:
                return st.scheme
        _silence_insecure_warnings()
        # Insecure registries: https (unverified) first, plain http when TLS fails, as
        # containers/image does. Only a definite answer is remembered.
        remember = True
        try:
            resp = self._probe_session.get(
                f"https://{ep.host}/v2/",
                timeout=(self.settings.connect_timeout, min(self.settings.read_timeout, 5.0)),
                verify=False,
                cert=self._tls_config(ep).cert,
                allow_redirects=False,
                stream=True,
            )
            resp.close()
            scheme = "https"
        except requests.exceptions.SSLError:
            scheme = "http"
        except requests.RequestException:
            scheme, remember = "http", False
        if remember:
            with st.lock:
                st.scheme = scheme
        log.debug("registry_scheme_probed", host=ep.host, scheme=scheme, remembered=remember)
        return scheme

    def _base(self, ep: _Endpoint) -> str:
        return f"{self._scheme(ep)}://{ep.host}/v2/{ep.repository}/"

    # --- low-level HTTP -------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        url: str,
        ep: _Endpoint,
        *,
        headers: Mapping[str, str],
        data: Any = None,
    ) -> requests.Response:
        tls = self._tls_config(ep)
        try:
            resp = self._session.request(
                method,
                url,
                headers=dict(headers),
                data=data,
                stream=True,
                allow_redirects=False,
                timeout=self._timeout,
                verify=tls.verify,
                cert=tls.cert if _origin(url)[1] == ep.host.lower() else None,
            )
        except requests.exceptions.Timeout as exc:
            raise RegistryUnavailableError(
                f"registry {urlsplit(url).netloc} timed out ({_reason(exc)}) for {ep.describe()}"
            ) from None
        except requests.exceptions.SSLError as exc:
            raise RegistryUnavailableError(
                f"TLS failure talking to {urlsplit(url).netloc} ({_reason(exc)})"
            ) from None
        except requests.exceptions.ConnectionError as exc:
            reason = _reason(exc)
            if "Timeout" in reason:  # read timeouts after retries arrive as ConnectionError
                raise RegistryUnavailableError(
                    f"registry {urlsplit(url).netloc} timed out ({reason}) for {ep.describe()}"
                ) from None
            raise RegistryUnavailableError(
                f"cannot reach {urlsplit(url).netloc} for {ep.describe()} ({reason})"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise RegistryError(
                f"request to {urlsplit(url).netloc} failed ({_reason(exc)})"
            ) from None
        log.debug(
            "registry_response",
            method=method,
            url=redact_url(url),
            status=resp.status_code,
        )
        return resp

    def _lookup_credentials(self, ep: _Endpoint) -> Credentials | None:
        if self._credentials is None:
            return None
        try:
            creds = self._credentials.lookup(ep.domain, ep.repository)
        except AuthError as exc:
            raise AuthenticationError(
                f"cannot get credentials for registry {ep.domain}: {exc}"
            ) from None
        if creds is None or creds.is_empty():
            return None
        return creds

    def _token_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lock:
            lk = self._token_locks.get(key)
            if lk is None:
                lk = self._token_locks[key] = threading.Lock()
            return lk

    def _authorization(
        self, ep: _Endpoint, scope: str, *, refresh: bool, used: str | None
    ) -> str | None:
        st = self._state(ep.host)
        with st.lock:
            challenge = st.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._lookup_credentials(ep)
            if creds is None or not (creds.username or creds.password):
                return None
            return _token.basic_authorization(creds)
        key = (ep.host, scope)
        if not refresh:
            tok = self._tokens.get(*key)
            if tok is not None:
                return f"Bearer {tok.token}"
        with self._token_lock(key):
            tok = self._tokens.get(*key)
            if tok is not None and (not refresh or f"Bearer {tok.token}" != used):
                return f"Bearer {tok.token}"
            tok = self._fetch_token(ep, challenge, scope)
            self._tokens.put(*key, tok)
            return f"Bearer {tok.token}"

    def _fetch_token(self, ep: _Endpoint, challenge: _token.Challenge, scope: str) -> _token.Token:
        creds = self._lookup_credentials(ep)
        try:
            req = _token.build_token_request(challenge, [scope], creds)
        except TokenError as exc:
            raise AuthenticationError(f"registry {ep.host}: {exc}") from None
        realm = urlsplit(req.url)
        if realm.scheme != "https" and not ep.insecure:
            raise AuthenticationError(
                f"registry {ep.host} sent a token realm that is not https; refusing"
            )
        try:
            resp = self._session.request(
                req.method,
                req.url,
                headers=dict(req.headers),
                data=dict(req.form) if req.form is not None else None,
                timeout=self._timeout,
                allow_redirects=True,
                verify=self._tls_config(ep).verify,
                stream=True,
            )
        except requests.RequestException as exc:
            raise RegistryUnavailableError(
                f"cannot reach the token server {realm.netloc} of registry {ep.host} "
                f"({_reason(exc)})"
            ) from None
        try:
            if resp.status_code in (401, 403):
                who = "the credentials" if creds is not None else "anonymous access"
                raise AuthenticationError(
                    f"token server {realm.netloc} of registry {ep.host} refused {who} "
                    f"for {ep.describe()} (HTTP {resp.status_code})",
                    status=resp.status_code,
                )
            if resp.status_code != 200:
                exc_type = (
                    RegistryUnavailableError
                    if resp.status_code in _RETRY_STATUSES
                    else RegistryError
                )
                raise exc_type(
                    f"token server {realm.netloc} of registry {ep.host} answered "
                    f"HTTP {resp.status_code}",
                    status=resp.status_code,
                )
            body = self._read_capped(resp, _token.MAX_TOKEN_RESPONSE, ep, "token response")
        finally:
            resp.close()
        try:
            tok = _token.parse_token_response(body)
        except TokenError as exc:
            raise AuthenticationError(
                f"token server {realm.netloc} of registry {ep.host}: {exc}"
            ) from None
        log.debug("registry_token_fetched", host=ep.host, scope=scope)
        return tok

    def _request(
        self,
        ep: _Endpoint,
        method: str,
        path_or_url: str,
        *,
        actions: Sequence[str] = ("pull",),
        headers: Mapping[str, str] | None = None,
        body: Body = None,
    ) -> requests.Response:
        """One registry request with auth (a 401 leads to one retry with a fresh token)."""
        base = self._base(ep)
        url = urljoin(base, path_or_url)
        same_origin = _origin(url) == _origin(base)
        scope = _token.repository_scope(ep.repository, actions)
        st = self._state(ep.host)
        used: str | None = None
        for attempt in (0, 1):
            hdrs = dict(headers or {})
            auth = (
                self._authorization(ep, scope, refresh=attempt == 1, used=used)
                if same_origin
                else None
            )
            if auth:
                hdrs["Authorization"] = auth
            used = auth
            data: Any = body() if callable(body) else body
            try:
                resp = self._send(method, url, ep, headers=hdrs, data=data)
            finally:
                if callable(body) and hasattr(data, "close"):
                    data.close()  # a file opened for this attempt; fully sent by now
            if resp.status_code != 401 or not same_origin:
                return resp
            header_values = resp.raw.headers.getlist("WWW-Authenticate") if resp.raw else []
            _drain(resp)
            try:
                challenge = _token.pick_challenge(_token.parse_www_authenticate(header_values))
            except TokenError:
                challenge = None
            if challenge is None:
                raise AuthenticationError(
                    f"registry {ep.host} requires authentication for {ep.describe()} but sent "
                    "no usable challenge",
                    status=401,
                )
            with st.lock:
                st.challenge = challenge
            if attempt == 1 or (auth is not None and challenge.scheme == "basic"):
                break
        creds = self._lookup_credentials(ep)
        if creds is None:
            raise AuthenticationError(
                f"registry {ep.host} requires authentication for {ep.describe()} and no "
                "credentials are configured for it",
                status=401,
            )
        raise AuthenticationError(
            f"registry {ep.host} refused the credentials for {ep.describe()}", status=401
        )

    def _get_following(
        self,
        ep: _Endpoint,
        path: str,
        headers: Mapping[str, str],
        *,
        actions: Sequence[str] = ("pull",),
    ) -> tuple[requests.Response, str, bool]:
        """GET with redirects followed by hand. Returns (response, final URL, redirected).

        ``Authorization`` goes to the registry origin only. A 401/403 at the end of a redirect
        (an expired signed URL) re-resolves once through the registry.
        """
        registry_origin = _origin(self._base(ep))
        for attempt in (0, 1):
            resp = self._request(ep, "GET", path, actions=actions, headers=headers)
            url = resp.url
            auth = resp.request.headers.get("Authorization") if resp.request else None
            hops = 0
            redirected = False
            while resp.status_code in _REDIRECT_CODES:
                location = resp.headers.get("Location")
                _drain(resp)
                if not location:
                    raise RegistryError(
                        f"registry {ep.host} sent a redirect without Location for {ep.describe()}",
                        status=resp.status_code,
                    )
                hops += 1
                if hops > self.settings.max_redirects:
                    raise RegistryError(
                        f"too many redirects fetching from {ep.describe()} on {ep.host}"
                    )
                new_url = urljoin(url, location)
                new_scheme = urlsplit(new_url).scheme.lower()
                if new_scheme not in ("http", "https"):
                    raise RegistryError(f"registry {ep.host} redirected to a {new_scheme} URL")
                if (
                    urlsplit(url).scheme.lower() == "https"
                    and new_scheme == "http"
                    and (not ep.insecure)
                ):
                    raise RegistryError(
                        f"registry {ep.host} redirected from https to http "
                        f"({urlsplit(new_url).netloc}); refusing for a secure registry"
                    )
                hdrs = dict(headers)
                if auth and _origin(new_url) == registry_origin:
                    hdrs["Authorization"] = auth
                log.debug(
                    "registry_redirect",
                    host=ep.host,
                    to=redact_url(new_url),
                    hop=hops,
                )
                resp = self._send("GET", new_url, ep, headers=hdrs)
                url = new_url
                redirected = True
            if redirected and resp.status_code in (401, 403) and attempt == 0:
                _drain(resp)
                log.info("registry_redirect_refused_retrying", host=ep.host, to=redact_url(url))
                continue
            return resp, url, redirected
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_for_status(self, resp: requests.Response, ep: _Endpoint, what: str) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            return
        detail = _error_detail(resp)
        _drain(resp)
        msg = f"{what} in {ep.describe()} on registry {ep.host}: HTTP {code}{detail}"
        if code == 404:
            raise NotFoundError(msg, status=code)
        if code in (401, 403):
            raise AuthenticationError(msg, status=code)
        if code in _RETRY_STATUSES:
            raise RegistryUnavailableError(msg, status=code)
        if code == 416:
            raise RangeError(msg, status=code)
        raise RegistryError(msg, status=code)

    def _read_capped(self, resp: requests.Response, limit: int, ep: _Endpoint, what: str) -> bytes:
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ManifestError(
                f"{what} from {ep.host} is {length} bytes, over the {limit} byte limit"
            )
        out = bytearray()
        for piece in _stream(resp, ep):
            out += piece
            if len(out) > limit:
                raise ManifestError(f"{what} from {ep.host} is over the {limit} byte limit")
        return bytes(out)

    # --- manifests ------------------------------------------------------------------------------
    def _fetch_manifest(
        self,
        ep: _Endpoint,
        reference: str,
        *,
        expected_digest: str | None,
        expected_size: int | None = None,
    ) -> ManifestResponse:
        accept = ", ".join(_manifest.ACCEPT_MEDIA_TYPES)
        resp, _, _ = self._get_following(ep, f"manifests/{reference}", {"Accept": accept})
        try:
            self._raise_for_status(resp, ep, f"manifest {reference}")
            raw = self._read_capped(resp, self.settings.max_manifest_size, ep, "manifest")
            header_digest = resp.headers.get("Docker-Content-Digest")
            content_type = resp.headers.get("Content-Type")
        finally:
            resp.close()
        actual = _digest.sha256_digest(raw)
        if expected_digest is not None and actual != expected_digest:
            raise VerificationError(
                f"manifest {expected_digest} from {ep.describe()} on {ep.host} has digest "
                f"{actual}; refusing it"
            )
        if (
            expected_digest is None
            and header_digest
            and _digest.is_valid(header_digest)
            and header_digest != actual
        ):
            raise VerificationError(
                f"manifest {reference} from {ep.describe()} on {ep.host}: "
                f"Docker-Content-Digest {header_digest} does not match the body ({actual})"
            )
        if expected_size is not None and len(raw) != expected_size:
            raise ManifestError(
                f"manifest {actual} from {ep.host} is {len(raw)} bytes, the index says "
                f"{expected_size}"
            )
        parsed = _manifest.parse_manifest(raw, content_type, limit=self.settings.max_manifest_size)
        return ManifestResponse(raw, parsed.media_type, actual, parsed, ep.source)

    def _each_source(self, ref: Reference, action: Callable[[_Endpoint], Any]) -> Any:
        last: LayerStoreError | None = None
        for source in self.pull_sources(ref):
            ep = self._endpoint(source)
            try:
                return action(ep)
            except (RegistryError, ManifestError, VerificationError) as exc:
                last = exc
                if source.mirror:
                    log.info(
                        "registry_mirror_failed",
                        mirror=source.location,
                        reference=str(ref),
                        error=str(exc),
                    )
        assert last is not None
        raise last

    def get_manifest(self, ref: RefLike, *, digest: str | None = None) -> ManifestResponse:
        """The manifest or index for *ref* (by *digest*, else by the reference's digest or
        tag); verified against the digest when fetched by digest."""
        r = _as_reference(ref)
        want = digest or r.digest
        if want is not None:
            _validate_digest(want)
            r = r.with_digest(want)
        target = r.manifest_ref()

        def action(ep: _Endpoint) -> ManifestResponse:
            return self._fetch_manifest(ep, target, expected_digest=want)

        result: ManifestResponse = self._each_source(r, action)
        return result

    def resolve(
        self, ref: RefLike, platform: str | _manifest.Platform | None = None
    ) -> ResolvedImage:
        """Manifest (through an index for *platform*) and verified config of *ref*."""
        r = _as_reference(ref)
        wanted = platform if platform is not None else self.settings.platform

        def action(ep: _Endpoint) -> ResolvedImage:
            top = self._fetch_manifest(ep, r.manifest_ref(), expected_digest=r.digest)
            index: _manifest.ImageIndex | None = None
            index_digest: str | None = None
            chosen = top
            if isinstance(top.manifest, _manifest.ImageIndex):
                index, index_digest = top.manifest, top.digest
                desc = _manifest.select_manifest(top.manifest, wanted)
                chosen = self._fetch_manifest(
                    ep, desc.digest, expected_digest=desc.digest, expected_size=desc.size
                )
                if not isinstance(chosen.manifest, _manifest.ImageManifest):
                    raise ManifestError(f"index entry {desc.digest} in {r} is itself an index")
            manifest = chosen.manifest
            assert isinstance(manifest, _manifest.ImageManifest)
            cap = min(self.settings.max_config_size, manifest.config.size)
            if manifest.config.size > self.settings.max_config_size:
                raise ManifestError(
                    f"config of {r} is {manifest.config.size} bytes, over the "
                    f"{self.settings.max_config_size} byte limit"
                )
            raw_config = self._fetch_blob(ep, manifest.config.digest, cap, what="config")
            config = _manifest.parse_image_config(raw_config, limit=cap)
            if len(config.diff_ids) != len(manifest.layers):
                raise ManifestError(
                    f"image {r}: config has {len(config.diff_ids)} diff_ids for "
                    f"{len(manifest.layers)} layers"
                )
            log.debug(
                "registry_resolved",
                reference=str(r),
                source=ep.source.location,
                digest=chosen.digest,
            )
            return ResolvedImage(
                reference=r,
                source=ep.source,
                manifest_digest=chosen.digest,
                manifest=manifest,
                config=config,
                raw_manifest=chosen.raw,
                media_type=chosen.media_type,
                raw_config=raw_config,
                index_digest=index_digest,
                index=index,
            )

        result: ResolvedImage = self._each_source(r, action)
        return result

    # --- blobs ----------------------------------------------------------------------------------
    def _fetch_blob(
        self, ep: _Endpoint, digest: str, max_size: int, *, what: str = "blob"
    ) -> bytes:
        resp, _, _ = self._get_following(ep, f"blobs/{digest}", {})
        try:
            self._raise_for_status(resp, ep, f"{what} {digest}")
            try:
                data = self._read_capped(resp, max_size, ep, f"{what} {digest}")
            except ManifestError as exc:
                raise RegistryError(str(exc)) from None
        finally:
            resp.close()
        actual = _digest.sha256_digest(data)
        if actual != digest:
            raise VerificationError(
                f"{what} {digest} from {ep.describe()} on {ep.host} has digest {actual}; "
                "refusing it"
            )
        return data

    def get_blob(self, ref: RefLike | ResolvedImage, digest: str, max_size: int) -> bytes:
        """A whole blob of at most *max_size* bytes, verified against *digest*."""
        _validate_digest(digest)
        if isinstance(ref, ResolvedImage):
            return self._fetch_blob(self._endpoint(ref.source), digest, max_size)
        r = _as_reference(ref)

        def action(ep: _Endpoint) -> bytes:
            return self._fetch_blob(ep, digest, max_size)

        data: bytes = self._each_source(r.with_digest(r.digest or digest), action)
        return data

    def blob_source(self, ref: RefLike | ResolvedImage, digest: str, size: int) -> BlobSource:
        """A lazy :class:`~layerstore.source.RangeSource` over one blob.

        With a :class:`ResolvedImage` the blob is read from the source the manifest came from;
        with a reference, the first source that has the blob (HEAD) is used.
        """
        _validate_digest(digest)
        if size < 0:
            raise ValueError("blob size must not be negative")
        if isinstance(ref, ResolvedImage):
            return BlobSource(self, self._endpoint(ref.source), digest, size)
        r = _as_reference(ref)

        def action(ep: _Endpoint) -> BlobSource:
            resp, _, _ = self._get_following_head(ep, digest)
            try:
                self._raise_for_status(resp, ep, f"blob {digest}")
                length = resp.headers.get("Content-Length")
            finally:
                resp.close()
            if length is not None and length.isdigit() and int(length) != size:
                raise RegistryError(
                    f"blob {digest} in {ep.describe()} on {ep.host} is {length} bytes, "
                    f"expected {size}"
                )
            return BlobSource(self, ep, digest, size)

        src: BlobSource = self._each_source(r.with_digest(r.digest or digest), action)
        return src

    def _get_following_head(
        self, ep: _Endpoint, digest: str
    ) -> tuple[requests.Response, str, bool]:
        resp = self._request(ep, "HEAD", f"blobs/{digest}")
        # A HEAD redirect to blob storage means the blob exists; its size is checked on read.
        if resp.status_code in _REDIRECT_CODES:
            resp.status_code = 200
            resp.headers.pop("Content-Length", None)
        return resp, resp.url, False

    # --- pushes ---------------------------------------------------------------------------------
    def blob_exists(self, ref: RefLike, digest: str) -> bool:
        r = _as_reference(ref)
        ep = self._endpoint(self._push_source(r))
        return self._blob_exists(ep, digest)

    def _blob_exists(self, ep: _Endpoint, digest: str) -> bool:
        resp = self._request(ep, "HEAD", f"blobs/{digest}", actions=("pull", "push"))
        resp.close()
        if resp.status_code == 200 or resp.status_code in _REDIRECT_CODES:
            return True
        if resp.status_code == 404:
            return False
        self._raise_for_status(resp, ep, f"blob {digest}")
        return False

    def push_blob(self, ref: RefLike, data: bytes | str | os.PathLike[str], digest: str) -> bool:
        """Upload a blob unless the repository has it. Returns True when it was uploaded."""
        _validate_digest(digest)
        r = _as_reference(ref)
        ep = self._endpoint(self._push_source(r))
        actions = ("pull", "push")
        if isinstance(data, (bytes, bytearray, memoryview)):
            payload = bytes(data)
            if _digest.sha256_digest(payload) != digest:
                raise VerificationError(f"blob to push does not match its digest {digest}")
            size = len(payload)
            path: str | None = None
        else:
            path = os.fspath(data)
            size = os.path.getsize(path)
            payload = b""
        if self._blob_exists(ep, digest):
            log.debug("registry_blob_exists", repository=ep.describe(), digest=digest)
            return False
        resp = self._request(
            ep, "POST", "blobs/uploads/", actions=actions, headers={"Content-Length": "0"}
        )
        location = self._upload_location(resp, ep, digest)
        chunk = self.settings.upload_chunk_size
        if chunk > 0 and size > chunk:
            offset = 0
            while offset < size:
                n = min(chunk, size - offset)
                piece = (
                    payload[offset : offset + n] if path is None else _read_file(path, offset, n)
                )
                resp = self._request(
                    ep,
                    "PATCH",
                    location,
                    actions=actions,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + n - 1}",
                        "Content-Length": str(n),
                    },
                    body=piece,
                )
                location = self._upload_location(resp, ep, digest)
                offset += n
            final_body: Body = b""
        elif path is not None:
            file_path = path

            def opener() -> Any:
                return open(file_path, "rb")  # requests streams and closes it

            final_body = opener
        else:
            final_body = payload
        put_url = location + ("&" if "?" in location else "?") + f"digest={digest}"
        headers = {"Content-Type": "application/octet-stream"}
        if chunk > 0 and size > chunk:
            headers["Content-Length"] = "0"
        else:
            headers["Content-Length"] = str(size)
        resp = self._request(ep, "PUT", put_url, actions=actions, headers=headers, body=final_body)
        try:
            if resp.status_code != 201:
                self._raise_for_status(resp, ep, f"upload of blob {digest}")
                raise RegistryError(
                    f"upload of blob {digest} to {ep.describe()}: unexpected HTTP "
                    f"{resp.status_code}",
                    status=resp.status_code,
                )
        finally:
            resp.close()
        log.info("registry_blob_pushed", repository=ep.describe(), digest=digest, size=size)
        return True

    def check_push(self, ref: RefLike) -> None:
        """Fail now, not after a long conversion, when *ref*'s repository does not take pushes
        (unreachable, TLS, credentials refused, no push right): start a blob upload and cancel
        it. Raises what a push would raise."""
        r = _as_reference(ref)
        ep = self._endpoint(self._push_source(r))
        resp = self._request(
            ep, "POST", "blobs/uploads/", actions=("pull", "push"), headers={"Content-Length": "0"}
        )
        try:
            if resp.status_code != 202:
                self._raise_for_status(resp, ep, "starting a blob upload")
                raise RegistryError(
                    f"starting a blob upload to {ep.describe()}: unexpected HTTP "
                    f"{resp.status_code}",
                    status=resp.status_code,
                )
            location = resp.headers.get("Location")
        finally:
            resp.close()
        url = urljoin(self._base(ep), location or "")
        if location and _origin(url) == _origin(self._base(ep)):
            # Best effort: an upload left behind expires on the registry's side.
            with contextlib.suppress(LayerStoreError):
                self._request(ep, "DELETE", url, actions=("pull", "push")).close()
        log.debug("registry_push_checked", repository=ep.describe())

    def _upload_location(self, resp: requests.Response, ep: _Endpoint, digest: str) -> str:
        try:
            if resp.status_code != 202:
                self._raise_for_status(resp, ep, f"upload of blob {digest}")
                raise RegistryError(
                    f"upload of blob {digest} to {ep.describe()}: unexpected HTTP "
                    f"{resp.status_code}",
                    status=resp.status_code,
                )
            location = resp.headers.get("Location")
        finally:
            resp.close()
        if not location:
            raise RegistryError(f"registry {ep.host} gave no upload location")
        url = urljoin(self._base(ep), location)
        if _origin(url) != _origin(self._base(ep)):
            raise RegistryError(
                f"registry {ep.host} sent an upload location on another host "
                f"({urlsplit(url).netloc}); refusing"
            )
        return url

    def put_manifest(self, ref: RefLike, body: bytes, media_type: str) -> str:
        """PUT a manifest or index under the reference's tag (else its digest); returns the
        manifest digest."""
        r = _as_reference(ref)
        actual = _digest.sha256_digest(body)
        if r.tag is None and r.digest is not None and r.digest != actual:
            raise VerificationError(f"manifest to push does not match its digest {r.digest}")
        ep = self._endpoint(self._push_source(r))
        target = r.tag or actual
        resp = self._request(
            ep,
            "PUT",
            f"manifests/{target}",
            actions=("pull", "push"),
            headers={"Content-Type": media_type, "Content-Length": str(len(body))},
            body=bytes(body),
        )
        try:
            if resp.status_code not in (200, 201):
                self._raise_for_status(resp, ep, f"manifest {target}")
                raise RegistryError(
                    f"manifest {target} to {ep.describe()}: unexpected HTTP {resp.status_code}",
                    status=resp.status_code,
                )
            header = resp.headers.get("Docker-Content-Digest")
        finally:
            resp.close()
        if header and _digest.is_valid(header) and header != actual:
            raise VerificationError(
                f"registry {ep.host} stored manifest {target} as {header}, expected {actual}"
            )
        log.info("registry_manifest_pushed", repository=ep.describe(), reference=target)
        return actual


# --- blob range source ----------------------------------------------------------------------------
class BlobSource:
    """Ranged reads of one registry blob (a :class:`layerstore.source.RangeSource`).

    The redirect target (signed storage URL) is remembered and reused; a 401/403 from it
    re-resolves through the registry once. Thread-safe.
    """

    def __init__(self, client: RegistryClient, ep: _Endpoint, digest: str, size: int) -> None:
        self._client = client
        self._ep = ep
        self.digest = digest
        self._size = size
        self._lock = threading.Lock()
        self._signed_url: str | None = None
        self._path = f"blobs/{digest}"

    def __repr__(self) -> str:
        return f"BlobSource({self._ep.describe()}@{self.digest}, size={self._size})"

    @property
    def registry_host(self) -> str:
        return self._ep.host

    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise FormatError(
                f"range {offset}+{length} is outside blob {self.digest} of {self._size} bytes"
            )

    def _open(self, headers: Mapping[str, str]) -> requests.Response:
        client, ep = self._client, self._ep
        with self._lock:
            signed = self._signed_url
        if signed is not None:
            resp = client._send("GET", signed, ep, headers=headers)
            if resp.status_code not in (401, 403):
                return resp
            _drain(resp)
            log.info("registry_signed_url_refused", host=ep.host, to=redact_url(signed))
            with self._lock:
                if self._signed_url == signed:
                    self._signed_url = None
        resp, url, redirected = client._get_following(ep, self._path, headers)
        if redirected and 200 <= resp.status_code < 300:
            with self._lock:
                self._signed_url = url
        return resp

    def read_at(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        end = offset + length - 1
        resp = self._open({"Range": f"bytes={offset}-{end}"})
        try:
            if resp.status_code == 206:
                start, last, total = parse_content_range(resp.headers.get("Content-Range"))
                if (start, last) != (offset, end) or (total is not None and total != self._size):
                    raise RangeError(
                        f"blob {self.digest} on {self._ep.host}: asked bytes {offset}-{end}/"
                        f"{self._size}, got Content-Range {resp.headers.get('Content-Range')!r}"
                    )
                return _read_exact(resp, length, self._ep, self.digest)
            if resp.status_code == 200:
                if offset == 0 and length == self._size:
                    return _read_exact(resp, length, self._ep, self.digest)
                raise RangeError(
                    f"registry {self._ep.host} ignored the Range header for blob {self.digest}",
                    status=200,
                )
            self._client._raise_for_status(resp, self._ep, f"range of blob {self.digest}")
            raise RangeError(
                f"blob {self.digest} on {self._ep.host}: unexpected HTTP {resp.status_code} "
                "to a range request",
                status=resp.status_code,
            )
        finally:
            resp.close()

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        for off, ln in ranges:
            self._check(off, ln)
        spans = _coalesce(ranges)
        st = self._client._state(self._ep.host)
        fetched: dict[int, bytes] = {}
        limit = max(1, self._client.settings.max_ranges_per_request)
        with st.lock:
            multi = st.multirange
        if len(spans) <= 1 or multi is False:
            for off, ln in spans:
                fetched[off] = self.read_at(off, ln)
        else:
            for i in range(0, len(spans), limit):
                batch = spans[i : i + limit]
                if len(batch) == 1:
                    fetched[batch[0][0]] = self.read_at(*batch[0])
                    continue
                got = self._read_multi(batch)
                if got is None:
                    for off, ln in spans[i:]:
                        fetched[off] = self.read_at(off, ln)
                    break
                fetched.update(got)
        return [_slice(fetched, spans, off, ln) for off, ln in ranges]

    def _read_multi(self, spans: list[tuple[int, int]]) -> dict[int, bytes] | None:
        """One multi-range request; None when the registry refused or ignored it."""
        st = self._client._state(self._ep.host)
        header = "bytes=" + ",".join(f"{o}-{o + n - 1}" for o, n in spans)
        resp = self._open({"Range": header})
        try:
            if resp.status_code in (200, 400, 416):
                with st.lock:
                    st.multirange = False
                log.info(
                    "registry_multirange_unsupported",
                    host=self._ep.host,
                    status=resp.status_code,
                )
                return None
            if resp.status_code != 206:
                self._client._raise_for_status(resp, self._ep, f"ranges of blob {self.digest}")
                raise RangeError(
                    f"blob {self.digest} on {self._ep.host}: unexpected HTTP "
                    f"{resp.status_code} to a multi-range request",
                    status=resp.status_code,
                )
            ctype = resp.headers.get("Content-Type", "")
            wanted = sum(n for _, n in spans)
            if ctype.lower().startswith("multipart/byteranges"):
                msg = email.message.Message()
                msg["Content-Type"] = ctype
                boundary = msg.get_param("boundary")
                cap = wanted + _MULTIPART_OVERHEAD_PER_PART * len(spans) + 4096
                body = _read_upto(resp, cap, self._ep, self.digest)
                parts = parse_byteranges(
                    body, boundary if isinstance(boundary, str) else "", self._size
                )
            else:
                start, last, total = parse_content_range(resp.headers.get("Content-Range"))
                if total is not None and total != self._size:
                    raise RangeError(
                        f"blob {self.digest} on {self._ep.host}: Content-Range total {total}, "
                        f"blob size {self._size}"
                    )
                parts = [(start, _read_exact(resp, last - start + 1, self._ep, self.digest))]
        finally:
            resp.close()
        with st.lock:
            st.multirange = True
        out: dict[int, bytes] = {}
        for off, ln in spans:
            for start, data in parts:
                if start <= off and off + ln <= start + len(data):
                    out[off] = data[off - start : off - start + ln]
                    break
            else:
                raise RangeError(
                    f"blob {self.digest} on {self._ep.host}: the multi-range answer lacks "
                    f"bytes {off}-{off + ln - 1}"
                )
        return out


def _slice(
    fetched: Mapping[int, bytes], spans: Sequence[tuple[int, int]], off: int, ln: int
) -> bytes:
    if ln == 0:
        return b""
    for s, n in spans:
        if s <= off and off + ln <= s + n:
            data = fetched[s]
            return data[off - s : off - s + ln]
    raise AssertionError("range not covered by its spans")  # pragma: no cover


# --- streaming helpers ----------------------------------------------------------------------------
def _stream(resp: requests.Response, ep: _Endpoint) -> Iterator[bytes]:
    """Raw body bytes (no content decoding), with transport errors mapped to ours."""
    raw = resp.raw
    try:
        while True:
            piece = raw.read(_READ_CHUNK, decode_content=False)
            if not piece:
                return
            yield piece
    except urllib3.exceptions.ReadTimeoutError:
        raise RegistryUnavailableError(
            f"registry {ep.host} stalled while sending a body for {ep.describe()}"
        ) from None
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError, OSError) as exc:
        raise RangeError(
            f"body from {ep.host} for {ep.describe()} broke off ({type(exc).__name__})"
        ) from None


def _read_exact(resp: requests.Response, length: int, ep: _Endpoint, digest: str) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) != length:
        raise RangeError(
            f"blob {digest} on {ep.host}: Content-Length {declared} for a {length} byte range"
        )
    data = _read_upto(resp, length, ep, digest)
    if len(data) != length:
        raise RangeError(f"blob {digest} on {ep.host}: short body, {len(data)} of {length} bytes")
    return data


def _read_upto(resp: requests.Response, limit: int, ep: _Endpoint, digest: str) -> bytes:
    out = bytearray()
    for piece in _stream(resp, ep):
        out += piece
        if len(out) > limit:
            raise RangeError(
                f"blob {digest} on {ep.host}: body longer than the {limit} bytes asked"
            )
    return bytes(out)


def _drain(resp: requests.Response, limit: int = 65536) -> None:
    """Read a small error body so the connection can be reused; close otherwise."""
    try:
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= limit:
            resp.raw.read(int(length), decode_content=False)
    except Exception:  # best effort only
        pass
    finally:
        resp.close()


def _error_detail(resp: requests.Response) -> str:
    """``: CODE`` from a distribution error body (bounded); empty when absent.

    Only the error code is kept: a registry's free-text message could echo what we sent it
    (a token), and error messages end up in logs.
    """
    ctype = resp.headers.get("Content-Type", "")
    length = resp.headers.get("Content-Length")
    if "json" not in ctype or length is None or not length.isdigit() or int(length) > 16384:
        return ""
    try:
        obj = json.loads(resp.raw.read(int(length), decode_content=False))
        code = str(obj["errors"][0]["code"])
    except Exception:  # a detail only
        return ""
    return f": {code}" if _ERROR_CODE_RE.fullmatch(code) else ""


def _read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise RegistryError(f"{path} changed while it was being uploaded")
    return data


def _validate_digest(digest: str) -> None:
    try:
        _digest.validate(digest)
    except DigestError as exc:
        raise ImageReferenceError(str(exc)) from None


__all__ = [
    "BlobSource",
    "CredentialProvider",
    "ManifestResponse",
    "PullSource",
    "RegistriesConfProvider",
    "RegistryClient",
    "RegistrySettings",
    "ResolvedImage",
    "parse_byteranges",
    "parse_content_range",
    "redact_url",
]
