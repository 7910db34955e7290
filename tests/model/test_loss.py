"""The chunked linear + cross-entropy loss against its plain twin (values and gradients), and its memory."""

import pytest
import torch

from engram.model.loss import default_chunk_size, linear_cross_entropy, linear_cross_entropy_reference

N, D, V, CHUNK = 37, 16, 101, 8  # N not a multiple of the chunk, V odd


def inputs(seed: int = 0, ignored: tuple[int, ...] = (3, *range(8, 16), 36)):
    """Random hidden [N, D], weight [V, D] and targets [N] with ``ignored`` positions at -100 (8..15: a whole
    chunk)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) / D**0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[list(ignored)] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, reduction, autocast=False, device="cpu"):
    """``fn``'s loss and the gradients of hidden and weight under a random incoming gradient (on the CPU)."""
    hidden, weight = hidden.clone().to(device).requires_grad_(), weight.clone().to(device).requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(hidden, weight, targets.to(device), reduction=reduction)
    incoming = torch.rand(loss.shape, generator=torch.Generator().manual_seed(9)) + 0.5
    (loss * incoming.to(device)).sum().backward()
    return loss.detach().cpu(), hidden.grad.cpu(), weight.grad.cpu()


def chunked(hidden, weight, targets, reduction):
    return linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=CHUNK)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_plain_path_in_fp32(reduction):
    hidden, weight, targets = inputs()
    got = loss_and_grads(chunked, hidden, weight, targets, reduction)
    want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, reduction)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[1][8:16].abs().max() == 0 and got[1][:8].abs().max() > 0  # the ignored chunk gets no gradient


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)  # CUDA: Triton rows kernel and the fp32-output addmm
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_plain_path_under_bf16_autocast(reduction, device):
    hidden, weight, targets = inputs(seed=1)
    got = loss_and_grads(chunked, hidden, weight, targets, reduction, autocast=True, device=device)
    want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, reduction, autocast=True,
                          device=device)
    fp32 = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, reduction)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # the same bf16 logits, fp32 softmax
    for a, b, exact in zip(got[1:], want[1:], fp32[1:]):
        assert a.dtype == torch.float32
        scale = exact.abs().max()
        assert (a - b).abs().max() <= 2**-7 * scale  # within bf16 rounding of the plain autocast path
        assert (b - exact).abs().max() > 2**-12 * scale  # while both do differ from fp32: autocast took effect


def test_tied_weight_gradients_sum_both_uses():
    hidden, weight, targets = inputs(seed=2)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (chunked, linear_cross_entropy_reference):
        table = weight.clone().requires_grad_()
        states = torch.nn.functional.embedding(ids, table) + hidden  # the embedding read, then the readout
        fn(states, table, targets, reduction="mean").backward()
        grads.append(table.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_every_target_ignored_matches_cross_entropy():
    hidden, weight, targets = inputs(seed=4, ignored=tuple(range(N)))
    got = loss_and_grads(chunked, hidden, weight, targets, "mean")
    want = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, "mean")
    assert torch.isnan(got[0]) and torch.isnan(want[0])  # a mean over no token
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b)
    assert float(chunked(hidden, weight, targets, "sum")) == 0.0


def test_no_grad_path_matches_and_needs_no_gradient():
    hidden, weight, targets = inputs(seed=5)
    with torch.no_grad():
        losses = chunked(hidden.requires_grad_(), weight, targets, "none")
    assert losses.grad_fn is None
    torch.testing.assert_close(losses, linear_cross_entropy_reference(hidden, weight, targets, reduction="none"),
                               rtol=1e-5, atol=1e-6)


def test_only_the_inputs_that_need_it_get_a_gradient():
    hidden, weight, targets = inputs(seed=6)
    frozen = weight.clone()
    hidden.requires_grad_()
    chunked(hidden, frozen, targets, "sum").backward()
    assert frozen.grad is None and hidden.grad is not None


def test_ignore_index_outside_the_vocabulary():
    hidden, weight, targets = inputs(seed=7, ignored=())
    targets[::3] = 1000
    got = linear_cross_entropy(hidden, weight, targets, ignore_index=1000, chunk_size=CHUNK)
    torch.testing.assert_close(got, linear_cross_entropy_reference(hidden, weight, targets, ignore_index=1000))


