"""A package, so that pytest imports this folder's conftest.py as ``kernels.conftest``: a second top-level
``conftest`` module would replace the root one that tests/test_tokenizer.py imports from."""
