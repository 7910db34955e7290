"""Patch files written around MemoryPatch's checks: what a hostile or damaged file on disk may hold."""

from pathlib import Path

import torch
from safetensors.torch import save_file

import engram.memory.patch as patch_module


def write_raw_patch(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """``tensors`` saved as a patch file with ``header`` (``base_fingerprint``, ``metadata``: either may be left out)
    and the checksum a valid patch of them would have, so that only the content is wrong."""
    checksum = patch_module._checksum(tensors, header.get("base_fingerprint", ""), header.get("metadata", ""))
    save_file(tensors, str(path), metadata={"format": patch_module.FORMAT,
                                            "format_version": str(patch_module.FORMAT_VERSION),
                                            "checksum": checksum, **header})
    return path
