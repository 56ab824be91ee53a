"""Everything about registries: image references, manifests and configs, registries.conf, and
the OCI distribution client.

Modules: :mod:`.reference` (image references), :mod:`.manifest` (manifests, indexes, configs),
:mod:`.registries_conf` (containers-registries.conf(5): mirrors, rewrites, blocks),
:mod:`.settings` (the client's settings and their defaults), :mod:`.transport` (HTTP, TLS,
redirects), :mod:`.auth` (challenges, tokens, credentials), :mod:`.client` (the distribution
API) and :mod:`.blobsource` (lazy ranged reads of a blob).

May import: ``layerstore.errors``, ``layerstore.digest``, ``layerstore.source``,
``layerstore.common``, ``layerstore.estargz.constants`` (nothing else of ``estargz``) and the
``auth`` package; never ``layerstore.runtime``, ``layerstore.image`` or ``stargz_store``, nor
``pyfuse3`` or ``trio``.
"""
