"""A package, so that pytest imports this folder's conftest.py as ``serve.conftest`` (a second top-level
``conftest`` would replace the root one) and ``memory.fact`` (tests/memory) is importable from here."""
