"""SwiGLU feed-forward and a DeepSeek-V3 style dropless mixture of experts.

Routing: ``s = sigmoid(router(x))`` in fp32; each token takes the top-k experts of ``s + expert_bias``
(the auxiliary-loss-free balancing bias, used only for selection); the gate weights are the selected
*unbiased* scores normalised to sum 1, times ``route_scale``. Output = shared experts + gated experts.

The routed experts run as three grouped GEMMs (``torch._grouped_mm``) over the (token, expert) pairs sorted
by expert, with static shapes and no host sync, so the MoE traces into one ``torch.compile`` graph; where
this torch or device has no grouped GEMM for the compute dtype, a per-expert loop (one host sync) runs
instead. :func:`grouped_mm_supported` and :meth:`MoE.experts_backend` tell which runs.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engram.model.config import MoEConfig

ExpertsImpl = Literal["auto", "grouped", "loop"]
EXPERTS_IMPLS: tuple[str, ...] = ("auto", "grouped", "loop")


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """One tiny ``torch._grouped_mm`` forward (with an empty group) on ``device``: does this torch run it?"""
    try:
        x = torch.ones(3, 8, dtype=dtype, device=device)
        w = torch.ones(2, 8, 8, dtype=dtype, device=device)
        offsets = torch.tensor([0, 3], dtype=torch.int32, device=device)
        out = torch._grouped_mm(x, w, offs=offsets)
        return bool((out == 8).all())
    except (RuntimeError, NotImplementedError):
        return False


@torch.compiler.assume_constant_result
def _grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """:func:`grouped_mm_supported` short of the compile rule; a trace-time constant under torch.compile."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # CUDA has a grouped kernel for bf16 on Hopper and newer; elsewhere torch loops over the groups itself.
    if device.type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (9, 0)):
        return False
    return _grouped_mm_runs(device, dtype)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`MoE` can run its experts as grouped GEMMs on ``device`` with ``dtype`` operands.

    True where this torch has ``torch._grouped_mm`` and it runs for ``dtype`` on ``device`` (probed once per
    device and dtype), except: on CUDA only bf16 on compute capability >= 9.0 (Hopper) qualifies, and
    under ``torch.compile`` only bf16 (torch's shape function for the op accepts no other dtype).
    """
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    return _grouped_mm_available(device, dtype)


def grouped_row_align(dtype: torch.dtype) -> int:
    """Rows per 16 bytes of ``dtype``: grouped GEMM strides and group offsets must be multiples of it
    (8 for bf16, 4 for fp32)."""
    return max(1, 16 // dtype.itemsize)


def grouped_layout(pair_expert: torch.Tensor, counts: torch.Tensor, align: int
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Place the (token, expert) pairs in a grouped-GEMM buffer, on the device, with no host sync.

    Each expert's pairs occupy one contiguous group (in pair order) starting at a multiple of ``align``. The
    buffer's row count is static, ``P + min(E, P) * (align - 1)`` rounded up to ``align``, enough for any
    routing; the last group's end is set to that row count so every row belongs to a group.

    Args:
        pair_expert: ``[P]`` int64 expert of each pair.
        counts: ``[E]`` int64 pairs routed to each expert.
        align: group starts are multiples of this.

    Returns:
        slots ``[P]`` int64 buffer row of each pair, offsets ``[E]`` int32 cumulative group ends (the
        ``offs`` of ``torch._grouped_mm``), and the buffer's row count.
    """
    pairs, num_experts = pair_expert.shape[0], counts.shape[0]
    rows = -(-(pairs + min(num_experts, pairs) * (align - 1)) // align) * align
    padded = (counts + align - 1) // align * align
    padded_end = padded.cumsum(0)
    order = torch.argsort(pair_expert, stable=True)
    sorted_expert = pair_expert[order]
    rank = torch.arange(pairs, device=pair_expert.device) - (counts.cumsum(0) - counts)[sorted_expert]
    slots = torch.empty_like(order).scatter_(0, order, (padded_end - padded)[sorted_expert] + rank)
    offsets = torch.cat([padded_end[:-1], padded_end.new_full((1,), rows)]).to(torch.int32)
    return slots, offsets, rows


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype where autocast is on for its device, else its own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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

    ``experts_impl`` picks how the routed experts run: ``"grouped"`` (grouped GEMMs, sync-free),
    ``"loop"`` (one matmul chain per expert; reads the load on the host) or ``"auto"`` (grouped where
    :meth:`experts_backend` allows it).
    """

    expert_bias: torch.Tensor
    load_accum: torch.Tensor

    def __init__(self, d_model: int, cfg: MoEConfig, experts_impl: ExpertsImpl = "auto"):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"MoE d_model must be >= 1, got {d_model}")
        self.d_model = d_model
        self.cfg = cfg
        self.experts_impl = experts_impl
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

    @property
    def experts_impl(self) -> ExpertsImpl:
        return self._experts_impl

    @experts_impl.setter
    def experts_impl(self, impl: ExpertsImpl) -> None:
        if impl not in EXPERTS_IMPLS:
            raise ValueError(f"MoE experts_impl must be one of {EXPERTS_IMPLS}, got {impl!r}")
        self._experts_impl = impl

    def experts_backend(self, device: torch.device, dtype: torch.dtype) -> Literal["grouped", "loop"]:
        """How the routed experts run for inputs on ``device`` computed in ``dtype`` (see :func:`compute_dtype`).

        ``"auto"`` gives ``"grouped"`` where :func:`grouped_mm_supported` and both ``d_model`` and
        ``expert_dim`` are multiples of :func:`grouped_row_align` (16-byte rows), else ``"loop"``.
        """
        align = grouped_row_align(dtype)
        aligned = self.d_model % align == 0 and self.cfg.expert_dim % align == 0
        if self.experts_impl == "grouped" and not aligned:
            raise ValueError(f"grouped MoE experts in {dtype} need d_model and expert_dim to be multiples of "
                             f"{align}, got {self.d_model} and {self.cfg.expert_dim}")
        if self.experts_impl != "auto":
            return self.experts_impl
        return "grouped" if aligned and grouped_mm_supported(device, dtype) else "loop"

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

        pair_expert = experts.reshape(-1)  # [N*k] the (token, expert) pairs, token-major
        # Not bincount: its output size depends on the data, which torch.compile cannot trace.
        load = torch.zeros(self.cfg.num_experts, dtype=torch.long, device=x.device)
        load = load.scatter_add_(0, pair_expert, torch.ones_like(pair_expert))  # [E]
        dtype = compute_dtype(flat)
        if self.experts_backend(x.device, dtype) == "grouped":
            pair_out = self._grouped_experts(flat, pair_expert, load, dtype)
        else:
            pair_out = self._looped_experts(flat, pair_expert, load)
        # Summing each token's k gated outputs (not index_add_) keeps the combine deterministic.
        out = (pair_out.view(batch * length, self.cfg.top_k, dim).float() * gates.unsqueeze(-1)).sum(1)
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

    def _grouped_experts(self, flat: torch.Tensor, pair_expert: torch.Tensor, load: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
        """Each pair's expert output by three grouped GEMMs in ``dtype``, sync-free with static shapes.

        ``flat`` ``[N, D]``, ``pair_expert`` ``[N*k]``, ``load`` ``[E]`` -> ``[N*k, D]`` in ``dtype``, pair order.
        Padding rows of the buffer are zeros, so they compute exact zeros forward and backward.
        """
        tokens, dim = flat.shape
        top_k = self.cfg.top_k
        slots, offsets, rows = grouped_layout(pair_expert, load, grouped_row_align(dtype))
        pairs = flat.to(dtype).unsqueeze(1).expand(tokens, top_k, dim).reshape(tokens * top_k, dim)
        buffer = torch.zeros(rows, dim, dtype=dtype, device=flat.device).index_copy(0, slots, pairs)
        w1, w3, w2 = (w.to(dtype).transpose(-2, -1) for w in (self.w1, self.w3, self.w2))
        hidden = F.silu(torch._grouped_mm(buffer, w1, offs=offsets)) * torch._grouped_mm(buffer, w3, offs=offsets)
        return torch._grouped_mm(hidden, w2, offs=offsets)[slots]

    def _looped_experts(self, flat: torch.Tensor, pair_expert: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """Each pair's expert output, one expert at a time over its contiguous slice of the sorted pairs.

        Same contract as :meth:`_grouped_experts` (dtype as the matmuls give it); reads ``load`` on the host.
        """
        order = torch.argsort(pair_expert, stable=True)
        routed = flat[order // self.cfg.top_k]  # [N*k, D] sorted by expert
        outputs = []
        start = 0
        for expert, count in enumerate(load.tolist()):
            if count == 0:
                continue
            group = routed[start:start + count]
            hidden = F.silu(F.linear(group, self.w1[expert])) * F.linear(group, self.w3[expert])
            outputs.append(F.linear(hidden, self.w2[expert]))
            start += count
        by_expert = torch.cat(outputs)
        return by_expert.new_empty(by_expert.shape).index_copy(0, order, by_expert)

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
