"""Train a small byte-level BPE tokenizer on a corpus (for models that must train fast on a CPU).

The DeepSeek-V3 vocabulary (129,280 rows) makes the LM head cost ~50 MFLOP per token at d_model 64,
which is most of a tiny model's compute; a 4k-8k vocabulary trained on the corpus itself removes that.
Special tokens take ids 0, 1, 2 (``<|bos|>``, ``<|eos|>``, ``<|pad|>``), matching DeepSeek-V3's BOS id 0
and the demo's Engram ``pad_id`` 2. Training is deterministic for the same texts in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram.atomic import atomic_path

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike[str]) -> Path:
    """Train a byte-level BPE of ``vocab_size`` ids on ``texts`` and write its ``tokenizer.json``.

    Example:
        >>> path = train_bpe_tokenizer(["to be or not to be"] * 10, 300, "/tmp/bpe.json")
        >>> Tokenizer.from_file(str(path)).token_to_id("<|bos|>")
        0
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        tokenizer.save(str(tmp))
    return out_path
