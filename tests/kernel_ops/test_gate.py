"""The Triton Engram gate against its naive twin (on the GPU, or on CPU through Triton's interpreter without one;
``device`` and TRITON_INTERPRET come from conftest.py), and the naive twin against the gate inside
``Engram.forward``."""

import pytest
import torch


from engram import Engram, EngramConfig, NgramHasher  # noqa: E402
from engram.kernels.gate import fused_gate  # noqa: E402
from engram.kernels.gate.naive import GATE_FLOOR, naive_gate  # noqa: E402
from kernel_ops.conftest import compile_for_h200  # noqa: E402

CFG = EngramConfig(engram_vocab_size=[211, 307], n_embed_per_ngram=24, n_head_per_ngram=3, layer_ids=[2, 5])
FP32_EPS = torch.finfo(torch.float32).eps


def random_inputs(batch, length, branches, dim, dtype, seed, device, clamped_branch=None):
    """Random keys, hidden, value, norm weights; with ``clamped_branch``, that branch's score is +2e-7 at every
    token, below the gate's clamp: its query is made orthogonal to its key, then nudged along the key (a
    positive score, as the gate jumps at 0), and its norm weights are small to shrink the fp32 rounding.
    Built on CPU, then moved to ``device``: the same values on any device."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, length, branches, dim, generator=gen)
    hidden = torch.randn(batch, length, branches, dim, generator=gen) * 2 + 0.5
    value = torch.randn(batch, length, dim, generator=gen)
    key_weight = 1 + 0.5 * torch.rand(branches, dim, generator=gen)
    query_weight = 1 + 0.5 * torch.rand(branches, dim, generator=gen)
    if clamped_branch is not None:
        key_weight[clamped_branch] *= 0.1
        query_weight[clamped_branch] *= 0.1
        k = (keys[:, :, clamped_branch] * key_weight[clamped_branch]).double()
        q = (hidden[:, :, clamped_branch] * query_weight[clamped_branch]).double()
        q = q - (q * k).sum(-1, keepdim=True) / (k * k).sum(-1, keepdim=True) * k
        rstd_k = keys[:, :, clamped_branch].double().pow(2).mean(-1, keepdim=True).rsqrt()
        rstd_q = (q / query_weight[clamped_branch]).pow(2).mean(-1, keepdim=True).rsqrt()
        q = q + 2e-7 * dim ** 0.5 / (rstd_k * rstd_q * (k * k).sum(-1, keepdim=True)) * k
        hidden[:, :, clamped_branch] = (q / query_weight[clamped_branch]).float()
    tensors = (keys.to(dtype), hidden.to(dtype), value.to(dtype), key_weight, query_weight)
    return tuple(t.to(device).requires_grad_() for t in tensors)


def score_of(keys, hidden, key_weight, query_weight):
    dim = keys.shape[-1]
    nk = torch.nn.functional.rms_norm(keys.detach().float(), (dim,)) * key_weight.detach()
    nq = torch.nn.functional.rms_norm(hidden.detach().float(), (dim,)) * query_weight.detach()
    return (nk * nq).sum(-1) / dim ** 0.5


def forward_backward(inputs, force, seed):
    gated, gates = fused_gate(*inputs, force=force)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_gated = torch.randn(gated.shape, generator=gen).to(gated.dtype).to(gated.device)
    grad_gates = torch.randn(gates.shape, generator=gen).to(gates.device)
    grads = torch.autograd.grad((gated, gates), inputs, (grad_gated, grad_gates))
    return (gated, gates), grads


SHAPES = [(1, 1, 1, 3), (1, 7, 4, 24), (2, 7, 4, 40), (1, 7, 1, 40)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}M{}D{}".format(*s))
def test_triton_matches_naive_fp32(device, shape):
    branches = shape[2]
    inputs = random_inputs(*shape, torch.float32, seed=sum(shape), device=device, clamped_branch=branches - 1)
    score = score_of(*inputs[:2], *inputs[3:])
    torch.testing.assert_close(score[:, :, -1], torch.full_like(score[:, :, -1], 2e-7), atol=2e-8, rtol=0)
    assert (score[:, :, :-1].abs() > 2 * GATE_FLOOR).all()  # no score sits on the clamp's edge
    (gated, gates), grads = forward_backward(inputs, True, seed=0)
    (ref_gated, ref_gates), ref_grads = forward_backward(inputs, False, seed=0)
    assert gated.dtype == torch.float32 and gates.dtype == torch.float32
    assert ((gates > 0) & (gates < 1)).all()
    torch.testing.assert_close(gates, ref_gates, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gated, ref_gated, atol=1e-5, rtol=1e-5)
    for name, grad, ref in zip(["keys", "hidden", "value", "key_weight", "query_weight"], grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    # Below the clamp the gate is constant in the score: no gradient reaches that branch's key or query.
    assert grads[0][:, :, -1].abs().max() == 0 and grads[1][:, :, -1].abs().max() == 0


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "B{}T{}M{}D{}".format(*s))
def test_triton_matches_naive_bf16(device, shape):
    """bf16 inputs, fp32 weights: the Triton path reduces in fp32 where the naive backward reduces in bf16, so the
    two agree to a few bf16 ulps of each tensor's scale. Triton's interpreter rounds fp32 -> bf16 toward zero
    (the GPU rounds to nearest, as torch does), so gated, the bf16 product of the bf16-rounded gate and the value,
    can be off by two ulps on CPU (the tolerances hold for both)."""
    inputs = random_inputs(*shape, torch.bfloat16, seed=sum(shape), device=device)
    (gated, gates), grads = forward_backward(inputs, True, seed=1)
    (ref_gated, ref_gates), ref_grads = forward_backward(inputs, False, seed=1)
    assert gated.dtype == torch.bfloat16 and gates.dtype == torch.float32
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]
    torch.testing.assert_close(gates, ref_gates, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gated, ref_gated, atol=0, rtol=2 ** -6)
    for name, grad, ref in zip(["keys", "hidden", "value", "key_weight", "query_weight"], grads, ref_grads):
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(grad.float(), ref.float(), atol=2e-2 * scale, rtol=2e-2,
                                   msg=lambda m: f"d{name}: {m}")


def test_strided_inputs_and_custom_eps(device):
    """Keys and value as slices of one projection (as in Engram.forward), an explicit eps, a gradient through
    the gates only."""
    gen = torch.Generator().manual_seed(3)
    batch, length, branches, dim = 2, 3, 2, 24
    projected = torch.randn(batch, length, (1 + branches) * dim, generator=gen).to(device).requires_grad_()
    hidden = torch.randn(batch, length, branches, dim, generator=gen).to(device).requires_grad_()
    weights = ((torch.rand(branches, dim, generator=gen) + 0.5).to(device).requires_grad_(),
               torch.ones(branches, dim, device=device))
    outputs = []
    for force in (True, False):
        value, keys = projected[..., :dim], projected[..., dim:].unflatten(-1, (branches, dim))
        gated, gates = fused_gate(keys, hidden, value, *weights, key_eps=1e-3, query_eps=None, force=force)
        outputs.append((gated, *torch.autograd.grad(gates.sum(), (projected, hidden, weights[0]))))
    for actual, expected in zip(*outputs):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_eps_1e20_on_tiny_inputs(device):
    """DeepSeek-V4.1's RMSNorm eps, 1e-20, reaches the kernel as it reaches the naive twin: keys and hidden states
    scaled by 1e-6 still normalise to unit RMS in both paths (fp32's machine epsilon would swamp them), so the
    gates equal those of the unscaled inputs; the gradients agree too."""
    inputs = random_inputs(2, 5, 4, 40, torch.float32, seed=8, device=device)
    tiny = [t.detach().clone() for t in inputs]
    tiny[0][:, 1:3] *= 1e-6
    tiny[1][:, 2:4] *= 1e-6
    tiny = [t.requires_grad_() for t in tiny]
    gen = torch.Generator().manual_seed(9)
    grad_gated, grad_gates = torch.randn(tiny[0].shape, generator=gen), torch.randn(tiny[0].shape[:-1], generator=gen)
    outputs = []
    for force in (True, False):
        gated, gates = fused_gate(*tiny, key_eps=1e-20, query_eps=1e-20, force=force)
        loss = (gated * grad_gated.to(device)).sum() + (gates * grad_gates.to(device)).sum()
        outputs.append((gated, gates, *torch.autograd.grad(loss, tiny)))
    for actual, expected in zip(*outputs):
        torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
    unscaled = fused_gate(*inputs, key_eps=1e-20, query_eps=1e-20, force=True)[1]
    torch.testing.assert_close(outputs[0][1], unscaled, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(fused_gate(*tiny, force=True)[1], unscaled, atol=1e-2)  # eps=None: fp32's epsilon


@pytest.mark.parametrize("force", [True, False], ids=["triton", "naive"])
def test_score_exactly_zero(device, force):
    """A score of exactly 0 (branches 0 and 1, keys +1 and -1): the demo's sign(0) = 0 gives gate 0.5;
    DeepSeek-V4.1's engines take the sign as +1 there, so ``zero_positive`` gives sigmoid(+sqrt(1e-6)) = 0.50025.
    Scores of +-3.4e-7, below the clamp, keep their sign either way; no gradient reaches the inputs."""
    dim, nudge = 8, 2.0 ** -20
    signs = torch.tensor([1.0, -1.0]).repeat(dim // 2)
    keys = torch.stack([torch.ones(dim), -torch.ones(dim), torch.ones(dim), torch.ones(dim)])  # [M=4, D]
    hidden = torch.stack([signs, signs, signs, signs])
    hidden[2, 0] += nudge  # score +2^-20 / sqrt(8)
    hidden[3, 0] -= nudge  # score -2^-20 / sqrt(8)
    keys, hidden = keys.expand(2, 3, 4, dim).to(device), hidden.expand(2, 3, 4, dim).to(device).requires_grad_()
    value = torch.randn(2, 3, dim, generator=torch.Generator().manual_seed(0)).to(device)
    weights = (torch.ones(4, dim, device=device), torch.ones(4, dim, device=device))
    root = torch.tensor(GATE_FLOOR).sqrt()
    below_clamp = torch.sigmoid(torch.stack([root, -root])).expand(2, 3, 2)
    for zero_positive, at_zero in ((False, torch.tensor(0.5)), (True, torch.sigmoid(root))):
        gated, gates = fused_gate(keys, hidden, value, *weights, 1e-20, 1e-20, zero_positive=zero_positive,
                                  force=force)
        torch.testing.assert_close(gates[..., :2].cpu(), at_zero.expand(2, 3, 2), atol=1e-7, rtol=0)
        torch.testing.assert_close(gates[..., 2:].cpu(), below_clamp, atol=1e-7, rtol=0)
        assert torch.equal(gated, gates[..., None] * value[:, :, None])
        (grad,) = torch.autograd.grad(gates.sum(), hidden)
        assert grad.abs().max() == 0
    assert torch.sigmoid(root).item() == pytest.approx(0.50025, abs=1e-7)


@pytest.fixture(scope="module")
def hasher(deepseek_ct):
    return NgramHasher(CFG, tokenizer=deepseek_ct)


def test_naive_is_the_gate_of_engram_forward(hasher, device):
    # Engram.forward on CPU (its naive path: on CUDA it would take the Triton gate); the fused gate on device.
    torch.manual_seed(0)
    dim, branches = 24, 4
    layer = Engram(CFG, 5, dim, branches, hasher=hasher)
    with torch.no_grad():
        layer.key_norm.weight.normal_()
        layer.query_norm.weight.normal_()
    ids = torch.randint(0, 128_815, (2, 7), generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 7, branches, dim)
    captured = {}
    layer.short_conv.register_forward_pre_hook(lambda module, args: captured.setdefault("gated", args[0]))
    _, gates = layer(hidden, input_ids=ids, return_gates=True)

    projected = layer.value_key_proj(layer.memory(hasher.hash(ids, 5)))
    value, keys = projected[..., :dim], projected[..., dim:].unflatten(-1, (branches, dim))
    norms = layer.key_norm.weight, layer.query_norm.weight, layer.key_norm.eps, layer.query_norm.eps
    ref_gated, ref_gates = naive_gate(keys, hidden, value, *norms)
    assert torch.equal(ref_gated, captured["gated"]) and torch.equal(ref_gates, gates)
    fused = fused_gate(*(t.to(device) for t in (keys, hidden, value, *norms[:2])), *norms[2:], force=True)
    torch.testing.assert_close(fused, (ref_gated.to(device), ref_gates.to(device)), atol=1e-5, rtol=1e-5)


def test_dispatch(device):
    inputs = random_inputs(1, 2, 2, 8, torch.float32, seed=5, device=device)
    assert "gate_fwd" in type(fused_gate(*inputs, force=True)[0].grad_fn).__name__
    cpu_inputs = random_inputs(1, 2, 2, 8, torch.float32, seed=5, device="cpu")
    assert "gate_fwd" not in type(fused_gate(*cpu_inputs)[0].grad_fn).__name__  # CPU tensors: naive unless forced
    if device.type == "cuda":  # CUDA tensors: Triton by default
        assert "gate_fwd" in type(fused_gate(*inputs)[0].grad_fn).__name__
    with pytest.raises(ValueError, match="fused_gate"):
        fused_gate(inputs[0], inputs[1], inputs[2][..., :-1], *inputs[3:])


def test_opcheck(device):
    # The op calls the kernels unconditionally: on CPU tensors that needs the interpreter, so on a GPU machine
    # it is checked on the GPU.
    inputs = random_inputs(1, 3, 2, 5, torch.float32, seed=6, device=device)
    torch.library.opcheck(torch.ops.engram.gate_fwd.default, (*inputs, FP32_EPS, 1e-5, True))


COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engram.kernels.gate import triton_gate as k
from engram.kernels.gate.naive import GATE_FLOOR

for dtype, branches, dim, zero_positive in (("bf16", 4, 1024, False), ("fp32", 1, 40, True), ("bf16", 4, 256, True)):
    block_m, block_d = k._blocks(branches, dim, k._TILE)
    constexprs = {"M": branches, "D": dim, "FLOOR": GATE_FLOOR, "ZERO_POSITIVE": zero_positive, "BLOCK_M": block_m,
                  "BLOCK_D": block_d}
    pointers = {name: f"*{dtype}" for name in ("keys_ptr", "hidden_ptr", "value_ptr", "gated_ptr")}
    pointers.update({name: "*fp32" for name in ("wk_ptr", "wq_ptr", "gates_ptr", "rstd_k_ptr", "rstd_q_ptr",
                                                "score_ptr")})
    scalars = {**{name: "i64" for name in ("stride_kn", "stride_km", "stride_hn", "stride_hm", "stride_vn")},
               **{name: "fp32" for name in ("key_eps", "query_eps", "sqrt_dim")}}
    signature = {**pointers, **scalars, **dict.fromkeys(constexprs, "constexpr")}
    triton.compile(ASTSource(k._gate_fwd_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8})
"""


def test_forward_kernel_compiles_for_an_h200_without_one():
    """The compiled gate kernel, V4.1's sign at a zero score included, lowers to sm_90 (no GPU needed)."""
    compile_for_h200(COMPILE_FOR_H200)
