"""stargz-store: a lazy-pulling additional layer store for Podman and CRI-O."""

__version__ = "0.1.0"
