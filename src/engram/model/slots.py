"""Decode slots: a static KV cache with one sequence per slot, and a decode step with no host synchronisation.

A :class:`SlotDecoder` preallocates everything a decode step touches for ``num_slots`` sequences of up to
``max_length`` tokens: keys and values (:class:`~engram.model.attention.SlotCache`), every slot's length (its next
position), the Engram hash history (advanced in place by the decode hash kernel) and ShortConv state, the next-token
scores, each slot's sampling parameters and token counter, and each slot's memory overlay rows. A step samples the
next token of every slot on the device (:func:`~engram.model.sampling.sample_rows`), hashes it, and runs it through
the model at the slot's own position: nothing in it reads a value on the host or branches on one, so it traces into
one ``torch.compile`` graph and is captured as a CUDA graph (``cuda_graphs=True``) for every batch size it runs at.

Sequences join by :meth:`SlotDecoder.admit` (a batched prefill through ``EngramLM.forward``, whose cache is copied into
the slots) and leave by :meth:`SlotDecoder.release`, between any two steps: continuous batching. A step runs the
first ``rows`` slots; with CUDA graphs ``rows`` is rounded up to one of :data:`GRAPH_BATCH_SIZES`.

Engram tables in host memory or on disk cannot be read inside a graph. Their layers split the step into parts: the
first part samples and hashes; then the host issues every such table's read (``MultiHeadEmbedding.fetch``: a side
stream or a reader thread, ordered after the hashing on the compute stream); the blocks before the first such layer
run while the rows travel; before each such layer the compute stream waits for its rows, which are copied into a
static buffer the next part reads (docs/design.md §8).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engram.embedding import has_view
from engram.kernels.hash import DEAD_TOKEN
from engram.model.attention import SlotCache
from engram.model.config import EngramLMConfig
from engram.model.overlay import RowOverlay, check_row_overlays, replace_rows, row_overlays
from engram.model.sampling import RowSampling, SamplingTensors, sample_rows, sampling_mode
from engram.storage.store import PendingRows

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # rows a captured step runs (and num_slots itself)
_NO_ROW = torch.iinfo(torch.int64).max  # pads each slot's overlay row ids: no flat row id of a table reaches it
_WARMUP_RUNS = 2  # eager runs of a step before its capture (kernel compilation, cuBLAS workspaces)


@dataclass(frozen=True)
class StepPart:
    """One piece of a decode step: ``run()`` computes it from the slots' buffers into them; before it, the rows of
    Engram layer ``waits_for`` (a table outside the device) must be in their buffer (``None``: nothing to wait for)."""

    run: Callable[[], None]
    waits_for: int | None = None


@dataclass(frozen=True)
class StepTokens:
    """A step's tokens ``[rows]`` int64 and broken flags ``[rows]`` bool on the host (:meth:`SlotDecoder.copy_out`);
    ``ready`` is recorded after their copy from a CUDA device."""

    tokens: torch.Tensor
    broken: torch.Tensor
    ready: torch.cuda.Event | None = None

    def read(self) -> tuple[list[int], list[bool]]:
        """The tokens and flags as lists (waits for the copy)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist(), self.broken.tolist()


