"""Engram's ShortConv: per-branch RMSNorm, token mask, causal depthwise dilated conv over time, SiLU."""

from engram.kernels.shortconv.op import fused_short_conv

__all__ = ["fused_short_conv"]
