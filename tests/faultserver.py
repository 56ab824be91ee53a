"""An in-process HTTP server for fault injection, plus a tiny programmable registry on top.

``FaultServer(host)`` listens on ``host:<free port>`` (any 127.0.0.0/8 address, so 127.0.0.1
and 127.0.0.2 are different hosts) and answers each request with the first matching route::

    srv = FaultServer()
    srv.route("GET", r"/v2/", lambda req: Reply(200))
    srv.start()  # or use it as a context manager
    ...
    srv.requests  # every request seen (method, path, query, headers, body)

A :class:`Reply` can misbehave: ``stall`` seconds before the status line, ``stall_body``
seconds after the headers, ``truncate`` the body after N bytes and drop the connection,
``dribble_headers`` / ``dribble_body`` send the status line and headers / the body one byte
every that many seconds (never idle long enough for a read timeout), ``never_answer`` reads the
request and sends nothing at all (until the server stops). Request bodies are recorded
(``srv.requests[i].body``).
:func:`range_reply` answers Range requests (single, multipart, refused, ignored, or broken).
:class:`FakeRegistry` serves manifests and blobs from dicts with optional Basic or Bearer auth
and blob redirects to another server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHTTPHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler for test servers: silent, and a TLS ClientHello (a client
    probing https first) is dropped at once instead of waiting for a request line."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def handle(self) -> None:
        if self.connection.recv(1, socket.MSG_PEEK) == b"\x16":
            return
        super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    server_host: str
    client_port: int = 0  # the client's source port: the same port means a reused connection

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Reply:
    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    stall: float = 0.0
    stall_body: float = 0.0
    truncate: int | None = None
    content_length: int | None = None  # override the Content-Length header
    dribble_headers: float = 0.0  # seconds between single bytes of the status line and headers
    dribble_body: float = 0.0  # seconds between single bytes of the body
    dribble_chunk: int = 1  # bytes sent per dribble step (a slow but honest link: more)
    never_answer: bool = False  # read the request, answer nothing until the server stops


Handler = Callable[[Request], Reply]


class FaultServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._stopping = threading.Event()  # ends dribbles and never-answers
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Add a route; *pattern* must match the whole path (no query)."""
        with self._lock:
            self._routes.append((method.upper(), re.compile(pattern), handler))

    def clear_routes(self) -> None:
        with self._lock:
            self._routes.clear()

    def count(self, method: str | None = None, path: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method)
                and (path is None or re.fullmatch(path, r.path))
            )

    def start(self) -> FaultServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _dispatch(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append(req)
            routes = list(self._routes)
        for method, pattern, handler in routes:
            if method in (req.method, "*") and pattern.fullmatch(req.path):
                return handler(req)
        return Reply(404, [("Content-Type", "text/plain")], b"no route\n")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(QuietHTTPHandler):
            def _handle(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Request(
                    method=self.command,
                    path=url.path,
                    query=urllib.parse.parse_qs(url.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    server_host=server.netloc,
                    client_port=int(self.client_address[1]),
                )
                reply = server._dispatch(req)
                if reply.never_answer:
                    server._stopping.wait()
                    self.close_connection = True
                    return
                if reply.stall:
                    time.sleep(reply.stall)
                try:
                    names = {k.lower() for k, _ in reply.headers}
                    headers = list(reply.headers)
                    if "content-length" not in names:
                        n = reply.content_length
                        headers.append(("Content-Length", str(len(reply.body) if n is None else n)))
                    if reply.truncate is not None:
                        headers.append(("Connection", "close"))
                    reason = self.responses.get(reply.status, ("",))[0]
                    head = f"{self.protocol_version} {reply.status} {reason}\r\n"
                    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
                    self._send(head.encode("latin-1"), reply.dribble_headers, 1)
                    if reply.stall_body:
                        time.sleep(reply.stall_body)
                    if self.command != "HEAD":
                        data = reply.body
                        if reply.truncate is not None:
                            data = data[: reply.truncate]
                        self._send(data, reply.dribble_body, reply.dribble_chunk)
                    if reply.truncate is not None or any(
                        k.lower() == "connection" and v.lower() == "close" for k, v in headers
                    ):
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _send(self, data: bytes, every: float, step: int) -> None:
                """*data*, at once or *step* bytes every *every* seconds (until the server
                stops)."""
                if every <= 0:
                    self.wfile.write(data)
                    self.wfile.flush()
                    return
                for i in range(0, len(data), max(1, step)):
                    if server._stopping.wait(every):
                        self.close_connection = True
                        raise BrokenPipeError("fault server stopping")
                    self.wfile.write(data[i : i + max(1, step)])
                    self.wfile.flush()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return _Handler


# --- ranges -------------------------------------------------------------------------------------
def parse_range_header(value: str | None, size: int) -> list[tuple[int, int]] | None:
    """``bytes=a-b,c-d`` -> [(start, end_inclusive)], None when absent or malformed."""
    if not value or not value.startswith("bytes="):
        return None
    out: list[tuple[int, int]] = []
    for spec in value[len("bytes=") :].split(","):
        a, _, b = spec.strip().partition("-")
        if not a:
            n = int(b)
            out.append((max(0, size - n), size - 1))
        else:
            out.append((int(a), min(int(b), size - 1) if b else size - 1))
    return out


def range_reply(
    data: bytes,
    range_header: str | None,
    *,
    multi: str = "multipart",
    boundary: str = "FAULTSERVERBOUNDARY",
    wrong_content_range: bool = False,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> Reply:
    """Answer a Range request for *data*.

    *multi* decides multi-range answers: ``multipart`` (RFC 7233), ``refuse`` (400),
    ``refuse416``, ``ignore`` (200 with the whole body), ``coalesce`` (one 206 part spanning
    all ranges). *wrong_content_range* shifts every Content-Range by one byte.
    """
    size = len(data)
    ranges = parse_range_header(range_header, size)
    base = [("Accept-Ranges", "bytes"), *extra_headers]
    if ranges is None:
        return Reply(200, [*base, ("Content-Type", "application/octet-stream")], data)
    for s, e in ranges:
        if s >= size or e < s:
            return Reply(416, [*base, ("Content-Range", f"bytes */{size}")])
    shift = 1 if wrong_content_range else 0

    def cr(s: int, e: int) -> str:
        return f"bytes {s + shift}-{e + shift}/{size}"

    if len(ranges) == 1 or multi == "coalesce":
        s, e = min(r[0] for r in ranges), max(r[1] for r in ranges)
        hdrs = [*base, ("Content-Type", "application/octet-stream"), ("Content-Range", cr(s, e))]
        return Reply(206, hdrs, data[s : e + 1])
    if multi == "refuse":
        return Reply(400, [*base, ("Content-Type", "text/plain")], b"multi-range not supported")
    if multi == "refuse416":
        return Reply(416, [*base, ("Content-Range", f"bytes */{size}")])
    if multi == "ignore":
        return Reply(200, [*base, ("Content-Type", "application/octet-stream")], data)
    chunks: list[bytes] = []
    for s, e in ranges:
        chunks.append(
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: {cr(s, e)}\r\n\r\n".encode()
            + data[s : e + 1]
            + b"\r\n"
        )
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    ctype = f"multipart/byteranges; boundary={boundary}"
    return Reply(206, [*base, ("Content-Type", ctype)], body)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- a programmable registry --------------------------------------------------------------------
@dataclass
class FakeRegistry:
    """Distribution API over dicts, on a :class:`FaultServer`.

    ``auth``: ``none``, ``basic`` (``username``/``password``) or ``bearer`` (a token endpoint
    on the same server at ``/token`` that gives ``token`` for valid Basic credentials).
    ``redirect_blobs_to``: another FaultServer; blob GETs answer 307 to
    ``<that server>/storage/<digest>?sig=<signature>`` and :meth:`serve_storage` serves them.
    ``blob_reply``: optional hook ``(req, data) -> Reply`` replacing the blob answer.
    """

    server: FaultServer
    auth: str = "none"
    username: str = "alice"
    password: str = field(default_factory=lambda: "pw-" + secrets.token_hex(6))
    token: str = field(default_factory=lambda: "tok-" + secrets.token_hex(12))
    signature: str = field(default_factory=lambda: "sig-" + secrets.token_hex(12))
    multi: str = "multipart"
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    redirect_blobs_to: FaultServer | None = None
    blob_reply: Callable[[Request, bytes], Reply] | None = None
    manifest_reply: Callable[[Request, bytes, str], Reply] | None = None
    valid_signatures: set[str] = field(default_factory=set)
    issued_token: str | None = None  # what /token hands out, when not ``token``

    def __post_init__(self) -> None:
        from tests import secret_guard

        secret_guard.register_basic(self.username, self.password, "registry password")
        secret_guard.register(self.token, "bearer token")
        secret_guard.register(self.signature, "signed URL query")
        self.server.route("GET", r"/v2/?", self._ping)
        self.server.route("GET", r"/token", self._token)
        self.server.route("*", r"/v2/(.+)/manifests/([^/]+)", self._manifest)
        self.server.route("*", r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64})", self._blob)
        if self.redirect_blobs_to is not None:
            self.redirect_blobs_to.route(
                "GET", r"/storage/(sha256:[0-9a-f]{64})", self.serve_storage
            )

    # content
    def add_blob(self, data: bytes) -> str:
        d = sha256(data)
        self.blobs[d] = data
        return d

    def add_manifest(self, ref: str, body: bytes, media_type: str) -> str:
        d = sha256(body)
        self.manifests[ref] = (body, media_type)
        self.manifests[d] = (body, media_type)
        return d

    def add_image(
        self,
        repo_tag: str,
        layers: Sequence[bytes],
        *,
        layer_media_type: str = "application/vnd.oci.image.layer.v1.tar",
        layer_annotations: Sequence[Mapping[str, str]] = (),
        diff_ids: Sequence[str] = (),
    ) -> tuple[str, bytes]:
        """Config + layers + manifest under tag *repo_tag*; returns (digest, manifest).

        *diff_ids* default to the layers' own digests (right for uncompressed layers)."""
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {
                    "type": "layers",
                    "diff_ids": list(diff_ids) or [sha256(b) for b in layers],
                },
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": self.add_blob(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": layer_media_type,
                        "digest": self.add_blob(b),
                        "size": len(b),
                        **(
                            {"annotations": dict(layer_annotations[i])}
                            if i < len(layer_annotations)
                            else {}
                        ),
                    }
                    for i, b in enumerate(layers)
                ],
            }
        ).encode()
        return self.add_manifest(repo_tag, manifest, json.loads(manifest)["mediaType"]), manifest

    # auth
    def _authorized(self, req: Request) -> bool:
        got = req.header("Authorization") or ""
        if self.auth == "none":
            return True
        if self.auth == "basic":
            return got == self.basic_header()
        return got == f"Bearer {self.token}"

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _challenge(self) -> Reply:
        if self.auth == "basic":
            value = 'Basic realm="fake"'
        else:
            value = (
                f'Bearer realm="{self.server.url}/token",service="fake-registry",'
                'scope="repository:x:pull"'
            )
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        return Reply(
            401,
            [("WWW-Authenticate", value), ("Content-Type", "application/json")],
            body,
        )

    def _ping(self, req: Request) -> Reply:
        return Reply(200) if self._authorized(req) else self._challenge()

    def _token(self, req: Request) -> Reply:
        if (req.header("Authorization") or "") != self.basic_header():
            return Reply(401, [("Content-Type", "application/json")], b"{}")
        tok = self.issued_token or self.token
        body = json.dumps({"token": tok, "expires_in": 300}).encode()
        return Reply(200, [("Content-Type", "application/json")], body)

    def _manifest(self, req: Request) -> Reply:
        if not self._authorized(req):
            return self._challenge()
        ref = req.path.rsplit("/", 1)[1]
        if ref not in self.manifests:
            return Reply(404, [("Content-Type", "application/json")], b'{"errors":[]}')
        body, media_type = self.manifests[ref]
        if self.manifest_reply is not None:
            return self.manifest_reply(req, body, media_type)
        return Reply(
            200,
            [("Content-Type", media_type), ("Docker-Content-Digest", sha256(body))],
            body,
        )

    def _blob(self, req: Request) -> Reply:
        if not self._authorized(req):
            return self._challenge()
        digest = req.path.rsplit("/", 1)[1]
        data = self.blobs.get(digest)
        if data is None:
            return Reply(404)
        if self.redirect_blobs_to is not None and req.method == "GET":
            sig = f"{self.signature}-{secrets.token_hex(4)}"
            self.valid_signatures.add(sig)
            loc = f"{self.redirect_blobs_to.url}/storage/{digest}?sig={sig}"
            return Reply(307, [("Location", loc)])
        if self.blob_reply is not None:
            return self.blob_reply(req, data)
        if req.method == "HEAD":
            return Reply(200, [("Content-Type", "application/octet-stream")], data)
        return range_reply(data, req.header("Range"), multi=self.multi)

    def serve_storage(self, req: Request) -> Reply:
        digest = req.path.rsplit("/", 1)[1]
        sig = (req.query.get("sig") or [""])[0]
        if sig not in self.valid_signatures:
            return Reply(403, [("Content-Type", "text/plain")], b"signature expired\n")
        data = self.blobs[digest]
        if self.blob_reply is not None:
            return self.blob_reply(req, data)
        return range_reply(data, req.header("Range"), multi=self.multi)

    def expire_signatures(self) -> None:
        """Every signed URL handed out so far answers 403 from now on."""
        self.valid_signatures.clear()


def merge_headers(*groups: Mapping[str, str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for g in groups:
        out.extend(g.items())
    return out
