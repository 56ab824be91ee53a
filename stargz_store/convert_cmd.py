"""``stargz-store convert [options] SRC DST``: convert an image to eStargz.

Transports use skopeo's syntax: ``oci:DIR[:TAG]`` (an OCI image layout directory) and
``docker://REF`` (a registry). Registries are reached the way skopeo reaches them, through the
same code the daemon uses (``layerstore.registry``):

- registries.conf (``$CONTAINERS_REGISTRIES_CONF`` or ``--registries-conf``, else
  ``$HOME/.config/containers/registries.conf`` or ``/etc/containers/registries.conf``, plus the
  ``registries.conf.d`` drop-ins): ``insecure = true`` allows plain http and unverified TLS,
  mirrors are tried first for reading the source, a ``blocked`` registry is refused for either
  side; pushes go to the destination as written (no mirror, no location rewrite);
- ``--src-tls-verify`` / ``--dest-tls-verify``, when given, override registries.conf for every
  host of that side (``true`` forces verified https, ``false`` allows http);
- credentials: ``--src-creds`` / ``--dest-creds``, else ``--src-authfile`` / ``--dest-authfile``
  / ``--authfile`` (which replace the containers-auth.json(5) chain, like
  ``$REGISTRY_AUTH_FILE``), else registries.conf's ``credential-helpers`` and the usual chain.

Before converting anything, a ``docker://`` destination is checked: a blob upload is started
and cancelled, so a wrong password, a missing push right or an unreachable registry fails in a
second rather than after the conversion.

Output: progress on stderr (a live line per layer on a terminal, otherwise a line per layer and
every 10 s for long layers), log events on stderr too (JSON lines unless stderr is a terminal;
level ``warning`` unless ``--log-level``); stdout stays empty. Errors are one line naming the
side (source or destination) that failed, and the exit status is 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from layerstore.errors import LayerStoreError
from layerstore.estargz.writer import DEFAULT_CHUNK_SIZE, WriterOptions
from layerstore.image.convert import (
    ConvertOptions,
    ImageDestination,
    ImageSource,
    LayerReport,
    OCIDestination,
    OCISource,
    convert_image,
)
from layerstore.image.ocilayout import OCILayout, parse_oci_reference
from stargz_store.cmdline import EXIT_FAILURE as EXIT_FAILED
from stargz_store.cmdline import (
    EXIT_USAGE,
    SIZE_HELP,
    ArgParser,
    HelpShown,
    UsageError,
    parse_bool,
    parse_size,
    parse_size_or_zero,
)
from stargz_store.log import LEVELS, scoped_logging

if TYPE_CHECKING:
    from auth.types import Credentials
    from layerstore.registry.client import PullSource, RegistryClient
    from layerstore.registry.registries_conf import RegistriesConf

PROG = "stargz-store convert"
_TLS_FLAGS = ("--src-tls-verify", "--dest-tls-verify")
_BOOL_WORDS = frozenset({"true", "false", "1", "0", "yes", "no", "on", "off"})


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return v


def _min_chunk(text: str) -> int:
    try:
        return _nonneg(text)
    except argparse.ArgumentTypeError:
        if text.strip().startswith("-"):
            raise
        return parse_size_or_zero(text)


def _parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog=PROG,
        description="Convert an image to eStargz: lazily pullable by stargz-store, and still an "
        "ordinary gzip image for every other runtime. Registries are reached as skopeo reaches "
        "them (registries.conf, auth files, credential helpers).",
        epilog="SRC and DST: oci:DIR[:TAG] (an OCI image layout) or docker://REF (a registry). "
        f"SIZE: {SIZE_HELP}. Exit status: 0 done, 1 failed (the message names the side: source "
        "or destination), 2 bad usage. Example: stargz-store convert "
        "docker://registry.example/app:1 docker://registry.example/app:1-esgz",
    )
    p.add_argument("src", metavar="SRC", help="the image to convert")
    p.add_argument("dst", metavar="DST", help="where to write the converted image")
    g = add_conversion_args(p)
    g.add_argument(
        "--prioritized-files",
        metavar="FILE",
        help="a text file of paths in the image, one per line ('#' comments), placed first "
        "and prefetched by the store when the layer is first used (before the "
        ".prefetch.landmark)",
    )
    g.add_argument(
        "--reconvert",
        action="store_true",
        help="convert layers that are eStargz already too (default: copy them as they are)",
    )
    add_registry_args(p)
    add_output_args(p)
    return p


def add_conversion_args(p: argparse.ArgumentParser) -> Any:
    """The conversion options ``convert`` and ``optimize`` share; returns their group."""
    g = p.add_argument_group("conversion")
    g.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="split files into chunks of this size, each fetched and verified on its own "
        f"(default {DEFAULT_CHUNK_SIZE >> 20}M)",
    )
    g.add_argument(
        "--min-chunk-size",
        type=_min_chunk,
        default=0,
        metavar="SIZE",
        help="pack files smaller than this together into shared gzip members, fewer requests "
        "for many small files (default 0: off)",
    )
    g.add_argument(
        "--compression-level",
        type=int,
        default=6,
        choices=range(0, 10),
        metavar="0-9",
        help="gzip level (default 6)",
    )
    g.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="convert only this platform of a multi-platform image (default: all; the new "
        "index lists only what was converted)",
    )
    g.add_argument(
        "--tmpdir",
        metavar="DIR",
        help="directory for converted layers before they are pushed (default $TMPDIR or /tmp)",
    )
    return g


def add_registry_args(p: argparse.ArgumentParser) -> None:
    """Registry access as skopeo has it (both sides), shared with ``optimize``."""
    r = p.add_argument_group("registries (docker://), as skopeo")
    r.add_argument(
        "--src-tls-verify",
        type=parse_bool,
        default=None,
        metavar="BOOL",
        help="true: require https with a verified certificate for the source, even where "
        "registries.conf says insecure; false: allow plain http and unverified TLS. Default: "
        "registries.conf's 'insecure' decides",
    )
    r.add_argument(
        "--dest-tls-verify",
        type=parse_bool,
        default=None,
        metavar="BOOL",
        help="the same for the destination",
    )
    r.add_argument(
        "--registries-conf",
        metavar="FILE",
        help="registries.conf to use instead of $CONTAINERS_REGISTRIES_CONF, "
        "~/.config/containers/registries.conf or /etc/containers/registries.conf (the "
        "registries.conf.d drop-ins are read in every case)",
    )
    r.add_argument(
        "--authfile",
        metavar="FILE",
        help="credentials file (containers-auth.json) for both sides, instead of "
        "$REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json, "
        "~/.config/containers/auth.json and ~/.docker/config.json",
    )
    r.add_argument("--src-authfile", metavar="FILE", help="the same for the source only")
    r.add_argument("--dest-authfile", metavar="FILE", help="the same for the destination only")
    r.add_argument(
        "--src-creds",
        metavar="USER[:PASSWORD]",
        help="credentials for the source (asked on the terminal when PASSWORD is left out)",
    )
    r.add_argument(
        "--dest-creds", metavar="USER[:PASSWORD]", help="credentials for the destination"
    )
    r.add_argument("--src-no-creds", action="store_true", help="access the source anonymously")
    r.add_argument(
        "--dest-no-creds", action="store_true", help="access the destination anonymously"
    )
    r.add_argument(
        "--no-push-check",
        action="store_true",
        help="skip the check that the destination takes pushes before converting",
    )


def add_output_args(p: argparse.ArgumentParser) -> Any:
    """``--quiet``, ``--log-level``, ``--digestfile``; returns their group."""
    o = p.add_argument_group("output")
    o.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and no summary: only errors (log level error unless --log-level)",
    )
    o.add_argument(
        "--log-level",
        choices=sorted(LEVELS),
        default=None,
        metavar="LEVEL",
        help="log events to show on stderr: debug, info, warning (default) or error",
    )
    o.add_argument(
        "--digestfile",
        metavar="FILE",
        help="write the digest of the written manifest or index to FILE",
    )
    return o


def _normalize(argv: Sequence[str]) -> list[str]:
    """``--src-tls-verify`` alone means true, as in skopeo (its value is optional there)."""
    out: list[str] = []
    args = list(argv)
    for i, a in enumerate(args):
        out.append(a)
        if a in _TLS_FLAGS:
            nxt = args[i + 1] if i + 1 < len(args) else ""
            if nxt.strip().lower() not in _BOOL_WORDS:
                out.append("true")
    return out


def _read_prioritized(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"--prioritized-files {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prioritized-files {path}: not UTF-8 text") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _split_transport(text: str) -> tuple[str, str]:
    if text.startswith("docker://"):
        return "docker", text[len("docker://") :]
    transport, sep, rest = text.partition(":")
    if not sep or transport not in ("oci",):
        known = "oci:DIR[:TAG], docker://REF"
        raise UsageError(f"{text!r}: unknown or missing transport (supported: {known})")
    return transport, rest


# --- one side of the copy: TLS, credentials ----------------------------------------------------


class _SideRegistries:
    """registries.conf as one side sees it: an explicit ``--*-tls-verify`` replaces the
    ``insecure`` flag of every source (mirrors too), as skopeo's flags do; blocked registries
    stay blocked."""

    def __init__(self, conf: RegistriesConf, tls_verify: bool | None) -> None:
        self._conf = conf
        self._tls_verify = tls_verify

    def pull_sources(self, name: str, *, by_digest: bool) -> list[PullSource]:
        sources = self._conf.pull_sources(name, by_digest=by_digest)
        if self._tls_verify is None:
            return sources
        return [replace(s, insecure=not self._tls_verify) for s in sources]


@dataclass(frozen=True)
class _Fixed:
    """``--*-creds`` (for every host of the side, mirrors included, as skopeo does) or
    ``--*-no-creds`` (``None``)."""

    credentials: Credentials | None

    def lookup(self, host: str, repository: str) -> Credentials | None:
        return self.credentials


def _parse_creds(text: str, flag: str) -> Credentials:
    from auth.types import Credentials

    user, sep, password = text.partition(":")
    if not user:
        raise UsageError(f"{flag}: USER[:PASSWORD] expected")
    if not sep:
        if not sys.stdin.isatty():
            raise UsageError(f"{flag}: no password given and no terminal to ask for it")
        password = getpass.getpass(f"Password for {user}: ")
    return Credentials(username=user, password=password)


def _credentials(args: argparse.Namespace, side: str, conf: RegistriesConf) -> Any:
    creds = getattr(args, f"{side}_creds")
    if getattr(args, f"{side}_no_creds"):
        if creds:
            raise UsageError(f"--{side}-creds and --{side}-no-creds contradict each other")
        return _Fixed(None)
    if creds:
        return _Fixed(_parse_creds(creds, f"--{side}-creds"))
    from auth.authfile import AuthEnvironment
    from auth.store import CredentialStore

    environment = AuthEnvironment.from_os()
    authfile = getattr(args, f"{side}_authfile") or args.authfile
    if authfile:
        environment = replace(
            environment, env={**environment.env, "REGISTRY_AUTH_FILE": os.path.abspath(authfile)}
        )
    return CredentialStore(environment, credential_helpers=conf.credential_helpers)


def _registries_conf(args: argparse.Namespace) -> RegistriesConf:
    from layerstore.registry.registries_conf import RegistriesConf

    return RegistriesConf.load(args.registries_conf)


def _client(args: argparse.Namespace, side: str, conf: RegistriesConf) -> RegistryClient:
    from layerstore.registry.client import RegistryClient, RegistrySettings

    certs = (
        os.path.expanduser("~/.config/containers/certs.d"),
        "/etc/containers/certs.d",
        "/etc/docker/certs.d",
    )
    tls_verify = getattr(args, f"{side}_tls_verify")
    return RegistryClient(
        _credentials(args, side, conf),
        _SideRegistries(conf, tls_verify),
        settings=RegistrySettings(certs_dirs=certs),
    )


# --- errors that name their side -----------------------------------------------------------------


def _tagged(exc: LayerStoreError, label: str) -> LayerStoreError:
    if not hasattr(exc, "side_label"):
        exc.side_label = label  # type: ignore[attr-defined]
    return exc


@contextlib.contextmanager
def _side(label: str) -> Iterator[None]:
    try:
        yield
    except LayerStoreError as exc:
        raise _tagged(exc, label) from None


class _Stream:
    def __init__(self, inner: BinaryIO, label: str) -> None:
        self._inner = inner
        self._label = label

    def read(self, n: int = -1) -> bytes:
        with _side(self._label):
            return self._inner.read(n)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Source:
    """The source with every failure marked as the source's."""

    def __init__(self, inner: ImageSource) -> None:
        self.inner = inner
        self.label = f"source {inner.describe()}"

    def describe(self) -> str:
        return self.inner.describe()

    def get_root(self) -> tuple[bytes, str | None]:
        with _side(self.label):
            return self.inner.get_root()

    def get_manifest(self, digest: str, max_size: int) -> bytes:
        with _side(self.label):
            return self.inner.get_manifest(digest, max_size)

    def get_blob(self, digest: str, max_size: int) -> bytes:
        with _side(self.label):
            return self.inner.get_blob(digest, max_size)

    def open_blob(self, digest: str, size: int) -> BinaryIO:
        with _side(self.label):
            return _Stream(self.inner.open_blob(digest, size), self.label)  # type: ignore[return-value]


