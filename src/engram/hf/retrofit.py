"""Retrofit Engram layers onto a transformers causal LM (Llama, Qwen2/Qwen3, Mistral, GPT-2), and adapters of them.

:func:`retrofit` adds one :class:`engram.layer.Engram` (``hc_mult=1``) before each chosen decoder layer: its delta
is added to the residual stream ``[B, T, D]`` entering that layer, as in :class:`engram.model.lm.Block`. The row
ids are hashed from the forward's ``input_ids`` with the model's own tokenizer (through
:class:`engram.tokenizer.CompressedTokenizer`). The model's modules are left as they are: two kinds of forward
pre-hooks do the work,

- one on the backbone (``model.model`` or ``model.transformer``) reads ``input_ids``, ``attention_mask`` and the
  KV cache of the call and hashes every Engram layer's ids once;
- one on each chosen decoder layer replaces its ``hidden_states`` by ``hidden_states + Engram(hidden_states)``.

The Engram layers live in ``model.engram_retrofit`` (an :class:`EngramRetrofit`), so ``model.parameters()``,
``.to()`` and ``state_dict()`` include them. The value rows of the projection start at zero, so the delta is
exactly 0 and the logits are bit-identical to the base model's until training moves them.

Limits: a forward needs ``input_ids`` (``inputs_embeds`` alone cannot be hashed: ``ValueError``). Cached
generation works (greedy or sampled ``generate()``): when the call carries a KV cache the hashing history and the
ShortConv state are kept for the next call, and a cache of length 0 starts a new sequence; a cache reordered
behind its back (beam search) or shared by interleaved sequences is not followed. Token ids must lie in the
tokenizer's vocabulary (a model with a padded embedding table may not be fed the padding ids). Gradient
checkpointing is untested.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engram.atomic import atomic_path, atomic_write_text
from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.layer import Engram
from engram.memory.patch import hash_tensor
from engram.tokenizer import CompressedTokenizer

ATTRIBUTE = "engram_retrofit"  # the submodule of the retrofitted model that holds the Engram layers
ADAPTER_CONFIG = "engram_adapter.json"
ADAPTER_WEIGHTS = "engram_adapter.safetensors"
ADAPTER_FORMAT = "engram-retrofit-adapter"
# config keys that change when the same weights are saved, reloaded or cast: left out of the fingerprint
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype")


class EngramRetrofit(nn.Module):
    """The Engram layers of a retrofitted model (``layers[str(i)]`` before decoder layer ``i``) and the state of the
    forward in flight: hashed row ids, token mask and, while decoding with a KV cache, the hashing history and the
    ShortConv inputs of the positions already seen."""

    def __init__(self, cfg: EngramConfig, hasher: NgramHasher, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.hasher = hasher
        self.layers = nn.ModuleDict({str(i): Engram(cfg, i, hidden_size, 1, hasher=hasher) for i in cfg.layer_ids})
        for engram in self.layers.values():
            _zero_value_rows(engram, hidden_size)
        self._hash_ids: dict[int, torch.Tensor] = {}
        self._token_mask: torch.Tensor | None = None
        self._history: torch.Tensor | None = None
        self._conv_states: dict[int, torch.Tensor] | None = None

    def start(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Backbone pre-hook: hash ``input_ids`` ``[B, T]`` for every layer, continuing the previous call's sequence
        when the call's KV cache already holds tokens."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("a model retrofitted with Engram needs input_ids (inputs_embeds alone cannot be hashed)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        continuing = cache is not None and cache.get_seq_length() > 0
        if continuing and (self._history is None or self._history.shape[0] != input_ids.shape[0]):
            raise ValueError("the KV cache continues a sequence this Engram retrofit did not see start")
        history = self._history if continuing else None
        self._hash_ids = self.hasher.hash_all(input_ids, history)
        self._history = None if cache is None else self.hasher.next_history(input_ids, history)
        self._conv_states = None if cache is None else (self._conv_states if continuing else {})
        mask = kwargs.get("attention_mask")
        has_mask = isinstance(mask, torch.Tensor) and mask.dim() == 2
        self._token_mask = mask[:, -input_ids.shape[1]:].bool() if has_mask else None

    def add(self, layer_id: int, module: nn.Module, args: tuple,
            kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Decoder-layer pre-hook: its ``hidden_states`` ``[B, T, D]`` plus layer ``layer_id``'s Engram delta."""
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = self.layers[str(layer_id)].add_to(hidden, hash_ids=self._hash_ids[layer_id],
                                                   conv_states=self._conv_states, token_mask=self._token_mask)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def _zero_value_rows(engram: Engram, hidden_size: int) -> None:
    """Zero W_V and its bias (rows ``[0, D)`` of the demo's "value,keys" projection): v = 0, so the delta is 0."""
    with torch.no_grad():
        engram.value_key_proj.weight[:hidden_size].zero_()
        engram.value_key_proj.bias[:hidden_size].zero_()


