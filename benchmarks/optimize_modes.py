"""The two image variants that come from ``stargz-store optimize`` (issue 11; their modes and
labels are in ``report``):

* ``esgz-optimize`` (modes ``lazy-esgz-optimize``, ``go-esgz-optimize``): the image rewritten
  by ``stargz-store optimize oci:GZIP oci:DST`` (the workload recorded by the store itself,
  each layer's recorded files first, then the landmark), pushed as
  ``bench/<image>:esgz-optimize-<digest>``;
* ``esgz-attached`` (mode ``lazy-esgz-attached``; the Go store does not follow profiles): the
  plain eStargz image, unchanged, pushed to a repository of its own
  (``bench/<image>-attached``, so the ``lazy-esgz`` mode's repository has no profile) with a
  profile attached by ``stargz-store optimize --attach`` (referrers tag scheme on the
  benchmark's docker-registry); the daemon finds it on first use and fetches its files.

Both recordings run once per cache key (converter and recorder sources), against the benchmark
registry directly (no WAN emulation: what is read does not depend on the link), niced. The
recorded workload is the recipe's own command (the image's Cmd).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from benchmarks.env import EnvError, Registry, skopeo_push
from benchmarks.images import BuiltImage, image_dir, read_oci_image

REPO = Path(__file__).resolve().parent.parent
# Sources that change what is recorded or written, besides the converter's.
_SOURCES = (
    "layerstore/runtime/recorder.py",
    "layerstore/runtime/layer.py",
    "layerstore/estargz/profile.py",
    "layerstore/registry/referrers.py",
    "stargz_store/optimize/command.py",
    "stargz_store/optimize/runner.py",
    "stargz_store/optimize/registry.py",
)
TIMEOUT = 1800
PERIOD = 60
"""Recording period (``optimize --period``): the workloads exit on their own, and a lazily
started pandas import takes longer than the default 10 s (a profile recorded on a loaded
machine then missed half the files, and the attached mode fetched the rest lazily)."""


def key(converter_key: str) -> str:
    h = hashlib.sha256(f"{converter_key} period={PERIOD}".encode())
    for rel in _SOURCES:
        p = REPO / rel
        if p.exists():
            h.update(rel.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def _optimize(args: list[str], log: Callable[[str], None]) -> None:
    cmd = [
        "nice", "-n", "19", sys.executable, "-m", "stargz_store", "optimize",
        "--period", str(PERIOD), *args,
    ]  # fmt: skip
    log("running " + " ".join(cmd[3:]))
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise EnvError(f"stargz-store optimize failed ({proc.returncode}): {proc.stderr[-1500:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("[3/4]") or "recorded files first" in line or "attached" in line:
            log("  " + line.strip())
    log(f"  optimize took {time.monotonic() - t0:.0f} s")


def optimized_layout(img: BuiltImage, cache: Path, k: str, log: Callable[[str], None]) -> str:
    """The OCI layout ``stargz-store optimize`` writes from the gzip image (cached per *k*)."""
    top = image_dir(cache, img.name)
    dst = top / f"optimize-{k}"
    for old in top.glob("optimize-*"):
        if old.name != dst.name:
            shutil.rmtree(old, ignore_errors=True)
    if (dst / ".done").exists():
        return str(dst)
    shutil.rmtree(dst, ignore_errors=True)
    _optimize(
        ["--profile-out", str(top / f"profile-{k}.json"), f"oci:{img.layout}:{img.tag}",
         f"oci:{dst}:{img.tag}"],
        log,
    )  # fmt: skip
    (dst / ".done").write_text("ok\n")
    return str(dst)


def _has_tag(registry: Registry, repo: str, tag: str) -> bool:
    url = f"http://{registry.address}/v2/{repo}/manifests/{tag}"
    req = urllib.request.Request(
        url, method="HEAD", headers={"Accept": "application/vnd.oci.image.index.v1+json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise EnvError(f"HEAD {url}: HTTP {e.code}") from None
    except OSError as e:
        raise EnvError(f"HEAD {url}: {e}") from None


def attached_ref(
    img: BuiltImage, esgz_layout: str, registry: Registry, log: Callable[[str], None]
) -> str:
    """``bench/<image>-attached:<tag>``: the eStargz image as it is, with a profile attached
    (pushed and recorded once; the registry storage is cached)."""
    digest, _m, _c = read_oci_image(Path(esgz_layout), img.tag)
    repo, tag = f"bench/{img.name}-attached", f"esgz-{digest.split(':')[1][:12]}"
    if not registry.has_manifest(repo, tag):
        log(f"pushing {img.name}:esgz to {repo} for the attached-profile mode")
        skopeo_push(esgz_layout, img.tag, f"{registry.address}/{repo}:{tag}")
    if not _has_tag(registry, repo, digest.replace(":", "-", 1)):
        _optimize(
            ["--attach", "--src-tls-verify=false", f"docker://{registry.address}/{repo}:{tag}"],
            log,
        )
    return f"{repo}:{tag}"


def profile_summary(cache: Path, img: BuiltImage, k: str) -> dict[str, object] | None:
    """Files and bytes of the profile the optimize run recorded (for the JSON)."""
    p = image_dir(cache, img.name) / f"profile-{k}.json"
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    entries = [e for layer in doc.get("layers", []) for e in layer.get("entries", [])]
    return {"files": len(entries), "bytes": sum(int(e.get("bytes", 0)) for e in entries)}
