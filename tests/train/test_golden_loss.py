"""Golden losses: a tiny CPU run's first losses against a committed file, so a silent numerics change fails CI.

The run is the trainer's step (``lm_loss`` + ``optimizer_step``: the chunked loss, grouped-GEMM MoE, mHC,
Engram with sparse Adam) on the ``tiny`` preset with fixed seeds and synthetic ids. After a deliberate numerics
change, regenerate the file with ``ENGRAM_UPDATE_GOLDEN=1 pytest tests/train/test_golden_loss.py`` and say why in
the commit.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from engram.model import EngramLM, EngramLMConfig
from engram.parallel import DistContext
from engram.train.optim import EngramOptimizer, OptimConfig, enable_sparse_tables
from engram.train.trainer import lm_loss, optimizer_step

GOLDEN = Path(__file__).parent.parent / "assets" / "golden_losses.json"
STEPS = 6
# Float rounding may differ between CPUs (vector widths, BLAS kernels); a changed formula moves these losses by
# far more than this within a few steps.
TOLERANCE = 2e-4


def _losses() -> list[float]:
    torch.manual_seed(0)
    cfg = EngramLMConfig.from_preset("tiny", max_position_embeddings=64)
    model = EngramLM(cfg)
    enable_sparse_tables(model)
    optimizer = EngramOptimizer(model, OptimConfig(lr=3e-3, warmup_steps=2))
    generator = torch.Generator().manual_seed(1)
    phrases = torch.randint(3, 2000, (8, 11), generator=generator)  # repeated phrases: learnable n-grams
    losses = []
    for step in range(STEPS):
        ids = phrases[torch.randint(0, 8, (4, 3), generator=generator)].flatten(1)  # [4, 33]
        optimizer.set_lr(step, STEPS)
        loss, aux = lm_loss(model, ids[:, :-1], ids[:, 1:], autocast=False)
        (loss if aux is None else loss + aux).backward()
        optimizer_step(model, optimizer, DistContext())
        losses.append(float(loss))
    return losses


def test_first_losses_match_the_golden_file():
    losses = _losses()
    if os.environ.get("ENGRAM_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"steps": STEPS, "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["steps"] == STEPS
    assert losses == pytest.approx(golden["losses"], abs=TOLERANCE), (losses, golden["losses"])
    assert losses[-1] < losses[0]  # the run trains
