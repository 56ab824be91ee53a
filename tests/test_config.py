"""Config loading, the example file, logging set-up and sd_notify."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

from stargz_store import config as cfg
from stargz_store import log as slog
from stargz_store import notify

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"


def test_example_parses_and_equals_defaults() -> None:
    loaded = cfg.load_config(EXAMPLE)
    assert loaded == cfg.Config()


def test_example_documents_every_field() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    paths = cfg.field_paths()
    assert len(paths) > 20
    for path in paths:
        section, key = path.split(".")
        assert section in doc, f"[{section}] missing from config.example.toml"
        assert key in doc[section], f"{path} missing from config.example.toml"
    # ...and every key in the example is a real field (parse would refuse it otherwise).
    text = EXAMPLE.read_text()
    for path in paths:
        key = path.split(".")[1]
        # each key is preceded by a comment line somewhere in its section
        assert re.search(rf"^{key} = ", text, re.M), key


def test_missing_default_file_is_fine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", tmp_path / "nope.toml")
    assert cfg.load_config(None) == cfg.Config()


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match=r"nope\.toml: configuration file not found"):
        cfg.load_config(tmp_path / "nope.toml")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[fetch]\nconcurency = 4\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load_config(f)
    msg = str(info.value)
    assert str(f) in msg
    assert "unknown key 'fetch.concurency'" in msg


def test_unknown_section_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[regsitry]\nretries = 1\n")
    with pytest.raises(cfg.ConfigError, match=r"unknown key 'regsitry'"):
        cfg.load_config(f)


def test_wrong_type_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[registry]\nretries = "many"\n[log]\nlevel = "loud"\n')
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load_config(f)
    msg = str(info.value)
    assert "registry.retries" in msg and "'many'" in msg
    assert "log.level" in msg


def test_bad_toml(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[registry\n")
    with pytest.raises(cfg.ConfigError, match="invalid TOML"):
        cfg.load_config(f)


def test_values_override_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[fuse]\nentry_timeout = 5\n[registry]\ninsecure_registries = ["a:5000"]\n')
    c = cfg.load_config(f)
    assert c.fuse.entry_timeout == 5.0
    assert c.registry.insecure_registries == ["a:5000"]
    assert c.fetch == cfg.FetchSettings()


def test_json_logging_has_event_and_fields() -> None:
    buf = io.StringIO()
    slog.configure_logging("info", "auto", stream=buf)  # StringIO is not a TTY -> JSON
    slog.get_logger("t").info("layer_resolved", ref="r", n=3)
    logging.getLogger("other").warning("plain %s", "x")
    slog.get_logger("t").debug("hidden_event")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["event"] == "layer_resolved"
    assert lines[0]["ref"] == "r" and lines[0]["n"] == 3 and lines[0]["level"] == "info"
    assert lines[1]["event"] == "plain x"
    assert len(lines) == 2


def test_console_logging() -> None:
    buf = io.StringIO()
    slog.configure_logging("debug", "console", stream=buf)
    slog.get_logger("t").debug("hello_there", a=1)
    assert "hello_there" in buf.getvalue() and "a=1" in buf.getvalue()
    with pytest.raises(ValueError):
        slog.configure_logging("loud")


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(tmp_path: Path, abstract: bool) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"@stargz-store-test-{os.getpid()}"
        sock.bind(b"\0" + name[1:].encode())
    else:
        name = str(tmp_path / "notify.sock")
        sock.bind(name)
    sock.settimeout(2)
    with sock:
        assert notify.sd_notify("READY=1", {"NOTIFY_SOCKET": name})
        assert sock.recv(100) == b"READY=1"
    assert not notify.sd_notify("READY=1", {})
    assert not notify.sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
