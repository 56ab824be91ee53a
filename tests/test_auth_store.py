"""CredentialStore (auth.store): helper-channel credentials, the file chain, reloads."""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path

import pytest
import structlog
import structlog.testing

from auth.authfile import AuthEnvironment
from auth.errors import AuthFileError, CredentialHelperError, HelperChannelError
from auth.store import CredentialStore, parse_helper_payload, split_reference
from auth.types import Credentials


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def write_auth(path: Path, auths: dict[str, str], **extra: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, object] = {"auths": {k: {"auth": b64(v)} for k, v in auths.items()}}
    doc.update(extra)
    path.write_text(json.dumps(doc))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def env(home: Path, tmp_path: Path) -> AuthEnvironment:
    run = tmp_path / "run"
    run.mkdir()
    return AuthEnvironment(env={"XDG_RUNTIME_DIR": str(run)}, uid=0, home=str(home))


def make_store(env: AuthEnvironment, **kw: object) -> CredentialStore:
    return CredentialStore(env, **kw)  # type: ignore[arg-type]


# --- references -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("quay.io/ns/img:1.0", ("quay.io", "ns/img")),
        ("quay.io/ns/img", ("quay.io", "ns/img")),
        ("localhost:5000/img@sha256:" + "a" * 64, ("localhost:5000", "img")),
        ("r.io:443/a/b:t@sha256:" + "b" * 64, ("r.io:443", "a/b")),
        ("docker.io/library/busybox:latest", ("docker.io", "library/busybox")),
        ("registry-1.docker.io/library/busybox", ("docker.io", "library/busybox")),
        ("Quay.IO/ns/img", ("quay.io", "ns/img")),
        ("[::1]:5000/img:t", ("[::1]:5000", "img")),
    ],
)
def test_split_reference(ref: str, expected: tuple[str, str]) -> None:
    assert split_reference(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "busybox",
        "library/busybox:latest",
        "quay.io",
        "quay.io/",
        "quay.io/UPPER",
        "r.io/a@sha256:x",
    ],
)
def test_split_reference_refuses(ref: str) -> None:
    with pytest.raises(ValueError):
        split_reference(ref)


def test_parse_helper_payload_shapes() -> None:
    out = parse_helper_payload(
        {
            "quay.io/ns/img:1": {"username": "u", "password": "p"},
            "r.io/x:1": {},  # anonymous pull: nothing to keep
            "t.io/y:1": {"identityToken": "tok", "extra": 1},
        }
    )
    assert out == [
        ("quay.io", "ns/img", Credentials("u", "p")),
        ("t.io", "y", Credentials(identity_token="tok")),
    ]
    for bad in (
        {"quay.io/ns/img": "x"},
        {"quay.io/ns/img": {"username": 1}},
        {"nothost/img": {"username": "u"}},
    ):
        with pytest.raises(HelperChannelError):
            parse_helper_payload(bad)
    with pytest.raises(HelperChannelError) as ei:
        parse_helper_payload({"quay.io/ns/img": {"username": "u", "password": ["SECRET"]}})
    assert "SECRET" not in str(ei.value)


# --- helper-channel credentials ---------------------------------------------------------------
def test_helper_credentials_exact_host_only(env: AuthEnvironment) -> None:
    store = make_store(env)
    n = store.add_helper_credentials({"quay.io/ns/img:1.0": {"username": "u", "password": "p"}})
    assert n == 1
    assert store.lookup("quay.io", "ns/img") == Credentials("u", "p")
    assert store.lookup("quay.io", "ns/other") == Credentials("u", "p")  # same host
    assert store.lookup("mirror.quay.io", "ns/img") is None
    assert store.lookup("quay.io.evil.com", "ns/img") is None
    assert store.lookup("quay.io:5000", "ns/img") is None
    assert store.lookup("evil.com", "quay.io/ns/img") is None


