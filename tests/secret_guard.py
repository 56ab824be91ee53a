"""A pytest plugin: no log line of the whole test run may contain a registered secret.

Registered in ``tests/conftest.py`` (``pytest_plugins``); usable alone with
``-p tests.secret_guard``.

What is captured, for the whole session, attributed to the test that was running:

- every record that reaches the root logger (a handler at level DEBUG; logger levels are left
  alone, so tests that want debug lines raise them, e.g. ``caplog.set_level``). The handler is
  put back before every test phase, because ``stargz_store.log.configure_logging`` replaces
  the root handlers;
- every structlog event (event, bound context and keywords) as it enters the processor chain,
  whatever structlog's configuration is (also inside ``structlog.testing.capture_logs``);
- text that tests hand over with :func:`record_output` (a subprocess's stderr) and log files
  named with :func:`watch_log`; ``*.log`` files in a test's ``tmp_path`` (and its
  subdirectories up to two levels down, e.g. a daemon's log) are read after the test's
  teardown without registration, and the other ``*.log`` files of the session's base temporary
  directory at the end (mount points are never entered).

What counts as a secret: whatever fixtures and tests register with :func:`register`
(:func:`register_basic` adds the base64 form of ``user:password`` too): registry passwords,
tokens the token server issued, signed-URL query strings. At the end of the session every
captured line is searched for every registered secret; a hit makes the run fail, with a
message naming the test and the kind of secret, never the secret.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: Shorter values are refused by :func:`register`: they would match by chance.
MIN_SECRET_LENGTH = 8
#: ``tmp_path`` is searched for ``*.log`` files this many directory levels down (the session's
#: base temporary directory one level more, at the end).
LOG_SEARCH_DEPTH = 2
#: Log files larger than this are read from their end only.
MAX_LOG_FILE = 64 << 20

SESSION = "<outside any test>"


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    secrets: dict[str, str] = field(default_factory=dict)  # secret -> kind
    lines: dict[str, list[str]] = field(default_factory=dict)  # test id -> captured lines
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (test id, label)
    file_text: dict[str, str] = field(default_factory=dict)  # path -> last text read
    current: str = SESSION
    handler: logging.Handler | None = None
    original_process_event: Any = None
    tmp_paths: dict[str, Path] = field(default_factory=dict)
    summary: str = ""


_state = _State()


# --- the API for fixtures and tests -------------------------------------------------------------
def register(secret: str, kind: str) -> None:
    """Remember *secret* (a password, token, signed URL query, ...); *kind* names it in reports."""
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"secret_guard: a {kind} shorter than {MIN_SECRET_LENGTH} characters")
    with _state.lock:
        _state.secrets.setdefault(secret, kind)


def register_basic(username: str, password: str, kind: str = "password") -> None:
    """A password, and the base64 ``user:password`` of its Basic Authorization header."""
    register(password, kind)
    raw = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    register(raw, f"{kind} (base64 Basic credentials)")


def registered() -> dict[str, str]:
    """A copy of the registered secrets (secret -> kind)."""
    with _state.lock:
        return dict(_state.secrets)


def record_output(text: str | bytes, source: str) -> None:
    """Captured output of something the current test ran (a subprocess's stderr, ...)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    _add(f"[{source}] " + line for line in text.splitlines())


def watch_log(path: str | os.PathLike[str], label: str = "") -> None:
    """A log file (e.g. a daemon's stderr) to scan after the current test and at session end."""
    p = str(Path(path).absolute())
    with _state.lock:
        _state.files.setdefault(p, (_state.current, label or p))


# --- capture ------------------------------------------------------------------------------------
def _add(lines: Any) -> None:
    with _state.lock:
        bucket = _state.lines.setdefault(_state.current, [])
        bucket.extend(lines)


class _GuardHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record whose arguments do not format: keep its parts
            text = f"{record.name}: {record.msg!r} {record.args!r}"
        _add([text])


def _install_handler() -> None:
    handler = _state.handler
    if handler is not None and handler not in logging.getLogger().handlers:
        logging.getLogger().addHandler(handler)


def _patch_structlog() -> None:
    try:
        from structlog._base import BoundLoggerBase
    except ImportError:  # structlog not installed: nothing logs through it
        return
    original = BoundLoggerBase._process_event

    def _process_event(self: Any, method_name: str, event: Any, event_kw: Any) -> Any:
        try:
            ctx = getattr(self, "_context", {})
            _add([f"structlog {method_name}: {event!r} {dict(ctx)!r} {dict(event_kw)!r}"])
        except Exception:
            pass
        return original(self, method_name, event, event_kw)

    _state.original_process_event = original
    BoundLoggerBase._process_event = _process_event  # type: ignore[method-assign]


def _unpatch_structlog() -> None:
    if _state.original_process_event is not None:
        from structlog._base import BoundLoggerBase

        BoundLoggerBase._process_event = _state.original_process_event  # type: ignore[method-assign]
        _state.original_process_event = None


def _read_tail(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_LOG_FILE:
                f.seek(size - MAX_LOG_FILE)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _mount_points() -> set[str]:
    """Mount points (from /proc/self/mountinfo: no system call reaches a FUSE server)."""
    out: set[str] = set()
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    out.add(fields[4].encode().decode("unicode_escape"))
    except OSError:
        pass
    return out


def _log_files_below(root: Path, depth: int, mounts: set[str] | None = None) -> Iterator[str]:
    """``*.log`` files under *root*, *depth* directory levels down; mount points are skipped
    (a FUSE mount whose server hangs would hang the scan)."""
    if mounts is None:
        mounts = _mount_points()
    if str(root) in mounts:
        return
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        try:
            if e.path in mounts:
                continue
            if e.is_file(follow_symlinks=False) and e.name.endswith(".log"):
                yield e.path
            elif depth > 0 and e.is_dir(follow_symlinks=False):
                yield from _log_files_below(Path(e.path), depth - 1, mounts)
        except OSError:
            continue


def _watch_session_logs(session: pytest.Session) -> None:
    """``*.log`` files anywhere in the session's temporary directories (``tmp_path_factory``
    users, fixtures wider than one test) that no test claimed."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)  # None: no test made a temporary directory
    if basetemp is None:
        return
    for path in _log_files_below(basetemp, LOG_SEARCH_DEPTH + 1):
        watch_log(path)


def _read_files(test_id: str | None) -> None:
    """Read the watched files of *test_id* (None: all of them that still exist)."""
    with _state.lock:
        files = [(p, owner) for p, (owner, _) in _state.files.items()]
    for path, owner in files:
        if test_id is not None and owner != test_id:
            continue
        text = _read_tail(path)
        if text is not None:
            with _state.lock:
                _state.file_text[path] = text


# --- pytest hooks -------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    if _state.handler is None:
        _state.handler = _GuardHandler()
        _install_handler()
        _patch_structlog()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _state.handler is not None:
        logging.getLogger().removeHandler(_state.handler)
        _state.handler = None
    _unpatch_structlog()


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    with _state.lock:
        _state.current = nodeid
    _install_handler()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _install_handler()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _install_handler()
    yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if isinstance(tmp, Path):
        _state.tmp_paths[item.nodeid] = tmp


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    _install_handler()
    yield
    tmp = _state.tmp_paths.pop(item.nodeid, None)
    if tmp is not None:
        for path in _log_files_below(tmp, LOG_SEARCH_DEPTH):
            watch_log(path)
    _read_files(item.nodeid)


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    with _state.lock:
        _state.current = SESSION


def _findings() -> list[str]:
    with _state.lock:
        secrets = dict(_state.secrets)
        groups: list[tuple[str, str, list[str]]] = [
            (test_id, "log", lines) for test_id, lines in _state.lines.items()
        ]
        for path, text in _state.file_text.items():
            owner, label = _state.files[path]
            groups.append((owner, f"log file {label}", text.splitlines()))
    out: list[str] = []
    for test_id, where, lines in groups:
        text = "\n".join(lines)
        for secret, kind in secrets.items():
            if secret not in text:
                continue
            hits = [ln for ln in lines if secret in ln]
            example = hits[0] if hits else ""
            for s in secrets:
                example = example.replace(s, f"<{secrets[s]}>")
            if len(example) > 300:
                example = example[:300] + "..."
            out.append(
                f"{test_id}: {len(hits)} {where} line(s) contain a secret ({kind}); "
                f"first (redacted): {example}"
            )
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    with _state.lock:
        _state.current = SESSION
    _watch_session_logs(session)
    _read_files(None)
    findings = _findings()
    with _state.lock:
        _state.summary = (
            f"secret guard: {sum(len(v) for v in _state.lines.values())} log lines and "
            f"{len(_state.file_text)} log files checked against {len(_state.secrets)} "
            f"registered secrets: {len(findings)} finding(s)"
        )
    if not findings:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    header = f"secret guard: {len(findings)} finding(s): registered secrets in log lines"
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", header, red=True)
        for f in findings:
            reporter.write_line(f)
    else:  # pragma: no cover - -p no:terminal
        print(header, *findings, sep="\n")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _state.summary and terminalreporter.config.option.verbose >= 0:
        terminalreporter.write_line(_state.summary)
