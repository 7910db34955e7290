"""Training: optimisers, the trainer and its checkpoints, Engram-vs-baseline comparisons and sweeps."""
