"""Run a benchmark in a work directory: the one the user asked to keep, or a temporary one."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def in_workdir(fn: Callable[[Path], T], keep: Path | None, prefix: str) -> T:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return fn(keep)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return fn(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
