"""The registry auth flow as pure logic: no HTTP happens here.

- :func:`parse_www_authenticate` turns a ``WWW-Authenticate`` header into :class:`Challenge`\\ s.
- :func:`build_token_request` says what to send to a Bearer realm: ``GET realm?service=&scope=``
  (Basic credentials when there are any), or an OAuth2 ``POST`` with
  ``grant_type=refresh_token`` when the credentials carry an identity token.
- :func:`parse_token_response` reads the token server's JSON answer.
- :class:`TokenCache` keeps tokens per ``(host, scope)`` until shortly before they expire.

The registry client (``layerstore.registry.auth``) performs the requests and retries once with a
fresh token after a 401. Nothing here logs, and reprs never show secrets.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from auth.errors import TokenError
from auth.types import Credentials
from layerstore.common.timefmt import parse_rfc3339

DEFAULT_EXPIRES_IN = 60
"""The distribution token spec's default lifetime when ``expires_in`` is absent."""
EXPIRY_MARGIN = 10.0
"""Seconds before expiry at which a cached token is no longer handed out."""
MAX_TOKEN_RESPONSE = 1024 * 1024
DEFAULT_CLIENT_ID = "stargz-store"


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge. ``scheme`` is lower case (``bearer``, ``basic``)."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")

    @property
    def error(self) -> str | None:
        return self.params.get("error")


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t":
        i += 1
    return i


