"""A test bed on this machine: small real OCI images built without the network, a loopback
docker-registry, podman with private configuration, and the store daemon as a child process.

Shared by the demo (``testbed.demo``), the end-to-end tests (``tests/image_util.py``,
``tests/podman_util.py``, ``tests/test_store_integration.py``) and the benchmarks. Not installed
(neither the wheel nor the RPM has it): it may import the product packages, and no product
module imports it, ``tests`` or ``benchmarks`` (``tests/test_layering.py``). Servers listen on
loopback addresses only.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
from layerstore.image.ocilayout import OCILayout

# ---------------------------------------------------------------------------------------------
# Small real OCI images, built without the network
# ---------------------------------------------------------------------------------------------

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

#: Fixed modification time of every tar member, so that layers are byte-for-byte reproducible.
EPOCH = 1_700_000_000
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh", "ash", "echo", "cat", "ls", "sha256sum", "md5sum", "head", "tail", "wc", "sleep",
    "true", "false", "test", "[", "stat", "find", "grep", "sed", "awk", "mkdir", "rm", "cp",
    "mv", "ln", "touch", "id", "env", "readlink", "dd", "cmp", "od", "hexdump", "seq", "sort",
    "uname", "hostname", "date", "printf", "xargs", "tr", "cut", "du", "df", "mount", "ps",
)  # fmt: skip
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_platform() -> tuple[str, str]:
    """This host's (os, architecture) in OCI/Go spelling."""
    machine = platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
        "i686": "386",
        "i386": "386",
    }.get(machine, machine)
    return "linux", arch


