"""``stargz-store convert [options] SRC DST``: convert an image to eStargz.

Transports use skopeo's syntax: ``oci:DIR[:TAG]`` (an OCI image layout directory) and
``docker://REF`` (a registry). Progress goes to stderr: a live line per layer when stderr is a
terminal, otherwise a log line per layer (and every 10 s for long layers). Errors are one line
on stderr and a non-zero exit status: 1 for a failed conversion, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

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

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def _size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    for suffix, m in (("kib", 1 << 10), ("mib", 1 << 20), ("k", 1 << 10), ("m", 1 << 20)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    try:
        v = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return v


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return v


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # no SystemExit from inside main()
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="stargz-store convert",
        description="Convert an image to eStargz (lazy-pullable, still a valid gzip image).",
        epilog="SRC and DST: oci:DIR[:TAG] or docker://REF.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument(
        "--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE, help="chunk size (default 4MiB)"
    )
    p.add_argument(
        "--prioritized-files",
        metavar="FILE",
        help="file listing paths (one per line) to place first, before .prefetch.landmark",
    )
    p.add_argument("--platform", help="only this platform of an index: os/arch[/variant]")
    p.add_argument(
        "--min-chunk-size",
        type=_nonneg,
        default=0,
        help="pack files smaller than this into shared gzip members (innerOffset); default off",
    )
    p.add_argument("--compression-level", type=int, default=6, choices=range(0, 10))
    p.add_argument(
        "--reconvert", action="store_true", help="convert layers that are already eStargz too"
    )
    p.add_argument("--src-tls-verify", type=_bool, default=True, metavar="BOOL")
    p.add_argument("--dest-tls-verify", type=_bool, default=True, metavar="BOOL")
    p.add_argument("--tmpdir", help="directory for temporary files (docker:// destinations)")
    return p


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


def _registry_client(insecure_hosts: Sequence[str]) -> Any:
    from auth.store import CredentialStore
    from layerstore.registry.client import RegistryClient, RegistrySettings

    settings = RegistrySettings(insecure_registries=frozenset(insecure_hosts))
    return RegistryClient(CredentialStore(), None, settings=settings)


def _open_source(text: str, tls_verify: bool) -> ImageSource:
    transport, rest = _split_transport(text)
    if transport == "oci":
        directory, tag = parse_oci_reference(rest)
        return OCISource(OCILayout.open(directory), tag)
    from layerstore.image.convert import RegistrySource
    from layerstore.registry.reference import parse_reference

    ref = parse_reference(rest)
    client = _registry_client([] if tls_verify else [ref.api_host, ref.domain])
    return RegistrySource(client, ref)


def _open_destination(text: str, tls_verify: bool, tmpdir: str | None) -> ImageDestination:
    transport, rest = _split_transport(text)
    if transport == "oci":
        directory, tag = parse_oci_reference(rest)
        return OCIDestination(OCILayout.create(directory), tag)
    from layerstore.image.convert import RegistryDestination
    from layerstore.registry.reference import parse_reference

    ref = parse_reference(rest)
    client = _registry_client([] if tls_verify else [ref.api_host, ref.domain])
    return RegistryDestination(client, ref, tmpdir)


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

    def layer_start(self, platform: str, index: int, count: int, digest: str, size: int) -> None:
        where = f"{platform} " if platform else ""
        self._label = f"{where}layer {index + 1}/{count} {digest[7:19]}"
        self._total = size
        self._t0 = self._last = time.monotonic()
        self._done = 0
        if not self.tty:
            print(f"{self._label}: converting {_mb(size)}", file=self.out, flush=True)

    def layer_progress(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
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
            msg = f"{label}: kept as is ({report.action})"
        if self.tty:
            self.out.write("\r\x1b[K")
        print(msg, file=self.out, flush=True)


def main(argv: Sequence[str], stderr: TextIO | None = None) -> int:
    err = stderr if stderr is not None else sys.stderr
    try:
        args = _parser().parse_args(list(argv))
    except UsageError as e:
        print(f"stargz-store convert: {e}", file=err)
        print("usage: stargz-store convert [options] SRC DST (see --help)", file=err)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        prioritized = _read_prioritized(args.prioritized_files) if args.prioritized_files else []
        src = _open_source(args.src, args.src_tls_verify)
        dst = _open_destination(args.dst, args.dest_tls_verify, args.tmpdir)
    except UsageError as e:
        print(f"stargz-store convert: {e}", file=err)
        return EXIT_USAGE
    except LayerStoreError as e:
        print(f"stargz-store convert: {e}", file=err)
        return EXIT_FAILED
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
    progress = Progress(err, tty)
    t0 = time.monotonic()
    try:
        result = convert_image(src, dst, opts, progress)
    except LayerStoreError as e:
        if tty:
            err.write("\n")
        print(f"stargz-store convert: {e}", file=err)
        return EXIT_FAILED
    except OSError as e:
        if tty:
            err.write("\n")
        print(f"stargz-store convert: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nstargz-store convert: interrupted", file=err)
        return 130
    except Exception as e:  # a bug: still one line, not a traceback (STARGZ_DEBUG=1 shows it)
        if os.environ.get("STARGZ_DEBUG"):
            raise
        if tty:
            err.write("\n")
        print(f"stargz-store convert: internal error: {type(e).__name__}: {e}", file=err)
        return EXIT_FAILED
    for d in result.dropped:
        print(f"stargz-store convert: left out of the new index (not an image): {d}", file=err)
    converted = sum(1 for r in result.layers if r.action == "converted")
    print(
        f"wrote {dst.describe()} ({result.media_type}, {result.digest}): "
        f"{converted} of {len(result.layers)} layers converted in {time.monotonic() - t0:.1f} s",
        file=err,
    )
    return 0
