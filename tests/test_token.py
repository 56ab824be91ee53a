from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from auth import token as t
from auth.errors import TokenError
from auth.types import Credentials


def test_parse_bearer_challenge() -> None:
    (c,) = t.parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.example.com/token"
    assert c.service == "registry.example.com"
    assert c.scope == "repository:a/b:pull"


def test_parse_multiple_and_quoting() -> None:
    cs = t.parse_www_authenticate(
        ['Basic realm="x\\"y"', 'Bearer realm=https://r/t, error="insufficient_scope"']
    )
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].realm == 'x"y'
    assert cs[1].realm == "https://r/t"
    assert cs[1].error == "insufficient_scope"
    both = t.parse_www_authenticate('Basic realm="a", Bearer realm="https://b/t",service="s"')
    assert [c.scheme for c in both] == ["basic", "bearer"]
    assert t.pick_challenge(both) == both[1]
    assert t.pick_challenge(t.parse_www_authenticate('Basic realm="a"')) is not None
    assert t.pick_challenge(t.parse_www_authenticate("Negotiate abc==")) is None
    with pytest.raises(TokenError):
        t.parse_www_authenticate('Bearer realm="unterminated')


def _challenge() -> t.Challenge:
    return t.Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg"})


def test_token_request_basic_creds() -> None:
    creds = Credentials("alice", "s3cret")
    req = t.build_token_request(_challenge(), ["repository:a/b:pull"], creds)
    assert req.method == "GET"
    url = urllib.parse.urlsplit(req.url)
    q = urllib.parse.parse_qs(url.query)
    assert q == {"service": ["reg"], "scope": ["repository:a/b:pull"], "account": ["alice"]}
    user_pass = base64.b64decode(req.headers["Authorization"].split()[1]).decode()
    assert user_pass == "alice:s3cret"
    assert "s3cret" not in repr(req)


def test_token_request_anonymous_and_identity_token() -> None:
    anon = t.build_token_request(_challenge(), ["repository:a/b:pull"], None)
    assert "Authorization" not in anon.headers
    assert "account" not in anon.url
    idt = Credentials("<token>", "", identity_token="refresh-me")
    req = t.build_token_request(_challenge(), ["repository:a/b:pull", "repository:c:pull"], idt)
    assert req.method == "POST"
    assert req.form is not None
    assert req.form["grant_type"] == "refresh_token"
    assert req.form["refresh_token"] == "refresh-me"
    assert req.form["scope"] == "repository:a/b:pull repository:c:pull"
    assert req.form["service"] == "reg"
    assert "refresh-me" not in repr(req)


def test_token_request_rejects_bad_realm() -> None:
    with pytest.raises(TokenError):
        t.build_token_request(t.Challenge("bearer", {"realm": "file:///etc/passwd"}), [], None)
    with pytest.raises(TokenError):
        t.build_token_request(t.Challenge("bearer", {}), [], None)
    with pytest.raises(TokenError):
        t.build_token_request(t.Challenge("basic", {"realm": "x"}), [], None)


def test_parse_token_response() -> None:
    tok = t.parse_token_response(json.dumps({"token": "abc", "expires_in": 300}).encode(), now=1000)
    assert tok.token == "abc" and tok.expires_at == 1300
    assert "abc" not in repr(tok)
    tok = t.parse_token_response(json.dumps({"access_token": "x"}).encode(), now=1000)
    assert tok.expires_at == 1000 + t.DEFAULT_EXPIRES_IN
    # issued 100 s ago: lifetime counts from issued_at
    tok = t.parse_token_response(
        json.dumps(
            {"token": "x", "expires_in": 300, "issued_at": "1970-01-01T00:15:00.123456789Z"}
        ).encode(),
        now=1000,
    )
    assert tok.expires_at == pytest.approx(900.123456 + 300)
    # issued in the future (clock skew): our clock wins
    tok = t.parse_token_response(
        json.dumps({"token": "x", "expires_in": 300, "issued_at": "2100-01-01T00:00:00Z"}).encode(),
        now=1000,
    )
    assert tok.expires_at == 1300
    tok = t.parse_token_response(json.dumps({"token": "x", "refresh_token": "r"}).encode())
    assert tok.refresh_token == "r"
    for bad in (b"nope", b"[]", b"{}", json.dumps({"token": ""}).encode()):
        with pytest.raises(TokenError):
            t.parse_token_response(bad)


def test_token_cache_expiry_and_invalidate() -> None:
    now = [1000.0]
    cache = t.TokenCache(clock=lambda: now[0])
    cache.put("h", "s1", t.Token("a", expires_at=1100))
    cache.put("h", "s2", t.Token("b", expires_at=2000))
    cache.put("other", "s1", t.Token("c", expires_at=2000))
    assert cache.get("h", "s1") is not None
    now[0] = 1100 - t.EXPIRY_MARGIN  # inside the margin: no longer handed out
    assert cache.get("h", "s1") is None
    assert len(cache) == 2
    cache.invalidate("h")
    assert cache.get("h", "s2") is None
    assert cache.get("other", "s1") is not None
    cache.invalidate("other", "s1")
    assert len(cache) == 0


def test_scope_and_basic_header() -> None:
    assert t.repository_scope("a/b", ("pull", "push")) == "repository:a/b:pull,push"
    assert t.basic_authorization(Credentials("u", "p")) == "Basic dTpw"
