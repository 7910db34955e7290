"""Parallelism applied from outside the model: row-sharded Engram tables, data parallelism, distributed checkpoints."""

from engram.parallel.distributed import DistContext, finish_distributed, init_distributed, local_rows, wrap_ddp
from engram.parallel.sharded_embedding import ShardedMultiHeadEmbedding, shard_engram_tables

__all__ = [
    "DistContext", "ShardedMultiHeadEmbedding", "finish_distributed", "init_distributed", "local_rows",
    "shard_engram_tables", "wrap_ddp",
]
