"""Training: corpus sources and preparation, token batches, optimisers, the trainer and checkpoints."""
