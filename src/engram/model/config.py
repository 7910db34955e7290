"""Configuration of EngramLM: backbone shape, FFN kind per layer, MoE routing, mHC and Engram."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engram.config import EngramConfig

FFN_KINDS = ("dense", "moe")


@dataclass
class MoEConfig:
    """DeepSeek-V3 style fine-grained MoE (docs/design.md §5)."""

    num_experts: int = 8  # routed experts
    num_shared_experts: int = 1  # always-on experts, fused into one wide MLP
    top_k: int = 2  # routed experts per token
    expert_dim: int = 256  # hidden width of one expert's SwiGLU
    route_scale: float = 1.0  # routed gate weights (normalised to sum 1) are multiplied by this (V3: 2.5)
    bias_update_rate: float = 1e-3  # gamma of the auxiliary-loss-free balancing bias
    seq_aux_loss_coef: float = 0.0  # alpha of the sequence-wise balance loss (V3: 1e-4); 0 disables it

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "expert_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"moe.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_shared_experts < 0:
            raise ValueError(f"moe.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k must be <= num_experts={self.num_experts}, got {self.top_k}")
        if self.bias_update_rate < 0 or self.seq_aux_loss_coef < 0:
            raise ValueError(f"moe.bias_update_rate and moe.seq_aux_loss_coef must be >= 0, got "
                             f"{self.bias_update_rate} and {self.seq_aux_loss_coef}")


@dataclass
class EngramLMConfig:
    """A decoder-only LM: RoPE GQA attention, dense or MoE SwiGLU FFNs, optional mHC and Engram.

    Example:
        >>> cfg = EngramLMConfig.from_preset("tiny")
        >>> EngramLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        True
    """

    tokenizer: str = "deepseek-v3"  # text tokenizer: registered name or tokenizer.json path (Engram hashes its ids)
    vocab_size: int = 129280  # embedding rows (may be padded past the tokenizer)
    tokenizer_vocab_size: int | None = None  # ids >= this are padding: never sampled by generate()
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads must be a multiple of it
    head_dim: int = 64
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    ffn_kinds: list[str] = field(default_factory=lambda: ["dense", "moe", "moe", "moe"])  # per layer
    dense_ffn_dim: int = 768  # hidden width of dense SwiGLU FFNs
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    hc_mult: int = 1  # residual streams: 1 = plain pre-norm residual, 4 = mHC
    hc_sinkhorn_iters: int = 20
    engram: EngramConfig | None = None  # Engram at engram.layer_ids (0-based blocks), before attention
    engram_conv_zero_init: bool = True  # the paper's identity start for the ShortConv
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.engram, dict):
            self.engram = EngramConfig.from_dict(self.engram)
        self.ffn_kinds = list(self.ffn_kinds)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its value."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "max_position_embeddings", "dense_ffn_dim", "hc_mult", "hc_sinkhorn_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads must be a multiple of n_kv_heads={self.n_kv_heads}, got {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.tokenizer_vocab_size is not None and not 1 <= self.tokenizer_vocab_size <= self.vocab_size:
            raise ValueError(f"tokenizer_vocab_size must be in [1, vocab_size={self.vocab_size}], "
                             f"got {self.tokenizer_vocab_size}")
        if len(self.ffn_kinds) != self.n_layers:
            raise ValueError(f"ffn_kinds needs one entry per layer ({self.n_layers}), got {self.ffn_kinds}")
        for kind in self.ffn_kinds:
            if kind not in FFN_KINDS:
                raise ValueError(f"ffn_kinds entries must be one of {FFN_KINDS}, got {kind!r}")
        if "moe" in self.ffn_kinds and self.moe is None:
            raise ValueError(f"ffn_kinds {self.ffn_kinds} has MoE layers but moe is None")
        if self.engram is not None:
            if self.engram.variant != "demo":
                raise ValueError(f"engram.variant {self.engram.variant!r}: EngramLM builds the demo variant's layers; "
                                 "DeepSeek-V4.1's Engram layers load with engram.load_deepseek_v41_engram (its "
                                 "backbone is not part of this package)")
            if self.engram.tokenizer != self.tokenizer:
                raise ValueError(f"engram.tokenizer {self.engram.tokenizer!r} must be the model's tokenizer "
                                 f"{self.tokenizer!r}")
            bad = [layer for layer in self.engram.layer_ids if layer >= self.n_layers]
            if bad:
                raise ValueError(f"engram.layer_ids {self.engram.layer_ids} name blocks past n_layers={self.n_layers}: {bad}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError(f"norm_eps and init_std must be > 0, got {self.norm_eps} and {self.init_std}")

    @property
    def engram_layer_ids(self) -> list[int]:
        return list(self.engram.layer_ids) if self.engram is not None else []

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngramLMConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown EngramLMConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngramLMConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EngramLMConfig":
        """A named preset (see :mod:`engram.model.presets`), with fields overridden by keyword."""
        from engram.model.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        data = PRESETS[name]().to_dict()
        data.update(overrides)
        return cls.from_dict(data)
