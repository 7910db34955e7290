import math

import pytest
import torch
from torch import nn

from engram import Engram, EngramConfig, NgramHasher, convert_demo_state_dict


class ReferenceShortConv(nn.Module):
    """docs/design.md §4's short convolution in the demo's layout: per-branch nn.RMSNorm, symmetric padding then
    truncation."""

    def __init__(self, dim, branches, kernel, dilation):
        super().__init__()
        channels = dim * branches
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=False,
                              padding=(kernel - 1) * dilation, dilation=dilation)
        self.norms = nn.ModuleList([nn.RMSNorm(dim, eps=1e-5) for _ in range(branches)])

    def forward(self, x):
        length = x.shape[1]
        normed = torch.cat([norm(x[:, :, m]) for m, norm in enumerate(self.norms)], dim=-1)
        y = torch.nn.functional.silu(self.conv(normed.transpose(1, 2))[..., :length])
        return y.transpose(1, 2).reshape(x.shape)


class ReferenceEngram(nn.Module):
    """docs/design.md §3-4 with one module per branch and a Python loop over branches (the plain twin)."""

    def __init__(self, cfg, table_rows, dim, branches):
        super().__init__()
        self.branches = branches
        self.multi_head_embedding = nn.Module()
        self.multi_head_embedding.embedding = nn.Embedding(table_rows, cfg.head_dim)
        self.value_proj = nn.Linear(cfg.memory_dim, dim)
        self.key_projs = nn.ModuleList([nn.Linear(cfg.memory_dim, dim) for _ in range(branches)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(dim) for _ in range(branches)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(dim) for _ in range(branches)])
        self.short_conv = ReferenceShortConv(dim, branches, cfg.kernel_size, cfg.max_ngram_size)

    def forward(self, hidden, flat_rows):
        memory = self.multi_head_embedding.embedding(flat_rows).flatten(-2)
        gates = []
        for m in range(self.branches):
            dot = (self.norm1[m](self.key_projs[m](memory)) * self.norm2[m](hidden[:, :, m])).sum(-1)
            g = dot / math.sqrt(hidden.shape[-1])
            gates.append(torch.sigmoid(g.abs().clamp_min(1e-6).sqrt() * g.sign()))
        gates = torch.stack(gates, dim=2)
        value = gates.unsqueeze(-1) * self.value_proj(memory).unsqueeze(2)
        return value + self.short_conv(value), gates


CFG = EngramConfig(engram_vocab_size=[211, 307], n_embed_per_ngram=24, n_head_per_ngram=3, layer_ids=[2, 5])


@pytest.fixture(scope="module")
def hasher(deepseek_ct):
    return NgramHasher(CFG, tokenizer=deepseek_ct)


def random_ids(batch, length, seed=0):
    return torch.randint(0, 128_815, (batch, length), generator=torch.Generator().manual_seed(seed))


def paired_modules(hasher, dim, branches, seed=0):
    torch.manual_seed(seed)
    layer = Engram(CFG, 5, dim, branches, hasher=hasher)
    ref = ReferenceEngram(CFG, layer.multi_head_embedding.num_rows, dim, branches)
    with torch.no_grad():  # random norm weights and conv kernel so that nothing is trivially one or zero
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 1.0))
    layer.load_state_dict(convert_demo_state_dict(ref.state_dict(), branches))
    return layer, ref


@pytest.mark.parametrize("branches", [1, 4], ids=["plain", "mhc4"])
@pytest.mark.parametrize("length", [1, 7, 63], ids=lambda t: f"T{t}")
def test_matches_reference_fp32(hasher, branches, length):
    dim = 40
    layer, ref = paired_modules(hasher, dim, branches)
    ids = random_ids(2, length)
    hidden = torch.randn(2, length, branches, dim, requires_grad=True)
    delta, gates = layer(hidden, input_ids=ids, return_gates=True)
    flat_rows = layer.multi_head_embedding.flat_row_ids(hasher.hash(ids, 5))
    ref_delta, ref_gates = ref(hidden, flat_rows)
    torch.testing.assert_close(gates, ref_gates, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-4, atol=1e-5)

    upstream = torch.randn_like(delta)
    grads = torch.autograd.grad((delta * upstream).sum(), [hidden, layer.multi_head_embedding.weight])
    ref_grads = torch.autograd.grad((ref_delta * upstream).sum(), [hidden, ref.multi_head_embedding.embedding.weight])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_plain_residual_takes_3d_input(hasher):
    layer = Engram(CFG, 2, 16, hc_mult=1, hasher=hasher)
    hidden = torch.randn(3, 5, 16)
    ids = random_ids(3, 5)
    out = layer(hidden, input_ids=ids)
    assert out.shape == (3, 5, 16)
    torch.testing.assert_close(out, layer(hidden.unsqueeze(2), input_ids=ids).squeeze(2))


def test_precomputed_hash_ids_give_same_output(hasher):
    layer = Engram(CFG, 2, 16, hc_mult=4, hasher=hasher)
    hidden, ids = torch.randn(2, 9, 4, 16), random_ids(2, 9, seed=1)
    hash_ids = hasher.hash_all(ids)[2]
    torch.testing.assert_close(layer(hidden, hash_ids=hash_ids), layer(hidden, input_ids=ids), rtol=0, atol=0)


