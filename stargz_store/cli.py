"""Command line: ``stargz-store [options] MOUNTPOINT`` runs the daemon;
``stargz-store convert SRC DST`` converts an image to eStargz."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "convert":
        from stargz_store.convert_cmd import main as convert_main

        return convert_main(args[1:])
    from stargz_store.daemon import main as daemon_main

    return daemon_main(args)
