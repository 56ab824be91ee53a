"""The daemon's configuration: pydantic models loaded from a TOML file.

Every section refuses unknown keys (``extra="forbid"``) so that a typo is an error, not a
silently ignored setting. :func:`load_config` turns every problem (missing file, bad TOML,
unknown key, wrong type) into a :class:`ConfigError` whose message names the file and the key;
the command line prints that message and exits without a traceback.

``config.example.toml`` at the top of the repository documents every key and its default; a
test checks that it parses and that every field below appears in it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from layerstore.registry.settings import RegistrySettings as ClientSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/stargz-store/config.toml")
DEFAULT_ROOT = Path("/var/lib/stargz-store")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


_CLIENT = ClientSettings()


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid. The message is user-facing."""


# (The ignore is for mypy set-ups that do not follow imports into pydantic: BaseModel is Any.)
class _Section(BaseModel):  # type: ignore[misc,unused-ignore]
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistrySection(_Section):
    """How the store talks to registries: the ``[registry]`` section.

    The client's knobs take their defaults from the client's own settings class
    (:class:`layerstore.registry.settings.RegistrySettings`, the one place they are written
    down); :meth:`client_settings` builds that class from the section.
    """

    connect_timeout: float = Field(default=_CLIENT.connect_timeout, gt=0)
    read_timeout: float = Field(default=_CLIENT.read_timeout, gt=0)
    request_deadline: float = Field(default=_CLIENT.request_deadline, gt=0)
    min_bytes_per_second: int = Field(default=_CLIENT.min_bytes_per_second, ge=1)
    host_share: float = Field(default=0.5, gt=0, le=1)
    retries: int = Field(default=_CLIENT.retries, ge=0)
    retry_backoff: float = Field(default=_CLIENT.backoff_factor, ge=0)
    pool_size: int = Field(default=_CLIENT.pool_size, ge=1)
    insecure_registries: list[str] = Field(
        default_factory=lambda: sorted(_CLIENT.insecure_registries)
    )
    platform: str = _CLIENT.platform or ""
    registries_conf: str = "/etc/containers/registries.conf"
    registries_conf_d: str = "/etc/containers/registries.conf.d"
    # Seconds between checks of registries.conf and its drop-ins for changes (a change
    # applies to the next image resolution); 0 reads them once at start.
    registries_conf_check_seconds: float = Field(default=2.0, ge=0)
    resolve_ttl: float = Field(default=60.0, ge=0)
    ca_bundle: str = _CLIENT.ca_bundle or ""
    certs_dirs: list[str] = Field(default_factory=lambda: list(_CLIENT.certs_dirs))

    def client_settings(self) -> ClientSettings:
        """The registry client's settings for this section (empty strings mean "unset")."""
        return ClientSettings(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            request_deadline=self.request_deadline,
            min_bytes_per_second=self.min_bytes_per_second,
            retries=self.retries,
            backoff_factor=self.retry_backoff,
            pool_size=self.pool_size,
            insecure_registries=frozenset(self.insecure_registries),
            platform=self.platform or None,
            ca_bundle=self.ca_bundle or None,
            certs_dirs=tuple(self.certs_dirs),
        )


class AuthSettings(_Section):
    """Where credentials come from, besides the containers-auth.json(5) chain."""

    extra_auth_files: list[str] = Field(default_factory=lambda: ["/var/lib/kubelet/config.json"])
    helper_socket: str = "auth-helper.sock"
    credential_helper_timeout: float = Field(default=10.0, gt=0)


class CacheSettings(_Section):
    """The persistent chunk cache."""

    max_size_bytes: int = Field(default=10 * GiB, ge=1)
    dir: str = "cache"
    keep_across_restarts: bool = True
    """Keep the verified chunks across restarts: their block tags and pack indexes are keyed
    with a key in ``<root>/cache.key`` (root-only), so a restarted daemon trusts them without
    re-hashing. False: the key lives in memory only and the cache is emptied at every start
    (``docs/ARCHITECTURE.md``, "Cached chunks")."""
    layer_idle_seconds: float = Field(default=600.0, gt=0)
    """A resolved layer without users that the mount no longer holds is dropped from memory
    after this long idle (``ManagerSettings.idle_drop_seconds``); the idle sweep runs every
    ``min(60 s, layer_idle_seconds / 2)``."""


