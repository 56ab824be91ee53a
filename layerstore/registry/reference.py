"""Image references in the docker grammar, normalised the way podman and docker normalise them.

``[host[:port]/]path[:tag][@sha256:<hex>]``. A first component is a host when it contains ``.``
or ``:`` or is ``localhost``; otherwise the reference is on docker.io, and a single-component
docker.io path gets the ``library/`` prefix. Without tag and digest the tag is ``latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from layerstore import digest as _digest
from layerstore.errors import DigestError, ImageReferenceError

DOCKER_IO = "docker.io"
DOCKER_IO_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DOCKER_IO_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class Reference:
    """A normalised image reference. ``domain`` is the logical registry (``docker.io``, not its
    API endpoint); ``path`` is the repository inside it."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/path``, the repository's fully qualified name."""
        return f"{self.domain}/{self.path}"

    @property
    def repository(self) -> str:
        return self.path

    @property
    def api_host(self) -> str:
        """Where the registry API lives (``registry-1.docker.io`` for docker.io)."""
        return api_host(self.domain)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, self.tag, _digest.validate(digest))

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.fullmatch(tag):
            raise ImageReferenceError(f"invalid tag {tag!r}")
        return Reference(self.domain, self.path, tag, self.digest)

    def manifest_ref(self) -> str:
        """What to put after ``/manifests/``: the digest when there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def api_host(domain: str) -> str:
    return DOCKER_IO_API if domain == DOCKER_IO else domain


def split_location(location: str) -> tuple[str, str]:
    """Split ``host[:port]/path`` (a registries.conf location or a reference name) into host and
    path, applying the docker.io defaults."""
    text = location.strip()
    if not text:
        raise ImageReferenceError("empty repository location")
    first, sep, rest = text.partition("/")
    if sep and _looks_like_domain(first):
        domain, path = first, rest
    else:
        domain, path = DOCKER_IO, text
    if domain in _DOCKER_IO_ALIASES:
        domain = DOCKER_IO
    if not _DOMAIN_RE.fullmatch(domain):
        raise ImageReferenceError(f"invalid registry host {domain!r} in {location!r}")
    if not path:
        raise ImageReferenceError(f"{location!r} names a registry but no repository")
    if path != path.lower():
        raise ImageReferenceError(f"repository name must be lowercase: {location!r}")
    for component in path.split("/"):
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise ImageReferenceError(
                f"invalid repository path component {component!r} in {location!r}"
            )
    if domain == DOCKER_IO and "/" not in path:
        path = f"library/{path}"
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise ImageReferenceError(f"repository name longer than {MAX_NAME_LENGTH} characters")
    return domain, path


def _looks_like_domain(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first != first.lower()


def parse_reference(text: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse and normalise *text*; ``docker://`` prefixes are accepted and dropped.

    Without tag and digest the tag becomes *default_tag* (``None`` leaves it unset).
    """
    if not isinstance(text, str):
        raise ImageReferenceError(f"image reference must be a string, not {type(text).__name__}")
    original = text
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    if not text:
        raise ImageReferenceError("empty image reference")
    if any(ch.isspace() for ch in text):
        raise ImageReferenceError(f"image reference {original!r} contains whitespace")

    digest: str | None = None
    if "@" in text:
        text, _, digest_text = text.partition("@")
        try:
            digest = _digest.validate(digest_text)
        except DigestError:
            raise ImageReferenceError(
                f"invalid digest in image reference {original!r}: expected sha256:<64 hex digits>"
            ) from None

    tag: str | None = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise ImageReferenceError(f"invalid tag {tag!r} in image reference {original!r}")

    try:
        domain, path = split_location(text)
    except ImageReferenceError as exc:
        raise ImageReferenceError(f"invalid image reference {original!r}: {exc}") from None
    if tag is None and digest is None:
        tag = default_tag
    return Reference(domain, path, tag, digest)


def in_repository(ref: str, host: str, repository: str) -> bool:
    """Does the reference *ref* name an image of repository *repository* on registry *host*?
    Both sides are normalised alike (docker.io aliases, ``library/``, host case); a reference
    or a location that does not parse matches nothing."""
    try:
        want_domain, want_path = split_location(f"{host}/{repository.strip('/')}")
        got = parse_reference(ref)
    except ImageReferenceError:
        return False
    return got.domain.lower() == want_domain.lower() and got.path == want_path
