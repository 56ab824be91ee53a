"""Issue 9, finding 1 (layer poisoning across images), the ``blob`` and background-fill parts of
finding 4, and the sweep part of finding 6, through the real daemon and its FUSE mount.

The registries are hostile :class:`tests.faultserver.FakeRegistry` instances on loopback: the
victim's on 127.0.0.1, the attacker's on 127.0.0.2 (another host, so another registry). Blobs
are real eStargz built by ``tests/estargz_util.py``. Every test here fails on the commit before
the trust-identity change (see the branch's report for the before/after runs).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from testbed import StoreDaemon
from tests import fuse_util as fu
from tests.estargz_util import build_blob, sha
from tests.faultserver import FakeRegistry, FaultServer, parse_range_header

ok, why = fu.fuse_available()
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not ok, reason=why),
    pytest.mark.timeout(240),
]

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
CHUNK = 4096


@dataclass(frozen=True)
class Layer:
    blob: bytes
    digest: str
    toc: str
    diff_id: str
    files: dict[str, bytes]


def estargz(files: list[tuple[str, bytes]]) -> Layer:
    b = build_blob(files, chunk_size=CHUNK)
    return Layer(b.blob, sha(b.blob), b.toc_digest, sha(gzip.decompress(b.blob)), dict(files))


def push(
    reg: FakeRegistry,
    repo: str,
    tag: str,
    layer: Layer,
    *,
    digest: str | None = None,
    toc: str | None = None,
    diff_id: str | None = None,
    served: bytes | None = None,
) -> str:
    """An image of one layer; the manifest may claim another digest or TOC than the blob has,
    the config another DiffID, and the registry may serve other bytes under the digest."""
    digest = digest or layer.digest
    reg.blobs[digest] = served if served is not None else layer.blob
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id or layer.diff_id]},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": reg.add_blob(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": GZIP,
                "digest": digest,
                "size": len(served if served is not None else layer.blob),
                "annotations": {TOC_ANNOTATION: toc or layer.toc},
            }
        ],
    }
    reg.add_manifest(tag, json.dumps(manifest).encode(), manifest["mediaType"])  # type: ignore[arg-type]
    return f"{reg.server.netloc}/{repo}:{tag}"


def files(seed: int, motd: bytes) -> list[tuple[str, bytes]]:
    rnd = random.Random(seed)
    return [
        ("etc/motd", motd),
        ("bin/tool", rnd.randbytes(40 * CHUNK + 100)),
        ("lib/data", rnd.randbytes(3 * CHUNK)),
    ]


def tampered_outside_chunks(blob: bytes) -> bytes:
    """The gzip MTIME of the blob's first member, which holds only tar headers (before any
    payload): every chunk, the TOC and even the DiffID still verify; the blob digest cannot."""
    out = bytearray(blob)
    out[5] ^= 0x40
    assert gzip.decompress(bytes(out)) == gzip.decompress(blob)
    return bytes(out)


@contextlib.contextmanager
def registries() -> Iterator[tuple[FakeRegistry, FakeRegistry]]:
    with FaultServer("127.0.0.1") as a, FaultServer("127.0.0.2") as b:
        yield FakeRegistry(a), FakeRegistry(b)


@contextlib.contextmanager
def store(
    workdir: Path,
    regs: tuple[FakeRegistry, ...],
    *,
    background_fetch: bool = False,
    layer_idle_seconds: float | None = None,
) -> Iterator[StoreDaemon]:
    hosts = ", ".join(f'"{r.server.netloc}"' for r in regs)
    lines = [
        "[registry]",
        f'registries_conf = "{workdir}/registries.conf"',
        f'registries_conf_d = "{workdir}/registries.conf.d"',
        f"insecure_registries = [{hosts}]",
        "connect_timeout = 2.0",
        "read_timeout = 3.0",
        "retries = 1",
        "retry_backoff = 0.1",
        "resolve_ttl = 3600.0",
        "[auth]",
        "extra_auth_files = []",
        "[fetch]",
        f"background_fetch = {'true' if background_fetch else 'false'}",
        "prefetch_landmark = false",
        "read_ahead_bytes = 0",
        "[fuse]",
        "negative_timeout = 0.5",
        "[log]",
        'level = "debug"',
        'format = "json"',
    ]
    if layer_idle_seconds is not None:
        lines[lines.index("[fetch]") : lines.index("[fetch]")] = [
            "[cache]",
            f"layer_idle_seconds = {layer_idle_seconds}",
        ]
    d = StoreDaemon(workdir, config_text="\n".join(lines) + "\n")
    d.start(60)
    try:
        yield d
    finally:
        d.stop()
        assert not fu.is_mounted(d.mountpoint), "stale mount left"


def keydir(d: StoreDaemon, ref: str, key: str) -> Path:
    return d.mountpoint / fu.b64(ref) / key


def timed(fn: Callable[[], Any], limit: float = 60.0) -> Any:
    return fu.run_with_timeout(fn, limit)


def expect_errno(fn: Callable[[], Any], code: int, limit: float = 30.0) -> None:
    with pytest.raises(OSError) as info:
        timed(fn, limit)
    assert info.value.errno == code, info.value


def events(d: StoreDaemon) -> list[dict[str, Any]]:
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll *cond* until it returns something true (a deadline against hangs, not a speed
    assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def read_range(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead around it
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


# --- (a) finding 1: poisoning across images ---------------------------------------------------


def test_attacker_claiming_the_victims_digest_cannot_poison_it(tmp_path: Path) -> None:
    """The attacker's image (another registry) names the victim's layer digest with its own
    TOC, and its registry serves its own blob under that digest. Resolved first, it must not
    change what the victim's image shows: the victim's layer is built from the victim's own
    manifest, TOC and registry (its TOC verified against its own annotation), so the victim's
    bytes are served (not ENOENT: everything needed to verify them is the victim's own)."""
    victim = estargz(files(1, b"victim motd\n"))
    evil = estargz(files(2, b"ATTACKER MOTD\n"))
    with registries() as (good, bad):
        victim_ref = push(good, "victim/app", "v1", victim)
        evil_ref = push(bad, "evil/app", "v1", evil, digest=victim.digest)
        liar_ref = push(good, "victim/app", "liar", victim, toc=sha(b"a TOC nobody has"))
        with store(tmp_path, (good, bad)) as d:
            evil_diff = keydir(d, evil_ref, victim.digest) / "diff"
            assert timed(lambda: (evil_diff / "etc/motd").read_bytes()) == b"ATTACKER MOTD\n"
            asked = good.server.count("GET", r"/v2/victim/app/blobs/.*")
            for key in (victim.digest, victim.toc):
                diff = keydir(d, victim_ref, key) / "diff"
                for name in ("etc/motd", "bin/tool", "lib/data"):
                    got = timed(lambda n=name, p=diff: (p / n).read_bytes())
                    assert got == victim.files[name], (key, name)
            # The victim's bytes came from the victim's registry, and the two layers have
            # their own inodes (the kernel must not mix their pages).
            assert good.server.count("GET", r"/v2/victim/app/blobs/.*") > asked
            victim_diff = keydir(d, victim_ref, victim.digest) / "diff"
            assert (
                os.stat(victim_diff / "etc/motd").st_ino != os.stat(evil_diff / "etc/motd").st_ino
            )
            info = json.loads((keydir(d, victim_ref, victim.digest) / "info").read_bytes())
            assert info["diff-digest"] == victim.diff_id
            # The wrong-annotation variant: an image naming the (loaded) layer's digest with a
            # TOC digest the blob does not have is refused, so podman pulls it itself.
            expect_errno(lambda: os.stat(keydir(d, liar_ref, victim.digest) / "diff"), errno.ENOENT)
            failed = [e for e in events(d) if e["event"] == "layer_lookup_failed"]
            assert any(e.get("ref") == liar_ref for e in failed), failed


# --- (b) finding 4: the background fill verifies the blob digest and the DiffID ---------------


@pytest.mark.parametrize("lie", ["blob bytes outside any chunk", "DiffID in the config"])
def test_background_fill_marks_a_lying_layer_bad(tmp_path: Path, lie: str) -> None:
    layer = estargz(files(3, b"motd\n"))
    with registries() as (reg, _other):
        if lie.startswith("blob"):
            ref = push(reg, "lying/app", "v1", layer, served=tampered_outside_chunks(layer.blob))
        else:
            ref = push(reg, "lying/app", "v1", layer, diff_id=sha(b"not this layer's DiffID"))
        with store(tmp_path, (reg,), background_fetch=True) as d:
            diff = keydir(d, ref, layer.digest) / "diff"
            # Every chunk verifies: the first read is served (and starts the fill). The open
            # files stand for a container's.
            fds = {n: os.open(diff / n, os.O_RDONLY) for n in layer.files}
            blob_fd = os.open(keydir(d, ref, layer.digest) / "blob", os.O_RDONLY)
            try:
                assert timed(lambda: os.pread(fds["etc/motd"], 100, 0)) == b"motd\n"
                bad = wait_for(
                    "layer_verification_failed",
                    lambda: [e for e in events(d) if e["event"] == "layer_verification_failed"],
                )
                assert bad[0]["refs"] == [ref] and bad[0]["digest"] == layer.digest, bad
                assert ("blob digest" if lie.startswith("blob") else "DiffID") in bad[0]["reason"]
                # EIO from then on, also for chunks that were verified and cached.
                drop_page_cache()
                for fd in fds.values():
                    expect_errno(lambda fd=fd: os.pread(fd, 100, 0), errno.EIO)
                expect_errno(lambda: os.pread(blob_fd, 100, 0), errno.EIO)
            finally:
                for fd in (*fds.values(), blob_fd):
                    os.close(fd)


# --- (c) finding 4: `blob` serves only verified bytes -------------------------------------------


def test_blob_file_serves_only_verified_bytes(tmp_path: Path) -> None:
    good_layer = estargz(files(4, b"good\n"))
    bad_layer = estargz(files(5, b"bad\n"))
    with registries() as (reg, _other):
        good_ref = push(reg, "blob/good", "v1", good_layer)
        bad_ref = push(
            reg, "blob/bad", "v2", bad_layer, served=tampered_outside_chunks(bad_layer.blob)
        )
        with store(tmp_path, (reg,)) as d:
            blob = keydir(d, bad_ref, bad_layer.digest) / "blob"
            assert os.stat(blob).st_size == len(bad_layer.blob)
            fd = os.open(blob, os.O_RDONLY)
            try:
                got = bytearray()

                def first_read() -> None:
                    got.extend(os.read(fd, 65536))

                expect_errno(first_read, errno.EIO)  # the very first read: 0 bytes served
                assert got == b""
                expect_errno(lambda: os.pread(fd, 4096, 0), errno.EIO)
            finally:
                os.close(fd)
            good = keydir(d, good_ref, good_layer.digest) / "blob"
            assert timed(lambda: good.read_bytes()) == good_layer.blob
            assert timed(lambda: read_range(good, 1000, 5000)) == good_layer.blob[1000:6000]
            # The spool is under --root and its files are never visible there.
            assert (d.root / "spool").is_dir() and not list((d.root / "spool").iterdir())


# --- (d) finding 6: the idle sweep and the layers the mount holds -----------------------------


def test_sweep_keeps_layers_the_mount_holds(tmp_path: Path) -> None:
    layer = estargz(files(6, b"held\n"))
    with registries() as (reg, _other):
        ref = push(reg, "held/app", "v1", layer)
        with store(tmp_path, (reg,), layer_idle_seconds=0.4) as d:
            kd = keydir(d, ref, layer.digest)
            tool = kd / "diff" / "bin/tool"
            data = layer.files["bin/tool"]
            fd = os.open(tool, os.O_RDONLY)  # an open file, cached inodes: the mount holds it
            try:
                assert (
                    timed(lambda: os.pread(fd, 100, 5 * CHUNK)) == data[5 * CHUNK : 5 * CHUNK + 100]
                )
                # Wait for sweeps to pass over the idle layer (the sweep runs every 0.2 s).
                wait_for(
                    "a sweep over the idle layer",
                    lambda: [
                        e for e in events(d) if e["event"] in ("layers_swept", "layer_dropped")
                    ],
                )
                assert not [e for e in events(d) if e["event"] == "layer_dropped"]
                # Read-ahead still works: a read in the second half of chunk 10 fetches
                # chunks 11 and 12 in the background (read_ahead_bytes = 0: nothing else).
                chunk11 = chunk_offsets(d, layer)[11]
                assert (
                    timed(lambda: read_range(tool, 10 * CHUNK, CHUNK))
                    == data[10 * CHUNK : 11 * CHUNK]
                )
                wait_for(
                    "the sequential read-ahead request",
                    lambda: any(
                        s <= chunk11 <= e
                        for r in reg.server.requests
                        for s, e in parse_range_header(r.header("Range"), len(layer.blob)) or []
                    ),
                    timeout=20,
                )
                # use() after the sweep finds the same layer: no second one is built.
                expect_errno(lambda: open(kd / "use", "w").close(), errno.ENOENT)
                assert len([e for e in events(d) if e["event"] == "layer_loaded"]) == 1
                assert (
                    timed(lambda: os.pread(fd, 100, 30 * CHUNK))
                    == data[30 * CHUNK : 30 * CHUNK + 100]
                )
            finally:
                os.close(fd)
            assert len([e for e in events(d) if e["event"] == "layer_loaded"]) == 1


def chunk_offsets(d: StoreDaemon, layer: Layer) -> list[int]:
    """Blob offsets of bin/tool's chunks, from the blob's own TOC."""
    from layerstore.estargz.reader import EStargzReader
    from layerstore.source import BytesSource

    index = EStargzReader.open(BytesSource(layer.blob)).index
    ino = index.find("bin/tool")
    assert ino is not None
    return [c.offset for c in index.chunks(ino)]
