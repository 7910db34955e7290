"""`engram eval`: loss by position in the context and retrieval of a planted key, on synthetic scorers (whose answers
are known) and end to end on the tiny checkpoints of conftest.py."""

import json
import math

import numpy as np
import pytest
import torch

from engram.cli import main
from engram.inspection.loading import eval_batches, load_model, model_corpus
from engram.inspection.long_context import (JSON_FILE, PNG_FILE, EvalConfig, loss_by_position, min_retrieval_length,
                                            position_buckets, retrieval_scores, retrieval_sequences)
from engram.train.trainer import evaluate_loss

VOCAB = 50


def test_loss_by_position_averages_each_power_of_two_bucket():
    assert position_buckets(10) == [(1, 2), (2, 4), (4, 8), (8, 11)]
    inputs = torch.zeros(3, 10, dtype=torch.long)
    batches = [(inputs, inputs), (inputs[:1], inputs[:1])]

    def context_size(inputs, targets):  # the loss of target t is the context it saw: t + 1
        return torch.arange(1, inputs.shape[1] + 1, dtype=torch.float32).expand(inputs.shape)

    rows = loss_by_position(context_size, batches)
    assert [(r["start"], r["end"], r["tokens"]) for r in rows] == [(1, 2, 4), (2, 4, 8), (4, 8, 16), (8, 11, 12)]
    assert [r["loss"] for r in rows] == [1.0, 2.5, 5.5, 9.0]


def induction_oracle(ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of a perfect copier: after tokens (a, b), predict what followed the latest earlier (a, b)."""
    logits = torch.zeros(ids.shape[0], keep, VOCAB)
    length = ids.shape[1]
    for row, seq in enumerate(ids.tolist()):
        for slot, t in enumerate(range(length - keep, length)):
            earlier = [s for s in range(1, t) if seq[s - 1:s + 1] == seq[t - 1:t + 1]]
            if earlier:
                logits[row, slot, seq[earlier[-1] + 1]] = 30.0
    return logits


def test_a_copier_retrieves_every_key_and_a_guesser_none():
    rng = np.random.default_rng(0)
    filler = rng.integers(20, VOCAB, size=500)  # the key pool (1..19) never appears in the filler
    pool = np.arange(1, 20)
    ids, keys = retrieval_sequences(filler, pool, 40, 12, 3, 0, rng)
    assert ids.shape == (12, 40) and keys.shape == (12, 3)
    assert (ids[:, 0] == 0).all() and torch.equal(ids[:, 1:6], ids[:, -5:]) and torch.equal(ids[:, -3:], keys)
    assert all(len(set(row[1:6].tolist())) == 5 for row in ids)  # marker and key: distinct pool tokens
    assert retrieval_scores(induction_oracle, ids, keys, batch_size=5) == pytest.approx(
        {"accuracy": 1.0, "first_token_accuracy": 1.0, "key_loss": 0.0}, abs=1e-3)

    def uniform(ids, keep):
        return torch.zeros(ids.shape[0], keep, VOCAB)

    scores = retrieval_scores(uniform, ids, keys, batch_size=5)
    assert scores["key_loss"] == pytest.approx(math.log(VOCAB))
    assert scores["accuracy"] == 0.0  # argmax of a tie is token 0, never in the pool
    with pytest.raises(ValueError, match="length 13 leaves no filler: it must be >= 14"):
        retrieval_sequences(filler, pool, 13, 1, 4, 0, rng)
    with pytest.raises(ValueError, match="holds 10 tokens, fewer than the 27 of filler"):
        retrieval_sequences(filler[:10], pool, 40, 1, 4, 0, rng)


def test_engram_eval_compares_checkpoints_on_the_same_windows(engram_checkpoint, baseline_checkpoint, tmp_path,
                                                              capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(engram_checkpoint), str(baseline_checkpoint), "--out", str(out),
                 "--seq-len", "32", "--lengths", "16", "32", "--samples", "6", "--batches", "2", "--batch-size",
                 "4", "--device", "cpu"]) == 0
    assert "engram eval" in capsys.readouterr().out
    report = json.loads((out / JSON_FILE).read_text())
    assert report["settings"]["lengths"] == [16, 32] and report["settings"]["seq_len"] == 32
    assert list(report["checkpoints"]) == ["engram", "baseline"]
    for label, checkpoint in (("engram", engram_checkpoint), ("baseline", baseline_checkpoint)):
        result = report["checkpoints"][label]
        assert sum(b["tokens"] for b in result["loss_by_position"]) == 2 * 4 * 32
        model = load_model(checkpoint, "cpu")
        batches = eval_batches(model, model_corpus(model, report["settings"]["data"]), 4, 32, 2)
        plain = evaluate_loss(model, batches, torch.zeros(model.cfg.vocab_size, dtype=torch.long),
                              torch.device("cpu"), autocast=False)
        assert result["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)  # the buckets hold every target
        assert [r["distance"] for r in result["retrieval"]] == [16 - 4 - 3, 32 - 4 - 3]
        for row in result["retrieval"]:
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["first_token_accuracy"] <= 1 and row["key_loss"] > 0
    assert (out / PNG_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_eval_settings_are_refused(engram_checkpoint, tmp_path, capsys):
    assert min_retrieval_length(4) == 14
    with pytest.raises(ValueError, match="retrieval lengths must be >= 14 .* got 12"):
        EvalConfig(checkpoint=["x"], out="y", lengths=[12, 64])
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        EvalConfig(checkpoint=["x"], out="y", samples=0)
    base = ["eval", "--checkpoint", str(engram_checkpoint), "--out", str(tmp_path), "--device", "cpu"]
    assert main(base + ["--seq-len", "32", "--lengths", "64"]) == 2
    assert "retrieval lengths [64] exceed seq_len 32" in capsys.readouterr().err
    assert main(base + ["--seq-len", "100000"]) == 2
    assert "seq_len 100000 is longer than the max_position_embeddings of ['engram']" in capsys.readouterr().err
