"""When the Triton path runs: on CUDA tensors by default; on CPU tensors only when forced under TRITON_INTERPRET=1.
And how the Triton launchers allocate their outputs (:func:`kernel_output`)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence

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
_NAN_FILL = False


@contextlib.contextmanager
def _setting(name: str, value: bool) -> Iterator[None]:
    """The module-level flag ``name`` set to ``value`` within the block."""
    previous = globals()[name]
    globals()[name] = value
    try:
        yield
    finally:
        globals()[name] = previous


def naive_kernels() -> contextlib.AbstractContextManager[None]:
    """Within this block every op takes its naive path unless called with ``force=True`` (benchmarks, debugging)."""
    return _setting("_ENABLED", False)


def nan_filled_outputs() -> contextlib.AbstractContextManager[None]:
    """Within this block :func:`kernel_output` fills what it allocates (the kernel tests: an element that a kernel
    never writes then fails the comparison with the naive twin)."""
    return _setting("_NAN_FILL", True)


def kernel_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)`` for a Triton kernel to write in full; inside :func:`nan_filled_outputs` filled with
    NaN (floating dtypes) or the dtype's minimum (integers: below every row id and index)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _NAN_FILL:
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return out


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
