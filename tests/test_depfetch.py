"""The read-triggered dependency fetch (layerstore.runtime.depfetch) and the merged view of an
image's layers it looks paths up in (layerstore.runtime.stackview), through a real
LayerManager, real eStargz layers and an in-memory registry.

The fetcher's own read-ahead is off in these tests (``readahead_bytes = 0``), so a chunk in the
cache was fetched because a reader read it or because the dependency fetch wanted it."""

from __future__ import annotations

import importlib.util
import io
import marshal
import random
import struct
import tarfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Union

import pytest

from layerstore.estargz.writer import WriterOptions, write_estargz
from layerstore.runtime.cache import ChunkCache
from layerstore.runtime.depfetch import DependencyFetchSettings
from layerstore.runtime.fetcher import FetcherSettings
from layerstore.runtime.layer import Layer, LayerSettings
from layerstore.runtime.manager import LayerManager, ManagerSettings
from layerstore.runtime.prefetch import DependencyPrefetchSettings
from layerstore.runtime.stackview import StackView
from layerstore.source import BytesSource
from tests.test_elfdeps import make_elf, make_elf_paths
from tests.test_fetcher import CountingSource
from tests.test_manager import Blob, FakeClient, desc

T = 1_700_000_000  # mtime of every file unless said otherwise

# A file is bytes, (bytes, mtime), or a str: a symlink to it
Entry = Union[bytes, "tuple[bytes, int]", str]


