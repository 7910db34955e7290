"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

Safe for any parameters it accepts: temperatures below :data:`GREEDY_BELOW` are greedy (as in vLLM), scores are
shifted by their row maximum before the division by the temperature (so they never overflow), and top-p keeps
the most likely token whatever ``top_p`` is (a ``top_p`` that rounds to 0 in fp32 keeps that token alone).
"""

from __future__ import annotations

import math

import torch

GREEDY_BELOW = 1e-5  # temperatures below this pick the argmax: sampling there is greedy up to exact ties


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
    broken = broken_rows(logits)
    if bool(broken.any()):
        raise ValueError(f"rows {broken.nonzero()[:, 0].tolist()} of the logits hold NaN or +inf, or only -inf: "
                         "the model's output is broken")
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
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
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
