"""The Go reference implementation as a real peer: our two small Go programs in ``peers/go/``
around Debian's packaged containerd/stargz-snapshotter 0.12 (``estargz`` and ``store``).

``./run setup`` builds them into ``.peers/bin`` (``peers/go/build.sh``, offline, GOPATH mode);
:func:`peer_binary` runs the same script again, which is a no-op when the binaries are current
and rebuilds them after a source change, so ``pytest`` alone also works.

* :func:`go_build` / :func:`go_verify`: ``estargz-peer build`` (tar -> eStargz with
  ``estargz.Build``) and ``verify`` (the Go reader checks the TOC digest and every chunk, and
  lists what it sees).
* :func:`go_convert_image`: an OCI image whose layers the Go writer re-wrote (the "Go-written
  eStargz" variant of the benchmarks).
* :class:`GoStoreDaemon`: ``go-stargz-store`` (the Go store's ALS FUSE filesystem) as a child
  process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PEER_BIN = REPO / ".peers" / "bin"
BUILD_SCRIPT = REPO / "peers" / "go" / "build.sh"
PEERS = ("estargz-peer", "go-stargz-store")

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"


class GoPeerUnavailable(RuntimeError):
    """The Go toolchain or Debian's stargz-snapshotter library is not installed."""


class GoPeerError(RuntimeError):
    """A Go peer program failed; the message is its stderr line."""


_built = False


def ensure_built(timeout: float = 900) -> Path:
    """Run ``peers/go/build.sh`` once per process (it returns at once when nothing changed);
    returns the directory of the binaries."""
    global _built
    if _built:
        return PEER_BIN
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), str(PEER_BIN)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode == 3:
        raise GoPeerUnavailable(proc.stderr.strip())
    if proc.returncode != 0:
        raise GoPeerError(f"peers/go/build.sh failed ({proc.returncode}): {proc.stderr[-3000:]}")
    _built = True
    return PEER_BIN


def peer_binary(name: str) -> Path:
    if name not in PEERS:
        raise ValueError(f"unknown Go peer {name!r}")
    return ensure_built() / name


