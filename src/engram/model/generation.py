"""The decode loops behind :meth:`EngramLM.generate` and the choice between them (``decode=``).

- ``"eager"``: :class:`Decoding`, the plain reference: the prompt prefilled into a :class:`KVCache` that grows by one
  token per step, every step a full ``EngramLM.forward`` (its checks and host reads included).
- ``"static"``: a :class:`~engram.model.slots.SlotDecoder`: one slot per sequence in a preallocated cache, a step with
  no host synchronisation (sampling on the device), run op by op.
- ``"graph"``: the same step replayed from CUDA graphs (CUDA only).
- ``"auto"``: ``"graph"`` on CUDA where nothing prevents it (:func:`graph_blockers`), ``"static"`` on CUDA otherwise,
  ``"eager"`` elsewhere.

Every loop samples with :func:`~engram.model.sampling.sample_rows` at the same per-row counters, so for the same
logits they pick the same tokens: greedy decoding is token for token the same, seeded sampling too up to the rounding
of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engram.embedding import has_view
from engram.model.attention import KVCache
from engram.model.moe import MoE
from engram.model.sampling import RowSampling, SamplingTensors, raise_for_broken, sample_rows, sampling_mode

DECODE_MODES = ("auto", "eager", "static", "graph")
EOS_CHECK_EVERY = 16  # steps between the host's looks at whether every row has ended (a device sync each)


def graph_blockers(model: nn.Module) -> list[str]:
    """Why ``model``'s decode step cannot be replayed from CUDA graphs here and now (empty when it can): not on a
    CUDA device, MoE experts that run as a per-expert loop (it reads the routing on the host), or Engram tables read
    through views in this thread (:func:`~engram.model.overlay.row_overlays`: a graph would keep them)."""
    weight = model.embed.weight
    reasons = []
    if weight.device.type != "cuda":
        reasons.append(f"the model is on {weight.device}, not a CUDA device")
    else:
        loops = [index for index, block in enumerate(model.blocks)
                 if isinstance(block.ffn, MoE) and block.ffn.experts_backend(weight.device, weight.dtype) == "loop"]
        if loops:
            reasons.append(f"the MoE experts of blocks {loops} run as a per-expert loop in {weight.dtype} here "
                           "(grouped GEMMs need bf16 on compute capability >= 9.0), which reads the routing on the "
                           "host")
    viewed = [block.layer_idx for block in model.blocks
              if block.engram is not None and has_view(block.engram.multi_head_embedding)]
    if viewed:
        reasons.append(f"the Engram tables of blocks {viewed} are read through row_overlays in this thread")
    return reasons


def resolve_decode(model: nn.Module, decode: str) -> str:
    """The loop ``decode`` (one of :data:`DECODE_MODES`) stands for with ``model`` now; ``ValueError`` for an unknown
    mode or ``"graph"`` where :func:`graph_blockers` names a reason."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    blockers = graph_blockers(model)
    if decode == "graph" and blockers:
        raise ValueError("decode='graph' is not possible: " + "; ".join(blockers))
    if decode != "auto":
        return decode
    if model.embed.weight.device.type != "cuda":
        return "eager"
    return "static" if blockers else "graph"