class _Destination:
    """The destination with every failure marked as the destination's."""

    def __init__(self, inner: ImageDestination) -> None:
        self.inner = inner
        self.label = f"destination {inner.describe()}"

    def describe(self) -> str:
        return self.inner.describe()

    def has_blob(self, digest: str) -> bool:
        with _side(self.label):
            return self.inner.has_blob(digest)

    def staging_file(self) -> tuple[BinaryIO, str]:
        return self.inner.staging_file()

    def commit_blob(self, path: str, digest: str) -> None:
        with _side(self.label):
            self.inner.commit_blob(path, digest)

    def put_blob(self, data: bytes) -> str:
        with _side(self.label):
            return self.inner.put_blob(data)

    def put_manifest(self, body: bytes, media_type: str) -> str:
        with _side(self.label):
            return self.inner.put_manifest(body, media_type)

    def commit(self, body: bytes, media_type: str) -> str:
        with _side(self.label):
            return self.inner.commit(body, media_type)


def _describe_error(exc: LayerStoreError) -> str:
    label = getattr(exc, "side_label", None)
    text = f"{label}: {exc}" if label else str(exc)
    if label and "TLS failure" in str(exc):
        flag = "--src-tls-verify" if label.startswith("source") else "--dest-tls-verify"
        text += (
            f" (a plain-http registry? mark it 'insecure = true' in registries.conf, "
            f"or pass {flag}=false)"
        )
    return text


