"""Everything about layers, as synchronous, thread-safe libraries that know nothing of FUSE or
trio: the eStargz format, the registry client, the runtime that serves layers, image conversion.

Subpackages and modules, lowest first:

``errors``, ``digest``, ``source``, ``common``
    The foundation: the exception tree, the one digest grammar, the ``RangeSource`` protocol and
    small shared helpers (atomic writes, single-flight, negative caches, per-key shares of
    pools, redaction, RFC 3339, private Unix sockets).
``estargz``
    The format: footer, TOC index and its builder, reader/verifier, writer, tar helpers and the
    protocol names (``estargz.constants``).
``registry``
    References, manifests, registries.conf and the OCI distribution client.
``image``
    Image conversion and OCI image layouts.
``runtime``
    The chunk cache, the fetcher, a resolved layer and the layer manager the daemon serves.

Import rules (``tests/test_layering.py`` enforces them on every import, including those inside
functions and ``if TYPE_CHECKING:`` blocks; ``docs/ARCHITECTURE.md`` has the table):

* the foundation imports nothing above it (no other subpackage, no ``auth``);
* ``estargz`` imports the foundation only;
* ``registry`` imports the foundation, ``auth`` and, of ``estargz``, only ``estargz.constants``;
* ``image`` and ``runtime`` import the foundation, ``estargz`` and ``registry`` (not each other);
* ``auth`` imports the foundation only; ``stargz_store`` (the daemon) may import all of these;
* nothing here or in ``auth`` imports ``pyfuse3`` or ``trio``, and no installed package imports
  the test and demo tooling (``testbed``, ``tests``, ``benchmarks``).
"""
