"""The Engram module: hashed n-gram memory, gated by the hidden state, with a short causal convolution.

Per token t and residual branch m of M (docs/design.md §4):
    e_t      = concat of the rows read by every hash head                      [B, T, E]
    k_m, v   = W_K^(m) e_t, W_V e_t   (one GEMM for W_V and every W_K^(m))      [B, T, M, D], [B, T, D]
    g_m      = <RMSNorm_m(h_t^(m)), RMSNorm_m(k_m)> / sqrt(D)
    alpha_m  = sigmoid(sign(g_m) * sqrt(max(|g_m|, 1e-6)))                      [B, T, M]
    value_m  = alpha_m * v                                                      [B, T, M, D]
    output   = value + SiLU(causal depthwise conv(RMSNorm_m(value)))           [B, T, M, D]
The caller adds ``output`` to the hidden state before the block's attention (:meth:`Engram.add_to`). The gate's
norms and dot product run in fp32 whatever the autocast dtype.

``cfg.variant_spec`` switches the layer around this (:data:`engram.config.VARIANTS`). DeepSeek-V4.1
(``"deepseek-v4.1"``) has no ShortConv (output = value_m), a bias-free projection laid out keys then value,
RMSNorm eps ``cfg.rms_norm_eps`` (its config's), ``sign(0) = +1`` in the gate (a score of exactly 0 gives
sigmoid(1e-3), as in its engines), FP8 table rows, gate 0 at dead positions (``dead_mask`` and the tokens of
``cfg.dead_token_ids``), and ``h + value_m`` computed in fp32 and cast back to the hidden dtype.

The controls of the allocation sweep (``cfg.variant_spec.ablation``; their tables of one row per head are read by
the model's prefetch and not used): ``"no-memory"`` replaces ``e_t`` by one learned vector ``c`` at every position
(projections, gate and ShortConv as they are); ``"conv-only"`` returns ``SiLU(causal depthwise conv(RMSNorm_m(h)))``
alone (no projection, no gate).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from engram.config import EngramConfig
from engram.embedding import MultiHeadEmbedding
from engram.hashing import NgramHasher
from engram.kernels.branch_norm import branch_rms_norm
from engram.kernels.gate import fused_gate
from engram.kernels.shortconv import fused_short_conv


class BranchRMSNorm(nn.Module):
    """RMSNorm over the last dim with one weight vector per residual branch: ``[..., M, D]`` -> same.

    Computed in fp32 and returned in the input's dtype. ``eps=None`` uses fp32 machine epsilon
    (what ``nn.RMSNorm(eps=None)`` does for fp32 inputs).
    """

    def __init__(self, num_branches: int, dim: int, eps: float | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_branches, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return branch_rms_norm(x, self.weight, self.eps).to(x.dtype)


class ShortConv(nn.Module):
    """Per-branch RMSNorm, causal depthwise dilated Conv1d over all branches' channels, SiLU.

    Channel ``m * D + d`` of the convolution is dim ``d`` of branch ``m``. ``[B, T, M, D]`` -> same.
    With ``zero_init=True`` the kernel starts at zero, so the output starts at zero.
    """

    def __init__(self, dim: int, num_branches: int, kernel_size: int = 4, dilation: int = 1,
                 eps: float = 1e-5, zero_init: bool = False):
        super().__init__()
        self.num_branches = num_branches
        channels = dim * num_branches
        self.norm = BranchRMSNorm(num_branches, dim, eps=eps)
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation)
        if zero_init:
            nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolve ``x`` ``[B, T, M, D]`` causally over time.

        Args:
            past: ``[B, M * D, (kernel_size - 1) * dilation]`` normalised inputs of the positions just before
                ``x`` (decoding with a cache); zeros, i.e. the start of the sequence, when omitted.
            token_mask: ``[B, T]`` False at padding positions, whose inputs are zeroed so that left padding
                reads like the start of the sequence.
        Returns:
            ``(y [B, T, M, D], past [B, M * D, (kernel_size - 1) * dilation])`` for the next call.
        """
        if x.dim() != 4 or x.shape[2] != self.num_branches:
            raise ValueError(f"ShortConv expects {self.num_branches} branches, got shape {tuple(x.shape)}")
        return fused_short_conv(x, self.norm.weight, self.conv.weight, self.conv.dilation[0], self.norm.eps,
                                past, token_mask)


