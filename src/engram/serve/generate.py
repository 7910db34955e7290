"""`engram generate`: sample text from a saved model."""

from __future__ import annotations

import os

import torch

from engram.data.corpus import bos_id
from engram.model import EngramLM
from engram.parallel.distributed import resolve_device
from engram.tokenizer import load_tokenizer
from engram.train.checkpoint import checkpoint_folder


def generate_text(checkpoint: str | os.PathLike[str], prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = 0.95,
                  seed: int | None = None, device: str = "auto") -> str:
    """The prompt followed by the model's continuation, decoded to text.

    ``checkpoint`` is a ``save_pretrained`` folder (a run's ``final/`` or one of its checkpoints), a run folder
    (its ``final/``) or a run's ``checkpoints/latest`` pointer: see :func:`engram.train.checkpoint.checkpoint_folder`.
    """
    model = EngramLM.from_pretrained(checkpoint_folder(checkpoint)).to(resolve_device(device)).eval()
    tokenizer = load_tokenizer(model.cfg.tokenizer)
    ids = [bos_id(tokenizer)] + tokenizer.encode(prompt, add_special_tokens=False).ids  # documents start with BOS
    room = model.cfg.max_position_embeddings - len(ids)
    if room < 1:
        raise ValueError(f"prompt of {len(ids)} tokens leaves no room under max_position_embeddings="
                         f"{model.cfg.max_position_embeddings}")
    input_ids = torch.tensor([ids], device=model.embed.weight.device)
    out = model.generate(input_ids, min(max_new_tokens, room), temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed)
    return tokenizer.decode(out[0, 1:].tolist(), skip_special_tokens=True)