@dataclass(frozen=True)
class Entry:
    """One member of a layer tar. ``kind`` is one of file, dir, symlink, hardlink, fifo, char."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""  # symlink target, or the path a hardlink points to
    uid: int = 0
    gid: int = 0
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, str] = field(default_factory=dict)


def file(path: str, data: bytes | str, mode: int = 0o644, **kw: Any) -> Entry:
    raw = data.encode() if isinstance(data, str) else data
    return Entry(path, "file", raw, mode, **kw)


def directory(path: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(path, "dir", b"", mode, **kw)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, "symlink", b"", 0o777, target)


def hardlink(path: str, target: str) -> Entry:
    return Entry(path, "hardlink", b"", 0o644, target)


_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
}


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """An uncompressed, deterministic layer tar (members in the order given; parents first)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path.lstrip("/") + ("/" if e.kind == "dir" else ""))
            info.type = _TAR_TYPES[e.kind]
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.uname = info.gname = ""
            info.mtime = EPOCH
            info.devmajor, info.devminor = e.devmajor, e.devminor
            if e.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind in ("symlink", "hardlink"):
                info.linkname = e.target.lstrip("/") if e.kind == "hardlink" else e.target
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return out.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """gzip with no name and mtime 0: the same input always gives the same blob."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def busybox_rootfs(extra: Iterable[Entry] = ()) -> list[Entry]:
    """A minimal root filesystem: /bin/busybox, applet symlinks, /etc/passwd and friends."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} not found: install busybox-static")
    entries = [
        directory("bin"),
        file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        *(symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS),
        directory("dev"),
        directory("etc"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
        file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        file("etc/hostname", "stargz-demo\n"),
        directory("proc"),
        directory("root", 0o700),
        directory("sys"),
        directory("tmp", 0o1777),
        directory("usr"),
        directory("usr/bin"),
        directory("var"),
    ]
    entries.extend(extra)
    return entries


def data_layer(
    name: str = "data", size: int = 256 * 1024, seed: int = 1, files: int = 3
) -> list[Entry]:
    """A second layer: pseudo-random data files (incompressible, so sizes are meaningful), a
    script that checks them, and the expected checksums (computed here, checked in the box)."""
    entries = [directory(name)]
    sums = []
    for i in range(files):
        blob = pseudo_random(size, seed * 1000 + i)
        entries.append(file(f"{name}/file{i}.bin", blob))
        sums.append(f"{hashlib.sha256(blob).hexdigest()}  /{name}/file{i}.bin\n")
    entries.append(file(f"{name}/SHA256SUMS", "".join(sums)))
    entries.append(
        file(
            f"{name}/check.sh",
            f"#!/bin/sh\nset -e\nsha256sum -c /{name}/SHA256SUMS >/dev/null\necho {name}-ok\n",
            0o755,
        )
    )
    return entries


def pseudo_random(size: int, seed: int) -> bytes:
    """Deterministic incompressible bytes (sha256 in counter mode)."""
    out = bytearray()
    counter = 0
    key = seed.to_bytes(8, "big")
    while len(out) < size:
        out += hashlib.sha256(key + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


@dataclass
class BuiltLayer:
    blob: bytes  # the compressed blob as it will be in the registry
    diff_id: str  # sha256 of the uncompressed tar
    media_type: str = MEDIA_OCI_LAYER_GZIP
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @classmethod
    def from_entries(cls, entries: Iterable[Entry], level: int = 6) -> BuiltLayer:
        tar = layer_tar(entries)
        return cls(gzip_bytes(tar, level), sha256_digest(tar))


@dataclass
class ImageInfo:
    """What an OCI layout holds for one tag."""

    layout: Path
    tag: str
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        layers: list[dict[str, Any]] = self.manifest["layers"]
        return layers

    @property
    def diff_ids(self) -> list[str]:
        ids: list[str] = self.config["rootfs"]["diff_ids"]
        return ids

    @property
    def compressed_size(self) -> int:
        return sum(int(layer["size"]) for layer in self.layers)

    def blob_path(self, digest: str) -> Path:
        return blob_path(self.layout, digest)

    def is_estargz(self, index: int) -> bool:
        return TOC_DIGEST_ANNOTATION in self.layers[index].get("annotations", {})


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image_config(
    diff_ids: Sequence[str],
    cmd: Sequence[str] = ("/bin/sh",),
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = (DEFAULT_PATH,),
) -> dict[str, Any]:
    os_name, arch = oci_platform()
    cfg: dict[str, Any] = {"Env": list(env), "Cmd": list(cmd), "WorkingDir": "/"}
    if entrypoint is not None:
        cfg["Entrypoint"] = list(entrypoint)
    return {
        "created": "2023-11-14T22:13:20Z",
        "architecture": arch,
        "os": os_name,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": "2023-11-14T22:13:20Z", "created_by": f"stargz-store demo layer {i}"}
            for i in range(len(diff_ids))
        ],
    }


def write_image(
    layout: Path,
    tag: str,
    layers: Sequence[BuiltLayer],
    config: dict[str, Any] | None = None,
) -> ImageInfo:
    """Write (or add to) an OCI image layout (``layerstore.image.ocilayout``): blobs, config,
    manifest, and ``index.json`` with ``tag`` as the ``org.opencontainers.image.ref.name``
    annotation (replacing that tag)."""
    oci = OCILayout.create(layout)
    if config is None:
        config = image_config([layer.diff_id for layer in layers])
    if config["rootfs"]["diff_ids"] != [layer.diff_id for layer in layers]:
        raise ValueError("config rootfs.diff_ids do not match the layers")
    config_raw = _canonical_json(config)
    config_digest = oci.write_blob(config_raw)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": [],
    }
    for layer in layers:
        desc: dict[str, Any] = {
            "mediaType": layer.media_type,
            "digest": oci.write_blob(layer.blob),
            "size": len(layer.blob),
        }
        if layer.annotations:
            desc["annotations"] = dict(layer.annotations)
        manifest["layers"].append(desc)
    manifest_raw = _canonical_json(manifest)
    manifest_digest = oci.write_blob(manifest_raw)
    oci.set_ref(
        {"mediaType": MEDIA_OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest_raw)},
        tag,
    )
    return ImageInfo(layout, tag, manifest_digest, manifest, config_digest, config)


