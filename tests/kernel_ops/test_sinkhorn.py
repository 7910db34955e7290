"""The Triton Sinkhorn-Knopp against its naive twin (on the GPU, or on CPU through Triton's interpreter without one;
``device`` and TRITON_INTERPRET come from conftest.py): values and gradients, ties in the row max, a large
spread, strided inputs, ``torch.compile``, argument checks, and the kernels' lowering to sm_90."""

import functools
import re

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager, boxed_nop

from engram.kernels.sinkhorn import sinkhorn, triton_sinkhorn
from engram.kernels.sinkhorn import naive as naive_module
from engram.kernels.sinkhorn.naive import SINKHORN_FLOOR, naive_sinkhorn
from kernel_ops.conftest import compile_for_h200


def random_logits(lead, size, seed, device, dtype=torch.float32, scale=1.0):
    """``[*lead, M, M]`` normal logits times ``scale``, built on CPU then moved: the same values on any device."""
    logits = torch.randn(*lead, size, size, generator=torch.Generator().manual_seed(seed)) * scale
    return logits.to(dtype).to(device).requires_grad_()


def forward_backward(logits, iters, force, seed):
    """The output and the logits' gradient for a random upstream gradient."""
    out = sinkhorn(logits, iters, force=force)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    (grad,) = torch.autograd.grad(out, logits, grad_out)
    return out, grad


def assert_matches_naive(logits, iters, seed=0, grad_rtol=1e-5):
    out, grad = forward_backward(logits, iters, True, seed)
    ref_out, ref_grad = forward_backward(logits, iters, False, seed)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    # Each row's gradient sums to ~0 (a shift of a row leaves the output unchanged): near-zero entries are the
    # difference of O(scale) terms, so their absolute error follows the scale.
    scale = ref_grad.float().abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=2e-6 * max(scale, 1.0), rtol=grad_rtol)
    return out, grad


@pytest.mark.parametrize("lead", [(2, 5), (7,)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("iters", [1, 3, 20])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_triton_matches_naive_fp32(device, size, iters, lead):
    logits = random_logits(lead, size, seed=10 * size + iters, device=device)
    out, _ = assert_matches_naive(logits, iters, seed=iters)
    torch.testing.assert_close(out.sum(-2), torch.ones(out.shape[:-2] + (size,), device=device))


@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("size", [3, 4])
def test_triton_matches_naive_bf16(device, size, iters):
    """bf16 logits: the same fp32 math (the output is fp32), the gradient rounded to bf16. Triton's interpreter
    rounds fp32 -> bf16 toward zero (the GPU rounds to nearest, as autograd's cast does): one bf16 ulp apart."""
    logits = random_logits((2, 5), size, seed=size + iters, device=device, dtype=torch.bfloat16)
    assert_matches_naive(logits, iters, seed=2, grad_rtol=2 ** -7)


@pytest.mark.parametrize("floor", [SINKHORN_FLOOR, 0.5])
@pytest.mark.parametrize("iters", [1, 20])
def test_tied_row_maxima(device, iters, floor, monkeypatch):
    """Rows of equal logits and rows with two or three equal maxima: the row max's gradient is split evenly among
    the tied entries, as autograd does for amax. Row normalisation makes ``sum(dp0 * p0)`` vanish, so that
    gradient, ``-sum(dp0 * e)``, is ``floor * sum(dp0)``: a floor of 0.5 (in both paths) makes it show."""
    monkeypatch.setattr(naive_module, "SINKHORN_FLOOR", floor)
    monkeypatch.setattr(triton_sinkhorn, "SINKHORN_FLOOR", floor)
    logits = random_logits((3,), 4, seed=7, device="cpu").detach()
    logits[0, 1] = 0.25  # a whole row tied
    logits[1, 0, 1] = logits[1, 0, 3] = logits[1, 0].max() + 0.5  # two tied maxima
    logits[2, 2, :3] = logits[2, 2].max()  # three
    logits[2, 3] = 0.0
    assert_matches_naive(logits.to(device).requires_grad_(), iters, seed=3)


@pytest.mark.parametrize("size", [3, 4])
def test_large_spread(device, size):
    """Logits * 30: exp underflows far below the floor, which then keeps the matrix positive (and the iterations
    from dividing by 0)."""
    logits = random_logits((2, 3), size, seed=size, device=device, scale=30.0)
    out, _ = assert_matches_naive(logits, 20, seed=4)
    assert (out > 0).all()


def test_strided_inputs(device):
    """Logits as a transposed slice of a projection (read in place) and an expanded upstream gradient (stride 0)."""
    projected = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(5)).to(device).requires_grad_()
    results = []
    for force in (True, False):
        logits = projected[..., 2:18].unflatten(-1, (4, 4)).transpose(-1, -2)
        out = sinkhorn(logits, 5, force=force)
        results.append((out, *torch.autograd.grad(out.sum(), projected)))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_empty_batch(device):
    logits = torch.zeros(0, 3, 3, device=device, requires_grad=True)
    out = sinkhorn(logits, 4, force=True)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert out.shape == grad.shape == (0, 3, 3)


def test_default_path_on_cpu_is_naive():
    logits = random_logits((2, 5), 4, seed=1, device="cpu")
    out = sinkhorn(logits, 20)
    assert "sinkhorn_fwd" not in type(out.grad_fn).__name__
    assert torch.equal(out, naive_sinkhorn(logits, 20))
    assert "sinkhorn_fwd" not in type(sinkhorn(logits, 20, force=False).grad_fn).__name__


def test_dispatch(device):
    logits = random_logits((2,), 4, seed=1, device=device)
    assert "sinkhorn_fwd" in type(sinkhorn(logits, 2, force=True).grad_fn).__name__
    if device.type == "cuda":  # CUDA tensors: Triton by default
        assert "sinkhorn_fwd" in type(sinkhorn(logits, 2).grad_fn).__name__


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # dispatch's triton check
def test_compile_is_one_opaque_node(device):
    """Under ``torch.compile(fullgraph=True)`` (no graph break) the forward graph holds the forward op once and no
    exp, the backward graph the backward op once; values and gradients equal the eager ones."""
    graphs = {}

    def recording(name):
        def compiler(gm, example_inputs):
            graphs[name] = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
            return boxed_nop(gm, example_inputs)
        return compiler

    backend = functools.partial(aot_eager, fw_compiler=recording("forward"), bw_compiler=recording("backward"))

    def mix(logits, streams):
        return sinkhorn(logits, 3, force=True) @ streams

    torch._dynamo.reset()
    compiled = torch.compile(mix, fullgraph=True, backend=backend)
    logits = random_logits((2, 3), 4, seed=6, device=device)
    streams = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(6)).to(device)
    results = []
    for fn in (compiled, mix):
        out = fn(logits, streams)
        results.append((out, *torch.autograd.grad(out.square().sum(), logits)))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    for name, op in (("forward", "engram.sinkhorn_fwd.default"), ("backward", "engram.sinkhorn_bwd.default")):
        assert graphs[name].count(op) == 1 and "aten.exp.default" not in graphs[name], graphs[name]


