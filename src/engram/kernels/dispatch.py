"""When the Triton path runs: on CUDA tensors by default; on CPU tensors only when forced under TRITON_INTERPRET=1."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_mode() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_ENABLED = True


@contextlib.contextmanager
def naive_kernels() -> Iterator[None]:
    """Within this block every op takes its naive path unless called with ``force=True`` (benchmarks, debugging)."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = previous


def use_triton(tensor: torch.Tensor, force: bool | None = None) -> bool:
    """Whether an op on ``tensor`` takes its Triton path.

    ``force=None`` decides: Triton on CUDA tensors, the naive path elsewhere. ``force=True`` insists (on a
    CPU tensor that needs ``TRITON_INTERPRET=1``; an error if impossible); ``False`` always takes the naive path.
    """
    if force is None:
        return _ENABLED and tensor.is_cuda and triton_available()
    if force is False:
        return False
    possible = triton_available() and (tensor.is_cuda or interpret_mode())
    if not possible:
        raise RuntimeError(f"the Triton path needs Triton and a CUDA tensor (or TRITON_INTERPRET=1); got a "
                           f"{tensor.device.type} tensor, triton {'present' if triton_available() else 'missing'}")
    return possible
