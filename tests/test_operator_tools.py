"""The operator's tools against a real daemon (real wiring, real FUSE mount) and a real
``docker-registry``: ``stargz-store status``, ``stargz-store cache prune|clear`` with and
without a daemon, the Prometheus endpoint over TCP and over a Unix socket, registries.conf's
``credential-helpers`` and its reload without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import http.client
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from layerstore.runtime.manager import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from testbed import StoreDaemon, mounts_below, remove_tree
from tests import fuse_util as fu
from tests import secret_guard
from tests.estargz_util import build_blob
from tests.pack_util import cached_bytes, pack_files
from tests.registry_fixtures import (  # noqa: F401 - fixtures
    PushedImage,
    RegistryHandle,
    free_port,
    gzip_tar,
    registry,
    registry_binary,
    registry_htpasswd,
)

ok, why = fu.fuse_available()
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.registry,
    pytest.mark.skipif(not ok, reason=why),
    pytest.mark.skipif(registry_binary() is None, reason="no docker-registry binary"),
    pytest.mark.timeout(180),
]

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
WRONG = "Wrong-Password-0c41e7"
secret_guard.register(WRONG, "wrong password")

# The status document's fields: a field removed or renamed fails here (adding one means
# adding it here too, which is allowed within schema 1).
TOP_KEYS = {
    "schema", "daemon", "images", "layers", "cache", "fetch", "lookups", "in_flight", "fuse",
    "errors",
}  # fmt: skip
LAYER_KEYS = {
    "digest", "toc_digest", "schemes", "keys", "users", "blob_size", "bytes_fetched", "requests",
    "chunks", "chunks_fetched", "verification_failures", "chunks_in_flight",
    "background_fill_running", "idle_seconds",
}  # fmt: skip
IMAGE_KEYS = {"ref", "manifest_digest", "layers", "users"}
CACHE_KEYS = {
    "dir", "entries", "bytes", "max_bytes", "hits", "misses", "hit_rate", "evicted",
    "removed_by_operator", "toc_entries", "toc_bytes",
}  # fmt: skip
MECHANISMS = {
    "foreground", "read_ahead", "landmark_prefetch", "dependency_prefetch", "dependency_fetch",
    "profile_prefetch", "background_fill",
}  # fmt: skip


# --- an eStargz image on the registry -------------------------------------------------------------


@dataclass
class Image:
    host: str
    repo: str
    pushed: PushedImage
    toc_digests: list[str]
    files: list[dict[str, bytes]]

    def ref(self, tag: str = "v1") -> str:
        return f"{self.host}/{self.repo}:{tag}"

    def tag(self, h: RegistryHandle, tag: str) -> str:
        """The same manifest under another tag: a reference no cache has seen."""
        h.push_manifest(self.repo, tag, self.pushed.manifest, self.pushed.media_type)
        return self.ref(tag)


def push_estargz(h: RegistryHandle, repo: str, seed: int) -> Image:
    rnd = random.Random(seed)
    layers = [
        build_blob(
            [("etc/motd", b"hello from the store\n"), ("data/big", rnd.randbytes(256 * 1024))],
            chunk_size=16 * 1024,
        ),
        build_blob([("bin/tool", rnd.randbytes(40 * 1024))], chunk_size=8 * 1024),
    ]
    annotations = [
        {
            TOC_DIGEST_ANNOTATION: b.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(len(gzip.decompress(b.blob))),
        }
        for b in layers
    ]
    pushed = h.push_image(repo, "v1", [b.blob for b in layers], layer_annotations=annotations)
    return Image(h.host, repo, pushed, [b.toc_digest for b in layers], [b.files for b in layers])


@pytest.fixture(scope="module")
def image(registry: RegistryHandle) -> Image:  # noqa: F811
    return push_estargz(registry, "ops/app", seed=7)


# --- the daemon -----------------------------------------------------------------------------------


def config_text(workdir: Path, hosts: list[str], **sections: dict[str, Any]) -> str:
    base: dict[str, dict[str, Any]] = {
        "registry": {
            "registries_conf": str(workdir / "registries.conf"),
            "registries_conf_d": str(workdir / "registries.conf.d"),
            "insecure_registries": hosts,
            "registries_conf_check_seconds": 0.2,
            "retries": 0,
            "resolve_ttl": 3600.0,
        },
        "auth": {"extra_auth_files": []},
        # Only what a reader asks for is fetched: byte counts follow the reads.
        "fetch": {"background_fetch": False, "prefetch_landmark": False, "read_ahead_bytes": 0},
        "fuse": {"negative_timeout": 0.2},
        "log": {"level": "debug", "format": "json"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def store(
    workdir: Path, hosts: list[str], env: dict[str, str] | None = None, **sections: dict[str, Any]
) -> Iterator[StoreDaemon]:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "registries.conf"
    if not conf.exists():
        conf.write_text("")
    d = StoreDaemon(workdir, config_text=config_text(workdir, hosts, **sections), env=env)
    secret_guard.watch_log(d.log_path, "store daemon log")
    d.start(60)
    try:
        yield d
    finally:
        d.stop()
        assert not fu.is_mounted(d.mountpoint), "stale mount left"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargz_store", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def status(d: StoreDaemon) -> dict[str, Any]:
    r = cli("status", "--root", str(d.root), "--json")
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def keydir(d: StoreDaemon, ref: str, key: str) -> Path:
    return d.mountpoint / fu.b64(ref) / key


def timed(fn: Any, limit: float = 60.0) -> Any:
    return fu.run_with_timeout(fn, limit)


def use(path: Path) -> None:
    """What containers/storage does to count a user: create ``use`` (answered ENOENT)."""
    with pytest.raises(FileNotFoundError):
        timed(lambda: open(path / "use", "w").close())


def drop_page_cache() -> None:
    """The kernel forgets file pages: the next reads go to the daemon again."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def chunk_files(root: Path) -> list[Path]:
    return pack_files(root / "cache")


