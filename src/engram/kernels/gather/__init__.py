"""Multi-head row gather from one flat embedding table, with a deterministic sorted segmented-sum backward; and
the fused gather + dequantise of packed FP8 tables."""

from engram.kernels.gather.op import fp8_gather, multi_head_gather

__all__ = ["fp8_gather", "multi_head_gather"]
