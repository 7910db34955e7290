import pytest
import torch
import torch.nn.functional as F

from engram.model.config import MoEConfig
from engram.model.moe import (
    FeedForward,
    MoE,
    grouped_layout,
    grouped_mm_supported,
    grouped_row_align,
    moe_reference,
)

D = 13


def make_moe(seed=0, dtype=torch.float32, d_model=D, **cfg_kwargs):
    cfg = dict(num_experts=7, num_shared_experts=1, top_k=3, expert_dim=9, route_scale=2.5)
    cfg.update(cfg_kwargs)
    torch.manual_seed(seed)
    return MoE(d_model, MoEConfig(**cfg)).to(dtype)


def plain_aux_loss(scores, experts, num_experts, top_k, coef):
    """Sequence-wise balance loss with explicit loops over sequences and experts."""
    batch, length, _ = scores.shape
    total = 0.0
    for b in range(batch):
        probs = scores[b] / scores[b].sum(-1, keepdim=True)
        for i in range(num_experts):
            f_i = num_experts / (top_k * length) * (experts[b] == i).any(-1).sum()
            total = total + f_i * probs[:, i].mean()
    return coef * total / batch


def test_feed_forward_is_swiglu_on_any_leading_shape():
    torch.manual_seed(0)
    ffn = FeedForward(D, 11)
    x = torch.randn(2, 3, 5, D)
    expected = (F.silu(x @ ffn.w1.weight.t()) * (x @ ffn.w3.weight.t())) @ ffn.w2.weight.t()
    torch.testing.assert_close(ffn(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(num_shared_experts=0, top_k=1, route_scale=1.0),
    dict(num_experts=5, num_shared_experts=2, top_k=5),
], ids=["shared1-k3", "noshared-k1", "shared2-k=E"])
@pytest.mark.parametrize("shape", [(3, 7), (1, 1)], ids=["B3T7", "B1T1"])
def test_forward_and_backward_match_reference(cfg, shape):
    moe = make_moe(**cfg)
    x = torch.randn(*shape, D, requires_grad=True)
    grad_out = torch.randn(*shape, D)
    out = moe(x)
    grads = torch.autograd.grad(out, [x, *moe.parameters()], grad_out)
    ref = moe_reference(moe, x)
    ref_grads = torch.autograd.grad(ref, [x, *moe.parameters()], grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    names = ["x", *(name for name, _ in moe.named_parameters())]
    for name, g, rg in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    if moe.cfg.top_k > 1:  # with one expert the normalised gate is constant
        assert grads[names.index("router.weight")].abs().sum() > 0  # the router learns through the gates


def test_forward_matches_reference_bf16():
    moe = make_moe(seed=1, dtype=torch.bfloat16)
    x = torch.randn(3, 7, D).bfloat16()
    out = moe(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), moe_reference(moe, x).float(), atol=3e-2, rtol=3e-2)


def test_gates_sum_to_route_scale_and_use_unbiased_scores():
    moe = make_moe(seed=2)
    moe.expert_bias.copy_(torch.randn(7))
    x = torch.randn(21, D)
    scores, experts, gates = moe.route(x)
    torch.testing.assert_close(gates.sum(-1), torch.full((21,), 2.5))
    chosen = scores.gather(-1, experts)
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True) * 2.5)
    assert torch.equal(experts.sort(-1).values, (scores + moe.expert_bias).topk(3).indices.sort(-1).values)


def test_load_counts_sum_to_tokens_times_top_k():
    moe = make_moe(seed=3)
    x = torch.randn(3, 7, D)
    moe.eval()
    moe(x)
    assert moe.last_load.dtype == torch.long and moe.last_load.sum() == 21 * 3
    experts = moe.route(x.reshape(-1, D))[1]
    assert torch.equal(moe.last_load, torch.bincount(experts.reshape(-1), minlength=7))
    assert moe.load_accum.sum() == 0  # eval forwards do not accumulate
    moe.train()
    moe(x)
    moe(x[:1])
    assert moe.load_accum.sum() == (21 + 7) * 3


def test_update_bias_moves_toward_underloaded_experts_and_changes_selection():
    moe = make_moe(seed=4, bias_update_rate=1.0)
    # Skew the router so the load is clearly unbalanced.
    with torch.no_grad():
        moe.router.weight[0] += 0.5 * moe.router.weight[0].sign()
    x = torch.randn(3, 7, D)
    moe.train()
    moe(x)
    load = moe.load_accum.clone()
    old_experts = moe.route(x.reshape(-1, D))[1]
    assert (load != load.float().mean()).any()
    moe.update_bias()
    expected = torch.sign(load.float().mean() - load.float())
    assert torch.equal(moe.expert_bias, expected)
    assert moe.load_accum.sum() == 0

    under = load.float() < load.float().mean()
    _, new_experts, gates = moe.route(x.reshape(-1, D))
    assert not torch.equal(new_experts, old_experts)
    moe(x)
    assert moe.last_load[under].sum() > load[under].sum()
    assert moe.last_load[~under].sum() < load[~under].sum()
    torch.testing.assert_close(gates.sum(-1), torch.full((21,), 2.5))

    bias = moe.expert_bias.clone()
    moe.load_accum.zero_()
    moe.update_bias()  # nothing accumulated: no change
    assert torch.equal(moe.expert_bias, bias)


