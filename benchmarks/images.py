"""Benchmark images: root filesystems assembled from this machine, written as OCI layouts.

Recipes (:data:`RECIPES`):

* ``tiny``   - busybox-static, workload ``echo hello`` (tests and smoke runs).
* ``python`` - ~170 MB: Debian 12's ``/usr/bin/python3.11``, the shared libraries it and its
  extension modules need, the standard library, pip/setuptools/wheel/pygments, zoneinfo and
  locale data up to the target size. Workload ``python3 -c "print('hello')"``.
* ``large``  - ~2.4 GB: the ``python`` layer, then one layer with numpy + scipy + pandas (from
  local wheels), the PyTorch CPU and NVIDIA cuBLAS wheels unpacked (never loaded) and 700 MB of
  seeded pseudo-random "model weights". Workload ``python3 -c "import scipy.linalg;
  print('ok')"`` opens under 5% of the bytes.
* ``pandas`` - the ``large`` image's layers (the same blobs) with a heavier workload,
  ``python3 -c "import pandas, scipy.stats; print('ok')"``.

Every image is written as a gzip OCI layout (the full-pull baseline). The files the workload
opens are recorded once (``strace`` of the workload in a chroot of the merged layers) for
``stargz-store convert --prioritized-files``. Everything is cached under the cache directory,
keyed by :data:`RECIPE_VERSION`, so reruns only rebuild what changed. Builds are CPU heavy: the
harness runs them as ``nice -n 19 python -m benchmarks.images build NAME``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1
DEFAULT_CACHE = Path(os.environ.get("BENCH_CACHE", "/work/bench-cache"))

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

MB = 1_000_000
_COPY = 1 << 20
_FIXED_MTIME = 1_700_000_000
_MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
_PY = "python3.11"
_PY_SITE = f"usr/local/lib/{_PY}/dist-packages"
_WHEEL_DIRS = (Path("/opt/pypi-more/files"), Path("/opt/wheels"), Path("/opt/pypi/files"))
_NUMPY_WHEEL = "numpy-2.1.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
_SCIPY_WHEEL = "scipy-1.15.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
_TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
_CUBLAS_WHEEL = "nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl"
# pandas 2.2.3 (numpy 2 ready) and its pure-Python dependencies
_PANDAS_WHEELS = (
    "pandas-2.2.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "python_dateutil-2.9.0.post0-py2.py3-none-any.whl",
    "pytz-2026.4-py2.py3-none-any.whl",
    "tzdata-2026.4-py2.py3-none-any.whl",
    "six-1.17.0-py2.py3-none-any.whl",
)
_PY_DIST_PACKAGES = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel", "pygments")


class BuildError(Exception):
    """An image could not be built on this machine (missing input, failing tool)."""


# --------------------------------------------------------------------------------------------
# Root filesystem assembly


def _merged_usr(root: Path) -> None:
    for name, target in _MERGED_USR.items():
        (root / target).mkdir(parents=True, exist_ok=True)
        link = root / name
        if not link.is_symlink():
            link.symlink_to(target)
    for d in ("etc", "root", "tmp", "proc", "sys", "dev", "run", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var/tmp").chmod(0o1777)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")


def _canonical(host_path: str) -> str:
    """Map a host path through the merged-/usr symlinks (``/lib/x`` -> ``usr/lib/x``)."""
    rel = host_path.lstrip("/")
    head, _, rest = rel.partition("/")
    if head in _MERGED_USR:
        return f"{_MERGED_USR[head]}/{rest}" if rest else _MERGED_USR[head]
    return rel


def copy_host_file(root: Path, host_path: str) -> None:
    """Copy one host file into *root* at the same path, keeping a symlink chain to its target."""
    real = os.path.realpath(host_path)
    dst_real = root / _canonical(real)
    if not dst_real.exists():
        dst_real.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dst_real)
    dst_name = root / _canonical(host_path)
    if dst_name != dst_real and not dst_name.is_symlink() and not dst_name.exists():
        dst_name.parent.mkdir(parents=True, exist_ok=True)
        dst_name.symlink_to(os.path.relpath(dst_real, dst_name.parent))


def copy_host_tree(root: Path, host_dir: str, budget: int | None = None) -> int:
    """Copy a host directory tree (files, symlinks, dirs) into *root*; returns bytes copied.
    With *budget*, stop (between files, in sorted order) once that many bytes were copied."""
    copied = 0
    for dirpath, dirnames, filenames in os.walk(host_dir):
        dirnames.sort()
        rel_dir = _canonical(dirpath)
        (root / rel_dir).mkdir(parents=True, exist_ok=True)
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(f"{dirpath}/{d}")]:
            if budget is not None and copied >= budget:
                return copied
            src = os.path.join(dirpath, name)
            dst = root / rel_dir / name
            if dst.exists() or dst.is_symlink():
                continue
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                dst.symlink_to(os.readlink(src))
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(src, dst)
                copied += st.st_size
        dirnames[:] = [d for d in dirnames if not os.path.islink(f"{dirpath}/{d}")]
    return copied


def _ldd(paths: Iterable[str]) -> set[str]:
    libs: set[str] = set()
    for p in paths:
        out = subprocess.run(["ldd", p], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def populate_busybox(root: Path) -> None:
    """A busybox-static root filesystem: ``/bin/sh`` and the common applets."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise BuildError("busybox is not installed (apt-get install busybox-static)")
    _merged_usr(root)
    shutil.copy2(busybox, root / "usr/bin/busybox")
    for applet in ("sh", "echo", "cat", "ls", "true", "env", "sleep"):
        (root / "usr/bin" / applet).symlink_to("busybox")


