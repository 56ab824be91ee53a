"""Benchmarks for stargz-store (see benchmarks/README.md)."""
