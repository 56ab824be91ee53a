"""A read-only OCI distribution registry on 127.0.0.1 that serves one OCI image layout.

Why not a registry process (docker-registry) or a temporary tag in the destination's
repository: the store only reads images from registries, so the private copy of the image that
``optimize`` runs must be served by one, but a registry binary is not a dependency of the
store, and a temporary tag would need push rights on the source side, survive a crash and
cannot be deleted on many registries. This server needs nothing: it is a thread of the
``optimize`` process, listens on an ephemeral loopback port, and serves the layout's manifests
(by tag and by digest) and blobs (with single and multiple byte ranges, which the store uses for
lazy reads) under one repository name. Everything else is 404; nothing can be written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from layerstore.digest import is_valid
from layerstore.image.ocilayout import REF_NAME_ANNOTATION, OCILayout

_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_RANGE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")
_PIECE = 1 << 20
MAX_RANGES = 256


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """``bytes=a-b,c-d`` -> [(start, end inclusive)] within *size*; None when unsatisfiable or
    malformed (then the whole blob is not sent either: 416)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec:
        return None
    out = []
    for part in spec.split(","):
        m = _RANGE.fullmatch(part)
        if m is None:
            return None
        a, b = m.group(1), m.group(2)
        if a == "" and b == "":
            return None
        if a == "":  # suffix: the last b bytes
            n = int(b)
            if n == 0:
                return None
            start, end = max(0, size - n), size - 1
        else:
            start = int(a)
            end = int(b) if b else size - 1
            end = min(end, size - 1)
        if start > end or start >= size:
            return None
        out.append((start, end))
    if not out or len(out) > MAX_RANGES:
        return None
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "stargz-store-optimize"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _error(self, code: int, err: str, message: str) -> None:
        body = json.dumps({"errors": [{"code": err, "message": message}]}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.end_headers()
            if not head:
                self.wfile.write(b"{}")
            return
        prefix = f"/v2/{self.server.name}/"
        if not path.startswith(prefix):
            self._error(404, "NAME_UNKNOWN", "repository name not known to registry")
            return
        kind, _, ref = path[len(prefix) :].partition("/")
        if kind == "manifests" and ref:
            self._manifest(ref, head)
        elif kind == "blobs" and is_valid(ref):
            self._blob(ref, head)
        else:
            self._error(404, "NOT_FOUND", "not found")

    def _manifest(self, ref: str, head: bool) -> None:
        layout = self.server.layout
        digest = ref if is_valid(ref) else self.server.tags().get(ref)
        if digest is None or not layout.has_blob(digest):
            self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            return
        body = layout.blob_path(digest).read_bytes()
        try:
            media_type = json.loads(body).get("mediaType")
        except (ValueError, AttributeError):
            media_type = None
        if media_type not in _MANIFEST_TYPES:
            self._error(404, "MANIFEST_UNKNOWN", "not a manifest")
            return
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _blob(self, digest: str, head: bool) -> None:
        path = self.server.layout.blob_path(digest)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            header = self.headers.get("Range")
            ranges = parse_ranges(header, size) if header else [(0, size - 1)] if size else []
            if ranges is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not header or len(ranges) == 1:
                start, end = ranges[0] if ranges else (0, -1)
                self.send_response(206 if header else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Docker-Content-Digest", digest)
                self.send_header("Accept-Ranges", "bytes")
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if not head:
                    self._copy(f, start, end)
                return
            self._multipart(f, ranges, size, head)

    def _multipart(self, f: Any, ranges: Sequence[tuple[int, int]], size: int, head: bool) -> None:
        boundary = secrets.token_hex(16)
        heads = [
            (
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {s}-{e}/{size}\r\n\r\n"
            ).encode()
            for s, e in ranges
        ]
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = sum(len(h) for h in heads) + sum(e - s + 1 for s, e in ranges)
        length += 2 * (len(ranges) - 1) + len(tail)
        self.send_response(206)
        self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head:
            return
        for i, ((s, e), h) in enumerate(zip(ranges, heads)):
            if i:
                self.wfile.write(b"\r\n")
            self.wfile.write(h)
            self._copy(f, s, e)
        self.wfile.write(tail)

    def _copy(self, f: Any, start: int, end: int) -> None:
        pos = start
        while pos <= end:
            data = os.pread(f.fileno(), min(_PIECE, end - pos + 1), pos)
            if not data:
                raise OSError(f"blob shorter than expected at {pos}")
            self.wfile.write(data)
            pos += len(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    layout: OCILayout
    name: str

    def server_activate(self) -> None:
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        with self.connections_lock:
            self.open_connections.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Keep-alive connections end with the server (their handler threads would go on
        serving otherwise)."""
        with self.connections_lock:
            conns = list(self.open_connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def tags(self) -> dict[str, str]:
        out = {}
        for d in self.layout.index().get("manifests", []):
            tag = (d.get("annotations") or {}).get(REF_NAME_ANNOTATION)
            if isinstance(tag, str):
                out[tag] = d["digest"]
        return out


class LayoutRegistry:
    """``with LayoutRegistry(layout_dir, "optimize/image") as reg:`` serves the layout's tags
    as ``reg.host/optimize/image:TAG`` until the block ends."""

    def __init__(self, layout_dir: Path, name: str) -> None:
        self.layout = OCILayout.open(layout_dir)
        self.name = name
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.host = ""
        """``127.0.0.1:PORT`` once started."""

    def reference(self, tag: str) -> str:
        return f"{self.host}/{self.name}:{tag}"

    def start(self) -> LayoutRegistry:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.layout = self.layout
        server.name = self.name
        self._server = server
        self.host = f"127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, name="optimize-registry", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.close_connections()
            server.server_close()

    def __enter__(self) -> LayoutRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