def test_bad_arguments_are_named():
    hidden, weight, targets = inputs()
    targets[5] = V
    with pytest.raises(ValueError, match=f"target {V} is outside \\[0, {V}\\)"):
        linear_cross_entropy(hidden, weight, targets)
    with pytest.raises(ValueError, match="reduction must be one of .* got 'avg'"):
        linear_cross_entropy(hidden, weight, targets.clamp(max=0), reduction="avg")
    with pytest.raises(ValueError, match="targets must be int64 \\[N\\] = \\[37\\], got torch.int32"):
        linear_cross_entropy(hidden, weight, targets.int())
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        linear_cross_entropy(hidden, weight, targets.clamp(max=0), chunk_size=0)
    with pytest.raises(ValueError, match=r"hidden must be \[N, D\] and weight \[V, D\], got \(37, 16\) and \(101, 8\)"):
        linear_cross_entropy(hidden, weight[:, :8], targets)


def test_default_chunk_bounds_the_logits():
    assert default_chunk_size(129_280) == 4096  # 2^29 / V = 4,152 tokens, rounded down to a multiple of 64
    assert default_chunk_size(101) * 101 <= 2**29
    assert default_chunk_size(2**30) == 1


def test_backward_keeps_no_token_by_vocabulary_tensor():
    hidden, weight, targets = inputs(seed=8)
    for reduction in ("sum", "none"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = chunked(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets, reduction)
        assert saved and max(saved) < N * V, reduction  # largest: the weight's gradient [V, D]
        loss.sum().backward()
    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy_reference(hidden.requires_grad_(), weight, targets)
    assert max(plain) >= N * V  # what the check would see on the plain path


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_traces_into_one_graph_under_torch_compile(reduction):
    # aot_eager traces the forward and backward graphs as inductor would without compiling C++ (slow on CPU)
    hidden, weight, targets = inputs(seed=10)
    compiled = torch.compile(chunked, fullgraph=True, backend="aot_eager")
    for autocast in (False, True):
        got = loss_and_grads(compiled, hidden, weight, targets, reduction, autocast)
        want = loss_and_grads(chunked, hidden, weight, targets, reduction, autocast)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# The model's loss path: EngramLM.forward(labels= / targets=) through the op, never the [B, T, V] logits.

def tiny_lm(**overrides):
    from engram.model import EngramLM
    from lm_helpers import small_config

    torch.manual_seed(0)
    return EngramLM(small_config(**overrides)).train()


def token_ids(batch=3, length=17, seed=1):
    return torch.randint(3, 128_815, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False])
def test_model_labels_loss_equals_cross_entropy_on_the_logits(tie):
    model = tiny_lm(tie_embeddings=tie, hc_mult=1, use_moe=False)
    ids = token_ids()
    labels = ids.clone()
    labels[0, 5:9] = -100
    out = model(ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(ids).logits  # the formula forward(labels=) used before: the full logits, shifted
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    for a, (name, p) in zip(got, model.named_parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_model_targets_reductions_and_logits_on_request():
    model = tiny_lm().eval()
    ids = token_ids(seed=2)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    with torch.no_grad():
        logits = model(ids).logits
        per_token = model(ids, targets=targets, loss_reduction="none")
        both = model(ids, targets=targets, return_logits=True)
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    assert per_token.logits is None and per_token.loss.shape == ids.shape
    torch.testing.assert_close(per_token.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.logits, logits)
    torch.testing.assert_close(both.loss, want.sum() / (targets != -100).sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels .* or targets .* not both"):
        model(ids, labels=ids, targets=targets)
    with pytest.raises(ValueError, match=r"targets must match input_ids \(3, 17\), got \(3, 16\)"):
        model(ids, targets=targets[:, 1:])
    with pytest.raises(ValueError, match="pass logits_to_keep=0"):
        model(ids, targets=targets, logits_to_keep=1)


def test_model_training_forward_keeps_no_logits_for_backward():
    model = tiny_lm()
    ids = token_ids()
    batch_vocab = ids.numel() * model.cfg.vocab_size
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(ids, labels=ids).loss
    assert max(saved) < batch_vocab  # the largest is the tied embedding's gradient [V, D]
    loss.backward()


def test_trainer_loss_goes_through_the_model():
    from engram.train.trainer import lm_loss

    model = tiny_lm(hc_mult=1).eval()
    ids, targets = token_ids(seed=3), token_ids(seed=4)
    with torch.no_grad():
        logits = model(ids).logits.flatten(0, 1)
        for reduction in ("mean", "sum", "none"):
            loss, _ = lm_loss(model, ids, targets, autocast=False, reduction=reduction)
            want = torch.nn.functional.cross_entropy(logits, targets.flatten(), reduction=reduction)
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
