"""Batches drawn from a prepared corpus's tokens: random training windows, consecutive validation windows, and the
bytes each token stands for (for bits per byte)."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import torch
from tokenizers import decoders

from engram.tokenizer import load_tokenizer

SPACE_MARK = "\u2581"  # "▁": SentencePiece's space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback: one byte each


def _is_sentencepiece_style(decoder: dict[str, Any] | None) -> bool:
    """Whether a tokenizer's decoder (its ``to_str()`` JSON) turns "▁" back into spaces: Metaspace, or a sequence
    with Metaspace or Replace("▁", " ") (Llama 2, Mistral)."""
    if decoder is None:
        return False
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "Metaspace" or (part.get("type") == "Replace"
                                                   and part.get("pattern", {}).get("String") == SPACE_MARK)
               for part in parts)


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """int64 [V]: the UTF-8 bytes each token id stands for (added/special tokens 0), for bits per byte.

    ``tokenizer`` is anything :func:`engram.tokenizer.load_tokenizer` takes: byte-level (every character of a token
    string is one byte: GPT-2, Llama 3, DeepSeek) or SentencePiece-style (Llama 2, Mistral: "▁" is one space, a
    byte-fallback token ``<0xNN>`` one byte, any other character its UTF-8 bytes; the space SentencePiece puts before
    a text counts, one byte per document more than the text holds). ``V`` counts added tokens. ``ValueError`` for
    another decoder (word-level tokenizers do not say where the spaces were).
    """
    tok = load_tokenizer(tokenizer)
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    if not byte_level and not _is_sentencepiece_style(json.loads(tok.to_str()).get("decoder")):
        raise ValueError(f"token_byte_lengths needs a byte-level or SentencePiece-style tokenizer, got decoder "
                         f"{tok.decoder!r}")
    size = tok.get_vocab_size(with_added_tokens=True)
    lengths = np.zeros(size, dtype=np.int64)
    for token, token_id in tok.get_vocab(with_added_tokens=False).items():
        if byte_level or _BYTE_TOKEN.fullmatch(token):
            lengths[token_id] = len(token) if byte_level else 1
        else:
            lengths[token_id] = len(token.replace(SPACE_MARK, " ").encode())
    lengths[list(tok.get_added_tokens_decoder())] = 0
    return lengths


def _check_window(tokens: np.ndarray, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the split holds {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")


def _as_pair(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint32 [B, T+1] windows -> (inputs, targets) int64 [B, T], targets shifted by one."""
    return torch.from_numpy(windows[:, :-1].astype(np.int64)), torch.from_numpy(windows[:, 1:].astype(np.int64))


class TokenBatches:
    """Random training windows whose batch at step ``s`` is a pure function of (seed, s).

    Resuming at step ``s`` needs no other state, and every model trained with the same seed sees the
    same data in the same order.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        _check_window(tokens, batch_size, seq_len)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets): int64 [B, T] each, B windows of T+1 tokens at uniform random starts."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        return _as_pair(np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]))


def validation_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                       max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows from the start of ``tokens``, each target predicted once, in batches.

    Window ``i`` covers tokens ``[i*T, (i+1)*T]``; at most ``max_batches`` batches of ``batch_size``
    windows (the last batch may be smaller). Returns (inputs, targets) int64 [B, T] pairs.
    """
    _check_window(tokens, batch_size, seq_len)
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    count = min((len(tokens) - 1) // seq_len, max_batches * batch_size)
    starts = np.arange(count) * seq_len
    windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)])
    return [_as_pair(windows[i:i + batch_size]) for i in range(0, count, batch_size)]
