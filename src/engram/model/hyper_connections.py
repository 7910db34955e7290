"""mHC: Manifold-Constrained Hyper-Connections (DeepSeek, arXiv 2512.24880).

The residual state of a token is ``M = hc_mult`` parallel streams ``X`` of width ``D``
(tensor ``[B, T, M, D]``). Every sublayer owns one :class:`HyperConnection` that reads the
sublayer input as a sigmoid-weighted mix of the streams and writes the new streams as a
doubly stochastic mix of the old ones plus a gated copy of the sublayer output:

    u      = sum_i H_pre[i] * X[i]
    X'[j]  = sum_i H_res[j, i] * X[i] + H_post[j] * sublayer(u)

with per-token coefficients computed in fp32 from the RMS-normalised flattened streams.
:func:`expand_streams` starts the streams from the embedding, :class:`StreamMerge` collapses
them at the end of the network.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from engram.kernels.sinkhorn import sinkhorn
from engram.kernels.sinkhorn.naive import SINKHORN_FLOOR

_ALPHA_INIT = 0.01


def sinkhorn_knopp(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` towards the doubly stochastic matrices.

    Starts from ``exp(logits - rowmax) + SINKHORN_FLOOR`` and then, ``iters`` times, normalises the
    rows and then the columns to sum 1. On CUDA one Triton kernel runs all the iterations for a block of tokens,
    and one more the backward (recomputing them); elsewhere plain autograd flows through every iteration
    (:func:`engram.kernels.sinkhorn.naive.naive_sinkhorn`, the twin the kernels are tested against).

    The last step normalises columns, so column sums are 1 up to fp32 rounding; row sums converge
    linearly for logits of moderate spread (within 1e-3 after 20 iterations for logits of std <~ 0.5,
    the regime of mHC's ``alpha * raw + bias``), but only like ``O(1 / iters)`` for near-triangular
    matrices, which logits with a spread of tens produce: those need thousands of iterations.

    Args:
        logits: ``[..., M, M]`` any float dtype; computed in fp32.
        iters: number of (row, column) normalisation rounds, >= 1.

    Returns:
        ``[..., M, M]`` fp32, non-negative.

    Example:
        >>> p = sinkhorn_knopp(torch.randn(3, 4, 4) * 0.5, iters=20)
        >>> bool(torch.allclose(p.sum(-1), torch.ones(3, 4), atol=1e-3))
        True
    """
    return sinkhorn(logits, iters)


def expand_streams(x: Tensor, hc_mult: int) -> Tensor:
    """Copy the embedding ``x`` ``[B, T, D]`` into ``hc_mult`` streams ``[B, T, M, D]``.

    The result is a broadcast view (no memory is copied): out-of-place arithmetic on it is fine
    (which is all :class:`HyperConnection` does); in-place writes raise instead of corrupting ``x``.
    """
    if hc_mult < 1:
        raise ValueError(f"hc_mult must be >= 1, got {hc_mult}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, T, D], got {tuple(x.shape)}")
    return x.unsqueeze(-2).expand(-1, -1, hc_mult, -1)


def _check_streams(streams: Tensor, hc_mult: int, d_model: int) -> None:
    if streams.dim() != 4 or streams.shape[-2] != hc_mult or streams.shape[-1] != d_model:
        raise ValueError(f"streams must have shape [B, T, hc_mult={hc_mult}, d_model={d_model}], "
                         f"got {tuple(streams.shape)}")