def read_image(layout: Path, tag: str) -> ImageInfo:
    """Read the single-platform image tagged ``tag`` from an OCI layout (an image index under the
    tag is followed to this host's platform)."""
    index = json.loads((layout / "index.json").read_text())
    found = [
        m
        for m in index.get("manifests", [])
        if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag
    ]
    if len(found) != 1:
        raise KeyError(f"{layout}: {len(found)} manifests tagged {tag!r}")
    desc = found[0]
    while desc.get("mediaType") in (
        MEDIA_OCI_INDEX,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ):
        sub = json.loads(blob_path(layout, desc["digest"]).read_bytes())
        os_name, arch = oci_platform()
        candidates = [
            m
            for m in sub["manifests"]
            if m.get("platform", {}).get("os") == os_name
            and m.get("platform", {}).get("architecture") == arch
        ]
        if not candidates:
            raise KeyError(f"{layout}:{tag}: no manifest for {os_name}/{arch}")
        desc = candidates[0]
    raw = blob_path(layout, desc["digest"]).read_bytes()
    if sha256_digest(raw) != desc["digest"]:
        raise ValueError(f"{layout}: manifest {desc['digest']} does not match its digest")
    manifest = json.loads(raw)
    config_digest = manifest["config"]["digest"]
    config = json.loads(blob_path(layout, config_digest).read_bytes())
    return ImageInfo(layout, tag, desc["digest"], manifest, config_digest, config)


def layer_of(image: ImageInfo, index: int) -> BuiltLayer:
    """Layer ``index`` of ``image`` (blob, diff_id, media type, annotations)."""
    desc = image.layers[index]
    return BuiltLayer(
        image.blob_path(desc["digest"]).read_bytes(),
        image.diff_ids[index],
        desc["mediaType"],
        dict(desc.get("annotations", {})),
    )


DEMO_START = """#!/bin/sh
echo "hello from the container"
echo "config: $(cat /app/config.txt)"
echo "assets: $(stat -c %s /app/assets/model.bin) bytes, not read at start"
"""


def build_demo_image(layout: Path, tag: str = "latest", data_size: int = 4 << 20) -> ImageInfo:
    """The demo's image, shaped like many real ones: a base layer (busybox) and an application
    layer whose start reads a script and a small configuration file, while its large assets
    (*data_size* bytes of incompressible data, as a model or a dataset would be) are not read
    at start. ``/app/start.sh`` is the command."""
    base = BuiltLayer.from_entries(busybox_rootfs())
    assets = random.Random(1).randbytes(data_size)  # (fast; pseudo_random is ~10x slower)
    app = BuiltLayer.from_entries(
        [
            directory("app"),
            file("app/start.sh", DEMO_START, 0o755),
            file("app/config.txt", "listen=8080 workers=4\n"),
            directory("app/assets"),
            file("app/assets/model.bin", assets),
        ]
    )
    cfg = image_config([base.diff_id, app.diff_id], cmd=["/app/start.sh"])
    return write_image(layout, tag, [base, app], cfg)


