"""OCI referrers (``layerstore.registry.referrers``): attaching and finding artifacts through
the referrers tag scheme on a real docker-registry 2.8 (which has no referrers API), and the
referrers API branch against a small in-process server (no registry on this machine has it)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from layerstore.digest import sha256_digest
from layerstore.errors import ManifestError, VerificationError
from layerstore.registry.client import RegistryClient, RegistrySettings
from layerstore.registry.reference import parse_reference
from layerstore.registry.referrers import (
    CREATED_ANNOTATION,
    EMPTY_DIGEST,
    SCHEME_API,
    SCHEME_TAG,
    ArtifactSource,
    Referrer,
    Referrers,
    referrers_tag,
)
from tests.faultserver import QuietHTTPHandler
from tests.registry_fixtures import (  # noqa: F401 - fixtures
    RegistryHandle,
    gzip_tar,
    registry,
)

KIND = "application/vnd.example.test.v1+json"
OTHER = "application/vnd.example.signature.v1+json"


def _client(host: str) -> RegistryClient:
    return RegistryClient(settings=RegistrySettings(insecure_registries=frozenset({host})))


def _subject(registry: RegistryHandle, repo: str) -> dict[str, Any]:  # noqa: F811
    img = registry.push_image(repo, "v1", [gzip_tar({"a": b"a"})])
    return {"mediaType": img.media_type, "digest": img.manifest_digest, "size": len(img.manifest)}


def test_referrers_tag() -> None:
    assert referrers_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32
    with pytest.raises(ValueError):
        referrers_tag("latest")


def test_attach_and_find_through_the_tag_scheme(registry: RegistryHandle) -> None:  # noqa: F811
    repo = "ref/tag-scheme"
    subject = _subject(registry, repo)
    ref = f"{registry.host}/{repo}:v1"
    with _client(registry.host) as client:
        r = Referrers(client)
        assert client.get_referrers(ref, subject["digest"]) is None  # distribution 2.8: no API
        assert r.list(ref, subject["digest"], KIND) == ([], SCHEME_TAG)
        assert r.fetch_newest(ref, subject["digest"], KIND, 1000) is None
        first = r.attach(
            ref, subject, KIND, b'{"n": 1}', {CREATED_ANNOTATION: "2024-01-01T00:00:00Z"}
        )
        sig = r.attach(ref, subject, OTHER, b"sig", {CREATED_ANNOTATION: "2024-01-02T00:00:00Z"})
        second = r.attach(
            ref, subject, KIND, b'{"n": 2}', {CREATED_ANNOTATION: "2024-01-03T00:00:00Z"}
        )
        assert first.scheme == second.scheme == SCHEME_TAG
        assert second.tag == referrers_tag(subject["digest"])
        # the tag index keeps other kinds and holds the latest of ours
        found, scheme = r.list(ref, subject["digest"])
        assert scheme == SCHEME_TAG
        assert sorted((x.artifact_type, x.digest) for x in found) == sorted(
            [(OTHER, sig.digest), (KIND, second.digest)]
        )
        payload, which = r.fetch_newest(ref, subject["digest"], KIND, 1000) or (b"", None)
        assert payload == b'{"n": 2}' and which is not None and which.digest == second.digest
        assert which.created == "2024-01-03T00:00:00Z"
        # the artifact itself: an OCI 1.1 image manifest with the empty config and a subject
        art = client.get_manifest(f"{registry.host}/{repo}@{second.digest}")
        doc = json.loads(art.raw)
        assert doc["artifactType"] == KIND and doc["subject"] == subject
        assert doc["config"]["digest"] == EMPTY_DIGEST
        assert doc["layers"] == [
            {"mediaType": KIND, "digest": sha256_digest(b'{"n": 2}'), "size": 8}
        ]
        # the subject is untouched
        assert client.get_manifest(ref).digest == subject["digest"]
        # the daemon's view of it
        source = ArtifactSource(client, KIND, 1000)
        assert source.find(parse_reference(ref), subject["digest"]) == b'{"n": 2}'
        assert (
            ArtifactSource(client, "application/x-none", 10).find(
                parse_reference(ref), subject["digest"]
            )
            is None
        )


def test_fetch_refuses_wrong_subject_wrong_kind_and_oversized_payloads(
    registry: RegistryHandle,  # noqa: F811
) -> None:
    repo = "ref/refuse"
    subject = _subject(registry, repo)
    other = registry.push_image(repo, "v2", [gzip_tar({"b": b"b"})])
    ref = parse_reference(f"{registry.host}/{repo}")
    with _client(registry.host) as client:
        r = Referrers(client)
        res = r.attach(ref, subject, KIND, b"x" * 100)
        me = Referrer(res.digest, 0, "application/vnd.oci.image.manifest.v1+json", KIND)
        with pytest.raises(VerificationError, match="does not refer"):
            r.fetch_payload(ref, me, other.manifest_digest, KIND, 1000)
        with pytest.raises(ManifestError, match="is a "):
            r.fetch_payload(ref, me, subject["digest"], OTHER, 1000)
        with pytest.raises(ManifestError, match="over 99"):
            r.fetch_newest(ref, subject["digest"], KIND, 99)
        assert r.fetch_newest(ref, subject["digest"], KIND, 100) is not None


class _APIHandler(QuietHTTPHandler):
    """A registry front with the referrers API: answers ``referrers/<digest>`` with a fixed
    index and counts the calls; everything else is 404."""

    index: bytes = b""
    calls: list[str] = []

    def do_GET(self) -> None:
        self.calls.append(self.path)
        if "/referrers/" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
            self.send_header("Content-Length", str(len(self.index)))
            self.end_headers()
            self.wfile.write(self.index)
            return
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def api_server() -> Iterator[tuple[str, type[_APIHandler]]]:
    handler = type("H", (_APIHandler,), {"calls": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_the_referrers_api_is_used_where_the_registry_has_it(
    api_server: tuple[str, type[_APIHandler]],
) -> None:
    host, handler = api_server
    subject = "sha256:" + "1" * 64
    mine, theirs = "sha256:" + "2" * 64, "sha256:" + "3" * 64
    handler.index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mine,
                 "size": 10, "artifactType": KIND},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": theirs,
                 "size": 10, "artifactType": OTHER},
                {"digest": "not-a-digest", "size": 1},
            ],
        }
    ).encode()  # fmt: skip
    with _client(host) as client:
        r = Referrers(client)
        found, scheme = r.list(f"{host}/a/b:v1", subject, KIND)
        assert scheme == SCHEME_API and [x.digest for x in found] == [mine]
        api_call = f"/v2/a/b/referrers/{subject}?artifactType=" + KIND.replace("/", "%2F").replace(
            "+", "%2B"
        )
        assert api_call in handler.calls
        # the first lookup asks both at once and does not wait for the tag request it no longer
        # needs: let it land before counting, or it would be counted against the second lookup
        deadline = time.monotonic() + 5
        while not any("/manifests/" in c for c in handler.calls):
            assert time.monotonic() < deadline, handler.calls
            time.sleep(0.01)
        # no tag lookups once the host is known to answer
        handler.calls.clear()
        found, scheme = r.list(f"{host}/a/b:v1", subject, KIND)
        assert scheme == SCHEME_API and [x.digest for x in found] == [mine]
        assert handler.calls and not any("/manifests/" in c for c in handler.calls)


class _NoAPIHandler(QuietHTTPHandler):
    """A registry without the referrers API (404 to the route) whose tag index is absent; the
    404 to ``referrers/`` is held until the tag request has arrived (at most 5 s), and whether
    it had is recorded."""

    tag_asked = threading.Event()
    overlapped: list[bool] = []
    calls: list[str] = []

    def do_GET(self) -> None:
        self.calls.append(self.path)
        if "/referrers/" in self.path:
            self.overlapped.append(self.tag_asked.wait(5))
        elif "/manifests/sha256-" in self.path:
            self.tag_asked.set()
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_host_not_known_yet_is_asked_both_ways_at_once() -> None:
    """On a registry without the referrers API, the first lookup costs one round trip: the
    tag index is asked for while the API's 404 is on its way; later lookups go straight to
    the tag."""
    handler = type(
        "H", (_NoAPIHandler,), {"tag_asked": threading.Event(), "overlapped": [], "calls": []}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    subject = "sha256:" + "4" * 64
    try:
        with _client(host) as client:
            r = Referrers(client)
            assert r.list(f"{host}/a/b:v1", subject, KIND) == ([], SCHEME_TAG)
            assert handler.overlapped == [True]
            handler.calls.clear()
            assert r.list(f"{host}/a/b:v1", subject, KIND) == ([], SCHEME_TAG)
            assert [c for c in handler.calls if "/referrers/" in c] == []
            assert any("/manifests/sha256-" in c for c in handler.calls)
    finally:
        server.shutdown()
        server.server_close()