def _check_dims(hc_mult: int, d_model: int, eps: float, init_std: float) -> None:
    if hc_mult < 1:
        raise ValueError(f"hc_mult must be >= 1, got {hc_mult}")
    if d_model < 1:
        raise ValueError(f"d_model must be >= 1, got {d_model}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not init_std >= 0:
        raise ValueError(f"init_std must be >= 0, got {init_std}")


def mix_streams(weights: Tensor, streams: Tensor) -> Tensor:
    """``out[..., j, :] = sum_i weights[..., j, i] * streams[..., i, :]``: ``[B, T, J, M]`` x ``[B, T, M, D]`` ->
    ``[B, T, J, D]``.

    Eager it is one batched matmul. Under ``torch.compile`` it is written as M broadcast multiply-adds, which
    inductor fuses with their neighbours: as a matmul it lowers to a batched GEMV over B*T tiny matrices (in
    forward and backward), which made a compiled ``hc_mult=4`` training step 3x the ``hc_mult=1`` one on an H200.
    """
    if torch.compiler.is_compiling():
        return sum(weights[..., i, None] * streams[..., i, None, :] for i in range(streams.shape[-2]))
    return weights @ streams


def _normalised_projection(streams: Tensor, phi: Tensor, eps: float) -> Tensor:
    """``(x~ @ phi) / r`` with ``x~ = flatten(streams)`` ``[B, T, M*D]`` and ``r = sqrt(mean(x~^2) + eps)``, fp32."""
    flat = streams.float().flatten(-2)
    inv_rms = torch.rsqrt(flat.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (flat @ phi.float()) * inv_rms


class _StreamProjection(nn.Module):
    """Parameters shared by mHC modules: ``phi`` ``[M*D, n]``, ``alpha`` ``[gains]`` and ``bias`` ``[n]``.

    ``reset_parameters`` sets phi ~ N(0, init_std^2), alpha = 0.01, bias = 0.
    """

    def __init__(self, hc_mult: int, d_model: int, n_coef: int, n_gains: int, eps: float, init_std: float):
        super().__init__()
        _check_dims(hc_mult, d_model, eps, init_std)
        self.hc_mult = hc_mult
        self.d_model = d_model
        self.eps = eps
        self.init_std = init_std
        self.phi = nn.Parameter(torch.empty(hc_mult * d_model, n_coef))
        self.alpha = nn.Parameter(torch.empty(n_gains))
        self.bias = nn.Parameter(torch.empty(n_coef))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.phi, mean=0.0, std=self.init_std)
        nn.init.constant_(self.alpha, _ALPHA_INIT)
        nn.init.zeros_(self.bias)


class HyperConnection(_StreamProjection):
    """The mHC wrapper of one sublayer (attention or FFN); its coefficients are its own.

    Parameters:
        phi: ``[M*D, M*M + 2*M]``, columns ordered ``[pre (M) | post (M) | res (M*M, row-major: res[j, i]
            at column 2*M + j*M + i)]``; the RMSNorm weight on ``x~`` is folded into it.
        alpha: ``[3]`` gains of the (pre, post, res) logits, init 0.01.
        bias: ``[M*M + 2*M]`` static logits, same column order as ``phi``, init 0.

    The stream update uses ``H_res`` as ``X'[j] = sum_i H_res[j, i] X[i]`` (not its transpose; both
    are doubly stochastic, so either keeps the stream mean and total gain).

    Example:
        >>> hc = HyperConnection(hc_mult=4, d_model=8)
        >>> streams = expand_streams(torch.randn(2, 5, 8), hc_mult=4)
        >>> hc(streams, torch.tanh).shape
        torch.Size([2, 5, 4, 8])
    """

    def __init__(self, hc_mult: int, d_model: int, sinkhorn_iters: int = 20, eps: float = 1e-6,
                 init_std: float = 0.02):
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        super().__init__(hc_mult, d_model, hc_mult * hc_mult + 2 * hc_mult, 3, eps, init_std)
        self.sinkhorn_iters = sinkhorn_iters

    def extra_repr(self) -> str:
        return f"hc_mult={self.hc_mult}, d_model={self.d_model}, sinkhorn_iters={self.sinkhorn_iters}"

    def coefficients(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token mixing coefficients of ``streams`` ``[B, T, M, D]``.

        Returns:
            ``h_pre [B, T, M]`` in (0, 1), ``h_post [B, T, M]`` in (0, 2), ``h_res [B, T, M, M]``
            doubly stochastic, all fp32.
        """
        _check_streams(streams, self.hc_mult, self.d_model)
        m = self.hc_mult
        raw = _normalised_projection(streams, self.phi, self.eps)
        alpha = self.alpha.float()
        gain = torch.cat([alpha[0].expand(m), alpha[1].expand(m), alpha[2].expand(m * m)])
        logits = raw * gain + self.bias.float()
        h_pre = torch.sigmoid(logits[..., :m])
        h_post = 2.0 * torch.sigmoid(logits[..., m:2 * m])
        h_res = sinkhorn_knopp(logits[..., 2 * m:].unflatten(-1, (m, m)), self.sinkhorn_iters)
        return h_pre, h_post, h_res

    def forward(self, streams: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """Run ``sublayer`` ``[B, T, D] -> [B, T, D]`` (its pre-norm included) under mHC.

        Args:
            streams: ``[B, T, M, D]``, not modified.
            sublayer: called once on ``u`` ``[B, T, D]`` cast to ``streams.dtype``.

        Returns:
            New streams ``[B, T, M, D]`` in ``streams.dtype`` (mixing done in fp32).
        """
        h_pre, h_post, h_res = self.coefficients(streams)
        x = streams.float()
        u = mix_streams(h_pre.unsqueeze(-2), x).squeeze(-2)
        y = sublayer(u.to(streams.dtype))
        if y.shape != u.shape:
            raise ValueError(f"sublayer must return shape {tuple(u.shape)} (its input's), got {tuple(y.shape)}")
        out = mix_streams(h_res, x) + h_post.unsqueeze(-1) * y.float().unsqueeze(-2)
        return out.to(streams.dtype)


def hyper_connection_reference(hc: HyperConnection, streams: Tensor,
                               sublayer: Callable[[Tensor], Tensor]) -> Tensor:
    """Loop-based twin of ``hc(streams, sublayer)`` for tests: per-stream loops, explicit Sinkhorn.

    Args:
        streams: ``[B, T, M, D]``.

    Returns:
        ``[B, T, M, D]`` in ``streams.dtype``.
    """
    _check_streams(streams, hc.hc_mult, hc.d_model)
    m, d = hc.hc_mult, hc.d_model
    x = streams.float()
    flat = x.reshape(*x.shape[:2], m * d)
    r = torch.linalg.vector_norm(flat, dim=-1, keepdim=True) / math.sqrt(m * d)
    raw = (flat @ hc.phi.float()) / torch.sqrt(r * r + hc.eps)
    alpha, bias = hc.alpha.float(), hc.bias.float()

    h_pre = [torch.sigmoid(alpha[0] * raw[..., i] + bias[i]) for i in range(m)]
    h_post = [2.0 * torch.sigmoid(alpha[1] * raw[..., m + j] + bias[m + j]) for j in range(m)]
    res = [[alpha[2] * raw[..., 2 * m + j * m + i] + bias[2 * m + j * m + i] for i in range(m)] for j in range(m)]

    row_max = [torch.stack(res[j], dim=-1).amax(dim=-1) for j in range(m)]
    p = [[torch.exp(res[j][i] - row_max[j]) + SINKHORN_FLOOR for i in range(m)] for j in range(m)]
    for _ in range(hc.sinkhorn_iters):
        for j in range(m):
            row_sum = sum(p[j][i] for i in range(m))
            p[j] = [p[j][i] / row_sum for i in range(m)]
        for i in range(m):
            col_sum = sum(p[j][i] for j in range(m))
            for j in range(m):
                p[j][i] = p[j][i] / col_sum

    u = sum(h_pre[i].unsqueeze(-1) * x[:, :, i] for i in range(m))
    y = sublayer(u.to(streams.dtype)).float()
    new = [sum(p[j][i].unsqueeze(-1) * x[:, :, i] for i in range(m)) + h_post[j].unsqueeze(-1) * y
           for j in range(m)]
    return torch.stack(new, dim=2).to(streams.dtype)


class StreamMerge(_StreamProjection):
    """End of the network: a learned per-token sigmoid-weighted sum of the streams (DeepSeek-V4 style).

    ``w = sigmoid(alpha * (x~ @ phi) / r + bias)`` ``[B, T, M]``, output ``sum_i w_i X_i`` ``[B, T, D]``.
    At init (alpha = 0.01, bias = 0) every ``w_i`` is ~0.5, so expanded identical streams merge to
    ~``M / 2`` times the embedding; the final norm that follows removes that scale.

    Parameters:
        phi: ``[M*D, M]``, alpha: ``[1]`` (init 0.01), bias: ``[M]`` (init 0).

    Example:
        >>> StreamMerge(hc_mult=3, d_model=8)(torch.randn(2, 5, 3, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, hc_mult: int, d_model: int, eps: float = 1e-6, init_std: float = 0.02):
        super().__init__(hc_mult, d_model, hc_mult, 1, eps, init_std)

    def extra_repr(self) -> str:
        return f"hc_mult={self.hc_mult}, d_model={self.d_model}"

    def weights(self, streams: Tensor) -> Tensor:
        """Merge weights ``[B, T, M]`` in (0, 1), fp32, of ``streams`` ``[B, T, M, D]``."""
        _check_streams(streams, self.hc_mult, self.d_model)
        raw = _normalised_projection(streams, self.phi, self.eps)
        return torch.sigmoid(raw * self.alpha.float() + self.bias.float())

    def forward(self, streams: Tensor) -> Tensor:
        """``[B, T, M, D]`` -> ``[B, T, D]`` in ``streams.dtype``."""
        w = self.weights(streams)
        return mix_streams(w.unsqueeze(-2), streams.float()).squeeze(-2).to(streams.dtype)