class Decoding:
    """One batched decode of ``model`` with a KV cache: the prompt is prefilled when built, then :meth:`step`
    feeds one new token per row. Keeps what incremental decoding needs besides the cache: the attention mask
    over every token so far and the raw ids Engram hashes (padding as its pad id), whose last ones are each
    step's ``engram_history``. The plain reference loop (``decode="eager"``) and the server's static batching.

    Args:
        input_ids: ``[B, T]`` prompts, left-padded where ``attention_mask`` ``[B, T]`` is 0.
        max_new_tokens: steps the cache must hold room for.

    Attributes:
        logits: ``[B, V]`` fp32 logits of the next token of every row (after the prefill or the last step).
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None):
        self.model = model
        self.mask = (torch.ones_like(input_ids) if attention_mask is None
                     else attention_mask.to(input_ids.device).long())
        pad = model.cfg.engram.pad_id if model.cfg.engram is not None else 0
        self.hash_source = input_ids.masked_fill(self.mask == 0, pad)  # raw ids as Engram sees them
        self.context = model.hasher.context if model.hasher is not None else 0
        self.cache: KVCache = model.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        self.logits = model(input_ids, attention_mask=self.mask, cache=self.cache, logits_to_keep=1).logits[:, -1]

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``next_ids`` ``[B]`` (one token per row); returns (and keeps) the next ``[B, V]`` logits."""
        history = self.hash_source[:, self.hash_source.shape[1] - self.context:] if self.context else None
        self.hash_source = torch.cat([self.hash_source, next_ids[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(next_ids[:, None])], dim=1)
        self.logits = self.model(next_ids[:, None], attention_mask=self.mask, cache=self.cache,
                                 engram_history=history).logits[:, -1]
        return self.logits


def vocab_limit(model: nn.Module) -> int:
    """Ids the model may emit: ``[0, tokenizer_vocab_size)`` (the embedding's padding rows are never sampled)."""
    return model.cfg.tokenizer_vocab_size or model.cfg.vocab_size


def generate_tokens(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sequence[RowSampling],
                    eos_token_id: int | None, attention_mask: torch.Tensor | None, decode: str) -> torch.Tensor:
    """``[B, T + new]`` prompts and their continuations by the loop ``decode`` names (resolved already).

    Row ``b`` samples with ``sampling[b]``; a row that produced ``eos_token_id`` keeps emitting it and the loop ends
    when every row has. ``max_new_tokens >= 1``; the model is in eval mode.
    """
    if decode == "eager":
        return _generate_eager(model, input_ids, max_new_tokens, sampling, eos_token_id, attention_mask)
    return _generate_slots(model, input_ids, max_new_tokens, sampling, eos_token_id, attention_mask,
                           cuda_graphs=decode == "graph")


def _generate_eager(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sequence[RowSampling],
                    eos_token_id: int | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
    device = input_ids.device
    params, mode = SamplingTensors.of(sampling, device), sampling_mode(sampling)
    decoding = Decoding(model, input_ids, max_new_tokens, attention_mask)
    ids = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        counters = torch.full_like(finished, step, dtype=torch.int64)
        next_ids, broken = sample_rows(decoding.logits, params, counters, vocab_limit(model), mode)
        raise_for_broken(broken)
        if eos_token_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
            finished |= next_ids == eos_token_id
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        decoding.step(next_ids)
    return ids


def _generate_slots(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sequence[RowSampling],
                    eos_token_id: int | None, attention_mask: torch.Tensor | None, cuda_graphs: bool) -> torch.Tensor:
    batch, length = input_ids.shape
    decoder = model.slot_decoder(batch, length + max_new_tokens, cuda_graphs)
    slots = list(range(batch))
    decoder.admit(slots, input_ids, attention_mask, sampling)
    try:
        with torch.inference_mode():
            out = input_ids.new_zeros(batch, max_new_tokens, dtype=torch.int64)
            broken = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            finished = torch.zeros_like(broken)
            all_finished = torch.zeros(max_new_tokens, dtype=torch.bool, device=input_ids.device)
            for step in range(max_new_tokens):
                decoder.step()
                tokens = decoder.tokens[:batch]
                broken |= decoder.broken[:batch]
                if eos_token_id is not None:
                    tokens = torch.where(finished, torch.full_like(tokens, eos_token_id), tokens)
                    finished |= tokens == eos_token_id
                    all_finished[step] = finished.all()
                out[:, step] = tokens
                if eos_token_id is not None and step % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and bool(finished.all()):
                    break
            raise_for_broken(broken)
            ended = all_finished.nonzero()
            steps = int(ended[0, 0]) + 1 if ended.numel() else step + 1
            generated = out[:, :steps]
    finally:
        decoder.release(slots)
    return torch.cat([input_ids, generated], dim=1)  # out of inference mode: a normal tensor
