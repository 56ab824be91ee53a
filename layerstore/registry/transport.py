"""HTTP to registries and blob storage, below auth and the distribution API.

Owns: the ``requests`` sessions (a urllib3 ``Retry`` on the adapter: 429/5xx/connect errors,
backoff, ``Retry-After`` honoured but bounded), the total deadline of every request
(:mod:`.deadline`: a budget scope per operation, socket timeouts and backoff sleeps shortened
to what is left of it, a watchdog that ends connections at it), TLS (CA bundle,
containers-certs.d(5) extra CAs and client certificates), the http/https probe for insecure
hosts, per-host state (scheme, multi-range support), sending one request with ``requests``'
exceptions mapped to our ``RegistryError`` types, the redirect policy, HTTP status -> error
mapping, and reading bodies (streamed, capped, drained).

Security rules kept here:

- redirects (to blob storage) are followed by hand, at most ``max_redirects`` hops;
  ``Authorization`` is only sent to the registry's own origin, never to another host;
  ``https`` -> ``http`` is refused unless the registry is insecure;
- a token request follows no redirect with a body: a redirected POST (it carries an OAuth2
  refresh token) is refused; a GET follows redirects by the rules above, its credentials
  (Basic ``Authorization``) only to the realm's own origin;
- a client certificate is only presented to the registry host itself;
- URLs are logged without query strings (signed URLs, also in urllib3's own log lines), and
  error messages never contain credentials, tokens or query strings.

Knows nothing of tokens (:mod:`.auth`), manifests (:mod:`.client`) or ranges
(:mod:`.blobsource`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import ssl
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import structlog
import urllib3.exceptions
from urllib3.util.retry import Retry
from urllib3.util.ssl_ import create_urllib3_context

from layerstore.common.redact import redact_url
from layerstore.errors import (
    AuthenticationError,
    DeadlineExceededError,
    ManifestError,
    NotFoundError,
    RangeError,
    RegistryError,
    RegistryUnavailableError,
)
from layerstore.registry import deadline as _deadline
from layerstore.registry.reference import api_host, split_location
from layerstore.registry.settings import RegistrySettings

log = structlog.get_logger(__name__)

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_READ_CHUNK = 256 * 1024
_ERROR_CODE_RE = re.compile(r"[A-Z][A-Z_]{0,63}")


# --- where requests go ----------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Endpoint:
    """One repository on one registry, as requests address it."""

    domain: str
    repository: str
    insecure: bool
    source: PullSource

    @property
    def host(self) -> str:
        return api_host(self.domain)

    def describe(self) -> str:
        return f"{self.domain}/{self.repository}"


class HostState:
    """What was learnt about one registry host; read and written under ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scheme: str | None = None
        self.multirange: bool | None = None


def origin(url: str) -> tuple[str, str]:
    """``(scheme, netloc)`` of *url*, lower case: what "the same origin" compares."""
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


# --- logging and retry policy ---------------------------------------------------------------------
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
        return _left(min(super().get_backoff_time(), self.max_wait))

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else _left(min(value, self.max_wait))


def _left(seconds: float) -> float:
    """*seconds* of sleep, no longer than what is left of the thread's request budget (the
    attempt after it then fails at once if nothing is left)."""
    d = _deadline.current()
    return float(seconds if d is None else min(seconds, d.remaining()))


_NEARLY = 0.1  # a failure this close to the deadline is the deadline's doing


def _deadline_error(host: str, ep: Endpoint, d: _deadline.Deadline, what: str) -> RegistryError:
    return DeadlineExceededError(
        f"registry {host} did not {what} for {ep.describe()} within its {d.seconds:.3g} s deadline"
    )


# --- TLS ------------------------------------------------------------------------------------------
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
class TLSConfig:
    verify: bool | str
    cert: tuple[str, str] | None = None


# --- TLS contexts ---------------------------------------------------------------------------------
_TLS_POOL_KEYS = ("ca_certs", "ca_cert_dir", "cert_file", "key_file")