def _run_peer(
    args: Sequence[str], timeout: float, nice: int = 0, tmpdir: Path | None = None
) -> str:
    prefix = ["nice", "-n", str(nice)] if nice else []
    env = dict(os.environ)
    if tmpdir is not None:  # estargz.Build spools the decompressed tar and its parts there
        env["TMPDIR"] = str(tmpdir)
    proc = subprocess.run(
        [*prefix, str(peer_binary("estargz-peer")), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise GoPeerError(proc.stderr.strip() or f"estargz-peer exited {proc.returncode}")
    return proc.stdout


@dataclass(frozen=True)
class GoBuild:
    """What ``estargz-peer build`` reports for the blob it wrote."""

    path: Path
    digest: str  # sha256 of the blob
    size: int
    diff_id: str  # sha256 of the blob decompressed
    toc_digest: str
    uncompressed_size: int  # of the source tar (decompressed when it was gzip)
    diff_size: int  # of the blob decompressed (the uncompressed-size annotation)
    missed_prioritized: tuple[str, ...]

    def meta(self) -> dict[str, Any]:
        """The JSON the Go reference vectors carried (``X.json`` beside ``X.esgz``)."""
        return {
            "digest": self.digest,
            "size": self.size,
            "diffID": self.diff_id,
            "tocDigest": self.toc_digest,
            "uncompressedSize": self.uncompressed_size,
            "diffSize": self.diff_size,
        }


def go_build(
    tar: Path,
    out: Path,
    *,
    chunk_size: int = 0,
    prioritized: Sequence[str] = (),
    level: int | None = None,
    timeout: float = 3600,
    nice: int = 0,
    tmpdir: Path | None = None,
) -> GoBuild:
    """``estargz-peer build``: *tar* (plain or gzip) -> eStargz blob *out*, by ``estargz.Build``
    (its defaults: 4 MiB chunks, gzip level 9, the tar split in GOMAXPROCS parts); *nice*
    lowers its CPU priority (benchmark images are built beside other work)."""
    args = ["build", "-o", str(out)]
    if chunk_size:
        args += ["-chunk-size", str(chunk_size)]
    if level is not None:
        args += ["-level", str(level)]
    for p in prioritized:
        args += ["-prioritize", p]
    res = json.loads(_run_peer([*args, str(tar)], timeout, nice, tmpdir))
    return GoBuild(
        path=out,
        digest=res["digest"],
        size=int(res["size"]),
        diff_id=res["diffID"],
        toc_digest=res["tocDigest"],
        uncompressed_size=int(res["uncompressedSize"]),
        diff_size=int(res["diffSize"]),
        missed_prioritized=tuple(res.get("missedPrioritized") or ()),
    )


def go_verify(blob: Path, toc_digest: str | None = None, timeout: float = 600) -> dict[str, Any]:
    """``estargz-peer verify``: the Go reader opens *blob*, checks the TOC digest (when given)
    and every chunk of every regular file, and returns ``{tocDigest, diffID, chunksVerified,
    entries: [{path, type, mode, size, uid, gid, linkName, hardlinkOf, devMajor, devMinor,
    xattrs (base64), offset, chunks, sha256}]}`` (entries by path, landmarks included).
    Raises :class:`GoPeerError` with the reader's message when anything does not verify."""
    args = ["verify"]
    if toc_digest:
        args += ["-toc-digest", toc_digest]
    out: dict[str, Any] = json.loads(_run_peer([*args, str(blob)], timeout))
    return out


# ---------------------------------------------------------------------------------------------
# Images re-written by the Go writer
# ---------------------------------------------------------------------------------------------


def go_convert_image(
    src_layout: Path,
    src_tag: str,
    dst_layout: Path,
    dst_tag: str,
    *,
    prioritized: Sequence[str] = (),
    chunk_size: int = 0,
    nice: int = 0,
    log: Any = None,
) -> str:
    """Write ``dst_layout:dst_tag``: *src*'s image with every layer re-written by the Go
    writer (``estargz-peer build``), annotated as ``ctr-remote``/``nerdctl`` do (TOC digest,
    uncompressed size) and the config's ``diff_ids`` replaced. *prioritized* (absolute or
    relative in-image paths) go to every layer; the writer skips those a layer lacks.
    Returns the manifest digest."""
    from layerstore.image.ocilayout import OCILayout

    index = json.loads((src_layout / "index.json").read_text())
    descs = [
        m
        for m in index.get("manifests", [])
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == src_tag
    ]
    if len(descs) != 1:
        raise GoPeerError(f"{src_layout}: {len(descs)} manifests tagged {src_tag!r}")

    def blob(digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return src_layout / "blobs" / algo / hexd

    manifest = json.loads(blob(descs[0]["digest"]).read_bytes())
    config = json.loads(blob(manifest["config"]["digest"]).read_bytes())
    dst = OCILayout.create(dst_layout)
    rel = [p.lstrip("/") for p in prioritized]
    spool = dst_layout / ".go-writer-tmp"  # the Go writer's temporary files, same disk
    spool.mkdir(parents=True, exist_ok=True)
    diff_ids: list[str] = []
    layers: list[dict[str, Any]] = []
    for i, desc in enumerate(manifest["layers"]):
        if log is not None:
            log(f"go writer: layer {i + 1}/{len(manifest['layers'])} ({desc['size']} B)")
        # Written straight into the layout's staging area, then verified and renamed.
        f, tmp = dst.staging_file()
        f.close()
        try:
            res = go_build(
                blob(desc["digest"]),
                Path(tmp),
                chunk_size=chunk_size,
                prioritized=rel,
                nice=nice,
                tmpdir=spool,
            )
            if dst.has_blob(res.digest):
                os.unlink(tmp)
            else:
                dst.commit_staged(tmp, res.digest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            shutil.rmtree(spool, ignore_errors=True)
            raise
        diff_ids.append(res.diff_id)
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": res.digest,
                "size": res.size,
                "annotations": {
                    TOC_DIGEST_ANNOTATION: res.toc_digest,
                    UNCOMPRESSED_SIZE_ANNOTATION: str(res.diff_size),
                },
            }
        )
    shutil.rmtree(spool, ignore_errors=True)
    config = dict(config)
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config_raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = dst.write_blob(config_raw)
    new_manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": manifest["config"].get(
                "mediaType", "application/vnd.oci.image.config.v1+json"
            ),
            "digest": config_digest,
            "size": len(config_raw),
        },
        "layers": layers,
    }
    raw = json.dumps(new_manifest, sort_keys=True, separators=(",", ":")).encode()
    man_digest = dst.write_blob(raw)
    dst.set_ref(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": man_digest,
            "size": len(raw),
        },
        dst_tag,
    )
    return man_digest


