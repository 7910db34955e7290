"""The Engram gate: per-branch RMSNorm'd key-query score, signed-sqrt sigmoid, gating the shared value."""

from engram.kernels.gate.op import fused_gate

__all__ = ["fused_gate"]
