"""containers-auth.json(5) chain and per-file lookup (auth.authfile)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from auth.authfile import (
    AuthEnvironment,
    AuthPath,
    auth_file_paths,
    canonical_host,
    find_in_file,
    lookup_keys,
    normalize_auth_key,
    parse_auth_file,
    read_auth_file,
)
from auth.errors import AuthFileError
from auth.types import Credentials


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def find(doc: object, host: str, repo: str, legacy: bool = False) -> Credentials | None:
    f = parse_auth_file(Path("/x/auth.json"), json.dumps(doc).encode(), legacy=legacy)
    return find_in_file(f, canonical_host(host), repo, helper_runner=_no_helper)


def _no_helper(name: str, server: str) -> Credentials | None:
    raise AssertionError(f"helper {name} must not run for {server}")


# --- the chain ---------------------------------------------------------------------------------
def paths(env: dict[str, str], uid: int = 0, home: str = "/home/u") -> list[tuple[str, bool]]:
    e = AuthEnvironment(env=env, uid=uid, home=home)
    return [(str(p.path), p.legacy) for p in auth_file_paths(e)]


def test_chain_root_without_xdg_runtime_dir() -> None:
    assert paths({}, uid=0, home="/root") == [
        ("/run/containers/0/auth.json", False),
        ("/root/.config/containers/auth.json", False),
        ("/root/.docker/config.json", False),
        ("/root/.dockercfg", True),
    ]


def test_chain_non_root_without_xdg_runtime_dir_uses_uid() -> None:
    assert paths({}, uid=1000)[0] == ("/run/containers/1000/auth.json", False)


def test_chain_with_xdg_dirs_and_docker_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    env = {
        "XDG_RUNTIME_DIR": str(run),
        "XDG_CONFIG_HOME": "/cfg",
        "DOCKER_CONFIG": "/dk",
    }
    assert paths(env) == [
        (f"{run}/containers/auth.json", False),
        ("/cfg/containers/auth.json", False),
        ("/dk/config.json", False),
        ("/home/u/.dockercfg", True),
    ]


def test_chain_skips_missing_xdg_runtime_dir(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "missing")}
    assert paths(env)[0] == ("/home/u/.config/containers/auth.json", False)


def test_registry_auth_file_replaces_chain_but_extra_files_follow() -> None:
    e = AuthEnvironment(
        env={"REGISTRY_AUTH_FILE": "/a/auth.json", "DOCKER_CONFIG": "/dk"},
        home="/home/u",
        extra_files=(Path("/var/lib/kubelet/config.json"),),
    )
    assert [(str(p.path), p.legacy) for p in auth_file_paths(e)] == [
        ("/a/auth.json", False),
        ("/var/lib/kubelet/config.json", False),
    ]


def test_extra_files_after_chain() -> None:
    e = AuthEnvironment(env={}, home="/h", extra_files=(Path("/extra.json"),))
    assert [str(p.path) for p in auth_file_paths(e)][-2:] == ["/h/.dockercfg", "/extra.json"]


def test_from_os_reads_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/some/home")
    e = AuthEnvironment.from_os(["/e.json"])
    assert e.home == "/some/home"
    assert e.extra_files == (Path("/e.json"),)


# --- lookup within a file ------------------------------------------------------------------------
def test_lookup_keys_order() -> None:
    assert lookup_keys("quay.io", "ns/sub/img", False) == [
        "quay.io/ns/sub/img",
        "quay.io/ns/sub",
        "quay.io/ns",
        "quay.io",
    ]
    assert lookup_keys("quay.io", "ns/img", True) == ["quay.io"]


def test_most_specific_key_wins() -> None:
    doc = {
        "auths": {
            "quay.io": {"auth": b64("host:h")},
            "quay.io/ns": {"auth": b64("ns:n")},
            "quay.io/ns/img": {"auth": b64("repo:r")},
        }
    }
    assert find(doc, "quay.io", "ns/img") == Credentials("repo", "r")
    assert find(doc, "quay.io", "ns/other") == Credentials("ns", "n")
    assert find(doc, "quay.io", "other/img") == Credentials("host", "h")
    assert find(doc, "example.com", "ns/img") is None


def test_prefix_keys_match_whole_components_only() -> None:
    doc = {"auths": {"quay.io/ns": {"auth": b64("ns:n")}}}
    assert find(doc, "quay.io", "nsx/img") is None


def test_password_split_on_first_colon_and_nul_trimmed() -> None:
    doc = {"auths": {"r.io": {"auth": b64("user:pa:ss\x00")}}}
    assert find(doc, "r.io", "a") == Credentials("user", "pa:ss")


def test_identity_token() -> None:
    doc = {"auths": {"r.io": {"auth": b64("<token>:"), "identitytoken": "refresh"}}}
    creds = find(doc, "r.io", "a")
    assert creds is not None
    assert creds.identity_token == "refresh"
    assert "refresh" not in repr(creds)


def test_empty_entry_stops_search_in_file() -> None:
    # Docker writes {} entries next to credHelpers; the found key ends the file's search.
    doc = {"auths": {"r.io/ns": {}, "r.io": {"auth": b64("u:p")}}}
    assert find(doc, "r.io", "ns/img") is None


def test_auth_without_colon_yields_nothing() -> None:
    doc = {"auths": {"r.io": {"auth": b64("nocolon")}}}
    assert find(doc, "r.io", "a") is None


def test_bad_base64_is_an_error_without_the_value() -> None:
    doc = {"auths": {"r.io": {"auth": "!!!secretvalue!!!"}}}
    with pytest.raises(AuthFileError) as ei:
        find(doc, "r.io", "a")
    assert "secretvalue" not in str(ei.value)


@pytest.mark.parametrize(
    "key",
    [
        "https://index.docker.io/v1/",
        "index.docker.io",
        "registry-1.docker.io",
        "docker.io",
        "http://registry-1.docker.io/v2/",
    ],
)
@pytest.mark.parametrize("host", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_docker_io_aliases(key: str, host: str) -> None:
    doc = {"auths": {key: {"auth": b64("d:p")}}}
    assert find(doc, host, "library/busybox") == Credentials("d", "p")


def test_docker_io_namespaced_key() -> None:
    doc = {
        "auths": {"docker.io/library": {"auth": b64("lib:p")}, "docker.io": {"auth": b64("a:b")}}
    }
    assert find(doc, "registry-1.docker.io", "library/busybox") == Credentials("lib", "p")


def test_url_keys_normalised_for_other_hosts() -> None:
    doc = {"auths": {"https://r.example.com:5000/v2/": {"auth": b64("u:p")}}}
    assert find(doc, "r.example.com:5000", "a/b") == Credentials("u", "p")
    # a path on a non-URL key is not cut off: it is a namespace key
    doc2 = {"auths": {"r.example.com/other": {"auth": b64("u:p")}}}
    assert find(doc2, "r.example.com", "a/b") is None


def test_normalize_auth_key() -> None:
    assert normalize_auth_key("https://index.docker.io/v1/", False) == "index.docker.io"
    assert normalize_auth_key("quay.io/ns", False) == "quay.io/ns"
    assert normalize_auth_key("quay.io/ns", True) == "quay.io"


def test_legacy_format_top_level_map() -> None:
    doc = {"https://index.docker.io/v1/": {"auth": b64("old:pw")}, "r.io": {"auth": b64("r:s")}}
    assert find(doc, "docker.io", "library/x", legacy=True) == Credentials("old", "pw")
    assert find(doc, "r.io", "ns/x", legacy=True) == Credentials("r", "s")


def test_cred_helpers_first() -> None:
    seen: list[tuple[str, str]] = []

    def runner(name: str, server: str) -> Credentials | None:
        seen.append((name, server))
        return Credentials("from-helper", "x")

    doc = {"credHelpers": {"r.io": "secretservice"}, "auths": {"r.io/ns/img": {"auth": b64("u:p")}}}
    f = parse_auth_file(Path("/a"), json.dumps(doc).encode())
    assert find_in_file(f, "r.io", "ns/img", runner) == Credentials("from-helper", "x")
    assert seen == [("secretservice", "r.io")]
    # a helper answering "not found" ends the search in this file
    assert find_in_file(f, "r.io", "ns/img", lambda n, s: None) is None


# --- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"auths": []}',
        b'{"auths": {"r.io": "str"}}',
        b'{"auths": {"r.io": {"auth": 1}}}',
        b'{"credHelpers": {"r.io": 1}}',
        b'{"credHelpers": []}',
    ],
)
def test_malformed_files(data: bytes) -> None:
    with pytest.raises(AuthFileError):
        parse_auth_file(Path("/a"), data)


def test_malformed_error_does_not_quote_content() -> None:
    with pytest.raises(AuthFileError) as ei:
        parse_auth_file(Path("/a"), b'{"auths": {"r.io": {"auth": "c2VjcmV0"}}, oops}')
    assert "c2VjcmV0" not in str(ei.value)


def test_unknown_keys_and_nulls_tolerated() -> None:
    f = parse_auth_file(
        Path("/a"), b'{"auths": null, "credHelpers": null, "credsStore": "x", "HttpHeaders": {}}'
    )
    assert dict(f.auths) == {}
    assert dict(f.cred_helpers) == {}


def test_read_auth_file_missing_and_present(tmp_path: Path) -> None:
    assert read_auth_file(AuthPath(tmp_path / "none.json")) is None
    assert read_auth_file(AuthPath(tmp_path / "nodir" / "x.json")) is None
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"auths": {"r.io": {"auth": b64("u:p")}}}))
    f = read_auth_file(AuthPath(p))
    assert f is not None and "r.io" in f.auths


def test_canonical_host() -> None:
    assert canonical_host("Registry-1.Docker.IO") == "docker.io"
    assert canonical_host("Quay.io") == "quay.io"
