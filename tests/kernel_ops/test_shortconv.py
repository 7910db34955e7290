"""The Triton ShortConv against its naive twin, on the GPU, or on CPU through Triton's interpreter without one
(``device`` and TRITON_INTERPRET come from conftest.py). The naive twin is ``ShortConv.forward`` itself off the GPU,
checked against an independent statement of the demo's ShortConv in tests/test_layer.py."""

import pytest
import torch

from engram.kernels.shortconv import fused_short_conv
from engram.kernels.shortconv.op import _short_conv_bwd, _short_conv_fwd
from kernel_ops.conftest import compile_for_h200

EPS = 1e-5
FP32 = dict(atol=1e-5, rtol=1e-5)


def make_case(batch, length, branches, dim, kernel_size, dilation, dtype, device, *, with_past, with_mask,
              seed=0):
    """Random inputs (none zero) drawn on CPU, so the same values on any device; the mask left-pads every
    sequence but the first by a different amount (all of it for T=1 with B>1)."""
    gen = torch.Generator().manual_seed(seed)
    channels, left_pad = branches * dim, (kernel_size - 1) * dilation
    x = (torch.randn(batch, length, branches, dim, generator=gen) * 2 + 0.3).to(dtype)
    norm_weight = 1 + 0.5 * torch.rand(branches, dim, generator=gen)
    conv_weight = torch.randn(channels, 1, kernel_size, generator=gen) * 0.5
    past = torch.randn(batch, channels, left_pad, generator=gen).to(dtype) if with_past else None
    mask = None
    if with_mask:
        mask = torch.ones(batch, length, dtype=torch.bool)
        for b in range(batch):
            mask[b, :min(length - 1 if b == 0 else length, 2 * b + 1)] = False
    leaves = [t.to(device).requires_grad_() for t in (x, norm_weight, conv_weight)]
    return (*leaves, None if past is None else past.to(device), None if mask is None else mask.to(device))


def run(case, dilation, force, seed=1):
    """Forward, then the gradients of x, norm_weight, conv_weight for random output gradients (also on new_past)."""
    x, norm_weight, conv_weight, past, mask = case
    y, new_past = fused_short_conv(x, norm_weight, conv_weight, dilation, EPS, past, mask, force=force)
    gen = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=gen).to(y.dtype).to(y.device)
    grad_past = torch.randn(new_past.shape, generator=gen).to(new_past.dtype).to(y.device)
    grads = torch.autograd.grad((y, new_past), (x, norm_weight, conv_weight), (grad_y, grad_past))
    return (y, new_past), grads


GRAD_NAMES = ["x", "norm_weight", "conv_weight"]
# (B, T, M, D): T=67 is not a multiple of any time block; D=40 is not a power of two.
SHAPES = [(1, 1, 1, 3), (2, 7, 4, 24), (2, 67, 4, 40), (1, 7, 1, 40), (3, 7, 4, 3)]
CONVS = [(4, 3), (2, 1)]  # (K, dilation): the Engram default, the smallest


