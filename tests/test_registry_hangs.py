"""Issue 9 finding 3 (hangs) and the token-redirect part of finding 6, through the real daemon
and FUSE mount, against fault-injecting registries (tests/faultserver.py) on loopback.

A *dribbling* registry sends one byte every ``DRIBBLE`` seconds: never idle for the read
timeout, so an idle timeout alone never ends the request. Every registry request must have a
total deadline (``[registry] request_deadline``, range reads scaled by
``min_bytes_per_second``), and a slow registry may hold only its own share of the daemon's
threads and request slots (``[registry] host_share``):

(a) a read of a file on a dribbling registry fails with EIO within the budget;
(b) a manifest lookup on a dribbling (or never answering) registry answers ENOENT within it;
(c) while a dozen reads hang on a dribbling registry, reads and lookups of an image on a
    second, healthy registry keep being answered (each well under 10 s, while the dribbler
    would take minutes);
(d) twenty concurrent lookups with two dribbling manifests: all answered, those two ENOENT;
(e) a token POST (OAuth2 refresh token) that the token server redirects is refused, and the
    body never reaches the redirect target.

The bounds are generous functional limits (the code under test would otherwise hang for
minutes or forever), not performance assertions.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gzip
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from layerstore.runtime.manager import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from stargz_store.config import field_paths
from testbed import StoreDaemon
from tests import fuse_util as fu
from tests import secret_guard
from tests.estargz_util import build_blob, sha
from tests.faultserver import FakeRegistry, FaultServer, Reply, Request, range_reply

ok, why = fu.fuse_available()
pytestmark = [pytest.mark.fuse, pytest.mark.skipif(not ok, reason=why), pytest.mark.timeout(240)]

DRIBBLE = 1.0  # seconds between bytes: below READ_TIMEOUT, so the idle timeout never fires
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 3.0
DEADLINE = 5.0  # [registry] request_deadline in (a), (b), (e)
BUDGET = 4 * DEADLINE + 10.0  # what a failing read or lookup may take at most here
PROMPT = 10.0  # (c): each healthy read or lookup answers within this
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
KNOWN_KEYS = set(field_paths())


# --- images ---------------------------------------------------------------------------------------
@dataclass
class Image:
    ref: str
    layer: str  # compressed digest
    files: dict[str, bytes] = field(repr=False)


def publish(reg: FakeRegistry, tag: str, seed: int, n_files: int = 4) -> Image:
    """An eStargz layer of *n_files* incompressible files (one chunk each) under *tag*."""
    rnd = random.Random(seed)
    files = [(f"f{i:02d}", rnd.randbytes(6000)) for i in range(n_files)]
    built = build_blob(files)
    raw = gzip.decompress(built.blob)
    ann = {
        TOC_DIGEST_ANNOTATION: built.toc_digest,
        UNCOMPRESSED_SIZE_ANNOTATION: str(len(raw)),
    }
    reg.add_image(
        tag, [built.blob], layer_media_type=GZIP_LAYER, layer_annotations=[ann], diff_ids=[sha(raw)]
    )
    return Image(f"{reg.server.netloc}/hangs/app:{tag}", sha(built.blob), dict(files))


class Dribbler:
    """Switchable misbehaviour for a FakeRegistry's blob range reads and manifests."""

    def __init__(self) -> None:
        self.blobs = False  # dribble the body of every range read but the TOC tail
        self.manifests: dict[str, str] = {}  # tag -> "headers" | "body" | "never"

    def blob_reply(self, req: Request, data: bytes) -> Reply:
        reply = range_reply(data, req.header("Range"))
        if self.blobs and reply.status == 206 and not _is_tail(req.header("Range"), len(data)):
            reply.dribble_body = DRIBBLE
        return reply

    def manifest_reply(self, req: Request, body: bytes, media_type: str) -> Reply:
        headers = [("Content-Type", media_type), ("Docker-Content-Digest", sha(body))]
        reply = Reply(200, headers, body)
        mode = self.manifests.get(req.path.rsplit("/", 1)[1])
        if mode == "headers":
            reply.dribble_headers = DRIBBLE
        elif mode == "body":
            reply.dribble_body = DRIBBLE
        elif mode == "never":
            reply.never_answer = True
        return reply


