"""Causal grouped-query self-attention with rotary positions and a preallocated KV cache.

Positions are given per row (``[B, T]``) so that left-padded batches rotate every real token by its
position within its own sequence. Keys that are padding are never attended; a query that can see
only padding (a left-pad slot) outputs zeros instead of NaN.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engram.model.config import EngramLMConfig


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., hd]`` -> ``[..., hd]``: ``(x1, x2) -> (-x2, x1)`` on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE, rotate-half convention: dim ``i`` pairs with dim ``i + hd/2`` at frequency ``theta^(-2i/hd)``.

    ``max_positions`` is recorded for the caller, which validates sequence lengths once per forward;
    checking position values here would cost a host sync in every layer.
    """

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RoPE head_dim must be even and >= 2, got {head_dim}")
        if theta <= 0:
            raise ValueError(f"RoPE theta must be > 0, got {theta}")
        if max_positions < 1:
            raise ValueError(f"RoPE max_positions must be >= 1, got {max_positions}")
        self.head_dim = head_dim
        self.theta = theta
        self.max_positions = max_positions
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> torch.Tensor:
        """``[hd/2]`` fp32 ``theta^(-2i/hd)``."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryEmbedding:
        # .to(bfloat16) would round the frequencies and to_empty() (meta-device init) would leave garbage:
        # recompute them in fp32 on the new device after any such move.
        module = super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.inv_freq.device)
        return module

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[B, H, T, hd]`` by ``positions`` ``[B, T]`` (int); returns ``[B, H, T, hd]`` in x's dtype."""
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE expects x of shape [B, H, T, {self.head_dim}], got {tuple(x.shape)}")
        if positions.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"RoPE positions must have shape [B, T] = {(x.shape[0], x.shape[2])}, "
                             f"got {tuple(positions.shape)}")
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.float()  # [B, T, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
        xf = x.float()
        return (xf * angles.cos() + _rotate_half(xf) * angles.sin()).to(x.dtype)


class KVCache:
    """Per-layer key/value storage ``[B, KV, max_length, hd]`` for incremental decoding.

    Every layer writes its new entries with :meth:`update` at ``[seq_len, seq_len + T)``; the model then
    calls :meth:`advance` once, so all layers of one step see the same ``seq_len``. ``conv_states`` holds
    the Engram ShortConv inputs of the last positions per Engram layer (see ``Engram.forward``).
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_length", max_length),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"KVCache {name} must be >= 1, got {value}")
        self.max_length = max_length
        self.seq_len = 0
        self.conv_states: dict[int, torch.Tensor] = {}
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``[B, KV, T, hd]``; return every stored entry ``[B, KV, seq_len + T, hd]`` (views).

        Does not advance ``seq_len``.
        """
        if not 0 <= layer_idx < self.keys.shape[0]:
            raise ValueError(f"KVCache layer_idx must be in [0, {self.keys.shape[0]}), got {layer_idx}")
        expected = self.keys.shape[1:3] + self.keys.shape[4:]
        if k.dim() != 4 or k.shape != v.shape or k.shape[:2] + k.shape[3:] != expected:
            raise ValueError(f"KVCache expects k and v of shape [B, KV, T, hd] with (B, KV, hd) = {tuple(expected)}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        end = self.seq_len + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KVCache overflow: {self.seq_len} stored + {k.shape[2]} new = {end} tokens "
                             f"> max_length={self.max_length}")
        self.keys[layer_idx, :, :, self.seq_len:end] = k
        self.values[layer_idx, :, :, self.seq_len:end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, n: int) -> None:
        """Count ``n`` more stored tokens (call once per model step, after every layer's :meth:`update`)."""
        if n < 0:
            raise ValueError(f"KVCache.advance needs n >= 0, got {n}")
        if self.seq_len + n > self.max_length:
            raise ValueError(f"KVCache overflow: {self.seq_len} stored + {n} new = {self.seq_len + n} tokens "
                             f"> max_length={self.max_length}")
        self.seq_len += n


