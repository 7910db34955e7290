"""Parallelism applied from outside the model: row-sharded Engram tables, data parallelism, distributed checkpoints."""

from engram.parallel.checkpoint import (gather_full_model, load_table_moments, sharded_tables, table_modules,
                                        write_table_shards)
from engram.parallel.distributed import (DistContext, all_reduce_sum, finish_distributed, init_distributed, local_rows,
                                         resolve_device, sync_router_load, wrap_ddp)
from engram.parallel.sharded_embedding import (RowShard, ShardedMultiHeadEmbedding, gather_rows, row_shard,
                                                shard_engram_tables)

__all__ = [
    "DistContext", "RowShard", "ShardedMultiHeadEmbedding", "all_reduce_sum", "finish_distributed", "gather_full_model",
    "gather_rows",
    "init_distributed", "load_table_moments", "local_rows", "resolve_device", "row_shard", "shard_engram_tables",
    "sharded_tables", "sync_router_load", "table_modules", "wrap_ddp", "write_table_shards",
]
