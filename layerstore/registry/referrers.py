"""OCI 1.1 referrers: artifacts that point at an image manifest through their ``subject``.

Used for workload profiles (``stargz-store optimize --attach`` pushes one, the daemon looks it
up), but generic: an *artifact* here is an OCI image manifest with an ``artifactType``, the
empty config (``application/vnd.oci.empty.v1+json``, ``{}``), one layer holding the payload
and a ``subject`` naming the image manifest it belongs to. The image itself is untouched: its
digest, signatures and digest pins stay valid.

Finding the artifacts of a manifest (:func:`list_referrers`):

1. the referrers API, ``GET /v2/<name>/referrers/<digest>?artifactType=...``, where the
   registry has it (an OCI image index; a registry that has the API never answers 404);
2. otherwise the *referrers tag scheme* of the distribution spec: an OCI image index under the
   tag ``sha256-<hex of the subject digest>`` listing the artifacts (what any registry can
   store, Debian's docker-registry 2.8 included). Which of the two a registry host speaks is
   remembered per client, so a lookup costs one request once that is known.

Attaching (:func:`attach`): the payload blob, the empty config and the artifact manifest are
pushed (the manifest by digest, no tag); then, when the referrers API does not list the
artifact, the tag index is read, modified and written back (entries of the same
``artifactType`` are replaced, others kept; the read-modify-write is not atomic, as the spec
says). Fetching (:func:`fetch_artifact`): the newest artifact of the type (by its
``org.opencontainers.image.created`` annotation), its manifest verified by digest and checked
to name the subject, then its payload verified by digest and bounded in size.
"""

from __future__ import annotations

import base64
import builtins
import json
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import structlog

from layerstore.digest import is_valid, sha256_digest
from layerstore.errors import ManifestError, NotFoundError, VerificationError
from layerstore.registry import manifest as mf
from layerstore.registry.client import RefLike, RegistryClient
from layerstore.registry.reference import Reference, parse_reference

log = structlog.get_logger(__name__)

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = sha256_digest(EMPTY_BLOB)
CREATED_ANNOTATION = "org.opencontainers.image.created"

_T = TypeVar("_T")

SCHEME_API = "referrers API"
SCHEME_TAG = "referrers tag"


def _in_thread(fn: Callable[..., _T], *args: Any) -> Future[_T]:
    """*fn(*args)* on a thread of its own (daemon: an answer nobody waits for any more does not
    hold the process); its result or exception in the future."""
    fut: Future[_T] = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # handed to whoever waits
            fut.set_exception(e)

    threading.Thread(target=run, name="stargz-referrers", daemon=True).start()
    return fut


def _repo(ref: RefLike) -> Reference:
    """The repository of *ref*, without tag or digest."""
    r = ref if isinstance(ref, Reference) else parse_reference(ref)
    return Reference(r.domain, r.path)


def _tagged(r: Reference, tag: str) -> Reference:
    return Reference(r.domain, r.path).with_tag(tag)


def _by_digest(r: Reference, digest: str) -> Reference:
    return Reference(r.domain, r.path).with_digest(digest)


def referrers_tag(subject: str) -> str:
    """``sha256:<hex>`` -> ``sha256-<hex>``, the tag of the fallback index."""
    if not is_valid(subject):
        raise ValueError(f"invalid digest {subject!r}")
    return subject.replace(":", "-", 1)


