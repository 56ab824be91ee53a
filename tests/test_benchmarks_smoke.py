"""Fast checks of the benchmark harness pieces that need neither the daemon nor podman."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import images, report
from benchmarks.coldstart import pick_files
from benchmarks.images import (
    build_image,
    parse_strace,
    read_oci_image,
    resolve_in_root,
    write_layer,
    write_oci_image,
)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_layout(layout: Path, tag: str) -> dict[str, Any]:
    assert json.loads((layout / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    digest, manifest, config = read_oci_image(layout, tag)
    blobs = layout / "blobs" / "sha256"
    for path in blobs.iterdir():
        assert _sha(path.read_bytes()) == "sha256:" + path.name
    assert (blobs / digest.split(":")[1]).exists()
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"])
    for layer, diff_id in zip(manifest["layers"], diff_ids):
        blob = (blobs / layer["digest"].split(":")[1]).read_bytes()
        assert layer["size"] == len(blob)
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert _sha(gzip.decompress(blob)) == diff_id
    return manifest


def test_tiny_recipe_builds_a_valid_oci_layout(tmp_path: Path) -> None:
    if shutil.which("busybox") is None:
        pytest.skip("needs busybox-static")
    record = shutil.which("strace") is not None and shutil.which("chroot") is not None
    record = record and os.geteuid() == 0
    img = build_image("tiny", tmp_path, record=record, log=lambda _m: None)
    manifest = _check_layout(Path(img.layout), img.tag)
    assert len(manifest["layers"]) == 1
    assert img.cmd == ["/bin/sh", "-c", "echo hello"]
    if record:
        assert "/usr/bin/busybox" in img.opened_files
    # cached: a second call does not rebuild
    again = build_image("tiny", tmp_path, record=record, log=lambda _m: None)
    assert again.manifest_digest == img.manifest_digest


def test_derived_recipe_reuses_the_base_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe with ``base`` (like ``pandas`` on ``large``) is the base image's blobs, hard
    linked, under its own command, with the files that command opens recorded."""
    if shutil.which("busybox") is None:
        pytest.skip("needs busybox-static")
    record = shutil.which("strace") is not None and shutil.which("chroot") is not None
    record = record and os.geteuid() == 0
    derived = images.Recipe(
        "tiny-cat", (), ("/bin/sh", "-c", "cat /etc/passwd; echo hi"), "hi", base="tiny"
    )
    monkeypatch.setitem(images.RECIPES, "tiny-cat", derived)
    base = build_image("tiny", tmp_path, record=record, log=lambda _m: None)
    img = build_image("tiny-cat", tmp_path, record=record, log=lambda _m: None)
    manifest = _check_layout(Path(img.layout), img.tag)
    assert [la["digest"] for la in manifest["layers"]] == [la.digest for la in base.layers]
    assert img.layers == base.layers and img.manifest_digest != base.manifest_digest
    _, _, config = read_oci_image(Path(img.layout), img.tag)
    assert config["config"]["Cmd"] == ["/bin/sh", "-c", "cat /etc/passwd; echo hi"]
    blob = Path(img.layout) / "blobs/sha256" / base.layers[0].digest[7:]
    assert blob.stat().st_nlink >= 2  # shared with the base layout, not copied
    if record:
        assert img.opened_files == ["/usr/bin/busybox", "/etc/passwd"]


