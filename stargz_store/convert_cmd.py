"""The ``stargz-store convert SRC DST`` subcommand (being built: see issue 2)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    print("stargz-store convert: not available in this build yet", file=sys.stderr)
    return 2
