"""Multi-head n-gram hashing, bit-exact with DeepSeek's public Engram demo (docs/design.md §2).

For a layer ``l`` with odd multipliers ``m_0..m_{N-1}`` (N = max_ngram_size) and compressed ids ``x``:
``mix_n(t) = (x_t * m_0) XOR (x_{t-1} * m_1) XOR ... XOR (x_{t-n+1} * m_{n-1})`` for each order
``n = 2..N``, positions before the start reading the compressed pad id; head ``j`` of order ``n``
reads row ``mix_n(t) mod p_{n,j}`` of its own table, ``p_{n,j}`` a distinct prime. Multipliers are
below ``int64max // V'`` (V' the compressed vocabulary), so every product fits in int64.

Dead positions (``dead_mask``, and tokens of the config's ``dead_token_ids``: DeepSeek-V4.1's image token): a
look-back that reaches one stops, so that position and every older one read the pad id, and the model gives dead
positions gate 0. Across chunks and decode steps the ``history`` carries dead-ness as :data:`DEAD_TOKEN` in place
of an id.
"""

from __future__ import annotations

import numpy as np
import torch

from engram.config import EngramConfig, table_sizes_for
from engram.kernels.hash import DEAD_TOKEN, ngram_hash, ngram_hash_decode
from engram.kernels.hash.naive import FAST_MOD_MAX_PRIME
from engram.tokenizer import RULES_VERSION, CompressedTokenizer

_LAYER_SEED_STRIDE = 10007
# Token ids are int32 or int64: a narrower integer cannot hold a large vocabulary's ids, which wrapped around silently
# when they were cast to it.
TOKEN_ID_DTYPES = (torch.int32, torch.int64)


