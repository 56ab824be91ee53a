"""containers-registries.conf(5) v2, as podman applies it to pulls.

Which files (containers/image ``pkg/sysregistriesv2``, with podman turning
``$CONTAINERS_REGISTRIES_CONF`` into ``SystemRegistriesConfPath``):

- the main file: an explicit path (argument, else ``$CONTAINERS_REGISTRIES_CONF``), which must
  exist; else ``$HOME/.config/containers/registries.conf`` if it exists (upstream does not look
  at the uid here: root with such a file uses it too); else ``/etc/containers/registries.conf``,
  whose absence means an empty configuration.
- drop-ins ``*.conf`` (not recursive, sorted by name) from ``/etc/containers/registries.conf.d``
  and then ``$HOME/.config/containers/registries.conf.d``; when the per-user main file is used,
  only the per-user directory. Each drop-in must be v2; its ``[[registry]]`` tables replace
  earlier ones with the same prefix, and a non-empty ``additional-layer-store-auth-helper``
  replaces the earlier value.
- the v1 format (``[registries.search|insecure|block] registries = [...]``) is converted in the
  main file only, and mixing it with v2 keys is an error.

How a pull of ``name`` (``host[:port]/path``) is resolved: the ``[[registry]]`` with the longest
matching ``prefix`` wins (``prefix`` defaults to ``location``; it matches ``name`` itself or a
``name`` continuing with ``/``, ``:`` or ``@`` after it; ``*.example.com`` matches any
sub-domain of example.com as the host). A ``blocked`` registry refuses the pull. Otherwise the
sources are the mirrors in order (all of them only for digest pulls when
``mirror-by-digest-only``; else each filtered by its ``pull-from-mirror``: ``all`` (default),
``digest-only``, ``tag-only``), then the primary ``location``; each with the prefix part of
``name`` replaced by its location. No matching table: the name itself, secure.

``PullSource`` is ``layerstore.registry.client.PullSource`` (re-exported here): ``location`` is the
rewritten repository name ``host[:port]/path`` (no tag or digest), ``insecure`` allows plain
HTTP and unverified TLS, ``mirror`` tells a mirror from the primary location.

Top-level ``credential-helpers`` (default ``["containers-auth.json"]``; a drop-in's list,
even empty, replaces the earlier one; empty means the default) is exposed for
``auth.store.CredentialStore``; ``additional-layer-store-auth-helper`` for diagnostics.

Unknown keys are tolerated (podman's file has many we do not use); malformed TOML, wrong value
types and the consistency errors upstream refuses raise RegistriesConfError.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import structlog

from layerstore.errors import BlockedRegistryError, LayerStoreError

# The registry client's type (layerstore.registry.client does not import this module: no cycle).
from layerstore.registry.client import PullSource

log = structlog.get_logger(__name__)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

SYSTEM_REGISTRIES_CONF = Path("/etc/containers/registries.conf")
SYSTEM_REGISTRIES_CONF_DIR = Path("/etc/containers/registries.conf.d")
USER_REGISTRIES_CONF = Path(".config/containers/registries.conf")
USER_REGISTRIES_CONF_DIR = Path(".config/containers/registries.conf.d")
ENV_REGISTRIES_CONF = "CONTAINERS_REGISTRIES_CONF"
#: The ``credential-helpers`` entry meaning "the containers-auth.json(5) files".
AUTH_FILE_HELPER = "containers-auth.json"

PULL_FROM_MIRROR_ALL = "all"
PULL_FROM_MIRROR_DIGEST_ONLY = "digest-only"
PULL_FROM_MIRROR_TAG_ONLY = "tag-only"
_PULL_FROM_MIRROR_VALUES = ("", PULL_FROM_MIRROR_ALL, PULL_FROM_MIRROR_DIGEST_ONLY,
                            PULL_FROM_MIRROR_TAG_ONLY)  # fmt: skip

_V2_KEYS = (
    "registry",
    "unqualified-search-registries",
    "credential-helpers",
    "short-name-mode",
    "additional-layer-store-auth-helper",
    "aliases",
)


__all__ = [
    "AUTH_FILE_HELPER",
    "Mirror",
    "PullSource",
    "RegistriesConf",
    "RegistriesConfError",
    "Registry",
    "WatchedRegistriesConf",
    "describe",
    "match_prefix",
    "parse_registries_conf",
]


class RegistriesConfError(LayerStoreError, ValueError):
    """A registries.conf file (or drop-in) is malformed or inconsistent."""


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = ""


@dataclass(frozen=True)
class Registry:
    """One ``[[registry]]`` table after post-processing (prefix defaulted, locations trimmed)."""

    prefix: str
    location: str = ""
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class _ParsedFile:
    registries: tuple[Registry, ...]
    auth_helper: str
    credential_helpers: tuple[str, ...] | None = None


def _home_from_env(env: Mapping[str, str]) -> str:
    home = env.get("HOME", "")
    if home:
        return home
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return ""


# --- matching ------------------------------------------------------------------------------------
def _match_wildcard(name: str, prefix: str) -> int:
    """Length of the matched part of *name* for a ``*.example.com`` prefix, or -1."""
    suffix = prefix[1:]  # ".example.com"
    index = name.find(suffix)
    if index == -1 or "/" in name[:index]:
        return -1
    end = index + len(suffix)
    if end == len(name) or name[end] in ":/@":
        return end
    return -1


def match_prefix(name: str, prefix: str) -> int:
    """Length of the part of *name* that *prefix* matches, or -1 when it does not match."""
    if prefix.startswith("*."):
        return _match_wildcard(name, prefix)
    if name == prefix:
        return len(prefix)
    if len(name) > len(prefix) and name.startswith(prefix) and name[len(prefix)] in ":/@":
        # Like upstream, "example.com" also matches "example.com:5000/...".
        return len(prefix)
    return -1


# --- parsing -------------------------------------------------------------------------------------
def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RegistriesConfError(f"{where}: expected true or false")
    return value


def _str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RegistriesConfError(f"{where}: expected a string")
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistriesConfError(f"{where}: expected an array of strings")
    return tuple(value)


def _location(value: str, where: str) -> str:
    trimmed = value.rstrip("/")
    if trimmed.startswith(("http://", "https://")):
        raise RegistriesConfError(
            f"{where}: invalid location {value!r}: URI schemes are not supported"
        )
    return trimmed


def _tables(value: Any, where: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RegistriesConfError(f"{where}: expected an array of tables")
    return value


def _parse_registry(raw: Mapping[str, Any], where: str) -> Registry:
    location = _location(_str(raw.get("location"), f"{where}: location"), where)
    prefix_raw = _str(raw.get("prefix"), f"{where}: prefix")
    if not prefix_raw:
        if not location:
            raise RegistriesConfError(f"{where}: both location and prefix are unset")
        prefix = location
    else:
        prefix = _location(prefix_raw, where)
        if not prefix.startswith("*.") and not location:
            raise RegistriesConfError(
                f"{where}: location is unset and prefix {prefix!r} is not like *.example.com"
            )
    if prefix.startswith("*.") and any(c in prefix for c in "/@:"):
        raise RegistriesConfError(
            f"{where}: wildcard prefix {prefix!r} must be like *.example.com (no path or port)"
        )
    if _str(raw.get("pull-from-mirror"), f"{where}: pull-from-mirror"):
        raise RegistriesConfError(
            f"{where}: pull-from-mirror must not be set for a non-mirror registry {prefix!r}"
        )
    by_digest_only = _bool(raw.get("mirror-by-digest-only"), f"{where}: mirror-by-digest-only")
    mirrors: list[Mirror] = []
    for j, m in enumerate(_tables(raw.get("mirror"), f"{where}: mirror")):
        mwhere = f"{where}, mirror {j + 1}"
        mloc = _location(_str(m.get("location"), f"{mwhere}: location"), mwhere)
        if not mloc:
            raise RegistriesConfError(f"{mwhere}: mirror location is unset")
        pfm = _str(m.get("pull-from-mirror"), f"{mwhere}: pull-from-mirror")
        if by_digest_only and pfm:
            raise RegistriesConfError(
                f"{mwhere}: cannot set mirror-by-digest-only for {prefix!r} and pull-from-mirror "
                f"for mirror {mloc!r} at the same time"
            )
        if pfm not in _PULL_FROM_MIRROR_VALUES:
            raise RegistriesConfError(f"{mwhere}: unsupported pull-from-mirror value {pfm!r}")
        mirrors.append(
            Mirror(
                location=mloc,
                insecure=_bool(m.get("insecure"), f"{mwhere}: insecure"),
                pull_from_mirror=pfm,
            )
        )
    return Registry(
        prefix=prefix,
        location=location,
        insecure=_bool(raw.get("insecure"), f"{where}: insecure"),
        blocked=_bool(raw.get("blocked"), f"{where}: blocked"),
        mirror_by_digest_only=by_digest_only,
        mirrors=tuple(mirrors),
    )


def _v1_to_tables(doc: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    section = doc["registries"]
    if not isinstance(section, dict):
        raise RegistriesConfError(f"{where}: [registries] must be a table")
    order: list[str] = []
    tables: dict[str, dict[str, Any]] = {}
    for kind, flag in (("block", "blocked"), ("insecure", "insecure")):
        sub = section.get(kind)
        if sub is None:
            continue
        regs = sub.get("registries") if isinstance(sub, dict) else None
        if regs is None:
            continue
        if not isinstance(regs, list) or not all(isinstance(r, str) for r in regs):
            raise RegistriesConfError(f"{where}: registries.{kind}.registries must be strings")
        for r in regs:
            loc = _location(r, where)
            if loc not in tables:
                tables[loc] = {"location": loc, "prefix": loc}
                order.append(loc)
            tables[loc][flag] = True
    return [tables[loc] for loc in order]


def _is_v1(doc: Mapping[str, Any]) -> bool:
    section = doc.get("registries")
    if not isinstance(section, dict):
        return False
    return any(
        isinstance(section.get(k), dict) and "registries" in section[k]
        for k in ("search", "insecure", "block")
    )


def parse_registries_conf(
    text: str, *, source: str = "<string>", drop_in: bool = False
) -> _ParsedFile:
    """Parse and post-process one file. Raises RegistriesConfError."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RegistriesConfError(f"{source}: malformed TOML: {e}") from None
    if _is_v1(doc):
        if drop_in:
            raise RegistriesConfError(f"{source}: drop-in files must use the v2 format")
        if any(k in doc for k in _V2_KEYS):
            raise RegistriesConfError(f"{source}: mixing the v1 and v2 formats is not supported")
        raw_tables: list[Mapping[str, Any]] = list(_v1_to_tables(doc, source))
        auth_helper = ""
        cred_helpers: tuple[str, ...] | None = None
    else:
        raw_tables = _tables(doc.get("registry"), f"{source}: [[registry]]")
        auth_helper = _str(
            doc.get("additional-layer-store-auth-helper"),
            f"{source}: additional-layer-store-auth-helper",
        )
        cred_helpers = _str_list(doc.get("credential-helpers"), f"{source}: credential-helpers")
    registries = [
        _parse_registry(t, f"{source}: [[registry]] {i + 1}") for i, t in enumerate(raw_tables)
    ]

    # The same location may appear several times (different prefixes): its security settings
    # must agree.
    by_location: dict[str, Registry] = {}
    for reg in registries:
        key = reg.location or reg.prefix
        other = by_location.setdefault(key, reg)
        if other.insecure != reg.insecure:
            raise RegistriesConfError(
                f"{source}: registry {key!r} is defined multiple times with conflicting "
                "'insecure' settings"
            )
        if other.blocked != reg.blocked:
            raise RegistriesConfError(
                f"{source}: registry {key!r} is defined multiple times with conflicting "
                "'blocked' settings"
            )
    # The first table of a prefix wins; later ones with the same prefix are ignored.
    unique: dict[str, Registry] = {}
    for reg in registries:
        unique.setdefault(reg.prefix, reg)
    return _ParsedFile(
        registries=tuple(unique[p] for p in sorted(unique)),
        auth_helper=auth_helper,
        credential_helpers=cred_helpers,
    )


