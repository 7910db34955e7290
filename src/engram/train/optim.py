"""The optimiser of EngramLM: AdamW for dense weights, lazy sparse Adam for Engram tables, optional Muon.

Parameter groups (see :func:`param_groups`):

- ``tables``: every Engram memory table (the ``weight`` of a :class:`MultiHeadEmbedding`). Adam at
  ``table_lr_mult`` times the base LR (the paper's recipe), updated lazily with ``torch.optim.SparseAdam``:
  only rows present in the step's sparse gradient (the rows read) move, every other row stays
  bit-identical, moments included. ``table_weight_decay`` is decoupled decay on those rows only (an
  untouched row is never decayed, so rare n-grams keep their memory). The tables must produce
  ``torch.sparse_coo`` gradients (:func:`enable_sparse_tables`).
- ``matrices``: 2-D weights of the ``nn.Linear`` layers under a ``blocks`` module (attention, FFN, shared
  experts, Engram's value/key projection) and the 3-D MoE expert tensors. Muon when ``muon=True``, else
  AdamW with weight decay.
- ``decay``: other weights with at least 2 dims (MoE routers, the ShortConv kernel): AdamW with weight decay.
- ``no_decay``: norms, biases, all 1-D parameters, the token embedding and LM head, and the mHC coefficients
  (``phi``, ``alpha``, ``bias`` of hyper-connections and the stream merge): AdamW without weight decay.
  Embeddings and the head are lookups/readouts whose rows see few tokens each; decaying them shrinks rare
  tokens towards zero, so they are left undecayed (as in most LLaMA/DeepSeek-style recipes).

Embeddings, the LM head, routers and mHC ``phi`` never go to Muon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from engram.embedding import require_float_rows
from engram.layer import BranchRMSNorm
from engram.model.hyper_connections import HyperConnection, StreamMerge
from engram.model.moe import MoE
from engram.parallel.sharded_embedding import TABLE_MODULES

SCHEDULES = ("cosine", "step", "constant")
GROUP_NAMES = ("tables", "matrices", "decay", "no_decay")
NOT_A_FLAG = {"cli": False}  # field metadata: set in code only (engram.cli.flags)

# Quintic Newton-Schulz coefficients of Muon (Keller Jordan): pushes singular values into ~[0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

NamedParams = list[tuple[str, nn.Parameter]]


@dataclass
class OptimConfig:
    """Hyperparameters of :class:`EngramOptimizer` and its LR schedule (JSON-friendly via ``asdict``). Fields not
    marked :data:`NOT_A_FLAG` are flags of ``engram train`` and ``engram sweep`` (:mod:`engram.cli.flags`)."""

    lr: float = field(default=3e-3, metadata={"help": "peak learning rate of the dense weights (default: %(default)s)"})
    weight_decay: float = field(default=0.1, metadata={  # decoupled: "matrices" (AdamW or Muon) and "decay" groups
        "help": "AdamW weight decay of the dense weights (tables get none) (default: %(default)s)"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=NOT_A_FLAG)
    eps: float = field(default=1e-8, metadata=NOT_A_FLAG)
    table_lr_mult: float = field(default=5.0, metadata={  # Engram tables: Adam at this multiple of lr
        "help": "Engram tables' learning rate over --lr (paper: 5) (default: %(default)s)"})
    # decoupled decay applied to the rows read in a step only
    table_weight_decay: float = field(default=0.0, metadata=NOT_A_FLAG)
    muon: bool = field(default=False, metadata={"help": "Muon for hidden matrices (AdamW otherwise)"})
    # Muon's peak LR (updates are RMS-matched to AdamW's, see muon_scale)
    muon_lr: float = field(default=0.02, metadata=NOT_A_FLAG)
    muon_momentum: float = field(default=0.95, metadata=NOT_A_FLAG)
    warmup_steps: int = field(default=100, metadata={  # linear warm-up from lr / warmup_steps to lr
        "help": "steps of linear learning-rate warm-up (default: %(default)s)"})
    schedule: str = field(default="cosine", metadata={
        "choices": SCHEDULES, "help": "learning-rate decay after the warm-up (default: %(default)s)"})
    min_lr_ratio: float = field(default=0.1, metadata=NOT_A_FLAG)  # cosine: LR at max_steps is min_lr_ratio * lr
    # step: fractions of max_steps where the LR drops, and the factor of each drop
    step_decay_at: tuple[float, ...] = field(default=(0.8, 0.9), metadata=NOT_A_FLAG)
    step_decay_factor: float = field(default=0.316, metadata=NOT_A_FLAG)
    grad_clip: float = field(default=1.0, metadata={  # max global L2 norm of the dense grads; 0 disables clipping
        "help": "clip the dense weights' gradient norm to this (default: %(default)s)"})

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists back
        self.step_decay_at = tuple(float(f) for f in self.step_decay_at)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its value."""
        for name in ("lr", "eps", "table_lr_mult", "muon_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "table_weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if any(not 0.0 < f <= 1.0 for f in self.step_decay_at) or list(self.step_decay_at) != sorted(
                set(self.step_decay_at)):
            raise ValueError(f"step_decay_at must be strictly increasing fractions in (0, 1], got {self.step_decay_at}")
        if not 0.0 < self.step_decay_factor <= 1.0:
            raise ValueError(f"step_decay_factor must be in (0, 1], got {self.step_decay_factor}")


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Base LR of optimiser step ``step`` (0-based) of a ``max_steps`` run.

    Linear warm-up ``lr * (step + 1) / warmup_steps`` over the first ``warmup_steps`` steps (never 0), then:
    ``cosine`` from ``lr`` to ``min_lr_ratio * lr`` at ``max_steps`` (held there after), ``step`` multiplies
    by ``step_decay_factor`` from each step ``round(f * max_steps)`` of ``step_decay_at`` on, ``constant``.

    Example:
        >>> cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
        >>> lr_at(0, 100, cfg), lr_at(10, 100, cfg), round(lr_at(100, 100, cfg), 6)
        (0.1, 1.0, 0.1)
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    warm = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
        decay = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "step":
        drops = sum(step >= round(f * max_steps) for f in cfg.step_decay_at)
        decay = cfg.step_decay_factor ** drops
    else:
        decay = 1.0
    return cfg.lr * warm * decay


def enable_sparse_tables(model: nn.Module) -> int:
    """Make every :class:`MultiHeadEmbedding` of ``model`` produce sparse gradients; returns how many.

    ``EngramLM`` builds its tables dense-gradient; :class:`EngramOptimizer` needs sparse ones (a dense
    gradient of a billion-row table would be as large as the table). Call before the first backward. FP8 tables
    (read-only) are refused.
    """
    tables = _trainable_tables(model, "enable_sparse_tables")
    for table in tables:
        table.sparse = True
    return len(tables)


def _trainable_tables(model: nn.Module, caller: str) -> list[nn.Module]:
    """Every table module of ``model``; ``ValueError`` naming the first one that holds FP8 rows."""
    tables = []
    for name, module in model.named_modules():
        if isinstance(module, TABLE_MODULES):
            require_float_rows(module, f"training Engram table {name or 'model'!r} ({caller})")
            tables.append(module)
    return tables


def param_groups(model: nn.Module) -> dict[str, NamedParams]:
    """Trainable parameters of ``model`` by optimiser group (module docstring), in ``named_parameters`` order.

    Returns:
        ``{"tables": [...], "matrices": [...], "decay": [...], "no_decay": [...]}`` of ``(name, param)``;
        every trainable parameter appears exactly once (tied parameters under their first name).
    """
    owner: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for local_name, param in module.named_parameters(recurse=False):
            owner.setdefault(id(param), (module, local_name))
    routers = {id(m.router) for m in model.modules() if isinstance(m, MoE)}
    # By name component, so that wrappers (DDP's "module.", torch.compile's "_orig_mod.") classify alike.
    in_blocks = {id(m) for name, m in model.named_modules() if "blocks" in name.split(".")}

    groups: dict[str, NamedParams] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module, local_name = owner[id(param)]
        if isinstance(module, TABLE_MODULES) and local_name == "weight":
            group = "tables"
        elif isinstance(module, MoE) and local_name in ("w1", "w2", "w3"):
            group = "matrices"
        elif (isinstance(module, nn.Linear) and local_name == "weight" and id(module) in in_blocks
              and id(module) not in routers):
            group = "matrices"
        elif (param.dim() < 2 or local_name == "bias"
              or isinstance(module, (nn.Embedding, nn.RMSNorm, nn.LayerNorm, BranchRMSNorm, HyperConnection,
                                     StreamMerge))
              or (isinstance(module, nn.Linear) and id(module) not in in_blocks)):
            group = "no_decay"
        else:
            group = "decay"
        groups[group].append((name, param))
    return groups


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate orthogonalisation ``U V^T`` of ``g = U S V^T``, batched over leading dims of ``[..., A, B]``.

    Muon's quintic Newton-Schulz iteration (``NS_COEFFICIENTS``) on ``g`` scaled to unit Frobenius norm,
    computed in ``dtype``: the singular values come out roughly in [0.7, 1.2], not exactly 1 (by design:
    5 cheap steps beat an exact polar decomposition for training). Returned in ``g``'s dtype.
    """
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs a [..., A, B] tensor, got shape {tuple(g.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.shape[-2] > g.shape[-1]
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """``0.2 * sqrt(max(A, B))`` of an ``[..., A, B]`` update (Moonlight's match-RMS-to-AdamW rule).

    An orthogonalised ``A x B`` matrix has RMS ``~1 / sqrt(max(A, B))``; this rescales it to RMS 0.2, the
    typical RMS of an AdamW update, so AdamW-like LRs and weight decays carry over.
    """
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class Muon(torch.optim.Optimizer):
    """Muon: Nesterov momentum, then Newton-Schulz orthogonalisation, RMS-matched to AdamW, decoupled decay.

    Per parameter ``W`` ``[..., A, B]`` with gradient ``G`` (3-D expert tensors are orthogonalised per
    expert, batched over the leading dim)::

        M <- momentum * M + G
        U <- newton_schulz(G + momentum * M)          (nesterov; M when nesterov=False)
        W <- (1 - lr * weight_decay) * W - lr * muon_scale(W.shape) * U
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 0.02,
                 momentum: float = 0.95, weight_decay: float = 0.0, nesterov: bool = True, ns_steps: int = 5):
        if not lr > 0:
            raise ValueError(f"Muon lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon only takes matrices ([..., A, B]), got a parameter of shape "
                                     f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"Muon does not take sparse gradients (parameter of shape {tuple(p.shape)})")
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p.grad)
                update = p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                ortho = newton_schulz(update, group["ns_steps"])
                p.mul_(1.0 - lr * decay)
                p.add_(ortho, alpha=-lr * muon_scale(p.shape))
        return loss


