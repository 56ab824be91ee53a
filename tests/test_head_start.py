"""Head start: the prioritized region's bytes fetched when the manifest arrives.

:class:`HeadStartSource` over a source whose bytes arrive when a test lets them (ranges inside
the head are answered from its one request, progressively; others, and everything after a
failure, a release or a stall, go to the wrapped source; the budget comes back). Then the
manager end to end against :class:`FakeRegistry`: a layer converted with prioritized files
and the size annotation, its config stalled: the head's request reaches the registry during the
stall, the landmark prefetch makes no request of its own, and corrupted head bytes are caught
by the chunk digests (the file still reads right).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from layerstore.errors import VerificationError
from layerstore.estargz.constants import (
    ESTARGZ_FOOTER_SIZE,
    PREFETCH_SIZE_ANNOTATION,
    TOC_DIGEST_ANNOTATION,
)
from layerstore.estargz.reader import EStargzReader, landmark_offset_hint
from layerstore.estargz.writer import WriterOptions, write_estargz
from layerstore.registry.client import RegistryClient
from layerstore.registry.settings import RegistrySettings
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.headstart import HeadStartBudget, HeadStartSource
from layerstore.runtime.layer import LayerSettings
from layerstore.runtime.manager import LayerManager, ManagerSettings
from layerstore.source import BytesSource
from tests.faultserver import FakeRegistry, FaultServer, Reply, Request, range_reply, sha256

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class GatedSource:
    """BytesSource whose progressive reads of the head deliver a piece each time ``step`` is
    released; counts every request."""

    def __init__(self, data: bytes, piece: int = 1000, fail_at: int | None = None) -> None:
        self.inner = BytesSource(data)
        self.piece = piece
        self.fail_at = fail_at
        self.step = threading.Semaphore(0)
        self.calls: list[tuple[str, int, int]] = []
        self.registry_host = "example.test"

    def size(self) -> int:
        return self.inner.size()

    def read_at(self, offset: int, length: int) -> bytes:
        self.calls.append(("at", offset, length))
        return self.inner.read_at(offset, length)

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.calls.extend(("ranges", o, n) for o, n in ranges)
        return self.inner.read_ranges(ranges)

    def read_at_progressive(
        self, offset: int, length: int, progress: Callable[[bytearray], None]
    ) -> bytes:
        self.calls.append(("progressive", offset, length))
        data = self.inner.read_at(offset, length)
        buf = bytearray()
        while len(buf) < length:
            if offset == 0 and not self.step.acquire(timeout=10):
                raise TimeoutError("test never released the next piece")
            if self.fail_at is not None and len(buf) >= self.fail_at:
                raise ConnectionError("connection reset")
            buf += data[len(buf) : len(buf) + self.piece]
            progress(buf)
        return bytes(buf)


DATA = os.urandom(20_000)


def test_ranges_inside_the_head_come_from_its_one_request_as_they_arrive() -> None:
    inner = GatedSource(DATA)
    budget = HeadStartBudget(1 << 20)
    src = HeadStartSource(inner, budget.take(10_000), budget)
    # not started yet: nothing is on its way, the wrapped source answers at once
    assert src.read_at(100, 10) == DATA[100:110]
    assert inner.calls == [("at", 100, 10)]
    inner.calls.clear()
    assert src.start() and not src.start()
    for _ in range(3):
        inner.step.release()
    seen: list[int] = []
    got: list[bytes] = []
    t = threading.Thread(
        target=lambda: got.append(
            src.read_at_progressive(1500, 4000, lambda b: seen.append(len(b)))
        )
    )
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and seen and seen[-1] == 1500  # [1500, 3000) arrived: shown at once
    for _ in range(7):
        inner.step.release()
    t.join(10)
    assert got == [DATA[1500:5500]] and seen[-1] == 4000
    assert src.read_ranges([(0, 100), (9000, 1000)]) == [DATA[:100], DATA[9000:10_000]]
    assert src.read_at(12_000, 10) == DATA[12_000:12_010]  # outside the head
    assert src.read_ranges([(9000, 2000)]) == [DATA[9000:11_000]]  # straddles its end
    assert inner.calls == [
        ("progressive", 0, 10_000),
        ("at", 12_000, 10),
        ("ranges", 9000, 2000),
    ]
    assert src.served == 4000 + 100 + 1000
    assert budget.used == 10_000
    src.release_head()
    assert budget.used == 0
    assert src.read_at(0, 10) == DATA[:10]  # from the wrapped source now
    assert inner.calls[-1] == ("at", 0, 10)
    assert src.registry_host == "example.test"  # everything else is the wrapped source's


def test_a_failed_head_sends_its_ranges_to_the_wrapped_source() -> None:
    inner = GatedSource(DATA, fail_at=3000)
    budget = HeadStartBudget(1 << 20)
    src = HeadStartSource(inner, budget.take(10_000), budget)
    src.start()
    for _ in range(5):
        inner.step.release()
    assert src.read_at(5000, 100) == DATA[5000:5100]
    assert ("at", 5000, 100) in inner.calls
    assert budget.used == 0


def test_a_stalled_head_is_given_up_by_its_readers() -> None:
    inner = GatedSource(DATA)
    src = HeadStartSource(inner, 10_000, stall_seconds=0.3)
    src.start()
    t0 = time.monotonic()
    assert src.read_ranges([(100, 100)]) == [DATA[100:200]]
    assert time.monotonic() - t0 < 5
    assert inner.calls[-1] == ("ranges", 100, 100)
    for _ in range(20):  # let the head's thread end
        inner.step.release()


def test_the_budget_caps_all_heads() -> None:
    budget = HeadStartBudget(15_000)
    assert budget.take(10_000) == 10_000
    assert budget.take(10_000) == 5_000
    assert budget.take(1) == 0
    budget.give(10_000)
    assert budget.used == 5_000


# --- the manager, end to end ---------------------------------------------------------------------
STALL = 0.8
PRIO = {"bin/app": os.urandom(300_000), "lib/libapp.so": os.urandom(200_000)}
REST = {"share/data.bin": os.urandom(400_000)}


def prioritized_blob() -> tuple[bytes, str, str, int]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in {**PRIO, **REST}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    res = write_estargz(
        io.BytesIO(raw.getvalue()),
        out,
        WriterOptions(prioritized_files=tuple(PRIO), chunk_size=64 * 1024),
    )
    assert res.prefetch_size > 300_000
    return out.getvalue(), res.toc_digest, res.diff_id, res.prefetch_size


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer("127.0.0.1") as srv:
        yield srv


TOC_STALL = 0.25


def serve(
    fault: FaultServer, corrupt_head: bool = False, toc_stall: float = 0.0, announce: bool = True
) -> tuple[str, bytes, int, list[tuple[float, str, str]], list[float]]:
    """The image, served with its config stalled STALL seconds (and, with *toc_stall*, the
    layer's first tail request that long): (ref, blob, prefetch size, the blob requests as
    (arrival, digest, range), when the config's answer was done)."""
    blob, toc, diff_id, prefetch = prioritized_blob()
    reg = FakeRegistry(fault)
    log: list[tuple[float, str, str]] = []
    config_done: list[float] = []
    config_digest: list[str] = []
    lock = threading.Lock()

    def blob_reply(req: Request, data: bytes) -> Reply:
        d = req.path.rsplit("/", 1)[1]
        rng = req.header("Range") or ""
        with lock:  # (the server answers on several threads: the config's arrives meanwhile)
            tail_seen = any(x == d and not r.startswith("bytes=0-") for _, x, r in log)
            log.append((time.monotonic(), d, rng))
        if config_digest and d == config_digest[0]:
            config_done.append(time.monotonic() + STALL)
            return Reply(200, [("Content-Type", "application/json")], data, stall=STALL)
        if toc_stall and d == sha256(blob) and not rng.startswith("bytes=0-") and not tail_seen:
            return dataclasses.replace(range_reply(data, rng), stall=toc_stall)
        if corrupt_head and rng.startswith("bytes=0-"):
            data = bytearray(data)
            data[1000] ^= 0xFF  # inside the first chunk's compressed bytes
            data = bytes(data)
        return range_reply(data, rng)

    reg.blob_reply = blob_reply
    _, manifest = reg.add_image(
        "v1",
        [blob],
        layer_media_type=GZIP,
        layer_annotations=[
            {TOC_DIGEST_ANNOTATION: toc, PREFETCH_SIZE_ANNOTATION: str(prefetch)}
            if announce
            else {TOC_DIGEST_ANNOTATION: toc}
        ],
        diff_ids=[diff_id],
    )
    config_digest.append(json.loads(manifest)["config"]["digest"])
    return f"{fault.netloc}/app:v1", blob, prefetch, log, config_done


def make_manager(fault: FaultServer, root: Path, **kw: object) -> LayerManager:
    client = RegistryClient(
        None,
        settings=RegistrySettings(
            insecure_registries=frozenset({fault.netloc}), read_timeout=5.0, retries=0
        ),
    )
    settings = ManagerSettings(layer=LayerSettings(background_fill=False), **kw)  # type: ignore[arg-type]
    return LayerManager(client, ChunkCache(str(root / "cache"), 1 << 30), settings)


def _read(layer: object, path: str) -> bytes:
    index = layer.index  # type: ignore[attr-defined]
    ino = index.find(path)
    assert ino is not None
    return layer.read(ino, 0, index.getattr(ino).size)  # type: ignore[attr-defined,no-any-return]


def _wait_cached(layer: object, paths: list[str], timeout: float = 10) -> None:
    index, cache = layer.index, layer.cache  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.digest in cache for p in paths for c in index.chunks(index.find(p))):
            return
        time.sleep(0.02)
    raise AssertionError("the prioritized files were not cached")


