"""Workload profiles end to end: a real docker-registry on 127.0.0.1, the store daemon, podman.

- recording (``serve --record``): a known workload's reads, the executable the kernel reads
  for ``execve``, the ELF loader and the library it maps, in first-access order;
- ``stargz-store optimize SRC DST``: the written image's prioritized region (before the
  ``.prefetch.landmark``) holds the recorded files in that order;
- ``stargz-store optimize --attach SRC``: the profile is pushed as an artifact next to SRC
  (whose digest does not change), a store finds it when the image is pulled and fetches its
  files before the container asks (no blob request while the container runs); without a
  profile, or with a tampered one, the store says so in its log and serves lazily.

The test image: layer 1 is busybox-static with ``/etc/a``; layer 2 a dynamically linked
executable of this machine (``/usr/bin/true``) with its loader and libraries at the paths
``ldd`` names. The workload ``sh -c 'cat /etc/a; /usr/bin/true'`` reads across both.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from layerstore.estargz.constants import PREFETCH_LANDMARK, TOC_DIGEST_ANNOTATION
from layerstore.estargz.profile import PROFILE_MEDIA_TYPE, parse_profile
from layerstore.estargz.reader import EStargzReader
from layerstore.registry.client import RegistryClient, RegistrySettings
from layerstore.registry.referrers import CREATED_ANNOTATION, Referrers, referrers_tag
from layerstore.source import FileSource
from testbed import (
    BuiltLayer,
    LoopbackRegistry,
    busybox_rootfs,
    directory,
    file,
    image_config,
    push_image,
    read_image,
    write_image,
)
from tests.image_util import ImageInfo, convert_image
from tests.podman_util import Podman, StoreDaemon, need_podman

pytestmark = [pytest.mark.podman, pytest.mark.registry, pytest.mark.timeout(900)]

WORKLOAD = ["sh", "-c", "cat /etc/a; /usr/bin/true; echo done"]
A_TEXT = "hello from /etc/a"
DYNAMIC = Path("/usr/bin/true")


def _ldd(binary: Path) -> tuple[str, list[str]]:
    """(PT_INTERP path, libraries as ldd resolves them) of a dynamic executable."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    interp, libs = "", []
    for line in out.splitlines():
        m = re.match(r"\s*\S+ => (/\S+) \(", line)
        if m:
            libs.append(m.group(1))
        elif re.match(r"\s*(/\S+) \(", line):
            interp = line.split()[0]
    assert interp and libs, out
    return interp, libs


def _dynamic_layer() -> tuple[list[Any], str, list[str]]:
    interp, libs = _ldd(DYNAMIC)
    entries: list[Any] = []
    dirs: set[str] = set()
    for path in [interp, *libs]:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs and d not in ("usr", "usr/bin"):
                dirs.add(d)
                entries.append(directory(d))
    for path in [interp, *libs]:
        entries.append(file(path.strip("/"), Path(path).resolve().read_bytes(), 0o755))
    entries.append(file(str(DYNAMIC).strip("/"), DYNAMIC.read_bytes(), 0o755))
    return entries, interp.strip("/"), [lib.strip("/") for lib in libs]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The test image in gzip (``gzip``) and eStargz (``estargz``), and the layer paths the
    workload is expected to read."""
    need_podman()
    if not DYNAMIC.is_file() or subprocess.run(["which", "ldd"], capture_output=True).returncode:
        pytest.skip(f"{DYNAMIC} or ldd missing: the test image needs a dynamic executable")
    layout = tmp_path_factory.mktemp("optimize-layout")
    dyn, interp, libs = _dynamic_layer()
    base = BuiltLayer.from_entries(busybox_rootfs([file("etc/a", A_TEXT + "\n")]))
    second = BuiltLayer.from_entries(dyn)
    cfg = image_config([base.diff_id, second.diff_id], cmd=["/bin/sh"])
    gz = write_image(layout, "gzip", [base, second], cfg)
    esgz = convert_image(gz, "estargz")
    return {"gzip": gz, "estargz": esgz, "interp": interp, "libs": libs}


@contextmanager
def store_and_podman(
    workdir: Path, reg: LoopbackRegistry, *extra: str, config: str | None = None
) -> Iterator[tuple[StoreDaemon, Podman]]:
    podman = Podman(
        workdir / "podman", layer_store=workdir / "daemon" / "store", insecure=[reg.host]
    )
    daemon = StoreDaemon(
        workdir / "daemon",
        registries_conf=podman.registries_conf,
        insecure=[reg.host],
        background_fetch=False,
        extra_args=extra,
        config_text=config,
    )
    try:
        daemon.start()
        yield daemon, podman
    except BaseException:
        sys.stderr.write("--- store daemon log (tail) ---\n" + daemon.log_tail(6000) + "\n")
        raise
    finally:
        podman.cleanup()
        daemon.stop()


def events(daemon: StoreDaemon, name: str) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") == name:
            out.append(ev)
    return out


def wait_for(daemon: StoreDaemon, name: str, count: int = 1, timeout: float = 120) -> list[Any]:
    """The daemon's log events *name* once there are *count* of them (synchronisation with the
    daemon's threads, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        found = events(daemon, name)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} {name!r} events: {daemon.log_tail(4000)}")
        time.sleep(0.1)


