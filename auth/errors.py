"""The auth exception tree. Messages name registries, never secrets."""

from __future__ import annotations


class AuthError(Exception):
    """Base of every auth error."""


class AuthFileError(AuthError):
    """An auth.json / docker config file is unreadable or malformed."""


class CredentialHelperError(AuthError):
    """A docker-credential-* helper failed, timed out, or answered garbage."""


class TokenError(AuthError):
    """The token flow failed: bad challenge, token server refused or answered garbage."""


class HelperChannelError(AuthError):
    """The podman auth-helper channel (Unix socket) failed."""