@dataclass(frozen=True)
class Referrer:
    """One entry of a referrers index."""

    digest: str
    size: int
    media_type: str
    artifact_type: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def created(self) -> str:
        return self.annotations.get(CREATED_ANNOTATION, "")

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "artifactType": self.artifact_type,
        }
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def _entries(raw: bytes, what: str) -> list[Referrer]:
    """The descriptors of a referrers index (unknown or malformed entries are skipped)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ManifestError(f"{what} is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise ManifestError(f"{what} is not an image index")
    out = []
    for d in doc["manifests"]:
        if not isinstance(d, dict):
            continue
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not is_valid(digest):
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            continue
        ann = d.get("annotations") if isinstance(d.get("annotations"), dict) else {}
        out.append(
            Referrer(
                digest,
                size,
                str(d.get("mediaType") or mf.OCI_MANIFEST),
                str(d.get("artifactType") or ""),
                {k: v for k, v in (ann or {}).items() if isinstance(k, str) and isinstance(v, str)},
            )
        )
    return out


class Referrers:
    """Referrer operations over one :class:`RegistryClient`. Thread-safe; remembers per
    registry host whether it has the referrers API."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self._lock = threading.Lock()  # guards _api (a leaf)
        self._api: dict[str, bool] = {}

    def _has_api(self, ref: Reference) -> bool | None:
        with self._lock:
            return self._api.get(ref.domain)

    def _learn(self, ref: Reference, has: bool) -> None:
        with self._lock:
            self._api[ref.domain] = has

    # --- listing ---------------------------------------------------------------------------
    def list(
        self, ref: RefLike, subject: str, artifact_type: str | None = None
    ) -> tuple[list[Referrer], str]:
        """The artifacts referring to manifest *subject* (of *artifact_type* when given) and
        the scheme that answered (:data:`SCHEME_API` or :data:`SCHEME_TAG`)."""
        r = _repo(ref)
        has_api = self._has_api(r)
        tag_answer: Future[builtins.list[Referrer]] | None = None
        if has_api is None:
            # Not known yet for this host: the tag index is asked for at the same time, so a
            # registry without the API (most of them) costs one round trip, not two; one with
            # it gets one request too many, once per host.
            tag_answer = _in_thread(self._tag_index, r, subject)
        if has_api is not False:
            raw = self.client.get_referrers(r, subject, artifact_type)
            if raw is not None:
                self._learn(r, True)
                found = _entries(raw, f"referrers index of {subject}")
                return _of_type(found, artifact_type), SCHEME_API
            self._learn(r, False)
        found = tag_answer.result() if tag_answer is not None else self._tag_index(r, subject)
        return _of_type(found, artifact_type), SCHEME_TAG

    def _tag_index(self, r: Reference, subject: str) -> builtins.list[Referrer]:
        """The entries of the referrers tag index of *subject* (none when the tag is absent)."""
        try:
            resp = self.client.get_manifest(_tagged(r, referrers_tag(subject)))
        except NotFoundError:
            return []
        if not isinstance(resp.manifest, mf.ImageIndex):
            raise ManifestError(f"tag {referrers_tag(subject)} of {r.name} is not an index")
        return _entries(resp.raw, "referrers tag index")

    # --- fetching ----------------------------------------------------------------------------
    def fetch_newest(
        self,
        ref: RefLike,
        subject: str,
        artifact_type: str,
        max_bytes: int,
    ) -> tuple[bytes, Referrer] | None:
        """The payload of the newest artifact of *artifact_type* referring to *subject*, or
        None when there is none. Raises :class:`RegistryError` / :class:`ManifestError` /
        :class:`VerificationError` for one that is there but broken."""
        r = _repo(ref)
        found, _ = self.list(r, subject, artifact_type)
        if not found:
            return None
        newest = max(enumerate(found), key=lambda t: (t[1].created, t[0]))[1]
        return self.fetch_payload(r, newest, subject, artifact_type, max_bytes), newest

    def fetch_payload(
        self, ref: Reference, referrer: Referrer, subject: str, artifact_type: str, max_bytes: int
    ) -> bytes:
        ref = _repo(ref)
        resp = self.client.get_manifest(ref, digest=referrer.digest)  # verified by digest
        doc = resp.manifest.raw
        if not isinstance(resp.manifest, mf.ImageManifest):
            raise ManifestError(f"artifact {referrer.digest} is not an image manifest")
        subj = doc.get("subject")
        if not isinstance(subj, dict) or subj.get("digest") != subject:
            raise VerificationError(f"artifact {referrer.digest} does not refer to {subject}")
        kind = doc.get("artifactType") or resp.manifest.config.media_type
        if kind != artifact_type:
            raise ManifestError(f"artifact {referrer.digest} is a {str(kind)[:80]}")
        layers = [d for d in resp.manifest.layers if d.media_type == artifact_type]
        if len(layers) != 1:
            raise ManifestError(
                f"artifact {referrer.digest} has {len(layers)} layers of type {artifact_type}"
            )
        blob = layers[0]
        if blob.size > max_bytes:
            raise ManifestError(
                f"artifact {referrer.digest}: payload of {blob.size} bytes, over {max_bytes}"
            )
        return self.client.get_blob(ref, blob.digest, max_bytes)  # verified by digest

    # --- attaching ---------------------------------------------------------------------------
    def attach(
        self,
        ref: RefLike,
        subject: Mapping[str, Any],
        artifact_type: str,
        payload: bytes,
        annotations: Mapping[str, str] | None = None,
    ) -> AttachResult:
        """Push *payload* as an artifact of *artifact_type* referring to the manifest
        *subject* (a descriptor: ``mediaType``, ``digest``, ``size``) in *ref*'s repository.
        The subject is not modified."""
        r = _repo(ref)
        subj = {k: subject[k] for k in ("mediaType", "digest", "size")}
        payload_digest = sha256_digest(payload)
        self.client.push_blob(r, EMPTY_BLOB, EMPTY_DIGEST)
        self.client.push_blob(r, payload, payload_digest)
        ann = dict(annotations or {})
        manifest = {
            "schemaVersion": 2,
            "mediaType": mf.OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": EMPTY_MEDIA_TYPE,
                "digest": EMPTY_DIGEST,
                "size": len(EMPTY_BLOB),
                "data": base64.b64encode(EMPTY_BLOB).decode(),
            },
            "layers": [
                {"mediaType": artifact_type, "digest": payload_digest, "size": len(payload)}
            ],
            "subject": subj,
        }
        if ann:
            manifest["annotations"] = ann
        body = json.dumps(manifest, separators=(",", ":")).encode()
        digest = sha256_digest(body)
        self.client.put_manifest(_by_digest(r, digest), body, mf.OCI_MANIFEST)
        me = Referrer(digest, len(body), mf.OCI_MANIFEST, artifact_type, ann)
        if self._has_api(r) is not False:
            found, scheme = self.list(r, str(subj["digest"]), artifact_type)
            if scheme == SCHEME_API and any(x.digest == digest for x in found):
                return AttachResult(digest, payload_digest, scheme, None)
        tag = referrers_tag(str(subj["digest"]))
        self._update_tag_index(r, tag, me)
        return AttachResult(digest, payload_digest, SCHEME_TAG, tag)

    def _update_tag_index(self, r: Reference, tag: str, me: Referrer) -> None:
        try:
            resp = self.client.get_manifest(_tagged(r, tag))
            if not isinstance(resp.manifest, mf.ImageIndex):
                raise ManifestError(f"tag {tag} of {r.name} exists and is not an index")
            doc = json.loads(resp.raw)
            kept = [
                d
                for d in doc.get("manifests", [])
                if isinstance(d, dict) and d.get("artifactType") != me.artifact_type
            ]
        except NotFoundError:
            kept = []
        index = {
            "schemaVersion": 2,
            "mediaType": mf.OCI_INDEX,
            "manifests": [*kept, me.descriptor()],
        }
        body = json.dumps(index, separators=(",", ":")).encode()
        self.client.put_manifest(_tagged(r, tag), body, mf.OCI_INDEX)
        log.info("referrers_tag_updated", repository=r.name, tag=tag, entries=len(kept) + 1)


