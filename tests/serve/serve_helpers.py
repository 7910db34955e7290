"""Helpers of the server tests: auth headers, overlays that a prompt really reads, patch files."""

from pathlib import Path

import torch

from engram.memory.patch import MemoryPatch, model_fingerprint, save_patch
from engram.model import EngramLM, RowOverlay


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def overlay_for(model: EngramLM, prompt_ids: list[int] | tuple[int, ...], seed: int) -> RowOverlay:
    """An overlay replacing every table row ``prompt_ids`` reads with large random values (it changes the output)."""
    hash_ids = model.hasher.hash_all(torch.tensor([prompt_ids]))
    layers = {}
    gen = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        if block.engram is None:
            continue
        table = block.engram.multi_head_embedding
        rows = table.flat_row_ids(hash_ids[block.layer_idx]).flatten().unique()  # sorted
        layers[block.layer_idx] = (rows, 3 * torch.randn(rows.shape[0], table.head_dim, generator=gen))
    return RowOverlay(layers)


def write_patch(model: EngramLM, path: Path, overlay: RowOverlay, dense: bool = False) -> Path:
    """``overlay`` saved as a memory patch of ``model``; ``dense`` adds a replaced dense tensor (gate-tuned)."""
    extra = {}
    if dense:
        name = next(name for name in model.state_dict() if name.endswith("key_norm.weight"))
        extra = {name: model.state_dict()[name].clone()}
    patch = MemoryPatch(dict(overlay.layers), base_fingerprint=model_fingerprint(model), dense=extra)
    return save_patch(patch, path)
