from __future__ import annotations

import pytest

from layerstore.errors import ImageReferenceError
from layerstore.registry.reference import (
    Reference,
    in_repository,
    parse_reference,
    split_location,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("user/app:v1", "docker.io", "user/app", "v1", None),
        ("quay.io/org/app", "quay.io", "org/app", "latest", None),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000", "a/b/c", "t", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app", "localhost:5000", "app", "latest", None),
        (f"ghcr.io/o/app@{D}", "ghcr.io", "o/app", None, D),
        (f"ghcr.io/o/app:v2@{D}", "ghcr.io", "o/app", "v2", D),
        ("docker://quay.io/x/y:z", "quay.io", "x/y", "z", None),
        ("reg.example.com/a__b/c-d/e.f", "reg.example.com", "a__b/c-d/e.f", "latest", None),
        ("[::1]:5000/app:1", "[::1]:5000", "app", "1", None),
    ],
)
def test_parse(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert ref.name == f"{domain}/{path}"
    # round trip through str
    assert parse_reference(str(ref)) == ref


def test_str_and_helpers() -> None:
    ref = parse_reference("busybox")
    assert str(ref) == "docker.io/library/busybox:latest"
    assert ref.api_host == "registry-1.docker.io"
    assert parse_reference("quay.io/a/b").api_host == "quay.io"
    assert ref.manifest_ref() == "latest"
    pinned = ref.with_digest(D)
    assert str(pinned) == f"docker.io/library/busybox:latest@{D}"
    assert pinned.manifest_ref() == D
    assert isinstance(pinned, Reference)
    assert parse_reference("busybox", default_tag=None).tag is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("quay.io/Org/app", "lowercase"),
        ("quay.io/", "no repository"),
        ("app:", "invalid tag"),
        ("app:-bad", "invalid tag"),
        ("app@sha256:1234", "invalid digest"),
        ("app@md5:" + "0" * 32, "invalid digest"),
        ("a//b", "invalid repository path component"),
        ("a/b_/c", "invalid repository path component"),
        ("a b", "whitespace"),
        ("-host.com/app", "invalid registry host"),
        ("quay.io/" + "a" * 300, "longer than"),
    ],
)
def test_invalid(text: str, fragment: str) -> None:
    with pytest.raises(ImageReferenceError) as info:
        parse_reference(text)
    assert fragment in str(info.value)


def test_split_location() -> None:
    assert split_location("mirror.local:5000/library/busybox") == (
        "mirror.local:5000",
        "library/busybox",
    )
    assert split_location("busybox") == ("docker.io", "library/busybox")
    with pytest.raises(ImageReferenceError):
        split_location("")


def test_in_repository() -> None:
    assert in_repository("127.0.0.1:5000/a/b:v1", "127.0.0.1:5000", "a/b")
    assert in_repository(f"127.0.0.1:5000/a/b@{D}", "127.0.0.1:5000", "/a/b/")
    assert in_repository("Registry.Example/app:1", "registry.example", "app")
    assert in_repository("busybox", "docker.io", "library/busybox")
    assert in_repository("docker.io/library/busybox:1", "registry-1.docker.io", "library/busybox")
    assert not in_repository("127.0.0.1:5000/a/b:v1", "127.0.0.1:5000", "a")
    assert not in_repository("127.0.0.1:5000/a/b:v1", "127.0.0.1:5001", "a/b")
    assert not in_repository("127.0.0.1:5000/a/bc:v1", "127.0.0.1:5000", "a/b")
    assert not in_repository("not a ref", "127.0.0.1:5000", "a/b")
    assert not in_repository("127.0.0.1:5000/a/b", "", "")
