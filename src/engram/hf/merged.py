"""A retrofitted model as one standalone folder: ``AutoModelForCausalLM.from_pretrained(folder)`` (after
``import engram.hf``) gives the base model with its Engram layers, no separate adapter step.

Engram layers are modules of their own, not a change of the base's weights (as a LoRA is), so "merging" bundles:

- ``base/``: the base model's ``save_pretrained`` folder, without the Engram parameters;
- the adapter files of :func:`~engram.hf.retrofit.save_adapter` (its base fingerprint still guards the pairing);
- the tokenizer (``AutoTokenizer`` loads it from the folder);
- ``config.json`` of model type ``"engram_retrofit"``, which sends ``AutoModelForCausalLM`` to
  :class:`RetrofittedCausalLM`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from engram.hf.modeling import HUB_KWARGS, as_dtype, one_device
from engram.hf.retrofit import ATTRIBUTE, load_adapter, save_adapter

BASE_FOLDER = "base"
MODEL_TYPE = "engram_retrofit"


class EngramRetrofitConfig(PretrainedConfig):
    """``config.json`` of a merged retrofit folder: ``base_model_type`` names the base's own model type (its config
    is ``base/config.json``)."""

    model_type = MODEL_TYPE
    base_model_type: str | None = None


class RetrofittedCausalLM:
    """What ``AutoModelForCausalLM`` calls for an ``"engram_retrofit"`` folder: :meth:`from_pretrained` returns the
    base model's own class (``LlamaForCausalLM``, ...) with the Engram layers attached."""

    config_class = EngramRetrofitConfig

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *model_args: Any, config: Any = None,
                        dtype: torch.dtype | str | None = None, device_map: str | int | torch.device | None = None,
                        **kwargs: Any) -> nn.Module:
        """The base of ``folder/base`` loaded with ``AutoModelForCausalLM`` (other ``kwargs`` go to it) as saved,
        the folder's tokenizer and the adapter (:func:`~engram.hf.retrofit.load_adapter`, which refuses a base whose
        fingerprint differs: hence the cast to ``dtype`` and the move to ``device_map``'s one device come after).
        ``config`` (what ``AutoModelForCausalLM`` read) is not used."""
        folder = Path(folder)
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        device = one_device(device_map)
        options = {name: value for name, value in kwargs.items() if name not in HUB_KWARGS}
        model = AutoModelForCausalLM.from_pretrained(folder / BASE_FOLDER, *model_args, local_files_only=True,
                                                     **options)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = load_adapter(model, tokenizer, folder)
        dtype = as_dtype(dtype)
        if dtype is not None:
            model.to(dtype)
        return model if device is None else model.to(device)


def save_merged(model: nn.Module, tokenizer: Any, folder: str | os.PathLike[str]) -> Path:
    """Write retrofitted ``model`` (a transformers causal LM given Engram layers by
    :func:`~engram.hf.retrofit.retrofit` or :func:`~engram.hf.retrofit.load_adapter`) and its ``tokenizer`` (a
    transformers tokenizer) as one folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Example:
        >>> base = AutoModelForCausalLM.from_pretrained("my-llama")  # doctest: +SKIP
        >>> model = load_adapter(base, tokenizer, "notes-adapter")  # doctest: +SKIP
        >>> save_merged(model, tokenizer, "my-llama-notes")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("my-llama-notes")  # doctest: +SKIP
    """
    folder = Path(folder)
    base_state = {name: value for name, value in model.state_dict().items()
                  if name.split(".", 1)[0] != ATTRIBUTE}
    model.save_pretrained(folder / BASE_FOLDER, state_dict=base_state)
    tokenizer.save_pretrained(folder)
    save_adapter(model, folder, base_reference=BASE_FOLDER)
    EngramRetrofitConfig(base_model_type=model.config.model_type).save_pretrained(folder)
    return folder
