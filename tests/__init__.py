"""The test suite (pytest; ``./run test``). Not installed: may import anything, and no product
module imports it (``tests/test_layering.py``)."""
