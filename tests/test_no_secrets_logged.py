"""The secret guard (tests/secret_guard.py) can fail a run: inner pytest runs on synthetic tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import secret_guard

REPO = Path(__file__).resolve().parent.parent

PASSWORD = "pw-guard-0123456789abcdef"
TOKEN = "tok-guard-fedcba9876543210"
SIGNED = "sig=sig-guard-00ff00ff00ff"

PREAMBLE = f"""
import logging
from pathlib import Path

import structlog

from tests import secret_guard

secret_guard.register_basic("alice", {PASSWORD!r}, "registry password")
secret_guard.register({TOKEN!r}, "bearer token")
secret_guard.register({SIGNED!r}, "signed URL query")
log = logging.getLogger("inner")
"""

LEAKS = f"""
def test_stdlib_leak():
    log.warning("sending Authorization: Basic %s", "x" + {PASSWORD!r})


def test_handlers_replaced():
    # what stargz_store.log.configure_logging does: the guard's handler is put back
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)


def test_leak_after_handlers_replaced():
    log.error("token %s", {TOKEN!r})


def test_structlog_leak():
    structlog.get_logger("inner").debug("redirect", url="http://h/b?" + {SIGNED!r})


def test_daemon_log_leak(tmp_path: Path):
    (tmp_path / "daemon").mkdir()
    (tmp_path / "daemon" / "daemon.log").write_text('{{"event": "x", "p": "' + {PASSWORD!r} + '"}}')


def test_shared_dir_log_leak(tmp_path_factory):
    # not in the test's tmp_path: found in the session's base temporary directory at the end
    (tmp_path_factory.mktemp("shared") / "registry.log").write_text("token " + {TOKEN!r})


def test_recorded_stderr_leak():
    secret_guard.record_output("Traceback ... " + {TOKEN!r}, "subprocess stderr")


def test_clean():
    log.warning("nothing secret here")
"""

CLEAN = f"""
def test_logs_without_secrets(tmp_path: Path):
    log.warning("user alice, password <redacted>")
    structlog.get_logger("inner").info("resolved", ref="127.0.0.1:5000/app:v1")
    (tmp_path / "daemon.log").write_text("all fine\\n")
    secret_guard.record_output("stargz-store convert: registry refused the credentials", "err")


def test_secret_in_an_assertion_only():
    assert {PASSWORD!r}.startswith("pw-")
"""


def run_inner(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(PREAMBLE + textwrap.dedent(body))
    # No third-party plugins (the inner tests need none; they cost seconds per run).
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "tests.secret_guard", "-p", "no:cacheprovider",
            "-q", "--basetemp", str(tmp_path / "basetemp"), "test_inner.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    # The inner output is not a log line of this run; it must not hold the inner secrets
    # either, which is asserted by the callers.
    return r


def test_guard_fails_a_run_that_logs_secrets(tmp_path: Path) -> None:
    r = run_inner(tmp_path / "leaky", LEAKS)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "8 passed" in out, out  # every test passed: the failure is the guard's
    assert "secret guard:" in out, out
    findings = [ln for ln in out.splitlines() if ": " in ln and "contain a secret" in ln]
    by_test = {ln.split(": ", 1)[0].split("::")[-1]: ln for ln in findings}
    assert "registry password" in by_test["test_stdlib_leak"], out
    assert "bearer token" in by_test["test_leak_after_handlers_replaced"], out
    assert "signed URL query" in by_test["test_structlog_leak"], out
    assert "log file" in by_test["test_daemon_log_leak"], out
    assert "registry password" in by_test["test_daemon_log_leak"], out
    assert "bearer token" in by_test["test_recorded_stderr_leak"], out
    shared = by_test[secret_guard.SESSION]
    assert "registry.log" in shared and "bearer token" in shared, out
    assert "test_clean" not in by_test and "test_handlers_replaced" not in by_test, out
    for secret in (PASSWORD, TOKEN, SIGNED):
        assert secret not in out, "the report names kinds, never the secrets"
    assert "<registry password>" in by_test["test_stdlib_leak"], "the line is shown redacted"


def test_guard_passes_a_clean_run(tmp_path: Path) -> None:
    r = run_inner(tmp_path / "clean", CLEAN)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "2 passed" in out and "secret guard" not in out, out


def test_register_refuses_short_secrets() -> None:
    with pytest.raises(ValueError, match="shorter"):
        secret_guard.register("abc", "password")


def test_guard_is_active_in_this_run(caplog: pytest.LogCaptureFixture) -> None:
    """This session's guard sees what is logged here (the plugin is loaded via conftest)."""
    import logging

    import structlog

    assert secret_guard._state.handler in logging.getLogger().handlers
    logging.getLogger("tests.guard").warning("guard-probe-stdlib")
    structlog.get_logger("tests.guard").debug("guard-probe-structlog")
    with secret_guard._state.lock:
        mine = list(secret_guard._state.lines.get(secret_guard._state.current, []))
    assert any("guard-probe-stdlib" in ln for ln in mine)
    assert any("guard-probe-structlog" in ln for ln in mine)
