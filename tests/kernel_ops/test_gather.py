"""The Triton multi-head gather against its naive twin, on the GPU, or on CPU through Triton's interpreter
without one (``device`` and TRITON_INTERPRET come from conftest.py)."""

import pytest
import torch

from engram.kernels.gather import multi_head_gather
from engram.kernels.gather.naive import multi_head_gather_naive
from engram.kernels.gather.op import _gather, _gather_bwd_dense, _gather_bwd_sparse
from kernel_ops.conftest import compile_for_h200

NUM_ROWS = 13  # small: many duplicate rows per batch
DTYPES = [torch.float32, torch.bfloat16]
# Against the float64 sum of N(0, 1) gradients, up to ~50 per row: fp32 sums in any order are off by a
# few 1e-6; bf16 is the fp32 sum rounded once, so within one bf16 ulp.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=1e-5)}


def make_case(token_shape, heads, dim, dtype, device, seed=0, dyadic=False):
    """Weight, rows with many duplicates, and an output gradient (multiples of 1/8 if ``dyadic``), on ``device``
    (drawn on CPU, so the same values on any device)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(NUM_ROWS, dim, generator=gen).to(dtype).to(device).requires_grad_()
    rows = torch.randint(0, NUM_ROWS, (*token_shape, heads), generator=gen).to(device)
    grad_shape = (*token_shape, heads * dim)
    if dyadic:
        grad = torch.randint(-64, 65, grad_shape, generator=gen) / 8
    else:
        grad = torch.randn(grad_shape, generator=gen)
    return weight, rows, grad.to(dtype).to(device)


def weight_grad(fn, weight, rows, grad, **kwargs):
    (g,) = torch.autograd.grad(fn(weight, rows, **kwargs), weight, grad)
    return g


def bits(t):
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def reference_grad(weight, rows, grad):
    """The dense gradient of the naive op, computed in float64."""
    w64 = weight.detach().double().requires_grad_()
    return weight_grad(multi_head_gather_naive, w64, rows, grad.double(), sparse_grad=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [3, 16, 24])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("token_shape", [(1, 1), (2, 7), (3, 67)], ids=str)
def test_forward_is_an_exact_copy(device, dtype, dim, heads, token_shape):
    weight, rows, _ = make_case(token_shape, heads, dim, dtype, device)
    out = multi_head_gather(weight, rows, force=True)
    assert out.shape == (*token_shape, heads * dim) and out.dtype == dtype
    # Whole-tensor equality: the output starts as torch.empty, so a slot the kernel missed would show.
    assert torch.equal(out, multi_head_gather_naive(weight, rows))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [3, 16, 24])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("token_shape", [(1, 1), (2, 7), (3, 67)], ids=str)
def test_backward_matches_naive(device, dtype, dim, heads, token_shape):
    # Dyadic gradients sum exactly in fp32 in any order, so the fp32 accumulation rounded once to the
    # weight's dtype must equal the exact sum rounded once: an exact test for fp32 and bf16 alike (and for
    # the naive fp32 gradient too, whatever order CUDA's embedding backward adds in).
    weight, rows, grad = make_case(token_shape, heads, dim, dtype, device, dyadic=True)
    expected = reference_grad(weight, rows, grad).to(dtype)

    sparse = weight_grad(multi_head_gather, weight, rows, grad, force=True)
    assert sparse.is_sparse and sparse.is_coalesced() and sparse.dtype == dtype and sparse.shape == weight.shape
    indices = sparse._indices()[0]
    assert torch.equal(indices, torch.unique(rows))  # the rows read, each once, ascending
    assert torch.equal(sparse.to_dense(), expected)

    dense = weight_grad(multi_head_gather, weight, rows, grad, sparse_grad=False, force=True)
    assert dense.layout == torch.strided and dense.dtype == dtype
    assert torch.equal(dense, sparse.to_dense())
    if dtype == torch.float32:
        assert torch.equal(dense, weight_grad(multi_head_gather_naive, weight, rows, grad, sparse_grad=False))


@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_deterministic_and_atomic_path_agrees(device, sparse_grad, dtype):
    weight, rows, grad = make_case((3, 67), 3, 24, dtype, device, seed=1)
    runs = [weight_grad(multi_head_gather, weight, rows, grad, sparse_grad=sparse_grad, force=True)
            for _ in range(2)]
    if sparse_grad:
        assert torch.equal(runs[0]._indices(), runs[1]._indices())
        runs = [g._values() for g in runs]
    assert torch.equal(bits(runs[0]), bits(runs[1]))

    atomic = weight_grad(multi_head_gather, weight, rows, grad, sparse_grad=sparse_grad, deterministic=False,
                         force=True)
    assert atomic.is_sparse == sparse_grad
    if sparse_grad:
        assert atomic.is_coalesced() and torch.equal(atomic._indices()[0], torch.unique(rows))
        atomic = atomic.to_dense()
    torch.testing.assert_close(atomic.double(), reference_grad(weight, rows, grad), **TOL[dtype])


def test_head_dim_wider_than_one_tile(device):
    weight, rows, grad = make_case((2, 7), 2, 300, torch.float32, device)  # 300 > MAX_BLOCK_D: chunks along D
    assert torch.equal(multi_head_gather(weight, rows, force=True), multi_head_gather_naive(weight, rows))
    expected = reference_grad(weight, rows, grad)
    for deterministic in (True, False):
        got = weight_grad(multi_head_gather, weight, rows, grad, deterministic=deterministic, force=True)
        torch.testing.assert_close(got.to_dense().double(), expected, **TOL[torch.float32])


def test_empty_batch(device):
    weight, rows, grad = make_case((0, 5), 2, 4, torch.float32, device)
    out = multi_head_gather(weight, rows, force=True)
    assert out.shape == (0, 5, 8)
    sparse = weight_grad(multi_head_gather, weight, rows, grad, force=True)
    assert sparse._nnz() == 0 and sparse.is_coalesced()
    dense = weight_grad(multi_head_gather, weight, rows, grad, sparse_grad=False, force=True)
    assert torch.equal(dense, torch.zeros_like(weight))


def test_int64_offsets_into_a_table_over_2_to_the_31_elements(device):
    dim = 4
    num_rows = 2**31 // dim + 3
    # 4 GiB: on CPU untouched (uncommitted) pages; on a GPU allocated but never written save these rows.
    weight = torch.empty(num_rows, dim, dtype=torch.bfloat16, device=device)
    weight[-3:] = torch.arange(3 * dim, dtype=torch.bfloat16, device=device).view(3, dim)
    weight[:1] = 7
    weight.requires_grad_()
    rows = torch.tensor([[num_rows - 1, 0, num_rows - 3], [num_rows - 1, num_rows - 1, 0]], device=device)
    out = multi_head_gather(weight, rows, force=True)
    expected = torch.stack([weight.detach()[r].flatten() for r in rows])
    assert torch.equal(out, expected)
    grad = torch.arange(out.numel(), dtype=torch.bfloat16, device=device).view_as(out)
    sparse = weight_grad(multi_head_gather, weight, rows, grad, force=True)
    assert sparse._indices()[0].tolist() == [0, num_rows - 3, num_rows - 1]
    g = grad.view(2, 3, dim).float()
    expected_values = torch.stack([g[0, 1] + g[1, 2], g[0, 2], g[0, 0] + g[1, 0] + g[1, 1]]).bfloat16()
    assert torch.equal(sparse._values(), expected_values)


@pytest.mark.parametrize("path", ["naive", "triton"])
def test_gradcheck_float64(device, path):
    # gradcheck rejects a sparse-layout gradient of a strided input (even F.embedding's), so it checks the
    # dense mode; the sparse gradient equals the dense one in test_backward_matches_naive.
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    rows = torch.randint(0, 6, (2, 3, 2), generator=gen).to(device)
    force = path == "triton"
    torch.autograd.gradcheck(lambda w: multi_head_gather(w, rows, sparse_grad=False, force=force), (weight,),
                             fast_mode=True)


@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse", "dense"])
def test_custom_ops_pass_opcheck(device, sparse_grad):
    # The ops call the kernels unconditionally: on CPU tensors that needs the interpreter, so on a GPU machine
    # they are checked on the GPU.
    weight, rows, grad = make_case((2, 3), 2, 5, torch.float32, device)
    torch.library.opcheck(_gather, (weight, rows, sparse_grad, True))
    if sparse_grad:
        torch.library.opcheck(_gather_bwd_sparse, (grad, rows, NUM_ROWS, True))
    else:
        torch.library.opcheck(_gather_bwd_dense, (grad, rows, NUM_ROWS, True))


@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse", "dense"])
def test_compiles_without_graph_breaks(device, sparse_grad):
    # aot_eager traces the joint forward+backward graph as inductor does, without inductor's C++ compile.
    weight, rows, grad = make_case((2, 3), 2, 5, torch.float32, device)

    def loss(w, r):
        return (multi_head_gather(w, r, sparse_grad=sparse_grad, force=True) * grad).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad(compiled(weight, rows), weight)
    (expected,) = torch.autograd.grad(loss(weight, rows), weight)
    assert got.is_sparse == sparse_grad
    assert torch.equal(got.to_dense(), expected.to_dense())


COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engram.kernels.gather import triton_gather as k

def build(fn, signature, constexprs, num_warps=4):
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

for dtype, dim, heads in (("bf16", 160, 4), ("fp32", 3, 1)):
    bd = k._block_d(dim)
    build(k._gather_fwd_kernel, {"weight_ptr": f"*{dtype}", "rows_ptr": "*i64", "out_ptr": f"*{dtype}",
          "num_tokens": "i32"}, {"H": heads, "D": dim, "BLOCK_T": max(1, k.TILE // bd), "BLOCK_D": bd})
    seg = k._segment_params(dim)
    build(k._segment_sum_kernel, {"grad_ptr": f"*{dtype}", "order_ptr": "*i64", "seg_start_ptr": "*i64",
          "out_ptr": "*fp32", "num_segs": "i32"}, {"D": dim, **{n: seg[n] for n in ("BLOCK_G", "BLOCK_S", "BLOCK_D")}},
          num_warps=seg["num_warps"])
    build(k._scatter_add_kernel, {"grad_ptr": f"*{dtype}", "dst_rows_ptr": "*i64", "out_ptr": "*fp32",
          "num_pairs": "i64"}, {"D": dim, "BLOCK_P": max(1, k.TILE // bd), "BLOCK_D": bd})
"""


