"""Parallelism applied from outside the model: row-sharded Engram tables, data parallelism, distributed checkpoints."""

from engram.parallel.checkpoint import gather_checkpoint_state, shard_optimizer_state, sharded_tables
from engram.parallel.distributed import (DistContext, all_reduce_sum, init_distributed, local_rows, resolve_device,
                                         sync_router_load, wrap_ddp)
from engram.parallel.sharded_embedding import (RowShard, ShardedMultiHeadEmbedding, gather_rows, row_shard,
                                                shard_engram_tables)

__all__ = [
    "DistContext", "RowShard", "ShardedMultiHeadEmbedding", "all_reduce_sum", "gather_checkpoint_state", "gather_rows",
    "init_distributed", "local_rows", "resolve_device", "row_shard", "shard_engram_tables", "shard_optimizer_state",
    "sharded_tables", "sync_router_load", "wrap_ddp",
]
