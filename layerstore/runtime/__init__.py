"""Serving eStargz layers lazily: from (image reference, key) to verified file bytes.

Owns:

* :mod:`.cache` - the persistent, verified, LRU chunk cache (and the TOC members) under
  the store root;
* :mod:`.fetcher` - fetching the chunks of one blob: single-flight per chunk, coalescing,
  read-ahead / read-behind / continuation, landmark prefetch, background fill;
* :mod:`.layer` - one resolved layer: TOC index + fetcher + cache, file and ``blob`` reads,
  the ``info`` file, bad/verified state, the adapter's holds;
* :mod:`.blocktags` - keyed per-block tags that check every read from the cache;
* :mod:`.membudget` - the daemon-wide budget of decoded bytes held in memory;
* :mod:`.blobcheck` - the whole-blob check: blob digest, DiffID, TOC member and footer;
* :mod:`.blobspool` - disk budget and unlinked files for the ``blob`` file's verified copies;
* :mod:`.manager` - the layer lifecycle: resolve, build each layer once per identity (the
  requesting manifest's claims and blob source), count users, drop idle layers nobody holds;
* :mod:`.prefetch` - the dependency prefetch policy (the image's entrypoint and the ELF
  loader and libraries it needs);
* :mod:`.elfdeps` - ``PT_INTERP`` / ``DT_NEEDED`` of an ELF head;
* :mod:`.resolutions` - the last good resolution of each reference, kept on disk;
* :mod:`.meter` - fetch totals and latencies per mechanism;
* :mod:`.snapshot` - read-only views of all this for operators (status, metrics).

Everything here is synchronous and thread-safe; threads, locks and their order are described
in ``docs/CONCURRENCY.md``.

May import: the foundation (``layerstore.errors``, ``layerstore.digest``,
``layerstore.source``), ``layerstore.common``, ``layerstore.estargz`` and
``layerstore.registry``. Never ``stargz_store`` (the daemon and its FUSE adapter depend on
this package, not the other way round), nor ``layerstore.image``, nor ``pyfuse3`` or ``trio``.
"""