def test_layers_are_reproducible(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a/b").mkdir(parents=True)
    (root / "a/b/f.txt").write_text("hello\n")
    (root / "a/link").symlink_to("b/f.txt")
    one = write_layer(root, tmp_path / "l1")
    two = write_layer(root, tmp_path / "l2")
    assert one == two
    write_oci_image(tmp_path / "layout", "t", [], ["/x"])  # empty image is valid too
    (tmp_path / "layout2/blobs/sha256").mkdir(parents=True)
    shutil.copy(tmp_path / "l1" / one.digest[7:], tmp_path / "layout2/blobs/sha256")
    write_oci_image(tmp_path / "layout2", "t", [one], ["/x"])
    _check_layout(tmp_path / "layout2", "t")


def test_strace_parsing_and_in_root_resolution(tmp_path: Path) -> None:
    trace = "\n".join(
        [
            '10 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3',
            '10 chroot("/tmp/x") = 0',
            '10 execve("/usr/bin/python3", ["python3"], 0x1 /* 3 vars */) = 0',
            '10 openat(AT_FDCWD, "/usr/lib/a.so", O_RDONLY|O_CLOEXEC) = 3',
            '10 openat(AT_FDCWD, "/nope", O_RDONLY) = -1 ENOENT (No such file or directory)',
            '10 openat(AT_FDCWD, "/usr/lib", O_RDONLY|O_DIRECTORY) = 4',
            '11 openat(AT_FDCWD, "/usr/lib/b.py", O_RDONLY <unfinished ...>',
            "11 <... openat resumed>) = 5",
        ]
    )
    assert parse_strace(trace) == ["/usr/bin/python3", "/usr/lib/a.so", "/usr/lib/b.py"]
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/python3.11").write_text("x")
    (tmp_path / "usr/bin/python3").symlink_to("python3.11")
    (tmp_path / "bin").symlink_to("/usr/bin")  # absolute: must resolve inside the root
    assert resolve_in_root(tmp_path, "/bin/python3") == "/usr/bin/python3.11"
    assert resolve_in_root(tmp_path, "/usr/bin") is None
    assert resolve_in_root(tmp_path, "/missing") is None


def test_pick_files_is_deterministic() -> None:
    files = [(f"f{i}", 100_000) for i in range(50)] + [("tiny", 10), ("huge", 1 << 30)]
    picked = pick_files(files, 1_000_000)
    assert picked == pick_files(list(reversed(files)), 1_000_000)
    assert len(picked) == 10
    assert ("tiny", 10) not in picked and ("huge", 1 << 30) not in picked


def _synthetic() -> dict[str, Any]:
    def runs(pull: float, run: float, mb: float) -> list[dict[str, Any]]:
        return [
            {"pull_s": pull * k, "run_s": run, "total_s": pull * k + run, "bytes_down": mb * 1e6}
            for k in (0.9, 1.0, 1.1)
        ]

    return {
        "schema": report.SCHEMA,
        "params": {"rtt_ms": 20.0, "mbit": 150.0, "runs": 3, "images": ["python", "large"]},
        "images": {"python": {}, "large": {}},
        "coldstart": [
            {"image": "python", "mode": "full-gzip", "runs": runs(10.0, 1.0, 56), "error": None},
            {"image": "python", "mode": "lazy-esgz", "runs": runs(2.0, 3.0, 20), "error": None},
            {"image": "python", "mode": "lazy-esgz-opt", "runs": runs(2.0, 1.0, 12), "error": None},
            {"image": "python", "mode": "go-esgz", "runs": runs(1.0, 7.0, 30), "error": None},
            {"image": "python", "mode": "go-esgz-go", "runs": runs(1.0, 3.0, 30), "error": None},
            {"image": "python", "mode": "lazy-esgz-go", "runs": runs(1.0, 2.0, 25), "error": None},
            {"image": "large", "mode": "full-gzip", "runs": runs(80.0, 4.0, 900), "error": None},
            {"image": "large", "mode": "lazy-esgz", "runs": [], "error": "converter missing"},
        ],
        "fs": {
            "image": "large",
            "layer_mb": 900.0,
            "entries": 12000,
            "resolve_s": 0.2,
            "walk_s": 1.5,
            "cold_MBps": 10.0,
            "cached_MBps": 200.0,
            "hot_MBps": 2000.0,
            "daemon_peak_rss_bytes": 80e6,
            "bytes_fetched": 40e6,
            "fetched_vs_layer": 0.044,
            "error": None,
        },
        "fs_go": {
            "store": "go",
            "image": "large",
            "layer_mb": 900.0,
            "entries": 12000,
            "resolve_s": 0.4,
            "walk_s": 1.0,
            "cold_MBps": 20.0,
            "cached_MBps": 100.0,
            "hot_MBps": 1000.0,
            "daemon_peak_rss_bytes": 160e6,
            "bytes_fetched": 50e6,
            "fetched_vs_layer": 0.055,
            "error": None,
        },
    }


def test_results_json_and_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = _synthetic()
    js, png = report.write_results(results, tmp_path, "20260101T000000Z")
    assert png is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    for key in ("schema", "params", "images", "coldstart", "ratios", "fs", "chart"):
        assert key in data
    first = data["coldstart"][0]
    assert set(first["median"]) >= {"pull_s", "run_s", "total_s", "bytes_down"}
    assert first["median"]["total_s"] == pytest.approx(11.0)
    ratios = data["ratios"]["python"]
    assert ratios["lazy-esgz/total_s_vs_full"] == pytest.approx(5.0 / 11.0)
    assert ratios["lazy-esgz-opt/total_s_vs_lazy-esgz"] == pytest.approx(3.0 / 5.0)
    # ours against the Go store on the same image variant, and only there
    assert ratios["lazy-esgz/total_s_vs_go-esgz"] == pytest.approx(5.0 / 8.0)
    assert ratios["lazy-esgz/pull_s_vs_go-esgz"] == pytest.approx(2.0)
    assert ratios["lazy-esgz-go/total_s_vs_go-esgz-go"] == pytest.approx(3.0 / 4.0)
    assert ratios["lazy-esgz/bytes_vs_go-esgz"] == pytest.approx(20 / 30)
    assert not any("vs_go-esgz-opt" in k for k in ratios)  # no Go run of that variant
    assert ratios["go-esgz/total_s_vs_full"] == pytest.approx(8.0 / 11.0)
    fs = data["ratios"]["fs"]
    assert fs["resolve_s_ours_vs_go"] == pytest.approx(0.5)
    assert fs["cold_MBps_ours_vs_go"] == pytest.approx(0.5)
    assert fs["daemon_peak_rss_bytes_ours_vs_go"] == pytest.approx(0.5)
    assert data["coldstart"][7]["median"]["total_s"] is None
    text = report.summary_text(data)
    assert "converter missing" in text and "filesystem" in text
    lazy_line = next(line for line in text.splitlines() if "lazy-esgz " in line)
    assert lazy_line.split()[-1] == "0.62x"  # the "vs Go" column: 5.0 / 8.0
    assert "filesystem, Go store" in text and "resolve 0.50x" in text


def test_modes_name_a_store_and_a_variant() -> None:
    assert report.mode_parts("full-gzip") == (None, "gzip")
    assert report.mode_parts("lazy-esgz-go-opt") == ("ours", "esgz-go-opt")
    assert report.mode_parts("go-esgz") == ("go", "esgz")
    assert report.go_counterpart("lazy-esgz-opt") == "go-esgz-opt"
    assert report.go_counterpart("go-esgz") is None
    assert report.mode_parts("lazy-esgz-attached") == ("ours", "esgz-attached")
    assert report.go_counterpart("lazy-esgz-optimize") == "go-esgz-optimize"
    assert report.go_counterpart("lazy-esgz-attached") is None  # the Go store has no profiles
    with pytest.raises(ValueError):
        report.mode_parts("go-gzip")
    assert set(report.DEFAULT_MODES) <= set(report.MODES)
    for mode in report.MODES:
        assert report.mode_parts(mode)[1] in report.VARIANTS
        assert mode in report.MODE_LABELS


def test_optimize_modes_ratios_and_floors() -> None:
    """The two modes of ``stargz-store optimize`` and the floor: opened bytes at the link's
    effective rate plus the full pull's create+run."""
    results = _synthetic()
    results["link"] = {"effective_mbit": 100.0, "first_byte_s": 0.04}
    results["images"]["python"]["opened_bytes"] = 10_000_000  # 0.8 s at 100 Mbit/s
    results["coldstart"] += [
        {"image": "python", "mode": "lazy-esgz-optimize", "runs": [
            {"pull_s": 0.5, "run_s": 1.5, "total_s": 2.0, "bytes_down": 9e6}], "error": None},
        {"image": "python", "mode": "lazy-esgz-attached", "runs": [
            {"pull_s": 0.5, "run_s": 1.7, "total_s": 2.2, "bytes_down": 9e6}], "error": None},
        {"image": "python", "mode": "go-esgz-optimize", "runs": [
            {"pull_s": 0.5, "run_s": 3.5, "total_s": 4.0, "bytes_down": 9e6}], "error": None},
    ]  # fmt: skip
    assert {"lazy-esgz-optimize", "lazy-esgz-attached"} <= set(report.DEFAULT_MODES)
    data = report.finalize(results)
    ratios = data["ratios"]["python"]
    assert ratios["lazy-esgz-attached/total_s_vs_lazy-esgz-optimize"] == pytest.approx(1.1)
    assert ratios["lazy-esgz-optimize/total_s_vs_full"] == pytest.approx(2.0 / 11.0)
    assert ratios["lazy-esgz-optimize/total_s_vs_go-esgz-optimize"] == pytest.approx(0.5)
    assert not any(k.startswith("lazy-esgz-attached/") and "_vs_go" in k for k in ratios)
    floor = data["floors"]["python"]
    assert floor["floor_s"] == pytest.approx(0.8 + 1.0)
    assert floor["lazy-esgz-attached/total_s_vs_floor"] == pytest.approx(2.2 / 1.8)
    assert floor["full-gzip/total_s_vs_floor"] == pytest.approx(11.0 / 1.8)
    assert "large" not in data["floors"]  # no opened bytes known
    text = report.summary_text(data)
    assert "floor python: 1.80 s" in text and "lazy-esgz-attached 1.22x" in text
    assert "attached profile vs optimized image (python): 1.10x" in text
    attached_line = next(line for line in text.splitlines() if "lazy-esgz-attached " in line)
    assert attached_line.split()[-1] == "-"  # no Go counterpart


def test_converter_cache_key_covers_the_converters_modules() -> None:
    """Every project module ``stargz-store convert`` loads is hashed into the key of the
    converted images in the benchmark cache (else a converter change reuses stale images),
    except the ones that cannot change the bytes written (command line, logging, errors)."""
    from benchmarks.__main__ import _CONVERTER_SOURCES, REPO

    code = (
        "import sys, stargz_store.convert_cmd, layerstore.image.convert\n"
        "print('\\n'.join(getattr(m, '__file__', None) or '' for m in list(sys.modules.values())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    loaded = set()
    for f in out.splitlines():
        rel = Path(f).relative_to(REPO) if f.startswith(str(REPO) + os.sep) else None
        if (
            rel
            and rel.parts[0] in ("layerstore", "stargz_store", "auth")
            and rel.name != "__init__.py"
        ):
            loaded.add(str(rel))
    assert "layerstore/estargz/writer.py" in loaded
    unkeyed = {"stargz_store/cmdline.py", "stargz_store/log.py", "layerstore/errors.py"}
    assert loaded - unkeyed <= set(_CONVERTER_SOURCES)