def test_the_head_is_fetched_during_the_config_and_feeds_the_landmark_prefetch(
    fault: FaultServer, tmp_path: Path
) -> None:
    """The head is asked for once the TOC's bytes are in (its transfer would slow the TOC's),
    while the config is still on its way, and the landmark prefetch is answered from it."""
    ref, blob, prefetch, log, config_done = serve(fault, toc_stall=TOC_STALL)
    m = make_manager(fault, tmp_path)
    try:
        digest = sha256(blob)
        m.use(ref, digest)
        layer = m.get(ref, digest)
        _wait_cached(layer, list(PRIO))
        blob_requests = [(t, rng) for t, d, rng in log if d == digest]
        heads = [(t, rng) for t, rng in blob_requests if rng.startswith("bytes=0-")]
        assert [rng for _, rng in heads] == [f"bytes=0-{prefetch - 1}"]
        assert heads[0][0] < config_done[0] - 0.2, "the head waited for the config"
        tails = [t for t, rng in blob_requests if not rng.startswith("bytes=0-")]
        assert heads[0][0] >= tails[0] + TOC_STALL - 0.02, "the head shared the TOC's transfer"
        # the landmark prefetch asked for nothing below the landmark itself
        below = [rng for _, rng in blob_requests if _start(rng) < prefetch]
        assert below == [f"bytes=0-{prefetch - 1}"]
        for path, data in PRIO.items():
            assert _read(layer, path) == data
        assert _read(layer, "share/data.bin") == REST["share/data.bin"]
        assert m._head_budget.used == 0  # released after the landmark prefetch
    finally:
        m.close()