def test_kernels_compile_for_an_h200_without_one():
    compile_for_h200(COMPILE_FOR_H200)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_with_many_segments_of_mixed_lengths(device, dtype):
    # Many more unique rows than one program of the segment-sum kernel takes, of lengths 1 to ~40 (a few hot
    # rows among many rare ones), and dyadic gradients: the sums are exact, so must match bit for bit.
    gen = torch.Generator().manual_seed(2)
    num_rows, dim = 4000, 64
    rows = torch.cat([torch.randint(0, num_rows, (700,), generator=gen), torch.randint(0, 5, (120,), generator=gen)])
    rows = rows[torch.randperm(rows.numel(), generator=gen)].view(41, 5, 4).to(device)
    weight = torch.zeros(num_rows, dim, dtype=dtype, device=device, requires_grad=True)
    grad = (torch.randint(-64, 65, (41, 5, 4 * dim), generator=gen) / 8).to(dtype).to(device)
    expected = reference_grad(weight, rows, grad).to(dtype)
    sparse = weight_grad(multi_head_gather, weight, rows, grad, force=True)
    assert sparse.is_coalesced() and torch.equal(sparse._indices()[0], torch.unique(rows))
    assert torch.equal(sparse.to_dense(), expected)
    dense = weight_grad(multi_head_gather, weight, rows, grad, sparse_grad=False, force=True)
    assert torch.equal(dense, expected)
