"""Redaction for logs and error messages: URLs lose their query, fragment and user-info.

Signed blob URLs carry credentials in the query string, and URLs with user-info carry
passwords; neither may reach a log line or an error a user sees.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL_QUERY = re.compile(r"""(https?://[^\s?#'"<>]*)[?#][^\s'"<>]*""")
_USERINFO = re.compile(r"(https?://)[^/\s@'\"]+@")


def redact(text: str) -> str:
    """*text* with every URL's query string and user-info removed."""
    return _USERINFO.sub(r"\1", _URL_QUERY.sub(r"\1?<redacted>", text))


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path`` of *url*: no user-info, query or fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable url>"
    netloc = parts.hostname or ""
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def describe_error(e: BaseException, limit: int = 300) -> str:
    """A loggable description of a foreign exception: its type and redacted message."""
    msg = redact(str(e))[:limit]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