def test_an_unannounced_region_gets_its_head_start_from_the_toc(
    fault: FaultServer, tmp_path: Path
) -> None:
    """A blob whose descriptor does not say how long its prioritized region is (written by
    another tool): the TOC's first bytes say where the landmark is, and the head is asked for
    as one request once the TOC's bytes are in, while the config is still on its way."""
    ref, blob, prefetch, log, config_done = serve(fault, toc_stall=TOC_STALL, announce=False)
    m = make_manager(fault, tmp_path)
    try:
        digest = sha256(blob)
        m.use(ref, digest)
        layer = m.get(ref, digest)
        _wait_cached(layer, list(PRIO))
        blob_requests = [(t, rng) for t, d, rng in log if d == digest]
        below = [(t, rng) for t, rng in blob_requests if _start(rng) < prefetch]
        assert [rng for _, rng in below] == [f"bytes=0-{prefetch - 1}"]
        assert below[0][0] < config_done[0] - 0.2, "the head waited for the config"
        for path, data in PRIO.items():
            assert _read(layer, path) == data
        assert m._head_budget.used == 0
    finally:
        m.close()


def test_the_landmark_hint_reads_only_the_start_of_the_toc() -> None:
    """``landmark_offset_hint`` on a TOC member: the landmark entry's offset, as the verified
    index has it; None without a landmark and for bytes that are not a TOC member."""
    blob, _, _, prefetch = prioritized_blob()
    reader = EStargzReader.open(BytesSource(blob))
    member = blob[reader.toc_offset : len(blob) - ESTARGZ_FOOTER_SIZE]
    assert landmark_offset_hint(member) == reader.index.prefetch_landmark_offset == prefetch
    assert landmark_offset_hint(member[: len(member) // 2]) in (prefetch, None)
    assert landmark_offset_hint(b"not gzip at all") is None
    assert landmark_offset_hint(b"") is None
    plain = io.BytesIO()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("a")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    write_estargz(io.BytesIO(raw.getvalue()), plain, WriterOptions())
    data = plain.getvalue()
    r2 = EStargzReader.open(BytesSource(data))
    assert landmark_offset_hint(data[r2.toc_offset : len(data) - ESTARGZ_FOOTER_SIZE]) is None
    fake = gzip.compress(b'{"entries":[{"name":".prefetch.landmark","type":"reg"}]}')
    assert landmark_offset_hint(fake) is None  # no offset: no hint


def test_corrupt_head_bytes_are_caught_by_the_chunk_digests(
    fault: FaultServer, tmp_path: Path
) -> None:
    """The head's bytes are the registry's like any others: a chunk that does not match its
    digest is never served (the read fails, EIO at the FUSE boundary), the others are."""
    ref, blob, _, _, _ = serve(fault, corrupt_head=True)
    m = make_manager(fault, tmp_path)
    try:
        digest = sha256(blob)
        m.use(ref, digest)
        layer = m.get(ref, digest)
        layer.fetcher.landmark_prefetch(_prefetch(layer))
        assert layer.fetcher.stats.verification_failures >= 1
        with pytest.raises(VerificationError):
            _read(layer, "bin/app")  # its first chunk holds the flipped byte
        assert _read(layer, "lib/libapp.so") == PRIO["lib/libapp.so"]
    finally:
        m.close()


def test_no_head_start_when_the_toc_is_cached_or_it_is_off(
    fault: FaultServer, tmp_path: Path
) -> None:
    ref, blob, _, log, config_done = serve(fault)
    digest = sha256(blob)
    m = make_manager(fault, tmp_path)
    try:
        m.use(ref, digest)
        _wait_cached(m.get(ref, digest), list(PRIO))
    finally:
        m.close()
    log.clear()
    m = make_manager(fault, tmp_path)  # same cache: the TOC is there, so are the chunks
    try:
        m.use(ref, digest)
        assert _read(m.get(ref, digest), "bin/app") == PRIO["bin/app"]
        assert not [rng for _, d, rng in log if d == digest and rng.startswith("bytes=0-")]
    finally:
        m.close()
    log.clear()
    m = make_manager(fault, tmp_path / "other", head_start_bytes=0)
    try:
        m.use(ref, digest)
        _wait_cached(m.get(ref, digest), list(PRIO))
        layer = m.get(ref, digest)
        firsts = [t for t, d, rng in log if d == digest and _start(rng) < _prefetch(layer)]
        assert firsts and min(firsts) > config_done[-1] - 0.1  # the landmark prefetch's own
    finally:
        m.close()


def _start(rng: str) -> int:
    return int(rng[6:].split("-")[0]) if rng.startswith("bytes=") else 0


def _prefetch(layer: object) -> int:
    return int(layer.index.prefetch_landmark_offset or 0)  # type: ignore[attr-defined]


def test_progressive_multi_range_reads_inside_the_head_come_from_it() -> None:
    """``read_ranges_progressive`` (the fetcher's multi-range batches): ranges all inside the
    head are reported from its buffer as it fills, each under its own offset; a set reaching
    past the head goes to the wrapped source (which here has no progressive multi-range read:
    its plain ``read_ranges`` answers)."""
    inner = GatedSource(DATA)
    budget = HeadStartBudget(1 << 20)
    src = HeadStartSource(inner, budget.take(10_000), budget)
    src.start()
    for _ in range(10):
        inner.step.release()
    seen: list[tuple[int, bytes]] = []
    got = src.read_ranges_progressive(
        [(100, 50), (8000, 1500)], lambda off, buf: seen.append((off, bytes(buf)))
    )
    assert got == [DATA[100:150], DATA[8000:9500]]
    assert {off for off, _ in seen} == {100, 8000}
    assert all(b == DATA[off : off + len(b)] for off, b in seen)
    assert inner.calls == [("progressive", 0, 10_000)]
    seen.clear()
    got = src.read_ranges_progressive(
        [(100, 50), (9500, 1000)], lambda off, buf: seen.append((off, bytes(buf)))
    )
    assert got == [DATA[100:150], DATA[9500:10_500]]
    assert inner.calls[1:] == [("ranges", 100, 50), ("ranges", 9500, 1000)]
    assert seen == []