# --- progress ------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Progress:
    """Per-layer progress on *out*: a live line on a terminal, log lines otherwise."""

    def __init__(self, out: TextIO, tty: bool, log_interval: float = 10.0) -> None:
        self.out = out
        self.tty = tty
        self.log_interval = log_interval
        self._label = ""
        self._total = 0
        self._t0 = 0.0
        self._last = 0.0
        self._done = 0
        self._announced = False

    def layer_start(self, platform: str, index: int, count: int, digest: str, size: int) -> None:
        where = f"{platform} " if platform else ""
        self._label = f"{where}layer {index + 1}/{count} {digest[7:19]}"
        self._total = size
        self._t0 = self._last = time.monotonic()
        self._done = 0
        # Said on the first progress (log lines): a layer kept as is is "copying", never
        # "converting".
        self._announced = False

    def layer_progress(self, done: int, copying: bool = False) -> None:
        self._done = done
        now = time.monotonic()
        if not self.tty and not self._announced:
            self._announced = True
            what = "copying" if copying else "converting"
            print(f"{self._label}: {what} {_mb(self._total)}", file=self.out, flush=True)
        if self.tty:
            if now - self._last >= 0.2:
                self._last = now
                self._line(now)
        elif now - self._last >= self.log_interval:
            self._last = now
            print(f"{self._label}: {self._status(now)}", file=self.out, flush=True)

    def _status(self, now: float) -> str:
        rate = self._done / max(now - self._t0, 1e-6) / 1e6
        pct = f" ({100 * self._done / self._total:.0f}%)" if self._total else ""
        return f"{_mb(self._done)} / {_mb(self._total)}{pct}, {rate:.1f} MB/s"

    def _line(self, now: float) -> None:
        self.out.write(f"\r\x1b[K{self._label}: {self._status(now)}")
        self.out.flush()

    def layer_done(self, report: LayerReport) -> None:
        label = self._label
        if report.action == "converted":
            rate = report.source_size / max(report.seconds, 1e-6) / 1e6
            msg = (
                f"{label}: {_mb(report.source_size)} -> {_mb(report.size)} eStargz in "
                f"{report.seconds:.1f} s ({rate:.1f} MB/s), TOC {report.toc_digest}"
            )
        elif report.action == "reused":
            msg = f"{label or 'layer'}: shared with an earlier manifest, converted once"
        else:
            why = {"kept": "already eStargz", "foreign": "not a layer to convert"}
            msg = f"{label}: kept as is ({why.get(report.action, report.action)})"
        if self.tty:
            self.out.write("\r\x1b[K")
        print(msg, file=self.out, flush=True)