def check_token_batch(ids: torch.Tensor, name: str = "input_ids", allow_no_tokens: bool = False) -> None:
    """Refuse a ``[B, T]`` batch of token ids that is empty (``B`` or ``T`` is 0; ``T = 0`` passes with
    ``allow_no_tokens``), not of integers (``TypeError``) or of integers narrower than int32 (``ValueError``). Reads
    only the shape and dtype: no device sync."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"{name} has dtype {ids.dtype}, too narrow for token ids (larger ids would have wrapped "
                         "around): pass int32 or int64")
    if ids.shape[0] == 0 or (ids.shape[-1] == 0 and not allow_no_tokens):
        raise ValueError(f"{name} is an empty batch of shape {tuple(ids.shape)}: B and T must both be >= 1")


def multipliers_for(cfg: EngramConfig, compressed_vocab_size: int) -> dict[int, list[int]]:
    """Odd multipliers per layer, drawn exactly as the demo draws them (NumPy PCG64, int64)."""
    max_long = np.iinfo(np.int64).max
    half_bound = max(1, (max_long // compressed_vocab_size) // 2)
    result = {}
    for layer_id in cfg.layer_ids:
        rng = np.random.default_rng(int(cfg.seed + _LAYER_SEED_STRIDE * layer_id))
        draws = rng.integers(low=0, high=half_bound, size=(cfg.max_ngram_size,), dtype=np.int64)
        result[layer_id] = [int(r) * 2 + 1 for r in draws]
    return result


# Fingerprint fields added after tables were first saved, with the value every table saved before had.
FINGERPRINT_DEFAULTS: dict[str, object] = {"variant": "demo"}


def complete_fingerprint(saved: dict[str, object]) -> dict[str, object]:
    """A saved :meth:`NgramHasher.fingerprint` with the fields it predates set to :data:`FINGERPRINT_DEFAULTS`."""
    return {**FINGERPRINT_DEFAULTS, **saved}


class NgramHasher:
    """Row ids of every Engram layer's tables for a batch of token ids.

    Attributes:
        multipliers: ``{layer_id: [m_0, ..., m_{N-1}]}`` python ints.
        table_sizes: ``{layer_id: [[p per head] per order]}`` primes.
        pad_id: the compressed pad id written before the start of every sequence.

    Example:
        >>> hasher = NgramHasher(EngramConfig())
        >>> ids = torch.tensor([[100, 2000, 30000]])
        >>> hasher.hash(ids, layer_id=1).shape        # [B, T, (max_ngram_size - 1) * n_head_per_ngram]
        torch.Size([1, 3, 16])
    """

    def __init__(self, cfg: EngramConfig, tokenizer: CompressedTokenizer | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else CompressedTokenizer.from_tokenizer(cfg.tokenizer)
        if cfg.pad_id >= self.tokenizer.original_vocab_size:
            raise ValueError(
                f"pad_id must be a token id of the tokenizer (0..{self.tokenizer.original_vocab_size - 1}), got {cfg.pad_id}"
            )
        if cfg.compressed_vocab_size is not None and len(self.tokenizer) != cfg.compressed_vocab_size:
            raise ValueError(f"compressed_vocab_size is {cfg.compressed_vocab_size} but tokenizer {cfg.tokenizer!r} "
                             f"maps onto {len(self.tokenizer)} canonical ids")
        self.pad_id = int(self.tokenizer.lookup[cfg.pad_id])
        self.multipliers = multipliers_for(cfg, len(self.tokenizer))
        self.table_sizes = table_sizes_for(cfg)
        # known on the host, so the hash kernel's launch needs no device read (and traces into a compiled graph)
        self.fast_mod = max(p for sizes in self.table_sizes.values() for order in sizes for p in order) \
            < FAST_MOD_MAX_PRIME
        self._device_constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def fingerprint(self) -> dict[str, object]:
        """Everything that decides which rows a token reads; saved beside trained tables and checked on load."""
        return {
            "variant": self.cfg.variant,
            "seed": self.cfg.seed,
            "layer_ids": list(self.cfg.layer_ids),
            "max_ngram_size": self.cfg.max_ngram_size,
            "pad_id": self.cfg.pad_id,
            "table_sizes": {str(layer): self.flat_table_sizes(layer) for layer in self.cfg.layer_ids},
            "multipliers": {str(layer): list(self.multipliers[layer]) for layer in self.cfg.layer_ids},
            "tokenizer_sha256": self.tokenizer.digest,
            "rules_version": RULES_VERSION,
        }

    @property
    def context(self) -> int:
        """Tokens of history a position needs (``max_ngram_size - 1``)."""
        return self.cfg.max_ngram_size - 1

    def flat_table_sizes(self, layer_id: int) -> list[int]:
        """Table size of every head of a layer, in row-id column order (order 2 heads first)."""
        self._check_layer(layer_id)
        return [p for order in self.table_sizes[layer_id] for p in order]

    def _check_layer(self, layer_id: int) -> None:
        if layer_id not in self.table_sizes:
            raise ValueError(f"layer_id {layer_id} is not an Engram layer; layer_ids are {self.cfg.layer_ids}")

    def _prepared(self, input_ids: torch.Tensor, history: torch.Tensor | None, dead_mask: torch.Tensor | None,
                  allow_no_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Checked ``input_ids`` ``[B, T]`` with :data:`DEAD_TOKEN` at dead positions, and ``history`` left-filled
        with the original pad id to ``[B, max_ngram_size - 1]`` (``None`` stays ``None``), both int64 on the
        ids' device."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        check_token_batch(input_ids, allow_no_tokens=allow_no_tokens)
        if dead_mask is not None:
            dead_mask = torch.as_tensor(dead_mask, device=input_ids.device)
            if dead_mask.dtype != torch.bool or dead_mask.shape != input_ids.shape:
                raise ValueError(f"dead_mask must be a bool tensor shaped like input_ids {list(input_ids.shape)}, "
                                 f"got {dead_mask.dtype} {list(dead_mask.shape)}")
        dead_mask = self.dead_positions(input_ids, dead_mask)
        if dead_mask is None:
            self.tokenizer.check_ids(input_ids)
            raw = input_ids.long()
        else:
            self.tokenizer.check_ids(input_ids.masked_fill(dead_mask, 0))
            raw = input_ids.long().masked_fill(dead_mask, DEAD_TOKEN)
        if history is None:
            return raw, None
        history = torch.as_tensor(history, device=input_ids.device)
        batch = input_ids.shape[0]
        if history.dim() != 2 or history.shape[0] != batch or history.shape[1] > self.context:
            raise ValueError(
                f"history must be [B={batch}, H<={self.context}] original ids, got shape {tuple(history.shape)}"
            )
        dead_history = self.dead_positions(history)
        if dead_history is not None:
            history = history.masked_fill(dead_history, DEAD_TOKEN)
        self.tokenizer.check_ids(history.masked_fill(history == DEAD_TOKEN, 0))
        missing = self.context - history.shape[1]
        if missing:
            history = torch.cat([history.new_full((batch, missing), self.cfg.pad_id), history], dim=1)
        return raw, history.long()

    def dead_positions(self, input_ids: torch.Tensor, dead_mask: torch.Tensor | None = None
                       ) -> torch.Tensor | None:
        """``dead_mask`` or'ed with the positions of ``input_ids`` (any shape) that hold one of
        ``cfg.dead_token_ids``: bool, shaped like ``input_ids``; ``dead_mask`` itself when the config has none."""
        if not self.cfg.dead_token_ids:
            return dead_mask
        by_id = torch.isin(input_ids, torch.tensor(self.cfg.dead_token_ids, device=input_ids.device))
        return by_id if dead_mask is None else by_id | dead_mask

    def hash(self, input_ids: torch.Tensor, layer_id: int, history: torch.Tensor | None = None,
             dead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Row ids inside each head's table for one Engram layer.

        Args:
            input_ids: ``[B, T]`` original token ids (int32 or int64, ``B, T >= 1``, any device).
            layer_id: one of ``cfg.layer_ids``.
            history: optional ``[B, H <= max_ngram_size - 1]`` original ids preceding ``input_ids`` (oldest first,
                :data:`DEAD_TOKEN` where dead), so that hashing a sequence in pieces equals hashing it whole
                (decoding with a KV cache); :meth:`next_history` gives it.
            dead_mask: optional ``[B, T]`` bool, ``True`` at dead positions (see :meth:`hash_all`).
        Returns:
            ``[B, T, (max_ngram_size - 1) * n_head_per_ngram]`` int64, column ``(n - 2) * K + j`` for head
            ``j`` of order ``n``, each value in ``[0, table_sizes[layer_id][n - 2][j])``.
        """
        self._check_layer(layer_id)
        return self.hash_all(input_ids, history, dead_mask=dead_mask)[layer_id]

    def hash_all(self, input_ids: torch.Tensor, history: torch.Tensor | None = None,
                 force: bool | None = None, dead_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """:meth:`hash` for every Engram layer at once: ``{layer_id: [B, T, H]}``.

        ``dead_mask`` ``[B, T]`` bool marks dead positions (e.g. image placeholders): a look-back that reaches
        one stops there, so it and every older position read the pad id (a dead position's own rows are those
        of an all-pad n-gram, and the model gives it gate 0: pass it the same mask). Positions (of
        ``input_ids`` and ``history``) holding one of ``cfg.dead_token_ids`` (DeepSeek-V4.1: its image token)
        are dead without a mask. Ids at dead positions are not read (nor checked). To continue in the next chunk
        or decode step, pass ``history=`` :meth:`next_history` of this call's arguments: it carries dead
        positions as :data:`DEAD_TOKEN`.

        On CUDA one Triton launch computes every layer, order and head; elsewhere the same algorithm runs as
        torch ops (``engram.kernels.hash``). ``force`` as in :func:`engram.kernels.dispatch.use_triton`.
        """
        raw, history = self._prepared(torch.as_tensor(input_ids), history, dead_mask)
        lookup, multipliers, primes = self._stacked_constants(raw.device)
        rows = ngram_hash(raw, lookup, multipliers, primes, self.pad_id, history, force, fast_mod=self.fast_mod)
        return dict(zip(self.cfg.layer_ids, rows.unbind(0)))

    def next_history(self, input_ids: torch.Tensor, history: torch.Tensor | None = None,
                     dead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The ``history`` for the tokens that follow ``input_ids``: ``[B, max_ngram_size - 1]`` int64.

        The last ``max_ngram_size - 1`` original ids of ``history`` + ``input_ids`` (oldest first), with
        :data:`DEAD_TOKEN` at dead positions and the original pad id before the start of the sequence. It is
        also the in-place history of :func:`engram.kernels.hash.ngram_hash_decode`.

        Example:
            >>> # hasher as in the class example (max_ngram_size 3); position 2 is dead
            >>> ids, dead = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[False, False, True, False]])
            >>> history = hasher.next_history(ids[:, :3], dead_mask=dead[:, :3])
            >>> rows = hasher.hash_all(ids[:, 3:], history=history, dead_mask=dead[:, 3:])
            >>> history.tolist()
            [[6, -1]]
        """
        raw, history = self._prepared(torch.as_tensor(input_ids), history, dead_mask, allow_no_tokens=True)
        if history is None:
            history = raw.new_full((raw.shape[0], self.context), self.cfg.pad_id)
        return torch.cat([history, raw], dim=1)[:, -self.context:].contiguous()

    def hash_step(self, new_ids: torch.Tensor, history: torch.Tensor) -> dict[int, torch.Tensor]:
        """Decoding: the row ids of one new token per sequence for every layer, ``{layer_id: [B, H]}``, advancing
        ``history`` in place (:func:`engram.kernels.hash.ngram_hash_decode`, one launch on CUDA).

        Args:
            new_ids: ``[B]`` int64 original ids, :data:`DEAD_TOKEN` at dead positions.
            history: ``[B, max_ngram_size - 1]`` contiguous int64, :meth:`next_history` of the tokens before.
        Nothing is checked against the vocabulary and nothing is read back to the host, so the call traces into a
        compiled graph and a CUDA graph (the constants must be on the device already: :meth:`prepare`).
        """
        lookup, multipliers, primes = self._stacked_constants(new_ids.device)
        rows = ngram_hash_decode(new_ids, history, lookup, multipliers, primes, self.pad_id, fast_mod=self.fast_mod)
        return dict(zip(self.cfg.layer_ids, rows.unbind(0)))

    def prepare(self, device: torch.device | str) -> None:
        """Put the hashing constants on ``device`` now, not inside the first (compiled) call: filling the cache
        there would make ``torch.compile`` recompile on the second call."""
        self._stacked_constants(torch.device(device))

    def _stacked_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compression lookup ``[V]``, multipliers ``[L, N]`` and primes ``[L, N - 1, K]`` on ``device``."""
        if device not in self._device_constants:
            layers = self.cfg.layer_ids
            self._device_constants[device] = (
                torch.from_numpy(self.tokenizer.lookup).to(device),
                torch.tensor([self.multipliers[layer] for layer in layers], dtype=torch.int64, device=device),
                torch.tensor([self.table_sizes[layer] for layer in layers], dtype=torch.int64, device=device),
            )
        return self._device_constants[device]