# ---------------------------------------------------------------------------------------------
# The Go store as a child process
# ---------------------------------------------------------------------------------------------


def _fuse_mounted(target: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target and fields[sep + 1].startswith("fuse"):
                return True
    return False


class GoStoreDaemon:
    """``go-stargz-store -root ROOT [-config FILE] -log-level LEVEL MOUNT`` as a child process,
    waited for until MOUNT is a FUSE mount; :meth:`stop` sends SIGTERM and makes sure the mount
    is gone. Registries on 127.0.0.1 are reached over plain http (the library decides so for
    loopback hosts). ``config_text`` is the Go store's TOML (``fs/config.Config`` keys, e.g.
    ``no_background_fetch = true``). HOME and DOCKER_CONFIG point into *workdir*, so no
    credentials of the machine are read."""

    def __init__(
        self,
        workdir: Path,
        *,
        mountpoint: Path | None = None,
        root: Path | None = None,
        config_text: str = "",
        log_level: str = "info",
        log_path: Path | None = None,
    ) -> None:
        self.workdir = workdir.absolute()
        self.root = root or self.workdir / "root"
        self.mountpoint = mountpoint or self.workdir / "store"
        self._target = ""
        self.config = self.workdir / "go-store.toml"
        self.config_text = config_text
        self.log_level = log_level
        self.log_path = log_path or self.workdir / "go-store.log"
        self.home = self.workdir / "home"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def command(self) -> list[str]:
        return [
            str(peer_binary("go-stargz-store")),
            "-root",
            str(self.root),
            "-config",
            str(self.config),
            "-log-level",
            self.log_level,
            str(self.mountpoint),
        ]

    def start(self, timeout: float = 60.0) -> GoStoreDaemon:
        cmd = self.command()  # builds the peers first when needed
        for d in (self.workdir, self.root, self.mountpoint, self.home / ".docker"):
            d.mkdir(parents=True, exist_ok=True)
        self._target = str(self.mountpoint.resolve())
        self.config.write_text(self.config_text)
        env = {
            **os.environ,
            "HOME": str(self.home),
            "DOCKER_CONFIG": str(self.home / ".docker"),
        }
        env.pop("NOTIFY_SOCKET", None)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.workdir,
            )
        deadline = t0 + timeout
        while not self.is_mounted():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise GoPeerError(f"go-stargz-store exited with {code}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise GoPeerError(f"go-stargz-store did not mount in {timeout:.0f} s")
            time.sleep(0.02)
        self.startup_s = time.monotonic() - t0
        return self

    def is_mounted(self) -> bool:
        return bool(self._target) and _fuse_mounted(self._target)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def peak_rss_bytes(self) -> int:
        """VmHWM of the daemon (0 when it is gone)."""
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        proc, self.proc = self.proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        for cmd in (["fusermount3", "-u", "-q"], ["umount", "-l"]):
            if not self.is_mounted():
                break
            if shutil.which(cmd[0]):
                subprocess.run([*cmd, self._target], capture_output=True, check=False)
        return code

    def __enter__(self) -> GoStoreDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