def test_bias_is_not_updated_by_forward():
    moe = make_moe(seed=5)
    moe.train()
    moe(torch.randn(2, 5, D))
    assert torch.equal(moe.expert_bias, torch.zeros(7))
    assert "expert_bias" in moe.state_dict() and not moe.expert_bias.requires_grad


def test_dropless_when_every_token_picks_the_same_expert():
    moe = make_moe(seed=6)
    moe.expert_bias[4] = 1e4
    x = torch.randn(3, 7, D, requires_grad=True)
    out = moe(x)
    assert moe.last_load[4] == 21 and moe.last_load.sum() == 21 * 3
    torch.testing.assert_close(out, moe_reference(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("coef", [1e-2, 0.3], ids=["coef1e-2", "coef0.3"])
def test_aux_loss_matches_plain_loop_and_has_grad(coef):
    moe = make_moe(seed=7, seq_aux_loss_coef=coef)
    moe.expert_bias.copy_(torch.randn(7) * 0.1)
    moe.train()
    x = torch.randn(3, 7, D)
    moe(x)
    loss = moe.aux_loss
    assert loss is not None and loss.dim() == 0 and loss.item() > 0 and loss.requires_grad
    scores, experts, _ = moe.route(x.reshape(-1, D))
    expected = plain_aux_loss(scores.view(3, 7, 7), experts.view(3, 7, 3), 7, 3, coef)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, moe.router.weight)
    assert grad.abs().sum() > 0


def test_aux_loss_is_none_when_disabled_or_in_eval():
    moe = make_moe(seed=8, seq_aux_loss_coef=0.0)
    x = torch.randn(2, 5, D)
    moe.train()
    moe(x)
    assert moe.aux_loss is None
    moe = make_moe(seed=8, seq_aux_loss_coef=0.1)
    moe.train()
    moe(x)
    assert moe.aux_loss is not None
    moe.eval()
    moe(x)
    assert moe.aux_loss is None


def test_reset_parameters_gives_finite_values_and_clears_bias():
    moe = make_moe(seed=9)
    moe.expert_bias.fill_(0.3)
    moe.load_accum.fill_(2)
    with torch.no_grad():
        moe.w2.fill_(float("nan"))
    moe.reset_parameters()
    assert all(torch.isfinite(p).all() for p in moe.parameters())
    assert moe.w1.abs().max() <= 1 / D ** 0.5 and moe.w2.abs().max() <= 1 / 9 ** 0.5
    assert torch.equal(moe.expert_bias, torch.zeros(7)) and moe.load_accum.sum() == 0


@pytest.mark.parametrize("shape", [(21, D), (3, 7, D + 1), (1, 3, 7, D)], ids=["2d", "wrong-dim", "4d"])
def test_wrong_input_shapes_raise(shape):
    moe = make_moe()
    with pytest.raises(ValueError, match=r"MoE expects x of shape \[B, T, 13\]"):
        moe(torch.randn(*shape))


# --- grouped-GEMM experts -------------------------------------------------------------------------------

DG = 16  # d_model whose rows are 16-byte aligned in fp32 and bf16, as grouped GEMMs need
CPU = torch.device("cpu")
# torch runs _grouped_mm on CPU tensors from 2.12 on (2.11, on the GPU machine, has it for CUDA only)
needs_cpu_grouped = pytest.mark.skipif(not grouped_mm_supported(CPU, torch.float32),
                                       reason=f"torch {torch.__version__} has no CPU grouped GEMM")
GROUPED_BF16_DEVICES = [
    pytest.param("cpu", marks=needs_cpu_grouped),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and grouped_mm_supported(torch.device("cuda"), torch.bfloat16)),
        reason="no CUDA GPU with bf16 grouped GEMMs (Hopper)")),
]


def make_grouped_moe(seed, **cfg_kwargs):
    cfg = dict(num_experts=5, expert_dim=8)
    cfg.update(cfg_kwargs)
    return make_moe(seed=seed, d_model=DG, **cfg)


def out_and_grads(moe, x, grad_out, impl, autocast=False):
    """(output, grads of x and every parameter, last_load) of one forward with ``experts_impl=impl``."""
    if impl != "reference":
        moe.experts_impl = impl
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = moe(x) if impl != "reference" else moe_reference(moe, x)
    grads = torch.autograd.grad(out, [x, *moe.parameters()], grad_out)
    return out, grads, None if impl == "reference" else moe.last_load.clone()


