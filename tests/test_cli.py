"""The ``stargz-store`` command line: --version, help, the subcommand table, typos refused
without side effects, and the daemon started both ways (``serve`` and the Go store's form)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stargz_store import cli, cmdline, daemon
from tests import fuse_util as fu

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
ok, why = fu.fuse_available()
needs_fuse = pytest.mark.skipif(not ok, reason=why)
pytestmark = [pytest.mark.timeout(120)]


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(daemon.PROVIDER_FACTORY_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "stargz_store", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pyproject_version() -> str:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(version, str)
    return version


def mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [fu._unescape(line.split()[4]) for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


# --- version and help ---------------------------------------------------------------------------


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"stargz-store {pyproject_version()}\n"
    assert out.stderr == ""
    # from a source tree without installed metadata, pyproject.toml is read
    assert cmdline._pyproject_version() == pyproject_version()
    assert cmdline._pyproject_version(REPO / "no-such-pyproject.toml") is None


def test_version_after_daemon_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--root", "/nonexistent/r", "--version"]) == 0
    assert capsys.readouterr().out == f"stargz-store {cmdline.version()}\n"
    assert not Path("/nonexistent/r").exists()


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["help"], ["--help"], ["-h"], ["help", "help"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        for name, command in cli.COMMANDS.items():
            assert f"  {name} " in out and command.summary in out, (argv, name)
        assert "MOUNTPOINT" in out and "--version" in out
    # help COMMAND is the command's own --help
    assert cli.main(["help", "convert"]) == 0
    out = capsys.readouterr().out
    assert "usage: stargz-store convert" in out and "--src-tls-verify" in out
    assert cli.main(["help", "serve"]) == 0
    out = capsys.readouterr().out
    assert "usage: stargz-store serve" in out and "--root DIR" in out


def test_help_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help", "conver"]) == 2
    assert "no command 'conver'; did you mean 'convert'?" in capsys.readouterr().err
    assert cli.main(["help", "a", "b"]) == 2
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "usage: stargz-store COMMAND" in err


def test_every_registered_command_loads() -> None:
    assert list(cli.COMMANDS) == [
        "serve", "convert", "status", "cache", "optimize", "profiles", "help"
    ]  # fmt: skip
    for command in cli.COMMANDS.values():
        assert callable(command.load()), command.name


# --- typos: an error with a hint, and nothing created or mounted --------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hepl"], "'hepl' is not a command or an existing directory; did you mean 'help'?"),
        (["covnert", "a", "b"], "'covnert' is not a command or an existing directory; did you "
         "mean 'convert'?"),
        (["--root", "ROOT", "serv"], "'serv' is not a command or an existing directory; did you "
         "mean 'serve'?"),
        (["frobnicate"], "'frobnicate' is not a command or an existing directory (commands: "
         "serve, convert, status, cache, optimize, profiles, help; to mount on a new directory "
         "write a path, "
         "e.g. ./frobnicate"),
        (["--root", "ROOT", "convert"], "commands come first: stargz-store convert"),
    ],
)  # fmt: skip
def test_typo_is_an_error_without_side_effects(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    root = tmp_path / "root"
    argv = [str(root) if a == "ROOT" else a for a in argv]
    out = run_cli(*argv, cwd=work)
    assert out.returncode == 2, (out.stdout, out.stderr)
    if message.endswith("?"):  # the whole answer is that one line
        assert out.stderr == f"stargz-store: {message}\n"
    assert f"stargz-store: {message}" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert list(work.iterdir()) == []  # no ./hepl
    assert not root.exists()  # no --root created
    assert mounts_below(tmp_path) == []


# --- the daemon, both ways ----------------------------------------------------------------------


class Served:
    """The daemon as a subprocess with a notify socket and the in-memory test provider."""

    def __init__(self, tmp: Path, args: list[str], cwd: Path) -> None:
        self.log = tmp / "daemon.log"
        self.notify_path = tmp / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONPATH=str(REPO))
        env[daemon.PROVIDER_FACTORY_ENV] = "tests.fuse_util:fake_provider_factory"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stargz_store", *args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )

    def wait_for(self, message: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        got: list[str] = []
        while message not in got:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {message}: {got}; log:\n{self.log.read_text()}")
            self.sock.settimeout(0.2)
            with contextlib.suppress(socket.timeout):
                got.extend(self.sock.recv(4096).decode().splitlines())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sock.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[tuple[Served, Path]]]:
    started: list[tuple[Served, Path]] = []
    yield started
    for s, mountpoint in started:
        s.close()
        fu.force_unmount(mountpoint)


@pytest.mark.fuse
@needs_fuse
@pytest.mark.parametrize("form", ["serve", "go-style", "go-style-bare-dir"])
def test_daemon_starts_both_ways(
    tmp_path: Path, served: list[tuple[Served, Path]], form: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    root = tmp_path / "root"
    opts = ["--config", str(config), "--root", str(root)]
    if form == "serve":
        mountpoint = tmp_path / "new" / "mnt"  # created, as before
        args = ["serve", *opts, str(mountpoint)]
    elif form == "go-style":
        mountpoint = tmp_path / "mnt"
        args = [*opts, str(mountpoint)]
    else:  # a bare word is fine when it is an existing directory
        mountpoint = tmp_path / "store"
        mountpoint.mkdir()
        args = [*opts, "store"]
    s = Served(tmp_path, args, cwd=tmp_path)
    served.append((s, mountpoint))
    s.wait_for("READY=1")
    assert fu.is_mounted(mountpoint)
    layer = fu.FakeLayer(fu.sample_tree())
    sample = mountpoint / fu.b64(fu.REF) / layer.compressed_digest / "diff" / "etc" / "hostname"
    assert fu.run_with_timeout(sample.read_bytes, 10) == b"sample\n"
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    fu.wait_unmounted(mountpoint)
    events = s.log.read_text()
    assert '"event": "layer_resolved"' in events and '"event": "unmounted"' in events


def test_serve_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve"]) == 2
    assert "stargz-store serve: the following arguments are required: MOUNTPOINT" in (
        capsys.readouterr().err
    )
    assert cli.main(["serve", "--log-level", "loud", str(tmp_path / "m")]) == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    assert cli.main(["--bogus", str(tmp_path / "m")]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
