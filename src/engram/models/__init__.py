"""Loaders of other models' Engram: :mod:`~engram.models.deepseek_v41` (DeepSeek-V4.1 checkpoints, without the
backbone). The model this package trains is :mod:`engram.model`."""
