"""``multi_head_gather`` and ``fp8_gather``: the public ops, Triton on CUDA (on CPU only forced, under
``TRITON_INTERPRET=1``).

The Triton path is three ``torch.library`` custom ops (forward, sparse backward, dense backward) joined by
``register_autograd``, so ``torch.compile`` treats each as one opaque node instead of breaking the graph.
The sparse backward op returns the unique rows and their summed gradients as two dense tensors; the
autograd formula wraps them into a coalesced ``torch.sparse_coo`` gradient outside any op. ``fp8_gather``
reads frozen uint8 tables: one forward op, no autograd.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from engram.kernels.dispatch import use_triton
from engram.kernels.fp8 import FP8_SCALE_BLOCK, row_dim
from engram.kernels.gather.naive import fp8_gather_naive, multi_head_gather_naive


def _kernels() -> ModuleType:
    # Imported on first use: triton is optional, and @triton.jit reads TRITON_INTERPRET when it decorates.
    from engram.kernels.gather import triton_gather

    return triton_gather


def _fp8_kernels() -> ModuleType:
    from engram.kernels.gather import triton_fp8_gather

    return triton_fp8_gather


@torch.library.custom_op("engram::multi_head_gather", mutates_args=())
def _gather(weight: Tensor, flat_rows: Tensor, sparse_grad: bool, deterministic: bool) -> Tensor:
    return _kernels().gather_fwd(weight, flat_rows)


@_gather.register_fake
def _(weight: Tensor, flat_rows: Tensor, sparse_grad: bool, deterministic: bool) -> Tensor:
    return weight.new_empty(*flat_rows.shape[:-1], flat_rows.shape[-1] * weight.shape[1])


@torch.library.custom_op("engram::multi_head_gather_bwd_sparse", mutates_args=())
def _gather_bwd_sparse(grad: Tensor, flat_rows: Tensor, num_rows: int, deterministic: bool) -> tuple[Tensor, Tensor]:
    return _kernels().gather_bwd_sparse(grad, flat_rows, deterministic, num_rows)


@_gather_bwd_sparse.register_fake
def _(grad: Tensor, flat_rows: Tensor, num_rows: int, deterministic: bool) -> tuple[Tensor, Tensor]:
    num_unique = torch.library.get_ctx().new_dynamic_size()
    dim = grad.shape[-1] // flat_rows.shape[-1]
    return flat_rows.new_empty(num_unique), grad.new_empty(num_unique, dim)


@torch.library.custom_op("engram::multi_head_gather_bwd_dense", mutates_args=())
def _gather_bwd_dense(grad: Tensor, flat_rows: Tensor, num_rows: int, deterministic: bool) -> Tensor:
    return _kernels().gather_bwd_dense(grad, flat_rows, num_rows, deterministic)


@_gather_bwd_dense.register_fake
def _(grad: Tensor, flat_rows: Tensor, num_rows: int, deterministic: bool) -> Tensor:
    return grad.new_empty(num_rows, grad.shape[-1] // flat_rows.shape[-1])


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    weight, flat_rows, sparse_grad, deterministic = inputs
    ctx.save_for_backward(flat_rows)
    ctx.table_shape = weight.shape
    ctx.sparse_grad = sparse_grad
    ctx.deterministic = deterministic


def _backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
    (flat_rows,) = ctx.saved_tensors
    if ctx.sparse_grad:
        rows, values = _gather_bwd_sparse(grad, flat_rows, ctx.table_shape[0], ctx.deterministic)
        grad_weight = torch.sparse_coo_tensor(rows[None], values, ctx.table_shape, is_coalesced=True,
                                              check_invariants=False)
    else:
        grad_weight = _gather_bwd_dense(grad, flat_rows, ctx.table_shape[0], ctx.deterministic)
    return grad_weight, None, None, None


_gather.register_autograd(_backward, setup_context=_setup_context)


def multi_head_gather(weight: Tensor, flat_rows: Tensor, sparse_grad: bool = True, force: bool | None = None,
                      deterministic: bool = True) -> Tensor:
    """Concatenate, for every token, the table rows of its ``H`` heads (see :func:`multi_head_gather_naive`).

    Args:
        weight: ``[R, D]`` flat table (fp32 or bf16; any D).
        flat_rows: ``[..., H]`` int rows of the flat table, head offsets already added. They must lie in
            ``[0, R)``: the Triton path does not check (the naive path raises).
        sparse_grad: the gradient of ``weight`` is a coalesced ``torch.sparse_coo`` tensor holding exactly the
            rows read (unique, ascending) instead of a dense ``[R, D]`` tensor.
        force: ``True`` insists on Triton, ``False`` takes the naive path, ``None`` decides (:func:`use_triton`).
        deterministic: the Triton backward sums each row's gradients in a fixed order (sort, then each
            row's segment in sorted order), bitwise reproducible for a given D and device. ``False`` adds them with fp32
            atomics instead: faster, but the rounding varies from run to run (and a dense gradient goes
            through an fp32 ``[R, D]`` buffer). Both accumulate in fp32 and round once to ``weight``'s dtype.

    Returns:
        ``[..., H * D]`` in ``weight``'s dtype; head ``h`` fills ``[h * D, (h + 1) * D)``.
    """
    if not use_triton(weight, force):
        return multi_head_gather_naive(weight, flat_rows, sparse_grad)
    return _gather(weight, flat_rows.long(), sparse_grad, deterministic)


@torch.library.custom_op("engram::fp8_gather", mutates_args=())
def _fp8_gather(table: Tensor, flat_rows: Tensor) -> Tensor:
    return _fp8_kernels().fp8_gather_fwd(table, flat_rows)


@_fp8_gather.register_fake
def _(table: Tensor, flat_rows: Tensor) -> Tensor:
    dim = table.shape[1] * FP8_SCALE_BLOCK // (FP8_SCALE_BLOCK + 1)  # row_dim, without its checks on SymInts
    return table.new_empty(*flat_rows.shape[:-1], flat_rows.shape[-1] * dim, dtype=torch.float32)


def fp8_gather(table: Tensor, flat_rows: Tensor, force: bool | None = None) -> Tensor:
    """Gather packed FP8 rows and dequantise them in one pass (see :func:`fp8_gather_naive`).

    Args:
        table: uint8 ``[R, D + D / 32]`` packed FP8 rows (:mod:`engram.kernels.fp8`: ``D`` E4M3 bytes, then one UE8M0
            scale byte per 32 values; 264 bytes for ``D = 256``), e.g. a DeepSeek-V4.1 Engram table.
        flat_rows: ``[..., H]`` int rows of the flat table, head offsets already added. They must lie in
            ``[0, R)``: the Triton path does not check (the naive path raises ``IndexError``).
        force: ``True`` insists on Triton, ``False`` takes the naive path, ``None`` decides (:func:`use_triton`).

    Returns:
        ``[..., H * D]`` fp32, bit-identical to ``dequantize_rows(table[flat_rows]).flatten(-2)`` (NaN where an
        E4M3 byte is 0x7F/0xFF; +-inf, or NaN for an E4M3 zero, where a scale byte is 255); head ``h`` fills
        ``[h * D, (h + 1) * D)``.

    Example:
        >>> from engram.kernels.fp8 import quantize_rows
        >>> table = quantize_rows(torch.randn(10, 64))        # [10, 66] uint8
        >>> fp8_gather(table, torch.tensor([[[1, 7]]])).shape  # [B, T, H] -> [B, T, H * D]
        torch.Size([1, 1, 128])
    """
    if table.dtype != torch.uint8 or table.dim() != 2:
        raise TypeError(f"fp8_gather reads a uint8 [R, D + D/32] table of packed FP8 rows, got {table.dtype} "
                        f"of shape {tuple(table.shape)}")
    row_dim(table.shape[1])  # a clear error for a width that is no packed row's
    if flat_rows.dtype.is_floating_point or flat_rows.dtype.is_complex or flat_rows.dtype == torch.bool:
        raise TypeError(f"flat_rows must hold integer row ids, got {flat_rows.dtype}")
    if not use_triton(table, force):
        return fp8_gather_naive(table, flat_rows)
    return _fp8_gather(table, flat_rows.long())