class _TLSContexts:
    """One ``ssl.SSLContext`` per TLS configuration (verification on or off, CA bundle, client
    certificate), built on first use and shared by every connection that has it.

    Without this, urllib3 builds a context for each new connection and loads the CA bundle
    into it: about 50 ms of CPU each (the system bundle's ~150 certificates), paid again for
    every connection the pools open, and once for the https probe of an insecure registry,
    whose context needs no CA at all (verification is off). A context that cannot be built
    (a bad CA or key file) is not cached: the request then goes the way it always did and
    fails with urllib3's own error. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._contexts: dict[tuple[Any, ...], ssl.SSLContext] = {}

    def contexts(self) -> list[ssl.SSLContext]:
        with self._lock:
            return list(self._contexts.values())

    def pool_kwargs(self, pool_kwargs: dict[str, Any]) -> dict[str, Any]:
        """*pool_kwargs* as requests builds them for an https pool, with the TLS settings
        replaced by the shared context that holds them."""
        cert_reqs = pool_kwargs.get("cert_reqs", "CERT_REQUIRED")
        key = (cert_reqs, *(pool_kwargs.get(k) for k in _TLS_POOL_KEYS))
        with self._lock:
            ctx = self._contexts.get(key)
        if ctx is None:
            try:
                ctx = self._build(cert_reqs, *key[1:])
            except (OSError, ValueError):  # ssl.SSLError is an OSError
                return pool_kwargs
            with self._lock:
                ctx = self._contexts.setdefault(key, ctx)
        out = {k: v for k, v in pool_kwargs.items() if k not in _TLS_POOL_KEYS}
        out["ssl_context"] = ctx
        out["cert_reqs"] = cert_reqs  # urllib3 sets it on the context: always the same value
        return out

    @staticmethod
    def _build(
        cert_reqs: str,
        ca_certs: str | None,
        ca_cert_dir: str | None,
        cert_file: str | None,
        key_file: str | None,
    ) -> ssl.SSLContext:
        verify = cert_reqs != "CERT_NONE"
        ctx = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED if verify else ssl.CERT_NONE)
        if verify:
            if ca_certs or ca_cert_dir:
                ctx.load_verify_locations(cafile=ca_certs, capath=ca_cert_dir)
            else:
                ctx.load_default_certs()
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
        return ctx


class _Adapter(_deadline.GuardedAdapter):
    """The deadline-guarded adapter with TLS contexts shared across connections (the hook
    requests 2.32+ offers for it; with older requests, urllib3 builds one per connection)."""

    def __init__(self, tls: _TLSContexts, **kwargs: Any) -> None:
        self._tls_contexts = tls
        super().__init__(**kwargs)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> Any:
        attrs: Any = super().build_connection_pool_key_attributes(request, verify, cert)
        host_params, pool_kwargs = attrs
        if host_params.get("scheme") == "https":
            pool_kwargs = self._tls_contexts.pool_kwargs(dict(pool_kwargs))
        return host_params, pool_kwargs


# --- the transport --------------------------------------------------------------------------------
class Transport:
    """Sessions, TLS and per-host state shared by every request of one client. Thread-safe."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = s = settings
        _install_log_filter()
        retry = _BoundedRetry(
            total=max(s.retries, s.read_retries),  # one budget across kinds of failure
            connect=s.retries,
            read=s.read_retries,
            status=s.retries,
            other=0,
            redirect=False,
            backoff_factor=s.backoff_factor,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET", "HEAD"}),
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        retry.max_wait = s.max_backoff
        self.tls_contexts = _TLSContexts()
        self._session = self._make_session(retry)
        self._probe_session = self._make_session(Retry(0, read=False, redirect=False))
        self._hosts: dict[str, HostState] = {}
        self._tls: dict[tuple[str, bool], TLSConfig] = {}
        self._tls_files: list[str] = []
        self._lock = threading.Lock()

    def _make_session(self, retry: Retry) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxies or netrc credentials from the environment
        adapter = _Adapter(
            self.tls_contexts,
            pool_connections=self.settings.pool_size,
            pool_maxsize=self.settings.pool_size,
            max_retries=retry,
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = self.settings.user_agent
        session.headers["Accept-Encoding"] = "identity"
        return session

    def budget(self, nbytes: int = 0) -> contextlib.AbstractContextManager[_deadline.Deadline]:
        """A budget scope for one operation whose bodies total *nbytes* (0: small documents):
        every request inside, retries and redirects included, ends by its deadline."""
        s = self.settings
        return _deadline.budget(
            _deadline.budget_seconds(s.request_deadline, nbytes, s.min_bytes_per_second)
        )

    def _timeouts(self, d: _deadline.Deadline) -> tuple[float, float]:
        s = self.settings
        return d.cap(s.connect_timeout), d.cap(s.read_timeout)

    def close(self) -> None:
        """Closes the sessions and removes the temporary CA bundles."""
        self._session.close()
        self._probe_session.close()
        with self._lock:
            files, self._tls_files = self._tls_files, []
        for path in files:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def host_state(self, host: str) -> HostState:
        with self._lock:
            st = self._hosts.get(host)
            if st is None:
                st = self._hosts[host] = HostState()
            return st

    def tls_config(self, ep: Endpoint) -> TLSConfig:
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
        config = TLSConfig(verify, cert)
        with self._lock:
            self._tls.setdefault(key, config)
            return self._tls[key]

    # --- scheme -----------------------------------------------------------------------------------
    def scheme(self, ep: Endpoint) -> str:
        if not ep.insecure:
            return "https"
        st = self.host_state(ep.host)
        with st.lock:
            if st.scheme is not None:
                return st.scheme
        _silence_insecure_warnings()
        # Insecure registries: https (unverified) first, plain http when TLS fails, as
        # containers/image does. Only a definite answer is remembered.
        remember = True
        try:
            with _deadline.budget(min(self.settings.request_deadline, 10.0)) as d:
                connect, read = self._timeouts(d)
                resp = self._probe_session.get(
                    f"https://{ep.host}/v2/",
                    timeout=(connect, min(read, 5.0)),
                    verify=False,
                    cert=self.tls_config(ep).cert,
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

    def base_url(self, ep: Endpoint) -> str:
        """``scheme://host/v2/repository/``: API paths are relative to it."""
        return f"{self.scheme(ep)}://{ep.host}/v2/{ep.repository}/"

    # --- sending ----------------------------------------------------------------------------------
    def send(
        self,
        method: str,
        url: str,
        ep: Endpoint,
        *,
        headers: Mapping[str, str],
        data: Any = None,
    ) -> requests.Response:
        """One request (streamed, redirects not followed); transport failures raise
        RegistryUnavailableError/RegistryError (DeadlineExceededError when the thread's budget
        ran out), HTTP statuses are the caller's."""
        tls = self.tls_config(ep)
        netloc = urlsplit(url).netloc
        with _deadline.request_scope(self.settings.request_deadline) as d:
            if d.expired():
                raise _deadline_error(netloc, ep, d, "answer")
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=dict(headers),
                    data=data,
                    stream=True,
                    allow_redirects=False,
                    timeout=self._timeouts(d),
                    verify=tls.verify,
                    cert=tls.cert if origin(url)[1] == ep.host.lower() else None,
                )
            except requests.RequestException as exc:
                raise self._transport_error(exc, netloc, ep, d) from None
        log.debug(
            "registry_response",
            method=method,
            url=redact_url(url),
            status=resp.status_code,
        )
        return resp

    @staticmethod
    def _transport_error(
        exc: requests.RequestException, netloc: str, ep: Endpoint, d: _deadline.Deadline
    ) -> RegistryError:
        """Our error for a failed request to *netloc* (no URL: it may be a signed one)."""
        if d.remaining() <= _NEARLY:
            return _deadline_error(netloc, ep, d, "answer")
        if isinstance(exc, requests.exceptions.Timeout):
            return RegistryUnavailableError(
                f"registry {netloc} timed out ({_reason(exc)}) for {ep.describe()}"
            )
        if isinstance(exc, requests.exceptions.SSLError):
            return RegistryUnavailableError(f"TLS failure talking to {netloc} ({_reason(exc)})")
        if isinstance(exc, requests.exceptions.ConnectionError):
            reason = _reason(exc)
            if "Timeout" in reason:  # read timeouts after retries arrive as ConnectionError
                return RegistryUnavailableError(
                    f"registry {netloc} timed out ({reason}) for {ep.describe()}"
                )
            return RegistryUnavailableError(f"cannot reach {netloc} for {ep.describe()} ({reason})")
        return RegistryError(f"request to {netloc} failed ({_reason(exc)})")

    def send_to_token_server(
        self,
        method: str,
        url: str,
        ep: Endpoint,
        *,
        headers: Mapping[str, str],
        form: Mapping[str, str] | None,
    ) -> requests.Response:
        """A request to the token server of *ep*'s registry (the registry's CA settings, no
        client certificate); any transport failure is RegistryUnavailableError.

        Redirects are followed by hand: a POST (an OAuth2 refresh-token grant: the body is a
        secret) is never re-sent anywhere, its redirect is an AuthenticationError; a GET
        follows at most ``max_redirects`` hops, its ``Authorization`` (Basic credentials) only
        as long as it stays on the realm's origin.
        """
        hdrs = dict(headers)
        realm_origin = origin(url)
        hops = 0
        while True:
            resp = self._token_request(method, url, ep, hdrs, form)
            if resp.status_code not in REDIRECT_CODES:
                return resp
            location = resp.headers.get("Location") or ""
            drain(resp)
            here = urlsplit(url).netloc
            new_url = urljoin(url, location)
            there = urlsplit(new_url).netloc or "(no Location)"
            if method != "GET":
                raise AuthenticationError(
                    f"token server {here} of registry {ep.host} redirected the token {method} "
                    f"to {there}; refusing to send the request body anywhere else",
                    status=resp.status_code,
                )
            hops += 1
            if not location or hops > self.settings.max_redirects:
                raise RegistryError(
                    f"token server {here} of registry {ep.host} sent a redirect without "
                    "Location or too many redirects",
                    status=resp.status_code,
                )
            new_scheme = urlsplit(new_url).scheme.lower()
            if new_scheme not in ("http", "https") or (
                urlsplit(url).scheme.lower() == "https" and new_scheme == "http" and not ep.insecure
            ):
                raise RegistryError(
                    f"token server {here} of registry {ep.host} redirected to a {new_scheme} "
                    f"URL on {there}; refusing"
                )
            if origin(new_url) != realm_origin:
                hdrs.pop("Authorization", None)  # credentials stay with the realm's origin
            log.debug("registry_token_redirect", host=ep.host, to=redact_url(new_url), hop=hops)
            url = new_url

    def _token_request(
        self,
        method: str,
        url: str,
        ep: Endpoint,
        headers: Mapping[str, str],
        form: Mapping[str, str] | None,
    ) -> requests.Response:
        netloc = urlsplit(url).netloc
        with _deadline.request_scope(self.settings.request_deadline) as d:
            if d.expired():
                raise _deadline_error(netloc, ep, d, "answer a token request")
            try:
                return self._session.request(
                    method,
                    url,
                    headers=dict(headers),
                    data=dict(form) if form is not None else None,
                    timeout=self._timeouts(d),
                    allow_redirects=False,
                    verify=self.tls_config(ep).verify,
                    stream=True,
                )
            except requests.RequestException as exc:
                if d.remaining() <= _NEARLY:
                    raise _deadline_error(netloc, ep, d, "answer a token request") from None
                raise RegistryUnavailableError(
                    f"cannot reach the token server {netloc} of registry {ep.host} ({_reason(exc)})"
                ) from None

    def follow_redirects(
        self,
        ep: Endpoint,
        resp: requests.Response,
        headers: Mapping[str, str],
        *,
        authorization: str | None,
    ) -> tuple[requests.Response, str, bool]:
        """GETs the redirects *resp* leads to. Returns (response, final URL, redirected).

        *authorization* (what the first request carried) is sent again only to the registry's
        own origin; blob storage on another host never sees it.
        """
        registry_origin = origin(self.base_url(ep))
        url = resp.url
        hops = 0
        redirected = False
        while resp.status_code in REDIRECT_CODES:
            location = resp.headers.get("Location")
            drain(resp)
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
            if urlsplit(url).scheme.lower() == "https" and new_scheme == "http" and not ep.insecure:
                raise RegistryError(
                    f"registry {ep.host} redirected from https to http "
                    f"({urlsplit(new_url).netloc}); refusing for a secure registry"
                )
            hdrs = dict(headers)
            if authorization and origin(new_url) == registry_origin:
                hdrs["Authorization"] = authorization
            log.debug("registry_redirect", host=ep.host, to=redact_url(new_url), hop=hops)
            resp = self.send("GET", new_url, ep, headers=hdrs)
            url = new_url
            redirected = True
        return resp, url, redirected


# --- statuses and bodies --------------------------------------------------------------------------
def raise_for_status(resp: requests.Response, ep: Endpoint, what: str) -> None:
    """Nothing for a 2xx answer; otherwise the error its status means (the body is drained)."""
    code = resp.status_code
    if 200 <= code < 300:
        return
    detail = _error_detail(resp)
    drain(resp)
    msg = f"{what} in {ep.describe()} on registry {ep.host}: HTTP {code}{detail}"
    if code == 404:
        raise NotFoundError(msg, status=code)
    if code in (401, 403):
        raise AuthenticationError(msg, status=code)
    if code in RETRY_STATUSES:
        raise RegistryUnavailableError(msg, status=code)
    if code == 416:
        raise RangeError(msg, status=code)
    raise RegistryError(msg, status=code)


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


def stream(resp: requests.Response, ep: Endpoint) -> Iterator[bytes]:
    """Raw body bytes (no content decoding), with transport errors mapped to ours; the
    thread's budget is checked before every read (the watchdog ends a read that outlives it)."""
    raw = resp.raw
    d = _deadline.current()
    try:
        while True:
            if d is not None and d.expired():
                raise _deadline_error(ep.host, ep, d, "finish sending a body")
            piece = raw.read(_READ_CHUNK, decode_content=False)
            if not piece:
                break
            yield piece
    except urllib3.exceptions.ReadTimeoutError:
        if d is not None and d.remaining() <= _NEARLY:
            raise _deadline_error(ep.host, ep, d, "finish sending a body") from None
        raise RegistryUnavailableError(
            f"registry {ep.host} stalled while sending a body for {ep.describe()}"
        ) from None
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError, OSError) as exc:
        if d is not None and d.remaining() <= _NEARLY:
            raise _deadline_error(ep.host, ep, d, "finish sending a body") from None
        raise RangeError(
            f"body from {ep.host} for {ep.describe()} broke off ({type(exc).__name__})"
        ) from None
    if d is not None and d.expired():  # the watchdog may have cut it short
        raise _deadline_error(ep.host, ep, d, "finish sending a body")


def read_capped(resp: requests.Response, limit: int, ep: Endpoint, what: str) -> bytes:
    """The whole body of a document (manifest, config, token answer) of at most *limit*
    bytes; ManifestError when it is larger."""
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ManifestError(f"{what} from {ep.host} is {length} bytes, over the {limit} byte limit")
    out = bytearray()
    for piece in stream(resp, ep):
        out += piece
        if len(out) > limit:
            raise ManifestError(f"{what} from {ep.host} is over the {limit} byte limit")
    return bytes(out)


def drain(resp: requests.Response, limit: int = 65536) -> None:
    """Read a small error body so the connection can be reused; close otherwise."""
    try:
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= limit:
            resp.raw.read(int(length), decode_content=False)
    except Exception:  # best effort only
        pass
    finally:
        resp.close()


__all__ = [
    "REDIRECT_CODES",
    "RETRY_STATUSES",
    "Endpoint",
    "HostState",
    "PullSource",
    "TLSConfig",
    "Transport",
    "drain",
    "origin",
    "raise_for_status",
    "read_capped",
    "stream",
    "system_ca_bundle",
]