class SlotDecoder:
    """Static decode state of ``num_slots`` sequences of a model and the decode step over it (see the module doc).

    Args:
        model: an :class:`~engram.model.lm.EngramLM` (in eval mode; its parameters are read, never changed).
        num_slots: sequences held at once.
        max_length: tokens per sequence (prompt and generated), at most the model's ``max_position_embeddings``.
        cuda_graphs: replay every step from CUDA graphs, captured on first use per (rows, sampling mode).
        compile_backend: run every step part through ``torch.compile(backend=..., fullgraph=True)`` (``"inductor"``
            fuses kernels on a GPU); each (rows, sampling mode) is one compilation.

    Attributes:
        tokens: ``[num_slots]`` int64, the token every slot picked in the last step.
        broken: ``[num_slots]`` bool, slots whose scores were NaN or infinite in the last step.

    Example:
        >>> decoder = SlotDecoder(model, num_slots=4, max_length=64)  # doctest: +SKIP
        >>> decoder.admit([0, 1], prompts, mask, [RowSampling(0.0), RowSampling(0.8, seed=3)])  # doctest: +SKIP
        >>> decoder.step(); decoder.tokens[:2]  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, num_slots: int, max_length: int, cuda_graphs: bool = False,
                 compile_backend: str | None = None):
        cfg = model.cfg
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if not 1 <= max_length <= cfg.max_position_embeddings:
            raise ValueError(f"max_length must be in [1, max_position_embeddings={cfg.max_position_embeddings}], "
                             f"got {max_length}")
        if model.training:
            raise ValueError("SlotDecoder decodes a model in eval mode: call model.eval() first")
        weight = model.embed.weight
        if cuda_graphs and weight.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA device, it is on {weight.device}")
        self.model = model
        self.num_slots = num_slots
        self.max_length = max_length
        self.cuda_graphs = cuda_graphs
        self.compile_backend = compile_backend
        self.device = weight.device
        self.vocab_limit = cfg.tokenizer_vocab_size or cfg.vocab_size
        hasher = model.hasher
        if hasher is not None and self.vocab_limit > hasher.tokenizer.original_vocab_size:
            raise ValueError(f"the model may sample ids up to {self.vocab_limit - 1}, past the "
                             f"{hasher.cfg.tokenizer!r} tokenizer's {hasher.tokenizer.original_vocab_size} ids that "
                             "Engram hashes: set the config's tokenizer_vocab_size")
        self._tables = {block.layer_idx: block.engram.multi_head_embedding for block in model.blocks
                        if block.engram is not None}
        self.store_layers = [layer for layer, table in self._tables.items() if table.store is not None]
        with torch.inference_mode():
            self._allocate(cfg, weight.dtype)
        self._occupied: dict[int, RowSampling] = {}
        self._graphs: dict[tuple[int, str], list[torch.cuda.CUDAGraph]] = {}
        self._compiled: dict[tuple[int, str], list[StepPart]] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def _allocate(self, cfg: EngramLMConfig, dtype: torch.dtype) -> None:
        slots, device = self.num_slots, self.device
        shape = (cfg.n_layers, slots, cfg.n_kv_heads, self.max_length, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.int64, device=device)  # tokens stored = next position
        self.counters = torch.zeros(slots, dtype=torch.int64, device=device)  # tokens sampled (the RNG counter)
        self.logits = torch.zeros(slots, cfg.vocab_size, dtype=torch.float32, device=device)
        self.tokens = torch.zeros(slots, dtype=torch.int64, device=device)
        self.broken = torch.zeros(slots, dtype=torch.bool, device=device)
        self.sampling = SamplingTensors.of([RowSampling(0.0)] * slots, device)
        hasher = self.model.hasher
        self.history = None if hasher is None else hasher.next_history(torch.empty(slots, 0, dtype=torch.int64,
                                                                                    device=device))
        self.hash_ids = {layer: torch.zeros(slots, 1, table.num_heads, dtype=torch.int64, device=device)
                         for layer, table in self._tables.items()}
        self.conv = {}
        for block in self.model.blocks:
            conv = block.engram.short_conv if block.engram is not None else None
            if conv is not None:
                width = (conv.conv.kernel_size[0] - 1) * conv.conv.dilation[0]
                self.conv[block.layer_idx] = torch.zeros(slots, conv.conv.in_channels, width, dtype=dtype,
                                                         device=device)
        dead = hasher.cfg.dead_token_ids if hasher is not None else ()
        self._dead_ids = torch.tensor(dead, dtype=torch.int64, device=device) if dead else None
        self.memory: dict[int, torch.Tensor] = {}  # rows of the tables outside the device, made at the first read
        self.overlays: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per slot: ids [S, W], values [S, W, hd]
        self._streams: torch.Tensor | None = None  # residual streams between parts

    # -- slots ---------------------------------------------------------------------------------------------------

    @property
    def occupied(self) -> list[int]:
        """The slots holding a sequence, ascending."""
        return sorted(self._occupied)

    def free_slots(self) -> list[int]:
        """The slots free for :meth:`admit`, ascending (the lowest first keeps steps small)."""
        return [slot for slot in range(self.num_slots) if slot not in self._occupied]

    @torch.inference_mode()
    def admit(self, slots: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              sampling: Sequence[RowSampling], counters: Sequence[int] | None = None,
              overlays: Sequence[RowOverlay | None] | None = None) -> None:
        """Prefill ``input_ids`` ``[G, T]`` (left-padded where ``attention_mask`` is 0) in one forward and place row
        ``i`` in free slot ``slots[i]``; its next step samples its first token.

        ``sampling[i]`` is row ``i``'s :class:`RowSampling`, ``counters[i]`` the number of tokens its sequence already
        sampled (default 0: the RNG counter of its next token), ``overlays[i]`` its memory overlay (None: the base
        tables). ``ValueError`` naming the problem for a taken or unknown slot, a sequence that leaves no room to
        decode, or an overlay the model cannot read; the slots are unchanged then.
        """
        group = len(slots)
        overlays = list(overlays) if overlays is not None else [None] * group
        counters = list(counters) if counters is not None else [0] * group
        if input_ids.dim() != 2 or not group == input_ids.shape[0] == len(sampling) == len(overlays) == len(counters):
            raise ValueError(f"admit needs one slot, sampling, counter and overlay per row of input_ids [G, T]: got "
                             f"{group} slots, input_ids {tuple(input_ids.shape)}, {len(sampling)} sampling, "
                             f"{len(counters)} counters and {len(overlays)} overlays")
        taken = [slot for slot in slots if slot in self._occupied or not 0 <= slot < self.num_slots]
        if taken or len(set(slots)) != group:
            raise ValueError(f"slots {list(slots)} must be distinct free slots of [0, {self.num_slots}); "
                             f"taken or unknown: {taken}")
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device).long()
        lengths = mask.sum(dim=1).tolist()
        if max(lengths) >= self.max_length or min(lengths) < 1:
            raise ValueError(f"sequences of {min(lengths)}..{max(lengths)} tokens: each needs 1 to "
                             f"{self.max_length - 1} tokens to leave room to decode in slots of {self.max_length}")
        check_row_overlays(overlays, {layer: table.head_dim for layer, table in self._tables.items()})
        logits, cache = self._prefill(input_ids, mask, overlays)
        index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.keys[:, index] = 0  # no key of an earlier sequence may reach this one's (masked) scores as NaN
        self.values[:, index] = 0
        width = input_ids.shape[1]
        for row, (slot, length) in enumerate(zip(slots, lengths)):  # left padding -> slot index = position
            self.keys[:, slot, :, :length] = cache.keys[:, row, :, width - length:width]
            self.values[:, slot, :, :length] = cache.values[:, row, :, width - length:width]
        for layer, state in self.conv.items():
            state[index] = cache.conv_states[layer].to(state.dtype)
        if self.history is not None:
            pad = self.model.cfg.engram.pad_id
            self.history[index] = self.model.hasher.next_history(input_ids.masked_fill(mask == 0, pad))
        self.logits[index] = logits
        self.lengths[index] = torch.tensor(lengths, dtype=torch.int64, device=self.device)
        self.counters[index] = torch.tensor(counters, dtype=torch.int64, device=self.device)
        for slot, row_sampling, overlay in zip(slots, sampling, overlays):
            self.sampling.write(slot, row_sampling)
            self._write_overlay(slot, overlay)
            self._occupied[slot] = row_sampling

    def _prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, overlays: list[RowOverlay | None]):
        """``(logits [G, V] of every row's next token, the KVCache of the prompts)`` by ``EngramLM.forward``."""
        cache = self.model.new_cache(input_ids.shape[0], input_ids.shape[1])
        read_overlays = any(overlay is not None for overlay in overlays)
        with row_overlays(self.model, overlays, self.device) if read_overlays else contextlib.nullcontext():
            logits = self.model(input_ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
        return logits, cache

    def _write_overlay(self, slot: int, overlay: RowOverlay | None) -> None:
        """Put ``overlay``'s rows (or none) into ``slot``'s overlay buffers, growing them (graphs dropped) to fit."""
        for layer, table in self._tables.items():
            rows, values = overlay.layers.get(layer, (None, None)) if overlay is not None else (None, None)
            count = 0 if rows is None else rows.shape[0]
            held = self.overlays.get(layer)
            if held is None and count == 0:
                continue
            # values keep the widest dtype any overlay brought (an exact conversion), as row_overlays stacks them
            if held is None or held[0].shape[1] < count or (
                    count and torch.promote_types(held[1].dtype, values.dtype) != held[1].dtype):
                self._grow_overlays(layer, table.head_dim, count, values.dtype)
            ids, stored = self.overlays[layer]
            ids[slot] = _NO_ROW
            if count:
                ids[slot, :count] = rows.to(self.device)
                stored[slot, :count] = values.to(self.device, stored.dtype)

    def _grow_overlays(self, layer: int, head_dim: int, width: int, dtype: torch.dtype) -> None:
        """Reallocate ``layer``'s overlay buffers for at least ``width`` rows per slot of at least ``dtype``."""
        held = self.overlays.get(layer)
        held_width = held[0].shape[1] if held is not None else 0
        width = max(width, 64, 2 * held_width if width > held_width else held_width)  # doubling: few reallocations
        dtype = dtype if held is None else torch.promote_types(held[1].dtype, dtype)
        ids = torch.full((self.num_slots, width), _NO_ROW, dtype=torch.int64, device=self.device)
        values = torch.zeros(self.num_slots, width, head_dim, dtype=dtype, device=self.device)
        if held is not None:
            ids[:, :held[0].shape[1]] = held[0]
            values[:, :held[0].shape[1]] = held[1]
        self.overlays[layer] = (ids, values)
        self._graphs.clear()  # captured with the old buffers
        self._compiled.clear()

    @torch.inference_mode()
    def release(self, slots: Sequence[int]) -> None:
        """Free ``slots``; what their sequences left is never read by the next (see :meth:`admit`)."""
        for slot in slots:
            self._occupied.pop(slot, None)
            self.sampling.write(slot, RowSampling(0.0))  # free slots decode greedily from zero scores
            self.logits[slot] = 0
            self.lengths[slot] = 0
            for ids, _ in self.overlays.values():
                ids[slot] = _NO_ROW

    # -- the step ------------------------------------------------------------------------------------------------

    def rows_for_step(self) -> int:
        """Slots a step runs: up to the highest occupied one, rounded up to a captured size with CUDA graphs."""
        needed = max(self._occupied, default=0) + 1
        if not self.cuda_graphs:
            return needed
        return min(size for size in (*GRAPH_BATCH_SIZES, self.num_slots) if size >= needed)

    @torch.inference_mode()
    def step(self, rows: int | None = None) -> None:
        """Sample the next token of the first ``rows`` slots (default :meth:`rows_for_step`) into :attr:`tokens` and
        feed it: keys, values, lengths, hash history and scores advance in place. Free slots among them compute
        garbage that nothing reads. Queued on the device: nothing is read back here."""
        rows = self.rows_for_step() if rows is None else rows
        if not 1 <= rows <= self.num_slots:
            raise ValueError(f"rows must be in [1, {self.num_slots}], got {rows}")
        mode = sampling_mode(self._occupied.values())
        if self.cuda_graphs:
            viewed = [layer for layer, table in self._tables.items() if has_view(table)]
            if viewed:
                raise ValueError(f"Engram layers {viewed} are read through table views (row_overlays) in this thread: "
                                 "a CUDA graph would keep this call's views; decode without graphs")
            self._run(rows, self._graph_parts(rows, mode))
        else:
            self._run(rows, self.parts(rows, mode))

    @torch.inference_mode()
    def copy_out(self, rows: int) -> StepTokens:
        """The last step's :attr:`tokens` and :attr:`broken` of the first ``rows`` slots, copied to the host behind the
        step (asynchronously on CUDA: the next step may be queued before they are read)."""
        if self.device.type != "cuda":
            return StepTokens(self.tokens[:rows].clone(), self.broken[:rows].clone())
        tokens = torch.empty(rows, dtype=torch.int64, pin_memory=True).copy_(self.tokens[:rows], non_blocking=True)
        broken = torch.empty(rows, dtype=torch.bool, pin_memory=True).copy_(self.broken[:rows], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return StepTokens(tokens, broken, ready)

    def parts(self, rows: int, mode: str) -> list[StepPart]:
        """The step over the first ``rows`` slots with sampling ``mode``, as :class:`StepPart` s (one when every
        Engram table is on the device; compiled when the decoder was made with ``compile_backend``)."""
        key = (rows, mode)
        if self.compile_backend is not None and key in self._compiled:
            return self._compiled[key]
        boundaries = [0, *(layer for layer in self.store_layers if layer > 0), len(self.model.blocks)]
        if not self.store_layers:
            def whole_step() -> None:
                self._sample_and_hash(rows, mode)
                self._blocks(rows, 0, boundaries[-1])

            parts = [StepPart(whole_step)]
        else:
            parts = [StepPart(lambda: self._sample_and_hash(rows, mode))]
            for start, end in itertools.pairwise(boundaries):
                parts.append(StepPart(lambda start=start, end=end: self._blocks(rows, start, end),
                                      start if start in self.store_layers else None))
        if self.compile_backend is not None:
            parts = [StepPart(torch.compile(part.run, backend=self.compile_backend, fullgraph=True, dynamic=False),
                              part.waits_for) for part in parts]
            self._compiled[key] = parts
        return parts

    def _run(self, rows: int, parts: Sequence[StepPart]) -> None:
        """Run ``parts`` in order; reads of tables outside the device are issued after the first and waited for
        before the part that needs them (see the module doc)."""
        pending: dict[int, PendingRows] = {}
        for index, part in enumerate(parts):
            if part.waits_for is not None:
                fetched = pending.pop(part.waits_for).wait()
                if part.waits_for not in self.memory:
                    self.memory[part.waits_for] = fetched.new_zeros(self.num_slots, *fetched.shape[1:])
                self.memory[part.waits_for][:rows].copy_(fetched)
            part.run()
            if index == 0:
                pending = {layer: self._tables[layer].fetch(self.hash_ids[layer][:rows]) for layer in self.store_layers}

    def _graph_parts(self, rows: int, mode: str) -> list[StepPart]:
        """The step's parts as CUDA graph replays, captured now if this (rows, mode) has none yet: the step runs
        eagerly (warm-up) with the slots' state saved and restored around it, then every part is captured."""
        graphs = self._graphs.get((rows, mode))
        eager = self.parts(rows, mode)
        if graphs is None:
            saved = self._mutable_state(rows)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_RUNS):
                    self._run(rows, eager)
                    self._restore(rows, saved)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graphs = []
            for part in eager:
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA calls (a patch copied to the device) must not void the capture
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    part.run()
                graphs.append(graph)
            self._graphs[(rows, mode)] = graphs
        return [StepPart(graph.replay, part.waits_for) for graph, part in zip(graphs, eager)]

    def _mutable_state(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of what a step reads and then overwrites for the first ``rows`` slots (keys and values need none:
        a step writes them at the positions the next real step writes again)."""
        state = [self.lengths[:rows], self.counters[:rows], self.logits[:rows], *(s[:rows] for s in self.conv.values())]
        if self.history is not None:
            state.append(self.history[:rows])
        return [(tensor, tensor.clone()) for tensor in state]

    @staticmethod
    def _restore(rows: int, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for tensor, copy in saved:
            tensor.copy_(copy)

    def _sample_and_hash(self, rows: int, mode: str) -> None:
        """Sample every slot's next token from :attr:`logits` and hash it (the history advances in place)."""
        tokens, broken = sample_rows(self.logits[:rows], self.sampling.head(rows), self.counters[:rows],
                                     self.vocab_limit, mode)
        self.tokens[:rows].copy_(tokens)
        self.broken[:rows].copy_(broken)
        self.counters[:rows] += 1
        if self.history is not None:
            if self._dead_ids is not None:
                tokens = tokens.masked_fill(torch.isin(tokens, self._dead_ids), DEAD_TOKEN)
            for layer, row_ids in self.model.hasher.hash_step(tokens, self.history[:rows]).items():
                self.hash_ids[layer][:rows].copy_(row_ids[:, None])

    def _blocks(self, rows: int, start: int, end: int) -> None:
        """Blocks ``[start, end)`` for the first ``rows`` slots' new tokens; the last part also writes the next
        scores and advances the lengths."""
        model = self.model
        positions = self.lengths[:rows].clamp(max=self.max_length - 1)
        if start == 0:
            streams = model.residual_streams(model.embed(self.tokens[:rows, None]))  # [B, 1, M, D]
        else:
            streams = self._streams[:rows]
        layers = [block.layer_idx for block in model.blocks[start:end] if block.engram is not None]
        cache = SlotCache(self.keys[:, :rows], self.values[:, :rows], positions,
                          {layer: self.conv[layer][:rows] for layer in layers if layer in self.conv})
        memories = {layer: PendingRows.ready(self._memory(layer, rows)) for layer in layers}
        for block in model.blocks[start:end]:
            streams = block(streams, positions[:, None], None, cache, memories)
        for layer in cache.conv_states:  # the ShortConv hands back a new state tensor: into the static one
            self.conv[layer][:rows].copy_(cache.conv_states[layer])
        if end < len(model.blocks):
            if self._streams is None:
                self._streams = streams.new_zeros(self.num_slots, *streams.shape[1:])
            self._streams[:rows].copy_(streams)
            return
        self.logits[:rows].copy_(model.readout(streams)[:, -1])
        self.lengths[:rows].copy_(positions + 1)

    def _memory(self, layer: int, rows: int) -> torch.Tensor:
        """Layer ``layer``'s rows ``[B, 1, H * head_dim]`` for the new tokens, each slot's overlay swapped in."""
        table = self._tables[layer]
        row_ids = self.hash_ids[layer][:rows]
        memory = self.memory[layer][:rows] if layer in self.store_layers else table.fetch(row_ids).wait()
        held = self.overlays.get(layer)
        if held is None:
            return memory
        return replace_rows(memory, table.flat_row_ids(row_ids), (held[0][:rows], held[1][:rows]))

