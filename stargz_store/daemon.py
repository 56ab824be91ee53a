"""The store daemon's lifecycle (being built: see issue 4)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    print("stargz-store: the daemon is not available in this build yet", file=sys.stderr)
    return 2