def _is_tail(header: str | None, size: int) -> bool:
    if not header or "," in header:
        return False
    start, _, end = header[len("bytes=") :].partition("-")
    return (end == "" or int(end) == size - 1) and int(start) > 0


def registry(srv: FaultServer, dribbler: Dribbler, **kw: Any) -> FakeRegistry:
    reg = FakeRegistry(srv, **kw)
    reg.blob_reply = dribbler.blob_reply
    reg.manifest_reply = dribbler.manifest_reply
    return reg


def range_gets(srv: FaultServer) -> int:
    return sum(1 for r in list(srv.requests) if r.method == "GET" and r.header("Range"))


# --- the daemon -----------------------------------------------------------------------------------
def config_text(tmp: Path, hosts: list[str], deadline: float, **extra_registry: Any) -> str:
    """The daemon's config. Keys the code under test does not know are left out, so the same
    tests run against the code before deadlines existed (to show they fail there)."""
    registry_keys: dict[str, Any] = {
        "request_deadline": deadline,
        "min_bytes_per_second": 131072,
        **extra_registry,
    }
    lines = [
        "[registry]",
        f'registries_conf = "{tmp}/registries.conf"',
        f'registries_conf_d = "{tmp}/registries.conf.d"',
        "insecure_registries = [" + ", ".join(f'"{h}"' for h in hosts) + "]",
        f"connect_timeout = {CONNECT_TIMEOUT}",
        f"read_timeout = {READ_TIMEOUT}",
        "retries = 1",
        "retry_backoff = 0.1",
        "resolve_ttl = 3600.0",
        *(f"{k} = {v}" for k, v in registry_keys.items() if f"registry.{k}" in KNOWN_KEYS),
        "[auth]",
        "extra_auth_files = []",
        "[fetch]",
        "background_fetch = false",
        "prefetch_landmark = false",
        "read_ahead_bytes = 0",
        "[fuse]",
        "negative_timeout = 0.5",
        "shutdown_grace_seconds = 1.0",
        "[log]",
        'level = "debug"',
        'format = "json"',
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def daemon(
    workdir: Path,
    hosts: list[str],
    deadline: float = DEADLINE,
    authfile: Path | None = None,
    **extra_registry: Any,
) -> Iterator[StoreDaemon]:
    d = StoreDaemon(
        workdir,
        config_text=config_text(workdir, hosts, deadline, **extra_registry),
        authfile=authfile,
    )
    secret_guard.watch_log(d.log_path, "store daemon log")
    d.start(60)
    try:
        yield d
    finally:
        d.stop()
        assert not fu.is_mounted(d.mountpoint), "stale mount left"


def events(d: StoreDaemon) -> list[dict[str, Any]]:
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def keydir(d: StoreDaemon, img: Image) -> Path:
    return d.mountpoint / fu.b64(img.ref) / img.layer


def read_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def outcome(fn: Callable[[], Any], limit: float) -> tuple[Any, float]:
    """(result or the OSError raised, seconds); AssertionError when not answered in *limit*."""
    t0 = time.monotonic()
    try:
        got: Any = fu.run_with_timeout(fn, limit)
    except OSError as exc:
        got = exc
    return got, time.monotonic() - t0


def expect_errno(fn: Callable[[], Any], code: int, limit: float = BUDGET) -> float:
    got, took = outcome(fn, limit)
    assert isinstance(got, OSError), f"expected errno {code}, got {got!r}"
    assert got.errno == code, got
    return took


FUSECTL = Path("/sys/fs/fuse/connections")


@pytest.fixture
def fusectl() -> Iterator[None]:
    """fusectl mounted, as systemd mounts it at boot: the daemon raises the kernel's limit of
    background (read-ahead) requests there. Unmounted again if this fixture mounted it."""
    mounted = False
    if not os.path.ismount(FUSECTL):
        r = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], check=False)
        assert r.returncode == 0, "cannot mount fusectl"
        mounted = True
    yield
    if mounted:
        subprocess.run(["umount", str(FUSECTL)], check=False)