def layer_of(doc: dict[str, Any], digest: str) -> dict[str, Any]:
    (found,) = [x for x in doc["layers"] if x["digest"] == digest]
    return found


# --- status ---------------------------------------------------------------------------------------


def test_status_during_a_real_run(
    image: Image,
    registry: RegistryHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    port = free_port()
    plain = registry.push_image("ops/plain", "v1", [gzip_tar({"x": b"not estargz"})])
    with store(tmp_path / "s", [registry.host], metrics={"listen": f"127.0.0.1:{port}"}) as d:
        sock = d.root / "control.sock"
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 0

        ref = image.ref()
        d0, d1 = image.pushed.layer_digests
        by_blob = keydir(d, ref, d0)  # podman <= 5.0 asks by compressed digest
        by_toc = keydir(d, ref, image.toc_digests[1])  # podman >= 5.1 by TOC digest
        use(by_blob)
        use(by_toc)
        assert timed(lambda: (by_blob / "diff" / "etc" / "motd").read_bytes()) == (
            b"hello from the store\n"
        )
        big = timed(lambda: (by_blob / "diff" / "data" / "big").read_bytes())
        assert big == image.files[0]["data/big"]
        plain_key = keydir(d, registry.ref("ops/plain", "v1"), plain.layer_digests[0])
        with pytest.raises(FileNotFoundError):  # not eStargz: podman pulls it itself
            timed(lambda: os.stat(plain_key))

        doc = status(d)
        assert set(doc) == TOP_KEYS and doc["schema"] == 1
        assert doc["daemon"]["root"] == str(d.root)
        assert doc["daemon"]["mountpoint"] == str(d.mountpoint.resolve())
        images = {i["ref"]: i for i in doc["images"]}
        assert set(images[ref]) == IMAGE_KEYS
        assert images[ref]["manifest_digest"] == image.pushed.manifest_digest
        assert sorted(images[ref]["layers"]) == sorted([d0, d1])
        assert images[ref]["users"] == 2
        assert len(doc["layers"]) == 2
        l0, l1 = layer_of(doc, d0), layer_of(doc, d1)
        assert set(l0) == LAYER_KEYS and set(l1) == LAYER_KEYS
        assert l0["schemes"] == ["compressed"] and l1["schemes"] == ["toc"]
        assert l0["keys"] == [{"ref": ref, "key": d0, "scheme": "compressed", "users": 1}]
        assert l1["keys"] == [
            {"ref": ref, "key": image.toc_digests[1], "scheme": "toc", "users": 1}
        ]
        assert (l0["toc_digest"], l1["toc_digest"]) == tuple(image.toc_digests)
        assert l0["blob_size"] == len(image.pushed.layers[0])
        # every chunk of layer 0 was read: its whole data region was fetched, nothing twice
        assert 256 * 1024 // 2 < l0["bytes_fetched"] <= l0["blob_size"]
        assert l0["chunks_fetched"] == l0["chunks"] == 1 + 16
        assert l1["bytes_fetched"] == 0 and l1["users"] == 1  # in use, nothing read yet
        assert set(doc["cache"]) == CACHE_KEYS
        assert doc["cache"]["max_bytes"] == 10 << 30
        assert doc["cache"]["misses"] > 0 and doc["cache"]["hit_rate"] is not None
        mech = doc["fetch"]["mechanisms"]
        assert set(mech) == MECHANISMS
        # the reader's own requests, and the sequential read-ahead of data/big
        assert mech["foreground"]["bytes"] > 0
        assert sum(m["bytes"] for m in mech.values()) == l0["bytes_fetched"]
        for idle in ("landmark_prefetch", "background_fill"):  # off in this configuration
            assert mech[idle] == {"requests": 0, "bytes": 0, "chunks": 0, "failures": 0,
                                  "seconds": 0.0}  # fmt: skip
        outcomes = doc["lookups"]["outcomes"]
        assert outcomes["resolved"] == 2 and outcomes["not_estargz"] == 1
        assert doc["in_flight"] == {"lookups": 0, "foreground_fetches": 0, "chunks": 0}

        # the readable form shows the same
        r = cli("status", "--root", str(d.root))
        assert r.returncode == 0, r.stderr
        out = r.stdout
        print(out)
        # the image without eStargz layers was resolved too: listed, with no layer
        assert "IMAGES (2)" in out and ref in out
        plain_row = next(x for x in out.splitlines() if "ops/plain:v1" in x)
        assert plain_row.split()[-2:] == ["0", "0"]
        assert "LAYERS (2 held, 2 in use)" in out
        short0, short_toc1 = d0[:19], image.toc_digests[1][:19]
        row0 = next(line for line in out.splitlines() if line.strip().startswith(short0))
        assert "compressed" in row0 and ref in row0 and "/ " in row0
        assert any(short_toc1 in line and " toc " in line for line in out.splitlines())
        assert "1 not_estargz" in out and "2 resolved" in out

        # the metrics say the same
        families = scrape_tcp(port)
        check_metric_families(families, doc)

        # a release (podman's rmdir of the key) shows up
        with pytest.raises(FileNotFoundError):
            os.rmdir(by_toc)
        assert layer_of(status(d), d1)["users"] == 0


def test_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    r = cli("status", "--root", str(tmp_path / "nothing"))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"stargz-store status: no stargz-store daemon is running on {tmp_path / 'nothing'} "
        f"(no {tmp_path / 'nothing' / 'control.sock'})"
    ]
    # a socket left by a killed daemon: nothing answers on it
    (tmp_path / "dead").mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "dead" / "control.sock"))
    s.close()
    r = cli("status", "--root", str(tmp_path / "dead"), "--json")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "nothing answers on" in r.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_status_refuses_other_users(
    image: Image,
    registry: RegistryHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The socket is 0600 (another user cannot even connect); and were it reachable, the daemon
    itself refuses a peer that is not root (SO_PEERCRED)."""
    work = Path(tempfile.mkdtemp(prefix="stargz-ops-", dir="/tmp"))
    work.chmod(0o755)
    try:
        with store(work, [registry.host]) as d:
            d.root.chmod(0o755)  # let nobody reach the socket file itself
            as_nobody = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                         "--clear-groups", sys.executable, "-m", "stargz_store"]  # fmt: skip
            r = subprocess.run(
                [*as_nobody, "status", "--root", str(d.root)],
                cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert r.returncode == 1 and "Traceback" not in r.stderr
            assert r.stderr.splitlines() == [
                f"stargz-store status: permission denied on {d.root / 'control.sock'}: "
                "run this as root"
            ]
            (d.root / "control.sock").chmod(0o666)  # as if the mode were wrong
            r = subprocess.run(
                [*as_nobody, "status", "--root", str(d.root)],
                cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert r.returncode == 1 and r.stdout == ""
            assert r.stderr.splitlines() == [
                f"stargz-store status: permission denied by the daemon on "
                f"{d.root / 'control.sock'}: run this as root"
            ]
            r = subprocess.run(
                [*as_nobody, "cache", "clear", "--root", str(d.root)],
                cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert r.returncode == 1 and "permission denied by the daemon" in r.stderr
            events = [json.loads(x) for x in d.log_tail(10**6).splitlines() if x.startswith("{")]
            refused = [e for e in events if e["event"] == "control_connection_refused"]
            assert len(refused) == 2 and refused[0]["uid"] == NOBODY
            assert status(d)["errors"]["counts"]["warning"] >= 2  # the refusals
    finally:
        for point in mounts_below(str(work.resolve())):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        remove_tree(work)


# --- cache prune and clear ------------------------------------------------------------------------


def unix_get(path: Path, url: str = "/metrics") -> str:
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(path))
            self.sock = s

    conn = Conn("localhost", timeout=10)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def test_cache_prune_and_clear_while_the_daemon_serves(
    image: Image,
    registry: RegistryHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    with store(tmp_path / "s", [registry.host], metrics={"listen": "unix:metrics.sock"}) as d:
        keyd = keydir(d, image.ref(), image.pushed.layer_digests[0])
        use(keyd)
        big = keyd / "diff" / "data" / "big"
        want = image.files[0]["data/big"]
        assert timed(big.read_bytes) == want
        before = status(d)
        cached = before["cache"]["bytes"]
        assert before["cache"]["entries"] >= 16 and cached >= 256 * 1024
        fetched = layer_of(before, image.pushed.layer_digests[0])["bytes_fetched"]

        r = cli("cache", "prune", "--max-size", "64K", "--root", str(d.root))
        assert r.returncode == 0, r.stderr
        print(r.stdout)
        assert "by the running daemon" in r.stdout and r.stdout.startswith("pruned ")
        after = status(d)
        assert after["cache"]["bytes"] <= 64 * 1024
        assert (
            after["cache"]["removed_by_operator"]
            == before["cache"]["entries"] - after["cache"]["entries"]
        )
        assert cached_bytes(d.root / "cache") == after["cache"]["bytes"]

        drop_page_cache()
        assert timed(big.read_bytes) == want  # refetched what was pruned
        again = layer_of(status(d), image.pushed.layer_digests[0])["bytes_fetched"]
        assert again > fetched

        r = cli("cache", "clear", "--root", str(d.root))
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("cleared ") and "by the running daemon" in r.stdout
        assert chunk_files(d.root) == []
        assert list((d.root / "cache" / "toc").iterdir()) == []
        drop_page_cache()
        assert timed(big.read_bytes) == want
        assert timed(lambda: (keyd / "diff" / "etc" / "motd").read_bytes()) == (
            b"hello from the store\n"
        )

        # the metrics over the Unix socket (0600) saw it all
        msock = d.root / "metrics.sock"
        assert stat.S_IMODE(os.lstat(msock).st_mode) == 0o600
        families = parse_metrics(unix_get(msock))
        evictions = samples(families, "stargz_store_cache_evictions_total")
        assert evictions[(("reason", "operator"),)] >= before["cache"]["entries"]
        assert (
            samples(families, "stargz_store_fetch_bytes_total")[(("mechanism", "foreground"),)]
            > again
        )
    assert not (d.root / "metrics.sock").exists() and not (d.root / "control.sock").exists()


def test_cache_prune_and_clear_without_a_daemon(
    image: Image,
    registry: RegistryHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    with store(tmp_path / "s", [registry.host]) as d:
        keyd = keydir(d, image.ref(), image.pushed.layer_digests[0])
        assert timed((keyd / "diff" / "data" / "big").read_bytes) == image.files[0]["data/big"]
        root = d.root
    assert not (root / "control.sock").exists()
    total = cached_bytes(root / "cache")
    assert total >= 256 * 1024
    packs = len(chunk_files(root))

    config = tmp_path / "s" / "config.toml"
    r = cli("cache", "prune", "--max-size", "100K", "--root", str(root), "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert "directly (no daemon running)" in r.stdout
    left = cached_bytes(root / "cache")
    assert left <= 100 * 1024  # whole packs go, oldest first (this layer's may all go)
    assert len(chunk_files(root)) < packs

    # a daemon that holds the root's lock but does not answer: nothing is touched
    lock = root / "lock"
    with open(lock, "a+") as held:  # the daemon leaves the file (with its pid) behind
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        r = cli("cache", "clear", "--root", str(root), "--config", str(config))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"stargz-store cache clear: a stargz-store daemon (pid 4242) holds {lock} but does "
        f"not answer on {root}/control.sock; nothing was changed"
    ]
    assert cached_bytes(root / "cache") == left

    r = cli("cache", "clear", "--root", str(root), "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cleared ") and "directly" in r.stdout
    assert chunk_files(root) == [] and list((root / "cache" / "toc").iterdir()) == []

    # and the next daemon on that root serves from the registry again
    with store(tmp_path / "s", [registry.host]) as d:
        keyd = keydir(d, image.ref(), image.pushed.layer_digests[0])
        assert timed((keyd / "diff" / "data" / "big").read_bytes) == image.files[0]["data/big"]


# --- metrics --------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def scrape_tcp(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/plain")
        return parse_metrics(resp.read().decode())
    finally:
        conn.close()


def samples(families: dict[str, Any], sample_name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in families.values():
        for s in fam.samples:
            if s.name == sample_name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def check_metric_families(families: dict[str, Any], doc: dict[str, Any]) -> None:
    for name, kind in (
        ("stargz_store_layer_lookups", "counter"),
        ("stargz_store_fetch_duration_seconds", "histogram"),
        ("stargz_store_fetch_bytes", "counter"),
        ("stargz_store_fetch_requests", "counter"),
        ("stargz_store_fetch_failures", "counter"),
        ("stargz_store_cache_hits", "counter"),
        ("stargz_store_cache_misses", "counter"),
        ("stargz_store_cache_evictions", "counter"),
        ("stargz_store_cache_bytes", "gauge"),
        ("stargz_store_chunk_verification_failures", "counter"),
        ("stargz_store_layers_held", "gauge"),
        ("stargz_store_layers_in_use", "gauge"),
        ("stargz_store_in_flight", "gauge"),
    ):
        assert name in families and families[name].type == kind, name
    lookups = samples(families, "stargz_store_layer_lookups_total")
    assert lookups[(("outcome", "resolved"),)] == 2
    assert lookups[(("outcome", "not_estargz"),)] == 1
    fg = (("mechanism", "foreground"),)
    assert (
        samples(families, "stargz_store_fetch_bytes_total")[fg]
        == (doc["fetch"]["mechanisms"]["foreground"]["bytes"])
        > 0
    )
    count = samples(families, "stargz_store_fetch_duration_seconds_count")[fg]
    assert count == doc["fetch"]["mechanisms"]["foreground"]["requests"] > 0
    inf = samples(families, "stargz_store_fetch_duration_seconds_bucket")[(("le", "+Inf"), *fg)]
    assert inf == count
    assert samples(families, "stargz_store_fetch_duration_seconds_sum")[fg] > 0
    assert samples(families, "stargz_store_cache_misses_total")[()] > 0
    assert samples(families, "stargz_store_chunk_verification_failures_total")[()] == 0
    assert samples(families, "stargz_store_layers_held")[()] == 2
    assert samples(families, "stargz_store_layers_in_use")[()] == 2


# --- registries.conf: credential-helpers and reload -----------------------------------------------


def test_credential_helpers_order_and_reload(
    registry_htpasswd: RegistryHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    """registries.conf's ``credential-helpers`` are asked in order: the auth file (a wrong
    password) first fails the lookup; after the file is rewritten with the helper first, the
    next new lookup gets the helper's (right) credentials, without a restart."""
    h = registry_htpasswd
    assert h.username and h.password
    img = push_estargz(h, "ops/private", seed=11)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "helper-calls"
    helper = bindir / "docker-credential-xyz"
    helper.write_text(
        "#!/bin/sh\n"
        f'echo "$1 $(cat)" >> {calls}\n'
        f"""printf '{{"ServerURL":"%s","Username":"%s","Secret":"%s"}}' """
        f'"{h.host}" "{h.username}" "$(cat {tmp_path / "secret"})"\n'
    )
    helper.chmod(0o755)
    (tmp_path / "secret").write_text(h.password)
    authfile = tmp_path / "auth.json"
    wrong = base64.b64encode(f"{h.username}:{WRONG}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {h.host: {"auth": wrong}}}))
    work = tmp_path / "s"
    work.mkdir()
    conf = work / "registries.conf"
    conf.write_text('credential-helpers = ["containers-auth.json", "xyz"]\n')
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "REGISTRY_AUTH_FILE": str(authfile)}
    with store(work, [h.host], env=env) as d:
        first = keydir(d, img.tag(h, "a1"), img.pushed.layer_digests[0])
        with pytest.raises(FileNotFoundError):
            timed(lambda: os.stat(first / "diff"))
        assert not calls.exists()  # the auth file answered first (wrongly)
        assert status(d)["lookups"]["outcomes"]["unauthorized"] == 1

        rewrite(conf, 'credential-helpers = ["xyz", "containers-auth.json"]\n')
        second = keydir(d, img.tag(h, "a2"), img.pushed.layer_digests[0])
        motd = timed(lambda: (second / "diff" / "etc" / "motd").read_bytes())
        assert motd == b"hello from the store\n"
        assert calls.read_text().splitlines()[0] == f"get {h.host}"
    text = d.log_path.read_text()
    assert h.password not in text and WRONG not in text


