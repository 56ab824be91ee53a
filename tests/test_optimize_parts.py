"""The parts of ``optimize`` and ``profiles`` that need neither podman nor root: the loopback
layout registry (through our own registry client), range parsing, the ``profiles`` command,
usage errors, the ``[record]`` configuration and ``serve --record``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from layerstore.digest import sha256_digest
from layerstore.estargz.profile import PROFILE_MEDIA_TYPE
from layerstore.registry.client import RegistryClient, RegistrySettings
from stargz_store import profiles_cmd
from stargz_store.config import parse_config_text
from stargz_store.optimize.registry import LayoutRegistry, parse_ranges
from testbed import BuiltLayer, file, image_config, pseudo_random, write_image

BLOB = pseudo_random(300_000, 5)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    layer = BuiltLayer.from_entries([file("data.bin", BLOB), file("etc/a", "a\n")])
    write_image(tmp_path / "img", "run", [layer], image_config([layer.diff_id]))
    write_image(tmp_path / "img", "other", [layer], image_config([layer.diff_id], cmd=["/x"]))
    return tmp_path / "img"


def test_parse_ranges() -> None:
    assert parse_ranges("bytes=0-9", 100) == [(0, 9)]
    assert parse_ranges("bytes=90-", 100) == [(90, 99)]
    assert parse_ranges("bytes=-10", 100) == [(90, 99)]
    assert parse_ranges("bytes=95-200", 100) == [(95, 99)]
    assert parse_ranges("bytes= 0-1 , 5-6", 100) == [(0, 1), (5, 6)]
    for bad in (
        "bytes=100-",
        "bytes=5-4",
        "items=0-1",
        "bytes=",
        "bytes=-0",
        "bytes=a-b",
        "bytes=-",
    ):
        assert parse_ranges(bad, 100) is None, bad
    assert parse_ranges("bytes=" + ",".join(["0-0"] * 257), 100) is None


def test_layout_registry_serves_the_layout_to_our_client(layout: Path) -> None:
    with LayoutRegistry(layout, "stargz-optimize/image") as reg:
        host = reg.host
        assert host.startswith("127.0.0.1:")
        with RegistryClient(
            settings=RegistrySettings(insecure_registries=frozenset({host}))
        ) as client:
            image = client.resolve(reg.reference("run"))
            assert image.config.raw["config"]["Cmd"] == ["/bin/sh"]
            other = client.resolve(reg.reference("other"))
            assert other.config.raw["config"]["Cmd"] == ["/x"]
            layer = image.manifest.layers[0]
            src = client.blob_source(image, layer.digest, layer.size)
            whole = src.read_at(0, layer.size)
            assert sha256_digest(whole) == layer.digest
            # several ranges in one request (multipart/byteranges), as the store asks
            parts = src.read_ranges([(10, 100), (5000, 1), (layer.size - 7, 7), (20, 5)])
            assert parts == [whole[10:110], whole[5000:5001], whole[-7:], whole[20:25]]
            again = client.get_manifest(f"{host}/stargz-optimize/image@{image.manifest_digest}")
            assert again.digest == image.manifest_digest
        base = f"http://{host}/v2"
        s = requests.Session()
        s.trust_env = False
        assert s.get(f"{base}/").status_code == 200
        assert s.get(f"{base}/other/name/manifests/run").status_code == 404
        assert s.get(f"{base}/stargz-optimize/image/manifests/nope").status_code == 404
        assert s.put(f"{base}/stargz-optimize/image/manifests/run", data=b"{}").status_code >= 400
        head = s.head(f"{base}/stargz-optimize/image/blobs/{layer.digest}")
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == layer.size
        r = s.get(
            f"{base}/stargz-optimize/image/blobs/{layer.digest}",
            headers={"Range": f"bytes={layer.size}-"},
        )
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{layer.size}"
        # the config is a blob, not a manifest
        assert (
            s.get(
                f"{base}/stargz-optimize/image/manifests/{image.manifest.config.digest}"
            ).status_code
            == 404
        )
    with pytest.raises(requests.ConnectionError):
        s.get(f"{base}/", timeout=2)


def _profile(path: Path, image: str, paths: list[str]) -> None:
    entries = [
        {"path": p, "first_access_ms": i * 3, "bytes": 1000 * (i + 1)} for i, p in enumerate(paths)
    ]
    doc = {
        "media_type": PROFILE_MEDIA_TYPE,
        "created": "2024-05-01T12:00:00Z",
        "tool": "stargz-store test",
        "image": image,
        "manifest_digest": "sha256:" + "c" * 64,
        "period_seconds": 10,
        "layers": [{"toc_digest": "sha256:" + "a" * 64, "entries": entries}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _profiles(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = profiles_cmd.main(list(args), out, err)
    return rc, out.getvalue(), err.getvalue()


def test_profiles_command(tmp_path: Path) -> None:
    rc, out, err = _profiles("--root", str(tmp_path), "--config", str(tmp_path / "none.toml"))
    assert rc == 2 and "not found" in err
    conf = tmp_path / "c.toml"
    conf.write_text('[record]\ndir = "recorded"\n')
    rc, out, err = _profiles("--root", str(tmp_path), "--config", str(conf))
    assert (rc, out) == (0, "") and "no profiles in" in err
    d = tmp_path / "recorded"
    _profile(d / "20240501T120000Z-aaaaaaaaaaaa.json", "reg.example/app:1", ["usr/bin/x", "etc/a"])
    _profile(d / "20240502T120000Z-bbbbbbbbbbbb.json", "reg.example/b:2", ["bin/sh"])
    (d / "20240503T120000Z-cccccccccccc.json").write_text("{broken")
    rc, out, err = _profiles("--root", str(tmp_path), "--config", str(conf))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["PROFILE", "CREATED", "LAYERS", "FILES", "READ", "IMAGE"]
    assert lines[1].split() == [
        "20240501T120000Z-aaaaaaaaaaaa.json", "2024-05-01T12:00:00Z", "1", "2", "0.0", "MB",
        "reg.example/app:1",
    ]  # fmt: skip
    assert "reg.example/b:2" in lines[2] and "unreadable" in lines[3]
    rc, out, _ = _profiles("--root", str(tmp_path), "--config", str(conf), "--json")
    rows = json.loads(out)
    assert [r.get("files") for r in rows] == [2, 1, None] and "error" in rows[2]
    rc, out, _ = _profiles(
        "--root", str(tmp_path), "--config", str(conf), "20240501T120000Z-aaaaaaaaaaaa.json"
    )
    assert rc == 0 and "reg.example/app:1" in out
    assert out.index("usr/bin/x") < out.index("etc/a")
    rc, out, _ = _profiles(
        "--config", str(conf), "--json", str(d / "20240502T120000Z-bbbbbbbbbbbb.json")
    )
    assert json.loads(out)["layers"][0]["entries"][0]["path"] == "bin/sh"
    rc, _, err = _profiles("--root", str(tmp_path), "--config", str(conf), "nope.json")
    assert rc == 1 and "nope.json" in err
    rc, _, err = _profiles(
        "--root", str(tmp_path), "--config", str(conf), "20240503T120000Z-cccccccccccc.json"
    )
    assert rc == 1 and "not JSON" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attach", "docker://127.0.0.1:1/a:b", "oci:/x"], "give SRC only"),
        (["oci:/nonexistent"], "DST is missing"),
        (["--attach", "oci:/x:y"], "needs a docker://REF source"),
        (["--cmd", "sh -c true", "oci:/a", "oci:/b"], "JSON list"),
        (["--entrypoint", '{"a": 1}', "oci:/a", "oci:/b"], "JSON list"),
        (["--env", "NOVALUE", "oci:/a", "oci:/b"], "NAME=VALUE"),
        (["--period", "0", "oci:/a", "oci:/b"], "must be positive"),
        (["--timeout", "x", "oci:/a", "oci:/b"], "invalid number"),
    ],
)
def test_optimize_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stargz_store", "optimize", *args],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_new_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stargz_store", "help"], capture_output=True, text=True, check=True
    ).stdout
    assert "optimize" in out and "profiles" in out
    opt = subprocess.run(
        [sys.executable, "-m", "stargz_store", "optimize", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for flag in ("--attach", "--cmd", "--entrypoint", "--env", "--mount", "--period", "--timeout"):
        assert flag in opt


def test_record_configuration_and_serve_flag() -> None:
    from stargz_store.daemon import build_parser

    c = parse_config_text("")
    assert (c.record.enabled, c.record.period_seconds, c.record.dir) == (False, 10.0, "profiles")
    assert c.fetch.prefetch_profile is True
    c = parse_config_text("[record]\nenabled = true\nperiod_seconds = 2.5\n")
    assert c.record.enabled and c.record.period_seconds == 2.5
    with pytest.raises(Exception, match="period_seconds"):
        parse_config_text("[record]\nperiod_seconds = 0\n")
    assert build_parser().parse_args(["--record", "/mnt"]).record is True
    assert build_parser().parse_args(["/mnt"]).record is False
