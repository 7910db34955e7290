import pytest

from engram.model import EngramLM, EngramLMConfig
from engram.train.compare import run_comparison
from engram.train.optim import OptimConfig
from engram.train.trainer import TrainConfig

MODEL = EngramLMConfig.from_preset("tiny", d_model=32, n_layers=2, ffn_kinds=["dense", "moe"])


@pytest.fixture(scope="session")
def trained_runs(text_dir, tmp_path_factory):
    """A tiny Engram model (Engram at block 1, mHC 4) and its baseline, trained a few steps on ``text_dir``.

    Returns the comparison folder: ``engram/`` and ``baseline/`` run folders, each with ``run.json`` and ``final/``.
    """
    out = tmp_path_factory.mktemp("inspect-runs")
    run_comparison(TrainConfig(preset="tiny", data=[str(text_dir)], tokenizer="bpe-300", out=str(out), max_steps=4,
                               batch_size=4, seq_len=32, eval_every=4, eval_batches=1, log_every=4, save_every=100,
                               progress=False, tensorboard=False, optim=OptimConfig(lr=3e-3, warmup_steps=1),
                               model=MODEL))
    return out


@pytest.fixture(scope="session")
def engram_checkpoint(trained_runs):
    return trained_runs / "engram" / "final"


@pytest.fixture(scope="session")
def baseline_checkpoint(trained_runs):
    return trained_runs / "baseline" / "final"


@pytest.fixture()
def trained_model(engram_checkpoint) -> EngramLM:
    return EngramLM.from_pretrained(engram_checkpoint).eval()
