"""The fused FP8 gather + dequantise: the Triton kernel against the naive twin bit for bit (on the GPU, or on CPU
through Triton's interpreter), and the naive twin against E4M3/UE8M0 decoded by formula, independently of torch."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.kernels.fp8 import quantize_rows
from engram.kernels.gather import fp8_gather, multi_head_gather
from engram.kernels.gather.naive import fp8_gather_naive
from engram.kernels.gather.op import _fp8_gather
from kernel_ops.conftest import compile_for_h200

NUM_ROWS = 13
SPECIAL_CODES = [0x00, 0x80, 0x01, 0x81, 0x07, 0x7E, 0xFE, 0x7F, 0xFF]  # +-0, subnormals, +-448, NaN
SPECIAL_SCALES = [0, 1, 127, 254, 255]  # 2^-127 (a subnormal factor), 2^-126, 1, 2^127, +inf


def e4m3_by_formula(code: int) -> float:
    """One E4M3 byte by its definition: sign, 4-bit exponent of bias 7, 3-bit mantissa, subnormals below exponent
    1, and S.1111.111 as NaN (no infinities)."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * (mantissa / 8) * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def dequantize_by_formula(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[N, D + D / 32]`` -> float32 ``[N, D]``: each product is exact in float64, then rounded once to
    float32, as one fp32 multiplication rounds it. Scale byte 255 is +inf (as vLLM and SGLang read it)."""
    dim = packed.shape[1] * 32 // 33
    values = np.array([e4m3_by_formula(c) for c in range(256)])[packed[:, :dim]]
    exponents = packed[:, dim:].astype(np.float64)
    scales = np.where(exponents == 255, np.inf, 2.0 ** (exponents - 127))
    # 448 * 2^127 is past fp32's range: inf, as in fp32; 0 * inf (scale byte 255) is NaN, as in fp32
    with np.errstate(over="ignore", invalid="ignore"):
        return (values * np.repeat(scales, 32, axis=1)).astype(np.float32)


def special_table(num_rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Packed rows of random bytes with every E4M3 code (row 0), the special codes (row 1: +-0, subnormals,
    +-448, NaN 0x7F/0xFF, scaled by 2^127 in its first block: +-inf, and by 2^-127 after it), each special scale
    byte 0, 1, 127, 254, 255 over a whole row (rows 2 to 6), and random rows whose scales are mostly ordinary
    with a special one here and there (``num_rows >= 8``)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = dim // 32
    table = torch.randint(0, 256, (num_rows, dim + blocks), dtype=torch.uint8, generator=gen)
    table[:, dim:] = torch.randint(100, 150, (num_rows, blocks), dtype=torch.uint8, generator=gen)
    table[0, :dim] = torch.arange(dim) % 256
    table[1, :dim] = torch.tensor(SPECIAL_CODES * dim)[:dim]
    table[1, dim:] = 0
    table[1, dim] = 254
    for i, scale in enumerate(SPECIAL_SCALES):
        table[2 + i, dim:] = scale
    sprinkled = torch.rand(num_rows - 7, blocks, generator=gen) < 0.3
    picks = torch.tensor(SPECIAL_SCALES, dtype=torch.uint8)[torch.randint(0, 5, sprinkled.shape, generator=gen)]
    table[7:, dim:] = torch.where(sprinkled, picks, table[7:, dim:])
    return table


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 bits with every NaN made one NaN (payloads are not part of the contract; their positions are)."""
    return torch.where(t.isnan(), torch.nan, t).view(torch.int32)


def interpreted(fn, *args, **kwargs):
    with warnings.catch_warnings():  # the interpreter's numpy warns when 448 * 2^127 overflows to inf, as it must
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("dim", [32, 96, 288], ids=lambda d: f"D{d}")  # one block; a masked tile; two tiles
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("token_shape", [(1, 1), (2, 7), (3, 21)], ids=str)
def test_triton_equals_naive_bit_for_bit(device, dim, heads, token_shape):
    table = special_table(NUM_ROWS, dim).to(device)
    rows = torch.randint(0, NUM_ROWS, (*token_shape, heads), generator=torch.Generator().manual_seed(1))
    rows.view(-1)[:NUM_ROWS] = torch.arange(NUM_ROWS)[:rows.numel()]  # the special rows are read
    out = interpreted(fp8_gather, table, rows.to(device), force=True)
    expected = fp8_gather_naive(table, rows.to(device))
    assert out.shape == (*token_shape, heads * dim) and out.dtype == torch.float32
    # Whole-tensor equality: the output starts as torch.empty, so a slot the kernel missed would show.
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(bits(out), bits(expected))


@pytest.mark.parametrize("dim", [32, 64], ids=lambda d: f"D{d}")
def test_naive_equals_decoding_by_formula(dim):
    table = special_table(NUM_ROWS, dim, seed=3)
    rows = torch.arange(NUM_ROWS).view(NUM_ROWS, 1)
    expected = torch.from_numpy(dequantize_by_formula(table.numpy()))
    got = fp8_gather_naive(table, rows)
    assert torch.equal(bits(got), bits(expected))
    assert got.isnan().any() and got.isinf().any() and (got == 0).any()


def test_subnormal_codes_and_scales_decode_exactly():
    dim = 32
    table = torch.zeros(2, dim + 1, dtype=torch.uint8)
    table[:, :8] = torch.tensor([0x00, 0x80, 0x01, 0x07, 0x08, 0x7E, 0xFE, 0x7F], dtype=torch.uint8)
    table[:, dim] = torch.tensor([127, 0], dtype=torch.uint8)
    got = fp8_gather_naive(table, torch.tensor([[0], [1]]))
    want = [0.0, -0.0, 2.0**-9, 7 * 2.0**-9, 2.0**-6, 448.0, -448.0]
    assert got[0, :7].tolist() == want and math.isnan(got[0, 7])
    assert torch.equal(torch.signbit(got[0, :2]), torch.tensor([False, True]))
    assert got[1, :7].tolist() == [w * 2.0**-127 for w in want]  # fp32 subnormals, exactly