class Engram(nn.Module):
    """Conditional memory for one block: returns the delta to add to the hidden state (:meth:`add_to` adds it).

    The variant (``cfg.variant_spec``) decides the layer: the demo's ShortConv or none, the projection's bias
    and output layout, the gate's RMSNorm eps, float or FP8 table rows, dead-token gating, the fp32 residual.

    Args:
        cfg: the Engram configuration (tables, hashing, kernel size).
        layer_id: which of ``cfg.layer_ids`` this module serves (selects its hash multipliers and tables).
        hidden_size: the backbone width D.
        hc_mult: residual branches M (1 for a plain residual, 4 for mHC).
        hasher: an :class:`NgramHasher` to share between layers (built from ``cfg`` when omitted).
        sparse: sparse gradients for the memory table (see :class:`MultiHeadEmbedding`).
        conv_zero_init: start the ShortConv kernel at zero (the paper's identity start).
        table_init_std: std of the table's normal init (the demo's ``nn.Embedding`` uses 1.0).
        table_device: where the table is allocated (``"meta"``: nowhere, for a store attached later).

    Example:
        >>> cfg = EngramConfig(engram_vocab_size=[1000, 1000], layer_ids=[1])
        >>> layer = Engram(cfg, layer_id=1, hidden_size=64, hc_mult=4)
        >>> h = torch.randn(2, 5, 4, 64)
        >>> layer(h, input_ids=torch.randint(0, 1000, (2, 5))).shape
        torch.Size([2, 5, 4, 64])
    """

    def __init__(self, cfg: EngramConfig, layer_id: int, hidden_size: int, hc_mult: int = 1, *,
                 hasher: NgramHasher | None = None, sparse: bool = False, conv_zero_init: bool = False,
                 table_init_std: float = 1.0, table_device: torch.device | str | None = None):
        super().__init__()
        if layer_id not in cfg.layer_ids:
            raise ValueError(f"layer_id {layer_id} is not in cfg.layer_ids {cfg.layer_ids}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if hc_mult < 1:
            raise ValueError(f"hc_mult must be >= 1, got {hc_mult}")
        self.cfg = cfg
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.hasher = hasher if hasher is not None else NgramHasher(cfg)
        spec = cfg.variant_spec
        self.multi_head_embedding = MultiHeadEmbedding(
            self.hasher.flat_table_sizes(layer_id), cfg.head_dim, sparse=sparse, init_std=table_init_std,
            device=table_device, row_format="fp8" if spec.table_format == "fp8-e4m3-ue8m0" else "float")
        # "value,keys" (demo): rows [0, D) are W_V (shared by branches), rows [(m + 1) D, (m + 2) D) are W_K^(m).
        # "keys,value" (V4.1's wkv): rows [m D, (m + 1) D) are W_K^(m), rows [M D, (M + 1) D) are W_V.
        # The conv-only control has no projection and no gate: its gate norms hold no weights (EngramLM's init
        # sets them).
        conv_only = spec.ablation == "conv-only"
        self.value_key_proj = None if conv_only else nn.Linear(cfg.memory_dim, (1 + hc_mult) * hidden_size,
                                                               bias=spec.projection_bias)
        gate_shape = (0, 0) if conv_only else (hc_mult, hidden_size)
        self.key_norm = BranchRMSNorm(*gate_shape, eps=cfg.rms_norm_eps)
        self.query_norm = BranchRMSNorm(*gate_shape, eps=cfg.rms_norm_eps)
        # The no-memory control's e_t: one embedding row, so that EngramLM initialises it as it does the tables.
        self.memory_constant = nn.Embedding(1, cfg.memory_dim) if spec.ablation == "no-memory" else None
        self.short_conv = None
        if spec.use_short_conv:
            self.short_conv = ShortConv(hidden_size, hc_mult, cfg.kernel_size, dilation=cfg.max_ngram_size,
                                        zero_init=conv_zero_init)

    def memory(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, heads]`` row ids -> ``[B, T, (max_ngram_size - 1) * n_embed_per_ngram]`` memory vectors."""
        return self.multi_head_embedding(hash_ids)

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None,
                hash_ids: torch.Tensor | None = None, return_gates: bool = False,
                conv_states: dict[int, torch.Tensor] | None = None, token_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, dead_mask: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Memory delta for ``hidden_states``.

        Args:
            hidden_states: ``[B, T, M, D]`` (or ``[B, T, D]`` when ``hc_mult == 1``).
            input_ids: ``[B, T]`` original token ids; ignored when ``hash_ids`` is given.
            hash_ids: ``[B, T, heads]`` row ids from ``hasher.hash``/``hash_all`` computed once per forward.
            return_gates: also return the gate values ``alpha`` ``[B, T, M]`` (fp32).
            conv_states: decoding state shared by the layers of a model: the ShortConv inputs of earlier
                positions are read from ``conv_states[layer_id]`` (absent: start of the sequence) and the
                new ones written back, so that decoding piece by piece equals one full forward. Unused (and
                left unchanged) by a variant without ShortConv.
            token_mask: ``[B, T]`` False at (left) padding positions, which the ShortConv then ignores.
            memory: ``[B, T, heads * head_dim]`` the rows of ``hash_ids`` already read (a prefetch, see
                :meth:`MultiHeadEmbedding.fetch`); read here when omitted.
            dead_mask: ``[B, T]`` bool, True at dead positions (variants with ``masks_dead_tokens`` only):
                their gate is 0, so they add nothing. Positions of ``input_ids`` holding one of
                ``cfg.dead_token_ids`` are dead too, without a mask. It also goes to the hasher when
                ``input_ids`` are hashed here; precomputed ``hash_ids`` or ``memory`` must have been hashed with
                it, and without ``input_ids`` only ``dead_mask`` says which positions are dead.
        Returns:
            the delta, same shape as ``hidden_states`` (fp32 for a variant with ``residual_in_fp32``); with
            ``return_gates``, ``(delta, gates)``.
        """
        h = self._branches(hidden_states)  # [B, T, M, D]
        if self.value_key_proj is None:  # the conv-only control
            if return_gates:
                raise ValueError(f"variant {self.cfg.variant!r} has no gate: return_gates must be False")
            delta = self._conv(h, conv_states, token_mask)
            return delta.squeeze(2) if hidden_states.dim() == 3 else delta
        dead_mask = self._dead_positions(h, input_ids, dead_mask)  # [B, T] or None
        e = self._memory(h, input_ids, hash_ids, memory, dead_mask)  # [B, T, E]
        keys, value = self._keys_and_value(e)  # k_m [B, T, M, D], v [B, T, D]
        gated, gates = self._gate(keys, h, value)  # value_m = alpha_m * v [B, T, M, D], alpha_m [B, T, M]
        if dead_mask is not None:
            gated, gates = _zero_dead_positions(gated, gates, dead_mask)  # alpha_m = 0 at dead positions
        delta = gated if self.short_conv is None else gated + self._conv(gated, conv_states, token_mask)
        delta = delta.squeeze(2) if hidden_states.dim() == 3 else delta
        return (delta, gates) if return_gates else delta

    def _branches(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` as ``[B, T, M, D]`` (a ``[B, T, D]`` input gets ``M = 1``); ``ValueError`` for
        another shape."""
        if hidden_states.dim() == 3:
            if self.hc_mult != 1:
                raise ValueError(f"hidden_states must be [B, T, {self.hc_mult}, D] for hc_mult={self.hc_mult}, "
                                 f"got shape {tuple(hidden_states.shape)}")
            hidden_states = hidden_states.unsqueeze(2)
        if hidden_states.dim() != 4 or hidden_states.shape[2:] != (self.hc_mult, self.hidden_size):
            raise ValueError(f"hidden_states must be [B, T, {self.hc_mult}, {self.hidden_size}], "
                             f"got shape {tuple(hidden_states.shape)}")
        return hidden_states

    def _dead_positions(self, branches: torch.Tensor, input_ids: torch.Tensor | None,
                        dead_mask: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, T]`` bool, True where the gate is 0: ``dead_mask`` (checked against ``branches`` ``[B, T, M, D]``)
        and the positions of ``input_ids`` holding a dead token; ``None`` for a variant without dead tokens."""
        if dead_mask is not None:
            if not self.cfg.variant_spec.masks_dead_tokens:
                raise ValueError(f"variant {self.cfg.variant!r} has no dead tokens: dead_mask must be None")
            if dead_mask.dtype != torch.bool or dead_mask.shape != branches.shape[:2]:
                raise ValueError(f"dead_mask must be a bool [B, T] = {list(branches.shape[:2])} tensor, "
                                 f"got {dead_mask.dtype} {list(dead_mask.shape)}")
        if input_ids is None:
            return dead_mask
        return self.hasher.dead_positions(input_ids, dead_mask)

    def _memory(self, branches: torch.Tensor, input_ids: torch.Tensor | None, hash_ids: torch.Tensor | None,
                memory: torch.Tensor | None, dead_mask: torch.Tensor | None) -> torch.Tensor:
        """``e_t`` ``[B, T, E]``: ``memory`` as given, else the rows of ``hash_ids``, else of ``input_ids`` hashed
        here; ``ValueError`` without any, or when it disagrees with ``branches`` ``[B, T, M, D]`` on ``[B, T]``. The
        no-memory control has its learned constant at every position whatever it is given."""
        if self.memory_constant is not None:
            return self.memory_constant.weight[0].expand(*branches.shape[:2], -1)
        if memory is None:
            if hash_ids is None:
                if input_ids is None:
                    raise ValueError("Engram.forward needs input_ids, hash_ids or memory")
                hash_ids = self.hasher.hash(input_ids, self.layer_id, dead_mask=dead_mask)
            if hash_ids.shape[:2] != branches.shape[:2]:
                raise ValueError(f"hash_ids {tuple(hash_ids.shape)} and hidden_states "
                                 f"{tuple(branches.shape)} disagree on [B, T]")
            memory = self.memory(hash_ids)
        if memory.shape[:2] != branches.shape[:2]:
            raise ValueError(f"memory {tuple(memory.shape)} and hidden_states {tuple(branches.shape)} "
                             "disagree on [B, T]")
        return memory

    def _keys_and_value(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``e_t`` ``[B, T, E]`` -> ``(k [B, T, M, D], v [B, T, D])`` by one projection, split by the variant's
        layout; ``v`` in fp32 for a variant with ``residual_in_fp32`` (so that ``alpha * v`` is fp32, like the add)."""
        dim, branches, spec = self.hidden_size, self.hc_mult, self.cfg.variant_spec
        # A table kept outside the module (host, disk) keeps its file's dtype: cast like the parameter would be.
        projected = self.value_key_proj(memory.to(self.value_key_proj.weight.dtype))  # [B, T, (1 + M) * D]
        if spec.projection_layout == "value,keys":
            value, keys = projected[..., :dim], projected[..., dim:]
        else:
            keys, value = projected[..., :branches * dim], projected[..., branches * dim:]
        return keys.unflatten(-1, (branches, dim)), value.float() if spec.residual_in_fp32 else value

    def _gate(self, keys: torch.Tensor, branches: torch.Tensor,
              value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_m * v [B, T, M, D], alpha_m [B, T, M] fp32)`` of keys and hidden states ``[B, T, M, D]`` and the
        value ``[B, T, D]`` (one fused kernel; the norms and the dot product in fp32)."""
        return fused_gate(keys, branches, value, self.key_norm.weight, self.query_norm.weight, self.key_norm.eps,
                          self.query_norm.eps, zero_positive=self.cfg.variant_spec.gate_zero_positive)

    def _conv(self, gated: torch.Tensor, conv_states: dict[int, torch.Tensor] | None,
              token_mask: torch.Tensor | None) -> torch.Tensor:
        """The ShortConv of ``gated`` ``[B, T, M, D]``, continuing from (and updating) ``conv_states[layer_id]``."""
        past = conv_states.get(self.layer_id) if conv_states is not None else None
        conv, past = self.short_conv(gated, past, token_mask)
        if conv_states is not None:
            conv_states[self.layer_id] = past
        return conv

    def residual(self, hidden_states: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The hidden state after this layer: ``hidden_states + delta`` (both ``[B, T, M, D]`` or ``[B, T, D]``).

        With ``residual_in_fp32`` (DeepSeek-V4.1) the sum is computed in fp32 and cast back to the hidden dtype.
        """
        if self.cfg.variant_spec.residual_in_fp32:
            return (hidden_states.float() + delta.float()).to(hidden_states.dtype)
        return hidden_states + delta

    def add_to(self, hidden_states: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        """``residual(hidden_states, self(hidden_states, **forward_kwargs))``: the updated hidden state.

        Takes :meth:`forward`'s keyword arguments except ``return_gates`` (call :meth:`forward` with it, then
        :meth:`residual`). The module is called, so forward hooks see (and may replace) the delta.
        """
        if forward_kwargs.get("return_gates"):
            raise ValueError("Engram.add_to returns the hidden state only: call forward(return_gates=True), "
                             "then residual()")
        return self.residual(hidden_states, self(hidden_states, **forward_kwargs))


def _zero_dead_positions(gated: torch.Tensor, gates: torch.Tensor,
                         dead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated`` ``[B, T, M, D]`` and ``gates`` ``[B, T, M]`` with 0 where ``dead_mask`` ``[B, T]`` is True."""
    dead_mask = dead_mask.to(gates.device)  # the ids' device, when they are hashed elsewhere
    return gated.masked_fill(dead_mask[..., None, None], 0.0), gates.masked_fill(dead_mask[..., None], 0.0)


def convert_demo_state_dict(state: Mapping[str, torch.Tensor], hc_mult: int) -> dict[str, torch.Tensor]:
    """Map the parameters of the demo's ``Engram`` module onto this module's names.

    The demo keeps one ``nn.Linear`` per key branch and one ``nn.RMSNorm`` per branch; here they are
    stacked (``value_key_proj`` = [W_V; W_K^(0); ...], ``*_norm.weight`` = ``[M, D]``).
    """
    stack = torch.stack
    return {
        "multi_head_embedding.weight": state["multi_head_embedding.embedding.weight"],
        "value_key_proj.weight": torch.cat(
            [state["value_proj.weight"]] + [state[f"key_projs.{m}.weight"] for m in range(hc_mult)]),
        "value_key_proj.bias": torch.cat(
            [state["value_proj.bias"]] + [state[f"key_projs.{m}.bias"] for m in range(hc_mult)]),
        "key_norm.weight": stack([state[f"norm1.{m}.weight"] for m in range(hc_mult)]),
        "query_norm.weight": stack([state[f"norm2.{m}.weight"] for m in range(hc_mult)]),
        "short_conv.norm.weight": stack([state[f"short_conv.norms.{m}.weight"] for m in range(hc_mult)]),
        "short_conv.conv.weight": state["short_conv.conv.weight"],
    }