# ---------------------------------------------------------------------------------------------
# A registry on loopback (the CNCF distribution registry, "docker-registry" on Debian)
# ---------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def registry_binary() -> str:
    for name in ("docker-registry", "registry"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("docker-registry not found: apt-get install docker-registry")


_ACCESS_LOG = re.compile(
    r'^\S+ \S+ \S+ \[[^]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d+) '
    r'(?P<size>\S+) "[^"]*" "(?P<agent>[^"]*)"'
)


@dataclass(frozen=True)
class AccessLogLine:
    method: str
    path: str
    status: int
    size: int
    agent: str

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and "/blobs/sha256:" in self.path

    @property
    def digest(self) -> str:
        return self.path.rsplit("/", 1)[-1].split("?")[0] if "/blobs/" in self.path else ""


class LoopbackRegistry:
    """A private registry process on 127.0.0.1 with its storage under ``workdir``.

    With ``users`` ({user: password}) it requires HTTP basic auth (htpasswd, bcrypt entries made
    with the ``htpasswd`` tool)."""

    def __init__(self, workdir: Path, users: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.users = dict(users or {})
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> LoopbackRegistry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            lines = []
            for user, password in self.users.items():
                out = subprocess.run(
                    ["htpasswd", "-Bbn", user, password],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                lines.append(out.stdout.strip())
            htpasswd.write_text("\n".join(lines) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: stargz-test\n    path: {htpasswd}\n"
        last_error = ""
        for _attempt in range(5):
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(
                "version: 0.1\n"
                "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
                "storage:\n"
                f"  filesystem:\n    rootdirectory: {self.workdir / 'data'}\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: stargz-store-test\n" + auth
            )
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [registry_binary(), "serve", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._answers():
                    return self
                time.sleep(0.05)
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"docker-registry did not start: {last_error}")

    def requests(self) -> list[AccessLogLine]:
        """Every request the registry has answered so far (from its access log)."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = _ACCESS_LOG.match(line)
            if m:
                lines.append(
                    AccessLogLine(
                        m["method"],
                        m["path"],
                        int(m["status"]),
                        int(m["size"]) if m["size"].isdigit() else 0,
                        m["agent"],
                    )
                )
        return lines

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, and asking for credentials
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LoopbackRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def client(self) -> RegistryHTTP:
        user, password = next(iter(self.users.items())) if self.users else ("", "")
        return RegistryHTTP(self.host, user, password)

    def auth_json(self, path: Path) -> Path:
        """A containers-auth.json(5) file with this registry's credentials (first user)."""
        return write_auth_json(path, {self.host: next(iter(self.users.items()))})

    def manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        return self.client.manifest(repo, ref)

    def blob(self, repo: str, digest: str) -> bytes:
        return self.client.blob(repo, digest)


def write_auth_json(path: Path, creds: Mapping[str, tuple[str, str]]) -> Path:
    """A containers-auth.json(5) file: {registry: (user, password)}."""
    auths = {
        host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        for host, (user, password) in creds.items()
    }
    path.write_text(json.dumps({"auths": auths}))
    path.chmod(0o600)
    return path


class RegistryHTTP:
    """A minimal OCI distribution client over plain http (basic auth when a user is given):
    enough to push an image byte for byte and read manifests and blobs back."""

    def __init__(self, host: str, user: str = "", password: str = "") -> None:
        self.host = host
        self.user = user
        self.password = password

    def _request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        if url.startswith("/"):
            url = f"http://{self.host}{url}"
        req = urllib.request.Request(url, data=body, method=method)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        if self.user:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read(), dict(resp.headers.items())
        except urllib.error.HTTPError as e:
            if method == "HEAD" and e.code == 404:
                return 404, b"", {}
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{method} {url}: HTTP {e.code}: {detail}") from None

    def manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        """The raw manifest of ``repo:ref`` and its digest (computed from the bytes)."""
        accept = f"{MEDIA_OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"
        _, body, _ = self._request("GET", f"/v2/{repo}/manifests/{ref}", None, {"Accept": accept})
        return body, sha256_digest(body)

    def blob(self, repo: str, digest: str) -> bytes:
        body = self._request("GET", f"/v2/{repo}/blobs/{digest}")[1]
        if sha256_digest(body) != digest:
            raise RuntimeError(f"blob {digest} from {self.host}/{repo} does not match its digest")
        return body

    def has_blob(self, repo: str, digest: str) -> bool:
        return self._request("HEAD", f"/v2/{repo}/blobs/{digest}")[0] == 200

    def put_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """Upload one blob (monolithic upload), unless the repository already has it."""
        digest = digest or sha256_digest(data)
        if sha256_digest(data) != digest:
            raise ValueError(f"blob does not match {digest}")
        if self.has_blob(repo, digest):
            return digest
        _, _, headers = self._request("POST", f"/v2/{repo}/blobs/uploads/")
        location = headers["Location"]
        sep = "&" if "?" in location else "?"
        self._request(
            "PUT",
            f"{location}{sep}digest={urllib.parse.quote(digest)}",
            data,
            {"Content-Type": "application/octet-stream"},
        )
        return digest

    def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str) -> str:
        self._request("PUT", f"/v2/{repo}/manifests/{ref}", raw, {"Content-Type": media_type})
        return sha256_digest(raw)


def push_image(
    image: ImageInfo, registry: LoopbackRegistry | RegistryHTTP, repo: str, tag: str
) -> str:
    """Push ``image`` (from its OCI layout) to ``registry`` as ``repo:tag`` over the distribution
    API: blobs and manifest go byte for byte (no re-compression, no manifest conversion, no
    state outside the layout). Returns the manifest digest."""
    client = registry.client if isinstance(registry, LoopbackRegistry) else registry
    raw = image.blob_path(image.manifest_digest).read_bytes()
    for digest in [image.config_digest, *(layer["digest"] for layer in image.layers)]:
        client.put_blob(repo, image.blob_path(digest).read_bytes(), digest)
    client.put_manifest(repo, tag, raw, image.manifest.get("mediaType", MEDIA_OCI_MANIFEST))
    return image.manifest_digest


def skopeo_push(
    layout: Path,
    tag: str,
    dest: str,
    *,
    authfile: Path | None = None,
    timeout: float = 300,
) -> None:
    """``skopeo copy --preserve-digests oci:LAYOUT:TAG docker://DEST`` over plain http.

    Note: skopeo running as root writes containers/image's blob-info cache to the machine-wide
    /var/lib/containers/cache (it has no option to move it); ``push_image`` does not."""
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"]
    if authfile is not None:
        cmd += ["--dest-authfile", str(authfile)]
    cmd += [f"oci:{layout}:{tag}", f"docker://{dest}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")


# ---------------------------------------------------------------------------------------------
# podman with private configuration and storage (nothing global is read or written)
# ---------------------------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class PodmanEnv:
    """podman pointed at its own containers.conf, storage.conf and registries.conf under
    ``workdir`` (graphroot, runroot, tmp_dir, network config all inside it).

    ``layer_store`` is the store's mountpoint, given to containers/storage as
    ``additionallayerstores = ["<mountpoint>:ref"]``. ``insecure`` registries are reached over
    plain http. ``authfile`` becomes ``REGISTRY_AUTH_FILE``."""

    def __init__(
        self,
        workdir: Path,
        *,
        layer_store: Path | None = None,
        insecure: Sequence[str] = (),
        authfile: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.layer_store = layer_store
        self.insecure = list(insecure)
        self.authfile = authfile
        self.graphroot = workdir / "graph"
        # podman refuses a runroot longer than 50 characters (conmon's socket paths live below
        # it), so it cannot go below a deep work directory: a short directory in /tmp.
        self.runroot = Path(tempfile.mkdtemp(prefix="podman-run-", dir="/tmp"))
        self.tmpdir = workdir / "tmp"
        self.containers_conf = workdir / "containers.conf"
        self.storage_conf = workdir / "storage.conf"
        self.registries_conf = workdir / "registries.conf"
        self.write_configs()

    def write_configs(self) -> None:
        for d in (self.graphroot, self.runroot, self.tmpdir, self.workdir / "networks"):
            d.mkdir(parents=True, exist_ok=True)
        self.containers_conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            'netns = "none"\n'
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f"events_logfile_path = {_toml_str(str(self.tmpdir / 'events.log'))}\n"
            f"tmp_dir = {_toml_str(str(self.tmpdir))}\n"
            f"volume_path = {_toml_str(str(self.graphroot / 'volumes'))}\n"
            f"static_dir = {_toml_str(str(self.graphroot / 'libpod'))}\n"
            "[network]\n"
            f"network_config_dir = {_toml_str(str(self.workdir / 'networks'))}\n"
        )
        als = ""
        if self.layer_store is not None:
            path = str(self.layer_store)
            if "," in path or ":" in path:
                raise ValueError(f"an additional layer store path may not hold ',' or ':': {path}")
            als = f"additionallayerstores = [{_toml_str(path + ':ref')}]\n"
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {_toml_str(str(self.graphroot))}\n"
            f"runroot = {_toml_str(str(self.runroot))}\n"
            "[storage.options]\n" + als
        )
        regs = "".join(
            f"[[registry]]\nlocation = {_toml_str(h)}\ninsecure = true\n" for h in self.insecure
        )
        self.registries_conf.write_text(
            'unqualified-search-registries = []\nshort-name-mode = "disabled"\n' + regs
        )

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CONTAINERS_CONF=str(self.containers_conf),
            CONTAINERS_STORAGE_CONF=str(self.storage_conf),
            CONTAINERS_REGISTRIES_CONF=str(self.registries_conf),
            TMPDIR=str(self.tmpdir),
        )
        env.pop("CONTAINERS_REGISTRIES_CONF_DIR", None)
        if self.authfile is not None:
            env["REGISTRY_AUTH_FILE"] = str(self.authfile)
        else:
            env.pop("REGISTRY_AUTH_FILE", None)
        return env

    def command(self, *args: str) -> list[str]:
        # Not --root/--runroot: podman 4.3 then drops every option of storage.conf, including
        # additionallayerstores. CONTAINERS_STORAGE_CONF carries them (``check_storage``).
        return ["podman", *args]

    def check_storage(self) -> dict[str, Any]:
        """``podman info``'s store section, after checking that podman uses our graphroot,
        runroot and (when configured) additional layer store."""
        out = self.run_podman("info", "--format", "{{json .Store}}")
        store: dict[str, Any] = json.loads(out.stdout)
        if store.get("graphRoot") != str(self.graphroot) or store.get("runRoot") != str(
            self.runroot
        ):
            raise RuntimeError(f"podman does not use our storage: {store}")
        if self.layer_store is not None:
            opts = store.get("graphOptions") or {}
            if opts.get("overlay.additionallayerstore") != f"{self.layer_store}:ref":
                raise RuntimeError(f"podman does not use the additional layer store: {opts}")
        return store

    def run_podman(
        self, *args: str, timeout: float = 300, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.command(*args)
        if input is None:
            out = subprocess.run(
                cmd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        else:
            out = subprocess.run(
                cmd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                input=input,
            )
        if check and out.returncode != 0:
            raise PodmanError(cmd, out.returncode, out.stdout, out.stderr)
        return out

    def pull(self, ref: str, timeout: float = 300) -> str:
        """``podman pull``; returns the image id."""
        out = self.run_podman("pull", "--quiet", "--tls-verify=false", ref, timeout=timeout)
        return out.stdout.strip().splitlines()[-1]

    def run(self, image: str, *cmd: str, timeout: float = 300) -> str:
        """``podman run --rm --network none IMAGE CMD...``; returns stdout."""
        out = self.run_podman(
            "run", "--rm", "--network", "none", "--pull", "never", image, *cmd, timeout=timeout
        )
        return out.stdout

    def helper_pids(self) -> list[int]:
        """Processes other than us whose command line names our graphroot or runroot: conmon
        and the ``podman container cleanup`` it starts when a container exits."""
        needles = (str(self.graphroot).encode(), str(self.runroot).encode())
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if any(n in cmdline for n in needles):
                pids.append(int(entry))
        return pids

    def wait_for_helpers(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.helper_pids() and time.monotonic() < deadline:
            time.sleep(0.1)

    def mounts_below(self) -> list[str]:
        """Mount points below ``workdir`` and the runroot (overlay, shm, ...), deepest first."""
        found = [*mounts_below(str(self.workdir.resolve())), *mounts_below(str(self.runroot))]
        return sorted(set(found), key=len, reverse=True)

    def cleanup(self) -> None:
        """Stop containers, unmount everything below ``workdir``, delete ``workdir``."""
        if self.graphroot.exists():
            with contextlib.suppress(Exception):
                self.run_podman("rm", "--all", "--force", "--time", "0", timeout=60, check=False)
            # conmon runs `podman container cleanup` when a container ends, asynchronously: it
            # would mount graph/overlay again and re-create directories after we deleted them.
            self.wait_for_helpers()
            with contextlib.suppress(Exception):
                self.run_podman("umount", "--all", timeout=60, check=False)
        for point in self.mounts_below():
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        remove_tree(self.runroot)
        remove_tree(self.workdir)


def mounts_below(root: str) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo), deepest first."""
    points = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root.rstrip("/") + "/"):
                points.add(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """``rm -rf path``, refused while anything is mounted below it (deleting through a live
    overlay or FUSE mount would reach into other file systems)."""
    if not os.path.lexists(path):
        return
    left = mounts_below(str(path.resolve()))
    if left:
        raise RuntimeError(f"not removing {path}: still mounted below it: {left}")
    shutil.rmtree(path, ignore_errors=True)


class PodmanError(RuntimeError):
    def __init__(self, cmd: Sequence[str], code: int, stdout: str, stderr: str) -> None:
        super().__init__(f"{' '.join(cmd)} exited {code}: {stderr.strip()[-3000:]}")
        self.cmd = list(cmd)
        self.code = code
        self.stdout = stdout
        self.stderr = stderr


# ---------------------------------------------------------------------------------------------
# The store daemon as a child process
# ---------------------------------------------------------------------------------------------


def store_config_toml(
    *,
    registries_conf: Path | None,
    registries_conf_d: Path,
    insecure: Sequence[str] = (),
    background_fetch: bool = True,
    log_level: str = "debug",
) -> str:
    """The daemon's config.toml for a private set-up: our registries.conf (the machine's
    drop-ins are not read), loopback registries reached over http, no kubelet auth file."""
    lines = ["[registry]"]
    if registries_conf is not None:
        lines.append(f"registries_conf = {_toml_str(str(registries_conf))}")
    lines += [
        f"registries_conf_d = {_toml_str(str(registries_conf_d))}",
        f"insecure_registries = [{', '.join(_toml_str(h) for h in insecure)}]",
        "[auth]",
        "extra_auth_files = []",
        "[fetch]",
        f"background_fetch = {'true' if background_fetch else 'false'}",
        "[log]",
        f"level = {_toml_str(log_level)}",
        'format = "json"',
    ]
    return "\n".join(lines) + "\n"


class StoreDaemon:
    """``python -m stargz_store --root ROOT --config CONFIG MOUNTPOINT`` as a child process.

    ``start()`` waits for ``READY=1`` on a private ``$NOTIFY_SOCKET`` (sd_notify), then checks
    that MOUNTPOINT is a FUSE mount. ``stop()`` sends SIGTERM and makes sure the mount is gone
    (``fusermount3 -u``, then ``umount -l``), whatever state the daemon ended in.
    ``env`` adds to the environment (``CONTAINERS_REGISTRIES_CONF``, ``REGISTRY_AUTH_FILE``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        registries_conf: Path | None = None,
        insecure: Sequence[str] = (),
        authfile: Path | None = None,
        background_fetch: bool = True,
        config_text: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        workdir = self.workdir = workdir.absolute()
        self.root = workdir / "root"
        self.mountpoint = workdir / "store"
        # Resolved now: resolving a dead FUSE mount later would fail with ENOTCONN.
        self._target = str(workdir.resolve() / "store")
        self.config = workdir / "config.toml"
        self.log_path = workdir / "daemon.log"
        self.notify_path = workdir / "notify.sock"
        self.home = workdir / "home"
        self.config_text = config_text
        if config_text is None:
            self.config_text = store_config_toml(
                registries_conf=registries_conf,
                registries_conf_d=workdir / "registries.conf.d",
                insecure=insecure,
                background_fetch=background_fetch,
            )
        # The credential chain of containers-auth.json(5) is confined to our files: an explicit
        # REGISTRY_AUTH_FILE (an empty one when none is given), and HOME, XDG_* and
        # DOCKER_CONFIG in the work directory, so that root's own credentials never leak in.
        self.authfile = authfile or workdir / "no-auth.json"
        self.extra_env = {
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.home / "run"),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "DOCKER_CONFIG": str(self.home / "docker"),
            "REGISTRY_AUTH_FILE": str(self.authfile),
        }
        if registries_conf is not None:
            self.extra_env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
        self.extra_env.update(env or {})
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "stargz_store",
            "--root",
            str(self.root),
            "--config",
            str(self.config),
            *self.extra_args,
            str(self.mountpoint),
        ]

    def start(self, timeout: float = 60.0) -> StoreDaemon:
        for d in (
            self.workdir,
            self.root,
            self.mountpoint,
            self.home,
            self.workdir / "registries.conf.d",
        ):
            # --root as the daemon makes it (0700): it would tighten a wider one, with a warning
            d.mkdir(mode=0o700 if d == self.root else 0o777, parents=True, exist_ok=True)
        self.config.write_text(self.config_text or "")
        if not self.authfile.exists():
            self.authfile.write_text('{"auths": {}}')
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.notify_path))
            env = dict(os.environ)
            env.update(self.extra_env)
            env["NOTIFY_SOCKET"] = str(self.notify_path)
            env.setdefault("PYTHONUNBUFFERED", "1")
            # A daemon that hangs is sent SIGABRT before SIGKILL: faulthandler then writes
            # every thread's stack to the log.
            env.setdefault("PYTHONFAULTHANDLER", "1")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=self.workdir,  # where a core file would go, if enabled
                )
            deadline = time.monotonic() + timeout
            messages: list[str] = []
            while "READY=1" not in messages:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the store daemon exited with {self.proc.returncode} before READY=1: "
                        + self.log_tail()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    self._dump_stacks(self.proc)
                    raise RuntimeError(
                        f"no READY=1 from the store daemon in {timeout:.0f} s: "
                        + self.log_tail(12000)
                    )
                sock.settimeout(min(left, 0.2))
                try:
                    data = sock.recv(4096)
                except socket.timeout:
                    continue
                messages.extend(data.decode(errors="replace").splitlines())
        except BaseException:
            self.stop()
            raise
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.notify_path.unlink()
        if not self.is_mounted():
            self.stop()
            raise RuntimeError(f"READY=1 but {self.mountpoint} is not a FUSE mount")
        return self

    def _dump_stacks(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGABRT (faulthandler prints every thread's stack to the log), then SIGKILL."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGABRT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def is_mounted(self) -> bool:
        target = self._target
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[4] == target and fields[sep + 1].startswith("fuse"):
                    return True
        return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the daemon and make sure its mount is gone; returns its exit status."""
        proc, self.proc = self.proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._dump_stacks(proc)
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        for cmd in (["fusermount3", "-u", "-q"], ["umount", "-l"]):
            if not self.is_mounted():
                break
            subprocess.run([*cmd, self._target], capture_output=True, check=False)
        return code

    def __enter__(self) -> StoreDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


def convert(src: str, dst: str, *extra: str, timeout: float = 600) -> None:
    """``stargz-store convert SRC DST`` (as ``python -m stargz_store``, this interpreter)."""
    cmd = [sys.executable, "-m", "stargz_store", "convert", *extra, src, dst]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {out.returncode}: {(out.stderr or out.stdout).strip()}"
        )


def store_layer_links(podman: PodmanEnv, mountpoint: Path) -> list[str]:
    """Layers of podman's storage whose ``diff`` is a symlink into the store's mount."""
    overlay = podman.graphroot / "overlay"
    prefix = str(mountpoint.resolve()) + "/"
    found = []
    if overlay.is_dir():
        for layer in sorted(overlay.iterdir()):
            diff = layer / "diff"
            if diff.is_symlink() and os.readlink(diff).startswith(prefix):
                found.append(os.readlink(diff))
    return found


def disk_usage(path: Path) -> int:
    """Bytes allocated below ``path``, not following symlinks nor crossing mounts."""
    total = 0
    dev = path.lstat().st_dev
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_dev == dev:
                    total += st.st_blocks * 512
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
    return total
