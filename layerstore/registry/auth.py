"""The registry side of authentication: challenges, tokens and authorized requests.

Owns: the challenge learnt per host from a 401 (Bearer or Basic), the Bearer tokens per
``(host, scope)`` (:class:`auth.token.TokenCache`), one token request at a time per
``(host, scope)`` (:class:`layerstore.common.singleflight.SingleFlight`: concurrent callers
share it), the credential lookup, and :meth:`RegistryAuth.request`: a request carrying the
``Authorization`` a registry asked for, retried once with a fresh token after a 401.

The pure parts of the token flow (parsing challenges and answers, building token requests) are
:mod:`auth.token`; HTTP is :mod:`.transport`.

Credentials are looked up per *registry host*: a mirror never sees the upstream registry's
credentials and vice versa; ``Authorization`` goes to the registry's own origin only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Union
from urllib.parse import urljoin, urlsplit

import requests
import structlog

from auth import token as _token
from auth.errors import AuthError, TokenError
from auth.types import Credentials
from layerstore.common.singleflight import SingleFlight
from layerstore.errors import (
    AuthenticationError,
    DeadlineExceededError,
    RegistryError,
    RegistryUnavailableError,
)
from layerstore.registry import deadline as _deadline
from layerstore.registry.transport import (
    RETRY_STATUSES,
    Endpoint,
    Transport,
    drain,
    origin,
    read_capped,
)

log = structlog.get_logger(__name__)

Body = Union[bytes, Callable[[], Any], None]
"""A request body: bytes, or a callable opening a fresh file object for each attempt."""


class CredentialProvider(Protocol):
    """``auth.store.CredentialStore`` implements this."""

    def lookup(self, host: str, repository: str) -> Credentials | None: ...


class RegistryAuth:
    """Authorization for the requests of one client. Thread-safe."""

    def __init__(self, transport: Transport, credentials: CredentialProvider | None) -> None:
        self._transport = transport
        self._credentials = credentials
        self._tokens = _token.TokenCache()
        self._token_flights: SingleFlight[tuple[str, str], _token.Token] = SingleFlight()
        self._challenges: dict[str, _token.Challenge] = {}
        self._lock = threading.Lock()

    def lookup_credentials(self, ep: Endpoint) -> Credentials | None:
        """The credentials for *ep*'s registry, or None (none configured, or empty)."""
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

    def challenge(self, host: str) -> _token.Challenge | None:
        """The challenge *host* last answered a 401 with (None: it never asked)."""
        with self._lock:
            return self._challenges.get(host)

    def authorization(
        self, ep: Endpoint, scope: str, *, refresh: bool, used: str | None
    ) -> str | None:
        """The ``Authorization`` value for a request in *scope* (None: send none).

        With *refresh*, the value *used* was just refused: a cached token other than it (one
        another thread fetched meanwhile) is fine, else a new one is fetched.
        """
        challenge = self.challenge(ep.host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self.lookup_credentials(ep)
            if creds is None or not (creds.username or creds.password):
                return None
            return _token.basic_authorization(creds)
        key = (ep.host, scope)

        def usable(tok: _token.Token | None) -> bool:
            return tok is not None and (not refresh or f"Bearer {tok.token}" != used)

        tok = self._tokens.get(*key)
        if not refresh and tok is not None:
            return f"Bearer {tok.token}"

        def cached_or_fetched() -> _token.Token:
            # runs in the flight's owner only, so ``usable`` is the owner's view
            cached = self._tokens.get(*key)
            if cached is not None and usable(cached):
                return cached
            fresh = self._fetch_token(ep, challenge, scope)
            self._tokens.put(*key, fresh)
            return fresh

        # A caller that waited on another's flight may get back the very token it was refused
        # (the owner found it cached); a second flight then fetches a fresh one. A waiter
        # waits no longer than its own budget (the owner's may be longer).
        for _ in range(2):
            budget = _deadline.current()
            try:
                tok = self._token_flights.do(
                    key, cached_or_fetched, timeout=None if budget is None else budget.remaining()
                )
            except TimeoutError:
                assert budget is not None
                raise DeadlineExceededError(
                    f"no token from registry {ep.host} for {ep.describe()} within the "
                    f"{budget.seconds:.3g} s deadline"
                ) from None
            if usable(tok):
                break
        assert tok is not None
        return f"Bearer {tok.token}"

    def _fetch_token(self, ep: Endpoint, challenge: _token.Challenge, scope: str) -> _token.Token:
        creds = self.lookup_credentials(ep)
        try:
            req = _token.build_token_request(challenge, [scope], creds)
        except TokenError as exc:
            raise AuthenticationError(f"registry {ep.host}: {exc}") from None
        realm = urlsplit(req.url)
        if realm.scheme != "https" and not ep.insecure:
            raise AuthenticationError(
                f"registry {ep.host} sent a token realm that is not https; refusing"
            )
        resp = self._transport.send_to_token_server(
            req.method, req.url, ep, headers=req.headers, form=req.form
        )
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
                    if resp.status_code in RETRY_STATUSES
                    else RegistryError
                )
                raise exc_type(
                    f"token server {realm.netloc} of registry {ep.host} answered "
                    f"HTTP {resp.status_code}",
                    status=resp.status_code,
                )
            body = read_capped(resp, _token.MAX_TOKEN_RESPONSE, ep, "token response")
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

    def request(
        self,
        ep: Endpoint,
        method: str,
        path_or_url: str,
        *,
        actions: Sequence[str] = ("pull",),
        headers: Mapping[str, str] | None = None,
        body: Body = None,
    ) -> requests.Response:
        """One registry request with auth (a 401 leads to one retry with a fresh token).

        *path_or_url* is relative to the repository's API base; a URL on another origin gets
        no ``Authorization``. Redirects are not followed.
        """
        base = self._transport.base_url(ep)
        url = urljoin(base, path_or_url)
        same_origin = origin(url) == origin(base)
        scope = _token.repository_scope(ep.repository, actions)
        used: str | None = None
        for attempt in (0, 1):
            hdrs = dict(headers or {})
            auth = (
                self.authorization(ep, scope, refresh=attempt == 1, used=used)
                if same_origin
                else None
            )
            if auth:
                hdrs["Authorization"] = auth
            used = auth
            data: Any = body() if callable(body) else body
            try:
                resp = self._transport.send(method, url, ep, headers=hdrs, data=data)
            finally:
                if callable(body) and hasattr(data, "close"):
                    data.close()  # a file opened for this attempt; fully sent by now
            if resp.status_code != 401 or not same_origin:
                return resp
            header_values = resp.raw.headers.getlist("WWW-Authenticate") if resp.raw else []
            drain(resp)
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
            with self._lock:
                self._challenges[ep.host] = challenge
            if attempt == 1 or (auth is not None and challenge.scheme == "basic"):
                break
        creds = self.lookup_credentials(ep)
        if creds is None:
            raise AuthenticationError(
                f"registry {ep.host} requires authentication for {ep.describe()} and no "
                "credentials are configured for it",
                status=401,
            )
        raise AuthenticationError(
            f"registry {ep.host} refused the credentials for {ep.describe()}", status=401
        )


__all__ = ["Body", "CredentialProvider", "RegistryAuth"]