@pytest.fixture
def servers() -> Iterator[tuple[FaultServer, FaultServer]]:
    with FaultServer("127.0.0.1") as a, FaultServer("127.0.0.2") as b:
        yield a, b


# --- (a) a read on a dribbling registry ----------------------------------------------------------
def test_read_on_dribbling_registry_fails_within_deadline(
    servers: tuple[FaultServer, FaultServer], tmp_path: Path
) -> None:
    srv, _ = servers
    dribbler = Dribbler()
    img = publish(registry(srv, dribbler), "a", seed=1)
    with daemon(tmp_path, [srv.netloc]) as d:
        diff = keydir(d, img) / "diff"
        assert fu.run_with_timeout(lambda: read_file(diff / "f00"), 30) == img.files["f00"]
        dribbler.blobs = True
        took = expect_errno(lambda: read_file(diff / "f01"), errno.EIO)
        # the daemon is still serving: a cached file, then the registry fixed
        assert fu.run_with_timeout(lambda: read_file(diff / "f00"), 30) == img.files["f00"]
        dribbler.blobs = False
        assert fu.run_with_timeout(lambda: read_file(diff / "f02"), 30) == img.files["f02"]
    print(f"(a) EIO after {took:.1f}s (budget {BUDGET:.0f}s)")


# --- (b) a manifest lookup on a dribbling registry ------------------------------------------------
@pytest.mark.parametrize("mode", ["headers", "body", "never"])
def test_lookup_on_dribbling_manifest_is_enoent_within_deadline(
    servers: tuple[FaultServer, FaultServer], tmp_path: Path, mode: str
) -> None:
    srv, _ = servers
    dribbler = Dribbler()
    reg = registry(srv, dribbler)
    img = publish(reg, "b", seed=2)
    good = publish(reg, "good", seed=3)
    dribbler.manifests["b"] = mode
    with daemon(tmp_path, [srv.netloc]) as d:
        took = expect_errno(lambda: os.stat(keydir(d, img)), errno.ENOENT)
        # a lookup of another image on the same registry is served
        assert fu.run_with_timeout(lambda: os.listdir(keydir(d, good)), 30)
    print(f"(b) {mode}: ENOENT after {took:.1f}s (budget {BUDGET:.0f}s)")


# --- (c) a dozen reads hang on registry A; registry B keeps being served --------------------------
def test_hung_reads_on_one_registry_do_not_starve_another(
    servers: tuple[FaultServer, FaultServer], tmp_path: Path, fusectl: None
) -> None:
    a, b = servers
    slow, healthy = Dribbler(), Dribbler()
    hung_img = publish(registry(a, slow), "c", seed=4, n_files=12)
    good_regs = registry(b, healthy)
    goods = [publish(good_regs, f"good{i}", seed=10 + i, n_files=3) for i in range(3)]
    # Long deadlines: the dribbling reads stay in flight for the whole test.
    with daemon(tmp_path, [a.netloc, b.netloc], deadline=600.0) as d:
        diff = keydir(d, hung_img) / "diff"
        for i in range(12):  # resolved, TOC fetched: only file reads are left to hang
            fu.run_with_timeout(lambda i=i: os.stat(diff / f"f{i:02d}"), 30)
        slow.blobs = True
        before = range_gets(a)
        hung: list[Any] = []

        def hang(i: int) -> None:
            try:
                hung.append(read_file(diff / f"f{i:02d}"))
            except OSError as exc:
                hung.append(exc)

        for i in range(12):
            threading.Thread(target=hang, args=(i,), daemon=True).start()
        deadline = time.monotonic() + 30
        while range_gets(a) - before < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert range_gets(a) - before >= 8, "the dribbling reads did not reach registry A"
        time.sleep(1.0)
        assert not hung, f"a dribbling read ended early: {hung[:1]!r}"
        slowest = 0.0
        for img in goods:  # lookups (manifest, config, TOC) and reads on registry B
            kd = keydir(d, img)
            got, took = outcome(lambda kd=kd: sorted(os.listdir(kd / "diff")), PROMPT)
            assert got == sorted(img.files), got
            slowest = max(slowest, took)
            for name, data in img.files.items():
                got, took = outcome(lambda kd=kd, n=name: read_file(kd / "diff" / n), PROMPT)
                assert got == data, got
                slowest = max(slowest, took)
        assert not hung, f"a dribbling read ended early: {hung[:1]!r}"
    print(f"(c) slowest healthy answer {slowest:.2f}s while 12 reads hung on the other registry")


