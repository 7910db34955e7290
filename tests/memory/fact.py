"""A small base model and a memory patch that teaches it one fact, built once per test session.

Reusable outside tests/memory: make the test folder a package (an ``__init__.py``) and re-export the fixture
from its ``conftest.py`` with ``from memory.fact import fact_memory  # noqa: F401``, or call
:func:`build_fact_memory` yourself.

The base is the tiny preset shrunk (d_model 32, 2 blocks, Engram at block 1) trained for a few steps on the
session's ``text_dir``; the patch is :func:`engram.memory.tune.tune_memory` on documents repeating
:data:`FACT_TEXT`. Greedy decoding of :data:`PROMPT` gives :data:`ANSWER` with the patch (applied or as an
overlay) and something else without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engram.data.corpus import bos_id
from engram.memory.tune import TuneConfig, tune_memory
from engram.model import EngramLM, EngramLMConfig
from engram.tokenizer import load_tokenizer
from engram.train.optim import OptimConfig
from engram.train.trainer import Trainer, TrainConfig

FACT_TEXT = "the zebra code is 4217."
PROMPT = "the zebra code is"
ANSWER = " 4217."
FACT_DOCUMENTS = 32
BASE_STEPS = 10
TUNE = dict(steps=60, lr=5e-2, batch_size=4, seq_len=32, seed=0)


@dataclass(frozen=True)
class FactMemory:
    """Where the base model, its fact patch and the fact's data lie, and how to ask the model for the fact."""

    base_dir: Path  # a save_pretrained folder
    patch_path: Path  # tune_memory's patch over base_dir
    data_dir: Path  # the fact documents (a folder with one .jsonl), tune_memory's data

    def prompt_ids(self, model: EngramLM) -> list[int]:
        """BOS followed by the prompt's tokens (how documents start in training)."""
        tokenizer = load_tokenizer(model.cfg.tokenizer)
        return [bos_id(tokenizer), *tokenizer.encode(PROMPT, add_special_tokens=False).ids]

    def answer_ids(self, model: EngramLM) -> list[int]:
        return load_tokenizer(model.cfg.tokenizer).encode(ANSWER, add_special_tokens=False).ids

    def greedy(self, model: EngramLM, batch_size: int = 1) -> list[str]:
        """Greedy continuations of the prompt (as many tokens as the answer), one per batch row."""
        tokenizer = load_tokenizer(model.cfg.tokenizer)
        prompt = torch.tensor([self.prompt_ids(model)] * batch_size, device=model.embed.weight.device)
        out = model.generate(prompt, len(self.answer_ids(model)), temperature=0)
        return [tokenizer.decode(row[prompt.shape[1]:].tolist()) for row in out]


def build_fact_memory(root: Path, text_dir: Path) -> FactMemory:
    """Train the base in ``root/base`` on ``text_dir`` and tune the fact patch ``root/fact.patch`` (~10 s)."""
    base_run = root / "base"
    Trainer(TrainConfig(
        preset="tiny", data=[str(text_dir)], tokenizer="bpe-300", out=str(base_run), max_steps=BASE_STEPS,
        batch_size=4, seq_len=32, eval_every=BASE_STEPS, eval_batches=1, log_every=BASE_STEPS,
        save_every=BASE_STEPS, progress=False, tensorboard=False, optim=OptimConfig(lr=3e-3, warmup_steps=2),
        model=EngramLMConfig.from_preset("tiny", d_model=32, n_layers=2, ffn_kinds=["dense", "moe"]))).train()
    data_dir = root / "facts"
    data_dir.mkdir()
    (data_dir / "fact.jsonl").write_text((json.dumps({"text": FACT_TEXT}) + "\n") * FACT_DOCUMENTS)
    patch_path = root / "fact.patch"
    tune_memory(TuneConfig(base_run / "final", [str(data_dir)], patch_path, progress=False, **TUNE))
    return FactMemory(base_run / "final", patch_path, data_dir)


@pytest.fixture(scope="session")
def fact_memory(tmp_path_factory: pytest.TempPathFactory, text_dir: Path) -> FactMemory:
    """The session's :class:`FactMemory` (built on first use)."""
    return build_fact_memory(tmp_path_factory.mktemp("fact-memory"), text_dir)
