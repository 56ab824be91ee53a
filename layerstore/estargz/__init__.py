"""The eStargz format, read and written: everything that knows how a blob is laid out.

Owns the footer (:mod:`.footer`), the TOC index (:mod:`.toc`) and its builder and validator
(:mod:`.tocbuild`), opening and verifying a blob (:mod:`.reader`), converting a tar into a blob
(:mod:`.writer`), the tar details the reader and the writer share (:mod:`.tarfmt`) and the
protocol names: TOC and landmark names, footer sizes, annotations, whiteouts
(:mod:`.constants`, the one module other packages such as ``registry`` may import from here).

May import: ``layerstore.errors``, ``layerstore.digest``, ``layerstore.source`` and
``layerstore.common`` only. Nothing here fetches over the network or caches: a blob is a
``RangeSource`` and every byte returned has been checked against its digest.
"""