def grad_names(moe):
    return ["x", *(name for name, _ in moe.named_parameters())]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_cpu_grouped
@pytest.mark.parametrize("top_k", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("shape", [(3, 7), (1, 1)], ids=["B3T7", "B1T1"])
def test_grouped_and_loop_experts_match_reference_fp32(top_k, shape):
    moe = make_grouped_moe(seed=10, top_k=top_k)
    moe.expert_bias[1] = -1e4  # expert 1 gets no token: an empty group
    x = torch.randn(*shape, DG, requires_grad=True)
    grad_out = torch.randn(*shape, DG)
    assert moe.experts_backend(CPU, torch.float32) == "grouped"
    grouped, loop, ref = (out_and_grads(moe, x, grad_out, impl) for impl in ("grouped", "loop", "reference"))
    assert grouped[2][1] == 0 and grouped[2].sum() == x.shape[0] * x.shape[1] * top_k
    assert torch.equal(grouped[2], loop[2])
    for name, (out, grads, _) in (("grouped", grouped), ("loop", loop)):
        torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} output: {m}")
        for param, g, rg in zip(grad_names(moe), grads, ref[1]):
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} grad of {param}: {m}")
    assert all(g.abs().sum() > 0 for g, p in zip(grouped[1], grad_names(moe)) if p != "router.weight" or top_k > 1)


@pytest.mark.parametrize("device", GROUPED_BF16_DEVICES)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-weights"])
def test_grouped_experts_match_loop_and_reference_in_bf16(autocast, device):
    moe = make_grouped_moe(seed=11, num_experts=6).to(device)
    if not autocast:
        moe = moe.bfloat16()
    x = torch.randn(3, 7, DG, dtype=torch.float32 if autocast else torch.bfloat16, device=device,
                    requires_grad=True)
    grad_out = torch.randn_like(x)
    assert moe.experts_backend(x.device, torch.bfloat16) == "grouped"
    grouped, loop, ref = (out_and_grads(moe, x, grad_out, impl, autocast)
                          for impl in ("grouped", "loop", "reference"))
    assert grouped[0].dtype == x.dtype and torch.equal(grouped[2], loop[2])
    for name, (out, grads, _) in (("grouped", grouped), ("loop", loop)):
        assert rel_err(out, ref[0]) < 1e-2, name
        for param, g, rg in zip(grad_names(moe), grads, ref[1]):
            assert rel_err(g, rg) < 2e-2, f"{name} grad of {param}"
    # The grouped and looped matmuls round alike: far closer to each other than to the fp32 twin.
    assert rel_err(grouped[0], loop[0]) < 5e-3


@pytest.mark.parametrize("align", [1, 4, 8])
@pytest.mark.parametrize("pairs", [1, 21, 40])
def test_grouped_layout_puts_each_expert_in_one_aligned_group(align, pairs):
    torch.manual_seed(pairs)
    num_experts = 5
    pair_expert = torch.randint(0, num_experts - 1, (pairs,))  # the last expert never chosen
    counts = torch.bincount(pair_expert, minlength=num_experts)
    slots, offsets, rows = grouped_layout(pair_expert, counts, align)
    assert rows % align == 0 and rows == -(-(pairs + min(num_experts, pairs) * (align - 1)) // align) * align
    assert offsets.dtype == torch.int32 and offsets[-1] == rows  # the tail belongs to the last group
    assert torch.equal(slots.unique(), slots.sort().values) and slots.max() < rows  # distinct rows
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).long()
    for e in range(num_experts):
        mine = slots[pair_expert == e]  # in pair order
        assert starts[e] % align == 0 and offsets[e] - starts[e] >= counts[e]
        assert torch.equal(mine, starts[e] + torch.arange(counts[e]))


@needs_cpu_grouped
def test_padding_rows_compute_exact_zeros_and_huge_tokens_stay_their_own(monkeypatch):
    real_grouped_mm = torch._grouped_mm
    calls = []

    def spy(a, b, offs):
        out = real_grouped_mm(a, b, offs=offs)
        calls.append((a.detach(), out.detach()))
        return out

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    moe = make_grouped_moe(seed=13)
    x = torch.randn(3, 7, DG)
    x[0, 0] *= 1e30  # overflows inside its own experts
    x.requires_grad_(True)
    grad_out = torch.randn_like(x)
    grouped = out_and_grads(moe, x, grad_out, "grouped")
    assert len(calls) == 3  # w1, w3, w2
    padding = (calls[0][0] == 0).all(-1)  # buffer rows that hold no (token, expert) pair
    assert padding.sum() > 0 and not torch.isfinite(calls[2][1]).all()
    for _, out in calls:
        assert torch.equal(out[padding], torch.zeros_like(out[padding]))
    loop = out_and_grads(moe, x, grad_out, "loop")
    others = torch.ones(3, 7, dtype=torch.bool)
    others[0, 0] = False
    assert torch.isfinite(grouped[0][others]).all() and torch.isfinite(grouped[1][0][others]).all()
    torch.testing.assert_close(grouped[0][others], loop[0][others], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped[1][0][others], loop[1][0][others], atol=1e-5, rtol=1e-5)