@dataclass(frozen=True)
class AttachResult:
    digest: str
    """The artifact manifest's digest."""
    payload_digest: str
    scheme: str
    """How the artifact is found: :data:`SCHEME_API` or :data:`SCHEME_TAG`."""
    tag: str | None
    """The referrers tag written (tag scheme only)."""


def _of_type(found: list[Referrer], artifact_type: str | None) -> list[Referrer]:
    return [x for x in found if not artifact_type or x.artifact_type == artifact_type]


class ArtifactSource:
    """The daemon's view: the newest artifact payload of one type for a resolved image (see
    :class:`layerstore.runtime.prefetch.ProfileSource`). Missing is None; anything broken
    raises a :class:`~layerstore.errors.LayerStoreError`."""

    def __init__(self, client: RegistryClient, artifact_type: str, max_bytes: int) -> None:
        self.referrers = Referrers(client)
        self.artifact_type = artifact_type
        self.max_bytes = max_bytes

    def find(self, reference: Reference, manifest_digest: str) -> bytes | None:
        got = self.referrers.fetch_newest(
            reference, manifest_digest, self.artifact_type, self.max_bytes
        )
        return None if got is None else got[0]


__all__ = [
    "EMPTY_DIGEST",
    "EMPTY_MEDIA_TYPE",
    "SCHEME_API",
    "SCHEME_TAG",
    "ArtifactSource",
    "AttachResult",
    "Referrer",
    "Referrers",
    "referrers_tag",
]
