"""mHC hyper-connections: Sinkhorn projection, vectorised forward vs loop reference, init, grads, dtypes."""

from __future__ import annotations

import pytest
import torch
from lm_helpers import small_config
from torch import nn

from engram.model import EngramLM
from engram.model.hyper_connections import (
    HyperConnection,
    StreamMerge,
    expand_streams,
    hyper_connection_reference,
    sinkhorn_knopp,
)

D = 12  # odd-ish width, not a power of two


def _make_hc(m: int, d: int = D, seed: int = 0, bias_std: float = 0.3, alpha: float = 0.5) -> HyperConnection:
    """A HyperConnection moved away from init so that every coefficient is non-trivial."""
    torch.manual_seed(seed)
    hc = HyperConnection(hc_mult=m, d_model=d)
    with torch.no_grad():
        hc.alpha.copy_(torch.tensor([alpha, -alpha, 2 * alpha]))
        hc.bias.normal_(0.0, bias_std)
    return hc


def _sublayer(d: int = D, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, d), nn.Tanh())


def _assert_doubly_stochastic(p: torch.Tensor, row_atol: float = 1e-3) -> None:
    assert p.dtype == torch.float32
    assert torch.isfinite(p).all() and (p >= 0).all()
    ones = torch.ones(p.shape[:-1])
    torch.testing.assert_close(p.sum(-2), ones, atol=1e-5, rtol=0)  # last step normalises columns
    torch.testing.assert_close(p.sum(-1), ones, atol=row_atol, rtol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7], ids=lambda m: f"M{m}")
def test_sinkhorn_doubly_stochastic_moderate_logits(m: int) -> None:
    torch.manual_seed(m)
    p = sinkhorn_knopp(torch.randn(5, 3, m, m) * 0.5, iters=20)
    assert p.shape == (5, 3, m, m)
    _assert_doubly_stochastic(p)


@pytest.mark.parametrize("m", [2, 3, 4], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sinkhorn_large_logits_are_safe_and_converge(m: int, dtype: torch.dtype) -> None:
    torch.manual_seed(10 + m)
    logits = (torch.randn(64, m, m) * 20).to(dtype)
    logits[0, 0, 0] = 500.0  # exp overflows without the row-max shift
    logits[1, :, 0] = -500.0  # a whole column underflows to 0 in fp32 exp
    # 20 rounds: finite, non-negative, columns exact; rows only loosely (O(1/iters) regime).
    _assert_doubly_stochastic(sinkhorn_knopp(logits, iters=20), row_atol=0.2)
    _assert_doubly_stochastic(sinkhorn_knopp(logits, iters=3000), row_atol=1e-3)


def test_sinkhorn_matches_closed_form_for_2x2() -> None:
    # exp([[a, 0], [0, a]]) balances to [[q, 1-q], [1-q, q]] with q = e^a / (e^a + 1).
    a = torch.tensor([-1.3, 0.0, 0.7])
    logits = torch.stack([torch.stack([a, torch.zeros(3)], -1), torch.stack([torch.zeros(3), a], -1)], -2)
    q = torch.sigmoid(a)
    expected = torch.stack([torch.stack([q, 1 - q], -1), torch.stack([1 - q, q], -1)], -2)
    torch.testing.assert_close(sinkhorn_knopp(logits, iters=20), expected, atol=1e-5, rtol=0)


def test_sinkhorn_is_differentiable() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 3, requires_grad=True)
    (sinkhorn_knopp(logits, iters=20) * torch.randn(4, 3, 3)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(("shape", "iters"), [((3, 4), 20), ((4,), 20), ((2, 2), 0)],
                         ids=["not-square", "1d", "zero-iters"])
def test_sinkhorn_rejects_bad_input(shape: tuple[int, ...], iters: int) -> None:
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(shape), iters=iters)