@needs_cpu_grouped
def test_grouped_experts_decode_under_no_grad_in_eval():
    moe = make_grouped_moe(seed=14, top_k=2).eval()
    x = torch.randn(4, 1, DG)
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out, moe_reference(moe, x), atol=1e-5, rtol=1e-5)
    assert moe.last_load.sum() == 4 * 2 and moe.load_accum.sum() == 0


@needs_cpu_grouped
def test_grouped_moe_compiles_to_one_graph_for_different_routings():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    moe = make_grouped_moe(seed=15, seq_aux_loss_coef=0.1).train()

    def loss_fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe(x)
        return out.float().square().mean() + moe.aux_loss, moe.last_load

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    loads = []
    for seed in (0, 1):
        x = torch.randn(3, 7, DG, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        loss, load = compiled(x)
        grads = torch.autograd.grad(loss, [x, *moe.parameters()])
        eager_loss, eager_load = loss_fn(x)
        eager_grads = torch.autograd.grad(eager_loss, [x, *moe.parameters()])
        torch.testing.assert_close(loss, eager_loss)
        assert torch.equal(load, eager_load)
        for name, g, eg in zip(grad_names(moe), grads, eager_grads):
            torch.testing.assert_close(g, eg, msg=lambda m: f"grad of {name}: {m}")
        loads.append(load)
    assert not torch.equal(loads[0], loads[1])  # another routing, same graph
    assert counter.frame_count == 1
    assert moe.load_accum.sum() == 2 * 2 * 21 * moe.cfg.top_k  # compiled and eager forwards both counted


@needs_cpu_grouped
def test_grouped_gemms_need_bf16_under_compile():
    def sign(x):
        return x + 1 if grouped_mm_supported(x.device, x.dtype) else x - 1

    compiled = torch.compile(sign, backend="eager", fullgraph=True)
    assert grouped_mm_supported(CPU, torch.float32) and grouped_mm_supported(CPU, torch.bfloat16)
    assert compiled(torch.zeros(2)).tolist() == [-1.0, -1.0]  # torch.compile's shape function wants bf16
    assert compiled(torch.zeros(2, dtype=torch.bfloat16)).tolist() == [1.0, 1.0]


@needs_cpu_grouped
def test_auto_picks_grouped_gemms_only_where_they_fit(monkeypatch):
    real_grouped_mm = torch._grouped_mm
    calls = []
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: calls.append(1) or real_grouped_mm(a, b, offs=offs))
    moe = make_grouped_moe(seed=16)
    moe(torch.randn(2, 3, DG))
    assert len(calls) == 3  # w1, w3, w2
    moe.experts_impl = "loop"
    moe(torch.randn(2, 3, DG))
    odd = make_moe(seed=16)  # d_model 13, expert_dim 9: rows not 16-byte aligned
    assert odd.experts_backend(CPU, torch.float32) == "loop"
    odd(torch.randn(2, 3, D))
    assert len(calls) == 3
    odd.experts_impl = "grouped"
    with pytest.raises(ValueError, match="multiples of 4, got 13 and 9"):
        odd(torch.randn(2, 3, D))
    assert grouped_row_align(torch.bfloat16) == 8 and grouped_row_align(torch.float32) == 4


def test_bad_experts_impl_raises():
    with pytest.raises(ValueError, match="experts_impl must be one of .* got 'fast'"):
        MoE(D, MoEConfig(), experts_impl="fast")
    moe = make_moe()
    with pytest.raises(ValueError, match="got 'gpu'"):
        moe.experts_impl = "gpu"
    assert moe.experts_impl == "auto"


def test_balancing_bias_breaks_a_router_that_sends_every_token_to_one_expert():
    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(num_experts=16, num_shared_experts=1, top_k=3, expert_dim=16, bias_update_rate=1e-2))
    with torch.no_grad():
        moe.router.weight[0] += 3.0  # expert 0 scores highest for every (positive) input
    x = torch.randn(2, 64, 32).abs()
    imbalance = []
    for _ in range(60):
        moe(x)
        load = moe.last_load.float()
        imbalance.append(float(load.max() / load.mean()))
        moe.update_bias()
    assert imbalance[0] == pytest.approx(16 / 3)  # the ceiling: every token sends one of its 3 picks to expert 0
    assert max(imbalance[-10:]) < 1.5