def _read_token(s: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(s) and s[i] not in ' \t,="':
        i += 1
    return s[start:i], i


def _read_quoted(s: str, i: int) -> tuple[str, int]:
    # s[i] == '"'
    i += 1
    out: list[str] = []
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise TokenError("unterminated quoted string in WWW-Authenticate")


def parse_www_authenticate(header: str | Sequence[str]) -> list[Challenge]:
    """Parse one or more ``WWW-Authenticate`` values (RFC 7235 challenges, auth-params only).

    Unknown schemes are returned too; token68 forms are ignored. Raises TokenError on malformed
    quoting only.
    """
    values = [header] if isinstance(header, str) else list(header)
    challenges: list[Challenge] = []
    for value in values:
        s = value
        i = 0
        scheme: str | None = None
        params: dict[str, str] = {}
        while True:
            i = _skip_ws(s, i)
            while i < len(s) and s[i] == ",":
                i = _skip_ws(s, i + 1)
            if i >= len(s):
                break
            word, j = _read_token(s, i)
            if not word:  # stray '=' or '"' (token68 padding, garbage): skip it
                i += 1
                continue
            k = _skip_ws(s, j)
            if k < len(s) and s[k] == "=" and scheme is not None:
                k = _skip_ws(s, k + 1)
                if k < len(s) and s[k] == '"':
                    val, k = _read_quoted(s, k)
                else:
                    val, k = _read_token(s, k)
                params[word.lower()] = val
                i = k
                continue
            if k < len(s) and s[k] == "=":
                # token68 right after a scheme, e.g. "Negotiate abc==": skip it
                while k < len(s) and s[k] == "=":
                    k += 1
                i = k
                continue
            # a new scheme starts
            if scheme is not None:
                challenges.append(Challenge(scheme, params))
            scheme, params = word.lower(), {}
            i = j
        if scheme is not None:
            challenges.append(Challenge(scheme, params))
    return challenges


def pick_challenge(challenges: Sequence[Challenge]) -> Challenge | None:
    """Bearer (with a realm) before Basic; other schemes are unsupported."""
    for c in challenges:
        if c.scheme == "bearer" and c.realm:
            return c
    for c in challenges:
        if c.scheme == "basic":
            return c
    return None


def repository_scope(repository: str, actions: Sequence[str] = ("pull",)) -> str:
    return f"repository:{repository}:{','.join(actions)}"


def basic_authorization(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class TokenRequest:
    """What to send to the token server. ``repr`` hides headers and form data (secrets)."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    form: Mapping[str, str] | None = field(default=None, repr=False)


def build_token_request(
    challenge: Challenge,
    scopes: Sequence[str],
    credentials: Credentials | None,
    *,
    client_id: str = DEFAULT_CLIENT_ID,
) -> TokenRequest:
    """The token request for a Bearer *challenge* and the *scopes* we need.

    A ``POST`` carries the refresh token in its body: the client sends it to the realm only and
    follows no redirect with it; a ``GET`` carries Basic credentials, which stay on the realm's
    origin."""
    if challenge.scheme != "bearer":
        raise TokenError(f"not a Bearer challenge: {challenge.scheme}")
    realm = challenge.realm
    if not realm:
        raise TokenError("Bearer challenge without a realm")
    parts = urlsplit(realm)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TokenError("Bearer realm is not an http(s) URL")
    service = challenge.service
    creds = credentials if credentials is not None and not credentials.is_empty() else None
    if creds is not None and creds.identity_token:
        form: dict[str, str] = {
            "grant_type": "refresh_token",
            "refresh_token": creds.identity_token,
            "client_id": client_id,
        }
        if service:
            form["service"] = service
        if scopes:
            form["scope"] = " ".join(scopes)
        return TokenRequest(
            "POST", realm, {"Content-Type": "application/x-www-form-urlencoded"}, form
        )
    query: list[tuple[str, str]] = []
    if service:
        query.append(("service", service))
    query.extend(("scope", s) for s in scopes)
    if creds is not None:
        query.append(("account", creds.username))
    url = realm
    if query:
        url += ("&" if parts.query else "?") + urlencode(query)
    headers: dict[str, str] = {}
    if creds is not None:
        headers["Authorization"] = basic_authorization(creds)
    return TokenRequest("GET", url, headers, None)


@dataclass(frozen=True)
class Token:
    token: str = field(repr=False)
    expires_at: float
    refresh_token: str | None = field(default=None, repr=False)

    def valid(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires_at - EXPIRY_MARGIN


def _parse_time(text: str) -> float | None:
    """An RFC 3339 ``issued_at`` as epoch seconds; None when malformed or without a zone."""
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None


def parse_token_response(body: bytes, *, now: float | None = None) -> Token:
    """Read ``{"token"|"access_token", "expires_in", "issued_at", "refresh_token"}``.

    The lifetime counts from *now* (our clock), not from ``issued_at``, unless ``issued_at`` is
    in the past by more than the skew we tolerate; a missing or silly ``expires_in`` means 60 s.
    """
    if len(body) > MAX_TOKEN_RESPONSE:
        raise TokenError("token response is too large")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenError("token response is not JSON") from None
    if not isinstance(obj, dict):
        raise TokenError("token response is not a JSON object")
    tok = obj.get("token") or obj.get("access_token")
    if not isinstance(tok, str) or not tok:
        raise TokenError("token response has no token")
    expires_in = obj.get("expires_in")
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in < 1:
        expires_in = DEFAULT_EXPIRES_IN
    current = time.time() if now is None else now
    start = current
    issued_at = obj.get("issued_at")
    if isinstance(issued_at, str):
        issued = _parse_time(issued_at)
        # Trust the server's issue time only when it is earlier than ours (token already aged).
        if issued is not None and issued < current:
            start = max(issued, current - float(expires_in))
    refresh = obj.get("refresh_token")
    return Token(
        token=tok,
        expires_at=start + float(expires_in),
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
    )


class TokenCache:
    """Bearer tokens per ``(host, scope)``; thread-safe; expired tokens are never returned."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], Token] = {}
        self._clock: Callable[[], float] = clock or time.time

    def get(self, host: str, scope: str) -> Token | None:
        with self._lock:
            tok = self._tokens.get((host, scope))
            if tok is None:
                return None
            if not tok.valid(self._clock()):
                del self._tokens[(host, scope)]
                return None
            return tok

    def put(self, host: str, scope: str, token: Token) -> None:
        with self._lock:
            self._tokens[(host, scope)] = token

    def invalidate(self, host: str, scope: str | None = None) -> None:
        with self._lock:
            if scope is not None:
                self._tokens.pop((host, scope), None)
            else:
                for key in [k for k in self._tokens if k[0] == host]:
                    del self._tokens[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)
