"""Multi-head n-gram hashing of every Engram layer in one launch (prefill and single-token decode)."""

from engram.kernels.hash.naive import DEAD_TOKEN
from engram.kernels.hash.op import ngram_hash, ngram_hash_decode

__all__ = ["DEAD_TOKEN", "ngram_hash", "ngram_hash_decode"]
