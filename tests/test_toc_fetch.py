"""How a layer's TOC is fetched from the blob's tail (``LayerManager._fetch_toc_member``):
one request for a guessed tail, and, for a large blob, its footer asked for on its own
alongside, so that a TOC longer than the guess has its head asked for as soon as the footer
is in, not after the whole tail has arrived. Through a real RegistryClient and a fault-
injecting registry (the tail guess answered late)."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
from layerstore.estargz.footer import parse_footer
from layerstore.estargz.writer import WriterOptions, write_estargz
from layerstore.registry.client import RegistryClient
from layerstore.registry.settings import RegistrySettings
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.layer import LayerSettings
from layerstore.runtime.manager import LayerManager, ManagerSettings
from tests.faultserver import FakeRegistry, FaultServer, Reply, Request, range_reply, sha256

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
GUESS = 4096
STALL = 0.4
FILES = {f"etc/conf.d/file-{i:04d}.conf": f"setting {i}\n".encode() for i in range(400)}


def many_files_blob() -> tuple[bytes, str, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(raw.getvalue()), out, WriterOptions())
    return out.getvalue(), res.toc_digest, res.diff_id


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer("127.0.0.1") as srv:
        yield srv


def serve(
    fault: FaultServer, lie_in_footer: bool = False
) -> tuple[str, bytes, int, list[tuple[float, str]], list[float]]:
    """The image; the tail guess (a range of GUESS bytes ending at the blob's end) is answered
    STALL seconds late. Returns (ref, blob, TOC offset, the blob's range requests as
    (arrival, range), when the tail's answer left). *lie_in_footer*: a request for the footer
    alone gets a well-formed footer pointing 1,000 bytes before the TOC."""
    blob, toc, diff_id = many_files_blob()
    toc_offset, _ = parse_footer(blob[-51:])
    reg = FakeRegistry(fault)
    log: list[tuple[float, str]] = []
    tail_sent: list[float] = []
    lock = threading.Lock()
    digest = sha256(blob)
    size = len(blob)

    def blob_reply(req: Request, data: bytes) -> Reply:
        d = req.path.rsplit("/", 1)[1]
        rng = req.header("Range") or ""
        if d == digest:
            with lock:
                log.append((time.monotonic(), rng))
            if rng == f"bytes={size - GUESS}-{size - 1}":
                tail_sent.append(time.monotonic() + STALL)
                return dataclasses.replace(range_reply(data, rng), stall=STALL)
            if lie_in_footer and rng == f"bytes={size - 51}-{size - 1}":
                footer = bytearray(data[-51:])
                footer[16:38] = f"{toc_offset - 1000:016x}STARGZ".encode()
                assert parse_footer(bytes(footer))[0] == toc_offset - 1000
                return range_reply(data[:-51] + bytes(footer), rng)
        return range_reply(data, rng)

    reg.blob_reply = blob_reply
    reg.add_image(
        "v1",
        [blob],
        layer_media_type=GZIP,
        layer_annotations=[{TOC_DIGEST_ANNOTATION: toc}],
        diff_ids=[diff_id],
    )
    return f"{fault.netloc}/app:v1", blob, toc_offset, log, tail_sent


def make_manager(fault: FaultServer, root: Path, footer_first: int) -> LayerManager:
    client = RegistryClient(
        None,
        settings=RegistrySettings(
            insecure_registries=frozenset({fault.netloc}), read_timeout=5.0, retries=0
        ),
    )
    settings = ManagerSettings(
        layer=LayerSettings(background_fill=False),
        tail_guess_bytes=GUESS,
        tail_guess_share=0.0,
        tail_guess_max_bytes=GUESS,
        footer_first_min_bytes=footer_first,
        early_toc=False,
    )
    return LayerManager(client, ChunkCache(str(root / "cache"), 1 << 30), settings)


def _load(
    fault: FaultServer, tmp_path: Path, footer_first: int, lie: bool = False
) -> tuple[float, list[str]]:
    """Seconds between the tail's answer and the request for the TOC's head (negative: the
    head was asked for first), and the blob's ranges asked for (relative to the TOC's
    offset: ``+0-...``); the layer's files read back whole."""
    ref, blob, toc_offset, log, tail_sent = serve(fault, lie_in_footer=lie)
    size = len(blob)
    assert size - GUESS > toc_offset, "the test needs a TOC longer than the guess"
    m = make_manager(fault, tmp_path, footer_first)
    try:
        layer = m.get(ref, sha256(blob))
        for name in ("etc/conf.d/file-0000.conf", "etc/conf.d/file-0399.conf"):
            ino = layer.index.find(name)
            assert ino is not None
            assert layer.read(ino, 0, 100) == FILES[name]
        heads = [t for t, rng in log if rng == f"bytes={toc_offset}-{size - GUESS - 1}"]
        assert heads, log
        rel = [
            rng.replace(f"bytes={toc_offset - 1000}-", "bytes=TOC-1000-").replace(
                f"bytes={size - 51}-", "bytes=FOOTER-"
            )
            for _, rng in log
        ]
        return heads[0] - tail_sent[0], rel
    finally:
        m.close()


def test_a_long_toc_has_its_head_asked_for_before_the_tail_arrives(
    fault: FaultServer, tmp_path: Path
) -> None:
    delta, ranges = _load(fault, tmp_path, footer_first=1)
    assert delta < -STALL / 2
    assert sum(r.startswith("bytes=FOOTER-") for r in ranges) == 1


def test_without_the_footer_first_the_head_waits_for_the_tail(
    fault: FaultServer, tmp_path: Path
) -> None:
    delta, ranges = _load(fault, tmp_path, footer_first=0)
    assert delta >= 0
    assert not any(r.startswith("bytes=FOOTER-") for r in ranges)


def test_a_footer_that_disagrees_with_the_tail_is_not_used(
    fault: FaultServer, tmp_path: Path
) -> None:
    """The footer answered alone points elsewhere: its early head request is for another
    region and is not used; the tail's footer decides, and the TOC digest check passes."""
    delta, ranges = _load(fault, tmp_path, footer_first=1, lie=True)
    assert delta >= 0
    assert any(r.startswith("bytes=TOC-1000-") for r in ranges)  # asked for, not used
