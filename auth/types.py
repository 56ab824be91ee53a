"""Credential values shared by the auth sources and the registry client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Credentials:
    """What one registry gets: a username and password, or an OAuth2 identity (refresh) token.

    ``repr`` never shows the secret parts.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def is_empty(self) -> bool:
        return not (self.username or self.password or self.identity_token)