def test_helper_credentials_by_repository_then_latest_for_host(env: AuthEnvironment) -> None:
    store = make_store(env)
    store.add_helper_credentials({"r.io/a/one:1": {"username": "one", "password": "1"}})
    store.add_helper_credentials({"r.io/a/two:1": {"username": "two", "password": "2"}})
    assert store.lookup("r.io", "a/one") == Credentials("one", "1")
    assert store.lookup("r.io", "a/two") == Credentials("two", "2")
    assert store.lookup("r.io", "a/three") == Credentials("two", "2")


def test_helper_credentials_before_files(env: AuthEnvironment, home: Path) -> None:
    write_auth(home / ".docker" / "config.json", {"r.io": "file:f"})
    store = make_store(env)
    assert store.lookup("r.io", "x") == Credentials("file", "f")
    store.add_helper_credentials({"r.io/x:1": {"username": "h", "password": "p"}})
    assert store.lookup("r.io", "x") == Credentials("h", "p")
    store.clear_helper_credentials()
    assert store.lookup("r.io", "x") == Credentials("file", "f")


def test_helper_docker_io_aliases_are_one_host(env: AuthEnvironment) -> None:
    store = make_store(env)
    store.add_helper_credentials({"docker.io/library/busybox:latest": {"username": "d"}})
    assert store.lookup("registry-1.docker.io", "library/busybox") == Credentials("d")
    assert store.lookup("docker.io", "library/busybox") == Credentials("d")


def test_malformed_payload_stores_nothing(env: AuthEnvironment) -> None:
    store = make_store(env)
    with pytest.raises(HelperChannelError):
        store.add_helper_credentials({"r.io/a:1": {"username": "u"}, "bad ref": {"username": "v"}})
    assert store.lookup("r.io", "a") is None


def test_credentials_added_callbacks(env: AuthEnvironment) -> None:
    """Each subscriber hears of every (host, repository) that got credentials, once per
    delivery, after they are stored; a failing subscriber is logged and changes nothing."""
    store = make_store(env)
    heard: list[tuple[str, str, Credentials | None]] = []

    def broken(host: str, repository: str) -> None:
        raise RuntimeError("subscriber bug")

    store.on_credentials_added(broken)
    store.on_credentials_added(lambda h, r: heard.append((h, r, store.lookup(h, r))))
    payload = {
        "R.io/a/b:1": {"username": "u", "password": "p"},
        f"r.io/a/b@sha256:{'0' * 64}": {"username": "u", "password": "p"},
        "index.docker.io/library/busybox:1": {"identityToken": "t"},
        "r.io/anonymous:1": {},
    }
    with structlog.testing.capture_logs() as logs:
        assert store.add_helper_credentials(payload) == 3
    assert heard == [
        ("r.io", "a/b", Credentials("u", "p")),
        ("docker.io", "library/busybox", Credentials(identity_token="t")),
    ]
    failed = [e for e in logs if e["event"] == "credentials_added_callback_failed"]
    assert len(failed) == 2 and "subscriber bug" in failed[0]["error"]
    with pytest.raises(HelperChannelError):
        store.add_helper_credentials({"bad ref": {"username": "v"}})
    assert len(heard) == 2


def test_helper_entries_bounded(env: AuthEnvironment) -> None:
    store = make_store(env, max_helper_entries=4)
    for i in range(10):
        store.add_helper_credentials({f"h{i}.io/x:1": {"username": f"u{i}"}})
    assert store.lookup("h0.io", "x") is None
    assert store.lookup("h9.io", "x") == Credentials("u9")


