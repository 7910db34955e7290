"""A Llama-family transformers model, retrofitted with Engram or not, as an :class:`~engram.model.EngramLM`.

A Llama decoder layer is an EngramLM block with one residual stream (``hc_mult=1``) and a dense SwiGLU FFN: pre-norm
RoPE (rotate-half) grouped-query attention without biases, RMSNorm, and a retrofit's Engram added to the residual
entering the layer, as EngramLM adds it before a block's attention. :func:`to_engram_lm` copies the weights across,
so the whole toolkit reads the model: ``engram serve`` with its CUDA-graph decode and per-tenant memory patches
(``engram tune`` on the exported folder), table placements, ``engram inspect``. Mistral converts when it has no
sliding window.

Refused, with the field named: attention or MLP biases (Qwen2), per-head q/k norms (Qwen3), an activation other than
SiLU, RoPE scaling, a sliding window, other layouts (GPT-2).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engram.hashing import NgramHasher
from engram.hf.retrofit import ATTRIBUTE, EngramRetrofit
from engram.model import EngramLM, EngramLMConfig
from engram.model.serialization import TOKENIZER_NAME
from engram.tokenizer import load_tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def _rope_theta(config: Any) -> float:
    """RoPE's base from a transformers config (``rope_parameters`` in transformers 5, ``rope_theta`` before);
    ``ValueError`` for a scaled RoPE."""
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"rope_type {kind!r}: EngramLM's RoPE is unscaled (rope_type 'default')")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_exportable(config: Any) -> None:
    """``ValueError`` naming what of ``config`` (a transformers ``PretrainedConfig``) an EngramLM cannot hold."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {config.model_type!r}: EngramLM holds the Llama family "
                         f"{SUPPORTED_MODEL_TYPES} (pre-norm RoPE GQA, SwiGLU, no biases)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"{flag}=True: EngramLM's projections have no bias")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r}: EngramLM's FFN is SwiGLU (silu)")
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"sliding_window={config.sliding_window}: EngramLM's attention sees the whole context")
    _rope_theta(config)


def engram_lm_config(config: Any, tokenizer_file: str, tokenizer_vocab_size: int,
                     retrofit: EngramRetrofit | None) -> EngramLMConfig:
    """The :class:`EngramLMConfig` of a Llama-family ``config`` (a transformers ``PretrainedConfig``), reading its
    tokenizer from ``tokenizer_file``, with ``retrofit``'s Engram layers when given."""
    check_exportable(config)
    engram = replace(retrofit.cfg, tokenizer=tokenizer_file) if retrofit is not None else None
    layers = config.num_hidden_layers
    return EngramLMConfig(
        tokenizer=tokenizer_file, vocab_size=config.vocab_size,
        tokenizer_vocab_size=min(tokenizer_vocab_size, config.vocab_size), d_model=config.hidden_size,
        n_layers=layers, n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        rope_theta=_rope_theta(config), max_position_embeddings=config.max_position_embeddings,
        ffn_kinds=["dense"] * layers, dense_ffn_dim=config.intermediate_size, moe=None, hc_mult=1, engram=engram,
        tie_embeddings=bool(config.tie_word_embeddings), norm_eps=config.rms_norm_eps)


def _state_dict(model: nn.Module, cfg: EngramLMConfig, retrofit: EngramRetrofit | None) -> dict[str, torch.Tensor]:
    """``model``'s weights under EngramLM's names."""
    source = model.state_dict()
    state = {"embed.weight": source["model.embed_tokens.weight"], "norm.weight": source["model.norm.weight"]}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = source["lm_head.weight"]
    names = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
             "attn.o_proj": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
             "ffn.w2": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            state[f"blocks.{i}.{ours}.weight"] = source[f"model.layers.{i}.{theirs}.weight"]
    if retrofit is not None:
        for name, tensor in retrofit.layers.state_dict().items():
            layer, rest = name.split(".", 1)
            state[f"blocks.{layer}.engram.{rest}"] = tensor
    return state


def same_hashing(a: NgramHasher, b: NgramHasher) -> bool:
    """Whether two hashers give every token sequence the same rows: the same fingerprint but for the tokenizer
    file's digest (transformers may rewrite a tokenizer's JSON when it loads it), and the same compression table."""
    def rows(hasher: NgramHasher) -> dict[str, object]:
        return {key: value for key, value in hasher.fingerprint().items() if key != "tokenizer_sha256"}

    return rows(a) == rows(b) and np.array_equal(a.tokenizer.lookup, b.tokenizer.lookup)


def to_engram_lm(model: nn.Module, tokenizer_file: str | os.PathLike[str]) -> EngramLM:
    """``model`` (a ``LlamaForCausalLM`` or ``MistralForCausalLM``, retrofitted with :func:`engram.hf.retrofit` or
    not) as an :class:`EngramLM` with the same weights, on the same device and dtype, in eval mode.

    Args:
        model: the transformers model.
        tokenizer_file: the model's ``tokenizer.json``; a retrofit's hashing must read it as it read the tokenizer
            it was built with (:func:`same_hashing`).
    Raises:
        ValueError: a model an EngramLM cannot hold (see the module doc), or a tokenizer file that hashes other rows
            than the retrofit's.
    """
    retrofit = getattr(model, ATTRIBUTE, None)
    tokenizer_file = str(tokenizer_file)
    vocab = load_tokenizer(tokenizer_file).get_vocab_size(with_added_tokens=True)
    cfg = engram_lm_config(model.config, tokenizer_file, vocab, retrofit)
    hasher = None
    if retrofit is not None:
        hasher = NgramHasher(cfg.engram)
        if not same_hashing(hasher, retrofit.hasher):
            raise ValueError(f"{tokenizer_file} hashes other rows than the tokenizer the Engram layers were built "
                             "with: pass the model's own tokenizer.json")
    weight = model.get_input_embeddings().weight
    engram_lm = EngramLM(cfg, hasher=hasher).to(device=weight.device, dtype=weight.dtype)
    engram_lm.load_state_dict(_state_dict(model, cfg, retrofit), strict=True)
    return engram_lm.eval()


def export_engram_lm(model: nn.Module, tokenizer: Any, folder: str | os.PathLike[str]) -> Path:
    """Write ``model`` (see :func:`to_engram_lm`) as an EngramLM ``save_pretrained`` folder with its tokenizer:
    ``EngramLM.from_pretrained(folder)``, ``engram serve --checkpoint folder`` and ``engram tune`` read it.

    ``tokenizer``: the model's tokenizer (a transformers fast tokenizer or a ``tokenizers.Tokenizer``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_file = folder / TOKENIZER_NAME
    tokenizer_file.write_text(load_tokenizer(tokenizer).to_str())  # to_str: the bytes the retrofit's hash digested
    return to_engram_lm(model, tokenizer_file).save_pretrained(folder)
