"""Helpers of the inspect tests."""

import dataclasses
from typing import Any

import torch

from engram.model import EngramLM


def variant(model: EngramLM, seed: int = 0, engram_fields: dict[str, Any] | None = None, **fields: Any) -> EngramLM:
    """A fresh random model with ``model``'s tokenizer, its config's ``fields`` and Engram ``engram_fields`` changed."""
    if engram_fields:
        fields["engram"] = dataclasses.replace(model.cfg.engram, **engram_fields)
    torch.manual_seed(seed)
    return EngramLM(dataclasses.replace(model.cfg, **fields)).eval()