class FetchSettings(_Section):
    """Lazy fetching of chunks from the registry.

    The key names predate the names the code and the logs use for each mechanism and are kept
    so existing files still load (``docs/CONCURRENCY.md``): ``read_ahead_bytes`` is the
    fetcher's read-ahead budget (0 also turns read-behind and continuation off);
    ``prefetch_landmark`` switches the *landmark prefetch*; ``background_fetch``,
    ``background_bandwidth_share`` and ``background_concurrency`` are the *background fill*;
    ``dependency_fetch`` the read-triggered *dependency fetch*; ``resolve_all_layers`` builds
    an image's other layers on the first lookup of one; ``head_start_bytes`` starts the
    landmark prefetch with the manifest where the layer announces its prioritized region.
    """

    concurrency: int = Field(default=16, ge=1)
    read_ahead_bytes: int = Field(default=512 * KiB, ge=0)
    background_fetch: bool = True
    background_bandwidth_share: float = Field(default=0.5, gt=0, le=1)
    prefetch_landmark: bool = True
    background_concurrency: int = Field(default=2, ge=1)
    max_inflight_decoded_bytes: int = Field(default=256 * MiB, ge=1 * MiB)
    """Daemon-wide bound on the bytes chunk fetches hold in memory (compressed ranges and
    chunks decoded in memory); readers wait for room. A larger chunk is decoded in pieces and
    goes alone."""
    prefetch_profile: bool = True
    """The *profile prefetch*: on an image's first use, look for a workload profile attached
    to it (``stargz-store optimize --attach``) and fetch the files it lists."""
    dependency_fetch: bool = True
    """Layers with a plan of their own (prioritized region, attached profile) are left to it
    (``Layer.planned``). ``./run bench``, 3 runs each way, plain eStargz images: numpy/scipy
    6.10 -> 4.90 s, pandas 12.06 -> 9.12 s, python unchanged (0.90 s); planned images the
    same within noise (with it on there too: pandas prioritized 6.74 -> 8.86 s)."""
    resolve_all_layers: bool = True
    head_start_bytes: int = Field(default=16 * MiB, ge=0)
    """Up to this many bytes of a layer's prioritized region, announced by its descriptor
    (``stargz-store convert`` writes the annotation) or, for images written by other tools,
    read from the TOC's first bytes (the ``.prefetch.landmark`` entry), fetched in one
    request as soon as the TOC's bytes have arrived, while the TOC is inflated and indexed,
    instead of after the layer is built; 0 disables. Go-written prioritized images, 3 runs
    each: python 0.85 s against 1.03 (Go store 0.97). At 20 ms / 150 Mbit/s (``./run bench``,
    3 runs each way, prioritized and ``optimize`` images): python 0.94-0.98 s against
    0.99-1.06, large 4.18 / 5.02 s against 4.45 / 5.73, pandas 8.87 / 9.12 against 9.75 /
    9.44; peak RSS up to ~50 MB higher while the heads are held (at most ``32 MiB`` of heads
    at once, daemon-wide)."""


class FuseSettings(_Section):
    """The FUSE mount and the kernel's caching of its answers."""

    entry_timeout: float = Field(default=3600.0, ge=0)
    attr_timeout: float = Field(default=3600.0, ge=0)
    store_dir_timeout: float = Field(default=1.0, ge=0)
    negative_timeout: float = Field(default=2.0, ge=0)
    allow_other: bool = True
    # Besides root (and the daemon's own uid), the uids whose processes may look up images and
    # layers in the mount (rootless podman users); everyone else gets EACCES.
    allowed_uids: list[Annotated[int, Field(ge=0, lt=1 << 32)]] = Field(default_factory=list)
    lookup_threads: int = Field(default=16, ge=1)
    read_threads: int = Field(default=32, ge=1)
    read_ahead_kb: int = Field(default=1024, ge=0)
    inline_cache_reads: bool = True
    max_background: int = Field(default=128, ge=0)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)


def parse_metrics_listen(value: str, root: str | os.PathLike[str]) -> tuple[str, Any]:
    """``"HOST:PORT"`` -> ``("tcp", (host, port))``; ``"unix:PATH"`` -> ``("unix", Path)``
    (relative to *root* unless absolute). Raises ValueError with a one-line message."""
    if value.startswith("unix:"):
        raw = value[5:]
        if not raw:
            raise ValueError("unix: needs a path, e.g. unix:/run/stargz-store/metrics.sock")
        path = Path(raw)
        return "unix", path if path.is_absolute() else Path(root) / path
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT or unix:PATH, not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host)
            return "tcp", (host, int(port_text))
        raise ValueError(f"the host must be an IP address or localhost, not {host!r}")
    return "tcp", (host, int(port_text))


class MetricsSettings(_Section):
    """The Prometheus endpoint (``stargz_store.metrics``)."""

    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value:
            parse_metrics_listen(value, DEFAULT_ROOT)
        return value


class RecordSettings(_Section):
    """Recording workload profiles: per image, the files its layers serve in the first
    ``period_seconds`` after the container's first read (``stargz-store serve --record`` turns
    it on for one run; ``stargz-store profiles`` lists what was written under ``dir``)."""

    enabled: bool = False
    period_seconds: float = Field(default=10.0, gt=0)
    dir: str = "profiles"


class LogSettings(_Section):
    """Logging to stderr."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Section):
    """The whole configuration file."""

    registry: RegistrySection = Field(default_factory=lambda: RegistrySection())
    auth: AuthSettings = Field(default_factory=lambda: AuthSettings())
    cache: CacheSettings = Field(default_factory=lambda: CacheSettings())
    fetch: FetchSettings = Field(default_factory=lambda: FetchSettings())
    fuse: FuseSettings = Field(default_factory=lambda: FuseSettings())
    record: RecordSettings = Field(default_factory=lambda: RecordSettings())
    log: LogSettings = Field(default_factory=lambda: LogSettings())
    metrics: MetricsSettings = Field(default_factory=lambda: MetricsSettings())


def _key_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) if loc else "(top level)"


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = _key_path(tuple(err.get("loc", ())))
        if err.get("type") == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {err.get('msg', 'invalid value')}{shown}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate an already decoded TOML document."""
    try:
        config: Config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    return config


def parse_config_text(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_config(data, source)


def load_config(path: Path | None = None) -> Config:
    """Load the configuration.

    ``path=None`` means the default file, which may be absent (then every default applies); an
    explicit path must exist.
    """
    explicit = path is not None
    target = path if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{target}: configuration file not found") from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{target}: cannot read configuration: {exc}") from None
    return parse_config_text(text, str(target))


def field_paths(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every leaf key as ``section.key`` (used by the test that checks the example file)."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(field_paths(ann, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out