def test_scale_byte_255_is_inf_in_the_kernel(device):
    """The kernel decodes UE8M0 byte 255 as +inf (vLLM's and SGLang's reading): +-inf values, NaN where the E4M3
    value is 0; byte 0 stays 2^-127."""
    dim = 64
    table = torch.zeros(2, dim + 2, dtype=torch.uint8)
    table[:, :4] = torch.tensor([0x38, 0xB8, 0x00, 0x08], dtype=torch.uint8)  # 1, -1, 0, 2^-6
    table[:, dim:] = torch.tensor([[255, 0], [0, 255]], dtype=torch.uint8)
    out = interpreted(fp8_gather, table.to(device), torch.tensor([[0], [1]], device=device), force=True).cpu()
    assert out[0, :2].tolist() == [float("inf"), float("-inf")] and out[0, 2].isnan() and out[0, 3] == float("inf")
    assert out[1, :4].tolist() == [2.0 ** -127, -(2.0 ** -127), 0.0, 2.0 ** -133]
    assert out[1, 32:].isnan().all()  # the second block: E4M3 zeros times +inf


def test_quantized_rows_round_trip_through_the_kernel(device):
    values = torch.randn(NUM_ROWS, 64, generator=torch.Generator().manual_seed(4)) * 3
    table = quantize_rows(values).to(device)
    rows = torch.randint(0, NUM_ROWS, (5, 2), generator=torch.Generator().manual_seed(5)).to(device)
    out = interpreted(fp8_gather, table, rows, force=True)
    assert torch.equal(out, fp8_gather_naive(table, rows))
    # E4M3 keeps 3 mantissa bits: within 2^-4 relative of the block's values (or of the block's scale near 0).
    torch.testing.assert_close(out.cpu(), values[rows.cpu()].flatten(-2), rtol=2**-4, atol=2**-6 * 3)


def test_out_of_range_rows_raise_on_the_naive_path():
    table = special_table(NUM_ROWS, 32)
    for bad in (NUM_ROWS, -1):
        with pytest.raises(IndexError):
            fp8_gather(table, torch.tensor([[0, bad]]), force=False)


def test_refuses_tables_that_are_no_packed_rows():
    with pytest.raises(TypeError, match="uint8"):
        fp8_gather(torch.randn(4, 33), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="40 bytes is not the width of a packed FP8 row"):
        fp8_gather(torch.zeros(4, 40, dtype=torch.uint8), torch.tensor([[0]]))
    with pytest.raises(TypeError, match="integer row ids"):
        fp8_gather(torch.zeros(4, 33, dtype=torch.uint8), torch.tensor([[0.0]]))


def test_empty_rows_give_an_empty_output(device):
    table = special_table(NUM_ROWS, 64).to(device)
    out = fp8_gather(table, torch.empty(0, 3, dtype=torch.long, device=device), force=True)
    assert out.shape == (0, 192) and out.dtype == torch.float32


def test_op_passes_opcheck(device):
    # Rows without NaN: opcheck compares the outputs of its runs with NaN != NaN.
    table = quantize_rows(torch.randn(NUM_ROWS, 64, generator=torch.Generator().manual_seed(8))).to(device)
    rows = torch.randint(0, NUM_ROWS, (2, 5, 3), generator=torch.Generator().manual_seed(6)).to(device)
    interpreted(torch.library.opcheck, _fp8_gather, (table, rows))


def test_row_copy_moves_packed_rows_unchanged(device):
    # The UVA host store reads rows with the multi-head gather's copy kernel: uint8 rows of 264 bytes pass as is.
    table = special_table(NUM_ROWS, 256).to(device)
    rows = torch.randint(0, NUM_ROWS, (37, 1), generator=torch.Generator().manual_seed(7)).to(device)
    out = multi_head_gather(table, rows, sparse_grad=False, force=True)
    assert out.dtype == torch.uint8 and torch.equal(out, table[rows[:, 0]])


COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engram.kernels.gather import triton_fp8_gather as k

for dim, heads in ((256, 24), (96, 1)):
    block_d = min(triton.next_power_of_2(dim), k.MAX_BLOCK_D)
    constexprs = {"H": heads, "D": dim, "ROW_BYTES": dim + dim // 32, "BLOCK_T": k.TILE // block_d,
                  "BLOCK_D": block_d}
    signature = {"table_ptr": "*u8", "rows_ptr": "*i64", "out_ptr": "*fp32", "num_tokens": "i32",
                 **dict.fromkeys(constexprs, "constexpr")}
    compiled = triton.compile(ASTSource(k._fp8_gather_kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    # Flushing subnormals to zero would break bit-equality for the scale bytes 0 and 1.
    assert ".ftz" not in compiled.asm["ptx"], "the kernel must keep fp32 subnormals"
"""


def test_kernel_compiles_for_an_h200_without_one():
    compile_for_h200(COMPILE_FOR_H200)


def test_benchmark_dry_run_on_cpu(tmp_path):
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fp8_gather.py"
    result = subprocess.run([sys.executable, str(bench), "--device", "cpu", "--rows", "1000", "--tokens", "64,8",
                             "--json", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(report["checks"].values()) and len(report["results"]) == 6
    assert "--rows 1000" in report["command"] and "dry run" in report["machine"]["device"]
