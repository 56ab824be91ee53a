"""The registry client's settings: the one place their defaults are written down.

The daemon's ``[registry]`` config section (``stargz_store.config.RegistrySection``) takes its
defaults from this class and builds it; ``stargz-store convert`` and the tests build it
directly. A default changed here changes both, and ``config.example.toml`` must follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerstore.registry import manifest as _manifest

DEFAULT_CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")


@dataclass(frozen=True)
class RegistrySettings:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    """Idle timeout: the longest wait for the next bytes of an answer (per read)."""
    request_deadline: float = 30.0
    """Total time one request for a small document (manifest, config, token, HEAD) may take:
    connect, headers and the whole body, retries and backoff included. Range and whole-blob
    reads get this plus their size at ``min_bytes_per_second``."""
    min_bytes_per_second: int = 128 * 1024
    """The slowest transfer rate a body may have: a range of N bytes gets
    ``request_deadline + N / min_bytes_per_second`` seconds in all."""
    retries: int = 3
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
    certs_dirs: tuple[str, ...] = DEFAULT_CERTS_DIRS
    """containers-certs.d(5): ``<dir>/<host[:port]>/*.crt`` are extra CAs for that host;
    ``*.cert`` with a matching ``*.key`` is a client certificate."""


__all__ = ["DEFAULT_CERTS_DIRS", "RegistrySettings"]
