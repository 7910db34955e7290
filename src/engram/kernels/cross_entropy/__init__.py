"""Cross entropy of rows of logits, optionally overwriting them with the loss's gradient (one chunk of the
language model's loss, :mod:`engram.model.loss`)."""

from engram.kernels.cross_entropy.op import cross_entropy_rows

__all__ = ["cross_entropy_rows"]
