import math

import pytest
import torch

from engram.model.attention import Attention, KVCache, RotaryEmbedding, attention_reference
from engram.model.config import EngramLMConfig


def make_cfg(n_heads=6, n_kv_heads=2, head_dim=10, d_model=22):
    return EngramLMConfig(vocab_size=50, d_model=d_model, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads,
                          head_dim=head_dim, max_position_embeddings=64, ffn_kinds=["dense"], moe=None)


def make_attention(seed=0, dtype=torch.float32, **cfg_kwargs):
    torch.manual_seed(seed)
    return Attention(make_cfg(**cfg_kwargs)).to(dtype)


def left_padded(lengths, total):
    """Key padding mask [B, total] with each row's real tokens at the end, and their positions [B, total]."""
    mask = torch.stack([torch.arange(total) >= total - n for n in lengths])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return mask, positions


def rope_complex(x, positions, theta):
    """RoPE as a complex rotation of the pairs (x_i, x_{i+hd/2}) by angle pos * theta^(-2i/hd)."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions.double()[:, None, :, None] * freq  # [B, 1, T, hd/2]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def reference_forward(attn, x, positions, key_padding_mask=None):
    """Attention.forward spelled out: projections, RoPE, repeated KV heads, explicit causal mask, plain softmax."""
    b, t, _ = x.shape
    h, kv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.rotary(attn.q_proj(x).view(b, t, h, hd).transpose(1, 2), positions)
    k = attn.rotary(attn.k_proj(x).view(b, t, kv, hd).transpose(1, 2), positions)
    v = attn.v_proj(x).view(b, t, kv, hd).transpose(1, 2)
    k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    out = attention_reference(q, k, v, mask)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, h * hd))


@pytest.mark.parametrize("head_dim,theta", [(10, 10000.0), (6, 500.0)], ids=["hd10", "hd6-theta500"])
def test_rope_matches_complex_rotation_and_keeps_norms(head_dim, theta):
    torch.manual_seed(1)
    rope = RotaryEmbedding(head_dim, theta, max_positions=64)
    x = torch.randn(3, 2, 7, head_dim)
    positions = torch.randint(0, 64, (3, 7))
    out = rope(x, positions)
    torch.testing.assert_close(out.double(), rope_complex(x, positions, theta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_rope_dot_product_depends_only_on_position_difference():
    torch.manual_seed(2)
    rope = RotaryEmbedding(8, 10000.0, max_positions=64)
    q, k = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    q_pos, k_pos = torch.tensor([[0, 3, 4, 9, 11]]), torch.tensor([[2, 2, 5, 8, 1]])
    dots = [rope(q, q_pos + s) @ rope(k, k_pos + s).transpose(-1, -2) for s in (0, 7, 30)]
    for other in dots[1:]:
        torch.testing.assert_close(other, dots[0], atol=1e-5, rtol=1e-5)
    # ...and it does depend on the difference
    assert not torch.allclose(rope(q, q_pos) @ rope(k, k_pos + 1).transpose(-1, -2), dots[0], atol=1e-3)


def test_rope_frequencies_stay_fp32_after_dtype_and_meta_moves():
    expected = RotaryEmbedding(10, 500.0, 64).inv_freq
    assert torch.equal(RotaryEmbedding(10, 500.0, 64).to(torch.bfloat16).inv_freq, expected)
    with torch.device("meta"):
        meta = RotaryEmbedding(10, 500.0, 64)
    assert torch.equal(meta.to_empty(device="cpu").inv_freq, expected)


def test_rope_bf16_returns_bf16_close_to_fp32():
    torch.manual_seed(3)
    rope = RotaryEmbedding(10, 10000.0, max_positions=64)
    x = torch.randn(2, 3, 5, 10)
    positions = torch.randint(0, 64, (2, 5))
    out = rope(x.bfloat16(), positions)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rope(x, positions), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(6, 2), (3, 3), (4, 1)], ids=["gqa3", "mha", "mqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_sdpa_matches_reference_fp32(n_heads, n_kv_heads, padded):
    attn = make_attention(n_heads=n_heads, n_kv_heads=n_kv_heads)
    x = torch.randn(3, 7, 22)
    if padded:
        mask, positions = left_padded([7, 4, 1], 7)
    else:
        mask, positions = None, torch.arange(7).expand(3, 7)
    out = attn(x, positions, key_padding_mask=mask)
    ref = reference_forward(attn, x, positions, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_matches_reference_bf16():
    attn = make_attention(dtype=torch.bfloat16)
    x = torch.randn(3, 7, 22).bfloat16()
    mask, positions = left_padded([7, 5, 2], 7)
    out = attn(x, positions, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_forward(attn, x, positions, mask).float(), atol=3e-2, rtol=3e-2)


def test_attention_reference_zero_for_rows_without_keys():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    out = attention_reference(q, k, v, mask)
    assert torch.equal(out[:, :, 0], torch.zeros(1, 2, 4))
    torch.testing.assert_close(out[:, :, 1], v[:, :, 0])
    probs = (q[:, :, 2:] @ k.transpose(-1, -2) / math.sqrt(4)).softmax(-1)
    torch.testing.assert_close(out[:, :, 2:], probs @ v)


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1], [9]], ids=["one-by-one", "chunks-4-1-3-1", "one-chunk"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_kv_cache_decoding_matches_full_forward(chunks, padded):
    attn = make_attention(seed=5)
    x = torch.randn(3, 9, 22)
    if padded:
        mask, positions = left_padded([9, 6, 2], 9)
    else:
        mask, positions = None, torch.arange(9).expand(3, 9)
    full = attn(x, positions, key_padding_mask=mask)
    cache = KVCache(num_layers=2, batch_size=3, max_length=11, num_kv_heads=2, head_dim=10,
                    dtype=torch.float32, device="cpu")
    outs = []
    for size in chunks:
        start = cache.seq_len
        step_mask = None if mask is None else mask[:, :start + size]
        outs.append(attn(x[:, start:start + size], positions[:, start:start + size], key_padding_mask=step_mask,
                         cache=cache, layer_idx=1))
        assert cache.seq_len == start  # update() does not advance
        cache.advance(size)
    stepped = torch.cat(outs, dim=1)
    assert torch.isfinite(stepped).all()
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_padded_rows_finite_and_real_tokens_independent_of_padding():
    attn = make_attention(seed=6)
    real = torch.randn(1, 5, 22)
    unpadded = attn(real, torch.arange(5)[None])
    for pad in (1, 3, 6):
        x = torch.cat([torch.randn(1, pad, 22) * 5, real], dim=1)
        mask, positions = left_padded([5], pad + 5)
        out = attn(x, positions, key_padding_mask=mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, pad:], unpadded, atol=1e-5, rtol=1e-5)


def test_padded_rows_have_finite_gradients():
    attn = make_attention(seed=7)
    x = torch.randn(2, 6, 22, requires_grad=True)
    mask, positions = left_padded([6, 2], 6)
    attn(x, positions, key_padding_mask=mask).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_kv_cache_overflow_and_shape_errors():
    cache = KVCache(1, 2, max_length=5, num_kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu")
    k = torch.randn(2, 1, 3, 4)
    cache.update(0, k, k)
    cache.advance(3)
    with pytest.raises(ValueError, match="3 stored \\+ 3 new = 6 tokens > max_length=5"):
        cache.update(0, k, k)
    with pytest.raises(ValueError, match="max_length=5"):
        cache.advance(3)
    with pytest.raises(ValueError, match="layer_idx"):
        cache.update(1, k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="KVCache expects"):
        cache.update(0, torch.randn(2, 1, 1, 5), torch.randn(2, 1, 1, 5))
    k_all, _ = cache.update(0, k[:, :, :2], k[:, :, :2])
    assert k_all.shape == (2, 1, 5, 4) and torch.equal(k_all[:, :, 3:], k[:, :, :2])


def test_attention_shape_errors():
    attn = make_attention()
    with pytest.raises(ValueError, match="Attention expects"):
        attn(torch.randn(2, 3, 21), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(torch.randn(2, 3, 22), torch.zeros(2, 3, dtype=torch.long),
             key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        attn(torch.randn(2, 3, 22), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(7, 10000.0, 16)
