"""``stargz-store status [--root DIR] [--json]``: what the running daemon holds and does.

Asks the daemon on ``--root`` over its control socket (``<root>/control.sock``, root only;
:mod:`stargz_store.control`) and prints a readable summary, or with ``--json`` the daemon's
document as it is (its fields: :mod:`stargz_store.status`). Without a daemon on that root it
prints one line and exits with status 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stargz_store.cmdline import EXIT_FAILURE, EXIT_OK, ArgParser, parse_command_line
from stargz_store.config import DEFAULT_ROOT

PROG = "stargz-store status"
MECHANISM_NAMES = {
    "foreground": "foreground",
    "read_ahead": "read-ahead",
    "landmark_prefetch": "landmark prefetch",
    "dependency_prefetch": "dependency prefetch",
    "dependency_fetch": "dependency fetch",
    "profile_prefetch": "profile prefetch",
    "background_fill": "background fill",
}


def build_parser() -> ArgParser:
    p = ArgParser(
        prog=PROG,
        description="Show what the running store daemon holds and does: images and layers "
        "(reference, key scheme, TOC digest, bytes fetched of the blob, users), the chunk "
        "cache (size, limit, hit rate), bytes fetched per mechanism, layer lookups by "
        "outcome, work in flight and the latest warnings and errors. Asks the daemon over "
        "its control socket, ROOT/control.sock (root only).",
        epilog="Exit status: 0, or 1 when no daemon answers on ROOT (one line on stderr).",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        metavar="DIR",
        help=f"the daemon's --root (default {DEFAULT_ROOT})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the daemon's status document as JSON (stable fields, 'schema': 1)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up when the daemon does not answer within this time (default 30)",
    )
    return p


def main(argv: Sequence[str]) -> int:
    args = parse_command_line(build_parser(), argv, PROG)
    if isinstance(args, int):
        return args
    from stargz_store.control import ControlError, request

    try:
        doc = request(args.root, "status", timeout=args.timeout)
    except ControlError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if args.json:
            json.dump(doc, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render(doc))
        sys.stdout.flush()
    except BrokenPipeError:  # `status --json | head`: the reader has what it wanted
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


# --- the readable form ---------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def count(n: int, word: str) -> str:
    """``1 chunk``, ``2 chunks``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def short(digest: str | None) -> str:
    """``sha256:`` and the first 12 hex digits (as podman shows IDs)."""
    if not digest:
        return "-"
    algo, _, hexd = digest.partition(":")
    return f"{algo}:{hexd[:12]}" if hexd else digest[:19]


def percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    out = []
    for row in (header, *rows):
        cells = [c.ljust(w) for c, w in zip(row, widths)]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def render(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    d = doc.get("daemon", {})
    lines.append(
        f"stargz-store {d.get('version', '?')} (pid {d.get('pid', '?')}), up "
        f"{human_duration(float(d.get('uptime_seconds', 0)))}; mount "
        f"{d.get('mountpoint') or '-'}, root {d.get('root', '-')}"
    )
    lines.append("")
    images = doc.get("images", [])
    lines.append(f"IMAGES ({len(images)})")
    if images:
        rows = [
            [i["ref"], short(i.get("manifest_digest")), str(len(i["layers"])), str(i["users"])]
            for i in images
        ]
        lines += table(["REF", "MANIFEST", "LAYERS", "USERS"], rows)
    else:
        lines.append("  none")
    lines.append("")
    layers = doc.get("layers", [])
    in_use = sum(1 for x in layers if x["users"] > 0)
    lines.append(f"LAYERS ({len(layers)} held, {in_use} in use)")
    if layers:
        rows = []
        for x in layers:
            fetched = (
                f"{human_bytes(x['bytes_fetched'])} / {human_bytes(x['blob_size'])} "
                f"({percent(x['bytes_fetched'], x['blob_size'])})"
            )
            keys = x.get("keys") or [{"ref": "-", "scheme": "-", "users": 0}]
            for n, k in enumerate(keys):
                first = n == 0
                rows.append(
                    [
                        short(x["digest"]) if first else "",
                        short(x["toc_digest"]) if first else "",
                        k["scheme"],
                        fetched if first else "",
                        str(k["users"]),
                        k["ref"],
                    ]
                )
        lines += table(["DIGEST", "TOC DIGEST", "KEY", "FETCHED / SIZE", "USERS", "REF"], rows)
    else:
        lines.append("  none")
    lines.append("")
    lines += _summary(doc)
    return "\n".join(lines) + "\n"


def _summary(doc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    c = doc.get("cache")
    if c is None:
        out.append("CACHE      none")
    else:
        rate = c.get("hit_rate")
        rate_text = "-" if rate is None else f"{100.0 * rate:.1f}%"
        out.append(
            f"CACHE      {human_bytes(c['bytes'])} of {human_bytes(c['max_bytes'])} "
            f"({percent(c['bytes'], c['max_bytes'])}) in {count(c['entries'], 'chunk')}, "
            f"{count(c['toc_entries'], 'TOC')}; hit rate {rate_text} ({c['hits']} hits, "
            f"{c['misses']} misses); evicted {c['evicted']}, removed by operator "
            f"{c['removed_by_operator']}"
        )
        out.append(f"           {c['dir']}")
    f = doc.get("fetch")
    if f is not None:
        parts = [
            f"{MECHANISM_NAMES.get(name, name)} {human_bytes(t['bytes'])} "
            f"({t['requests']} req{', ' + str(t['failures']) + ' failed' if t['failures'] else ''})"
            for name, t in f["mechanisms"].items()
        ]
        out.append("FETCHED    " + ", ".join(parts))
        out.append(
            f"           TOC requests {f['toc_requests']}; chunks failing verification "
            f"{f['verification_failures']}"
        )
    lk = doc.get("lookups", {})
    counted = [f"{n} {k}" for k, n in lk.get("outcomes", {}).items() if n]
    out.append(
        f"LOOKUPS    {lk.get('layer_lookups', 0)} layer lookups"
        + (": " + ", ".join(counted) if counted else "")
    )
    fl = doc.get("in_flight", {})
    out.append(
        f"IN FLIGHT  {fl.get('lookups', 0)} lookups, {fl.get('foreground_fetches', 0)} "
        f"foreground fetches, {count(fl.get('chunks', 0), 'chunk')}"
    )
    errors = doc.get("errors", {})
    counts = errors.get("counts", {})
    recent = errors.get("recent", [])
    out.append(
        f"ERRORS     {counts.get('warning', 0)} warnings, {counts.get('error', 0)} errors since "
        "start" + ("; latest:" if recent else "")
    )
    for e in recent[-10:]:
        fields = " ".join(f"{k}={v}" for k, v in e.get("fields", {}).items())
        out.append(f"  {e.get('time', '')} {e.get('level', '')} {e.get('event', '')} {fields}")
    return out
