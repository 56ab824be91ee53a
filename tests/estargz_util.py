"""Hand-build small eStargz blobs with full control of the TOC (for adversarial tests).

Independent of ``layerstore.estargz.writer`` on purpose: these blobs may be wrong in exactly the
way a
test needs. Layout: for each file a gzip member with its tar header, then one member per chunk
of payload (the last one also holds the tar padding); then the TOC member (tar header, JSON,
padding, end-of-archive blocks) and the footer.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from layerstore.estargz.footer import build_footer, build_legacy_footer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def tar_header(name: str, size: int, *, fmt: int = tarfile.USTAR_FORMAT, **kw: Any) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = kw.pop("mtime", 1600000000)
    ti.mode = kw.pop("mode", 0o644)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti.tobuf(format=fmt, encoding="utf-8", errors="surrogateescape")


def toc_member(
    toc_json: bytes, *, name: str = "stargz.index.json", fmt: int = tarfile.USTAR_FORMAT
) -> bytes:
    pad = (-len(toc_json)) % 512
    return gz(tar_header(name, len(toc_json), fmt=fmt) + toc_json + b"\0" * pad + b"\0" * 1024)


@dataclass
class Built:
    blob: bytes
    toc_json: bytes
    toc_offset: int
    toc_digest: str
    files: dict[str, bytes]


def build_blob(
    files: list[tuple[str, bytes]],
    *,
    chunk_size: int = 0,
    edit_toc: Callable[[dict[str, Any]], Any] | None = None,
    raw_toc: bytes | None = None,
    legacy: bool = False,
    toc_member_bytes: bytes | None = None,
) -> Built:
    """Regular files *files* (name, content) in a blob; *edit_toc* may mutate the TOC dict."""
    out = io.BytesIO()
    entries: list[dict[str, Any]] = []
    for name, data in files:
        out.write(gz(tar_header(name, len(data))))
        e: dict[str, Any] = {
            "name": name,
            "type": "reg",
            "size": len(data),
            "modtime": "2020-09-13T12:26:40Z",
            "mode": 0o644,
            "digest": sha(data),
        }
        entries.append(e)
        if not data:
            continue
        step = chunk_size or len(data)
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        pad = b"\0" * ((-len(data)) % 512)
        for i, piece in enumerate(pieces):
            off = out.tell()
            out.write(gz(piece + (pad if i == len(pieces) - 1 else b"")))
            if i == 0:
                e.update(offset=off, chunkDigest=sha(piece))
                if len(pieces) > 1:
                    e["chunkSize"] = len(piece)
            else:
                c: dict[str, Any] = {
                    "name": name,
                    "type": "chunk",
                    "offset": off,
                    "chunkOffset": i * step,
                    "chunkDigest": sha(piece),
                }
                if i < len(pieces) - 1:
                    c["chunkSize"] = len(piece)
                entries.append(c)
    toc: dict[str, Any] = {"version": 1, "entries": entries}
    if edit_toc is not None:
        replaced = edit_toc(toc)
        if replaced is not None:
            toc = replaced
    toc_json = raw_toc if raw_toc is not None else json.dumps(toc).encode()
    toc_offset = out.tell()
    out.write(toc_member_bytes if toc_member_bytes is not None else toc_member(toc_json))
    out.write(build_legacy_footer(toc_offset) if legacy else build_footer(toc_offset))
    return Built(out.getvalue(), toc_json, toc_offset, sha(toc_json), dict(files))
