"""Everything about layers: references, manifests, registry client, eStargz, fetching, caching."""