# --- the command ---------------------------------------------------------------------------------


@dataclass
class _Opened:
    src: _Source
    dst: _Destination
    push_check: Any = None  # () -> None for a docker:// destination
    clients: tuple[Any, ...] = ()


def registries_for(args: argparse.Namespace, *images: str) -> RegistriesConf | None:
    """registries.conf when one of *images* is ``docker://`` (else None)."""
    if not any(_split_transport(i)[0] == "docker" for i in images):
        return None
    try:
        return _registries_conf(args)
    except LayerStoreError as exc:
        raise _tagged(exc, "registries configuration") from None


def open_source(
    args: argparse.Namespace, text: str, conf: RegistriesConf | None, side: str = "src"
) -> tuple[_Source, RegistryClient | None]:
    """The image *text* (``oci:`` or ``docker://``) to read, with the *side*'s registry
    options (``src`` or ``dest``); the client to close, if one was made."""
    transport, rest = _split_transport(text)
    if transport == "oci":
        directory, tag = parse_oci_reference(rest)
        with _side(f"source {text}"):
            return _Source(OCISource(OCILayout.open(directory), tag)), None
    from layerstore.image.convert import RegistrySource
    from layerstore.registry.reference import parse_reference

    assert conf is not None
    with _side(f"source {text}"):
        ref = parse_reference(rest)
    client = _client(args, side, conf)
    return _Source(RegistrySource(client, ref)), client


