"""Row-sharded Engram tables: every rank of a process group holds one contiguous block of a table's rows.

The paper grows Engram tables past one GPU's memory this way. A lookup is two ``all_to_all`` exchanges:
each rank sends the distinct row ids its tokens read to the ranks owning them, and the owners send the rows
back; the backward pass sends each distinct row's summed gradient to its owner along the same routes.

Traffic per token per Engram layer, with ``H`` hash heads, row width ``D`` and ``s`` bytes per table element
(at most, since ids repeated in a batch are exchanged once):

- forward: 8 B per distinct id sent (int64), and ``D * s`` B per row returned;
- backward: ``D * s`` B of gradient per distinct row (the gradient has the table's dtype: 4 B for fp32).

With the defaults (16 heads, ``D = 64``, fp32) that is 16 * (8 + 256) B forward and 16 * 256 B backward per
token per layer. A rank exchanges ids and rows for its own tokens, and as an owner serves an equal share of
everyone's reads (uniform hashing), so this traffic per rank is set by its batch, not by the number of ranks
``W``: it stays constant as ranks are added (the share crossing the network, ``(W - 1) / W``, tends to all
of it) while the table capacity grows linearly with ``W``. The counters in
:attr:`ShardedMultiHeadEmbedding.traffic` count every byte handed to the exchange, the share a rank
addresses to itself (a local copy, ``~1 / W``) included.

Rank ``r`` owns the flat rows ``[r * block, (r + 1) * block)`` with ``block = ceil(R / W)``: contiguous
blocks make resharding a concatenation of the old shards cut anew, and make the owner of a row one division.
They balance load because the hash already spreads reads uniformly over every head's rows.

Every rank must run every lookup and its backward (as with DDP), even with no tokens: the exchanges are
collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engram.embedding import (MultiHeadEmbedding, check_table_geometry, head_offsets, require_float_rows,
                              through_view)
from engram.storage.store import PendingRows

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ID_BYTES = 8  # row ids travel as int64


@dataclass(frozen=True)
class RowShard:
    """Contiguous row blocks: rank r owns flat rows [start, end) with block = ceil(R / W); the last ranks may own
    fewer (or 0) rows.

    Example:
        >>> shard = RowShard(num_rows=7, rank=2, world_size=3)
        >>> shard.block, shard.start, shard.end, shard.size
        (3, 6, 7, 1)
        >>> shard.owner(torch.tensor([0, 3, 6]))
        tensor([0, 1, 2])
    """

    num_rows: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {self.num_rows}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    @property
    def block(self) -> int:
        return -(-self.num_rows // self.world_size)

    @property
    def start(self) -> int:
        return min(self.rank * self.block, self.num_rows)

    @property
    def end(self) -> int:
        return min(self.start + self.block, self.num_rows)

    @property
    def size(self) -> int:
        return self.end - self.start

    def owner(self, rows: Tensor) -> Tensor:
        """The rank holding each of the flat ``rows`` (any shape, in ``[0, num_rows)``)."""
        return torch.div(rows, self.block, rounding_mode="floor")


def row_shard(num_rows: int, rank: int, world_size: int) -> RowShard:
    """The rows rank ``rank`` of ``world_size`` owns in a table of ``num_rows`` rows (errors name a bad value)."""
    return RowShard(int(num_rows), int(rank), int(world_size))


def gather_rows(local: Tensor, shard: RowShard, group: ProcessGroup | None = None) -> Tensor:
    """This rank's rows ``[shard.size, ...]`` -> the full ``[shard.num_rows, ...]`` on every rank (collective)."""
    padded = local.new_zeros(shard.block, *local.shape[1:])  # all_gather takes equal sizes
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(shard.world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:shard.num_rows]


def _require_distributed() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ShardedMultiHeadEmbedding needs torch.distributed: launch the script with torchrun, or call "
            "torch.distributed.init_process_group(...) on every rank before building or sharding the tables")


