"""FP8 E4M3 values with UE8M0 power-of-two scales: DeepSeek-V4.1's table rows and projection weights.

A scale byte ``e`` (UE8M0: an unsigned exponent, no mantissa) stands for ``2^(e - 127)``. A value is
``float(fp8_e4m3) * 2^(e - 127)``. The two ends follow the serving engines: byte 255 is +inf, as vLLM and SGLang
decode it (the OCP spec, and torch's ``float8_e8m0fnu``, call it NaN); byte 0 is 2^-127 (an fp32 subnormal), as
SGLang decodes it, where vLLM gives 0.0 (the two agree on every other byte). Two layouts use it:

- **Table rows**: each row of ``D`` values carries one scale per :data:`FP8_SCALE_BLOCK` (32) consecutive values.
  Here a row is *packed* into ``D + D / 32`` bytes — the ``D`` E4M3 bytes, then the ``D / 32`` scale bytes (264 B
  for ``D = 256``) — so every table store (device, host, disk, cache) moves FP8 rows as plain ``uint8`` rows and
  the consumer dequantises what it fetched (:func:`dequantize_rows`; on the GPU the gather kernel does both).
- **Matrices** (``wkv``): one scale per 32 x 32 block of a ``[O, I]`` weight, a ``[O / 32, I / 32]`` scale grid
  (:func:`dequantize_blocks`).

:func:`quantize_rows` makes packed rows from float rows (for tests and ``table_format="fp8"`` of this package's own
models): per block the scale is the power of two ``2^ceil(log2(amax / 448))`` that brings the block's largest
magnitude within E4M3's 448, with ``amax`` floored at 1e-4 (DeepSeek's activation quantiser does the same).
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_SCALE_BLOCK = 32  # values per UE8M0 scale in an "fp8-e4m3-ue8m0" table row
ROW_FORMATS = ("float", "fp8")  # how a table stores its rows: a float dtype, or packed FP8 (uint8)
E4M3_MAX = 448.0
SCALE_BIAS = 127
_AMAX_FLOOR = 1e-4


def packed_row_bytes(dim: int) -> int:
    """Bytes of one packed row of ``dim`` values (``dim`` a multiple of 32): 264 for 256."""
    check_fp8_dim(dim)
    return dim + dim // FP8_SCALE_BLOCK


def row_dim(packed_bytes: int) -> int:
    """The values per row of packed rows ``packed_bytes`` wide (the inverse of :func:`packed_row_bytes`)."""
    dim, extra = divmod(packed_bytes * FP8_SCALE_BLOCK, FP8_SCALE_BLOCK + 1)
    if extra or dim % FP8_SCALE_BLOCK or dim < FP8_SCALE_BLOCK:
        raise ValueError(f"{packed_bytes} bytes is not the width of a packed FP8 row (D + D/32 bytes, D a multiple of "
                         f"{FP8_SCALE_BLOCK})")
    return dim


def check_fp8_dim(dim: int) -> None:
    if dim < FP8_SCALE_BLOCK or dim % FP8_SCALE_BLOCK:
        raise ValueError(f"FP8 rows need a width that is a positive multiple of {FP8_SCALE_BLOCK}, got {dim}")


def scale_values(scales: Tensor) -> Tensor:
    """UE8M0 bytes (uint8, or torch's float8_e8m0fnu) -> fp32 ``2^(e - 127)``; 255 is +inf, 0 is 2^-127."""
    e = (scales.view(torch.uint8) if scales.dtype != torch.uint8 else scales).to(torch.int32)
    # Built from the bits, exactly on every device (CUDA's exp2 is off by ulps near 2^-127): e >= 1 is the normal
    # fp32 2^(e - 127), e = 0 the subnormal 2^-127, and e = 255 gives fp32's all-ones exponent: +inf.
    return torch.where(e == 0, 1 << 22, e << 23).view(torch.float32)


def e4m3_values(values: Tensor) -> Tensor:
    """E4M3 bytes (uint8, or torch's float8_e4m3fn) -> fp32."""
    if values.dtype == torch.uint8:
        values = values.view(torch.float8_e4m3fn)
    return values.to(torch.float32)


def pack_rows(values: Tensor, scales: Tensor) -> Tensor:
    """E4M3 ``[N, D]`` and UE8M0 ``[N, D / 32]`` (uint8 or torch's float8 dtypes) -> packed uint8 ``[N, D + D / 32]``."""
    dim = values.shape[-1]
    check_fp8_dim(dim)
    if scales.shape != (*values.shape[:-1], dim // FP8_SCALE_BLOCK):
        raise ValueError(f"FP8 rows {tuple(values.shape)} need scales of shape "
                         f"{(*values.shape[:-1], dim // FP8_SCALE_BLOCK)}, got {tuple(scales.shape)}")
    return torch.cat([values.view(torch.uint8), scales.view(torch.uint8)], dim=-1)


def unpack_rows(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Packed uint8 ``[..., D + D / 32]`` -> (E4M3 bytes ``[..., D]``, UE8M0 bytes ``[..., D / 32]``), views."""
    dim = row_dim(packed.shape[-1])
    return packed[..., :dim], packed[..., dim:]


def dequantize_rows(packed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Packed uint8 rows ``[..., D + D / 32]`` -> ``[..., D]`` values in ``dtype`` (computed in fp32).

    The plain reference of the fused GPU gather (:func:`engram.kernels.gather.fp8_gather`).
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed FP8 rows are uint8, got {packed.dtype}")
    values, scales = unpack_rows(packed)
    blocks = e4m3_values(values).unflatten(-1, (-1, FP8_SCALE_BLOCK))  # [..., D / 32, 32]
    return (blocks * scale_values(scales)[..., None]).flatten(-2).to(dtype)


def quantize_rows(rows: Tensor) -> Tensor:
    """Float rows ``[..., D]`` -> packed uint8 ``[..., D + D / 32]`` (power-of-two scale per 32 values)."""
    check_fp8_dim(rows.shape[-1])
    blocks = rows.detach().to(torch.float32).unflatten(-1, (-1, FP8_SCALE_BLOCK))  # [..., D / 32, 32]
    amax = blocks.abs().amax(-1).clamp_min(_AMAX_FLOOR)  # [..., D / 32]
    mantissa, exponent = torch.frexp(amax / E4M3_MAX)  # amax / 448 = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent).clamp(-SCALE_BIAS, SCALE_BIAS)  # ceil(log2)
    scaled = blocks * torch.exp2(-exponent.to(torch.float32))[..., None]
    values = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).flatten(-2)
    return pack_rows(values, (exponent + SCALE_BIAS).to(torch.uint8))


def quantize_table(table: Tensor, out: Tensor | None = None, chunk_rows: int = 1 << 16) -> Tensor:
    """A float table ``[R, D]`` -> its packed FP8 rows ``[R, D + D / 32]`` (:func:`quantize_rows` of every row),
    quantised ``chunk_rows`` rows at a time: the fp32 temporaries stay one chunk, whatever ``R`` is.

    Args:
        table: ``[R, D]`` float rows on any device, e.g. a memory-mapped table file (only read).
        out: uint8 ``[R, D + D / 32]`` to fill (e.g. host memory of its own); a new tensor on ``table``'s device
            when omitted.
        chunk_rows: rows per chunk.

    Example:
        >>> table = torch.randn(1000, 64)
        >>> torch.equal(quantize_table(table, chunk_rows=300), quantize_rows(table))
        True
    """
    if table.dim() != 2 or not table.dtype.is_floating_point:
        raise ValueError(f"quantize_table takes a float [R, D] table, got {table.dtype} of shape {tuple(table.shape)}")
    shape = (table.shape[0], packed_row_bytes(table.shape[1]))
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8, device=table.device)
    elif tuple(out.shape) != shape or out.dtype != torch.uint8:
        raise ValueError(f"out must be uint8 {shape} for a {tuple(table.shape)} table, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for start in range(0, table.shape[0], chunk_rows):
        out[start:start + chunk_rows] = quantize_rows(table[start:start + chunk_rows])
    return out


def dequantize_blocks(weight: Tensor, scales: Tensor, block: int = FP8_SCALE_BLOCK,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """An E4M3 matrix ``[O, I]`` with UE8M0 scales per ``block x block`` tile ``[ceil(O / block), ceil(I / block)]``
    -> ``[O, I]`` in ``dtype``."""
    rows, cols = weight.shape
    grid = (-(-rows // block), -(-cols // block))
    if tuple(scales.shape) != grid:
        raise ValueError(f"an FP8 matrix of shape {(rows, cols)} needs {block}x{block}-block scales of shape {grid}, "
                         f"got {tuple(scales.shape)}")
    factor = scale_values(scales).repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (e4m3_values(weight) * factor).to(dtype)
