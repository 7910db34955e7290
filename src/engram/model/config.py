"""Configuration of EngramLM (backbone shape, FFN kind per layer, MoE routing, mHC and Engram) and its presets.

Named shapes (:data:`PRESETS`): ``EngramLMConfig.from_preset(name)`` builds them; ``param_report`` counts them.

- ``tiny``: trains on a 2-core CPU in minutes (about 2M backbone parameters besides the 8.3M tied
  embedding, plus 2.6M of Engram tables), all parts present: MoE, mHC 4, Engram at block 1.
- ``small``: about 130M parameters for one GPU.
- ``paper-27b-shape`` / ``paper-moe-27b-shape``: the shapes of the paper's Engram-27B and MoE-27B
  (30 blocks, d_model 2560, mHC 4, first block dense; 2 shared + 55 routed experts top-6 with Engram at
  blocks 2 and 15 (1-based) holding 5.7B table parameters, vs 2 + 72 experts without Engram). Attention
  here is GQA where the paper uses MLA, so attention counts differ a little; totals are checked against
  the paper's 26.7B total / 3.8B activated / 5.7B Engram by the tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from engram.config import DEMO_ABLATIONS, EngramConfig

FFN_KINDS = ("dense", "moe")
HC_STREAM_DTYPES = ("autocast", "float32")


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
    # dtype of the M residual streams: "autocast" keeps them in the autocast dtype (bf16) while autocast is on, as
    # DeepSeek-V4's mHC does (half the bytes of the widened residual; coefficients and mixing stay fp32);
    # "float32" keeps them in the embedding's dtype. A plain residual (hc_mult=1) always stays in the latter.
    hc_stream_dtype: str = "autocast"
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
        if self.hc_stream_dtype not in HC_STREAM_DTYPES:
            raise ValueError(f"hc_stream_dtype must be one of {HC_STREAM_DTYPES}, got {self.hc_stream_dtype!r}")
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
            if self.engram.variant not in ("demo", *DEMO_ABLATIONS):
                raise ValueError(f"engram.variant {self.engram.variant!r}: EngramLM builds the demo variant's layers "
                                 f"(or its controls {DEMO_ABLATIONS}); "
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
        """A named preset (see :data:`PRESETS`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        data = PRESETS[name]().to_dict()
        data.update(overrides)
        return cls.from_dict(data)


DEEPSEEK_V3_VOCAB = 129280  # embedding rows of DeepSeek-V3 (padded past the tokenizer)
DEEPSEEK_V3_TOKENIZER_VOCAB = 128815


def tiny() -> EngramLMConfig:
    return EngramLMConfig(
        vocab_size=DEEPSEEK_V3_VOCAB, tokenizer_vocab_size=DEEPSEEK_V3_TOKENIZER_VOCAB,
        d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, max_position_embeddings=512,
        ffn_kinds=["dense", "moe", "moe", "moe"], dense_ffn_dim=192,
        moe=MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_dim=64),
        hc_mult=4,
        engram=EngramConfig(engram_vocab_size=[20011, 20011], max_ngram_size=3, n_embed_per_ngram=64,
                            n_head_per_ngram=4, layer_ids=[1]),
        tie_embeddings=True,
    )


def small() -> EngramLMConfig:
    return EngramLMConfig(
        vocab_size=DEEPSEEK_V3_VOCAB, tokenizer_vocab_size=DEEPSEEK_V3_TOKENIZER_VOCAB,
        d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, max_position_embeddings=1024,
        ffn_kinds=["dense"] + ["moe"] * 7, dense_ffn_dim=1536,
        moe=MoEConfig(num_experts=16, num_shared_experts=1, top_k=2, expert_dim=256),
        hc_mult=4,
        engram=EngramConfig(engram_vocab_size=[20000, 20000], max_ngram_size=3, n_embed_per_ngram=256,
                            n_head_per_ngram=8, layer_ids=[1, 5]),
        tie_embeddings=True,
    )


def _paper_backbone(num_experts: int, engram: EngramConfig | None) -> EngramLMConfig:
    return EngramLMConfig(
        vocab_size=DEEPSEEK_V3_VOCAB, tokenizer_vocab_size=DEEPSEEK_V3_TOKENIZER_VOCAB,
        d_model=2560, n_layers=30, n_heads=16, n_kv_heads=2, head_dim=128, max_position_embeddings=4096,
        ffn_kinds=["dense"] + ["moe"] * 29, dense_ffn_dim=7680,
        moe=MoEConfig(num_experts=num_experts, num_shared_experts=2, top_k=6, expert_dim=1536, route_scale=2.5,
                      seq_aux_loss_coef=1e-4),
        hc_mult=4, engram=engram, tie_embeddings=False, init_std=0.006,
    )


def paper_27b_shape() -> EngramLMConfig:
    engram = EngramConfig(engram_vocab_size=[1_113_000, 1_113_000], max_ngram_size=3, n_embed_per_ngram=1280,
                          n_head_per_ngram=8, layer_ids=[1, 14])
    return _paper_backbone(55, engram)


def paper_moe_27b_shape() -> EngramLMConfig:
    return _paper_backbone(72, None)


PRESETS: dict[str, Callable[[], EngramLMConfig]] = {
    "tiny": tiny,
    "small": small,
    "paper-27b-shape": paper_27b_shape,
    "paper-moe-27b-shape": paper_moe_27b_shape,
}