def open_destination(
    args: argparse.Namespace, text: str, conf: RegistriesConf | None
) -> tuple[_Destination, Any, RegistryClient | None]:
    """The image *text* to write; a push check (``() -> None``) for a registry unless
    ``--no-push-check``; the client to close, if one was made."""
    transport, rest = _split_transport(text)
    if transport == "oci":
        directory, tag = parse_oci_reference(rest)
        with _side(f"destination {text}"):
            return _Destination(OCIDestination(OCILayout.create(directory), tag)), None, None
    from layerstore.image.convert import RegistryDestination
    from layerstore.registry.reference import parse_reference

    assert conf is not None
    with _side(f"destination {text}"):
        dref = parse_reference(rest)
    dclient = _client(args, "dest", conf)
    push_check = None
    if not args.no_push_check:
        push_check = lambda: dclient.check_push(dref)  # noqa: E731
    return _Destination(RegistryDestination(dclient, dref, args.tmpdir)), push_check, dclient


def _open(args: argparse.Namespace) -> _Opened:
    _split_transport(args.src)
    _split_transport(args.dst)
    conf = registries_for(args, args.src, args.dst)
    src, client = open_source(args, args.src, conf)
    try:
        dst, push_check, dclient = open_destination(args, args.dst, conf)
    except BaseException:
        if client is not None:
            client.close()
        raise
    clients = tuple(c for c in (client, dclient) if c is not None)
    return _Opened(src, dst, push_check, clients)


