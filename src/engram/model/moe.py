"""SwiGLU feed-forward and a DeepSeek-V3 style dropless mixture of experts.

Routing: ``s = sigmoid(router(x))`` in fp32; each token takes the top-k experts of ``s + expert_bias``
(the auxiliary-loss-free balancing bias, used only for selection); the gate weights are the selected
*unbiased* scores normalised to sum 1, times ``route_scale``. Output = shared experts + gated experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engram.model.config import MoEConfig


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, ``[..., d_model]`` -> ``[..., d_model]``."""

    def __init__(self, d_model: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w3 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Dropless fine-grained MoE with shared experts; returns the FFN output (the caller adds the residual).

    After each forward: ``last_load`` ``[E]`` int64 tokens routed to each expert; ``aux_loss`` the
    sequence-wise balance loss (scalar with grad) in training mode when ``seq_aux_loss_coef > 0``, else
    None. In training mode the load is also added to ``load_accum``, which :meth:`update_bias` consumes
    (under data parallelism, all-reduce ``load_accum`` before calling it).
    """

    expert_bias: torch.Tensor
    load_accum: torch.Tensor

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"MoE d_model must be >= 1, got {d_model}")
        self.d_model = d_model
        self.cfg = cfg
        experts, hidden = cfg.num_experts, cfg.expert_dim
        self.router = nn.Linear(d_model, experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(experts, hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(experts, hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(experts, d_model, hidden))
        self.shared = (FeedForward(d_model, cfg.num_shared_experts * hidden)
                       if cfg.num_shared_experts > 0 else None)
        self.register_buffer("expert_bias", torch.zeros(experts, dtype=torch.float32))
        self.register_buffer("load_accum", torch.zeros(experts, dtype=torch.long), persistent=False)
        self.last_load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init for every weight; zero balancing bias and load statistics."""
        self.router.reset_parameters()
        for weight in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(weight.shape[-1])  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
            nn.init.uniform_(weight, -bound, bound)
        if self.shared is not None:
            for linear in (self.shared.w1, self.shared.w2, self.shared.w3):
                linear.reset_parameters()
        self.expert_bias.zero_()
        self.load_accum.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens ``x`` ``[N, D]``.

        Returns:
            scores ``[N, E]`` fp32 sigmoid affinities, experts ``[N, k]`` int64 chosen by
            ``scores + expert_bias``, gates ``[N, k]`` fp32 (the chosen unbiased scores, normalised to sum
            ``route_scale``).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), self.router.weight.float()))
        experts = (scores.detach() + self.expert_bias.float()).topk(self.cfg.top_k, dim=-1).indices
        chosen = scores.gather(-1, experts)
        gates = chosen / chosen.sum(-1, keepdim=True) * self.cfg.route_scale
        return scores, experts, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoE expects x of shape [B, T, {self.d_model}], got {tuple(x.shape)}")
        batch, length, dim = x.shape
        flat = x.reshape(-1, dim)
        scores, experts, gates = self.route(flat)
        top_k = self.cfg.top_k

        # Sort the N*k (token, expert) pairs by expert so each expert runs once on a contiguous slice.
        pair_expert = experts.reshape(-1)
        order = torch.argsort(pair_expert, stable=True)
        pair_token = order // top_k
        load = torch.bincount(pair_expert, minlength=self.cfg.num_experts)  # [E]
        routed = flat[pair_token]  # [N*k, D]
        outputs = []
        start = 0
        for expert, count in enumerate(load.tolist()):
            if count == 0:
                continue
            group = routed[start:start + count]
            hidden = F.silu(F.linear(group, self.w1[expert])) * F.linear(group, self.w3[expert])
            outputs.append(F.linear(hidden, self.w2[expert]))
            start += count
        weighted = torch.cat(outputs).float() * gates.reshape(-1)[order, None]
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device).index_add_(0, pair_token, weighted)
        out = out.to(x.dtype).view(batch, length, dim)
        if self.shared is not None:
            out = out + self.shared(x)

        self.last_load = load.detach()
        if self.training:
            self.load_accum += load
        self.aux_loss = None
        if self.training and self.cfg.seq_aux_loss_coef > 0:
            self.aux_loss = self._sequence_aux_loss(scores.view(batch, length, -1), experts.view(batch, length, -1))
        return out

    def _sequence_aux_loss(self, scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss from scores ``[B, T, E]`` and chosen experts ``[B, T, k]``."""
        num_experts, top_k = self.cfg.num_experts, self.cfg.top_k
        length = scores.shape[1]
        chosen = torch.zeros_like(scores).scatter_(-1, experts, 1.0)  # [B, T, E] one-hot of each top-k
        frac = chosen.sum(1) * (num_experts / (top_k * length))  # f_i   [B, E]
        prob = (scores / scores.sum(-1, keepdim=True)).mean(1)  # P_i   [B, E]
        return self.cfg.seq_aux_loss_coef * (frac * prob).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self) -> None:
        """``expert_bias += rate * sign(mean(load) - load)`` over the load accumulated since the last call."""
        if int(self.load_accum.sum()) == 0:
            return
        load = self.load_accum.float()
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Plain twin of :meth:`MoE.forward`: every expert on every token, weighted by a dense ``[N, E]`` gate.

    Leaves ``moe``'s statistics untouched. ``[B, T, D]`` -> ``[B, T, D]``.
    """
    flat = x.reshape(-1, x.shape[-1])
    with torch.autocast(device_type=x.device.type, enabled=False):
        scores = torch.sigmoid(flat.float() @ moe.router.weight.float().t())  # [N, E]
    chosen = (scores.detach() + moe.expert_bias.float()).topk(moe.cfg.top_k, dim=-1).indices
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
    masked = scores * selected
    gate = masked / masked.sum(-1, keepdim=True) * moe.cfg.route_scale  # [N, E], zero off the top-k
    out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
    for e in range(moe.cfg.num_experts):
        expert_out = (F.silu(flat @ moe.w1[e].t()) * (flat @ moe.w3[e].t())) @ moe.w2[e].t()
        out = out + gate[:, e:e + 1] * expert_out.float()
    out = out.to(x.dtype).view(x.shape)
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out
