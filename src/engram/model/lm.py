"""EngramLM: a decoder-only language model with Engram memory where the paper puts it.

Architecture (every choice in one place):
- token embedding [V, D]; with ``hc_mult = M > 1`` it is copied into M residual streams (mHC);
- per block: Engram (at ``engram.layer_ids`` only; added to every stream, before attention), then
  pre-norm RoPE GQA attention, then a pre-norm SwiGLU FFN, dense or DeepSeek-V3 MoE by ``ffn_kinds``;
  with M > 1 each sublayer reads and writes the streams through its own hyper-connection (mHC);
- streams merged (learned sigmoid mix), final RMSNorm, LM head (optionally tied to the embedding);
- the hash ids of every Engram layer are computed once per forward from the input ids, and every layer's
  table read is issued right then (a prefetch: tables in host memory or on disk arrive while the blocks
  before the first Engram layer run); ``from_pretrained(engram_placement=...)`` picks where tables live;
- memory patches are served per request from outside the model, behind the tables' ``fetch``
  (:func:`engram.model.overlay.row_overlays`): the forward never sees them;
- :meth:`EngramLM.generate` runs one of the decode loops of :mod:`engram.model.generation`: the plain loop over
  ``forward`` with a growing :class:`KVCache`, or the sync-free step of a :class:`~engram.model.slots.SlotDecoder`
  (one slot per sequence, CUDA graphs on a GPU);
- every weight is set in :meth:`EngramLM.init_weights`: matrices, embeddings and tables N(0, init_std),
  norms 1, the ShortConv kernel 0 when ``engram_conv_zero_init``, mHC and MoE bias as their modules say.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engram.hashing import NgramHasher, check_token_batch
from engram.layer import Engram
from engram.model.attention import Attention, KVCache, SlotCache
from engram.model.config import EngramLMConfig
from engram.model.hyper_connections import HyperConnection, StreamMerge, expand_streams
from engram.model.loss import linear_cross_entropy
from engram.model.moe import FeedForward, MoE
from engram.model.generation import generate_tokens, resolve_decode
from engram.model.sampling import RowSampling
from engram.model.slots import SlotDecoder
from engram.model.serialization import MAX_SHARD_BYTES, load_pretrained, save_pretrained
from engram.storage.store import PendingRows

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    """What :meth:`EngramLM.forward` returns (HF-like attribute access)."""

    logits: torch.Tensor | None  # [B, T, V] fp32; None when a loss was asked for and logits were not
    loss: torch.Tensor | None = None  # cross entropy when labels or targets were given (see EngramLM.forward)
    aux_loss: torch.Tensor | None = None  # sum of the MoE sequence-balance losses (training, coef > 0)


class Block(nn.Module):
    """One transformer block: [Engram] -> attention -> FFN, on ``[B, T, M, D]`` residual streams."""

    def __init__(self, cfg: EngramLMConfig, layer_idx: int, hasher: NgramHasher | None,
                 table_device: torch.device | str | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hc_mult = cfg.hc_mult
        self.engram = None
        if layer_idx in cfg.engram_layer_ids:
            self.engram = Engram(cfg.engram, layer_idx, cfg.d_model, cfg.hc_mult, hasher=hasher,
                                 conv_zero_init=cfg.engram_conv_zero_init, table_device=table_device)
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        kind = cfg.ffn_kinds[layer_idx]
        self.ffn = MoE(cfg.d_model, cfg.moe) if kind == "moe" else FeedForward(cfg.d_model, cfg.dense_ffn_dim)
        if cfg.hc_mult > 1:
            self.attn_hc = HyperConnection(cfg.hc_mult, cfg.d_model, cfg.hc_sinkhorn_iters, init_std=cfg.init_std)
            self.ffn_hc = HyperConnection(cfg.hc_mult, cfg.d_model, cfg.hc_sinkhorn_iters, init_std=cfg.init_std)

    def forward(self, streams: torch.Tensor, positions: torch.Tensor, key_padding_mask: torch.Tensor | None,
                cache: KVCache | SlotCache | None, memories: dict[int, PendingRows] | None) -> torch.Tensor:
        """``[B, T, M, D]`` -> ``[B, T, M, D]``; ``key_padding_mask`` is ``[B, S]`` over every token so far;
        ``memories`` holds the table reads issued at the start of the forward, by Engram layer."""
        if self.engram is not None:
            token_mask = key_padding_mask[:, -streams.shape[1]:] if key_padding_mask is not None else None
            conv_states = cache.conv_states if cache is not None else None
            streams = self.engram.add_to(streams, memory=memories[self.layer_idx].wait(), conv_states=conv_states,
                                         token_mask=token_mask).to(streams.dtype)

        def attention(u: torch.Tensor) -> torch.Tensor:
            return self.attn(self.attn_norm(u), positions, key_padding_mask, cache, self.layer_idx)

        def ffn(u: torch.Tensor) -> torch.Tensor:
            return self.ffn(self.ffn_norm(u))

        if self.hc_mult > 1:
            return self.ffn_hc(self.attn_hc(streams, attention), ffn)
        hidden = streams.squeeze(2)
        hidden = hidden + attention(hidden)
        hidden = hidden + ffn(hidden)
        return hidden.unsqueeze(2)


class EngramLM(nn.Module):
    """Decoder-only LM with attention, dense/MoE FFNs, optional mHC and Engram layers.

    Example:
        >>> model = EngramLM(EngramLMConfig.from_preset("tiny"))
        >>> out = model(torch.randint(0, 128815, (2, 16)))
        >>> out.logits.shape                                  # [B, T, vocab]
        torch.Size([2, 16, 129280])
        >>> model.generate(torch.tensor([[0, 22898]]), max_new_tokens=4, temperature=0).shape
        torch.Size([1, 6])
    """

    def __init__(self, cfg: EngramLMConfig, hasher: NgramHasher | None = None,
                 table_device: torch.device | str | None = None):
        """``table_device="meta"`` allocates no Engram table (for :meth:`from_pretrained` with a store)."""
        super().__init__()
        self._slot_decoder: tuple[tuple, SlotDecoder] | None = None  # see slot_decoder()
        self.cfg = cfg
        self.hasher = hasher
        if cfg.engram is not None and hasher is None:
            self.hasher = NgramHasher(cfg.engram)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i, self.hasher, table_device) for i in range(cfg.n_layers)])
        self.merge = StreamMerge(cfg.hc_mult, cfg.d_model, init_std=cfg.init_std) if cfg.hc_mult > 1 else None
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()
        self._prepare_hasher()

    def _apply(self, fn, recurse: bool = True) -> "EngramLM":
        module = super()._apply(fn, recurse)
        self._slot_decoder = None  # its buffers and graphs belong to the old device and dtype
        self._prepare_hasher()  # .to(device): the hashing constants follow, outside any compiled forward
        return module

    def _prepare_hasher(self) -> None:
        if self.hasher is not None:
            self.hasher.prepare(self.embed.weight.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Set every parameter (the one place where initialisation happens)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, (HyperConnection, StreamMerge)):
                module.reset_parameters()
            elif isinstance(module, MoE):
                for weight in (module.w1, module.w2, module.w3):
                    nn.init.normal_(weight, std=std)
                module.expert_bias.zero_()
            elif isinstance(module, Engram):
                if module.multi_head_embedding.store is None:
                    nn.init.normal_(module.multi_head_embedding.weight, std=std)
                for norm in (module.key_norm, module.query_norm, module.short_conv.norm):
                    nn.init.ones_(norm.weight)
                if self.cfg.engram_conv_zero_init:
                    nn.init.zeros_(module.short_conv.conv.weight)
                else:
                    module.short_conv.conv.reset_parameters()

    @property
    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    def update_router_biases(self) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: call once after each optimiser step."""
        for moe in self.moe_layers:
            moe.update_bias()

    def router_load_stats(self) -> dict[str, list] | None:
        """Each MoE layer's routing in its last forward, bottom layer first: ``"imbalance"`` the most loaded
        expert against an even split, ``max(load) / mean(load)`` (1.0 perfectly balanced, ``num_experts / top_k``
        every token sending one of its ``top_k`` picks to the same expert), and ``"hot_expert"`` that expert's
        index. None without MoE layers or before their first forward. One host sync."""
        loads = [moe.last_load for moe in self.moe_layers if moe.last_load is not None]
        if not loads:
            return None
        stats = torch.stack([torch.stack([load.max().float() / load.float().mean(), load.argmax().float()])
                             for load in loads]).tolist()
        return {"imbalance": [row[0] for row in stats], "hot_expert": [int(row[1]) for row in stats]}

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache for ``max_length`` tokens per sequence."""
        weight = self.embed.weight
        return KVCache(self.cfg.n_layers, batch_size, max_length, self.cfg.n_kv_heads, self.cfg.head_dim,
                       dtype or weight.dtype, device or weight.device)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """``ValueError`` (``TypeError`` for non-integers) unless ``input_ids`` is a non-empty ``[B, T]`` int32/int64
        batch of ids in ``[0, vocab_size)``. The value check reads the ids on the host, so inside ``torch.compile``
        it is skipped: a compiled caller checks its batch before moving it to the device (as the trainer does)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [B, T] tensor, got {shape}")
        check_token_batch(input_ids)
        if torch.compiler.is_compiling():
            return  # the value check reads the ids back to the host (a graph break): the trainer checks its batches
        bad = (input_ids < 0) | (input_ids >= self.cfg.vocab_size)
        if bool(bad.any()):
            value = int(input_ids[bad][0])
            raise ValueError(f"token id {value} is outside the model's vocabulary [0, {self.cfg.vocab_size})")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None,
                engram_history: torch.Tensor | None = None, logits_to_keep: int = 0,
                targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                return_logits: bool | None = None) -> LMOutput:
        """Logits for ``input_ids``, or the loss against ``labels`` or ``targets``.

        Args:
            input_ids: ``[B, T]`` int32 or int64 token ids, ``B, T >= 1`` (the new tokens when decoding with
                ``cache``).
            attention_mask: ``[B, S]`` 1 for real tokens, 0 for (left) padding, over every token so far
                (``S = cache.seq_len + T`` with a cache, else ``T``). Padding positions are hashed as the
                Engram pad id, so a left-padded row reads the same rows as the unpadded one.
            labels: ``[B, T]`` targets aligned with ``input_ids`` (shifted inside: position ``t`` predicts
                ``labels[:, t + 1]``); ``-100`` is ignored.
            cache: a :meth:`new_cache`; it is advanced by ``T``.
            engram_history: ``[B, <= max_ngram_size - 1]`` raw ids preceding ``input_ids`` (decoding).
            logits_to_keep: compute logits for the last this many positions only (0: all); a batched
                prefill needs just the last (``[B, T, V]`` fp32 logits of 512 x 1024 tokens are 270 GB).
            targets: ``[B, T]`` the target of every position, already shifted (what the trainer passes);
                ``-100`` is ignored. Not with ``labels``.
            loss_reduction: ``"mean"`` over the targets not ignored, ``"sum"``, or ``"none"`` (fp32 ``[B, T]``, 0
                where ignored; with ``labels`` the last position is ignored).
            return_logits: also return the logits when a loss is computed (``None``: logits only without one).
        Returns:
            :class:`LMOutput` with ``logits`` ``[B, T, V]`` (fp32; ``[B, logits_to_keep, V]`` when given; ``None``
            with ``labels`` or ``targets`` unless ``return_logits``) and the loss, computed by
            :func:`engram.model.loss.linear_cross_entropy` a chunk of tokens at a time: training never holds the
            ``[B, T, V]`` logits.
        """
        past = cache.seq_len if cache is not None else 0
        self._check_forward(input_ids, attention_mask, labels, targets, past, logits_to_keep)
        positions, key_padding_mask = self._positions(input_ids, attention_mask, past)
        memories = self._fetch_memories(input_ids, attention_mask, past, engram_history)  # prefetch of every table

        hidden = self.embed(input_ids)  # [B, T, D]
        streams = self.residual_streams(hidden)
        for block in self.blocks:
            streams = block(streams, positions, key_padding_mask, cache, memories)  # [B, T, M, D]
        if cache is not None:
            cache.advance(input_ids.shape[1])
        hidden = self.final_hidden(streams[:, -logits_to_keep:] if logits_to_keep else streams)  # [B, T', D]

        targets = self._loss_targets(labels, targets)
        loss = self._loss(hidden, targets, loss_reduction) if targets is not None else None
        wants_logits = targets is None if return_logits is None else return_logits
        return LMOutput(logits=self.lm_logits(hidden) if wants_logits else None, loss=loss,
                        aux_loss=self._aux_loss())

    def _check_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       labels: torch.Tensor | None, targets: torch.Tensor | None, past: int,
                       logits_to_keep: int) -> None:
        """``ValueError`` (``TypeError`` for non-integer ids) naming the first of :meth:`forward`'s arguments that
        does not fit (``past``: tokens already in the cache)."""
        self.check_input_ids(input_ids)
        batch, length = input_ids.shape
        if past + length > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {past + length} tokens is longer than max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != (batch, past + length):
            raise ValueError(f"attention_mask must be [B, S] = {(batch, past + length)}, "
                             f"got {tuple(attention_mask.shape)}")
        if labels is not None and targets is not None:
            raise ValueError("pass labels (shifted inside) or targets (already shifted), not both")
        given = labels if labels is not None else targets
        if given is not None and given.shape != input_ids.shape:
            name = "labels" if labels is not None else "targets"
            raise ValueError(f"{name} must match input_ids {tuple(input_ids.shape)}, got {tuple(given.shape)}")
        if logits_to_keep and given is not None:
            raise ValueError("labels and targets need every position: pass logits_to_keep=0")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")

    @staticmethod
    def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   past: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RoPE positions ``[B, T]`` of the new tokens (padding skipped) and the key padding mask ``[B, S]``
        (``None`` when no position is padding)."""
        batch, length = input_ids.shape
        if attention_mask is None:
            return torch.arange(past, past + length, device=input_ids.device).expand(batch, -1), None
        key_padding_mask = attention_mask.bool()
        positions = (key_padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        return positions, None if bool(key_padding_mask.all()) else key_padding_mask

    def _fetch_memories(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
                        engram_history: torch.Tensor | None) -> dict[int, PendingRows] | None:
        """Every Engram layer's table read, issued now (the hash ids of all layers computed once, padding hashed
        as the pad id); ``None`` without Engram.

        Under ``torch.compile`` with sparse-gradient tables (training with sparse Adam) the reads run eagerly, one
        graph break ahead of the blocks: inductor cannot build a sparse gradient, and the compiled graph then only
        sees the rows read (its backward hands their gradient to the eager gather's sparse backward).
        """
        if self.hasher is None:
            return None
        if torch.compiler.is_compiling() and any(block.engram.multi_head_embedding.sparse
                                                 for block in self.blocks if block.engram is not None):
            return torch.compiler.disable(self._fetch_memories)(input_ids, attention_mask, past, engram_history)
        if attention_mask is not None:
            input_ids = input_ids.masked_fill(~attention_mask[:, past:].bool(), self.cfg.engram.pad_id)
        hash_ids = self.hasher.hash_all(input_ids, history=engram_history)
        return {block.layer_idx: block.engram.multi_head_embedding.fetch(hash_ids[block.layer_idx])
                for block in self.blocks if block.engram is not None}

    @staticmethod
    def _loss_targets(labels: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor | None:
        """The ``[B, T]`` target of every position from ``labels`` (shifted: the last position gets
        ``IGNORE_INDEX``) or ``targets`` (as given); ``None`` without either."""
        if labels is not None:
            return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return targets

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross entropy of the LM head over ``hidden`` ``[B, T, D]`` against ``targets`` ``[B, T]`` (``[B, T]``
        fp32 with ``reduction="none"``), never holding the logits."""
        loss = linear_cross_entropy(hidden.flatten(0, 1), self.head_weight, targets.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def _aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE sequence-balance losses of this forward (training only; ``None`` without any)."""
        aux_terms = [moe.aux_loss for moe in self.moe_layers if moe.aux_loss is not None]
        return torch.stack(aux_terms).sum() if aux_terms and self.training else None

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's ``[V, D]`` weight: the embedding when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def residual_streams(self, hidden: torch.Tensor) -> torch.Tensor:
        """The residual streams ``[B, T, M, D]`` that start from the embedding ``hidden`` ``[B, T, D]``: ``M`` copies
        with mHC, in the autocast dtype while autocast is on unless ``cfg.hc_stream_dtype`` is ``"float32"``."""
        if self.cfg.hc_mult == 1:
            return hidden.unsqueeze(2)
        device_type = hidden.device.type
        if self.cfg.hc_stream_dtype == "autocast" and torch.is_autocast_enabled(device_type):
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        return expand_streams(hidden, self.cfg.hc_mult)

    def final_hidden(self, streams: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` states the LM head reads from residual streams ``[B, T, M, D]``: merged, final norm."""
        return self.norm(self.merge(streams) if self.merge is not None else streams.squeeze(2))

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[B, T, V]`` of :meth:`final_hidden` states ``[B, T, D]``."""
        return F.linear(hidden, self.head_weight).float()

    def readout(self, streams: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[B, T, V]`` of residual streams ``[B, T, M, D]``: streams merged, final norm, LM head
        (also how the logit lens reads the streams after any block)."""
        return self.lm_logits(self.final_hidden(streams))

    def save_pretrained(self, directory: str | os.PathLike[str], max_shard_bytes: int = MAX_SHARD_BYTES,
                        table_parts: dict[int, list[list]] | None = None) -> Path:
        """Write ``config.json``, safetensors weights (sharded above ``max_shard_bytes``) and one table file per
        Engram layer into ``directory`` (``table_parts``: layers already written in row parts, see
        :func:`engram.model.serialization.save_pretrained`)."""
        return save_pretrained(self, directory, max_shard_bytes, table_parts)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], engram_placement: str = "device",
                        engram_cache_rows: int = 0, engram_table_format: str | None = None,
                        **placement_options) -> "EngramLM":
        """Load a :meth:`save_pretrained` folder; refuses weights whose Engram hashing differs.

        Args:
            engram_placement: where the Engram tables live. ``"device"``: a parameter, moved with the model
                (``.to("cuda")``), trainable. ``"host"``: (pinned) host memory, rows gathered and copied to the
                model's device on demand. ``"disk"``: the table file memory-mapped where it is, for tables larger
                than RAM. Outputs are identical for every placement.
            engram_cache_rows: with ``host`` or ``disk``, keep this many hot rows in the device's memory
                (frequency-based admission); 0 for no cache.
            engram_table_format: the tables' rows: ``None`` as saved (``config.json``'s ``engram_table_format``,
                ``"float"`` for older folders); ``"fp8"`` quantises a float folder's tables to packed FP8 rows
                while loading them (``engram.kernels.fp8``: E4M3 with a power-of-two scale per 32 values, 264 bytes
                for a 256-wide row against 512 in bf16; read-only: for serving), with placement ``device`` or ``host``.
                An FP8 folder loads as FP8 in every placement (``"float"`` is refused).
            placement_options: see :func:`engram.storage.open_table_store` (``host_method``, ``workers``,
                ``share_memory``, ``host_memory_budget``, ``verify``).

        Example:
            >>> model = EngramLM.from_pretrained("ckpt", engram_placement="host").to("cuda")  # doctest: +SKIP
            >>> fp8 = EngramLM.from_pretrained("ckpt", engram_table_format="fp8")  # doctest: +SKIP
        """
        return load_pretrained(cls, directory, engram_placement, engram_cache_rows, engram_table_format,
                               **placement_options)

    def param_report(self, seq_len: int | None = None) -> dict[str, int]:
        """Parameter counts of this model (see :func:`engram.model.params.param_report`)."""
        return count_parameters(self, seq_len)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, seed: int | None = None,
                 decode: str = "auto") -> torch.Tensor:
        """Prompt followed by up to ``max_new_tokens`` new tokens, ``[B, T + new]`` (the HF convention).

        Decodes with a KV cache and incremental Engram hashing. ``temperature=0`` is greedy. Batched
        prompts of different lengths are left-padded with ``attention_mask`` marking real tokens. A
        sequence that produced ``eos_token_id`` keeps emitting it; generation stops when all have.
        Ids past ``cfg.tokenizer_vocab_size`` (embedding padding) are never sampled. Inside
        :func:`engram.model.overlay.row_overlays` every step reads each row's overlay. ``seed`` seeds every row's
        own random stream (:func:`engram.model.sampling.sample_rows`); without it the streams are drawn from torch's
        global generator. ``decode`` picks the loop (:mod:`engram.model.generation`): ``"auto"`` (CUDA graphs of a
        sync-free step on CUDA, the plain loop elsewhere), ``"eager"``, ``"static"`` or ``"graph"``; all give the same
        greedy tokens. The static and graph loops keep their :meth:`slot_decoder` (its KV cache and graphs) for the
        next call.
        """
        self.check_input_ids(input_ids)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        batch, prompt_len = input_ids.shape
        if prompt_len + max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        seeds = (torch.randint(0, 2**62, (batch,)).tolist() if seed is None
                 else [(seed + row * 0x9E3779B97F4A7C15) % 2**63 for row in range(batch)])
        sampling = [RowSampling(temperature, top_k, top_p, row_seed) for row_seed in seeds]
        if max_new_tokens == 0:
            return input_ids
        was_training = self.training
        self.eval()
        try:
            return generate_tokens(self, input_ids, max_new_tokens, sampling, eos_token_id, attention_mask,
                                   resolve_decode(self, decode))
        finally:
            self.train(was_training)

    def slot_decoder(self, num_slots: int, max_length: int, cuda_graphs: bool = False) -> SlotDecoder:
        """A :class:`~engram.model.slots.SlotDecoder` of this model for ``num_slots`` sequences of at least
        ``max_length`` tokens (rounded up to a multiple of 256 within the context). The last one made is kept and
        returned again while it fits (same slots and graph setting, enough length, the same parameter tensors and
        table stores), so its CUDA graphs are captured once; a new one replaces it (``.to()`` drops it)."""
        key = (num_slots, cuda_graphs, self._decoder_fingerprint())
        if self._slot_decoder is not None:
            held_key, held = self._slot_decoder
            if held_key == key and held.max_length >= max_length:
                return held
        self._slot_decoder = None  # its cache is freed before the next is allocated
        length = min(-(-max_length // 256) * 256, self.cfg.max_position_embeddings)
        decoder = SlotDecoder(self, num_slots, length, cuda_graphs)
        self._slot_decoder = (key, decoder)
        return decoder

    def _decoder_fingerprint(self) -> tuple:
        """What a kept decoder's graphs depend on: the address of every parameter and buffer, and the tables' stores."""
        tensors = tuple(tensor.data_ptr() for tensor in itertools.chain(self.parameters(), self.buffers()))
        return tensors + tuple(id(block.engram.multi_head_embedding.store) for block in self.blocks
                               if block.engram is not None)


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(model: EngramLM, seq_len: int | None = None) -> dict[str, int]:
    """Counts of ``model`` by component, plus ``total``, ``activated``, ``engram`` and ``flops_per_token``
    (docs/design.md §7).

    ``activated`` = parameters a token uses: everything except the routed experts it does not pick (a fraction
    ``(E - k) / E`` of every MoE layer's routed experts) and the Engram table rows it does not read (it reads
    ``(max_ngram_size - 1) * n_head_per_ngram`` rows of ``head_dim`` per Engram layer). Embedding and LM head
    count as activated.

    ``flops_per_token`` is the forward pass of one token in a causal sequence of ``seq_len`` tokens
    (default ``max_position_embeddings``): 2 FLOPs per activated matmul weight plus the attention
    scores and weighted sum over the average causal context ``(seq_len + 1) / 2``.
    """
    cfg = model.cfg
    seq_len = seq_len or cfg.max_position_embeddings
    counts: dict[str, int] = defaultdict(int)
    counts["embedding"] = _numel(model.embed)
    counts["lm_head"] = _numel(model.lm_head)
    counts["norms"] = _numel(model.norm)
    counts["mhc"] = _numel(model.merge)
    unused_experts = 0
    rows_read = 0
    for block in model.blocks:
        counts["attention"] += _numel(block.attn)
        counts["norms"] += _numel(block.attn_norm) + _numel(block.ffn_norm)
        if cfg.hc_mult > 1:
            counts["mhc"] += _numel(block.attn_hc) + _numel(block.ffn_hc)
        if isinstance(block.ffn, MoE):
            routed = block.ffn.w1.numel() + block.ffn.w2.numel() + block.ffn.w3.numel()
            counts["moe_routed_experts"] += routed
            counts["moe_shared_experts"] += _numel(block.ffn.shared)
            counts["moe_router"] += _numel(block.ffn.router)
            unused_experts += routed * (cfg.moe.num_experts - cfg.moe.top_k) // cfg.moe.num_experts
        else:
            counts["dense_ffn"] += _numel(block.ffn)
        if block.engram is not None:
            embedding = block.engram.multi_head_embedding
            tables = embedding.num_rows * embedding.head_dim  # also when a store holds them (not a parameter)
            counts["engram_tables"] += tables
            counts["engram_dense"] += _numel(block.engram) - _numel(embedding)
            rows_read += cfg.engram.num_heads * cfg.engram.head_dim
    report = dict(counts)
    report["total"] = sum(counts.values())
    report["engram"] = counts["engram_tables"]
    report["activated"] = report["total"] - unused_experts - counts["engram_tables"] + rows_read
    # The embedding is a lookup (no FLOPs) unless it doubles as the LM head.
    matmul = report["activated"] - counts["norms"] - rows_read - (0 if cfg.tie_embeddings else counts["embedding"])
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (seq_len + 1) / 2
    report["flops_per_token"] = int(2 * matmul + attention)
    report["seq_len"] = seq_len
    return report