class _ShardedLookup(torch.autograd.Function):
    """Rows of ``flat_rows`` read from the ranks owning them (module docstring); gradients go back to the owners."""

    @staticmethod
    def forward(ctx, weight: Tensor, flat_rows: Tensor, table: ShardedMultiHeadEmbedding) -> Tensor:
        shard, group = table.shard, table.group
        world, dim = shard.world_size, weight.shape[1]
        flat = flat_rows.reshape(-1).to(weight.device)  # [N]
        if table.dedup:
            # Sorted distinct rows: with contiguous blocks they come grouped by owner.
            requested, inverse = torch.unique(flat, return_inverse=True)  # [U], [N]
        else:
            order = torch.argsort(shard.owner(flat), stable=True)
            requested = flat[order]
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
        send_counts = torch.bincount(shard.owner(requested).clamp(0, world - 1), minlength=world)  # [W]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        out_of_range = ((requested < 0) | (requested >= shard.num_rows)).sum()
        counts = torch.cat([send_counts, recv_counts, out_of_range[None]]).tolist()  # one host sync
        if counts[-1]:
            raise ValueError(f"{counts[-1]} flat row ids lie outside the table's [0, {shard.num_rows}) rows")
        send_splits, recv_splits = counts[:world], counts[world:2 * world]

        received = requested.new_empty(sum(recv_splits))  # [M] ids every rank reads from this shard
        dist.all_to_all_single(received, requested, recv_splits, send_splits, group=group)
        local_rows = received - shard.start
        served = weight[local_rows]  # [M, D]
        returned = weight.new_empty(requested.numel(), dim)  # [U, D]
        dist.all_to_all_single(returned, served, send_splits, recv_splits, group=group)

        table.traffic["calls"] += 1
        table.traffic["rows_requested"] += flat.numel()
        table.traffic["rows_sent"] += requested.numel()
        table.traffic["bytes_sent"] += requested.numel() * ID_BYTES + served.numel() * served.element_size()
        ctx.save_for_backward(inverse, local_rows)
        ctx.splits = (send_splits, recv_splits)
        ctx.table = table
        return returned[inverse].view(*flat_rows.shape[:-1], flat_rows.shape[-1] * dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        inverse, local_rows = ctx.saved_tensors
        send_splits, recv_splits = ctx.splits
        table = ctx.table
        dim = table.head_dim
        grad_reads = grad.reshape(-1, dim)  # [N, D]
        grad_requested = grad_reads.new_zeros(sum(send_splits), dim).index_add_(0, inverse, grad_reads)  # [U, D]
        grad_received = grad_reads.new_empty(local_rows.numel(), dim)  # [M, D]
        dist.all_to_all_single(grad_received, grad_requested, recv_splits, send_splits, group=table.group)
        table.traffic["bytes_sent"] += grad_requested.numel() * grad_requested.element_size()
        shape = (table.shard.size, dim)
        if table.sparse:
            grad_weight = torch.sparse_coo_tensor(local_rows[None], grad_received, shape,
                                                  check_invariants=False).coalesce()
        else:
            grad_weight = grad_received.new_zeros(shape).index_add_(0, local_rows, grad_received)
        return grad_weight, None, None


class ShardedMultiHeadEmbedding(nn.Module):
    """Drop-in for MultiHeadEmbedding whose table rows are split over the ranks of a process group.

    ``weight`` ``[shard.size, head_dim]`` holds this rank's rows of the flat ``[R, head_dim]`` table (rows
    ``shard.start : shard.end``); lookups fetch other ranks' rows through ``all_to_all`` (module docstring).
    A fresh table draws its shard N(0, init_std) from this rank's RNG: seed ranks differently, or build the
    model identically on every rank and shard it (:func:`shard_engram_tables`) to get the single-process table.
    ``dedup`` exchanges each distinct row once per lookup; without it every read travels (same results).

    Example (on every rank, after ``torch.distributed.init_process_group``)::

        emb = ShardedMultiHeadEmbedding([7, 11, 13], head_dim=4)
        emb(torch.tensor([[[6, 10, 12]]])).shape   # [B, T, H] -> [B, T, H * head_dim]: torch.Size([1, 1, 12])
    """

    def __init__(self, table_sizes: list[int], head_dim: int, group: ProcessGroup | None = None,
                 sparse: bool = True, init_std: float = 1.0, dedup: bool = True,
                 device: torch.device | str | None = None):
        """``group=None`` is the default (WORLD) group; ``device="meta"`` allocates no shard (filled later)."""
        super().__init__()
        check_table_geometry(table_sizes, head_dim)
        _require_distributed()
        self.table_sizes = [int(n) for n in table_sizes]
        self.head_dim = head_dim
        self.group = group
        self.sparse = sparse
        self.init_std = init_std
        self.dedup = dedup
        self.store = None
        self.shard = row_shard(self.num_rows, dist.get_rank(group), dist.get_world_size(group))
        self.traffic = {"rows_requested": 0, "rows_sent": 0, "bytes_sent": 0, "calls": 0}
        self.register_buffer("offsets", head_offsets(self.table_sizes), persistent=False)
        self.weight = nn.Parameter(torch.empty(self.shard.size, head_dim, device=device))
        self.reset_parameters()

    @classmethod
    def from_embedding(cls, embedding: MultiHeadEmbedding, group: ProcessGroup | None = None,
                       dedup: bool = True, device: torch.device | str | None = None) -> ShardedMultiHeadEmbedding:
        """This rank's rows of ``embedding``'s table (a copy, on its device and in its dtype); same ``sparse``.

        A table allocated on the meta device (``EngramLM(cfg, table_device="meta")``) has no rows to copy: this
        rank's rows are then allocated on ``device`` and drawn N(0, init_std) from this rank's RNG, so no process
        ever holds the whole table (the shards then differ from a single-process table of the same seed).
        """
        require_float_rows(embedding, "sharding a table for training")
        if embedding.weight.is_meta:
            fresh = cls(embedding.table_sizes, embedding.head_dim, group=group, sparse=embedding.sparse,
                        init_std=embedding.init_std, dedup=dedup, device=device)
            fresh.offsets = fresh.offsets.to(fresh.weight.device)
            return fresh
        source = embedding.table()
        sharded = cls(embedding.table_sizes, embedding.head_dim, group=group, sparse=embedding.sparse,
                      init_std=embedding.init_std, dedup=dedup, device="meta")
        rows = source[sharded.shard.start:sharded.shard.end].detach().clone()
        sharded.weight = nn.Parameter(rows, requires_grad=embedding.store is None and embedding.weight.requires_grad)
        sharded.offsets = sharded.offsets.to(rows.device)
        return sharded

    num_heads = MultiHeadEmbedding.num_heads
    num_rows = MultiHeadEmbedding.num_rows
    flat_row_ids = MultiHeadEmbedding.flat_row_ids
    row_format = "float"  # sharded tables are trained: FP8 rows are read-only

    @property
    def placement(self) -> str:
        return "sharded"

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def table(self) -> Tensor:
        """The full ``[R, head_dim]`` table, assembled on every rank (a collective: every rank must call it)."""
        return gather_rows(self.weight.detach(), self.shard, self.group)

    def fetch(self, row_ids: Tensor) -> PendingRows:
        """Read ``[B, T, H]`` per-head row ids from their owners; ``wait()`` gives ``[B, T, H * head_dim]`` on the
        weight's device, through this thread's view of the table (:func:`~engram.embedding.table_views`). The
        exchange runs now (a collective), so the handle is already complete."""
        flat_rows = self.flat_row_ids(row_ids)
        return through_view(self, flat_rows, PendingRows.ready(_ShardedLookup.apply(self.weight, flat_rows, self)))

    def forward(self, row_ids: Tensor) -> Tensor:
        """``[B, T, H]`` per-head row ids -> ``[B, T, H * head_dim]`` concatenated head vectors."""
        return self.fetch(row_ids).wait()

    def extra_repr(self) -> str:
        shard = self.shard
        return (f"heads={self.num_heads}, rows={self.num_rows}, head_dim={self.head_dim}, "
                f"shard=[{shard.start}, {shard.end}) on rank {shard.rank} of {shard.world_size}, "
                f"sparse={self.sparse}, dedup={self.dedup}, placement={self.placement}")


# Modules holding an Engram table: whole, or one rank's rows of it.
TABLE_MODULES = (MultiHeadEmbedding, ShardedMultiHeadEmbedding)


def shard_engram_tables(model: nn.Module, group: ProcessGroup | None = None, dedup: bool = True,
                        device: torch.device | str | None = None) -> int:
    """Replace every :class:`MultiHeadEmbedding` under ``model`` by its :class:`ShardedMultiHeadEmbedding`; returns
    how many.

    Each keeps its attribute name, so parameter names stay ``...multi_head_embedding.weight``. Build the model
    identically (same seed) on every rank first: the shards together then hold exactly the single-process tables.
    A model built with ``table_device="meta"`` gets fresh rows on ``device`` instead, drawn per rank
    (:meth:`ShardedMultiHeadEmbedding.from_embedding`): tables larger than one process could hold.
    """
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, MultiHeadEmbedding)]
    for name, embedding in found:
        if not name:
            raise TypeError("model is itself a MultiHeadEmbedding: use ShardedMultiHeadEmbedding.from_embedding")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr,
                ShardedMultiHeadEmbedding.from_embedding(embedding, group=group, dedup=dedup, device=device))
    return len(found)
