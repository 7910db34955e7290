"""Forward hooks that read or change what a model computes, without touching the model's code.

Each is a context manager: hooks are registered on entry and removed on exit, also on an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from engram.model import EngramLM
from engram.model.lm import Block


def engram_blocks(model: EngramLM) -> list[Block]:
    """The blocks that hold an Engram, in order; refused for a model without Engram."""
    blocks = [block for block in model.blocks if block.engram is not None]
    if not blocks:
        raise ValueError("the model has no Engram layers (a baseline?): there is no memory to inspect")
    return blocks


@contextmanager
def recorded_gates(model: EngramLM) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record the gate ``alpha`` of every Engram layer in each forward run inside the block.

    Yields ``{layer_id: [gates [B, T, M] fp32 on the CPU, one per forward]}``. The Engram module is asked for
    its gates (``return_gates=True``) by a pre-hook, and a forward hook hands the block the delta alone, so the
    model computes exactly what it computes without the hooks.

    Example:
        >>> with recorded_gates(model) as gates:                         # doctest: +SKIP
        ...     model(input_ids)
        >>> gates[1][0].shape                                            # [B, T, hc_mult]
    """
    gates: dict[int, list[torch.Tensor]] = {}
    handles = []

    def ask_for_gates(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "return_gates": True}

    for block in engram_blocks(model):
        gates[block.layer_idx] = []

        def record(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor],
                   store: list[torch.Tensor] = gates[block.layer_idx]) -> torch.Tensor:
            delta, gate = output
            store.append(gate.detach().float().cpu())
            return delta

        handles.append(block.engram.register_forward_pre_hook(ask_for_gates, with_kwargs=True))
        handles.append(block.engram.register_forward_hook(record))
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replaced_engram_output(model: EngramLM, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the block, every Engram layer's delta ``[B, T, M, D]`` is replaced by ``replace(delta)``."""
    handles = [block.engram.register_forward_hook(lambda module, args, output: replace(output))
               for block in engram_blocks(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def zeroed_engram(model: EngramLM) -> Iterator[None]:
    """Engram removed at inference: inside the block every Engram layer adds zeros (its output zeroed by a hook)."""
    with replaced_engram_output(model, torch.zeros_like):
        yield


@contextmanager
def recorded_residuals(model: EngramLM) -> Iterator[list[torch.Tensor]]:
    """Record the residual streams entering the first block and leaving every block, for one forward.

    Yields a list filled by the forward: ``n_layers + 1`` tensors ``[B, T, M, D]`` (``M = 1`` without mHC),
    the embedding's streams first. Run one forward per block.
    """
    streams: list[torch.Tensor] = []

    def record_input(module: nn.Module, args: tuple) -> None:
        streams.append(args[0].detach())

    def record_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        streams.append(output.detach())

    handles = [model.blocks[0].register_forward_pre_hook(record_input)]
    handles += [block.register_forward_hook(record_output) for block in model.blocks]
    try:
        yield streams
    finally:
        for handle in handles:
            handle.remove()