def optimize(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "stargz_store", "optimize", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr}"
    assert out.stdout == ""
    return out


def in_order(paths: list[str], wanted: list[str]) -> bool:
    """*wanted* appears in *paths* in this order (other paths may come between)."""
    it = iter(paths)
    return all(any(p == w for p in it) for w in wanted)


def expected_order(images: dict[str, Any]) -> list[str]:
    return ["bin/busybox", "etc/a", "usr/bin/true", images["interp"], *images["libs"]]


def merged(profile: Any) -> list[str]:
    pairs = [(e.first_access_ms, e.path) for lp in profile.layers for e in lp.entries]
    return [p for _, p in sorted(pairs, key=lambda t: t[0])]


# --------------------------------------------------------------------------------------------


def test_recording_lists_what_the_kernel_and_the_workload_read(
    images: dict[str, Any], tmp_path: Path
) -> None:
    esgz: ImageInfo = images["estargz"]
    with LoopbackRegistry(tmp_path / "registry") as reg:
        push_image(esgz, reg, "opt/record", "v1")
        ref = f"{reg.host}/opt/record:v1"
        with store_and_podman(tmp_path, reg, "--record") as (daemon, podman):
            podman.pull(ref)
            out = podman.run(ref, *WORKLOAD)
            assert out.split() == [*A_TEXT.split(), "done"]
        root = daemon.root
    files = sorted((root / "profiles").glob("*.json"))
    assert len(files) == 1, files
    profile = parse_profile(files[0].read_bytes())
    assert profile.image == ref
    assert profile.manifest_digest == esgz.manifest_digest
    tocs = [layer["annotations"][TOC_DIGEST_ANNOTATION] for layer in esgz.layers]
    assert [lp.toc_digest for lp in profile.layers] == tocs
    base, dyn = profile.layers
    assert in_order(base.paths, ["bin/busybox", "etc/a"]), base.paths
    # The kernel's reads: the executable for execve, then the loader (PT_INTERP), then the
    # library the loader maps: none of them is opened by the workload itself.
    assert in_order(dyn.paths, ["usr/bin/true", images["interp"], *images["libs"]]), dyn.paths
    assert in_order(merged(profile), expected_order(images)), merged(profile)
    by_path = {e.path: e for lp in profile.layers for e in lp.entries}
    assert by_path["etc/a"].bytes == len(A_TEXT) + 1
    busybox = Path("/bin/busybox").stat().st_size
    assert 0 < by_path["bin/busybox"].bytes <= busybox
    assert by_path["etc/a"].first_access_ms >= by_path["bin/busybox"].first_access_ms
    # `stargz-store profiles` lists it and shows its files.
    listing = subprocess.run(
        [sys.executable, "-m", "stargz_store", "profiles", "--root", str(root), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = json.loads(listing.stdout)
    assert [(r["name"], r["files"], r["layers"]) for r in rows] == [
        (files[0].name, profile.files, 2)
    ]
    shown = subprocess.run(
        [sys.executable, "-m", "stargz_store", "profiles", "--root", str(root), files[0].name],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "etc/a" in shown and images["interp"] in shown


def test_optimize_writes_the_recorded_files_first(images: dict[str, Any], tmp_path: Path) -> None:
    gz: ImageInfo = images["gzip"]
    dst = tmp_path / "optimized"
    profile_out = tmp_path / "profile.json"
    run = optimize(
        "--cmd", json.dumps(WORKLOAD), "--profile-out", str(profile_out),
        f"oci:{gz.layout}:gzip", f"oci:{dst}:opt",
    )  # fmt: skip
    text = run.stderr
    assert "podman run" in text and "sh -c 'cat /etc/a; /usr/bin/true; echo done'" in text
    assert f"| {A_TEXT}" in text
    assert re.search(r"recorded \d+ files", text) and f"wrote oci:{dst}:opt" in text
    assert "podman took 2 of 2 layers from the store" in text
    profile = parse_profile(profile_out.read_bytes())
    assert in_order(merged(profile), expected_order(images)), merged(profile)
    out = read_image(dst, "opt")
    assert len(out.layers) == 2 and all(out.is_estargz(i) for i in range(2))
    for i, lp in enumerate(profile.layers):
        reader = EStargzReader.open(FileSource(out.blob_path(out.layers[i]["digest"])))
        index = reader.index
        names = [e.name for e in index.entries()]
        cut = names.index(PREFETCH_LANDMARK)
        files_first = [n for n in names[:cut] if n in set(lp.paths)]
        # The recorded files of the layer, all of them, in access order, before the landmark.
        assert files_first == lp.paths, (files_first, lp.paths)
        landmark = index.prefetch_landmark_offset
        assert landmark is not None
        for path in lp.paths:
            ino = index.find(path)
            assert ino is not None
            assert all(c.compressed_end <= landmark for c in index.chunks(ino)), path
        # and nothing else but their parent directories
        assert all(index.is_dir(index.find(n) or 0) for n in names[:cut] if n not in lp.paths)
    # The optimized image is the same filesystem (same files, same bytes).
    for i in range(2):
        a = EStargzReader.open(FileSource(out.blob_path(out.layers[i]["digest"])))
        esgz: ImageInfo = images["estargz"]
        b = EStargzReader.open(FileSource(esgz.blob_path(esgz.layers[i]["digest"])))
        assert sorted(e.name for e in a.index.entries() if e.name != PREFETCH_LANDMARK) == sorted(
            e.name for e in b.index.entries() if e.name != ".no.prefetch.landmark"
        )
    assert a.read_file("usr/bin/true") == DYNAMIC.read_bytes()


def _blob_gets(reg: LoopbackRegistry, since: int, digests: set[str]) -> list[Any]:
    return [r for r in reg.requests()[since:] if r.is_blob_get and r.digest in digests]


def test_attached_profile_is_found_and_used_and_an_absent_one_is_not(
    images: dict[str, Any], tmp_path: Path
) -> None:
    esgz: ImageInfo = images["estargz"]
    layer_digests = {layer["digest"] for layer in esgz.layers}
    with LoopbackRegistry(tmp_path / "registry") as reg:
        push_image(esgz, reg, "opt/attach", "v1")
        push_image(esgz, reg, "opt/plain", "v1")
        ref = f"{reg.host}/opt/attach:v1"
        run = optimize(
            "--attach", "--src-tls-verify=false", "--cmd", json.dumps(WORKLOAD), f"docker://{ref}"
        )  # fmt: skip
        assert f"the image's digest is unchanged: {esgz.manifest_digest}" in run.stderr
        # SRC is untouched; the profile hangs off its digest under the referrers tag.
        assert reg.client.manifest("opt/attach", "v1")[1] == esgz.manifest_digest
        with RegistryClient(
            settings=RegistrySettings(insecure_registries=frozenset({reg.host}))
        ) as client:
            tag = referrers_tag(esgz.manifest_digest)
            index = json.loads(client.get_manifest(f"{reg.host}/opt/attach:{tag}").raw)
        assert [m["artifactType"] for m in index["manifests"]] == [PROFILE_MEDIA_TYPE]

        # Control: the same image without a profile. The store looks, finds none, says so,
        # and the container's reads fetch from the registry while it runs.
        plain = f"{reg.host}/opt/plain:v1"
        with store_and_podman(tmp_path / "control", reg) as (daemon, podman):
            podman.pull(plain)
            wait_for(daemon, "profile_not_found")
            mark = len(reg.requests())
            assert podman.run(plain, *WORKLOAD).split()[-1] == "done"
            control = _blob_gets(reg, mark, layer_digests)
        assert control, "the control run should have fetched lazily"

        with store_and_podman(tmp_path / "attached", reg) as (daemon, podman):
            podman.pull(ref)
            found = wait_for(daemon, "profile_found")
            assert found[0]["files"] >= len(expected_order(images))
            done = wait_for(daemon, "profile_prefetched", count=2)
            assert sum(e["files"] for e in done) >= len(expected_order(images))
            assert all(e["skipped"] == 0 and e["failed_batches"] == 0 for e in done), done
            mark = len(reg.requests())
            assert podman.run(ref, *WORKLOAD).split()[-1] == "done"
            # Every file the workload read was there before it asked.
            assert _blob_gets(reg, mark, layer_digests) == []
            assert not events(daemon, "profile_ignored")


def test_tampered_profile_is_ignored(images: dict[str, Any], tmp_path: Path) -> None:
    esgz: ImageInfo = images["estargz"]
    with LoopbackRegistry(tmp_path / "registry") as reg:
        push_image(esgz, reg, "opt/tampered", "v1")
        ref = f"{reg.host}/opt/tampered:v1"
        client = RegistryClient(
            settings=RegistrySettings(insecure_registries=frozenset({reg.host}))
        )
        raw = esgz.blob_path(esgz.manifest_digest).read_bytes()
        toc = esgz.layers[0]["annotations"][TOC_DIGEST_ANNOTATION]
        doc = json.dumps(
            {
                "media_type": PROFILE_MEDIA_TYPE,
                "layers": [
                    {"toc_digest": toc, "entries": [{"path": "etc/a", "first_access_ms": 0}]}
                ],
            }
        ).encode()
        subject = {
            "mediaType": esgz.manifest["mediaType"],
            "digest": esgz.manifest_digest,
            "size": len(raw),
        }
        res = Referrers(client).attach(
            ref, subject, PROFILE_MEDIA_TYPE, doc, {CREATED_ANNOTATION: "2024-01-01T00:00:00Z"}
        )
        client.close()
        # Change the stored profile behind the registry's back: same size, other bytes.
        hexd = res.payload_digest.split(":")[1]
        data = next((tmp_path / "registry").rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))
        data.write_bytes(doc.replace(b"etc/a", b"etc/b"))
        with store_and_podman(tmp_path / "run", reg) as (daemon, podman):
            podman.pull(ref)
            ignored = wait_for(daemon, "profile_ignored")
            assert "digest" in ignored[0]["reason"], ignored
            assert podman.run(ref, "cat", "/etc/a").strip() == A_TEXT
            assert not events(daemon, "profile_prefetched")
            assert not events(daemon, "profile_found")
