"""Next-token sampling under hostile parameters: tiny temperatures and top_p, huge logits, non-finite values."""

import pytest
import torch

from engram.model import EngramLM
from engram.model.sampling import GREEDY_BELOW, sample_next
from lm_helpers import small_config


def random_logits(rows: int = 3, vocab: int = 37, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-30, GREEDY_BELOW / 2],
                         ids=["fp32-subnormal", "fp64-smallest", "1e-30", "just-below-the-bound"])
def test_tiny_temperatures_are_greedy(temperature):
    logits = random_logits()
    assert torch.equal(sample_next(logits, temperature), logits.argmax(dim=-1))


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e30], ids=["plain", "large", "huge"])
def test_the_smallest_sampling_temperature_never_overflows(scale):
    """Scores are shifted by their row maximum before the division: with a temperature at the greedy bound the
    top token dominates, whatever the size of the logits."""
    logits = random_logits(scale=scale)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        assert torch.equal(sample_next(logits, GREEDY_BELOW, generator=generator), logits.argmax(dim=-1))


@pytest.mark.parametrize("top_p", [1e-46, 1e-45, 1e-300, 1e-9], ids=["fp32-zero", "fp32-smallest", "fp64", "small"])
def test_tiny_top_p_keeps_the_top_token(top_p):
    logits = random_logits()
    generator = torch.Generator().manual_seed(2)
    for temperature in (0.5, 1.0, 2.0):
        picked = sample_next(logits, temperature, top_p=top_p, generator=generator)
        assert torch.equal(picked, logits.argmax(dim=-1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be finite, got nan"),
    (dict(temperature=float("inf")), "temperature must be finite, got inf"),
    (dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(temperature=1.0, top_k=0), "top_k must be >= 1, got 0"),
], ids=["temperature-nan", "temperature-inf", "temperature-negative", "top-p-nan", "top-p-zero", "top-k-zero"])
def test_bad_parameters_are_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(random_logits(), **kwargs)


@pytest.mark.parametrize("poison", ["nan", "inf", "all--inf"])
@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_non_finite_logits_are_refused_naming_the_rows(poison, temperature):
    logits = random_logits(rows=4)
    if poison == "all--inf":
        logits[2] = float("-inf")
    else:
        logits[2, 5] = float(poison)
    with pytest.raises(ValueError, match=r"rows \[2\] of the logits hold NaN or \+inf, or only -inf"):
        sample_next(logits, temperature)
    masked = random_logits(rows=2)
    masked[:, :3] = float("-inf")  # -inf is a legitimate mask
    assert sample_next(masked, 1.0).min() >= 3


def test_generate_treats_tiny_temperatures_and_top_p_as_greedy():
    torch.manual_seed(0)
    model = EngramLM(small_config(hc_mult=1, use_moe=False)).eval()
    prompt = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(3))
    greedy = model.generate(prompt, 4, temperature=0)
    assert torch.equal(model.generate(prompt, 4, temperature=1e-40, seed=0), greedy)
    assert torch.equal(model.generate(prompt, 4, temperature=1.0, top_p=1e-46, seed=0), greedy)
