"""Shared pytest fixtures. ``SHARED`` is ``../shared`` beside the checkout, when present."""

from __future__ import annotations

from pathlib import Path

import pytest

# Fails the run when a log line contains a registered secret (see tests/secret_guard.py).
pytest_plugins = ["tests.secret_guard"]

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GO_REFERENCE = SHARED / "testdata" / "estargz-go-reference"


@pytest.fixture
def go_reference() -> Path:
    if not GO_REFERENCE.is_dir():
        pytest.skip(f"Go reference blobs not present at {GO_REFERENCE} (../shared is optional)")
    return GO_REFERENCE
