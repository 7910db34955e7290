"""The specification of :func:`~engram.kernels.cross_entropy.cross_entropy_rows` in plain torch."""

from __future__ import annotations

import torch


def naive_cross_entropy_rows(logits: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor,
                             row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[c]`` cross entropy of every row of ``logits`` ``[c, V]`` (any float dtype, read as fp32) against
    ``safe`` int64 ``[c]`` targets, 0 where ``valid`` (bool ``[c]``) is false (``safe`` is then any index in range).

    With ``row_scale`` (fp32 ``[c]``, 0 where not valid), ``logits`` is overwritten with the gradient of
    ``sum(row_scale * losses)`` with respect to it, ``(softmax - onehot(safe)) * row_scale``, in its own dtype.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    index = safe[:, None]
    losses = torch.where(valid, lse - x.gather(1, index).squeeze(1), 0.0)
    if row_scale is not None:
        grad = x.sub_(lse[:, None]).exp_()
        grad.scatter_(1, index, grad.gather(1, index).sub_(1.0))
        logits.copy_(grad.mul_(row_scale[:, None]))
    return losses
