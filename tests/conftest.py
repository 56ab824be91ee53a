"""Shared pytest fixtures.

``go_reference`` is a directory of eStargz blobs written by the Go reference library (our
``estargz-peer``, built by ``./run setup`` from Debian's package) from a tar the session makes
itself (``tests/goref.py``): nothing outside the checkout is read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.gopeer import GoPeerUnavailable
from tests.goref import GO_REFERENCE_ENV, build_go_reference

# Fails the run when a log line contains a registered secret (see tests/secret_guard.py).
pytest_plugins = ["tests.secret_guard"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def go_reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    try:
        directory = build_go_reference(tmp_path_factory.mktemp("go-reference"))
    except GoPeerUnavailable as exc:
        pytest.skip(f"the Go peers cannot be built here ({exc}); ./run setup installs them")
    before = os.environ.get(GO_REFERENCE_ENV)
    os.environ[GO_REFERENCE_ENV] = str(directory)
    yield directory
    if before is None:
        os.environ.pop(GO_REFERENCE_ENV, None)
    else:
        os.environ[GO_REFERENCE_ENV] = before