# --- (d) twenty concurrent lookups, two of them on dribbling manifests ----------------------------
# Twenty lookups at once on a loaded machine: the healthy ones need room inside their deadline.
D_DEADLINE = 8.0
D_BUDGET = 4 * D_DEADLINE + 10.0


def test_twenty_concurrent_lookups_two_dribbling(
    servers: tuple[FaultServer, FaultServer], tmp_path: Path
) -> None:
    srv, _ = servers
    dribbler = Dribbler()
    reg = registry(srv, dribbler)
    imgs = [publish(reg, f"d{i}", seed=100 + i, n_files=1) for i in range(20)]
    dribbler.manifests["d3"] = "headers"
    dribbler.manifests["d11"] = "body"
    results: dict[int, tuple[Any, float]] = {}
    failures: list[str] = []
    with daemon(tmp_path, [srv.netloc], deadline=D_DEADLINE) as d:

        def look(i: int) -> None:
            results[i] = outcome(lambda: os.stat(keydir(d, imgs[i])), D_BUDGET + 30)

        threads = [threading.Thread(target=look, args=(i,), daemon=True) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(D_BUDGET + 40)
        failures = [
            f"{e.get('ref')}: {e.get('error')}"
            for e in events(d)
            if e.get("event") == "layer_lookup_failed"
        ]
    assert sorted(results) == list(range(20)), "lookups unanswered"
    for i, (got, took) in results.items():
        if i in (3, 11):
            assert isinstance(got, OSError) and got.errno == errno.ENOENT, (i, got)
            assert took < D_BUDGET, f"lookup {i}: ENOENT after {took:.1f}s"
        else:
            assert isinstance(got, os.stat_result), (i, got, failures)
    print(f"(d) ENOENT after {results[3][1]:.1f}s and {results[11][1]:.1f}s")


# --- (e) no refresh-token POST to a redirect target -----------------------------------------------
REFRESH_TOKEN = "refresh-" + "5a17c0de" * 4
secret_guard.register(REFRESH_TOKEN, "identity (refresh) token")


@pytest.mark.parametrize("status", [307, 308])
def test_token_post_redirect_is_refused(
    servers: tuple[FaultServer, FaultServer], tmp_path: Path, status: int
) -> None:
    srv, thief = servers
    reg = FakeRegistry(srv, auth="bearer")
    img = publish(reg, "e", seed=5)
    srv.route(
        "POST",
        r"/token",
        lambda req: Reply(status, [("Location", f"{thief.url}/collect")]),
    )
    thief.route("*", r"/collect", lambda req: Reply(200, [], b'{"token": "x"}'))
    authfile = tmp_path / "auth.json"
    entry = {"auth": base64.b64encode(b"alice:").decode(), "identitytoken": REFRESH_TOKEN}
    authfile.write_text(json.dumps({"auths": {srv.netloc: entry}}))
    with daemon(tmp_path / "d", [srv.netloc, thief.netloc], authfile=authfile) as d:
        expect_errno(lambda: os.stat(keydir(d, img)), errno.ENOENT)
        log = d.log_path.read_text(errors="replace")
    posts = [r for r in srv.requests if r.method == "POST" and r.path == "/token"]
    assert posts, "the daemon never asked the token server"
    assert REFRESH_TOKEN.encode() in posts[0].body  # the token server itself did get it
    assert not any(REFRESH_TOKEN.encode() in r.body for r in thief.requests), "body re-sent"
    assert not thief.requests, [(r.method, r.path) for r in thief.requests]
    assert "redirect" in log and srv.netloc in log


# --- the FUSE adapter's per-registry shares of its threads (in-process mount) ---------------------
class HostLayer(fu.FakeLayer):
    """A fake layer served from *host*; its reads wait for *gate* (a hung registry) if given."""

    def __init__(self, tree: dict[str, fu.Node], host: str, gate: threading.Event | None) -> None:
        super().__init__(tree, blob=host.encode() * 64)
        self.registry_host = host
        self.gate = gate

    def read(self, ino: int, offset: int, size: int) -> bytes:
        if self.gate is not None:
            self.gate.wait(120)
        return super().read(ino, offset, size)


class HostManager(fu.FakeManager):
    """Lookups of the refs in ``hung`` wait for ``gate``; ``registry_host`` like the real one."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.hung: set[str] = set()

    def registry_host(self, ref: str) -> str:
        return ref.split("/", 1)[0]

    def get(self, ref: str, key: str) -> fu.FakeLayer:
        if ref in self.hung:
            self.gate.wait(120)
        return super().get(ref, key)


def test_fuse_threads_are_shared_per_registry_host(tmp_path: Path) -> None:
    """Four read and four lookup threads, half of each per registry host: six reads and six
    lookups stuck on one registry leave the other registry's reads and lookups served."""
    from stargz_store.config import FuseSettings
    from stargz_store.fusefs import StoreOperations, mount_options

    gate = threading.Event()
    mgr = HostManager(gate)
    files = {f"f{i}": fu.file(b"slow %d\n" % i) for i in range(6)}
    slow = mgr.add("slow.example/app:1", HostLayer(files, "slow.example", gate))
    fast = mgr.add(
        "fast.example/app:1", HostLayer({"hello": fu.file(b"hi\n")}, "fast.example", None)
    )
    stuck_refs = [f"slow.example/app:{i}" for i in range(2, 8)]
    for ref in stuck_refs:
        mgr.add(ref, slow)
        mgr.hung.add(ref)
    free_refs = [f"fast.example/app:{i}" for i in range(2, 5)]
    for ref in free_refs:
        mgr.add(ref, fast)
    settings = FuseSettings(read_threads=4, lookup_threads=4, negative_timeout=0.0)
    ops = StoreOperations(mgr, settings, host_share=0.5)
    stuck: list[Any] = []
    try:
        with fu.mounted_ops(ops, tmp_path / "mnt", mount_options(settings)) as mp:
            slow_diff = mp / fu.b64("slow.example/app:1") / slow.compressed_digest / "diff"
            fast_dir = mp / fu.b64("fast.example/app:1") / fast.compressed_digest
            for i in range(6):
                fu.run_with_timeout(lambda i=i: os.stat(slow_diff / f"f{i}"), 30)
            fu.run_with_timeout(lambda: os.stat(fast_dir / "diff" / "hello"), 30)

            def run(fn: Callable[[], Any]) -> None:
                try:
                    stuck.append(fn())
                except OSError as exc:
                    stuck.append(exc)

            for i in range(6):  # reads that hang on the slow registry
                f = slow_diff / f"f{i}"
                threading.Thread(target=run, args=(lambda f=f: read_file(f),), daemon=True).start()
            for ref in stuck_refs:  # lookups that hang on it
                kd = mp / fu.b64(ref) / slow.compressed_digest
                threading.Thread(target=run, args=(lambda kd=kd: os.stat(kd),), daemon=True).start()
            time.sleep(1.0)
            assert not stuck, stuck[:1]
            got, _ = outcome(lambda: read_file(fast_dir / "diff" / "hello"), PROMPT)
            assert got == b"hi\n", got
            for ref in free_refs:
                kd = mp / fu.b64(ref) / fast.compressed_digest
                got, _ = outcome(lambda kd=kd: os.listdir(kd), PROMPT)
                assert sorted(got) == ["blob", "diff", "info"], got
            assert not stuck, stuck[:1]
            gate.set()  # the slow registry answers: everything it held is served
            deadline = time.monotonic() + 30
            while len(stuck) < 12 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(stuck) == 12 and not any(isinstance(x, OSError) for x in stuck), stuck
    finally:
        gate.set()
