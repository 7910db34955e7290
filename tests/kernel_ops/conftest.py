"""Kernel tests run the Triton paths for real on a CUDA GPU when there is one, else on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``, read by ``@triton.jit`` when it decorates: triton's own helpers
at ``import triton``, the kernels when ``op.py`` first imports them). The root ``tests/conftest.py`` makes the
same decision first, so a whole-suite run sets the variable before anything imports triton; this copy keeps
``tests/kernel_ops`` self-contained.

Every output a Triton launcher allocates starts as NaN (integers: the dtype's minimum), as flash-linear-attention's
tests do, so an element a kernel never writes fails the comparison with the naive twin."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engram.kernels.dispatch import nan_filled_outputs  # noqa: E402


@pytest.fixture(autouse=True)
def nan_filled_kernel_outputs() -> Iterator[None]:
    with nan_filled_outputs():
        yield


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton-path tests put their tensors: the GPU if present, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile_for_h200(script: str) -> None:
    """Run ``script`` (which lowers kernels to sm_90 cubins with ``triton.compile``) in a fresh process without
    the interpreter: under ``TRITON_INTERPRET=1`` ``@triton.jit`` skips the compiler in this process. Needs no
    GPU, only the ptxas that ships with triton."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    assert ptxas.exists(), f"triton {triton.__version__} should ship ptxas at {ptxas}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