def main(argv: Sequence[str], stderr: TextIO | None = None) -> int:
    err = stderr if stderr is not None else sys.stderr
    try:
        args = _parser().parse_args(_normalize(argv))
    except UsageError as e:
        print(f"{PROG}: {e}", file=err)
        print(f"usage: {PROG} [options] SRC DST (see {PROG} --help)", file=err)
        return EXIT_USAGE
    except HelpShown:  # --help
        return 0
    level = args.log_level or ("error" if args.quiet else "warning")
    with scoped_logging(level, "auto", err):
        return _run(args, err)


def _run(args: argparse.Namespace, err: TextIO) -> int:
    try:
        prioritized = _read_prioritized(args.prioritized_files) if args.prioritized_files else []
        opened = _open(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=err)
        return EXIT_USAGE
    except LayerStoreError as e:
        print(f"{PROG}: {_describe_error(e)}", file=err)
        return EXIT_FAILED
    try:
        return _convert(args, opened, prioritized, err)
    finally:
        for c in opened.clients:
            c.close()


def _convert(args: argparse.Namespace, opened: _Opened, prioritized: list[str], err: TextIO) -> int:
    opts = ConvertOptions(
        writer=WriterOptions(
            chunk_size=args.chunk_size,
            prioritized_files=tuple(prioritized),
            compression_level=args.compression_level,
            min_chunk_size=args.min_chunk_size,
            tmpdir=args.tmpdir,
        ),
        platform=args.platform,
        keep_estargz=not args.reconvert,
    )
    tty = bool(getattr(err, "isatty", lambda: False)())
    progress = None if args.quiet else Progress(err, tty)
    t0 = time.monotonic()

    def newline() -> None:
        if tty and progress is not None:
            err.write("\n")

    try:
        if opened.push_check is not None:
            with _side(opened.dst.label):
                opened.push_check()
        result = convert_image(opened.src, opened.dst, opts, progress)
    except LayerStoreError as e:
        newline()
        print(f"{PROG}: {_describe_error(e)}", file=err)
        return EXIT_FAILED
    except OSError as e:
        newline()
        print(f"{PROG}: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=err)
        return 130
    except Exception as e:  # a bug: still one line, not a traceback (STARGZ_DEBUG=1 shows it)
        if os.environ.get("STARGZ_DEBUG"):
            raise
        newline()
        print(f"{PROG}: internal error: {type(e).__name__}: {e}", file=err)
        return EXIT_FAILED
    for d in result.dropped:
        print(f"{PROG}: left out of the new index (not an image): {d}", file=err)
    if args.digestfile:
        try:
            with open(args.digestfile, "w", encoding="utf-8") as f:
                f.write(result.digest)
        except OSError as e:
            print(f"{PROG}: --digestfile {args.digestfile}: {e.strerror or e}", file=err)
            return EXIT_FAILED
    if not args.quiet:
        converted = sum(1 for r in result.layers if r.action == "converted")
        print(
            f"wrote {opened.dst.describe()} ({result.media_type}, {result.digest}): "
            f"{converted} of {len(result.layers)} layers converted in "
            f"{time.monotonic() - t0:.1f} s",
            file=err,
        )
    return 0


# Shared with ``stargz-store optimize``, which reaches registries and reports errors the same way.
describe_error = _describe_error
normalize_tls_flags = _normalize
on_side = _side
SourceSide = _Source