@pytest.mark.parametrize("m", [1, 2, 4], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("t", [1, 7], ids=lambda t: f"T{t}")
def test_forward_matches_reference(m: int, t: int) -> None:
    hc, sub = _make_hc(m), _sublayer()
    torch.manual_seed(2)
    streams = torch.randn(3, t, m, D) * 1.7
    out = hc(streams, sub)
    assert out.shape == (3, t, m, D) and out.dtype == torch.float32
    torch.testing.assert_close(out, hyper_connection_reference(hc, streams, sub), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m", [2, 3, 4], ids=lambda m: f"M{m}")
def test_coefficients_ranges_and_doubly_stochastic_h_res(m: int) -> None:
    hc = _make_hc(m)
    torch.manual_seed(3)
    h_pre, h_post, h_res = hc.coefficients(torch.randn(2, 5, m, D))
    assert h_pre.shape == h_post.shape == (2, 5, m) and h_res.shape == (2, 5, m, m)
    assert h_pre.dtype == h_post.dtype == torch.float32
    assert ((h_pre > 0) & (h_pre < 1)).all() and ((h_post > 0) & (h_post < 2)).all()
    _assert_doubly_stochastic(h_res)
    assert h_res.std() > 1e-3  # bias moved it away from uniform, so the check above is not vacuous


@pytest.mark.parametrize("m", [1, 2, 4], ids=lambda m: f"M{m}")
def test_init_coefficients(m: int) -> None:
    hc = _make_hc(m)
    hc.reset_parameters()
    assert torch.equal(hc.alpha, torch.full((3,), 0.01)) and torch.equal(hc.bias, torch.zeros(m * m + 2 * m))
    assert hc.phi.abs().sum() > 0 and abs(hc.phi.std().item() - 0.02) < 0.005
    torch.manual_seed(4)
    h_pre, h_post, h_res = hc.coefficients(torch.randn(2, 9, m, D) * 5)
    torch.testing.assert_close(h_pre, torch.full_like(h_pre, 0.5), atol=0.05, rtol=0)
    torch.testing.assert_close(h_post, torch.full_like(h_post, 1.0), atol=0.05, rtol=0)
    torch.testing.assert_close(h_res, torch.full_like(h_res, 1.0 / m), atol=0.05, rtol=0)


def test_identical_streams_at_init_pass_the_embedding_through() -> None:
    # h_res doubly stochastic and identical streams: X' = X + h_post * y, and u = (sum h_pre) * x.
    hc = HyperConnection(hc_mult=4, d_model=D)
    torch.manual_seed(5)
    x = torch.randn(2, 3, D)
    out = hc(expand_streams(x, 4), lambda u: torch.zeros_like(u))
    torch.testing.assert_close(out, x.unsqueeze(-2).expand(-1, -1, 4, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("m", [1, 3], ids=lambda m: f"M{m}")
def test_gradients_reach_every_parameter_and_input(m: int) -> None:
    hc, sub = _make_hc(m), _sublayer()
    torch.manual_seed(6)
    streams = torch.randn(2, 5, m, D, requires_grad=True)
    (hc(streams, sub) * torch.randn(2, 5, m, D)).sum().backward()
    named = [("streams", streams), *(("hc." + n, p) for n, p in hc.named_parameters()),
             *(("sub." + n, p) for n, p in sub.named_parameters())]
    for name, tensor in named:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name
    # Each of pre, post, res gains is used; with M = 1 h_res is the constant 1, so alpha[2] gets none.
    assert (hc.alpha.grad[:2] != 0).all() and (hc.alpha.grad[2] != 0) == (m > 1)


@pytest.mark.parametrize("m", [2, 4], ids=lambda m: f"M{m}")
def test_bf16_streams(m: int) -> None:
    hc = _make_hc(m)
    weight = _sublayer()[0].weight.detach()
    sub = lambda u: torch.tanh(u @ weight.to(u.dtype))  # noqa: E731 - follows the input dtype
    torch.manual_seed(7)
    streams = torch.randn(2, 5, m, D)
    out16 = hc(streams.bfloat16(), sub)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    torch.testing.assert_close(out16.float(), hc(streams, sub), atol=0.05, rtol=0.02)


def test_forward_does_not_modify_streams() -> None:
    hc, sub = _make_hc(2), _sublayer()
    torch.manual_seed(8)
    streams = torch.randn(2, 3, 2, D)
    before = streams.clone()
    hc(streams, sub)
    assert torch.equal(streams, before)


@pytest.mark.parametrize("shape", [(2, 3, 3, D), (2, 3, 2, D + 1), (3, 2, D), (1, 2, 3, 2, D)],
                         ids=["wrong-M", "wrong-D", "3d", "5d"])
def test_wrong_stream_shapes_raise(shape: tuple[int, ...]) -> None:
    hc, merge = _make_hc(2), StreamMerge(hc_mult=2, d_model=D)
    streams = torch.randn(shape)
    with pytest.raises(ValueError, match="streams must have shape"):
        hc(streams, torch.tanh)
    with pytest.raises(ValueError, match="streams must have shape"):
        hc.coefficients(streams)
    with pytest.raises(ValueError, match="streams must have shape"):
        merge(streams)


def test_wrong_sublayer_output_raises() -> None:
    with pytest.raises(ValueError, match="sublayer must return shape"):
        _make_hc(2)(torch.randn(2, 3, 2, D), lambda u: u[..., :-1])


@pytest.mark.parametrize(("kwargs", "bad"), [
    (dict(hc_mult=0), "hc_mult"), (dict(d_model=0), "d_model"), (dict(sinkhorn_iters=0), "sinkhorn_iters"),
    (dict(eps=0.0), "eps"), (dict(init_std=-1.0), "init_std"),
], ids=["M0", "D0", "iters0", "eps0", "std-neg"])
def test_bad_constructor_args_raise(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        HyperConnection(**{"hc_mult": 2, "d_model": D, **kwargs})
    if bad != "sinkhorn_iters":
        with pytest.raises(ValueError, match=bad):
            StreamMerge(**{"hc_mult": 2, "d_model": D, **kwargs})


def test_expand_streams() -> None:
    torch.manual_seed(9)
    x = torch.randn(2, 5, D)
    streams = expand_streams(x, 3)
    assert streams.shape == (2, 5, 3, D)
    assert all(torch.equal(streams[:, :, i], x) for i in range(3))
    summed = streams + 1.0
    assert torch.equal(summed[:, :, 1], x + 1.0)
    with pytest.raises(RuntimeError):  # in-place writes into the shared view are refused, never aliased
        streams.add_(1.0)
    with pytest.raises(ValueError, match="hc_mult"):
        expand_streams(x, 0)
    with pytest.raises(ValueError, match="x must have shape"):
        expand_streams(x[0], 2)


@pytest.mark.parametrize("m", [1, 3], ids=lambda m: f"M{m}")
def test_stream_merge_matches_loop_and_has_gradients(m: int) -> None:
    torch.manual_seed(10)
    merge = StreamMerge(hc_mult=m, d_model=D)
    with torch.no_grad():
        merge.alpha.fill_(0.7)
        merge.bias.normal_(0.0, 0.5)
    streams = torch.randn(2, 7, m, D, requires_grad=True)
    out = merge(streams)
    assert out.shape == (2, 7, D) and out.dtype == torch.float32

    flat = streams.detach().reshape(2, 7, m * D)
    rms = (flat.pow(2).sum(-1, keepdim=True) / (m * D) + merge.eps).sqrt()
    w = torch.sigmoid(merge.alpha * (flat @ merge.phi) / rms + merge.bias)
    expected = sum(w[..., i : i + 1] * streams.detach()[:, :, i] for i in range(m))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    (out * torch.randn(2, 7, D)).sum().backward()
    for name, tensor in [("streams", streams), *merge.named_parameters()]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0, name


def test_stream_merge_init_and_bf16() -> None:
    merge = StreamMerge(hc_mult=4, d_model=D)
    with torch.no_grad():
        merge.bias.fill_(3.0)
    merge.reset_parameters()
    assert torch.equal(merge.alpha, torch.full((1,), 0.01)) and torch.equal(merge.bias, torch.zeros(4))
    torch.manual_seed(11)
    streams = torch.randn(2, 5, 4, D)
    w = merge.weights(streams)
    torch.testing.assert_close(w, torch.full_like(w, 0.5), atol=0.05, rtol=0)
    out16 = merge(streams.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), merge(streams), atol=0.03, rtol=0.02)


def _values_and_grads(fn, inputs: list[torch.Tensor], params: list[torch.Tensor], seed: int):
    out = fn(*inputs)
    incoming = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out * incoming).sum(), [*inputs, *params])
    return out.detach(), grads


@pytest.mark.parametrize("m", [1, 3, 4], ids=lambda m: f"M{m}")
def test_compiled_stream_mixing_matches_eager(m: int) -> None:
    """Under torch.compile the streams are mixed by broadcast multiply-adds, eager by a batched matmul: the
    HyperConnection and StreamMerge forwards and gradients agree, traced in one graph."""
    from engram.model.hyper_connections import mix_streams

    hc, sub, merge = _make_hc(m), _sublayer(), StreamMerge(hc_mult=m, d_model=D)
    with torch.no_grad():
        merge.alpha.fill_(0.7)
        merge.bias.normal_(0.0, 0.5)
    torch.manual_seed(11)
    streams = torch.randn(2, 5, m, D, requires_grad=True)

    def network(x: torch.Tensor) -> torch.Tensor:
        return merge(hc(x, sub))

    params = [*hc.parameters(), *sub.parameters(), *merge.parameters()]
    eager = _values_and_grads(network, [streams], params, seed=12)
    torch._dynamo.reset()
    compiled = _values_and_grads(torch.compile(network, backend="aot_eager", fullgraph=True), [streams], params, 12)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    weights, x = torch.randn(2, 5, 3, m), torch.randn(2, 5, m, D)
    traced = torch.compile(mix_streams, backend="aot_eager", fullgraph=True)(weights, x)
    torch.testing.assert_close(traced, weights @ x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stream_dtype", ["autocast", "float32"])
def test_model_stream_dtype_under_autocast(stream_dtype: str) -> None:
    """Under bf16 autocast an mHC model carries its streams in bf16 (``hc_stream_dtype="autocast"``, the default)
    or in fp32; both give the same loss within bf16 rounding, and the fp32 choice is the model outside autocast."""
    torch.manual_seed(0)
    model = EngramLM(small_config(hc_stream_dtype=stream_dtype))
    reference = EngramLM(small_config(hc_stream_dtype="float32"))
    reference.load_state_dict(model.state_dict())
    seen: list[torch.dtype] = []
    hooks = [block.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype)) for block in model.blocks]
    ids = torch.randint(0, 128815, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
        reference_loss = reference(ids, labels=ids).loss
    for hook in hooks:
        hook.remove()
    expected = torch.bfloat16 if stream_dtype == "autocast" else torch.float32
    assert seen == [expected] * len(model.blocks)
    torch.testing.assert_close(loss, reference_loss, atol=2e-2, rtol=0)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert model(ids).logits.dtype == torch.float32


def test_bad_stream_dtype_raises() -> None:
    with pytest.raises(ValueError, match="hc_stream_dtype.*'fp16'"):
        small_config(hc_stream_dtype="fp16")
