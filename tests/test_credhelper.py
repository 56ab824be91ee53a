"""docker-credential-* helpers (auth.credhelper), with fake helpers written to a tmp dir."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from auth.credhelper import get_credentials, helper_program
from auth.errors import CredentialHelperError
from auth.types import Credentials


def make_helper(bindir: Path, name: str, body: str) -> None:
    """A Python fake ``docker-credential-<name>``; *body* sees ``verb`` and ``server``."""
    script = bindir / f"docker-credential-{name}"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, time, os\n"
        "verb = sys.argv[1]\n"
        "server = sys.stdin.read()\n" + body
    )
    script.chmod(0o755)


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    return d


def env_for(bindir: Path) -> dict[str, str]:
    return {"PATH": f"{bindir}:/usr/bin:/bin"}


def test_username_and_secret(bindir: Path) -> None:
    make_helper(
        bindir,
        "fake",
        "assert verb == 'get'\n"
        "print(json.dumps({'ServerURL': server, 'Username': 'u-' + server, 'Secret': 's3'}))\n",
    )
    creds = get_credentials("fake", "r.example.com", env=env_for(bindir))
    assert creds == Credentials("u-r.example.com", "s3")


def test_token_username_is_identity_token(bindir: Path) -> None:
    make_helper(bindir, "tok", "print(json.dumps({'Username': '<token>', 'Secret': 'refresh'}))\n")
    assert get_credentials("tok", "r.io", env=env_for(bindir)) == Credentials(
        identity_token="refresh"
    )


def test_not_found_is_none(bindir: Path) -> None:
    make_helper(
        bindir,
        "nf",
        "print('credentials not found in native keychain')\nsys.exit(1)\n",
    )
    assert get_credentials("nf", "r.io", env=env_for(bindir)) is None


def test_failure_message_hides_stdout(bindir: Path) -> None:
    make_helper(bindir, "bad", "print('TOPSECRET-oops')\nsys.exit(3)\n")
    with pytest.raises(CredentialHelperError) as ei:
        get_credentials("bad", "r.io", env=env_for(bindir))
    assert "TOPSECRET" not in str(ei.value)
    assert "exit status 3" in str(ei.value)


def test_garbage_output_hides_stdout(bindir: Path) -> None:
    make_helper(bindir, "garbage", "print('TOPSECRET not json')\n")
    with pytest.raises(CredentialHelperError) as ei:
        get_credentials("garbage", "r.io", env=env_for(bindir))
    assert "TOPSECRET" not in str(ei.value)


def test_non_object_and_non_string_fields(bindir: Path) -> None:
    make_helper(bindir, "list", "print('[1]')\n")
    make_helper(bindir, "num", "print(json.dumps({'Username': 1, 'Secret': 'x'}))\n")
    with pytest.raises(CredentialHelperError):
        get_credentials("list", "r.io", env=env_for(bindir))
    with pytest.raises(CredentialHelperError):
        get_credentials("num", "r.io", env=env_for(bindir))


def test_missing_helper(bindir: Path) -> None:
    with pytest.raises(CredentialHelperError, match="not found"):
        get_credentials("absent", "r.io", env=env_for(bindir))


def test_timeout_kills_helper_and_its_children(bindir: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    make_helper(
        bindir,
        "slow",
        "import subprocess\n"
        "c = subprocess.Popen(['sleep', '30'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(30)\n",
    )
    start = time.monotonic()
    with pytest.raises(CredentialHelperError, match="timed out"):
        get_credentials("slow", "r.io", timeout=1.0, env=env_for(bindir))
    assert time.monotonic() - start < 10
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # a killed but unreaped child of the (dead) helper is reparented and reaped by init
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the helper's child survived the timeout")


@pytest.mark.parametrize("name", ["../x", "a/b", "", "-x", "a b"])
def test_invalid_helper_names(name: str) -> None:
    with pytest.raises(CredentialHelperError):
        helper_program(name)


def test_server_passed_on_stdin_exactly(bindir: Path) -> None:
    make_helper(
        bindir,
        "echo",
        "print(json.dumps({'Username': repr(server), 'Secret': 'x'}))\n",
    )
    creds = get_credentials("echo", "localhost:5000", env=env_for(bindir))
    assert creds is not None and creds.username == repr("localhost:5000")