def populate_python(root: Path, target_bytes: int = 170 * MB) -> None:
    """Debian 12's python3.11 and what it needs, padded with locale data to *target_bytes*."""
    if not Path(f"/usr/bin/{_PY}").exists():
        raise BuildError(f"/usr/bin/{_PY} is missing (apt-get install python3)")
    populate_busybox(root)
    copy_host_file(root, f"/usr/bin/{_PY}")
    (root / "usr/bin/python3").symlink_to(_PY)
    (root / "usr/bin/python").symlink_to(_PY)
    copy_host_tree(root, f"/usr/lib/{_PY}")
    for name in _PY_DIST_PACKAGES:
        src = f"/usr/lib/python3/dist-packages/{name}"
        if os.path.isdir(src):
            copy_host_tree(root, src)
    # Shared libraries of the interpreter and of every extension module we copied.
    sos = [str(p) for p in root.rglob("*.so")] + [str(root / f"usr/bin/{_PY}")]
    host_sos = [s.replace(str(root), "", 1) if s.startswith(str(root)) else s for s in sos]
    for lib in sorted(_ldd(p for p in host_sos if os.path.exists(p))):
        copy_host_file(root, lib)
    for tree in ("/usr/share/zoneinfo", "/usr/share/i18n"):
        if os.path.isdir(tree):
            copy_host_tree(root, tree)
    missing = target_bytes - tree_size(root)
    if missing > 0 and os.path.isdir("/usr/share/locale"):
        copy_host_tree(root, "/usr/share/locale", budget=missing)


