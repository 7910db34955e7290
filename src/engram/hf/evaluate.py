"""Measurements of a transformers causal LM (with or without an adapter): next-token loss on token windows,
exact-match recall of completions, and greedy generation throughput.

Every function takes the model as transformers calls it (``model(input_ids=..., use_cache=False).logits``,
``model.generate``), so an Engram retrofit, a peft model and a plain base are measured by the same code;
:func:`generation_throughput` also times an :class:`~engram.model.EngramLM` (a retrofit exported by
:func:`engram.hf.export.to_engram_lm`) through its own ``generate``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from engram.model import EngramLM


def batch_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``model`` on ``inputs`` against ``targets`` (int64 ``[B, T]`` each)."""
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device) -> float:
    """Mean loss per token of ``model`` over ``batches`` (:func:`~engram.data.batches.validation_batches`)."""
    total, tokens = 0.0, 0
    for inputs, targets in batches:
        total += float(batch_loss(model, inputs.to(device), targets.to(device))) * targets.numel()
        tokens += targets.numel()
    return total / tokens


@torch.no_grad()
def exact_match(model: nn.Module, prompts: list[list[int]], completions: list[list[int]], device: torch.device,
                batch_size: int = 256, pad_id: int = 0) -> torch.Tensor:
    """Whether greedy decoding after each prompt produces exactly its completion: bool ``[N]``.

    Teacher-forced: ``prompt + completion[:-1]`` is fed once and the argmax at every completion position must be the
    completion's token there, which holds exactly when greedy generation would emit the completion (the first
    wrong token is where generation would leave it). Rows are right-padded with ``pad_id``; a causal model's logits
    before the padding do not see it.

    Raises:
        ValueError: lengths differ, or a prompt or completion is empty.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(not p for p in prompts) or any(not c for c in completions):
        raise ValueError("every prompt and completion needs at least one token")
    hits = []
    for start in range(0, len(prompts), batch_size):
        pairs = list(zip(prompts[start:start + batch_size], completions[start:start + batch_size]))
        rows = [prompt + completion[:-1] for prompt, completion in pairs]
        ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        predicted = model(input_ids=ids.to(device), use_cache=False).logits.argmax(-1).cpu()  # [B, T]
        for i, (prompt, completion) in enumerate(pairs):
            span = predicted[i, len(prompt) - 1:len(prompt) - 1 + len(completion)]
            hits.append(span.tolist() == completion)
    return torch.tensor(hits, dtype=torch.bool)


@torch.no_grad()
def generation_throughput(model: nn.Module, prompts: torch.Tensor, new_tokens: int, repeats: int = 3,
                          pad_token_id: int = 0) -> dict[str, float]:
    """Greedy ``generate`` (KV cache on) of exactly ``new_tokens`` after ``prompts`` ``[B, T]`` (on the model's
    device): one untimed warm-up, then the fastest of ``repeats`` timed calls. An :class:`EngramLM` decodes with its
    default loop (CUDA graphs on a GPU) and no end-of-sequence stop.

    Returns:
        ``{"tokens_per_s": B * new_tokens / seconds, "seconds": ..., "batch": B, "new_tokens": new_tokens}``.
    """
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens and repeats must be >= 1, got {new_tokens} and {repeats}")

    def run() -> float:
        if prompts.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if isinstance(model, EngramLM):
            model.generate(prompts, new_tokens, temperature=0)
        else:
            model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                           use_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=pad_token_id)
        if prompts.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run()
    seconds = min(run() for _ in range(repeats))
    return {"tokens_per_s": prompts.shape[0] * new_tokens / seconds, "seconds": seconds,
            "batch": prompts.shape[0], "new_tokens": new_tokens}
