"""OCI distribution client: manifests, configs, verified blobs, lazy ranged blob reads, pushes.

Owns the distribution API (:class:`RegistryClient`: ``resolve``, ``get_manifest``,
``get_blob``, ``blob_exists``, ``blob_source``, ``push_blob``, ``put_manifest``,
``pull_sources``), its result types, which pull source (mirror or registry) a request goes to,
and what is verified: every manifest, config and whole blob against its digest, sizes against
limits and descriptors, and the budget of each operation: every public method runs in a
budget scope (:mod:`.deadline`; per pull source when it tries several), so all the requests
one call makes (token, redirects, retries) end by one total deadline. It is thin over three
modules:

- :mod:`.transport`: sessions and retries, TLS, the http/https probe, redirect policy, body
  reading;
- :mod:`.auth`: challenges, tokens and credentials (per *source host*: a mirror never sees the
  upstream registry's credentials and vice versa);
- :mod:`.blobsource`: :class:`BlobSource`, ranged reads of one blob, and range parsing.

The names other code imports from here (``PullSource``, ``RegistrySettings``, ``BlobSource``,
``parse_content_range``...) are re-exported from those modules.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union
from urllib.parse import quote, urljoin, urlsplit

import requests
import structlog

from layerstore import digest as _digest
from layerstore.common.redact import describe_error, redact_url
from layerstore.errors import (
    DigestError,
    ImageReferenceError,
    LayerStoreError,
    ManifestError,
    RegistryError,
    VerificationError,
)
from layerstore.registry import manifest as _manifest
from layerstore.registry.auth import Body, CredentialProvider, RegistryAuth
from layerstore.registry.blobsource import BlobSource, parse_byteranges, parse_content_range
from layerstore.registry.reference import Reference, api_host, parse_reference, split_location
from layerstore.registry.settings import RegistrySettings
from layerstore.registry.transport import (
    REDIRECT_CODES,
    Endpoint,
    PullSource,
    Transport,
    drain,
    origin,
    raise_for_status,
    read_capped,
)

log = structlog.get_logger(__name__)


class RegistriesConfProvider(Protocol):
    """``layerstore.registry.registries_conf`` implements this; raises BlockedRegistryError."""

    def pull_sources(self, name: str, *, by_digest: bool) -> list[PullSource]: ...


# --- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestResponse:
    raw: bytes = field(repr=False)
    media_type: str
    digest: str
    manifest: _manifest.Manifest = field(repr=False)
    source: PullSource


@dataclass(frozen=True)
class ResolvedImage:
    reference: Reference
    source: PullSource
    manifest_digest: str
    manifest: _manifest.ImageManifest = field(repr=False)
    config: _manifest.ImageConfig = field(repr=False)
    raw_manifest: bytes = field(repr=False)
    media_type: str
    raw_config: bytes = field(repr=False)
    index_digest: str | None = None
    index: _manifest.ImageIndex | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        return self.manifest_digest


RefLike = Union[Reference, str]


def _as_reference(ref: RefLike) -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(ref)


# --- the client -----------------------------------------------------------------------------------
class RegistryClient:
    """The distribution API over :attr:`transport` and :attr:`auth`. Thread-safe."""

    def __init__(
        self,
        credentials: CredentialProvider | None = None,
        registries: RegistriesConfProvider | None = None,
        *,
        settings: RegistrySettings | None = None,
    ) -> None:
        self._registries = registries
        self.settings = settings or RegistrySettings()
        self.transport = Transport(self.settings)
        self.auth = RegistryAuth(self.transport, credentials)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sources and endpoints ------------------------------------------------------------------
    def pull_sources(self, ref: RefLike) -> list[PullSource]:
        r = _as_reference(ref)
        if self._registries is None:
            return [PullSource(r.name, insecure=self._insecure_host(r.domain))]
        sources = self._registries.pull_sources(r.name, by_digest=r.digest is not None)
        if not sources:
            raise RegistryError(f"no pull source for {r.name}")
        return sources

    def _push_source(self, ref: Reference) -> PullSource:
        # Pushes go to the reference as written: registries.conf's location rewrite and mirrors
        # are for pulls (containers/image does the same); its insecure and blocked flags apply.
        for src in self.pull_sources(ref):  # raises BlockedRegistryError
            if not src.mirror:
                return PullSource(ref.name, insecure=src.insecure)
        return PullSource(ref.name, insecure=self._insecure_host(ref.domain))

    def _insecure_host(self, domain: str) -> bool:
        ins = self.settings.insecure_registries
        return domain in ins or api_host(domain) in ins

    def _endpoint(self, source: PullSource) -> Endpoint:
        domain, repository = split_location(source.location)
        insecure = source.insecure or self._insecure_host(domain)
        return Endpoint(domain, repository, insecure, source)

    # --- GET with redirects ---------------------------------------------------------------------
    def get_following(
        self,
        ep: Endpoint,
        path: str,
        headers: Mapping[str, str],
        *,
        actions: Sequence[str] = ("pull",),
    ) -> tuple[requests.Response, str, bool]:
        """An authorized GET of *path* in *ep* with redirects followed by hand (see
        :meth:`Transport.follow_redirects`). Returns (response, final URL, redirected).

        A 401/403 at the end of a redirect (an expired signed URL) re-resolves once through
        the registry.
        """
        for attempt in (0, 1):
            resp = self.auth.request(ep, "GET", path, actions=actions, headers=headers)
            auth = resp.request.headers.get("Authorization") if resp.request else None
            resp, url, redirected = self.transport.follow_redirects(
                ep, resp, headers, authorization=auth
            )
            if redirected and resp.status_code in (401, 403) and attempt == 0:
                drain(resp)
                log.info("registry_redirect_refused_retrying", host=ep.host, to=redact_url(url))
                continue
            return resp, url, redirected
        raise AssertionError("unreachable")  # pragma: no cover

    # --- manifests ------------------------------------------------------------------------------
    def _fetch_manifest(
        self,
        ep: Endpoint,
        reference: str,
        *,
        expected_digest: str | None,
        expected_size: int | None = None,
    ) -> ManifestResponse:
        accept = ", ".join(_manifest.ACCEPT_MEDIA_TYPES)
        resp, _, _ = self.get_following(ep, f"manifests/{reference}", {"Accept": accept})
        try:
            raise_for_status(resp, ep, f"manifest {reference}")
            raw = read_capped(resp, self.settings.max_manifest_size, ep, "manifest")
            header_digest = resp.headers.get("Docker-Content-Digest")
            content_type = resp.headers.get("Content-Type")
        finally:
            resp.close()
        actual = _digest.sha256_digest(raw)
        if expected_digest is not None and actual != expected_digest:
            raise VerificationError(
                f"manifest {expected_digest} from {ep.describe()} on {ep.host} has digest "
                f"{actual}; refusing it"
            )
        if (
            expected_digest is None
            and header_digest
            and _digest.is_valid(header_digest)
            and header_digest != actual
        ):
            raise VerificationError(
                f"manifest {reference} from {ep.describe()} on {ep.host}: "
                f"Docker-Content-Digest {header_digest} does not match the body ({actual})"
            )
        if expected_size is not None and len(raw) != expected_size:
            raise ManifestError(
                f"manifest {actual} from {ep.host} is {len(raw)} bytes, the index says "
                f"{expected_size}"
            )
        parsed = _manifest.parse_manifest(raw, content_type, limit=self.settings.max_manifest_size)
        return ManifestResponse(raw, parsed.media_type, actual, parsed, ep.source)

    def _each_source(
        self, ref: Reference, action: Callable[[Endpoint], Any], *, nbytes: int = 0
    ) -> Any:
        """``action(ep)`` for each pull source in turn until one succeeds; each source gets its
        own budget (for bodies of *nbytes*), so a dead mirror does not eat the registry's."""
        last: LayerStoreError | None = None
        for source in self.pull_sources(ref):
            ep = self._endpoint(source)
            try:
                with self.transport.budget(nbytes):
                    return action(ep)
            except (RegistryError, ManifestError, VerificationError) as exc:
                last = exc
                if source.mirror:
                    log.info(
                        "registry_mirror_failed",
                        mirror=source.location,
                        reference=str(ref),
                        error=str(exc),
                    )
        assert last is not None
        raise last

    def get_manifest(self, ref: RefLike, *, digest: str | None = None) -> ManifestResponse:
        """The manifest or index for *ref* (by *digest*, else by the reference's digest or
        tag); verified against the digest when fetched by digest."""
        r = _as_reference(ref)
        want = digest or r.digest
        if want is not None:
            _validate_digest(want)
            r = r.with_digest(want)
        target = r.manifest_ref()

        def action(ep: Endpoint) -> ManifestResponse:
            return self._fetch_manifest(ep, target, expected_digest=want)

        result: ManifestResponse = self._each_source(r, action)
        return result

    def resolve(
        self,
        ref: RefLike,
        platform: str | _manifest.Platform | None = None,
        *,
        on_manifest: Callable[[PullSource, _manifest.ImageManifest, str], None] | None = None,
    ) -> ResolvedImage:
        """Manifest (through an index for *platform*) and verified config of *ref*.

        *on_manifest* is called with the source the image manifest came from, the manifest and
        its digest (verified where the reference or the index names one), before the config is
        fetched: the caller can start work that needs only the manifest (the layer manager
        fetches TOCs and looks for an attached profile meanwhile). What it raises is logged,
        not raised."""
        r = _as_reference(ref)
        wanted = platform if platform is not None else self.settings.platform

        def action(ep: Endpoint) -> ResolvedImage:
            top = self._fetch_manifest(ep, r.manifest_ref(), expected_digest=r.digest)
            index: _manifest.ImageIndex | None = None
            index_digest: str | None = None
            chosen = top
            if isinstance(top.manifest, _manifest.ImageIndex):
                index, index_digest = top.manifest, top.digest
                desc = _manifest.select_manifest(top.manifest, wanted)
                chosen = self._fetch_manifest(
                    ep, desc.digest, expected_digest=desc.digest, expected_size=desc.size
                )
                if not isinstance(chosen.manifest, _manifest.ImageManifest):
                    raise ManifestError(f"index entry {desc.digest} in {r} is itself an index")
            manifest = chosen.manifest
            assert isinstance(manifest, _manifest.ImageManifest)
            if on_manifest is not None:
                try:
                    on_manifest(ep.source, manifest, chosen.digest)
                except Exception as e:  # a hint for the caller only
                    log.warning("on_manifest_failed", reference=str(r), error=describe_error(e))
            cap = min(self.settings.max_config_size, manifest.config.size)
            if manifest.config.size > self.settings.max_config_size:
                raise ManifestError(
                    f"config of {r} is {manifest.config.size} bytes, over the "
                    f"{self.settings.max_config_size} byte limit"
                )
            raw_config = self._fetch_blob(ep, manifest.config.digest, cap, what="config")
            config = _manifest.parse_image_config(raw_config, limit=cap)
            if len(config.diff_ids) != len(manifest.layers):
                raise ManifestError(
                    f"image {r}: config has {len(config.diff_ids)} diff_ids for "
                    f"{len(manifest.layers)} layers"
                )
            log.debug(
                "registry_resolved",
                reference=str(r),
                source=ep.source.location,
                digest=chosen.digest,
            )
            return ResolvedImage(
                reference=r,
                source=ep.source,
                manifest_digest=chosen.digest,
                manifest=manifest,
                config=config,
                raw_manifest=chosen.raw,
                media_type=chosen.media_type,
                raw_config=raw_config,
                index_digest=index_digest,
                index=index,
            )

        result: ResolvedImage = self._each_source(r, action)
        return result

    def get_referrers(
        self, ref: RefLike, digest: str, artifact_type: str | None = None
    ) -> bytes | None:
        """The OCI 1.1 referrers index of manifest *digest* in *ref*'s repository (raw JSON,
        filtered by *artifact_type* where the registry filters), or None when the registry
        has no referrers API: the spec forbids a 404 from a registry that has it, and
        registries without it (distribution 2.x) answer 404 to the unknown route."""
        _validate_digest(digest)
        r = _as_reference(ref).with_digest(digest)
        path = f"referrers/{digest}"
        if artifact_type:
            path += "?artifactType=" + quote(artifact_type, safe="")

        def action(ep: Endpoint) -> bytes | None:
            resp, _, _ = self.get_following(ep, path, {"Accept": _manifest.OCI_INDEX})
            try:
                if resp.status_code == 404:
                    return None
                raise_for_status(resp, ep, f"referrers of {digest}")
                return read_capped(resp, self.settings.max_manifest_size, ep, "referrers index")
            finally:
                resp.close()

        found: bytes | None = self._each_source(r, action)
        return found

    # --- blobs ----------------------------------------------------------------------------------
    def _fetch_blob(self, ep: Endpoint, digest: str, max_size: int, *, what: str = "blob") -> bytes:
        resp, _, _ = self.get_following(ep, f"blobs/{digest}", {})
        try:
            raise_for_status(resp, ep, f"{what} {digest}")
            try:
                data = read_capped(resp, max_size, ep, f"{what} {digest}")
            except ManifestError as exc:
                raise RegistryError(str(exc)) from None
        finally:
            resp.close()
        actual = _digest.sha256_digest(data)
        if actual != digest:
            raise VerificationError(
                f"{what} {digest} from {ep.describe()} on {ep.host} has digest {actual}; "
                "refusing it"
            )
        return data

    def get_blob(self, ref: RefLike | ResolvedImage, digest: str, max_size: int) -> bytes:
        """A whole blob of at most *max_size* bytes, verified against *digest* (within the
        budget for *max_size* bytes)."""
        _validate_digest(digest)
        if isinstance(ref, ResolvedImage):
            with self.transport.budget(max_size):
                return self._fetch_blob(self._endpoint(ref.source), digest, max_size)
        r = _as_reference(ref)

        def action(ep: Endpoint) -> bytes:
            return self._fetch_blob(ep, digest, max_size)

        data: bytes = self._each_source(r.with_digest(r.digest or digest), action, nbytes=max_size)
        return data

    def blob_source_at(self, source: PullSource, digest: str, size: int) -> BlobSource:
        """A :class:`BlobSource` over blob *digest* of *size* bytes at *source* (the source a
        manifest came from, as :meth:`resolve` hands it to ``on_manifest``)."""
        _validate_digest(digest)
        if size < 0:
            raise ValueError("blob size must not be negative")
        return BlobSource(self, self._endpoint(source), digest, size)

    def blob_source(self, ref: RefLike | ResolvedImage, digest: str, size: int) -> BlobSource:
        """A lazy :class:`~layerstore.source.RangeSource` over one blob.

        With a :class:`ResolvedImage` the blob is read from the source the manifest came from;
        with a reference, the first source that has the blob (HEAD) is used.
        """
        _validate_digest(digest)
        if size < 0:
            raise ValueError("blob size must not be negative")
        if isinstance(ref, ResolvedImage):
            return BlobSource(self, self._endpoint(ref.source), digest, size)
        r = _as_reference(ref)

        def action(ep: Endpoint) -> BlobSource:
            resp, _, _ = self._get_following_head(ep, digest)
            try:
                raise_for_status(resp, ep, f"blob {digest}")
                length = resp.headers.get("Content-Length")
            finally:
                resp.close()
            if length is not None and length.isdigit() and int(length) != size:
                raise RegistryError(
                    f"blob {digest} in {ep.describe()} on {ep.host} is {length} bytes, "
                    f"expected {size}"
                )
            return BlobSource(self, ep, digest, size)

        src: BlobSource = self._each_source(r.with_digest(r.digest or digest), action)
        return src

    def _get_following_head(self, ep: Endpoint, digest: str) -> tuple[requests.Response, str, bool]:
        resp = self.auth.request(ep, "HEAD", f"blobs/{digest}")
        # A HEAD redirect to blob storage means the blob exists; its size is checked on read.
        if resp.status_code in REDIRECT_CODES:
            resp.status_code = 200
            resp.headers.pop("Content-Length", None)
        return resp, resp.url, False

    # --- pushes ---------------------------------------------------------------------------------
    def blob_exists(self, ref: RefLike, digest: str) -> bool:
        r = _as_reference(ref)
        ep = self._endpoint(self._push_source(r))
        with self.transport.budget():
            return self._blob_exists(ep, digest)

    def _blob_exists(self, ep: Endpoint, digest: str) -> bool:
        resp = self.auth.request(ep, "HEAD", f"blobs/{digest}", actions=("pull", "push"))
        resp.close()
        if resp.status_code == 200 or resp.status_code in REDIRECT_CODES:
            return True
        if resp.status_code == 404:
            return False
        raise_for_status(resp, ep, f"blob {digest}")
        return False

    def push_blob(self, ref: RefLike, data: bytes | str | os.PathLike[str], digest: str) -> bool:
        """Upload a blob unless the repository has it. Returns True when it was uploaded."""
        _validate_digest(digest)
        r = _as_reference(ref)
        ep = self._endpoint(self._push_source(r))
        if isinstance(data, (bytes, bytearray, memoryview)):
            payload = bytes(data)
            if _digest.sha256_digest(payload) != digest:
                raise VerificationError(f"blob to push does not match its digest {digest}")
            size = len(payload)
            path: str | None = None
        else:
            path = os.fspath(data)
            size = os.path.getsize(path)
            payload = b""
        with self.transport.budget(size):
            return self._push_blob(ep, digest, payload, path, size)

    def _push_blob(
        self, ep: Endpoint, digest: str, payload: bytes, path: str | None, size: int
    ) -> bool:
        actions = ("pull", "push")
        if self._blob_exists(ep, digest):
            log.debug("registry_blob_exists", repository=ep.describe(), digest=digest)
            return False
        resp = self.auth.request(
            ep, "POST", "blobs/uploads/", actions=actions, headers={"Content-Length": "0"}
        )
        location = self._upload_location(resp, ep, digest)
        chunk = self.settings.upload_chunk_size
        if chunk > 0 and size > chunk:
            offset = 0
            while offset < size:
                n = min(chunk, size - offset)
                piece = (
                    payload[offset : offset + n] if path is None else _read_file(path, offset, n)
                )
                resp = self.auth.request(
                    ep,
                    "PATCH",
                    location,
                    actions=actions,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + n - 1}",
                        "Content-Length": str(n),
                    },
                    body=piece,
                )
                location = self._upload_location(resp, ep, digest)
                offset += n
            final_body: Body = b""
        elif path is not None:
            file_path = path

            def opener() -> Any:
                return open(file_path, "rb")  # requests streams and closes it

            final_body = opener
        else:
            final_body = payload
        put_url = location + ("&" if "?" in location else "?") + f"digest={digest}"
        headers = {"Content-Type": "application/octet-stream"}
        if chunk > 0 and size > chunk:
            headers["Content-Length"] = "0"
        else:
            headers["Content-Length"] = str(size)
        resp = self.auth.request(
            ep, "PUT", put_url, actions=actions, headers=headers, body=final_body
        )
        try:
            _expect_status(resp, ep, (201,), f"upload of blob {digest}")
        finally:
            resp.close()
        log.info("registry_blob_pushed", repository=ep.describe(), digest=digest, size=size)
        return True

    def check_push(self, ref: RefLike) -> None:
        """Fail now, not after a long conversion, when *ref*'s repository does not take pushes
        (unreachable, TLS, credentials refused, no push right): start a blob upload and cancel
        it. Raises what a push would raise."""
        r = _as_reference(ref)
        ep = self._endpoint(self._push_source(r))
        resp = self.auth.request(
            ep, "POST", "blobs/uploads/", actions=("pull", "push"), headers={"Content-Length": "0"}
        )
        try:
            _expect_status(resp, ep, (202,), "starting a blob upload")
            location = resp.headers.get("Location")
        finally:
            resp.close()
        base = self.transport.base_url(ep)
        url = urljoin(base, location or "")
        if location and origin(url) == origin(base):
            # Best effort: an upload left behind expires on the registry's side.
            with contextlib.suppress(LayerStoreError):
                self.auth.request(ep, "DELETE", url, actions=("pull", "push")).close()
        log.debug("registry_push_checked", repository=ep.describe())

    def _upload_location(self, resp: requests.Response, ep: Endpoint, digest: str) -> str:
        try:
            _expect_status(resp, ep, (202,), f"upload of blob {digest}")
            location = resp.headers.get("Location")
        finally:
            resp.close()
        if not location:
            raise RegistryError(f"registry {ep.host} gave no upload location")
        url = urljoin(self.transport.base_url(ep), location)
        if origin(url) != origin(self.transport.base_url(ep)):
            raise RegistryError(
                f"registry {ep.host} sent an upload location on another host "
                f"({urlsplit(url).netloc}); refusing"
            )
        return url

    def put_manifest(self, ref: RefLike, body: bytes, media_type: str) -> str:
        """PUT a manifest or index under the reference's tag (else its digest); returns the
        manifest digest."""
        r = _as_reference(ref)
        actual = _digest.sha256_digest(body)
        if r.tag is None and r.digest is not None and r.digest != actual:
            raise VerificationError(f"manifest to push does not match its digest {r.digest}")
        ep = self._endpoint(self._push_source(r))
        target = r.tag or actual
        with self.transport.budget(len(body)):
            resp = self.auth.request(
                ep,
                "PUT",
                f"manifests/{target}",
                actions=("pull", "push"),
                headers={"Content-Type": media_type, "Content-Length": str(len(body))},
                body=bytes(body),
            )
            try:
                _expect_status(resp, ep, (200, 201), f"manifest {target}")
                header = resp.headers.get("Docker-Content-Digest")
            finally:
                resp.close()
        if header and _digest.is_valid(header) and header != actual:
            raise VerificationError(
                f"registry {ep.host} stored manifest {target} as {header}, expected {actual}"
            )
        log.info("registry_manifest_pushed", repository=ep.describe(), reference=target)
        return actual


# --- helpers --------------------------------------------------------------------------------------
def _expect_status(
    resp: requests.Response, ep: Endpoint, codes: tuple[int, ...], what: str
) -> None:
    """Nothing when a push step got one of *codes*; else the error its status means, or a
    RegistryError for an unexpected success or redirect."""
    if resp.status_code in codes:
        return
    raise_for_status(resp, ep, what)
    raise RegistryError(
        f"{what} to {ep.describe()}: unexpected HTTP {resp.status_code}", status=resp.status_code
    )


def _read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise RegistryError(f"{path} changed while it was being uploaded")
    return data


def _validate_digest(digest: str) -> None:
    try:
        _digest.validate(digest)
    except DigestError as exc:
        raise ImageReferenceError(str(exc)) from None


__all__ = [
    "BlobSource",
    "CredentialProvider",
    "Endpoint",
    "ManifestResponse",
    "PullSource",
    "RegistriesConfProvider",
    "RegistryClient",
    "RegistrySettings",
    "ResolvedImage",
    "parse_byteranges",
    "parse_content_range",
]