def _drop_in_files(directory: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise RegistriesConfError(f"reading {directory}: {e.strerror}") from None
    return [Path(e.path) for e in entries if e.name.endswith(".conf") and not e.is_dir()]


# --- the configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistriesConf:
    """The merged configuration. Immutable, so it is safe to share between threads; reload by
    calling ``load`` again."""

    registries: tuple[Registry, ...] = ()
    additional_layer_store_auth_helper: str = ""
    credential_helpers: tuple[str, ...] = (AUTH_FILE_HELPER,)
    sources: tuple[Path, ...] = field(default=(), compare=False)

    @classmethod
    def empty(cls) -> RegistriesConf:
        return cls()

    @classmethod
    def from_string(cls, text: str, *, source: str = "<string>") -> RegistriesConf:
        parsed = parse_registries_conf(text, source=source)
        return cls(
            parsed.registries,
            parsed.auth_helper,
            parsed.credential_helpers or (AUTH_FILE_HELPER,),
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        system_conf: str | os.PathLike[str] = SYSTEM_REGISTRIES_CONF,
        system_conf_dir: str | os.PathLike[str] = SYSTEM_REGISTRIES_CONF_DIR,
        home: str | None = None,
    ) -> RegistriesConf:
        """Load the main file and the drop-ins the way podman does (module docstring).

        *env* defaults to ``os.environ`` (``CONTAINERS_REGISTRIES_CONF``, ``HOME``); *home*
        overrides ``$HOME``. *system_conf* / *system_conf_dir* replace the /etc defaults (the
        daemon passes its configured paths there: a missing *system_conf* is an empty
        configuration, whereas a missing explicit *path* is an error).
        """
        env = os.environ if env is None else env
        home_dir = home if home is not None else _home_from_env(env)
        user_conf = Path(home_dir) / USER_REGISTRIES_CONF if home_dir else None
        user_dir = Path(home_dir) / USER_REGISTRIES_CONF_DIR if home_dir else None

        explicit = Path(path) if path is not None else None
        if explicit is None and env.get(ENV_REGISTRIES_CONF):
            explicit = Path(env[ENV_REGISTRIES_CONF])
        dirs: list[Path] = []
        if explicit is not None:
            main, must_exist = explicit, True
            dirs = [Path(system_conf_dir)] + ([user_dir] if user_dir else [])
        elif user_conf is not None and user_conf.exists():
            main, must_exist = user_conf, True
            dirs = [user_dir] if user_dir else []
        else:
            main, must_exist = Path(system_conf), False
            dirs = [Path(system_conf_dir)] + ([user_dir] if user_dir else [])

        sources: list[Path] = []
        registries: dict[str, Registry] = {}
        auth_helper = ""
        cred_helpers: tuple[str, ...] | None = None
        try:
            text = main.read_text(encoding="utf-8")
        except FileNotFoundError:
            if must_exist:
                raise RegistriesConfError(
                    f"registries configuration {main} does not exist"
                ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise RegistriesConfError(f"cannot read registries configuration {main}: {e}") from None
        else:
            parsed = parse_registries_conf(text, source=str(main))
            registries = {r.prefix: r for r in parsed.registries}
            auth_helper = parsed.auth_helper
            cred_helpers = parsed.credential_helpers
            sources.append(main)

        for directory in dirs:
            for drop_in in _drop_in_files(directory):
                try:
                    text = drop_in.read_text(encoding="utf-8")
                except FileNotFoundError:
                    continue  # removed meanwhile: upstream ignores that race too
                except (OSError, UnicodeDecodeError) as e:
                    raise RegistriesConfError(f"cannot read drop-in {drop_in}: {e}") from None
                parsed = parse_registries_conf(text, source=str(drop_in), drop_in=True)
                for reg in parsed.registries:
                    registries[reg.prefix] = reg
                if parsed.auth_helper:
                    auth_helper = parsed.auth_helper
                if parsed.credential_helpers is not None:
                    cred_helpers = parsed.credential_helpers
                sources.append(drop_in)

        return cls(
            registries=tuple(registries[p] for p in sorted(registries)),
            additional_layer_store_auth_helper=auth_helper,
            credential_helpers=cred_helpers or (AUTH_FILE_HELPER,),
            sources=tuple(sources),
        )

    def find_registry(self, name: str) -> Registry | None:
        """The table with the longest prefix matching *name* (first in prefix order on ties)."""
        best: Registry | None = None
        for reg in self.registries:
            if match_prefix(name, reg.prefix) != -1 and (
                best is None or len(reg.prefix) > len(best.prefix)
            ):
                best = reg
        return best

    def pull_sources(self, name: str, *, by_digest: bool) -> list[PullSource]:
        """Where to pull ``name`` (``host[:port]/path``, no tag or digest) from, in order.

        Raises BlockedRegistryError when the matching table is blocked.
        """
        reg = self.find_registry(name)
        if reg is None:
            return [PullSource(location=name, insecure=False, mirror=False)]
        if reg.blocked:
            files = f" ({', '.join(str(p) for p in self.sources)})" if self.sources else ""
            raise BlockedRegistryError(
                f"registry {reg.prefix} is blocked in the registries configuration{files}: "
                f"refusing {name}"
            )
        matched = match_prefix(name, reg.prefix)
        rest = name[matched:]

        def rewrite(location: str) -> str:
            return name if not location else location + rest

        sources: list[PullSource] = []
        for m in reg.mirrors:
            if reg.mirror_by_digest_only:
                if not by_digest:
                    continue
            elif (m.pull_from_mirror == PULL_FROM_MIRROR_DIGEST_ONLY and not by_digest) or (
                m.pull_from_mirror == PULL_FROM_MIRROR_TAG_ONLY and by_digest
            ):
                continue
            sources.append(PullSource(rewrite(m.location), m.insecure, True))
        sources.append(PullSource(rewrite(reg.location), reg.insecure, False))
        return sources


_Signature = tuple[tuple[str, Optional[tuple[int, int, int]]], ...]


def _stat_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class WatchedRegistriesConf:
    """A ``RegistriesConf`` that reloads itself when any file it may read changes (podman
    re-reads the files for every command; a long-running daemon has to notice edits).

    The check stats the candidate main files, the drop-in directories and their ``*.conf``
    files, at most once per *min_interval* seconds. A reload that fails raises
    RegistriesConfError from ``pull_sources`` until the files are fixed (podman would refuse
    to pull too), so a broken edit never silently keeps an older, less strict configuration.
    Thread-safe.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        system_conf: str | os.PathLike[str] = SYSTEM_REGISTRIES_CONF,
        system_conf_dir: str | os.PathLike[str] = SYSTEM_REGISTRIES_CONF_DIR,
        home: str | None = None,
        min_interval: float = 1.0,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self._home = home if home is not None else _home_from_env(self._env)
        self._path = Path(path) if path is not None else None
        self._system_conf = Path(system_conf)
        self._system_conf_dir = Path(system_conf_dir)
        self._min_interval = min_interval
        self._lock = threading.Lock()
        self._signature: _Signature | None = None
        self._checked_at = -1e18
        self._conf: RegistriesConf | None = None
        self._error: RegistriesConfError | None = None
        self.current()  # fail early on a broken configuration

    def _watched(self) -> list[Path]:
        files: list[Path] = []
        if self._path is not None:
            files.append(self._path)
        if self._env.get(ENV_REGISTRIES_CONF):
            files.append(Path(self._env[ENV_REGISTRIES_CONF]))
        dirs = [self._system_conf_dir]
        if self._home:
            files.append(Path(self._home) / USER_REGISTRIES_CONF)
            dirs.append(Path(self._home) / USER_REGISTRIES_CONF_DIR)
        files.append(self._system_conf)
        for d in dirs:
            files.append(d)
            with contextlib.suppress(OSError):
                files.extend(Path(d, n) for n in sorted(os.listdir(d)) if n.endswith(".conf"))
        return files

    def _compute_signature(self) -> _Signature:
        return tuple((str(p), _stat_signature(p)) for p in self._watched())

    def current(self) -> RegistriesConf:
        """The configuration as of now; raises RegistriesConfError when the files are broken."""
        with self._lock:
            now = time.monotonic()
            if self._conf is None or now - self._checked_at >= self._min_interval:
                self._checked_at = now
                signature = self._compute_signature()
                if signature != self._signature:
                    self._signature = signature
                    try:
                        self._conf = RegistriesConf.load(
                            self._path,
                            env=self._env,
                            system_conf=self._system_conf,
                            system_conf_dir=self._system_conf_dir,
                            home=self._home,
                        )
                        self._error = None
                    except RegistriesConfError as e:
                        self._error = e
                        log.warning("registries_conf_invalid", error=str(e))
            if self._error is not None:
                raise self._error
            assert self._conf is not None
            return self._conf

    def pull_sources(self, name: str, *, by_digest: bool) -> list[PullSource]:
        return self.current().pull_sources(name, by_digest=by_digest)

    @property
    def additional_layer_store_auth_helper(self) -> str:
        return self.current().additional_layer_store_auth_helper

    @property
    def credential_helpers(self) -> tuple[str, ...]:
        return self.current().credential_helpers


def describe(conf: RegistriesConf) -> Sequence[str]:
    """Human-readable lines for diagnostics (no secrets are in this file)."""
    lines = [f"source: {p}" for p in conf.sources]
    if conf.additional_layer_store_auth_helper:
        lines.append(
            f"additional-layer-store-auth-helper: {conf.additional_layer_store_auth_helper}"
        )
    for r in conf.registries:
        flags = [f for f, on in (("blocked", r.blocked), ("insecure", r.insecure)) if on]
        lines.append(
            f"[[registry]] prefix={r.prefix} location={r.location or '-'}"
            + (f" ({', '.join(flags)})" if flags else "")
            + "".join(f" mirror={m.location}" for m in r.mirrors)
        )
    return lines