# --- the file chain ---------------------------------------------------------------------------
def test_chain_order(env: AuthEnvironment, home: Path, tmp_path: Path) -> None:
    run_file = tmp_path / "run" / "containers" / "auth.json"
    legacy = home / ".dockercfg"
    legacy.write_text(json.dumps({"legacy.io": {"auth": b64("leg:l")}}))
    write_auth(home / ".docker" / "config.json", {"r.io": "docker:d", "d.io": "docker:d"})
    write_auth(home / ".config" / "containers" / "auth.json", {"r.io": "xdg:x"})
    store = make_store(env)
    assert store.lookup("r.io", "a") == Credentials("xdg", "x")
    assert store.lookup("d.io", "a") == Credentials("docker", "d")
    assert store.lookup("legacy.io", "a/b") == Credentials("leg", "l")
    write_auth(run_file, {"r.io/a": "run:r"})
    assert store.lookup("r.io", "a") == Credentials("run", "r")
    assert store.lookup("r.io", "b") == Credentials("xdg", "x")


def test_registry_auth_file_replaces_chain(home: Path, tmp_path: Path) -> None:
    write_auth(home / ".docker" / "config.json", {"r.io": "docker:d"})
    only = tmp_path / "only.json"
    write_auth(only, {"o.io": "o:o"})
    store = make_store(AuthEnvironment(env={"REGISTRY_AUTH_FILE": str(only)}, home=str(home)))
    assert store.lookup("o.io", "x") == Credentials("o", "o")
    assert store.lookup("r.io", "x") is None


def test_extra_files_searched_last(env: AuthEnvironment, home: Path, tmp_path: Path) -> None:
    kubelet = tmp_path / "kubelet" / "config.json"
    write_auth(kubelet, {"k.io": "kube:k", "r.io": "kube:k"})
    write_auth(home / ".docker" / "config.json", {"r.io": "docker:d"})
    store = make_store(env, extra_files=[kubelet])
    assert store.lookup("k.io", "x") == Credentials("kube", "k")
    assert store.lookup("r.io", "x") == Credentials("docker", "d")


def test_reload_on_change(env: AuthEnvironment, home: Path) -> None:
    path = home / ".docker" / "config.json"
    store = make_store(env)
    assert store.lookup("r.io", "x") is None
    write_auth(path, {"r.io": "one:1"})
    assert store.lookup("r.io", "x") == Credentials("one", "1")
    write_auth(path, {"r.io": "two:22"})
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert store.lookup("r.io", "x") == Credentials("two", "22")
    path.unlink()
    assert store.lookup("r.io", "x") is None


def _warnings(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e["log_level"] in ("warning", "error")]


def test_malformed_file_skipped_and_logged_without_content(
    env: AuthEnvironment, home: Path
) -> None:
    bad = home / ".config" / "containers" / "auth.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"auths": {"r.io": {"auth": "TOPSECRET"}} garbage')
    write_auth(home / ".docker" / "config.json", {"r.io": "docker:d"})
    store = make_store(env)
    with structlog.testing.capture_logs() as events:
        assert store.lookup("r.io", "x") == Credentials("docker", "d")
        assert store.lookup("r.io", "x") == Credentials("docker", "d")
    errors = store.errors()
    assert len(errors) == 1 and isinstance(errors[0], AuthFileError)
    assert str(bad) in str(errors[0])
    assert "TOPSECRET" not in repr(events)
    warned = _warnings(events)
    assert [e["event"] for e in warned] == ["credential_lookup_failed"]
    assert "auth.json" in str(warned[0]["error"])


def test_cred_helper_from_file(env: AuthEnvironment, home: Path) -> None:
    calls: list[tuple[str, str]] = []

    def runner(name: str, server: str) -> Credentials | None:
        calls.append((name, server))
        if name == "broken":
            raise CredentialHelperError("helper failed")
        return Credentials("helper", "h")

    write_auth(
        home / ".config" / "containers" / "auth.json",
        {},
        credHelpers={"h.io": "pass", "b.io": "broken"},
    )
    write_auth(home / ".docker" / "config.json", {"b.io": "docker:d"})
    store = make_store(env, helper_runner=runner)
    assert store.lookup("h.io", "x/y") == Credentials("helper", "h")
    # a failing helper is recorded and the search continues in the next file
    assert store.lookup("b.io", "x") == Credentials("docker", "d")
    assert calls == [("pass", "h.io"), ("broken", "b.io")]
    assert any(isinstance(e, CredentialHelperError) for e in store.errors())