def test_gates_in_unit_interval_and_zero_conv_is_identity(hasher):
    layer = Engram(CFG, 2, 16, hc_mult=4, hasher=hasher, conv_zero_init=True)
    hidden, ids = torch.randn(2, 6, 4, 16), random_ids(2, 6, seed=2)
    delta, gates = layer(hidden, input_ids=ids, return_gates=True)
    assert gates.shape == (2, 6, 4) and bool(((gates > 0) & (gates < 1)).all())
    value = layer.value_key_proj(layer.memory(hasher.hash(ids, 2)))[..., :16]
    torch.testing.assert_close(delta, gates.unsqueeze(-1) * value.unsqueeze(2))


def test_causal(hasher):
    layer = Engram(CFG, 5, 16, hc_mult=4, hasher=hasher)
    torch.nn.init.normal_(layer.short_conv.conv.weight)
    hidden, ids = torch.randn(1, 20, 4, 16), random_ids(1, 20, seed=3)
    base = layer(hidden, input_ids=ids)
    hidden2, ids2 = hidden.clone(), ids.clone()
    hidden2[:, 12:] = torch.randn(1, 8, 4, 16)
    ids2[:, 12:] = random_ids(1, 8, seed=4)
    changed = layer(hidden2, input_ids=ids2)
    torch.testing.assert_close(changed[:, :12], base[:, :12], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 12:], base[:, 12:])


def test_bf16_autocast_close_to_fp32(hasher):
    layer = Engram(CFG, 5, 32, hc_mult=4, hasher=hasher, table_init_std=0.5)
    hidden, ids = torch.randn(2, 11, 4, 32), random_ids(2, 11, seed=5)
    full = layer(hidden, input_ids=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, gates = layer(hidden, input_ids=ids, return_gates=True)
    assert half.dtype == torch.bfloat16 and gates.dtype == torch.float32
    torch.testing.assert_close(half.float(), full, rtol=5e-2, atol=5e-2)
    half.float().sum().backward()
    assert layer.multi_head_embedding.weight.grad is not None


def test_sparse_table_gradient(hasher):
    layer = Engram(CFG, 2, 16, hc_mult=4, hasher=hasher, sparse=True)
    hidden, ids = torch.randn(2, 5, 4, 16), random_ids(2, 5, seed=6)
    layer(hidden, input_ids=ids).sum().backward()
    grad = layer.multi_head_embedding.weight.grad.coalesce()
    rows = set(grad.indices()[0].tolist())
    expected = set(layer.multi_head_embedding.flat_row_ids(hasher.hash(ids, 2)).flatten().tolist())
    assert rows == expected


def test_errors(hasher):
    with pytest.raises(ValueError, match=r"layer_id 3 is not in cfg.layer_ids \[2, 5\]"):
        Engram(CFG, 3, 16, hasher=hasher)
    layer = Engram(CFG, 2, 16, hc_mult=4, hasher=hasher)
    with pytest.raises(ValueError, match=r"must be \[B, T, 4, D\] for hc_mult=4"):
        layer(torch.randn(1, 3, 16), input_ids=random_ids(1, 3))
    with pytest.raises(ValueError, match=r"must be \[B, T, 4, 16\], got shape \(1, 3, 4, 8\)"):
        layer(torch.randn(1, 3, 4, 8), input_ids=random_ids(1, 3))
    with pytest.raises(ValueError, match="needs input_ids, hash_ids or memory"):
        layer(torch.randn(1, 3, 4, 16))
    with pytest.raises(ValueError, match="disagree on"):
        layer(torch.randn(1, 3, 4, 16), input_ids=random_ids(1, 4))
    with pytest.raises(ValueError, match=r"memory \(1, 4, 32\) and hidden_states \(1, 3, 4, 16\) disagree"):
        layer(torch.randn(1, 3, 4, 16), memory=torch.randn(1, 4, 32))


def test_prefetched_memory_equals_reading_in_the_layer(hasher):
    layer = Engram(CFG, 2, 16, hc_mult=4, hasher=hasher)
    hidden, ids = torch.randn(2, 5, 4, 16), random_ids(2, 5)
    memory = layer.multi_head_embedding.fetch(hasher.hash(ids, 2)).wait()
    assert torch.equal(layer(hidden, memory=memory), layer(hidden, input_ids=ids))


@pytest.mark.parametrize("ids, match", [
    (torch.zeros(0, 3, dtype=torch.long), r"input_ids is an empty batch of shape \(0, 3\)"),
    (torch.tensor([[5, 6, 7]], dtype=torch.uint8), "input_ids has dtype torch.uint8.*int32 or int64"),
], ids=["empty", "uint8"])
def test_bad_input_ids_are_refused(hasher, ids, match):
    layer = Engram(CFG, 2, 16, hc_mult=4, hasher=hasher)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(*ids.shape, 4, 16), input_ids=ids)