def _backbone_and_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder stack of a causal LM: ``model.model.layers`` (Llama, Qwen2/3, Mistral) or ``model.transformer.h``
    (GPT-2); ``ValueError`` for another layout."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner, inner.layers
    inner = getattr(model, "transformer", None)
    if isinstance(getattr(inner, "h", None), nn.ModuleList):
        return inner, inner.h
    raise ValueError(f"retrofit supports causal LMs with model.model.layers or model.transformer.h, "
                     f"not {type(model).__name__}")


def default_engram_config(tokenizer: CompressedTokenizer, layers: list[int], pad_id: int,
                          name: str = "retrofit") -> EngramConfig:
    """A modest Engram for a retrofit: orders 2-3, 4 heads of 64 dims each, ~one row per canonical token per head."""
    size = max(len(tokenizer), 2)
    return EngramConfig(tokenizer=name, engram_vocab_size=[size, size], n_embed_per_ngram=256, n_head_per_ngram=4,
                        layer_ids=list(layers), pad_id=pad_id)


def retrofit(model: nn.Module, tokenizer: Any, layers: list[int], engram: EngramConfig | None = None) -> nn.Module:
    """Add Engram layers before decoder layers ``layers`` of ``model``, in place; returns ``model``.

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
            ``MistralForCausalLM``, ``GPT2LMHeadModel``, ...).
        tokenizer: the model's tokenizer (a transformers fast tokenizer or a ``tokenizers.Tokenizer``): the
            hashing compresses its ids.
        layers: 0-based decoder layers that get an Engram before them.
        engram: the Engram's shape and hashing (variant ``"demo"``); its ``layer_ids`` are replaced by ``layers``
            and its ``tokenizer`` by the tokenizer's name. Default: :func:`default_engram_config` with the
            tokenizer's pad (else eos, else 0) id.
    Raises:
        ValueError: an unsupported model layout, a model already retrofitted, a layer out of range, a variant other
            than ``"demo"``.
    """
    backbone, decoder_layers = _backbone_and_layers(model)
    if hasattr(model, ATTRIBUTE):
        raise ValueError("this model is already retrofitted with Engram layers")
    bad = [i for i in layers if not 0 <= i < len(decoder_layers)]
    if bad:
        raise ValueError(f"layers {bad} are not decoder layers of this model (0..{len(decoder_layers) - 1})")
    compressed = CompressedTokenizer.from_tokenizer(tokenizer)
    name = getattr(tokenizer, "name_or_path", "") or "retrofit"
    if engram is None:
        pad = next((i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                    if i is not None), 0)
        cfg = default_engram_config(compressed, layers, pad, name)
    else:
        cfg = replace(engram, layer_ids=list(layers), tokenizer=name)
    if cfg.variant != "demo":
        raise ValueError(f"retrofit builds the 'demo' Engram (trainable float tables), not variant {cfg.variant!r}")
    embeddings = model.get_input_embeddings().weight
    holder = EngramRetrofit(cfg, NgramHasher(cfg, compressed), embeddings.shape[1])
    holder.to(device=embeddings.device, dtype=embeddings.dtype)
    model.add_module(ATTRIBUTE, holder)
    backbone.register_forward_pre_hook(holder.start, with_kwargs=True)
    for i in cfg.layer_ids:
        decoder_layers[i].register_forward_pre_hook(partial(holder.add, i), with_kwargs=True)
    return model


