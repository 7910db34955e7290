"""What every inspect tool starts from: a trained model, its tokenizer, token text and corpus batches."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from engram.data.batches import validation_batches
from engram.data.corpus import INDEX_FILE, Corpus, load_or_prepare
from engram.inspection.hooks import engram_blocks
from engram.model import EngramLM
from engram.parallel.distributed import resolve_device
from engram.tokenizer import load_tokenizer, resolve_tokenizer_path
from engram.train.checkpoint import checkpoint_folder

RUN_FILE = "run.json"
_MAX_CHAR_PARTS = 4  # a UTF-8 character has at most 4 bytes, and every token holds at least one


def load_model(checkpoint: str | os.PathLike[str], device: str = "auto") -> EngramLM:
    """The model of ``checkpoint`` (see :func:`checkpoint_folder`) on ``device``, in eval mode."""
    return EngramLM.from_pretrained(checkpoint_folder(checkpoint)).to(resolve_device(device)).eval()


def model_tokenizer(model: EngramLM) -> Tokenizer:
    """The text tokenizer the model was trained with (shipped inside its checkpoint)."""
    return load_tokenizer(model.cfg.tokenizer)


def resolve_data(checkpoint: str | os.PathLike[str], data: list[str] | None) -> list[str]:
    """``data`` when given, else the ``--data`` of the training run that wrote ``checkpoint`` (its ``run.json``).

    A run folder holds ``run.json`` beside ``final/`` and ``checkpoints/step-N/``.
    """
    if data:
        return list(data)
    folder = checkpoint_folder(checkpoint).resolve()
    for parent in (folder.parent, folder.parent.parent):
        if (parent / RUN_FILE).is_file():
            return list(json.loads((parent / RUN_FILE).read_text())["train"]["data"])
    raise ValueError(f"no --data given and no {RUN_FILE} of a training run beside checkpoint {str(checkpoint)!r}: "
                     "pass --data (presets, text files or folders, or a prepared corpus)")


def model_corpus(model: EngramLM, data: list[str]) -> Corpus:
    """``data`` (presets, raw files or folders, or one prepared corpus) tokenised with the model's tokenizer."""
    return tokenizer_corpus(model.cfg.tokenizer, data)


def tokenizer_corpus(tokenizer: str, data: list[str]) -> Corpus:
    """``data`` (presets, raw files or folders, or one prepared corpus) tokenised with ``tokenizer`` (a registered
    name or a path).

    Raw sources are prepared (and cached) with that tokenizer; a prepared corpus must have been made with the
    same tokenizer file.
    """
    tokenizer_path = resolve_tokenizer_path(tokenizer)
    prepared = any((Path(entry) / INDEX_FILE).is_file() for entry in data)
    corpus = load_or_prepare(data, tokenizer=None if prepared else tokenizer, progress=False)
    digest = hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    if corpus.info.tokenizer_sha256 != digest:
        raise ValueError(f"data {data} was tokenised with {corpus.info.tokenizer!r}, not with the checkpoint's "
                         f"tokenizer {str(tokenizer_path)!r}: pass raw sources, or a corpus prepared with that file")
    return corpus


def eval_batches(model: EngramLM, corpus: Corpus, batch_size: int, seq_len: int, max_batches: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of the validation split (:func:`engram.data.batches.validation_batches`): int64
    ``[B, T]`` (inputs, targets) pairs on the model's device."""
    if seq_len > model.cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_position_embeddings="
                         f"{model.cfg.max_position_embeddings}")
    device = model.embed.weight.device
    return [(inputs.to(device), targets.to(device))
            for inputs, targets in validation_batches(corpus.tokens("val"), batch_size, seq_len, max_batches)]


def text_ids(model: EngramLM, tokenizer: Tokenizer, text: str, bos: int) -> list[int]:
    """``[bos] + tokens of text``, as training documents start; refused when empty or too long for the model."""
    if not text:
        raise ValueError("text must not be empty")
    ids = [bos] + tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) > model.cfg.max_position_embeddings:
        raise ValueError(f"text {text[:40]!r}... is {len(ids)} tokens with BOS, more than the model's "
                         f"max_position_embeddings={model.cfg.max_position_embeddings}")
    return ids


@dataclass(frozen=True)
class TokenPiece:
    """The text one token stands for.

    A character whose UTF-8 bytes are split over several tokens (common for CJK with a small byte-level
    BPE) cannot be shown per token: each of those tokens gets the whole character as ``text`` and its
    place ``part`` (1-based) among the ``parts`` tokens that spell it.
    """

    token_id: int
    text: str
    part: int = 1
    parts: int = 1

    @property
    def label(self) -> str:
        return self.text if self.parts == 1 else f"{self.text} ({self.part}/{self.parts})"


def token_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[TokenPiece]:
    """One :class:`TokenPiece` per id: decoded text, tokens that share a character grouped.

    Example (a byte-level BPE with no merge for the 3 UTF-8 bytes of 中):
        >>> [p.label for p in token_pieces(tokenizer, tokenizer.encode("中 a").ids)]  # doctest: +SKIP
        ['中 (1/3)', '中 (2/3)', '中 (3/3)', ' a']
    """
    pieces: list[TokenPiece] = []
    start = 0
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        # U+FFFD: bytes of a character that the next tokens complete (or a genuinely broken one, kept as is)
        if "\ufffd" in text and end - start < _MAX_CHAR_PARTS and end < len(ids):
            continue
        group = ids[start:end]
        pieces += [TokenPiece(token_id, text, i + 1, len(group)) for i, token_id in enumerate(group)]
        start = end
    return pieces


def output_folder(out: str | os.PathLike[str]) -> Path:
    """``out`` as a folder, created when missing; refused when it is a file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first of ``values`` below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def open_inspection(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], data: list[str] | None,
                    device: str) -> tuple[Path, list[str], EngramLM]:
    """``(output folder, data, model)`` of an inspect command over data; a model without Engram is refused
    before any data is read."""
    folder = output_folder(out)
    data = resolve_data(checkpoint, data)
    model = load_model(checkpoint, device)
    engram_blocks(model)
    return folder, data, model
