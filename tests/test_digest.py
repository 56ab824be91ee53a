from __future__ import annotations

import pytest

from layerstore import digest
from layerstore.errors import DigestError


def test_sha256_digest_round_trip() -> None:
    d = digest.sha256_digest(b"abc")
    assert d == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert digest.validate(d) == d
    assert digest.hex_part(d) == d[7:]


@pytest.mark.parametrize(
    "bad",
    ["", "sha256:", "sha256:XYZ", "md5:" + "0" * 32, "sha256:" + "A" * 64, "sha256:" + "0" * 63],
)
def test_invalid_digests_rejected(bad: str) -> None:
    assert not digest.is_valid(bad)
    with pytest.raises(DigestError):
        digest.validate(bad)
