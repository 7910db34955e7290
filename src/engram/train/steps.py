"""The small training loop that memory-only tuning and retrofitting share: steps over fixed batches with a
progress bar (the full trainer, with evaluation, checkpoints and distribution, is :mod:`engram.train.trainer`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from engram.data.batches import TokenBatches
from engram.train.optim import EngramOptimizer


def run_steps(optimizer: EngramOptimizer, batches: TokenBatches, steps: int,
              batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], label: str, console: Console,
              progress: bool) -> float:
    """``steps`` optimiser steps (LR schedule, clipping, step) on ``batches.batch(step)``; ``batch_loss`` maps
    the CPU ``inputs, targets`` ``[B, T]`` to the scalar loss to minimise. Returns the last step's loss."""
    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console,
                   disable=not progress)
    last = float("nan")
    with bar:
        task = bar.add_task(label, total=steps, loss="-")
        for step in range(steps):
            optimizer.set_lr(step, steps)
            loss = batch_loss(*batches.batch(step))
            loss.backward()
            optimizer.clip_grad_norm()
            optimizer.step()
            optimizer.zero_grad()
            last = float(loss.detach())
            bar.update(task, advance=1, loss=f"{last:.3f}")
    return last
