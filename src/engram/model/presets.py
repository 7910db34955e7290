"""Named model shapes. ``EngramLMConfig.from_preset(name)`` builds them; ``param_report`` counts them.

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

from typing import Callable

from engram.config import EngramConfig
from engram.model.config import EngramLMConfig, MoEConfig

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
