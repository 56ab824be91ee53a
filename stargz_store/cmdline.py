"""Pieces every subcommand's argument parsing shares: a parser that reports usage errors as an
exception (so ``main()`` returns an exit status instead of raising SystemExit from deep
inside), value types for sizes and booleans, and the version string.

Kept free of heavy imports: ``stargz-store --version`` and ``help`` must not load pyfuse3,
requests or pydantic.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "stargz-store"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
}
SIZE_HELP = "bytes, or with a suffix K, M or G (powers of 1024: 512K, 4M, 1G)"


class UsageError(Exception):
    """Bad command-line usage; the message is one user-facing line (exit status 2)."""


class HelpShown(Exception):
    """``--help`` (or ``--version``) was printed; the command ends with status 0."""


class ArgParser(argparse.ArgumentParser):
    """argparse without SystemExit: errors raise UsageError, ``--help`` raises HelpShown."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        if status:
            raise UsageError(message or "invalid arguments")
        raise HelpShown()


def parse_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str], prog: str
) -> argparse.Namespace | int:
    """*argv* parsed by *parser* (an :class:`ArgParser`), or the exit status to return at once:
    ``EXIT_OK`` after ``--help``, ``EXIT_USAGE`` after a usage error, told in one line on
    stderr that points at ``PROG --help``."""
    try:
        return parser.parse_args(list(argv))
    except UsageError as exc:
        print(f"{prog}: {exc} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except HelpShown:
        return EXIT_OK


def parse_size(text: str) -> int:
    """``4M`` -> 4194304. Sizes are powers of 1024, like podman's and the Go store's flags."""
    value = _size(text, "size must be positive")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def parse_size_or_zero(text: str) -> int:
    """Like :func:`parse_size`, but 0 is allowed (meaning "off")."""
    return _size(text, "size must not be negative")


def _size(text: str, negative_message: str) -> int:
    t = text.strip().lower().replace("_", "")
    negative = t.startswith("-")
    digits = t.lstrip("-").rstrip("kmgib")
    unit = t.lstrip("-")[len(digits) :]
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} ({SIZE_HELP})")
    if negative:
        raise argparse.ArgumentTypeError(f"{negative_message}: {text!r}")
    return int(digits) * _SIZE_UNITS[unit]


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def version() -> str:
    """The installed distribution's version; from a source tree, pyproject.toml's."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            return dist_version("stargz-store")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover - importlib.metadata is there from 3.8 on
        pass
    return _pyproject_version() or "unknown"


def _pyproject_version(pyproject: Path | None = None) -> str | None:
    path = pyproject or Path(__file__).resolve().parent.parent / "pyproject.toml"
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python < 3.11 only
        import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = doc.get("project", {}).get("version")
    return value if isinstance(value, str) else None
