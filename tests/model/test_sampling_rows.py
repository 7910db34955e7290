"""Per-row sampling on the device (sample_rows) against the one-parameter reference (filter_logits, sample_next):
the same filtering, the right distribution, and draws that depend on a row's seed and counter only."""

import pytest
import torch

from engram.model.sampling import (GREEDY_BELOW, RowSampling, SamplingTensors, filter_logits, filter_logits_rows,
                                   row_uniforms, sample_rows, sampling_mode)

ROWS = [RowSampling(0.7, None, None, 1), RowSampling(1.3, 5, None, 2), RowSampling(0.9, None, 0.6, 3),
        RowSampling(1.0, 3, 0.9, 4), RowSampling(2.0, 1, None, 5), RowSampling(0.5, None, 1e-46, 6),
        RowSampling(1.0, 40, 1.0, 7)]


def random_logits(rows: int, vocab: int = 37, seed: int = 0) -> torch.Tensor:
    return 4 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_per_row_filtering_equals_the_reference_row_by_row():
    logits = random_logits(len(ROWS))
    params = SamplingTensors.of(ROWS, "cpu")
    filtered = filter_logits_rows(logits, params.temperature, params.top_k, params.top_p)
    for index, row in enumerate(ROWS):
        expected = filter_logits(logits[index:index + 1], row.temperature, row.top_k, row.top_p)[0]
        assert torch.equal(torch.isinf(filtered[index]), torch.isinf(expected)), row
        torch.testing.assert_close(filtered[index], expected, rtol=0, atol=0)


def test_draws_follow_the_filtered_distribution():
    """4,000 draws of one row (counters 0..3999): token frequencies within 3 sigma of softmax(filtered scores)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(4000, 1)
    for row in (RowSampling(1.0, seed=11), RowSampling(0.8, top_k=3, seed=12), RowSampling(1.0, top_p=0.7, seed=13)):
        params = SamplingTensors.of([row] * 4000, "cpu")
        tokens, _ = sample_rows(logits, params, torch.arange(4000), mode="filtered")
        probs = filter_logits(logits[:1], row.temperature, row.top_k, row.top_p).softmax(-1)[0]
        counts = torch.bincount(tokens, minlength=6).double() / 4000
        sigma = (probs * (1 - probs) / 4000).sqrt()
        assert bool((counts - probs).abs().le(3 * sigma + 1e-9).all()), (row, counts, probs)
        assert bool(counts[probs == 0].eq(0).all())  # filtered tokens are never drawn


def test_a_rows_draw_depends_on_its_seed_and_counter_only():
    logits = random_logits(6, vocab=50, seed=3)
    sampling = [RowSampling(1.0, seed=seed) for seed in (7, 8, 9, 10, 11, 12)]
    counters = torch.tensor([0, 3, 1, 4, 1, 5])
    together, _ = sample_rows(logits, SamplingTensors.of(sampling, "cpu"), counters, mode="sample")
    for index in range(6):
        alone, _ = sample_rows(logits[index:index + 1], SamplingTensors.of(sampling[index:index + 1], "cpu"),
                               counters[index:index + 1], mode="filtered")
        assert int(alone) == int(together[index])
    reversed_order, _ = sample_rows(logits.flip(0), SamplingTensors.of(sampling[::-1], "cpu"), counters.flip(0),
                                    mode="sample")
    assert torch.equal(reversed_order.flip(0), together)
    other_seeds = SamplingTensors.of([RowSampling(1.0, seed=seed + 100) for seed in range(6)], "cpu")
    draws = {tuple(sample_rows(logits, other_seeds, counters + step, mode="sample")[0].tolist()) for step in range(8)}
    assert len(draws) > 1  # counters and seeds change the draw


def test_greedy_rows_tiny_temperatures_and_the_vocab_limit():
    logits = random_logits(4)
    sampling = [RowSampling(0.0), RowSampling(GREEDY_BELOW / 2, seed=1), RowSampling(1.0, top_p=1e-46, seed=2),
                RowSampling(1.0, top_k=1, seed=3)]
    for mode in ("sample", "filtered"):
        tokens, broken = sample_rows(logits, SamplingTensors.of(sampling, "cpu"), torch.zeros(4, dtype=torch.long),
                                     mode=mode)
        if mode == "filtered":
            assert torch.equal(tokens, logits.argmax(-1))
        else:
            assert torch.equal(tokens[:2], logits[:2].argmax(-1))
        assert not bool(broken.any())
    limited, _ = sample_rows(logits, SamplingTensors.of([RowSampling(0.0)] * 4, "cpu"),
                             torch.zeros(4, dtype=torch.long), vocab_limit=5, mode="greedy")
    assert torch.equal(limited, logits[:, :5].argmax(-1))
    hot = SamplingTensors.of([RowSampling(5.0, seed=seed) for seed in range(4)], "cpu")
    assert int(sample_rows(logits, hot, torch.arange(4) * 0 + 9, vocab_limit=5, mode="sample")[0].max()) < 5


def test_broken_rows_are_flagged_not_raised():
    logits = random_logits(3)
    logits[1, 4] = float("nan")
    logits[2] = float("-inf")
    for mode in ("greedy", "sample", "filtered"):
        tokens, broken = sample_rows(logits, SamplingTensors.of([RowSampling(0.8, seed=1)] * 3, "cpu"),
                                     torch.zeros(3, dtype=torch.long), mode=mode)
        assert broken.tolist() == [False, True, True]
        assert bool(((tokens >= 0) & (tokens < 37)).all())


def test_uniforms_are_uniform_and_seeds_up_to_2_63_work():
    seeds = torch.tensor([0, 1, 2**63 - 1, 2**40 + 7])
    u = row_uniforms(seeds.repeat_interleave(2500), torch.arange(10_000) % 2500)
    assert bool(((u > 0) & (u < 1)).all())
    histogram = torch.histc(u, bins=10, min=0, max=1)
    assert bool((histogram - 1000).abs().le(150).all()), histogram
    assert len(set(row_uniforms(seeds, torch.zeros(4, dtype=torch.long)).tolist())) == 4


def test_modes_and_parameters():
    assert sampling_mode([RowSampling(0.0), RowSampling(GREEDY_BELOW / 3)]) == "greedy"
    assert sampling_mode([RowSampling(0.0), RowSampling(0.7, top_p=1.0)]) == "sample"
    assert sampling_mode([RowSampling(0.7), RowSampling(0.0, top_k=3), RowSampling(1.0, top_p=0.9)]) == "filtered"
    with pytest.raises(ValueError, match="seed must be in"):
        RowSampling(1.0, seed=2**63)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        RowSampling(1.0, top_k=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_rows(random_logits(1), SamplingTensors.of([RowSampling()], "cpu"), torch.zeros(1, dtype=torch.long),
                    mode="nucleus")