def test_docker_hub_legacy_key(env: AuthEnvironment, home: Path) -> None:
    write_auth(home / ".docker" / "config.json", {"https://index.docker.io/v1/": "hub:h"})
    store = make_store(env)
    assert store.lookup("registry-1.docker.io", "library/busybox") == Credentials("hub", "h")
    assert store.lookup("docker.io", "library/busybox") == Credentials("hub", "h")


def test_thread_safety(env: AuthEnvironment, home: Path) -> None:
    write_auth(home / ".docker" / "config.json", {"r.io": "docker:d"})
    store = make_store(env)
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(200):
                store.add_helper_credentials({f"h{i}.io/x:{j}": {"username": f"u{i}"}})
                assert store.lookup(f"h{i}.io", "x") == Credentials(f"u{i}")
                assert store.lookup("r.io", "x") == Credentials("docker", "d")
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_cred_helper_answers_cached(env: AuthEnvironment, home: Path) -> None:
    calls: list[str] = []

    def runner(name: str, server: str) -> Credentials | None:
        calls.append(server)
        if server == "bad.io":
            raise CredentialHelperError("helper failed")
        return Credentials("helper", "h") if server == "h.io" else None

    write_auth(
        home / ".config" / "containers" / "auth.json",
        {},
        credHelpers={"h.io": "pass", "n.io": "pass", "bad.io": "pass"},
    )
    store = make_store(env, helper_runner=runner)
    for _ in range(3):
        assert store.lookup("h.io", "x") == Credentials("helper", "h")
        assert store.lookup("n.io", "x") is None
        assert store.lookup("bad.io", "x") is None
    assert calls == ["h.io", "n.io", "bad.io"]
    assert len(store.errors()) == 1
    uncached = make_store(env, helper_runner=runner, helper_cache_ttl=0)
    uncached.lookup("h.io", "x")
    uncached.lookup("h.io", "x")
    assert calls.count("h.io") == 3


def test_bad_entry_logged_once(env: AuthEnvironment, home: Path) -> None:
    path = home / ".docker" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"auths": {"r.io": {"auth": "%%%notbase64"}}}))
    store = make_store(env)
    with structlog.testing.capture_logs() as events:
        for _ in range(5):
            assert store.lookup("r.io", "x") is None
    assert len(_warnings(events)) == 1
    assert "notbase64" not in repr(events)


def test_global_credential_helpers_order(env: AuthEnvironment, home: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def runner(name: str, server: str) -> Credentials | None:
        calls.append((name, server))
        return Credentials("global", "g") if server == "g.io" else None

    write_auth(home / ".docker" / "config.json", {"g.io": "file:f", "f.io": "file:f"})
    kubelet = tmp_path / "kubelet.json"
    write_auth(kubelet, {"k.io": "kube:k"})
    first = make_store(
        env,
        helper_runner=runner,
        credential_helpers=["secretservice", "containers-auth.json"],
        extra_files=[kubelet],
    )
    assert first.lookup("g.io", "x") == Credentials("global", "g")
    assert first.lookup("f.io", "x") == Credentials("file", "f")
    assert first.lookup("k.io", "x") == Credentials("kube", "k")
    assert calls[:2] == [("secretservice", "g.io"), ("secretservice", "f.io")]
    # without containers-auth.json in the list, the auth files are not read (extras still are)
    only = make_store(
        env, helper_runner=runner, credential_helpers=lambda: ["pass"], extra_files=[kubelet]
    )
    assert only.lookup("f.io", "x") is None
    assert only.lookup("k.io", "x") == Credentials("kube", "k")
    # an empty list means the default
    default = make_store(env, helper_runner=runner, credential_helpers=[])
    assert default.lookup("g.io", "x") == Credentials("file", "f")
