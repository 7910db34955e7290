"""Kernel tests run the Triton paths for real on a CUDA GPU when there is one, else on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``, read by ``@triton.jit`` when it decorates: triton's own helpers
at ``import triton``, the kernels when ``op.py`` first imports them). The root ``tests/conftest.py`` makes the
same decision first, so a whole-suite run sets the variable before anything imports triton; this copy keeps
``tests/kernels`` self-contained."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton-path tests put their tensors: the GPU if present, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
