"""The Triton cross-entropy rows kernel against its naive twin (on the GPU, or on CPU through Triton's interpreter
without one; ``device`` and TRITON_INTERPRET come from conftest.py)."""

import pytest
import torch

from engram.kernels.cross_entropy import cross_entropy_rows
from engram.kernels.cross_entropy.naive import naive_cross_entropy_rows
from kernel_ops.conftest import compile_for_h200


def rows(dtype, device, seed=0, count=7, vocab=301):
    """Random logits (one row of large values: the log-sum-exp must not overflow), targets with ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, vocab, generator=gen) * 3
    logits[2] += 80.0
    targets = torch.randint(0, vocab, (count,), generator=gen)
    valid = torch.ones(count, dtype=torch.bool)
    valid[[1, 5]] = False
    safe = torch.where(valid, targets, 0)
    scale = torch.rand(count, generator=gen) * valid
    return logits.to(dtype).to(device), safe.to(device), valid.to(device), scale.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("write_grad", [False, True])
def test_triton_matches_naive(device, dtype, write_grad):
    logits, safe, valid, scale = rows(dtype, device)
    fast, plain = logits.clone(), logits.clone()
    losses = cross_entropy_rows(fast, safe, valid, scale if write_grad else None, force=True)
    want = naive_cross_entropy_rows(plain, safe, valid, scale if write_grad else None)
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)
    assert losses[1] == 0 and losses[5] == 0
    if write_grad:  # the rows now hold the gradient, rounded to the logits' dtype
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
        torch.testing.assert_close(fast.float(), plain.float(), **tolerance)
        assert fast[1].abs().max() == 0 and fast[0].abs().max() > 0
    else:
        assert torch.equal(fast, logits)


def test_naive_is_cross_entropy_and_its_gradient():
    logits, safe, valid, scale = rows(torch.float32, "cpu", seed=1)
    x = logits.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(x, torch.where(valid, safe, -100), reduction="none")
    (want * scale).sum().backward()
    losses = naive_cross_entropy_rows(logits, safe, valid, scale)
    torch.testing.assert_close(losses, want.detach())
    torch.testing.assert_close(logits, x.grad)


def test_bad_shapes_are_named():
    logits, safe, valid, _ = rows(torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"logits must be \[c, V\] with unit stride along V"):
        cross_entropy_rows(logits.T, safe, valid)


COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engram.kernels.cross_entropy import triton_cross_entropy as k

for dtype, vocab, grad in (("bf16", 129280, True), ("fp32", 101, False), ("bf16", 4096, True)):
    constexprs = {"V": vocab, "WRITE_GRAD": grad, "BLOCK": min(k._MAX_BLOCK, triton.next_power_of_2(vocab))}
    signature = {"logits_ptr": f"*{dtype}", "safe_ptr": "*i64", "valid_ptr": "*i1", "scale_ptr": "*fp32",
                 "loss_ptr": "*fp32", "stride_row": "i64", **dict.fromkeys(constexprs, "constexpr")}
    triton.compile(ASTSource(k._cross_entropy_rows_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8})
"""


def test_kernel_compiles_for_an_h200_without_one():
    """The compiled (not interpreted) kernel lowers to sm_90: loop-carried types, masks and casts hold there too."""
    compile_for_h200(COMPILE_FOR_H200)
