import pytest
import torch
import torch.nn.functional as F

from engram.model.config import MoEConfig
from engram.model.moe import FeedForward, MoE, moe_reference

D = 13


def make_moe(seed=0, dtype=torch.float32, **cfg_kwargs):
    cfg = dict(num_experts=7, num_shared_experts=1, top_k=3, expert_dim=9, route_scale=2.5)
    cfg.update(cfg_kwargs)
    torch.manual_seed(seed)
    return MoE(D, MoEConfig(**cfg)).to(dtype)


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