def shape_id(s):
    return "B{}T{}M{}D{}".format(*s)


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "K{}L{}".format(*c))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("with_past,with_mask", [(False, False), (True, True)], ids=["plain", "past+mask"])
def test_triton_matches_naive_fp32(device, shape, conv, with_past, with_mask):
    kernel_size, dilation = conv
    case = make_case(*shape, kernel_size, dilation, torch.float32, device, with_past=with_past,
                     with_mask=with_mask, seed=sum(shape))
    (y, new_past), grads = run(case, dilation, True)
    (ref_y, ref_past), ref_grads = run(case, dilation, False)
    assert y.dtype == new_past.dtype == torch.float32
    torch.testing.assert_close(y, ref_y, **FP32)
    torch.testing.assert_close(new_past, ref_past, **FP32)
    for name, grad, ref in zip(GRAD_NAMES, grads, ref_grads):
        torch.testing.assert_close(grad, ref, **FP32, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("with_past,with_mask", [(True, False), (False, True)], ids=["past", "mask"])
def test_past_and_mask_alone(device, with_past, with_mask):
    case = make_case(2, 7, 2, 24, 4, 3, torch.float32, device, with_past=with_past, with_mask=with_mask, seed=9)
    (y, new_past), grads = run(case, 3, True)
    (ref_y, ref_past), ref_grads = run(case, 3, False)
    torch.testing.assert_close((y, new_past, *grads), (ref_y, ref_past, *ref_grads), **FP32)


@pytest.mark.parametrize("shape", [(2, 7, 4, 24), (2, 67, 1, 40)], ids=shape_id)
def test_triton_matches_naive_bf16(device, shape):
    """bf16 x and past, fp32 weights (as under autocast; the conv runs in bf16 with the kernel rounded to it).
    The forward rounds to bf16 where the specification does (normalised inputs, conv output, y), but Triton's
    interpreter rounds fp32 -> bf16 toward zero (the GPU, like torch, to nearest), so y is within four bf16 ulps
    of its scale (2^-5; seen up to 0.02 on CPU), new_past within two. The backward keeps fp32 where the naive
    one rounds the SiLU's and the conv's backward to bf16: the gradients agree to two ulps of their scale."""
    case = make_case(*shape, 4, 3, torch.bfloat16, device, with_past=True, with_mask=True, seed=sum(shape))
    (y, new_past), grads = run(case, 3, True)
    (ref_y, ref_past), ref_grads = run(case, 3, False)
    assert y.dtype == new_past.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    tolerances = [2 ** -5, 2 ** -6, 2 ** -6, 2 ** -6, 2 ** -6]
    for name, got, ref, tol in zip(["y", "new_past", *GRAD_NAMES], (y, new_past, *grads),
                                   (ref_y, ref_past, *ref_grads), tolerances):
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(got.float(), ref.float(), atol=tol * scale, rtol=2 ** -6,
                                   msg=lambda m: f"{name}: {m}")


def _toward_zero_bf16(v):
    return (v.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)


def _nearest_bf16(v):
    return v.bfloat16().float()


def test_bf16_forward_is_the_specification_with_its_roundings(device):
    """What the tolerance above hides: the bf16 forward is bitwise the specification with each of its three
    fp32 -> bf16 roundings done as the hardware does them (toward zero under the interpreter, to nearest on a
    GPU) and the conv's four bf16 products summed exactly."""
    round_bf16 = _toward_zero_bf16 if device.type == "cpu" else _nearest_bf16
    batch, length, branches, dim = 2, 67, 2, 40
    x, norm_weight, conv_weight, past, mask = make_case(batch, length, branches, dim, 4, 3, torch.bfloat16, device,
                                                        with_past=True, with_mask=True, seed=5)
    with torch.no_grad():
        y, new_past = fused_short_conv(x, norm_weight, conv_weight, 3, EPS, past, mask, force=True)
        normed = torch.nn.functional.rms_norm(x.float(), (dim,), eps=EPS) * norm_weight
        normed = round_bf16(normed) * mask[:, :, None, None]
        window = torch.cat([past.float(), normed.reshape(batch, length, -1).transpose(1, 2)], dim=-1)
        conv = torch.nn.functional.conv1d(window.double(), conv_weight.bfloat16().double(), dilation=3,
                                          groups=branches * dim)
        expected = round_bf16(torch.nn.functional.silu(round_bf16(conv)))
    assert torch.equal(y.float(), expected.transpose(1, 2).reshape(y.shape))
    assert torch.equal(new_past.float(), window[..., -9:])


@pytest.mark.parametrize("with_mask", [False, True], ids=["plain", "mask"])
def test_pieces_equal_whole(device, with_mask):
    """Decoding in chunks, each given the previous chunk's new_past, equals one full run (a 2-token chunk is
    shorter than the window P = 9, so its new_past also carries the previous past's tail)."""
    case = make_case(2, 67, 2, 24, 4, 3, torch.float32, device, with_past=False, with_mask=with_mask, seed=4)
    x, norm_weight, conv_weight, _, mask = case
    with torch.no_grad():
        full_y, full_past = fused_short_conv(x, norm_weight, conv_weight, 3, EPS, None, mask, force=True)
        pieces, past, start = [], None, 0
        for size in (30, 2, 1, 34):
            piece_mask = None if mask is None else mask[:, start:start + size]
            y, past = fused_short_conv(x[:, start:start + size], norm_weight, conv_weight, 3, EPS, past,
                                       piece_mask, force=True)
            pieces.append(y)
            start += size
    assert start == 67
    torch.testing.assert_close(torch.cat(pieces, dim=1), full_y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(past, full_past, atol=1e-6, rtol=1e-6)


def test_dispatch_and_validation(device):
    x, norm_weight, conv_weight, past, mask = make_case(1, 3, 2, 4, 4, 3, torch.float32, device, with_past=True,
                                                        with_mask=True)
    assert "short_conv_fwd" in type(fused_short_conv(x, norm_weight, conv_weight, 3, EPS, force=True)[0]
                                    .grad_fn).__name__
    if device.type == "cpu":  # CPU tensors: naive unless forced
        assert "short_conv_fwd" not in type(fused_short_conv(x, norm_weight, conv_weight, 3, EPS)[0]
                                            .grad_fn).__name__
    with pytest.raises(ValueError, match="past"):
        fused_short_conv(x, norm_weight, conv_weight, 3, EPS, past[..., 1:], force=True)
    with pytest.raises(ValueError, match="token_mask"):
        fused_short_conv(x, norm_weight, conv_weight, 3, EPS, past, mask[:, 1:], force=True)
    with pytest.raises(ValueError, match="norm_weight"):
        fused_short_conv(x, norm_weight[:1], conv_weight, 3, EPS, force=True)


def test_past_gets_no_gradient(device):
    x, norm_weight, conv_weight, past, _ = make_case(1, 3, 1, 4, 4, 3, torch.float32, device, with_past=True,
                                                     with_mask=False)
    past.requires_grad_()
    y, _ = fused_short_conv(x, norm_weight, conv_weight, 3, EPS, past, force=True)
    grads = torch.autograd.grad(y.sum(), (x, past), allow_unused=True)
    assert grads[0] is not None and grads[1] is None


def test_custom_ops_pass_opcheck(device):
    # The ops call the kernels unconditionally: on CPU tensors that needs the interpreter.
    x, norm_weight, conv_weight, past, mask = make_case(1, 3, 2, 5, 2, 1, torch.float32, device, with_past=True,
                                                        with_mask=True)
    torch.library.opcheck(_short_conv_fwd, (x, norm_weight, conv_weight, past, mask, 1, EPS))
    torch.library.opcheck(_short_conv_fwd, (x, norm_weight, conv_weight, None, None, 1, EPS))
    with torch.no_grad():
        _, new_past, rstd = _short_conv_fwd(x, norm_weight, conv_weight, past, mask, 1, EPS)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    torch.library.opcheck(_short_conv_bwd, (grad_y, torch.ones_like(new_past), x.detach(), norm_weight.detach(),
                                            conv_weight.detach(), past, mask, rstd, 1))


def test_compiles_without_graph_breaks(device):
    # aot_eager traces the joint forward+backward graph as inductor does, without inductor's C++ compile.
    x, norm_weight, conv_weight, past, mask = make_case(2, 5, 2, 8, 4, 3, torch.float32, device, with_past=True,
                                                        with_mask=True)

    def loss(x, nw, cw, past, mask):
        y, new_past = fused_short_conv(x, nw, cw, 3, EPS, past, mask, force=True)
        return (y * y).sum() + new_past.sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = (x, norm_weight, conv_weight, past, mask)
    got = torch.autograd.grad(compiled(*inputs), (x, norm_weight, conv_weight))
    expected = torch.autograd.grad(loss(*inputs), (x, norm_weight, conv_weight))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engram.kernels.shortconv import triton_shortconv as k

def build(fn, signature, constexprs, num_warps=4):
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

for dt, (batch, length, branches, dim), (K, DIL) in (("bf16", (4, 4096, 4, 1024), (4, 3)),
                                                     ("fp32", (1, 7, 1, 3), (2, 1))):
    bt, bd, ndc = k._blocks(length, dim)
    cbt, cbd, cndc = k._conv_bwd_blocks(length, dim)
    per_group, _ = k._groups(batch, triton.cdiv(length, cbt))
    nbt, nbd = k._norm_bwd_blocks(length, dim)
    norm_per_group, _ = k._groups(batch, triton.cdiv(length, nbt), k._NORM_WEIGHT_GRAD_ROWS)
    bm = triton.next_power_of_2(branches)
    i32 = "i32"
    xs = {"stride_xb": i32, "stride_xt": i32, "stride_xm": i32}
    ps = {"stride_pb": i32, "stride_pc": i32, "stride_pt": i32}
    shape = {"M": branches, "D": dim}
    conv = {**shape, "K": K, "DIL": DIL, "NDC": ndc, "BLOCK_T": bt, "BLOCK_D": bd}
    for has_mask, has_past in ((False, False), (True, True)):
        build(k._rstd_kernel, {"x_ptr": f"*{dt}", "rstd_ptr": "*fp32", "T": i32, **xs, "eps": "fp32"},
              {**shape, "BLOCK_M": bm, "BLOCK_D": min(triton.next_power_of_2(dim), max(16, 4096 // bm))})
        build(k._fwd_kernel, {"x_ptr": f"*{dt}", "rstd_ptr": "*fp32", "mask_ptr": "*i8", "past_ptr": f"*{dt}",
              "nw_ptr": "*fp32", "cw_ptr": f"*{dt}", "y_ptr": f"*{dt}", "new_past_ptr": f"*{dt}", "T": i32,
              "NT": i32, **xs, **ps}, {**conv, "HAS_MASK": has_mask, "HAS_PAST": has_past})
        build(k._bwd_conv_kernel, {"x_ptr": f"*{dt}", "rstd_ptr": "*fp32", "mask_ptr": "*i8",
              "past_ptr": f"*{dt}", "nw_ptr": "*fp32", "cw_ptr": f"*{dt}", "grad_y_ptr": f"*{dt}",
              "gz_ptr": "*fp32", "partial_cw_ptr": "*fp32", "T": i32, "NG": i32, **xs, **ps,
              "stride_gb": i32, "stride_gt": i32, "stride_gm": i32},
              {**conv, "NDC": cndc, "BLOCK_T": cbt, "BLOCK_D": cbd, "HAS_MASK": has_mask, "HAS_PAST": has_past,
               "TBLOCKS": per_group}, num_warps=k._CONV_BWD_WARPS)
        build(k._bwd_norm_kernel, {"x_ptr": f"*{dt}", "rstd_ptr": "*fp32", "mask_ptr": "*i8", "nw_ptr": "*fp32",
              "cw_ptr": f"*{dt}", "gz_ptr": "*fp32", "grad_past_ptr": f"*{dt}", "grad_x_ptr": f"*{dt}",
              "partial_nw_ptr": "*fp32", "T": i32, "NG": i32, **xs,
              "stride_qb": i32, "stride_qc": i32, "stride_qt": i32},
              {**shape, "K": K, "DIL": DIL, "HAS_MASK": has_mask, "HAS_GRAD_PAST": has_past,
               "TBLOCKS": norm_per_group, "BLOCK_T": nbt, "BLOCK_D": nbd},
              num_warps=k._norm_bwd_warps(nbt, nbd))
"""


def test_kernels_compile_for_an_h200_without_one():
    compile_for_h200(COMPILE_FOR_H200)