class EngramOptimizer:
    """One optimiser for EngramLM: AdamW (dense), SparseAdam (Engram tables), optionally Muon (matrices).

    Every inner param group keeps its peak LR under ``"base_lr"`` (AdamW ``lr``, tables
    ``lr * table_lr_mult``, Muon ``muon_lr``); :meth:`set_lr` scales all of them by the schedule.

    Typical step::

        enable_sparse_tables(model)
        opt = EngramOptimizer(model, OptimConfig())
        for step in range(max_steps):
            opt.set_lr(step, max_steps)
            loss = model(ids, labels=ids).loss
            loss.backward()
            grad_norm = opt.clip_grad_norm()
            opt.step()
            opt.zero_grad()
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        _trainable_tables(model, "EngramOptimizer")
        self.cfg = cfg
        self.groups = param_groups(model)
        self._layout = {
            "muon": cfg.muon,
            "groups": {group: [[name, list(p.shape)] for name, p in named] for group, named in self.groups.items()},
        }
        self._tables = [p for _, p in self.groups["tables"]]
        self._table_names = {id(p): name for name, p in self.groups["tables"]}
        self._dense = [p for group in ("matrices", "decay", "no_decay") for _, p in self.groups[group]]

        def params(group: str) -> list[nn.Parameter]:
            return [p for _, p in self.groups[group]]

        adamw_groups = [
            dict(name="decay", params=params("decay"), weight_decay=cfg.weight_decay),
            dict(name="no_decay", params=params("no_decay"), weight_decay=0.0),
        ]
        if not cfg.muon:
            adamw_groups.insert(0, dict(name="matrices", params=params("matrices"), weight_decay=cfg.weight_decay))
        adamw_groups = [g for g in adamw_groups if g["params"]]
        for group in adamw_groups:
            group["base_lr"] = cfg.lr
        self._inner: dict[str, torch.optim.Optimizer] = {}
        if adamw_groups:
            # One fused kernel for every CUDA parameter instead of foreach launches per group (CPU: the default).
            on_cuda = all(p.is_cuda for group in adamw_groups for p in group["params"])
            self._inner["adamw"] = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                                     fused=True if on_cuda else None)
        if self._tables:
            table_lr = cfg.lr * cfg.table_lr_mult
            self._inner["tables"] = torch.optim.SparseAdam(
                [dict(name="tables", params=self._tables, base_lr=table_lr, weight_decay=cfg.table_weight_decay)],
                lr=table_lr, betas=cfg.betas, eps=cfg.eps)
        if cfg.muon and self.groups["matrices"]:
            self._inner["muon"] = Muon(
                [dict(name="matrices", params=params("matrices"), base_lr=cfg.muon_lr)],
                lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The inner optimisers: AdamW, then SparseAdam (if the model has tables), then Muon (if enabled)."""
        return list(self._inner.values())

    def set_lr(self, step: int, max_steps: int) -> float:
        """Set every group's LR to its ``base_lr`` times the schedule at ``step``; returns ``lr_at(step)``."""
        lr = lr_at(step, max_steps, self.cfg)
        scale = lr / self.cfg.lr
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        return lr

    def clip_grad_norm(self) -> float:
        """Clip the dense parameters' gradients to global L2 norm ``cfg.grad_clip``; returns the norm before.

        The tables' sparse gradients are neither clipped nor counted: each touched row gets Adam's
        per-row normalised update anyway, and one global norm would let the dense gradients and a varying
        number of touched rows rescale each other. A non-finite norm is returned as is (the caller may
        skip the step). ``grad_clip = 0`` only measures.
        """
        grads = [p for p in self._dense if p.grad is not None]
        if not grads:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return float(nn.utils.clip_grad_norm_(grads, max_norm))

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient.

        Raises:
            ValueError: a table's gradient is dense (the model's tables were not made sparse).
        """
        for table in self._tables:
            if table.grad is None:
                continue
            if not table.grad.is_sparse:
                raise ValueError(
                    f"Engram table {self._table_names[id(table)]!r} has a dense gradient; the sparse table "
                    "optimiser needs torch.sparse_coo gradients: call engram.train.optim.enable_sparse_tables(model) "
                    "(or build MultiHeadEmbedding with sparse=True) before the backward pass")
            table.grad = table.grad.coalesce()  # SparseAdam would coalesce too; done once here for the decay rows
        if "tables" in self._inner:
            group = self._inner["tables"].param_groups[0]
            shrink = 1.0 - group["lr"] * group["weight_decay"]
            if shrink != 1.0:
                for table in self._tables:
                    if table.grad is not None:
                        rows = table.grad.indices()[0]
                        table.index_copy_(0, rows, table.index_select(0, rows).mul_(shrink))
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter this optimiser updates."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: the parameter layout and every inner optimiser's state."""
        return {"layout": self._layout, "optimizers": {key: opt.state_dict() for key, opt in self._inner.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (group hyperparameters included, as torch optimisers do).

        Raises:
            ValueError: ``state`` was saved by an optimiser of another parameter layout or Muon setting.
        """
        if not isinstance(state, dict) or set(state) != {"layout", "optimizers"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an EngramOptimizer state dict: expected keys ['layout', 'optimizers'], got {keys}")
        saved = state["layout"]
        if saved.get("muon") != self._layout["muon"]:
            raise ValueError(f"state dict was saved with muon={saved.get('muon')}, this optimiser has "
                             f"muon={self._layout['muon']}")
        for group in GROUP_NAMES:
            mine, theirs = self._layout["groups"][group], saved.get("groups", {}).get(group, [])
            if [list(x) for x in theirs] != mine:
                diff = next((f"{t} vs {m}" for t, m in zip(theirs, mine) if list(t) != m),
                            f"{len(theirs)} vs {len(mine)} parameters")
                raise ValueError(f"state dict does not match this model's {group!r} parameters "
                                 f"(saved vs this, [name, shape]): {diff}")
        if set(state["optimizers"]) != set(self._inner):
            raise ValueError(f"state dict holds optimisers {sorted(state['optimizers'])}, this one has "
                             f"{sorted(self._inner)}")
        for key, opt in self._inner.items():
            opt.load_state_dict(state["optimizers"][key])
