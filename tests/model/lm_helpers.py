"""Small model configs shared by the model tests (fast on a 2-core CPU)."""

import torch

from engram import EngramConfig
from engram.model import EngramLM, EngramLMConfig
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


def assert_same_outputs(placed, model, ids_of, forwards: int = 3, new_tokens: int = 6) -> None:
    """``placed`` (tables elsewhere) gives ``model``'s logits, left padding included, over ``forwards`` batches (a
    cache refreshes in between) and its greedy generations, bit for bit. ``ids_of(seed, batch=, length=)``
    makes token ids."""
    for seed in range(forwards):
        ids = ids_of(seed)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        assert torch.equal(placed(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    prompt = ids_of(7, batch=2, length=5)
    assert torch.equal(placed.generate(prompt, max_new_tokens=new_tokens, temperature=0),
                       model.generate(prompt, max_new_tokens=new_tokens, temperature=0))


def saved_small_model(folder, seed: int = 0, **config) -> EngramLM:
    """A :func:`small_config` model (``config``: its arguments) with weights of ``seed``, in eval mode, saved into
    ``folder``."""
    torch.manual_seed(seed)
    model = EngramLM(small_config(**config)).eval()
    model.save_pretrained(folder)
    return model
