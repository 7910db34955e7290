"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

Safe for any parameters it accepts: temperatures below :data:`GREEDY_BELOW` are greedy (as in vLLM), scores are
shifted by their row maximum before the division by the temperature (so they never overflow), and top-p keeps
the most likely token whatever ``top_p`` is (a ``top_p`` that rounds to 0 in fp32 keeps that token alone).

Two implementations of the same filtering: :func:`sample_next` (one temperature, top-k and top-p for the batch, a
``torch.Generator``; the plain reference) and :func:`sample_rows` (every row its own parameters and seed, all on the
device with no host synchronisation, so it runs inside a compiled or CUDA-graph decode step). :func:`sample_rows`
draws by inverse CDF with one uniform per row that is a hash of the row's seed and its token counter
(:func:`row_uniforms`): the ``n``-th token of a row depends on its seed, ``n`` and its own logits only, never on what
else shares the batch or on the order rows were sampled in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures below this pick the argmax: sampling there is greedy up to exact ties
SAMPLING_MODES = ("greedy", "sample", "filtered")  # what sample_rows computes, cheapest first
_MASK32 = 0xFFFFFFFF
_MAX_SEED = 2**63


def _check_parameters(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """``ValueError`` naming the value unless ``temperature`` is finite and >= 0, ``top_k`` >= 1 and ``top_p`` in
    ``(0, 1]`` (None: no top-k, no top-p)."""
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def broken_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` scores -> ``[B]`` bool: rows holding NaN or +inf, or only -inf (a broken model; some -inf are a
    valid mask)."""
    return (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1) | torch.isneginf(logits).all(dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: ``[B, V]`` scores of the next token.
        temperature: below :data:`GREEDY_BELOW` (0 included) picks the argmax (greedy); otherwise logits are
            divided by it before sampling.
        top_k: keep only the k highest logits.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (the most likely one always).
        generator: a seeded ``torch.Generator`` for reproducible sampling.
        vocab_limit: ids ``>= vocab_limit`` (embedding padding past the tokenizer) are never picked.
    Returns:
        ``[B]`` int64 token ids.
    Raises:
        ValueError: a bad parameter (see :func:`_check_parameters`), or broken rows of ``logits`` (see
            :func:`broken_rows`).
    """
    _check_parameters(temperature, top_k, top_p)
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_limit:] = float("-inf")
    raise_for_broken(broken_rows(logits))
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def raise_for_broken(broken: torch.Tensor) -> None:
    """``ValueError`` naming the rows where ``broken`` ``[B]`` (:func:`broken_rows`) is True; reads it on the host."""
    if bool(broken.any()):
        raise ValueError(f"rows {broken.nonzero()[:, 0].tolist()} of the logits hold NaN or +inf, or only -inf: "
                         "the model's output is broken")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The scores sampling draws from (the reference for one set of parameters): ``[B, V]`` fp32 logits shifted by
    their row maximum, divided by ``temperature`` (>= :data:`GREEDY_BELOW`), -inf outside the ``top_k`` highest
    (ties with the k-th kept) and outside the smallest set of most likely tokens reaching ``top_p`` (the top token
    always kept)."""
    # shifted first: every score is <= 0 and the division can only underflow to -inf, never overflow
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def filter_logits_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """:func:`filter_logits` with parameters per row, on the device (one sort, no host synchronisation).

    Args:
        logits: ``[B, V]`` fp32.
        temperature: ``[B]`` fp32; a row below :data:`GREEDY_BELOW` is scaled by 1 (its caller picks the argmax).
        top_k: ``[B]`` int64, 0 = no top-k.
        top_p: ``[B]`` fp32, 1 = no top-p.
    Returns:
        ``[B, V]`` fp32, row ``b`` equal to ``filter_logits(logits[b:b+1], temperature[b], top_k[b], top_p[b])``.
    """
    vocab = logits.shape[-1]
    scale = torch.where(temperature < GREEDY_BELOW, torch.ones_like(temperature), temperature)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / scale[:, None]
    sorted_scores, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = sorted_scores.gather(1, (k - 1)[:, None])  # [B, 1]
    keep_sorted = sorted_scores >= kth  # top-k, ties with the k-th kept (as topk + "< kth" does)
    probs = sorted_scores.masked_fill(~keep_sorted, float("-inf")).softmax(dim=-1)
    not_top = torch.arange(vocab, device=logits.device) > 0
    drop_sorted = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None] & not_top
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted & ~drop_sorted)
    return scaled.masked_fill(~keep, float("-inf"))


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` in two products below 2**48: a full 32 x 32-bit
    product would overflow int64."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, the "lowbias32" constants) of int64 ``x`` in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """``[B]`` fp32 uniforms in ``(0, 1)``, each a hash of its row's seed and counter (23 random bits).

    Args:
        seeds: ``[B]`` int64 in ``[0, 2**63)``.
        counters: ``[B]`` int64 in ``[0, 2**32)``: which token of the row is drawn.
    """
    h = _mix32((counters & _MASK32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seeds >> 32) & _MASK32))
    h = _mix32(h ^ (seeds & _MASK32))
    return ((h >> 9).float() + 0.5) * 2.0**-23


@dataclass(frozen=True)
class RowSampling:
    """How one sequence picks its tokens (checked when built, ``ValueError`` naming the value).

    ``temperature`` below :data:`GREEDY_BELOW` is greedy; ``top_k`` None and ``top_p`` None (or 1) are off; ``seed``
    in ``[0, 2**63)`` names the row's random stream (see :func:`sample_rows`).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_parameters(self.temperature, self.top_k, self.top_p)
        if not 0 <= self.seed < _MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def filtered(self) -> bool:
        """Whether sampling this row needs top-k or top-p."""
        return not self.greedy and (self.top_k is not None or (self.top_p is not None and self.top_p < 1))


def sampling_mode(rows: Iterable[RowSampling]) -> str:
    """The cheapest of :data:`SAMPLING_MODES` that serves every row: ``"greedy"`` when all are greedy, ``"filtered"``
    when one samples with top-k or top-p, else ``"sample"``."""
    rows = list(rows)
    if all(row.greedy for row in rows):
        return "greedy"
    return "filtered" if any(row.filtered for row in rows) else "sample"


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device: ``temperature`` ``[B]`` fp32, ``top_k`` ``[B]`` int64 (0: off),
    ``top_p`` ``[B]`` fp32 (1: off), ``seed`` ``[B]`` int64."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor

    @classmethod
    def of(cls, rows: Sequence[RowSampling], device: torch.device | str) -> SamplingTensors:
        """The parameters of ``rows`` (one per batch row) on ``device``."""
        return cls(torch.tensor([row.temperature for row in rows], dtype=torch.float32, device=device),
                   torch.tensor([row.top_k or 0 for row in rows], dtype=torch.int64, device=device),
                   torch.tensor([1.0 if row.top_p is None else row.top_p for row in rows], dtype=torch.float32,
                                device=device),
                   torch.tensor([row.seed for row in rows], dtype=torch.int64, device=device))

    def write(self, index: int, row: RowSampling) -> None:
        """Set batch row ``index`` to ``row``'s parameters, in place."""
        self.temperature[index] = row.temperature
        self.top_k[index] = row.top_k or 0
        self.top_p[index] = 1.0 if row.top_p is None else row.top_p
        self.seed[index] = row.seed

    def head(self, rows: int) -> SamplingTensors:
        """The first ``rows`` rows (views)."""
        return SamplingTensors(self.temperature[:rows], self.top_k[:rows], self.top_p[:rows], self.seed[:rows])


def sample_rows(logits: torch.Tensor, params: SamplingTensors, counters: torch.Tensor,
                vocab_limit: int | None = None, mode: str = "filtered") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row, each row with its own parameters; no host synchronisation.

    Greedy rows (temperature below :data:`GREEDY_BELOW`) take the argmax; the others draw from
    ``softmax(filter_logits_rows(...))`` by inverse CDF at the uniform :func:`row_uniforms` of their seed and counter.

    Args:
        logits: ``[B, V]`` scores of the next token.
        params: the rows' :class:`SamplingTensors`.
        counters: ``[B]`` int64, which token of its sequence each row draws (0 for the first).
        vocab_limit: ids ``>= vocab_limit`` are never picked.
        mode: ``"greedy"`` (every row is greedy), ``"sample"`` (no row uses top-k or top-p: no sort) or
            ``"filtered"`` (any rows); :func:`sampling_mode` picks it.
    Returns:
        ``([B] int64 token ids, [B] bool broken rows)`` (:func:`broken_rows`; a broken row's token is meaningless).
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
    scores = logits.float()
    if vocab_limit is not None and vocab_limit < scores.shape[-1]:
        scores = scores[:, :vocab_limit]
    broken = broken_rows(scores)
    greedy = scores.argmax(dim=-1)
    if mode == "greedy":
        return greedy, broken
    if mode == "filtered":
        scaled = filter_logits_rows(scores, params.temperature, params.top_k, params.top_p)
    else:
        scale = torch.where(params.temperature < GREEDY_BELOW, torch.ones_like(params.temperature),
                            params.temperature)
        scaled = (scores - scores.amax(dim=-1, keepdim=True)) / scale[:, None]
    probs = scaled.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = row_uniforms(params.seed, counters)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=scores.shape[-1] - 1)
    # a target rounded onto the total would land past the last token of positive probability
    picked = torch.where(probs.gather(1, picked[:, None]).squeeze(-1) > 0, picked, greedy)
    return torch.where(params.temperature < GREEDY_BELOW, greedy, picked), broken