def rewrite(path: Path, text: str) -> None:
    """Replace the file (a new inode, as editors do), then let the check interval (0.2 s in
    these tests) pass so that the next resolution looks at the files again."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)
    time.sleep(0.5)


def test_registries_conf_block_applies_without_restart(
    image: Image,
    registry: RegistryHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    work = tmp_path / "s"
    work.mkdir()
    conf = work / "registries.conf"
    conf.write_text("")
    digest = image.pushed.layer_digests[1]
    with store(work, [registry.host]) as d:
        served = keydir(d, image.tag(registry, "b1"), digest)
        assert (
            timed(lambda: (served / "diff" / "bin" / "tool").read_bytes())
            == (image.files[1]["bin/tool"])
        )
        rewrite(conf, f'[[registry]]\nlocation = "{registry.host}"\nblocked = true\n')
        with pytest.raises(FileNotFoundError):
            timed(lambda: os.stat(keydir(d, image.tag(registry, "b2"), digest) / "diff"))
        assert status(d)["lookups"]["outcomes"]["blocked"] == 1
        # the layer already served keeps working (a running container is not cut off)
        assert timed(lambda: (served / "info").read_bytes())
        rewrite(conf, f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
        again = keydir(d, image.tag(registry, "b3"), digest)
        assert (
            timed(lambda: (again / "diff" / "bin" / "tool").read_bytes())
            == (image.files[1]["bin/tool"])
        )
    events = [json.loads(x) for x in d.log_path.read_text().splitlines() if x.startswith("{")]
    failed = [e for e in events if e["event"] == "layer_lookup_failed"]
    assert [e["error_type"] for e in failed] == ["BlockedRegistryError"]
