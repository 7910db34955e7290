"""Memories as patches over a base model: tune, save, apply, revert, merge, diff, look up and edit table rows.

- :mod:`~engram.memory.patch`: :class:`MemoryPatch` (the rows that changed, with the base's fingerprint), its
  file format and the operations on it;
- :mod:`~engram.memory.edit`: :func:`lookup` (what a text reads, collisions, gates) and :func:`write_ngram`;
- :mod:`~engram.memory.tune`: memory-only fine-tuning into a patch (:func:`~engram.memory.tune.tune_memory`);
  serving a patch per request without applying it is :class:`engram.model.RowOverlay`.
"""

from engram.memory.edit import lookup, ngram_rows, write_ngram
from engram.memory.patch import (MemoryPatch, apply_patch, check_patch, diff, load_patch, merge, model_fingerprint,
                                 revert, save_patch)

__all__ = [
    "MemoryPatch", "apply_patch", "check_patch", "diff", "load_patch", "lookup", "merge", "model_fingerprint",
    "ngram_rows", "revert", "save_patch", "write_ngram",
]
