"""Triton kernel of the fused FP8 gather: read packed FP8 rows (:mod:`engram.kernels.fp8`) and write them dequantised.

E4M3 and UE8M0 are decoded from their bits with integer arithmetic (no float8 types: the same code runs in
Triton's interpreter and on any GPU), and every value is one fp32 product ``e4m3 * 2^(e - 127)``, rounded once
like the plain :func:`engram.kernels.fp8.dequantize_rows`, so the two agree bit for bit.

Offsets into the table are computed in int64: tables exceed 2**31 bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from engram.kernels.dispatch import kernel_output
from engram.kernels.fp8 import row_dim

# Widest tile along D; wider rows loop over D in chunks of this.
MAX_BLOCK_D = 256
# Values per tile (tokens times BLOCK_D).
TILE = 2048


@triton.jit
def _e4m3_to_fp32(code):
    """E4M3 bytes (uint32 in [0, 256)) -> fp32: sign, 4-bit exponent of bias 7, 3-bit mantissa; 0x7F and 0xFF
    are NaN (no infinities)."""
    sign = (code & 0x80) << 24
    exponent = (code >> 3) & 0xF
    mantissa = code & 0x7
    normal = sign | ((exponent + 120) << 23) | (mantissa << 20)  # fp32 exponent: e - 7 + 127
    subnormal = (mantissa.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True) | sign  # m * 2^-9
    value = tl.where(exponent == 0, subnormal, normal).to(tl.float32, bitcast=True)
    return tl.where((code & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _ue8m0_to_fp32(e):
    """UE8M0 bytes (uint32 in [0, 256)) -> fp32 ``2^(e - 127)`` (e = 0 is the subnormal 2^-127; e = 255, fp32's
    all-ones exponent, is +inf)."""
    return tl.where(e == 0, 0x00400000, e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_gather_kernel(table_ptr, rows_ptr, out_ptr, num_tokens, H: tl.constexpr, D: tl.constexpr,
                       ROW_BYTES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < num_tokens
    cols = tl.arange(0, BLOCK_D)
    for h in tl.static_range(H):
        row = tl.load(rows_ptr + tok * H + h, mask=tok_mask, other=0).to(tl.int64)
        row_start = table_ptr + row[:, None] * ROW_BYTES
        for d0 in tl.static_range(0, D, BLOCK_D):
            c = d0 + cols
            mask = tok_mask[:, None] & (c < D)[None, :]
            code = tl.load(row_start + c[None, :], mask=mask, other=0).to(tl.uint32)
            exponent = tl.load(row_start + D + c[None, :] // 32, mask=mask, other=127).to(tl.uint32)
            values = _e4m3_to_fp32(code) * _ue8m0_to_fp32(exponent)
            tl.store(out_ptr + tok[:, None] * (H * D) + (h * D) + c[None, :], values, mask=mask)


def fp8_gather_fwd(table: Tensor, flat_rows: Tensor) -> Tensor:
    """uint8 ``[R, D + D / 32]`` packed rows, ``[..., H]`` flat rows -> fp32 ``[..., H * D]``."""
    table = table.contiguous()
    num_heads, row_bytes = flat_rows.shape[-1], table.shape[1]
    dim = row_dim(row_bytes)
    rows = flat_rows.reshape(-1, num_heads).contiguous()
    out = kernel_output((rows.shape[0], num_heads * dim), torch.float32, table.device)
    if out.numel():
        block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
        block_t = max(1, TILE // block_d)
        grid = (triton.cdiv(rows.shape[0], block_t),)
        _fp8_gather_kernel[grid](table, rows, out, rows.shape[0], H=num_heads, D=dim, ROW_BYTES=row_bytes,
                                 BLOCK_T=block_t, BLOCK_D=block_d)
    return out.view(*flat_rows.shape[:-1], num_heads * dim)
