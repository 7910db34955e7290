"""Sinkhorn-Knopp projection towards the doubly stochastic matrices (mHC's residual mixing ``H_res``)."""

from engram.kernels.sinkhorn.op import sinkhorn

__all__ = ["sinkhorn"]