def _retrofit_of(model: nn.Module) -> EngramRetrofit:
    holder = getattr(model, ATTRIBUTE, None)
    if not isinstance(holder, EngramRetrofit):
        raise ValueError("this model has no Engram layers: call retrofit() first")
    return holder


def engram_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the Engram layers :func:`retrofit` added (tables, projections, norms, ShortConv)."""
    return list(_retrofit_of(model).parameters())


def freeze_base(model: nn.Module) -> list[nn.Parameter]:
    """Leave only the Engram parameters trainable (``requires_grad``); returns them, for the optimiser."""
    model.requires_grad_(False)
    params = engram_parameters(model)
    for param in params:
        param.requires_grad_(True)
    return params


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of a base model: its config (less the keys that saving, loading or casting change) as sorted JSON,
    then every parameter outside the Engram layers by name (:func:`engram.memory.patch.hash_tensor`).
    Deterministic across processes and devices."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters()):
        if name.split(".", 1)[0] != ATTRIBUTE:
            hash_tensor(digest, name, param)
    return digest.hexdigest()


def save_adapter(model: nn.Module, folder: str | os.PathLike[str], base_reference: str | None = None) -> Path:
    """Write a retrofitted model's Engram layers to ``folder``: :data:`ADAPTER_WEIGHTS` (safetensors, keys as in
    ``model.engram_retrofit.layers``) and :data:`ADAPTER_CONFIG` (the EngramConfig, the layers, the base's
    reference, default ``model.config.name_or_path``, its :func:`base_fingerprint` and the hashing fingerprint)."""
    holder = _retrofit_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in holder.layers.state_dict().items()}
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file(weights, str(tmp))
    meta = {
        "format": ADAPTER_FORMAT,
        "base_model": base_reference if base_reference is not None else model.config.name_or_path,
        "base_fingerprint": base_fingerprint(model),
        "layers": list(holder.cfg.layer_ids),
        "engram": holder.cfg.to_dict(),
        "hashing": holder.hasher.fingerprint(),
    }
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")
    return folder


def load_adapter(model: nn.Module, tokenizer: Any, folder: str | os.PathLike[str]) -> nn.Module:
    """Retrofit ``model`` (the base the adapter in ``folder`` was trained on) and load the adapter's Engram weights.

    Raises:
        ValueError: ``model`` is not the adapter's base (naming both fingerprints), ``tokenizer`` hashes other rows
            than the adapter's, or ``folder`` holds no Engram adapter.
    """
    folder = Path(folder)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{folder / ADAPTER_CONFIG} is not an Engram retrofit adapter")
    found = base_fingerprint(model)
    if found != meta["base_fingerprint"]:
        raise ValueError(f"the adapter in {folder} was trained on base {meta['base_model']!r} with fingerprint "
                         f"{meta['base_fingerprint']}; this model's fingerprint is {found}")
    cfg = EngramConfig.from_dict(meta["engram"])
    if NgramHasher(cfg, CompressedTokenizer.from_tokenizer(tokenizer)).fingerprint() != meta["hashing"]:
        raise ValueError(f"the tokenizer given hashes other rows than the adapter in {folder} was trained with")
    holder = _retrofit_of(retrofit(model, tokenizer, meta["layers"], cfg))
    device, dtype = model.get_input_embeddings().weight.device, model.get_input_embeddings().weight.dtype
    weights = {k: v.to(device=device, dtype=dtype) for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    holder.layers.load_state_dict(weights)
    return model
