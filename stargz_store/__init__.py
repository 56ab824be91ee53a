"""stargz-store: a lazy-pulling additional layer store for Podman and CRI-O.

This package is the daemon and the command line: the subcommands (:mod:`.cli`), the
configuration, logging, the daemon's lifecycle (:mod:`.daemon`), the FUSE adapter
(:mod:`.fusefs`, the one place where errors become errno) and the operator's tools (control
socket, status, metrics).

May import: every product package (``layerstore`` and its subpackages, ``auth``), ``pyfuse3`` and
``trio``; never the test and demo tooling (``testbed``, ``tests``, ``benchmarks``)
(``tests/test_layering.py``).
"""

__version__ = "0.1.0"
