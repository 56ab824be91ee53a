"""Small building blocks shared by every part of ``layerstore`` (and by ``auth`` and the daemon).

Owns: atomic file writes (:mod:`.atomicfile`), single-flight calls (:mod:`.singleflight`),
expiring negative caches (:mod:`.negcache`), redaction of URLs and secrets for logs
(:mod:`.redact`), RFC 3339 time parsing (:mod:`.timefmt`), per-key shares of shared pools
(:mod:`.bulkhead`) and private Unix sockets with their accept loop (:mod:`.unixsock`: the
control and auth-helper sockets).

Part of the foundation: may import the rest of it (``layerstore.errors``, ``digest``,
``source``) and third-party libraries (``structlog``), nothing else of ``layerstore``, nor
``auth`` or ``stargz_store``, nor ``pyfuse3`` or ``trio``. Nothing here knows about eStargz,
registries or FUSE.
"""
