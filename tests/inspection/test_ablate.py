import json
from collections import Counter

import numpy as np
import pytest

from engram.inspection.ablate import in_frequent_ngram, run_ablate, starts_word
from engram.inspection.ngrams import frequent_ngrams, ngram_keys


@pytest.mark.parametrize("order", [1, 2, 3])
def test_frequent_ngrams_match_a_brute_force_count(order):
    rng = np.random.default_rng(order)
    ids = rng.integers(0, 7, size=503)
    ids[rng.integers(0, 503, size=40)] = 9  # "BOS"
    result = frequent_ngrams(ids, order, top=6, base=10, exclude=9)
    counts = Counter(tuple(ids[i:i + order]) for i in range(len(ids) - order + 1) if 9 not in ids[i:i + order])
    expected = sorted(((c, g) for g, c in counts.items() if c >= 2), key=lambda item: (-item[0], item[1]))[:6]
    assert [(int(c), tuple(g)) for c, g in zip(result.counts, result.ngrams)] == expected
    for gram, last in zip(result.ngrams, result.last_positions):
        assert tuple(ids[last - order + 1:last + 1]) == tuple(gram)
    assert np.array_equal(ngram_keys(result.ngrams, order, 10)[:, 0], result.keys)


def test_ngram_keys_refuse_overflow():
    with pytest.raises(ValueError, match="overflow int64"):
        ngram_keys(np.zeros(5, dtype=np.int64), 4, 2**16)


def test_in_frequent_ngram_matches_a_brute_force_scan():
    rng = np.random.default_rng(3)
    windows = rng.integers(0, 5, size=(4, 13))
    frequent = [frequent_ngrams(rng.integers(0, 5, size=300), n, top=5, base=5) for n in (2, 3)]
    wanted = {n: {tuple(g) for g in f.ngrams} for n, f in zip((2, 3), frequent)}
    expected = np.array([[any(j + 2 - n >= 0 and tuple(row[j + 2 - n:j + 2]) in wanted[n] for n in (2, 3))
                          for j in range(12)] for row in windows])
    assert np.array_equal(in_frequent_ngram(windows, frequent), expected)


@pytest.mark.parametrize("previous, current, expected", [
    (" the", " king", True), ("Alex", "ander", False), ("king", ",", True), ("\n", "The", True),
    ("king", " ", True), ("<|bos|>", "The", True), ("中", "文", False), ("x1", "_y", False), ("", "a", True),
], ids=lambda value: repr(value))
def test_word_start_rule(previous, current, expected):
    assert starts_word(previous, current) is expected


def test_run_ablate_on_a_tiny_model(engram_checkpoint, tmp_path):
    report = run_ablate(engram_checkpoint, tmp_path / "out", device="cpu", batches=2, batch_size=4, seq_len=32,
                        top_ngrams=50, top_tokens=5, min_count=3)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"ablate.json", "ablate.png"}
    everything, *parts = report.categories
    assert everything.name == "all" and everything.tokens == 2 * 4 * 32
    assert everything.increase != 0.0  # zeroing the memory changes the predictions
    by_name = {c.name: c for c in report.categories}
    for first, second in (("in a frequent n-gram", "not in a frequent n-gram"), ("word start", "word continuation")):
        a, b = by_name[first], by_name[second]
        assert a.tokens + b.tokens == everything.tokens
        assert a.loss_on * a.tokens + b.loss_on * b.tokens == pytest.approx(everything.loss_on * everything.tokens)
        assert a.loss_off * a.tokens + b.loss_off * b.tokens == pytest.approx(everything.loss_off * everything.tokens)
    increases = [t.increase for t in report.top_tokens]
    assert len(increases) == 5 and increases == sorted(increases, reverse=True)
    assert all(t.count >= 3 for t in report.top_tokens)
    assert report.frequent_ngrams == {2: 50, 3: 50}
    summary = json.loads(report.summary.read_text())
    assert summary["data"] and summary["targets"] == everything.tokens
    assert summary["categories"][0]["increase"] == pytest.approx(everything.increase)


def test_run_ablate_refuses_bad_values(engram_checkpoint, baseline_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="top_ngrams must be >= 1, got 0"):
        run_ablate(engram_checkpoint, tmp_path, top_ngrams=0)
    with pytest.raises(ValueError, match="seq_len 4096 is longer than the model's max_position_embeddings=512"):
        run_ablate(engram_checkpoint, tmp_path, device="cpu", seq_len=4096)
    with pytest.raises(ValueError, match="no Engram layers"):
        run_ablate(baseline_checkpoint, tmp_path, device="cpu")
