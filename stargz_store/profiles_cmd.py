"""``stargz-store profiles [--root DIR] [--config FILE] [--json] [--stop] [PROFILE]``: the
workload profiles the store recorded (``[record]``, ``serve --record``).

``--stop`` asks the running daemon (``<root>/control.sock``) to end its recording sessions now
and write their profiles, instead of waiting for ``[record] period_seconds``.

Without PROFILE: one line per profile under ``<root>/<[record] dir>``, oldest first (file
name, creation time, image, layers, files, bytes read). With PROFILE (a file name from that
list, or a path): its layers and files in first-access order. ``--json`` prints the same as
JSON on stdout (a list of summaries, or the profile document itself).

Why a command of its own and not ``optimize --list``: profiles are the daemon's output (any
store with ``[record] enabled`` writes them, with or without ``optimize``), they live under the
daemon's ``--root``, and looking at them needs neither podman nor a registry.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from stargz_store.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ArgParser, HelpShown, UsageError

PROG = "stargz-store profiles"


def _parser() -> argparse.ArgumentParser:
    from stargz_store.config import DEFAULT_CONFIG_PATH, DEFAULT_ROOT

    p = ArgParser(
        prog=PROG,
        description="List the workload profiles the store recorded ([record] enabled = true, or "
        "'stargz-store serve --record'), or show one.",
        epilog="A profile names, per layer (by TOC digest), the files a container read in the "
        "first seconds after its first read, in that order, with the bytes read. "
        "'stargz-store optimize' makes and uses them.",
    )
    p.add_argument(
        "profile",
        nargs="?",
        metavar="PROFILE",
        help="show this profile (a name from the list, or a path to a profile file)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        metavar="DIR",
        help=f"the store's state directory (default {DEFAULT_ROOT})",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"the store's configuration, for [record] dir (default {DEFAULT_CONFIG_PATH}, "
        "when present)",
    )
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.add_argument(
        "--stop",
        action="store_true",
        help="tell the running daemon to end its recordings now and write their profiles "
        "(instead of waiting for the recording period)",
    )
    return p


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def summary(path: Path) -> dict[str, Any]:
    """One profile file as a summary (``error`` set when it does not parse)."""
    from layerstore.estargz.profile import ProfileError, parse_profile

    out: dict[str, Any] = {"name": path.name, "path": str(path)}
    try:
        profile = parse_profile(path.read_bytes())
    except (OSError, ProfileError) as e:
        out["error"] = str(e)
        return out
    out.update(
        created=profile.created,
        image=profile.image,
        manifest_digest=profile.manifest_digest,
        layers=len(profile.layers),
        files=profile.files,
        bytes=profile.total_bytes,
    )
    return out


def main(argv: Sequence[str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = _parser().parse_args(list(argv))
    except UsageError as e:
        print(f"{PROG}: {e} (see {PROG} --help)", file=err)
        return EXIT_USAGE
    except HelpShown:
        return EXIT_OK
    from stargz_store.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=err)
        return EXIT_USAGE
    d = Path(config.record.dir)
    directory = d if d.is_absolute() else args.root / d
    if args.stop:
        return _stop(args.root, out, err)
    if args.profile:
        return _show(args, directory, out, err)
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    rows = [summary(f) for f in files]
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return EXIT_OK
    if not rows:
        print(f"no profiles in {directory}", file=err)
        return EXIT_OK
    print(
        f"{'PROFILE':<36} {'CREATED':<21} {'LAYERS':>6} {'FILES':>6} {'READ':>10}  IMAGE", file=out
    )
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<36} unreadable: {r['error']}", file=out)
            continue
        print(
            f"{r['name']:<36} {r['created']:<21} {r['layers']:>6} {r['files']:>6} "
            f"{_mb(r['bytes']):>10}  {r['image']}",
            file=out,
        )
    return EXIT_OK


def _show(args: argparse.Namespace, directory: Path, out: TextIO, err: TextIO) -> int:
    from layerstore.estargz.profile import ProfileError, parse_profile

    path = Path(args.profile)
    if "/" not in args.profile:
        path = directory / args.profile
    try:
        data = path.read_bytes()
        profile = parse_profile(data)
    except OSError as e:
        print(f"{PROG}: {path}: {e.strerror or e}", file=err)
        return EXIT_FAILURE
    except ProfileError as e:
        print(f"{PROG}: {path}: {e}", file=err)
        return EXIT_FAILURE
    if args.json:
        out.write(json.dumps(json.loads(data), indent=2) + "\n")
        return EXIT_OK
    print(f"profile  {path}", file=out)
    print(f"image    {profile.image} ({profile.manifest_digest or 'digest unknown'})", file=out)
    print(f"created  {profile.created} by {profile.tool or 'unknown'}", file=out)
    print(
        f"recorded {profile.files} files, {_mb(profile.total_bytes)} read, in the "
        f"{profile.period_seconds:g} s after the first read",
        file=out,
    )
    for i, lp in enumerate(profile.layers):
        print(
            f"layer {i + 1}: TOC {lp.toc_digest} ({len(lp.entries)} files, {_mb(lp.total_bytes)})",
            file=out,
        )
        for entry in lp.entries:
            print(f"  {entry.first_access_ms:>7} ms {entry.bytes:>12} B  {entry.path}", file=out)
    return EXIT_OK


def _stop(root: Path, out: TextIO, err: TextIO) -> int:
    from stargz_store.control import ControlError, request

    try:
        result = request(root, "record_stop")
    except ControlError as e:
        print(f"{PROG}: {e}", file=err)
        return EXIT_FAILURE
    written = result.get("written", [])
    if not written:
        print("recording stopped; no session had read anything, no profile written", file=out)
    for path in written:
        print(f"wrote {path}", file=out)
    return EXIT_OK
