"""The ``stargz-store`` command line: a small table of subcommands, and the Go store's form.

::

    stargz-store COMMAND [ARGS...]          a subcommand (serve, convert, status, ...)
    stargz-store [OPTIONS] MOUNTPOINT       'serve' without the word, as the Go store is run
    stargz-store --version | --help

Each subcommand lives in its own module with a ``main(argv) -> int``; :data:`COMMANDS` names
it as ``"module:function"`` and imports it only when it runs, so ``--version``, ``help`` and a
mistyped word never load pyfuse3 or the registry client. Adding a command is one
:class:`Command` line in :data:`COMMANDS` and its module.

Why the MOUNTPOINT form is guarded: the daemon creates a missing mount point, so before this
table existed ``stargz-store help`` created ``./help`` and ``/var/lib/stargz-store`` and
mounted there. Now a first word that is a command always runs the command, and in the
implicit form a MOUNTPOINT that is a bare word (no ``/``) must be an existing directory;
otherwise it is an error with a hint (exit status 2) and nothing is created or mounted. A new
mount point is still created when it is written as a path (``/mnt/store``, ``./store``) or
given to ``serve`` explicitly.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, TextIO, cast

from stargz_store.cmdline import EXIT_OK, EXIT_USAGE, PROG, version

Main = Callable[[Sequence[str]], int]


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    target: str
    """``module:function``; the function takes the arguments after the command word and
    returns the exit status."""

    def load(self) -> Main:
        module, _, attr = self.target.partition(":")
        return cast(Main, getattr(importlib.import_module(module), attr))


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "serve",
            "mount the additional layer store on MOUNTPOINT and serve it (the daemon)",
            "stargz_store.daemon:serve_main",
        ),
        Command(
            "convert",
            "convert an image to eStargz (oci:DIR[:TAG] and docker://REF, as skopeo names them)",
            "stargz_store.convert_cmd:main",
        ),
        Command(
            "status",
            "show the running daemon's images, layers, cache, fetching and latest errors",
            "stargz_store.status_cmd:main",
        ),
        Command(
            "cache",
            "shrink (prune) or empty (clear) the chunk cache, with or without a daemon",
            "stargz_store.cache_cmd:main",
        ),
        Command(
            "optimize",
            "run an image once, record what it reads at start, and write it with those files "
            "first (or attach the record to it)",
            "stargz_store.optimize.command:main",
        ),
        Command(
            "profiles",
            "list the workload profiles the store recorded ([record], serve --record)",
            "stargz_store.profiles_cmd:main",
        ),
        Command(
            "help",
            "show this help, or a command's: stargz-store help COMMAND",
            "stargz_store.cli:help_main",
        ),
    )
}


def usage() -> str:
    return (
        f"usage: {PROG} COMMAND [ARGS...]\n"
        f"       {PROG} [--config FILE] [--root DIR] [--log-level LEVEL] MOUNTPOINT\n"
        f"       {PROG} --version | --help\n"
    )


def help_text() -> str:
    width = max(len(name) for name in COMMANDS) + 2
    lines = [
        usage(),
        "Serve lazily pulled eStargz layers to podman and CRI-O as an additional layer store",
        "(FUSE), and convert images to eStargz.",
        "",
        "commands:",
        *(f"  {c.name:<{width}}{c.summary}" for c in COMMANDS.values()),
        "",
        "The MOUNTPOINT form is 'serve' without the word, as the Go stargz-store is run",
        f"({PROG} --root /var/lib/stargz-store /var/lib/stargz-store/store). There a MOUNTPOINT",
        "that is a bare word must be an existing directory, so that a mistyped command never",
        "mounts anything; a path with a '/' is created when missing.",
        "",
        "options:",
        "  --version   print the version and exit",
        "  -h, --help  show this help and exit",
        "",
        f"'{PROG} help COMMAND' (or '{PROG} COMMAND --help') describes a command's options.",
    ]
    return "\n".join(lines) + "\n"


def _suggest(word: str) -> str | None:
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
    return close[0] if close else None


def _not_a_command(word: str, err: TextIO) -> int:
    suggestion = _suggest(word)
    if suggestion is not None:
        print(
            f"{PROG}: {word!r} is not a command or an existing directory; "
            f"did you mean {suggestion!r}?",
            file=err,
        )
    else:
        print(
            f"{PROG}: {word!r} is not a command or an existing directory "
            f"(commands: {', '.join(COMMANDS)}; to mount on a new directory write a path, "
            f"e.g. ./{word}; see '{PROG} help')",
            file=err,
        )
    return EXIT_USAGE


def help_main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("help", "-h", "--help"):
        sys.stdout.write(help_text())
        return EXIT_OK
    if len(args) > 1:
        print(f"{PROG} help: one command at a time (usage: {PROG} help [COMMAND])", file=sys.stderr)
        return EXIT_USAGE
    cmd = COMMANDS.get(args[0])
    if cmd is None:
        suggestion = _suggest(args[0])
        hint = (
            f"; did you mean {suggestion!r}?"
            if suggestion
            else f" (commands: {', '.join(COMMANDS)})"
        )
        print(f"{PROG} help: no command {args[0]!r}{hint}", file=sys.stderr)
        return EXIT_USAGE
    return cmd.load()(["--help"])


def _implicit_serve(args: list[str]) -> int:
    """``stargz-store [OPTIONS] MOUNTPOINT``: the daemon, after the bare-word check."""
    from stargz_store.cmdline import HelpShown, UsageError
    from stargz_store.daemon import build_parser

    err = sys.stderr
    if not args[0].startswith("-"):
        word = args[0]
        if "/" not in word and not os.path.isdir(word):
            return _not_a_command(word, err)
    try:
        parsed = build_parser(PROG).parse_args(args)
    except UsageError as exc:
        # A bare first word that is no option was checked above; here the options came first.
        print(f"{PROG}: {exc}", file=err)
        err.write(usage())
        return EXIT_USAGE
    except HelpShown:
        return EXIT_OK
    word = str(parsed.mountpoint)
    if "/" not in word and not os.path.isdir(word):
        if word in COMMANDS:
            print(f"{PROG}: commands come first: {PROG} {word} [ARGS...]", file=err)
            return EXIT_USAGE
        return _not_a_command(word, err)
    from stargz_store.daemon import main as daemon_main

    return daemon_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(usage())
        print(f"'{PROG} help' lists the commands.", file=sys.stderr)
        return EXIT_USAGE
    first = args[0]
    if first == "--version" or ("--version" in args and first.startswith("-")):
        print(f"{PROG} {version()}")
        return EXIT_OK
    if first in ("-h", "--help"):
        sys.stdout.write(help_text())
        return EXIT_OK
    cmd = COMMANDS.get(first)
    if cmd is not None:
        return cmd.load()(args[1:])
    return _implicit_serve(args)
