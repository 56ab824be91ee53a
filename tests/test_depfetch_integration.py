"""The read-triggered dependency fetch end to end: an image converted by ``stargz-store
convert`` into a real ``docker-registry`` on loopback, the daemon (a subprocess) serving it
over FUSE, files read through the mount.

Reading a Python module that imports a sibling module makes the daemon fetch the sibling
before anything reads it: the daemon's log shows the sibling fetched for that module, and the
sibling's read then never waits for the network (no ``read_waited`` event), while a module
nobody imports does. The fetcher's own read-ahead is off, so nothing else brings the sibling
along."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import BuiltLayer, RegistryHTTP, gzip_bytes, image_config, sha256_digest, write_image
from tests import fuse_util as fu
from tests.image_util import convert
from tests.registry_fixtures import registry_binary
from tests.test_store_integration import Registry, daemon, events, timed

ok, why = fu.fuse_available()
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.registry,
    pytest.mark.skipif(not ok, reason=why),
    pytest.mark.skipif(registry_binary() is None, reason="no docker-registry binary"),
    pytest.mark.timeout(240),
]

PAD = b"".join(
    b"# line %05d of padding, so the files do not share a chunk\n" % i for i in range(200)
)
FILES = {
    "app/pkg/__init__.py": b"",
    "app/pkg/main.py": b"from . import sibling\nimport json\n\nprint(sibling.VALUE)\n" + PAD,
    "app/pkg/sibling.py": b"VALUE = 42\n" + PAD,
    "app/pkg/unrelated.py": b"OTHER = 1\n" + PAD,
}


def tar_of(files: dict[str, bytes]) -> bytes:
    import io

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def waited(evs: list[dict[str, Any]], path: str) -> bool:
    return any(e["event"] == "read_waited" and e.get("path") == path for e in evs)


def test_reading_a_module_fetches_the_sibling_it_imports(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    reg.start()
    try:
        tar = tar_of(FILES)
        layer = BuiltLayer(gzip_bytes(tar), sha256_digest(tar))
        layout = tmp_path / "layout"
        write_image(layout, "src", [layer], image_config([layer.diff_id]))
        ref = f"{reg.host}/dep/py:v1"
        convert(
            f"oci:{layout}:src",
            f"docker://{ref}",
            "--chunk-size",
            "4096",
            "--dest-tls-verify=false",
        )
        manifest = json.loads(RegistryHTTP(reg.host).manifest("dep/py", "v1")[0])
        (desc,) = manifest["layers"]
        # read-ahead off, no landmark, no fill; the dependency fetch on (off by default)
        with daemon(tmp_path / "d", reg, fetch_extra="dependency_fetch = true") as d:
            diff = d.mountpoint / fu.b64(ref) / desc["digest"] / "diff"
            assert (
                timed(lambda: (diff / "app/pkg/main.py").read_bytes()) == FILES["app/pkg/main.py"]
            )
            deadline = time.monotonic() + 30
            while not any(
                e["event"] == "dependency_fetched"
                and e.get("trigger") == "app/pkg/main.py"
                and e.get("first") == "app/pkg/sibling.py"
                for e in events(d)
            ):
                assert time.monotonic() < deadline, d.log_tail()
                time.sleep(0.05)
            before = events(d)
            assert waited(before, "app/pkg/main.py")  # the first read did wait
            assert not any(
                e.get("path") == "app/pkg/sibling.py" for e in before if e["event"] == "read_waited"
            )
            queued = [e["path"] for e in before if e["event"] == "dependency_queued"]
            assert queued == ["app/pkg/sibling.py"]  # json is no file of this image
            # now the container reads them
            assert (
                timed(lambda: (diff / "app/pkg/sibling.py").read_bytes())
                == FILES["app/pkg/sibling.py"]
            )
            assert (
                timed(lambda: (diff / "app/pkg/unrelated.py").read_bytes())
                == FILES["app/pkg/unrelated.py"]
            )
            after = events(d)
            assert not waited(after, "app/pkg/sibling.py")  # fetched before it was read
            assert waited(after, "app/pkg/unrelated.py")  # nobody imports it: a miss
    finally:
        reg.stop()
