"""Multi-head row gather from one flat embedding table, with a deterministic sorted segmented-sum backward."""

from engram.kernels.gather.naive import multi_head_gather_naive
from engram.kernels.gather.op import multi_head_gather

__all__ = ["multi_head_gather", "multi_head_gather_naive"]