class SlotCache:
    """Static key/value storage of decode slots: one sequence per slot, every slot at its own length.

    ``keys`` and ``values`` ``[L, B, KV, max_length, hd]`` are preallocated and written in place: a decode step
    stores each slot's new key at ``positions[b]`` (the index of its new token, which is also its RoPE position) and
    attends to indices ``0..positions[b]`` of that slot, so sequences of different lengths share the batch and a slot
    is reused by the next sequence without reallocating (continuous batching). Nothing here reads a value on the
    host: a step traces into one compiled graph and replays as a CUDA graph. Entries past a slot's position may hold
    an earlier sequence's keys; they are masked, and must be finite (whoever hands a slot to a new sequence zeroes
    it: a NaN key would turn the masked scores into NaN).

    Args:
        keys, values: ``[L, B, KV, max_length, hd]``.
        positions: ``[B]`` int64 index of every slot's new token, in ``[0, max_length)``.
        conv_states: the Engram ShortConv state per Engram layer (``[B, C, P]``, as in :class:`KVCache`).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 conv_states: dict[int, torch.Tensor]):
        if keys.dim() != 5 or keys.shape != values.shape or positions.shape != keys.shape[1:2]:
            raise ValueError(f"SlotCache expects keys and values [L, B, KV, S, hd] and positions [B], got "
                             f"{tuple(keys.shape)}, {tuple(values.shape)} and {tuple(positions.shape)}")
        self.keys = keys
        self.values = values
        self.positions = positions
        self.conv_states = conv_states
        index = torch.arange(keys.shape[3], device=keys.device)
        self.visible = index[None, :] <= positions[:, None]  # [B, S] keys each slot's new token attends to

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k``, ``v`` ``[B, KV, 1, hd]`` at every slot's position and attend ``q`` ``[B, H, 1, hd]`` to the
        slot's keys up to it; returns ``[B, H, 1, hd]``."""
        batch, kv_heads, length, head_dim = k.shape
        if length != 1 or q.shape[2] != 1:
            raise ValueError(f"SlotCache decodes one token per slot, got q {tuple(q.shape)} and k {tuple(k.shape)}")
        index = self.positions.view(batch, 1, 1, 1).expand(batch, kv_heads, 1, head_dim)
        keys = self.keys[layer_idx].scatter_(2, index, k.to(self.keys.dtype))  # [B, KV, S, hd]
        values = self.values[layer_idx].scatter_(2, index, v.to(self.values.dtype))
        # The query heads sharing a key head (GQA) become that head's queries: no copy of the cache per group.
        groups = q.shape[1] // kv_heads
        grouped = q.to(keys.dtype).reshape(batch, kv_heads, groups, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=self.visible[:, None, None, :])
        return out.reshape(batch, kv_heads * groups, 1, head_dim)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """Plain ``softmax(Q K^T / sqrt(hd)) V`` in fp32, returned in q's dtype.

    Args:
        q: ``[B, H, T, hd]``; k, v: ``[B, H, S, hd]``.
        mask: bool, broadcastable to ``[B, H, T, S]``, True = may attend; None = attend everywhere.
            Rows with no allowed key output zeros.
    """
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if mask is None:
        return (scores.softmax(-1) @ v.float()).to(q.dtype)
    probs = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs * mask, 0.0)
    return (probs @ v.float()).to(q.dtype)


class Attention(nn.Module):
    """Causal GQA self-attention with RoPE (no norm inside: the block applies the pre-norm)."""

    def __init__(self, cfg: EngramLMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | SlotCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        """Attend ``x`` ``[B, T, D]`` -> ``[B, T, D]``.

        Args:
            positions: ``[B, T]`` int RoPE positions of the new tokens.
            key_padding_mask: ``[B, S]`` bool over every key seen so far (``S = cache.seq_len + T`` with a
                cache, else ``T``), True = real token; None = no padding.
            cache: with a cache, query ``i`` sits at absolute index ``cache.seq_len + i``; the new keys
                and values are stored in it for ``layer_idx`` (the caller advances it after all layers). A
                :class:`SlotCache` (one new token per slot, ``T = 1``) stores them at each slot's own position.
        """
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"Attention expects x of shape [B, T, {self.q_proj.in_features}], got {tuple(x.shape)}")
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if isinstance(cache, SlotCache):
            out = cache.attend(layer_idx, q, k, v)
        else:
            out = self._attend(q, k, v, key_padding_mask, cache, layer_idx)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        """``q`` ``[B, H, T, hd]`` attending to ``k``, ``v`` ``[B, KV, T, hd]`` after the cache's earlier entries
        (stored there first), causally, padding masked; ``[B, H, T, hd]``."""
        batch, _, length, _ = q.shape
        offset = 0
        if cache is not None:
            offset = cache.seq_len
            k, v = cache.update(layer_idx, k, v)
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, S, hd]

        if cache is None and key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = self._mask(batch, length, offset, key_padding_mask, q.device)  # [B, 1, T, S]
        has_key = mask.any(-1, keepdim=True)
        # A query that sees only padding would softmax over nothing (NaN): let it see every key, then zero it.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key)
        return out.masked_fill(~has_key, 0.0)

    @staticmethod
    def _mask(batch: int, length: int, offset: int, key_padding_mask: torch.Tensor | None,
              device: torch.device) -> torch.Tensor:
        """Bool ``[B, 1, T, S]``: query ``i`` may see key ``j <= offset + i`` that is not padding."""
        total = offset + length
        query_index = torch.arange(offset, total, device=device)
        causal = torch.arange(total, device=device)[None, :] <= query_index[:, None]  # [T, S]
        if key_padding_mask is None:
            return causal.expand(batch, 1, length, total)
        if key_padding_mask.shape != (batch, total):
            raise ValueError(f"key_padding_mask must have shape [B, S] = {(batch, total)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        return causal[None, None] & key_padding_mask.bool()[:, None, None, :]
