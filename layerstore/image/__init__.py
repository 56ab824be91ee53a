"""Image conversion and OCI image layouts: what ``stargz-store convert`` does.

Owns converting an image (manifest list, manifests, configs, layers) to eStargz between a
registry and OCI layout directories (:mod:`.convert`) and reading and writing those layouts
(:mod:`.ocilayout`, ``oci:DIR[:TAG]``).

May import: the foundation (``layerstore.errors``, ``digest``, ``source``, ``common``),
``layerstore.estargz`` (the writer) and ``layerstore.registry`` (manifests, the client); not
``layerstore.runtime``, which serves layers and has no part in conversion.
"""
