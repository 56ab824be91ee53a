"""The auth-helper channel: daemon socket (auth.helper_channel) and ``stargz-store-helper``."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth.authfile import AuthEnvironment
from auth.errors import HelperChannelError
from auth.helper_channel import MAX_PAYLOAD, HelperChannelServer
from auth.helper_client import forward
from auth.store import CredentialStore
from auth.types import Credentials

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / ".venv" / "bin" / "stargz-store-helper"


@pytest.fixture
def store(tmp_path: Path) -> CredentialStore:
    return CredentialStore(AuthEnvironment(env={}, uid=0, home=str(tmp_path / "nohome")))


@pytest.fixture
def server(tmp_path: Path, store: CredentialStore) -> Iterator[HelperChannelServer]:
    root = tmp_path / "root"
    root.mkdir()
    with HelperChannelServer(root / "auth-helper.sock", store, connection_timeout=2.0) as srv:
        yield srv


def raw_request(path: Path, data: bytes) -> dict[str, object]:
    return forward(data, str(path), timeout=5.0)


def run_helper(
    stdin: bytes, *args: str, env_socket: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    if not HELPER.exists():
        subprocess.run(
            [str(REPO / ".venv" / "bin" / "pip"), "install", "-e", str(REPO), "-q"], check=True
        )
    env = {k: v for k, v in os.environ.items() if k != "STARGZ_STORE_HELPER_SOCKET"}
    if env_socket is not None:
        env["STARGZ_STORE_HELPER_SOCKET"] = env_socket
    return subprocess.run(
        [str(HELPER), *args], input=stdin, capture_output=True, env=env, timeout=30
    )


def test_socket_mode_0600_and_removed_on_stop(tmp_path: Path, store: CredentialStore) -> None:
    path = tmp_path / "auth-helper.sock"
    srv = HelperChannelServer(path, store)
    srv.start()
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        # no private temporary directory left behind
        assert sorted(p.name for p in tmp_path.iterdir()) == ["auth-helper.sock"]
    finally:
        srv.stop()
    assert not path.exists()


def test_stale_socket_replaced_but_regular_file_refused(
    tmp_path: Path, store: CredentialStore
) -> None:
    path = tmp_path / "s.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(path))
    old.close()
    with HelperChannelServer(path, store):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    other = tmp_path / "file"
    other.write_text("keep")
    with pytest.raises(HelperChannelError, match="not a socket"):
        HelperChannelServer(other, store).start()
    assert other.read_text() == "keep"


def test_console_script_round_trip(server: HelperChannelServer, store: CredentialStore) -> None:
    payload = {
        "quay.io/ns/img:1.0": {"username": "u", "password": "TOPSECRET"},
    }
    res = run_helper(json.dumps(payload).encode(), "--socket", str(server.path))
    assert res.returncode == 0, res.stderr
    assert b"TOPSECRET" not in res.stdout + res.stderr
    assert store.lookup("quay.io", "ns/img") == Credentials("u", "TOPSECRET")
    # exact host only
    assert store.lookup("quay.io.mirror.example", "ns/img") is None
    assert store.lookup("mirror.example.com", "ns/img") is None


def test_helper_client_needs_only_the_standard_library(
    tmp_path: Path, server: HelperChannelServer, store: CredentialStore
) -> None:
    """podman runs the helper with whatever python3 the host (or the podman 5.4 test chroot)
    has: the files testbed.podman5 installs there must work without site-packages."""
    from testbed.podman5 import HELPER_CLIENT_FILES

    lib = tmp_path / "lib" / "auth"
    lib.mkdir(parents=True)
    for name in HELPER_CLIENT_FILES:
        (lib / name).write_bytes((REPO / "auth" / name).read_bytes())
    payload = {"r.io/a:1": {"username": "u", "password": "p"}}
    res = subprocess.run(
        [sys.executable, "-S", "-I", "-c",
         f"import sys; sys.path.insert(0, {str(lib.parent)!r}); "
         "from auth.helper_client import main; sys.exit(main(sys.argv[1:]))",
         "--socket", str(server.path)],
        input=json.dumps(payload).encode(), capture_output=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert store.lookup("r.io", "a") == Credentials("u", "p")


def test_console_script_socket_from_env(
    server: HelperChannelServer, store: CredentialStore
) -> None:
    payload = {"r.io/a@sha256:" + "c" * 64: {"identityToken": "tok"}}
    res = run_helper(json.dumps(payload).encode(), env_socket=str(server.path))
    assert res.returncode == 0, res.stderr
    assert store.lookup("r.io", "a") == Credentials(identity_token="tok")


def test_console_script_daemon_down(tmp_path: Path) -> None:
    res = run_helper(b'{"r.io/a:1": {"username": "u", "password": "TOPSECRET"}}',
                     "--socket", str(tmp_path / "none.sock"))  # fmt: skip
    assert res.returncode != 0
    assert b"warning" in res.stderr
    assert b"TOPSECRET" not in res.stderr + res.stdout


def test_console_script_rejects_bad_input(server: HelperChannelServer) -> None:
    res = run_helper(b"not json SECRET", "--socket", str(server.path))
    assert res.returncode != 0
    assert b"warning" in res.stderr and b"SECRET" not in res.stderr
    res = run_helper(b"[1, 2]", "--socket", str(server.path))
    assert res.returncode != 0


def test_console_script_reports_daemon_refusal(
    server: HelperChannelServer, store: CredentialStore
) -> None:
    res = run_helper(b'{"not-a-reference": {"username": "u"}}', "--socket", str(server.path))
    assert res.returncode != 0
    assert b"refused" in res.stderr
    assert store.lookup("not-a-reference", "") is None


def test_oversized_payload_rejected(server: HelperChannelServer, store: CredentialStore) -> None:
    big = json.dumps({"r.io/a:1": {"username": "u", "password": "x" * (MAX_PAYLOAD + 10)}})
    reply = raw_request(server.path, big.encode())
    assert reply["ok"] is False
    assert "larger" in str(reply["error"])
    assert store.lookup("r.io", "a") is None
    # the client refuses it locally too
    res = run_helper(big.encode(), "--socket", str(server.path))
    assert res.returncode != 0 and b"larger" in res.stderr


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"{oops", "JSON"),
        (b'["r.io/a:1"]', "object"),
        (b'{"r.io/a:1": "TOPSECRET"}', "object"),
        (b'{"r.io/a:1": {"password": 5}}', "string"),
        (b'{"bad": {"username": "u"}}', "reference"),
    ],
)
def test_malformed_payload_rejected(
    server: HelperChannelServer, store: CredentialStore, data: bytes, fragment: str
) -> None:
    reply = raw_request(server.path, data)
    assert reply["ok"] is False
    assert fragment in str(reply["error"])
    assert "TOPSECRET" not in str(reply["error"])
    assert store.lookup("r.io", "a") is None


def test_reply_on_success_counts(server: HelperChannelServer) -> None:
    reply = raw_request(
        server.path,
        json.dumps({"a.io/x:1": {"username": "u"}, "b.io/y:1": {}}).encode(),
    )
    assert reply == {"ok": True, "count": 1}


def test_slow_client_times_out_without_blocking_others(
    server: HelperChannelServer, store: CredentialStore
) -> None:
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(str(server.path))
    slow.sendall(b'{"r.io/a:1": ')  # never finishes
    try:
        reply = raw_request(server.path, b'{"q.io/b:1": {"username": "v"}}')
        assert reply["ok"] is True
        assert store.lookup("q.io", "b") == Credentials("v")
        slow.settimeout(10)
        answer = json.loads(slow.recv(65536))
        assert answer["ok"] is False and "timed out" in answer["error"]
    finally:
        slow.close()


def test_helper_client_main_in_process(
    server: HelperChannelServer,
    store: CredentialStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    from auth import helper_client

    data = json.dumps({"m.io/x:1": {"username": "w", "password": "p"}}).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    monkeypatch.setenv("STARGZ_STORE_HELPER_SOCKET", str(server.path))
    assert helper_client.main([]) == 0
    assert store.lookup("m.io", "x") == Credentials("w", "p")
    assert capsys.readouterr().err == ""


def test_peer_uid_checked(server: HelperChannelServer, store: CredentialStore) -> None:
    # We run the test as one uid; pretend the daemon only trusts another one.
    server._allowed_uids = {os.getuid() + 4242}
    reply = raw_request(server.path, b'{"r.io/a:1": {"username": "u"}}')
    assert reply == {"ok": False, "error": "permission denied"}
    assert store.lookup("r.io", "a") is None
