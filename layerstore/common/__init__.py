"""Small building blocks shared by every part of ``layerstore`` (and by ``auth`` and the daemon).

Owns: atomic file writes (:mod:`.atomicfile`), single-flight calls (:mod:`.singleflight`),
expiring negative caches (:mod:`.negcache`), redaction of URLs and secrets for logs
(:mod:`.redact`), RFC 3339 time parsing (:mod:`.timefmt`) and per-key shares of shared pools
(:mod:`.bulkhead`).

May import: the standard library and ``layerstore.errors`` only. Nothing here knows about
eStargz, registries or FUSE.
"""