def layer_blob(client: FakeClient, files: dict[str, Entry]) -> Blob:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, v in files.items():
            ti = tarfile.TarInfo(name)
            ti.mtime = T
            if isinstance(v, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, v
                tf.addfile(ti)
                continue
            data, mtime = v if isinstance(v, tuple) else (v, T)
            ti.size, ti.mode, ti.mtime = len(data), 0o755, mtime
            tf.addfile(ti, io.BytesIO(data))
    out = io.BytesIO()
    res = write_estargz(io.BytesIO(buf.getvalue()), out, WriterOptions(chunk_size=1024))
    data = out.getvalue()
    blob = Blob(data, res.blob_digest, res.toc_digest, res.diff_id, res.uncompressed_size)
    client.sources[blob.digest] = CountingSource(BytesSource(data))
    return blob


def settings(**dep: int) -> ManagerSettings:
    return ManagerSettings(
        layer=LayerSettings(landmark_prefetch=False),
        fetcher=FetcherSettings(readahead_bytes=0),
        dependency_prefetch=DependencyPrefetchSettings(entrypoint_bytes=0),  # reads only
        dependency_fetch=DependencyFetchSettings(**dep),  # type: ignore[arg-type]
    )


def image(client: FakeClient, ref: str, layers: Sequence[dict[str, Entry]]) -> list[Blob]:
    """An image of *layers* (bottom first) in the fake registry."""
    blobs = [layer_blob(client, files) for files in layers]
    client.add(ref, [(desc(b), b.diff_id) for b in blobs], {"Cmd": ["/bin/sh"]})
    return blobs


def find(layers: Sequence[Layer], path: str) -> tuple[Layer, int]:
    for layer in reversed(layers):  # top first
        ino = layer.index.find(path)
        if ino is not None:
            return layer, ino
    raise AssertionError(path)


def cached(cache: ChunkCache, layers: Sequence[Layer], path: str) -> bool:
    layer, ino = find(layers, path)
    chunks = layer.index.chunks(ino)
    assert chunks, path
    return all(c.digest in cache for c in chunks)


def read_all(layer: Layer, ino: int) -> bytes:
    return layer.read(ino, 0, 1 << 30)


def wait_for(cond: object, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not done: {what}"
        time.sleep(0.01)


def settle(mgr: LayerManager, quiet_for: float = 0.3, limit: float = 20.0) -> None:
    """Until the dependency fetch has done nothing for *quiet_for* seconds."""
    stats = mgr._depfetch.stats  # the test watches the worker's counters
    deadline = time.monotonic() + limit
    last = dict(stats)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_for:
        assert time.monotonic() < deadline, "the dependency fetch never settled"
        time.sleep(0.02)
        if stats != last:
            last = dict(stats)
            quiet_since = time.monotonic()


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", 1 << 30)


PAD = b"".join(b"# padding %04d: keeps each file a few 1 KiB chunks long\n" % i for i in range(60))


# --- shared objects --------------------------------------------------------------------------


def test_libraries_followed_across_layers_with_runpath(cache: ChunkCache) -> None:
    client = FakeClient({})
    base: dict[str, Entry] = {
        "lib64": "usr/lib64",  # a directory symlink, as on merged-/usr systems
        "usr/lib64/ld-linux-x86-64.so.2": make_elf(None, [], pad=1500),
        "usr/lib/x86_64-linux-gnu/libbar.so.1": "libbar.so.1.0",
        "usr/lib/x86_64-linux-gnu/libbar.so.1.0": make_elf(None, [], pad=2000),
        "usr/lib/x86_64-linux-gnu/libunused.so": make_elf(None, [], pad=2100),  # other bytes
    }
    top: dict[str, Entry] = {
        "app/bin/prog": make_elf("/lib64/ld-linux-x86-64.so.2", ["libfoo.so"], pad=3000).replace(
            b"libfoo.so", b"libfoo.so"
        ),
        "app/lib/libfoo.so": make_elf_paths(["libbar.so.1"], gap=4000),
    }
    # prog finds libfoo.so through its RUNPATH
    top["app/bin/prog"] = make_elf_paths(["libfoo.so"], runpath="$ORIGIN/../lib", gap=3000)
    blobs = image(client, "reg.example/elf:1", [base, top])
    mgr = LayerManager(client, cache, settings())
    layers = [mgr.get("reg.example/elf:1", b.digest) for b in blobs]
    for b in blobs:
        mgr.use("reg.example/elf:1", b.digest)
    layer, ino = find(layers, "app/bin/prog")
    read_all(layer, ino)
    wait_for(lambda: cached(cache, layers, "usr/lib/x86_64-linux-gnu/libbar.so.1.0"), "libbar")
    assert cached(cache, layers, "app/lib/libfoo.so")
    settle(mgr)
    assert not cached(cache, layers, "usr/lib/x86_64-linux-gnu/libunused.so")
    assert not cached(cache, layers, "usr/lib64/ld-linux-x86-64.so.2")  # prog has no interp
    mgr.close()


def test_interpreter_and_large_library_whose_dynamic_segment_is_further(
    cache: ChunkCache,
) -> None:
    client = FakeClient({})
    # 40 KiB apart, incompressible: the dynamic segment is in a later chunk than the headers
    big = bytearray(make_elf_paths(["libdep.so"], gap=40_000))
    dyn_size = 4 * 16  # DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_NULL
    gap_end = len(big) - dyn_size
    big[gap_end - 40_000 : gap_end] = random.Random(3).randbytes(40_000)
    files: dict[str, Entry] = {
        "lib64": "usr/lib64",
        "usr/lib64/ld-linux-x86-64.so.2": make_elf(None, [], pad=1500),
        "usr/lib/libbig.so": bytes(big),
        "usr/lib/libdep.so": make_elf(None, [], pad=100),
        "bin/prog": make_elf("/lib64/ld-linux-x86-64.so.2", ["libbig.so"], pad=500),
    }
    (blob,) = image(client, "reg.example/big:1", [files])
    mgr = LayerManager(client, cache, settings(file_bytes=4096))  # libbig counts as large
    layer = mgr.get("reg.example/big:1", blob.digest)
    mgr.use("reg.example/big:1", blob.digest)
    read_all(*find([layer], "bin/prog"))
    wait_for(lambda: cached(cache, [layer], "usr/lib/libdep.so"), "libdep")
    assert cached(cache, [layer], "usr/lib64/ld-linux-x86-64.so.2")
    big_layer, big = find([layer], "usr/lib/libbig.so")
    chunks = big_layer.index.chunks(big)
    assert len(chunks) > 30
    # the first chunk and the ones with the dynamic segment, not the whole library
    got = [c.digest in cache for c in chunks]
    assert got[0] and got[-1] and not all(got)
    mgr.close()


# --- Python modules ----------------------------------------------------------------------------


def pyc(source: bytes, mtime: int = T) -> bytes:
    """Bytecode of *source* for this interpreter, stamped with *mtime* and its size."""
    code = compile(source, "<m>", "exec")
    header = struct.pack("<III", 0, mtime & 0xFFFFFFFF, len(source))
    return importlib.util.MAGIC_NUMBER + header + marshal.dumps(code)


TAG = importlib.util.cache_from_source("/x/m.py").rsplit("/", 1)[1][2:-4]  # "cpython-311"
STD = "usr/lib/python3.11"


def python_image() -> dict[str, Entry]:
    json_src = b"from .decoder import JSONDecoder\n" + PAD
    return {
        f"{STD}/json/__init__.py": json_src,
        f"{STD}/json/__pycache__/__init__.{TAG}.pyc": pyc(json_src),
        f"{STD}/json/decoder.py": b"import re\n" + PAD,
        f"{STD}/json/__pycache__/decoder.{TAG}.pyc": pyc(b"import re\n" + PAD),
        f"{STD}/re.py": b"x = 1\n" + PAD,
        f"{STD}/unrelated.py": b"y = 2\n" + PAD,
        "app/pkg/__init__.py": b"",
        "app/pkg/main.py": (
            b"from . import sibling\n"
            b"import json\n"
            b"from .sub import thing, not_a_module\n"
            b"import pkg.other\n"
            b"def later():\n"
            b"    import pkg.lazy\n" + PAD
        ),
        "app/pkg/sibling.py": b"SIBLING = 1\n" + PAD,
        "app/pkg/other.py": b"OTHER = 1\n" + PAD,
        "app/pkg/lazy.py": b"LAZY = 1\n" + PAD,
        "app/pkg/sub/__init__.py": b"from .deep import *\n" + PAD,
        "app/pkg/sub/thing.py": b"THING = 1\n" + PAD,
        "app/pkg/sub/deep.py": b"DEEP = 1\n" + PAD,
    }


def test_a_python_module_read_brings_the_modules_it_imports(cache: ChunkCache) -> None:
    client = FakeClient({})
    (blob,) = image(client, "reg.example/py:1", [python_image()])
    mgr = LayerManager(client, cache, settings())
    layer = mgr.get("reg.example/py:1", blob.digest)
    mgr.use("reg.example/py:1", blob.digest)
    read_all(*find([layer], "app/pkg/main.py"))
    wait_for(lambda: cached(cache, [layer], "app/pkg/sub/deep.py"), "deep (two levels on)")
    settle(mgr)
    for path in (
        "app/pkg/sibling.py",  # from . import sibling
        "app/pkg/other.py",  # import pkg.other (its root "app" learned from main.py)
        "app/pkg/sub/thing.py",  # from .sub import thing
        "app/pkg/sub/deep.py",  # sub/__init__: from .deep import *
        f"{STD}/json/__pycache__/__init__.{TAG}.pyc",  # the bytecode, valid: not the source
        f"{STD}/json/__pycache__/decoder.{TAG}.pyc",  # json's own relative import
        f"{STD}/re.py",  # decoder's import, a source module of the standard library
    ):
        assert cached(cache, [layer], path), path
    for path in (
        "app/pkg/lazy.py",  # imported in a function body
        f"{STD}/json/__init__.py",  # the bytecode is up to date
        f"{STD}/unrelated.py",
    ):
        assert not cached(cache, [layer], path), path
    mgr.close()


def test_stale_bytecode_brings_its_source(cache: ChunkCache) -> None:
    client = FakeClient({})
    src_a, src_b = b"import modb\n" + PAD, b"B = 1\n" + PAD
    files: dict[str, Entry] = {
        # mtimes normalised when the image was built: the bytecode records other ones
        f"{STD}/moda.py": src_a,
        f"{STD}/__pycache__/moda.{TAG}.pyc": pyc(src_a, mtime=T - 99),
        f"{STD}/modb.py": src_b,
        f"{STD}/__pycache__/modb.{TAG}.pyc": pyc(src_b, mtime=T - 99),
    }
    (blob,) = image(client, "reg.example/stale:1", [files])
    mgr = LayerManager(client, cache, settings())
    layer = mgr.get("reg.example/stale:1", blob.digest)
    mgr.use("reg.example/stale:1", blob.digest)
    read_all(*find([layer], f"{STD}/__pycache__/moda.{TAG}.pyc"))
    wait_for(lambda: cached(cache, [layer], f"{STD}/modb.py"), "modb's source")
    assert cached(cache, [layer], f"{STD}/moda.py")
    assert cached(cache, [layer], f"{STD}/__pycache__/modb.{TAG}.pyc")
    mgr.close()


def test_modules_of_a_lower_layer_and_the_budget(cache: ChunkCache) -> None:
    client = FakeClient({})
    base: dict[str, Entry] = {f"{STD}/m{i}.py": f"M = {i}\n".encode() + PAD for i in range(6)}
    top: dict[str, Entry] = {
        "app/main.py": b"".join(f"import m{i}\n".encode() for i in range(6)) + PAD
    }
    blobs = image(client, "reg.example/two:1", [base, top])
    mgr = LayerManager(client, cache, settings(max_files=3))
    layers = [mgr.get("reg.example/two:1", b.digest) for b in blobs]
    read_all(*find(layers, "app/main.py"))
    settle(mgr)
    got = [cached(cache, layers, f"{STD}/m{i}.py") for i in range(6)]
    assert sum(got) == 3, got
    mgr.close()


def test_layers_with_a_plan_of_their_own_are_left_alone(cache: ChunkCache) -> None:
    """A layer whose start-up files a plan fetches (an attached profile's section, a
    prioritized region) neither triggers the dependency fetch nor has files fetched by it."""
    client = FakeClient({})
    base: dict[str, Entry] = {f"{STD}/m{i}.py": f"M = {i}\n".encode() + PAD for i in range(3)}
    top: dict[str, Entry] = {
        "app/main.py": b"import helper\n" + b"".join(f"import m{i}\n".encode() for i in range(3))
        + PAD,
        "app/helper.py": b"H = 1\n" + PAD,
        "app/second.py": b"import third\n" + PAD,
        "app/third.py": b"T = 1\n" + PAD,
    }  # fmt: skip
    blobs = image(client, "reg.example/plan:1", [base, top])
    mgr = LayerManager(client, cache, settings())
    layers = [mgr.get("reg.example/plan:1", b.digest) for b in blobs]
    assert not any(layer.planned for layer in layers)
    layers[0].profile_planned = True  # as the profile prefetch sets it
    assert layers[0].planned and not layers[1].planned
    read_all(*find(layers, "app/main.py"))
    wait_for(lambda: cached(cache, layers, "app/helper.py"), "helper (same, unplanned layer)")
    settle(mgr)
    assert not any(cached(cache, layers, f"{STD}/m{i}.py") for i in range(3))
    layers[1].profile_planned = True
    read_all(*find(layers, "app/second.py"))
    settle(mgr)
    assert not cached(cache, layers, "app/third.py")
    mgr.close()


def test_disabled_fetches_nothing(cache: ChunkCache) -> None:
    client = FakeClient({})
    (blob,) = image(client, "reg.example/off:1", [python_image()])
    mgr = LayerManager(client, cache, settings(enabled=False))
    layer = mgr.get("reg.example/off:1", blob.digest)
    calls = len(client.sources[blob.digest].calls)
    read_all(*find([layer], "app/pkg/main.py"))
    time.sleep(0.2)
    assert len(client.sources[blob.digest].calls) == calls + 1  # the read itself
    assert not cached(cache, [layer], "app/pkg/sibling.py")
    mgr.close()


def test_hostile_files_are_skipped(cache: ChunkCache) -> None:
    client = FakeClient({})
    files: dict[str, Entry] = {
        "loop/a": "b",
        "loop/b": "a",
        "app/garbage.py": bytes(range(256)) * 64,
        f"app/__pycache__/bad.{TAG}.pyc": importlib.util.MAGIC_NUMBER + b"\0" * 12 + b"(" * 5000,
        "app/bad.py": b"import os\n",
        "app/broken-elf": b"\x7fELF\x02\x01\x01" + b"\xff" * 3000,
        "app/deep.py": b"(" * 100_000 + b"\nimport loop.a\n",
        "app/ok.py": b"import target\n",
        "app/target.py": b"T = 1\n" + PAD,
    }
    (blob,) = image(client, "reg.example/bad:1", [files])
    mgr = LayerManager(client, cache, settings())
    layer = mgr.get("reg.example/bad:1", blob.digest)
    for path in (
        "app/garbage.py",
        f"app/__pycache__/bad.{TAG}.pyc",
        "app/broken-elf",
        "app/deep.py",
    ):
        read_all(*find([layer], path))
    read_all(*find([layer], "app/ok.py"))  # still working after all that
    wait_for(lambda: cached(cache, [layer], "app/target.py"), "target")
    mgr.close()


# --- the merged view ---------------------------------------------------------------------------


def test_stack_view_merges_layers_like_overlayfs() -> None:
    client = FakeClient({})
    lower: dict[str, Entry] = {
        "usr/lib/a.so": b"a",
        "usr/lib/gone.so": b"g",
        "usr/lib/real/x.so": b"x",
        "etc/f": b"f",
    }
    upper: dict[str, Entry] = {
        "usr/lib/.wh.gone.so": b"",
        "usr/lib/b.so": b"b",
        "lib": "usr/lib",  # absolute-free directory symlink
        "usr/lib/link": "real",
        "usr/lib/up": "../../etc/f",
        "usr/lib/self": "self",
    }
    blobs = image(client, "reg.example/view:1", [lower, upper])
    mgr = LayerManager(
        client, ChunkCache(Path("/tmp") / f"v{time.time_ns()}", 1 << 20), settings(enabled=False)
    )
    layers = [mgr.get("reg.example/view:1", b.digest) for b in blobs]
    view = StackView(list(reversed(layers)))
    a = view.file("lib/a.so")
    assert a is not None and a.path == "usr/lib/a.so" and a.layer is layers[0]
    b = view.file("/lib/b.so")
    assert b is not None and b.layer is layers[1]
    assert view.file("lib/gone.so") is None  # whited out
    x = view.file("lib/link/x.so")
    assert x is not None and x.path == "usr/lib/real/x.so"
    f = view.file("lib/up")
    assert f is not None and f.path == "etc/f"
    assert view.file("usr/lib/self") is None  # a loop ends
    names = set(view.listdir("usr/lib"))
    assert {"a.so", "b.so", "real", "link", "up"} <= names and "gone.so" not in names
    assert not any(n.startswith(".wh.") for n in names)
    assert view.realdir("lib") == "usr/lib"
    mgr.close()


def test_sibling_layers_are_built_on_the_first_lookup(cache: ChunkCache) -> None:
    client = FakeClient({})
    blobs = image(client, "reg.example/sib:1", [{"a": b"a"}, {"b": b"b"}, {"c": b"c"}])
    mgr = LayerManager(client, cache, settings())
    mgr.get("reg.example/sib:1", blobs[0].digest)
    wait_for(lambda: len(mgr.loaded()) == 3, "the other two layers")
    # each built once: one tail request per layer
    assert mgr.tail_requests == 3
    for b in blobs[1:]:
        mgr.get("reg.example/sib:1", b.digest)
    assert mgr.tail_requests == 3
    mgr.close()


@pytest.mark.parametrize(
    "cmd",
    [
        ["python3", "-c", "import json; from pkg import mod"],
        ["python3", "-u", "-m", "pkg.mod"],
        ["/usr/bin/python3", "app/run.py"],
    ],
)
def test_the_image_command_says_what_python_will_import(cache: ChunkCache, cmd: list[str]) -> None:
    """With the entrypoint prefetch on (at first use, before any read): a Python interpreter
    as the entrypoint brings its start-up modules and what its command line imports first."""
    client = FakeClient({})
    files: dict[str, Entry] = {
        "usr/bin/python3": "python3.11",
        "usr/bin/python3.11": make_elf(None, [], pad=100),
        f"{STD}/encodings/__init__.py": b"from . import aliases\n" + PAD,
        f"{STD}/encodings/aliases.py": b"A = 1\n" + PAD,
        f"{STD}/encodings/utf_8.py": b"U = 1\n" + PAD,
        f"{STD}/json/__init__.py": b"J = 1\n" + PAD,
        "usr/local/lib/python3.11/dist-packages/pkg/__init__.py": b"P = 1\n" + PAD,
        "usr/local/lib/python3.11/dist-packages/pkg/mod.py": b"import pkg.dep\n" + PAD,
        "usr/local/lib/python3.11/dist-packages/pkg/dep.py": b"D = 1\n" + PAD,
        "usr/local/lib/python3.11/dist-packages/pkg/other.py": b"O = 1\n" + PAD,
        "usr/local/lib/python3.11/dist-packages/x.pth": b"# a path file\n",
        "app/run.py": b"import pkg.mod\n" + PAD,
    }
    blob = layer_blob(client, files)
    ref = "reg.example/cmd:1"
    client.add(ref, [(desc(blob), blob.diff_id)], {"Cmd": cmd, "WorkingDir": "/"})
    s = settings()
    mgr = LayerManager(client, cache, replace(s, dependency_prefetch=DependencyPrefetchSettings()))
    layer = mgr.get(ref, blob.digest)
    mgr.use(ref, blob.digest)
    site = "usr/local/lib/python3.11/dist-packages"
    wait_for(lambda: cached(cache, [layer], f"{site}/pkg/dep.py"), "pkg.dep")
    settle(mgr)
    for path in (
        f"{STD}/encodings/__init__.py",
        f"{STD}/encodings/aliases.py",
        f"{STD}/encodings/utf_8.py",
        f"{site}/x.pth",
        f"{site}/pkg/__init__.py",
        f"{site}/pkg/mod.py",
    ):
        assert cached(cache, [layer], path), path
    assert cached(cache, [layer], f"{STD}/json/__init__.py") == ("json" in cmd[-1])
    assert cached(cache, [layer], "app/run.py") == cmd[-1].endswith(".py")
    assert not cached(cache, [layer], f"{site}/pkg/other.py")
    mgr.close()


def _judged(**kw: float) -> ManagerSettings:
    s = settings()
    return replace(
        s,
        dependency_fetch=DependencyFetchSettings(
            judge_reads=8,
            min_hit_rate=0.5,
            pause_seconds=60.0,
            **kw,  # type: ignore[arg-type]
        ),
    )


def test_a_reader_that_never_reads_what_was_fetched_pauses_the_fetch(cache: ChunkCache) -> None:
    """A reader picking modules that do not import each other (a crawler): each one's imports
    are fetched until its first 8 judged reads show none of them read; then the fetch pauses
    for the layer: the next module's imports are not fetched."""
    client = FakeClient({})
    files: dict[str, Entry] = {}
    for i in range(12):
        files[f"{STD}/m{i}.py"] = f"import x{i}\n".encode() + PAD
        files[f"{STD}/x{i}.py"] = f"X = {i}\n".encode() + PAD
    (blob,) = image(client, "reg.example/crawl:1", [files])
    mgr = LayerManager(client, cache, _judged())
    layer = mgr.get("reg.example/crawl:1", blob.digest)
    mgr.use("reg.example/crawl:1", blob.digest)
    stats = mgr._depfetch.stats
    for i in range(7):
        read_all(*find([layer], f"{STD}/m{i}.py"))
        settle(mgr, quiet_for=0.1)
    assert all(cached(cache, [layer], f"{STD}/x{i}.py") for i in range(7))
    assert stats["pauses"] == 0
    read_all(*find([layer], f"{STD}/m7.py"))  # the 8th miss in a row: paused
    read_all(*find([layer], f"{STD}/m8.py"))
    settle(mgr, quiet_for=0.2)
    assert stats["pauses"] == 1 and stats["hits"] == 0
    assert not cached(cache, [layer], f"{STD}/x7.py")
    assert not cached(cache, [layer], f"{STD}/x8.py")
    mgr.close()


def test_a_reader_that_reads_what_was_fetched_keeps_the_fetch(cache: ChunkCache) -> None:
    """A container importing its modules reads the files the fetch queued: every judged read
    after the first is a hit, and the fetch never pauses."""
    client = FakeClient({})
    files: dict[str, Entry] = {
        "app/main.py": b"".join(f"import m{i}\n".encode() for i in range(12)) + PAD
    }
    for i in range(12):
        files[f"{STD}/m{i}.py"] = f"import n{i}\n".encode() + PAD
        files[f"{STD}/n{i}.py"] = f"N = {i}\n".encode() + PAD
    (blob,) = image(client, "reg.example/app:1", [files])
    mgr = LayerManager(client, cache, _judged())
    layer = mgr.get("reg.example/app:1", blob.digest)
    mgr.use("reg.example/app:1", blob.digest)
    read_all(*find([layer], "app/main.py"))
    settle(mgr)
    for i in range(12):
        read_all(*find([layer], f"{STD}/m{i}.py"))
        read_all(*find([layer], f"{STD}/n{i}.py"))
    stats = mgr._depfetch.stats
    assert stats["judged_reads"] == 25
    assert stats["hits"] == 24 and stats["pauses"] == 0
    mgr.close()