def unpack_wheel(site: Path, wheel: Path) -> None:
    """Install a wheel the way pip would lay it out (purelib/platlib in *site*), no scripts."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            top, _, rest = name.partition("/")
            if top.endswith(".data"):
                kind, _, inner = rest.partition("/")
                if kind not in ("purelib", "platlib"):
                    continue
                name = inner
            if info.is_dir() or not name:
                continue
            dst = site / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, _COPY)
            mode = (info.external_attr >> 16) & 0o777
            dst.chmod(mode if mode else 0o644)


def find_wheel(name: str) -> Path:
    for d in _WHEEL_DIRS:
        if (d / name).exists():
            return d / name
    found = subprocess.run(
        ["find", "/opt", "/root", "/work", "-name", name, "-print", "-quit"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if found:
        return Path(found)
    raise BuildError(f"wheel {name} not found under /opt, /root or /work")


def populate_scientific(root: Path, weights_bytes: int = 700 * MB) -> None:
    """numpy + scipy + pandas (used); torch, CUDA cuBLAS and model weights (unused) in one
    layer."""
    site = root / _PY_SITE
    site.mkdir(parents=True)
    for wheel in (_NUMPY_WHEEL, _SCIPY_WHEEL, *_PANDAS_WHEELS, _TORCH_WHEEL, _CUBLAS_WHEEL):
        unpack_wheel(site, find_wheel(wheel))
    # manylinux wheels expect the system's libstdc++/libgcc_s: add what their modules need.
    sos = [str(p) for pkg in ("numpy", "scipy", "pandas") for p in (site / pkg).rglob("*.so")]
    dynload = [str(p) for p in Path(f"/usr/lib/{_PY}/lib-dynload").glob("*.so")]
    in_base = _ldd([f"/usr/bin/{_PY}", *dynload])  # already in the python layer below
    for lib in sorted(_ldd(sos) - in_base):
        if not lib.startswith(str(root)):
            copy_host_file(root, lib)
    models = root / "opt/models"
    models.mkdir(parents=True)
    rng = random.Random(20261122)
    left, n = weights_bytes, 0
    while left > 0:
        size = min(left, 150 * MB)
        with open(models / f"weights-{n:02d}.bin", "wb") as f:
            done = 0
            while done < size:
                piece = min(_COPY * 8, size - done)
                f.write(rng.randbytes(piece))
                done += piece
        left -= size
        n += 1


# --------------------------------------------------------------------------------------------
# Layers and OCI layouts


class _HashingWriter:
    """A write-only file object that hashes and counts what goes through it."""

    def __init__(self, sink: Callable[[bytes], Any] | None = None) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self._sink = sink

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink(data)
        return len(data)

    def flush(self) -> None:
        pass


@dataclass
class LayerBlob:
    digest: str
    size: int
    diff_id: str
    diff_size: int


def _tar_entries(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            arc = name if rel == "." else f"{rel}/{name}"
            yield arc, Path(dirpath) / name


def _tarinfo(tf: tarfile.TarFile, arc: str, path: Path) -> tarfile.TarInfo:
    ti = tf.gettarinfo(str(path), arcname=arc)
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mtime = _FIXED_MTIME
    return ti


def write_layer(root: Path, blobs_dir: Path, level: int = 6) -> LayerBlob:
    """Tar *root* deterministically (sorted, uid 0, fixed mtime), gzip it and store the blob
    under ``blobs_dir/<hex>``. Returns digests and sizes."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=blobs_dir, prefix=".layer-")
    with os.fdopen(fd, "wb") as out:
        compressed = _HashingWriter(out.write)
        # wbits=31: gzip framing with mtime 0 and no file name: byte-for-byte reproducible.
        comp = zlib.compressobj(level, zlib.DEFLATED, 31)
        uncompressed = _HashingWriter(lambda b: compressed.write(comp.compress(b)))
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT
        ) as tf:
            for arc, path in _tar_entries(root):
                ti = _tarinfo(tf, arc, path)
                if ti.isreg():
                    with open(path, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
        compressed.write(comp.flush())
    digest = "sha256:" + compressed.sha.hexdigest()
    final = blobs_dir / compressed.sha.hexdigest()
    os.replace(tmp, final)
    return LayerBlob(
        digest=digest,
        size=compressed.size,
        diff_id="sha256:" + uncompressed.sha.hexdigest(),
        diff_size=uncompressed.size,
    )


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    hexd = hashlib.sha256(data).hexdigest()
    path = layout / "blobs/sha256" / hexd
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return "sha256:" + hexd, len(data)


def write_oci_image(layout: Path, tag: str, layers: list[LayerBlob], cmd: list[str]) -> str:
    """Write config, manifest and ``index.json`` (blobs of *layers* must already be in
    ``layout/blobs/sha256``). Returns the manifest digest."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        "history": [{"created_by": f"benchmarks.images layer {i}"} for i in range(len(layers))],
    }
    cfg_digest, cfg_size = _put_blob(layout, _canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": cfg_digest, "size": cfg_size},
        "layers": [
            {"mediaType": MEDIA_LAYER_GZIP, "digest": la.digest, "size": la.size} for la in layers
        ],
    }
    man_digest, man_size = _put_blob(layout, _canonical_json(manifest))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": man_digest,
                "size": man_size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_bytes(_canonical_json(index))
    return man_digest


def read_oci_image(layout: Path, tag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(manifest digest, manifest, config) of *tag* in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest: str = desc["digest"]
            manifest = json.loads(blob_path(layout, digest).read_bytes())
            config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())
            return digest, manifest, config
    raise BuildError(f"{layout} has no tag {tag}")


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


# --------------------------------------------------------------------------------------------
# Recording the files a workload opens


def resolve_in_root(root: Path, path: str) -> str | None:
    """Resolve *path* as seen inside *root* (symlinks relative to *root*); returns the
    absolute in-root path of a regular file, or None."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        done.append(part)
    final = root.joinpath(*done)
    try:
        if not stat.S_ISREG(os.lstat(final).st_mode):
            return None
    except OSError:
        return None
    return "/" + "/".join(done)


_OPEN_RE = re.compile(r'^(\d+)\s+(openat|open|execve)\((?:AT_FDCWD, )?"([^"]+)"(.*)$')
_RESUMED_RE = re.compile(r"^(\d+)\s+<\.\.\. (openat|open|execve) resumed>.*= (-?\d+)")
_CHROOT_RE = re.compile(r"^(\d+)\s+chroot\(.*\) = 0")


def parse_strace(text: str) -> list[str]:
    """Paths of successful open/openat/execve calls after the ``chroot`` of the trace, in
    first-open order (strace -f -o output: every line starts with the pid)."""
    in_root = False
    pending: dict[str, str] = {}
    paths: list[str] = []
    for line in text.splitlines():
        if not in_root:
            in_root = bool(_CHROOT_RE.match(line))
            continue
        m = _OPEN_RE.match(line)
        if m:
            pid, _call, path, rest = m.groups()
            if "<unfinished ...>" in rest:
                pending[pid] = path
                continue
            res = re.search(r"= (-?\d+)", rest)
            if res and int(res.group(1)) >= 0 and "O_DIRECTORY" not in rest:
                paths.append(path)
            continue
        r = _RESUMED_RE.match(line)
        if r and r.group(1) in pending:
            path = pending.pop(r.group(1))
            if int(r.group(3)) >= 0:
                paths.append(path)
    return paths


def record_opened_files(layers: list[Path], cmd: list[str], workdir: Path) -> list[str]:
    """Run *cmd* under strace in a chroot of the merged *layers* (hard-linked copy, no
    mounts) and return the regular files it opened, as absolute in-image paths."""
    strace = shutil.which("strace")
    if strace is None:
        raise BuildError("strace is not installed (apt-get install strace)")
    merged = workdir / "merged"
    if merged.exists():
        shutil.rmtree(merged)
    merged.mkdir(parents=True)
    try:
        for layer in layers:  # later layers win: cp -al refuses to overwrite, so remove first
            subprocess.run(
                ["cp", "-al", "--remove-destination", f"{layer}/.", str(merged)], check=True
            )
        trace = workdir / "strace.txt"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        subprocess.run(
            [
                strace,
                "-f",
                "-qq",
                "-e",
                "trace=open,openat,execve,chroot",
                "-o",
                str(trace),
                chroot,
                str(merged),
                *cmd,
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            cwd="/",
        )
        seen: dict[str, None] = {}
        for p in parse_strace(trace.read_text()):
            resolved = resolve_in_root(merged, p)
            if resolved is not None:
                seen.setdefault(resolved, None)
        return list(seen)
    finally:
        shutil.rmtree(merged, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Recipes and the cache


@dataclass(frozen=True)
class Recipe:
    name: str
    layers: tuple[Callable[[Path], None], ...]
    cmd: tuple[str, ...]
    expect: str  # what the workload prints
    version: int = 1  # bump when the recipe changes: the cache key
    base: str = ""  # another recipe whose layers (blobs) this image reuses: only cmd differs


RECIPES: dict[str, Recipe] = {
    "tiny": Recipe("tiny", (populate_busybox,), ("/bin/sh", "-c", "echo hello"), "hello"),
    "python": Recipe(
        "python", (populate_python,), ("/usr/bin/python3", "-c", "print('hello')"), "hello"
    ),
    "large": Recipe(
        "large",
        (populate_python, populate_scientific),
        ("/usr/bin/python3", "-c", "import scipy.linalg; print('ok')"),
        "ok",
        version=3,
    ),
    "pandas": Recipe(
        "pandas",
        (),
        ("/usr/bin/python3", "-c", "import pandas, scipy.stats; print('ok')"),
        "ok",
        version=1,
        base="large",
    ),
}


@dataclass
class BuiltImage:
    name: str
    layout: str  # OCI layout directory of the gzip image
    tag: str
    manifest_digest: str
    cmd: list[str]
    expect: str
    layers: list[LayerBlob]
    opened_files: list[str] = field(default_factory=list)
    opened_bytes: int = 0
    rootfs_bytes: int = 0

    @property
    def compressed_bytes(self) -> int:
        return sum(la.size for la in self.layers)

    @property
    def uncompressed_bytes(self) -> int:
        return sum(la.diff_size for la in self.layers)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuiltImage:
        data = dict(data)
        data["layers"] = [LayerBlob(**la) for la in data["layers"]]
        return cls(**data)


def image_dir(cache: Path, name: str) -> Path:
    return cache / f"images-r{RECIPE_VERSION}" / f"{name}-v{RECIPES[name].version}"


def build_image(
    name: str,
    cache: Path = DEFAULT_CACHE,
    *,
    record: bool = True,
    log: Callable[[str], None] = print,
) -> BuiltImage:
    """Build (or load from the cache) the gzip OCI layout of recipe *name*."""
    recipe = RECIPES[name]
    top = image_dir(cache, name)
    meta = top / "image.json"
    if meta.exists():
        return BuiltImage.from_json(json.loads(meta.read_text()))
    if recipe.base:
        base = build_image(recipe.base, cache, record=record, log=log)
        if top.exists():
            shutil.rmtree(top)
        top.mkdir(parents=True)
        return _derive_image(recipe, base, top, record=record, log=log)
    if top.exists():
        shutil.rmtree(top)
    top.mkdir(parents=True)
    layout = top / "oci-gzip"
    layer_dirs: list[Path] = []
    blobs: list[LayerBlob] = []
    for i, populate in enumerate(recipe.layers):
        ldir = top / f"rootfs-{i}"
        ldir.mkdir()
        log(f"images: {name}: assembling layer {i} ({populate.__name__})")
        populate(ldir)
        layer_dirs.append(ldir)
        log(f"images: {name}: compressing layer {i} ({tree_size(ldir) / MB:.0f} MB)")
        blobs.append(write_layer(ldir, layout / "blobs/sha256"))
    digest = write_oci_image(layout, "latest", blobs, list(recipe.cmd))
    opened: list[str] = []
    opened_bytes = 0
    if record:
        log(f"images: {name}: recording the files the workload opens")
        opened = record_opened_files(layer_dirs, list(recipe.cmd), top)
        for p in opened:
            for ldir in reversed(layer_dirs):
                f = ldir / p.lstrip("/")
                if f.exists() or f.is_symlink():
                    opened_bytes += os.lstat(f).st_size
                    break
        (top / "prioritized-files.txt").write_text("".join(p + "\n" for p in opened))
    built = BuiltImage(
        name=name,
        layout=str(layout),
        tag="latest",
        manifest_digest=digest,
        cmd=list(recipe.cmd),
        expect=recipe.expect,
        layers=blobs,
        opened_files=opened,
        opened_bytes=opened_bytes,
        rootfs_bytes=sum(tree_size(d) for d in layer_dirs),
    )
    for ldir in layer_dirs:  # the layers live on as blobs; keep the cache small
        shutil.rmtree(ldir)
    meta.write_text(json.dumps(built.to_json(), indent=1))
    return built


def _derive_image(
    recipe: Recipe, base: BuiltImage, top: Path, *, record: bool, log: Callable[[str], None]
) -> BuiltImage:
    """*base*'s layers (blob files hard-linked, byte for byte the same) under *recipe*'s
    command; the files that command opens are recorded in a chroot unpacked from the blobs."""
    layout = top / "oci-gzip"
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)
    for la in base.layers:
        hexd = la.digest.split(":", 1)[1]
        src = Path(base.layout) / "blobs/sha256" / hexd
        try:
            os.link(src, blobs / hexd)
        except OSError:
            shutil.copy2(src, blobs / hexd)
    digest = write_oci_image(layout, "latest", list(base.layers), list(recipe.cmd))
    opened: list[str] = []
    opened_bytes = 0
    layer_dirs: list[Path] = []
    try:
        if record:
            for i, la in enumerate(base.layers):
                ldir = top / f"rootfs-{i}"
                ldir.mkdir()
                log(f"images: {recipe.name}: unpacking layer {i} to record the workload")
                with tarfile.open(blobs / la.digest.split(":", 1)[1], "r:gz") as tf:
                    # our own blobs (write_layer): absolute symlinks included, as written
                    if hasattr(tarfile, "fully_trusted_filter"):
                        tf.extraction_filter = tarfile.fully_trusted_filter
                    tf.extractall(ldir)
                layer_dirs.append(ldir)
            log(f"images: {recipe.name}: recording the files the workload opens")
            opened = record_opened_files(layer_dirs, list(recipe.cmd), top)
            for p in opened:
                for ldir in reversed(layer_dirs):
                    f = ldir / p.lstrip("/")
                    if f.exists() or f.is_symlink():
                        opened_bytes += os.lstat(f).st_size
                        break
            (top / "prioritized-files.txt").write_text("".join(p + "\n" for p in opened))
    finally:
        for ldir in layer_dirs:
            shutil.rmtree(ldir, ignore_errors=True)
    built = BuiltImage(
        name=recipe.name,
        layout=str(layout),
        tag="latest",
        manifest_digest=digest,
        cmd=list(recipe.cmd),
        expect=recipe.expect,
        layers=list(base.layers),
        opened_files=opened,
        opened_bytes=opened_bytes,
        rootfs_bytes=base.rootfs_bytes,
    )
    (top / "image.json").write_text(json.dumps(built.to_json(), indent=1))
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build benchmark images (cached).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("names", nargs="+", choices=sorted(RECIPES))
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    b.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            img = build_image(name, args.cache, record=not args.no_record)
        except BuildError as exc:
            print(f"images: {name}: {exc}", file=sys.stderr)
            return 1
        print(
            f"images: {name}: {img.uncompressed_bytes / MB:.0f} MB uncompressed, "
            f"{img.compressed_bytes / MB:.0f} MB gzip, workload opens {len(img.opened_files)} "
            f"files ({img.opened_bytes / MB:.1f} MB) -> {img.layout}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
