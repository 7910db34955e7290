"""Small model configs shared by the model tests (fast on a 2-core CPU)."""

from engram import EngramConfig
from engram.model import EngramLMConfig
from engram.model.config import MoEConfig


def small_config(engram: bool = True, hc_mult: int = 4, use_moe: bool = True, moe: dict | None = None,
                 **overrides) -> EngramLMConfig:
    """A 3-block model; ``moe`` overrides MoEConfig fields, ``overrides`` EngramLMConfig fields."""
    fields = dict(
        vocab_size=129280, tokenizer_vocab_size=128815, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
        head_dim=8, max_position_embeddings=64, ffn_kinds=["dense", "moe", "moe"] if use_moe else ["dense"] * 3,
        dense_ffn_dim=48, moe=MoEConfig(**{**dict(num_experts=5, num_shared_experts=1, top_k=2, expert_dim=24), **(moe or {})}),
        hc_mult=hc_mult, hc_sinkhorn_iters=20,
        engram=EngramConfig(engram_vocab_size=[311, 313], n_embed_per_ngram=16, n_head_per_ngram=2,
                            layer_ids=[0, 2]) if engram else None,
        engram_conv_zero_init=False, tie_embeddings=True, init_std=0.1,
    )
    fields.update(overrides)
    return EngramLMConfig(**fields)


VARIANTS = {
    "engram-mhc4-moe": dict(engram=True, hc_mult=4, use_moe=True),
    "engram-plain-dense": dict(engram=True, hc_mult=1, use_moe=False),
    "baseline-mhc4-moe": dict(engram=False, hc_mult=4, use_moe=True),
    "baseline-plain-dense": dict(engram=False, hc_mult=1, use_moe=False),
}
