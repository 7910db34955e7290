"""Configuration of the Engram memory, with the field names and defaults of DeepSeek's public demo."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engram.tokenizer import NAMED_TOKENIZERS


@dataclass
class EngramConfig:
    """Everything that decides which table rows a token reads (and how wide they are).

    Field names and defaults follow ``engram_demo_v1.py`` of deepseek-ai/Engram, except that the
    tokenizer is named by ``tokenizer`` (a registered name such as ``"deepseek-v3"`` or a path to a
    ``tokenizer.json``) instead of a model-hub id: nothing here ever contacts a hub.

    Example:
        >>> cfg = EngramConfig(engram_vocab_size=[1000, 1000], layer_ids=[0])
        >>> EngramConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    tokenizer: str = "deepseek-v3"  # registered name or path to a tokenizer.json
    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])  # prime search start per order 2..max_ngram_size
    max_ngram_size: int = 3  # orders 2..max_ngram_size are hashed
    n_embed_per_ngram: int = 512  # memory width per order, split evenly over the heads
    n_head_per_ngram: int = 8  # hash heads (tables) per order
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])  # 0-based blocks that hold an Engram
    pad_id: int = 2  # original token id used before the start of a sequence (compressed before use)
    seed: int = 0  # multiplier seed; layer l uses seed + 10007 * l
    kernel_size: int = 4  # ShortConv kernel; its dilation is max_ngram_size

    def __post_init__(self) -> None:
        self.engram_vocab_size = [int(v) for v in self.engram_vocab_size]
        self.layer_ids = [int(v) for v in self.layer_ids]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its value."""
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"tokenizer must be a registered name or a path, got {self.tokenizer!r}")
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size needs one size per n-gram order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1} values), got {self.engram_vocab_size}"
            )
        for size in self.engram_vocab_size:
            if size < 2:
                raise ValueError(f"engram_vocab_size entries must be >= 2, got {size} in {self.engram_vocab_size}")
        if self.n_head_per_ngram < 1:
            raise ValueError(f"n_head_per_ngram must be >= 1, got {self.n_head_per_ngram}")
        if self.n_embed_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram must be a positive multiple of n_head_per_ngram={self.n_head_per_ngram}, "
                f"got {self.n_embed_per_ngram}"
            )
        if not self.layer_ids:
            raise ValueError("layer_ids must name at least one layer, got []")
        for layer_id in self.layer_ids:
            if layer_id < 0:
                raise ValueError(f"layer_ids must be >= 0, got {layer_id} in {self.layer_ids}")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must not repeat, got {self.layer_ids}")
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel_size}")
        known = NAMED_TOKENIZERS.get(self.tokenizer)
        # Tokenizers given by path are checked when the hasher loads them (see NgramHasher).
        upper = known.vocab_size if known else None
        if self.pad_id < 0 or (upper is not None and self.pad_id >= upper):
            raise ValueError(
                f"pad_id must be a token id of tokenizer {self.tokenizer!r} (0..{upper - 1 if upper else 'size-1'}), "
                f"got {self.pad_id}"
            )

    @property
    def num_orders(self) -> int:
        """Number of hashed n-gram orders (``max_ngram_size - 1``)."""
        return self.max_ngram_size - 1

    @property
    def num_heads(self) -> int:
        """Rows read per token per layer: ``(max_ngram_size - 1) * n_head_per_ngram``."""
        return self.num_orders * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Width of one head's row: ``n_embed_per_ngram // n_head_per_ngram``."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """Width of a token's memory vector: ``(max_ngram_size - 1) * n_embed_per_ngram``."""
        return self.num_orders * self.n_embed_per_ngram

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngramConfig":
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown EngramConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngramConfig":
        return cls.from_dict(json.loads(text))
