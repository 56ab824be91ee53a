"""One logging style: every log line of our packages is a structlog event (snake_case name,
key=value fields), never prose through the standard ``logging`` module.

With :func:`stargz_store.log.configure_logging`, structlog hands its events to the standard
``logging`` machinery too, but as the event dict in ``record.msg``; a record whose ``msg`` is a
string comes from a ``logging.getLogger(...).info("...")`` call, which is what is refused here.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import socket
from pathlib import Path

import pytest

from auth.authfile import AuthEnvironment
from auth.helper_channel import HelperChannelServer
from auth.store import CredentialStore
from layerstore.errors import LayerStoreError
from layerstore.registry.client import RegistryClient, RegistrySettings
from layerstore.registry.registries_conf import WatchedRegistriesConf
from stargz_store import daemon
from stargz_store.log import scoped_logging
from tests import secret_guard
from tests.registry_fixtures import RegistryHandle, gzip_tar, registry  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
OURS = ("auth", "layerstore", "stargz_store")
EVENT = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


class Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _helper_request(path: Path, body: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(body)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    answer = json.loads(reply)
    assert isinstance(answer, dict)
    return answer


def _exercise(tmp_path: Path, reg: RegistryHandle) -> None:
    """Code paths of each package that log at every level."""
    # auth.store: a malformed auth file (warning), credentials found (debug)
    home = tmp_path / "home"
    (home / ".config" / "containers").mkdir(parents=True)
    (home / ".config" / "containers" / "auth.json").write_text("{not json")
    store = CredentialStore(AuthEnvironment(env={"XDG_RUNTIME_DIR": ""}, uid=0, home=str(home)))
    assert store.lookup("r.example", "x") is None
    # auth.helper_channel: listening (info), a bad request (warning), credentials (info)
    password = "pw-log-style-" + "7" * 12
    secret_guard.register(password, "helper channel password")
    with HelperChannelServer(tmp_path / "helper.sock", store) as server:
        assert _helper_request(server.path, b"{bad")["ok"] is False
        good = json.dumps({"r.example/app:1": {"username": "u", "password": password}})
        assert _helper_request(server.path, good.encode())["ok"] is True
    # layerstore.registry.registries_conf: a broken file (warning)
    broken = tmp_path / "registries.conf"
    broken.write_text("[[registry]]\nlocation = \n")
    with pytest.raises(LayerStoreError):
        WatchedRegistriesConf(broken, env={}, home=str(home))
    # layerstore.registry.client: requests (debug)
    img = reg.push_image("logstyle/app", "v1", [gzip_tar({"a": b"a"})])
    settings = RegistrySettings(insecure_registries=frozenset({reg.host}))
    with RegistryClient(None, None, settings=settings) as client:
        assert client.resolve(reg.ref("logstyle/app", "v1")).digest == img.manifest_digest
    # stargz_store.daemon: a closer that fails at shutdown (warning)
    wiring = daemon.Wiring(provider=None)
    wiring.closers.append(lambda: 1 / 0)
    wiring.close()


def test_our_packages_log_structlog_events_only(
    tmp_path: Path,
    registry: RegistryHandle,  # noqa: F811 - the fixture
) -> None:
    collector = Collector()
    rendered = io.StringIO()
    with scoped_logging("debug", "json", rendered):
        root = logging.getLogger()
        root.addHandler(collector)
        try:
            _exercise(tmp_path, registry)
        finally:
            root.removeHandler(collector)
    ours = [r for r in collector.records if r.name.split(".")[0] in OURS]
    # the collector saw each package (else this test would prove nothing)
    assert {r.name.split(".")[0] for r in ours} == set(OURS)
    prose = [(r.name, r.getMessage()) for r in ours if not isinstance(r.msg, dict)]
    assert prose == []
    events = [r.msg for r in ours if isinstance(r.msg, dict)]
    bad_names = [e["event"] for e in events if not EVENT.fullmatch(str(e["event"]))]
    assert bad_names == []
    names = {e["event"] for e in events}
    assert {
        "credential_lookup_failed",
        "auth_helper_channel_listening",
        "auth_helper_payload_refused",
        "auth_helper_credentials_received",
        "registries_conf_invalid",
        "registry_response",
        "shutdown_close_failed",
    } <= names, names
    # every line on the stream is one JSON event
    lines = rendered.getvalue().splitlines()
    assert lines and all(json.loads(line)["event"] for line in lines)


def _stdlib_logging_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Name) and target.id == "logging"):
            continue
        if node.func.attr in ("debug", "info", "warning", "error", "exception", "critical", "log"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} logging.{node.func.attr}")
        if (
            node.func.attr == "getLogger"
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "__name__"
        ):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} logging.getLogger(__name__)")
    return found


def test_no_module_logs_through_stdlib_logging() -> None:
    """The static half: no ``logging.getLogger(__name__)`` logger or ``logging.info(...)`` call
    anywhere in the packages (stargz_store/log.py configures logging; the registry client only
    filters urllib3's records)."""
    files = [p for pkg in OURS for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 30
    offenders = [hit for p in files for hit in _stdlib_logging_calls(p)]
    assert offenders == []