def test_opcheck(device):
    # The ops call the kernels unconditionally: on CPU tensors that needs the interpreter.
    logits = random_logits((2,), 3, seed=8, device=device)
    torch.library.opcheck(torch.ops.engram.sinkhorn_fwd.default, (logits, 2))
    grad = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(8)).to(device)
    torch.library.opcheck(torch.ops.engram.sinkhorn_bwd.default, (grad, logits.detach(), 2))


@pytest.mark.parametrize("force", [True, None], ids=["triton", "default"])
def test_bad_arguments_are_named(device, force):
    logits = torch.zeros(2, 4, 4, device=device)
    for iters in (0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"iters must be an int >= 1, got {iters}"):
            sinkhorn(logits, iters, force=force)
    for shape in ((4,), (2, 3, 4), (2, 0, 0)):
        with pytest.raises(ValueError, match=re.escape(f"sinkhorn: logits must have shape [..., M, M] with M >= 1, "
                                                       f"got {shape}")):
            sinkhorn(torch.zeros(shape, device=device), 20, force=force)
    with pytest.raises(ValueError, match="torch.int64"):
        sinkhorn(torch.zeros(2, 4, 4, dtype=torch.long, device=device), 20, force=force)
    with pytest.raises(ValueError, match="naive_sinkhorn: iters must be an int >= 1, got 0"):
        naive_sinkhorn(logits, 0)


def test_floor_keeps_underflowed_entries_positive():
    """A logit gap of 200 underflows exp to 0: the floor is what is left, 1e-6 of the row's maximum."""
    assert SINKHORN_FLOOR == 1e-6
    logits = torch.tensor([[0.0, -200.0], [0.0, 0.0]])
    # Rows [1, 1e-6] and [0.5, 0.5] after the row step, so the second column normalises to ~[2e-6, 1].
    assert naive_sinkhorn(logits, 1)[0, 1].item() == pytest.approx(2e-6, rel=1e-5)


COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engram.kernels.sinkhorn import triton_sinkhorn as k
from engram.kernels.sinkhorn.naive import SINKHORN_FLOOR

for dtype, size, iters in (("bf16", 4, 20), ("fp32", 3, 1), ("fp32", 1, 20), ("bf16", 8, 20)):
    block_m, block_t = k._blocks(size, 1 << 15)
    constexprs = {"M": size, "ITERS": iters, "FLOOR": SINKHORN_FLOOR, "BLOCK_M": block_m, "BLOCK_T": block_t}
    strides = dict.fromkeys(("stride_n", "stride_i", "stride_j"), "i64")
    fwd = {"logits_ptr": f"*{dtype}", "out_ptr": "*fp32", "N": "i32", **strides}
    bwd = {"grad_ptr": "*fp32", "logits_ptr": f"*{dtype}", "grad_logits_ptr": f"*{dtype}", "N": "i32",
           **dict.fromkeys(("stride_gn", "stride_gi", "stride_gj"), "i64"), **strides}
    for kernel, signature in ((k._sinkhorn_fwd_kernel, fwd), (k._sinkhorn_bwd_kernel, bwd)):
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
"""


def test_kernels_compile_for_an_h200_without_one():
    """The compiled (not interpreted) forward and backward kernels lower to sm_90: padded M (3), M = 1, the nested
    recomputation loop with its runtime bound, bf16 loads and stores."""
    compile_for_h200(COMPILE_FOR_H200)
