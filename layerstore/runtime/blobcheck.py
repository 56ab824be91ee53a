"""Whole-blob verification: the blob digest and the DiffID of a layer, from its bytes in order.

Why: chunk digests cover only the file payloads the TOC names. The rest of an eStargz blob
(gzip headers, tar headers and padding, the members before the first payload) is checked by
nothing until the whole blob is hashed, and the DiffID (sha256 of the decompressed tar, which
containers/storage records for the layer) by nothing until the whole blob is inflated. Both are
claims of the image's manifest and config; :class:`BlobVerifier` checks them once every
compressed byte has been seen, in order, in bounded memory:

* ``feed(offset, data)`` takes the blob's bytes in order (a piece may overlap what was fed
  before; a gap makes the check incomplete, never wrong);
* the compressed bytes go into a sha256, and through a multi-member gzip decoder whose output
  (at most ``INFLATE_STEP`` bytes at a time, whatever the compression ratio) goes into a second
  sha256 and a byte count;
* with ``toc=TOCClaim(...)``, the compressed bytes of the TOC member are hashed too and the
  footer is parsed: the blob must hold, at the offset the layer used, exactly the TOC member the
  layer's index was built from (it may have come from the TOC cache, stored when another
  registry served a blob under the same digest). So a verified layer's TOC digest, blob digest
  and DiffID are known to belong together;
* ``finish()`` returns a :class:`BlobVerdict`: complete or not, and if complete which claims
  failed. A blob that does not decode as concatenated gzip members (bad header, CRC or length,
  garbage after the last member, a truncated member) fails the DiffID, as it would in
  containers/storage.

Users: the background fill (``ChunkFetcher.start_background_fill(tap=...)``), which fetches the
blob in order anyway, and the ``blob`` file's spool (:mod:`layerstore.runtime.layer`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from layerstore.errors import LayerStoreError
from layerstore.estargz.footer import parse_footer
from layerstore.estargz.inflate import ERRORS as INFLATE_ERRORS
from layerstore.estargz.inflate import gunzip_object

INFLATE_STEP = 1024 * 1024
"""Decompressed bytes produced per inflate call: bounds memory for highly compressible data."""


@dataclass(frozen=True)
class TOCClaim:
    """Where the layer's index came from: the TOC member ``[toc_offset, size - footer_size)``
    whose compressed bytes have sha256 ``member_digest``."""

    toc_offset: int
    footer_size: int
    member_digest: str


@dataclass(frozen=True)
class BlobVerdict:
    complete: bool
    """Every byte of the blob was fed, in order."""
    digest: str = ""
    """sha256 of the compressed blob (when complete)."""
    diff_id: str = ""
    """sha256 of the decompressed stream ("" when it does not decode)."""
    uncompressed_size: int = -1
    errors: tuple[str, ...] = ()
    """What did not match (empty: the blob is what the manifest and the config claim)."""

    @property
    def ok(self) -> bool:
        return self.complete and not self.errors


class BlobVerifier:
    """Not thread-safe: one feeder at a time (the fill thread, or the spool's fetch)."""

    def __init__(
        self,
        expected_digest: str,
        expected_diff_id: str,
        size: int,
        toc: TOCClaim | None = None,
    ) -> None:
        self.expected_digest = expected_digest
        self.expected_diff_id = expected_diff_id
        self.size = size
        self.toc = toc
        self._toc_hash = hashlib.sha256()
        self._tail = bytearray()
        self.pos = 0
        self._gap = False
        self._hash = hashlib.sha256()
        self._diff = hashlib.sha256()
        self._inflated = 0
        self._member = gunzip_object()
        self._member_started = False
        self._decode_error = ""

    @property
    def broken(self) -> bool:
        """A gap was seen: the check cannot complete."""
        return self._gap

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        """The blob's bytes at *offset*; the part before ``pos`` is skipped."""
        if self._gap:
            return
        if offset > self.pos:
            self._gap = True
            return
        view = memoryview(data)[self.pos - offset :]
        view = view[: max(0, self.size - self.pos)]
        if not len(view):
            return
        self._hash.update(view)
        start = self.pos
        self.pos += len(view)
        toc = self.toc
        if toc is not None:
            self._region(view, start, toc.toc_offset, self.size - toc.footer_size, self._toc_hash)
            tail_start = self.size - toc.footer_size
            if self.pos > tail_start:
                self._tail += view[max(0, tail_start - start) :]
        if not self._decode_error:
            try:
                self._inflate(view)
            except INFLATE_ERRORS as e:
                self._decode_error = f"the blob does not decode as gzip: {e}"

    @staticmethod
    def _region(view: memoryview, start: int, lo: int, hi: int, h: hashlib._Hash) -> None:
        a, b = max(lo, start), min(hi, start + len(view))
        if a < b:
            h.update(view[a - start : b - start])

    def _inflate(self, data: bytes | memoryview) -> None:
        pending: bytes | memoryview = data
        while pending:
            d = self._member
            self._member_started = True
            out = d.decompress(pending, INFLATE_STEP)
            if out:
                self._diff.update(out)
                self._inflated += len(out)
            if d.eof:
                pending = d.unused_data
                self._member = gunzip_object()
                self._member_started = False
            else:
                pending = d.unconsumed_tail

    def finish(self) -> BlobVerdict:
        if self._gap or self.pos != self.size:
            return BlobVerdict(complete=False)
        digest = "sha256:" + self._hash.hexdigest()
        errors: list[str] = []
        if digest != self.expected_digest:
            errors.append(f"blob digest is {digest}, the manifest says {self.expected_digest}")
        decode_error = self._decode_error
        if not decode_error and self._member_started:
            decode_error = "the blob ends inside a gzip member"
        diff_id = ""
        toc = self.toc
        if toc is not None:
            member = "sha256:" + self._toc_hash.hexdigest()
            if member != toc.member_digest:
                errors.append("the blob's TOC member is not the one the layer was built from")
            try:
                footer = parse_footer(bytes(self._tail))
            except LayerStoreError as e:
                errors.append(f"the blob's footer does not parse: {e}")
            else:
                if footer != (toc.toc_offset, toc.footer_size):
                    errors.append(
                        f"the blob's footer points at {footer[0]}, the layer used {toc.toc_offset}"
                    )
        if decode_error:
            errors.append(decode_error)
        else:
            diff_id = "sha256:" + self._diff.hexdigest()
            if diff_id != self.expected_diff_id:
                errors.append(f"DiffID is {diff_id}, the image config says {self.expected_diff_id}")
        return BlobVerdict(
            complete=True,
            digest=digest,
            diff_id=diff_id,
            uncompressed_size=self._inflated if not decode_error else -1,
            errors=tuple(errors),
        )
