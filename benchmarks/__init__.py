"""Benchmarks for stargz-store (see benchmarks/README.md).

Not installed: may import the product packages and ``testbed``; no product module imports it
(``tests/test_layering.py``).
"""
