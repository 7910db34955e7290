import copy

import pytest
import torch
from inspection.inspect_helpers import variant

from engram.inspection.hooks import recorded_gates, recorded_residuals, replaced_engram_output, zeroed_engram


def random_ids(model, batch=3, length=29, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.tokenizer_vocab_size, (batch, length), generator=generator)


@pytest.mark.parametrize("hc_mult", [1, 4], ids=["plain-residual", "mhc-4"])
def test_recorded_gates_leave_the_output_alone(trained_model, hc_mult):
    model = variant(trained_model, hc_mult=hc_mult, engram_fields={"layer_ids": [0, 1]})
    ids = random_ids(model)
    plain = model(ids).logits
    with recorded_gates(model) as gates:
        hooked = model(ids).logits
        model(ids[:1, :7])
    assert torch.equal(plain, hooked)
    assert sorted(gates) == [0, 1]
    for layer_gates in gates.values():
        assert [tuple(g.shape) for g in layer_gates] == [(3, 29, hc_mult), (1, 7, hc_mult)]
        assert all(bool(((g >= 0) & (g <= 1)).all()) for g in layer_gates)
    assert not torch.equal(gates[0][0], gates[1][0])  # each layer records its own gates
    with recorded_gates(model) as after:  # the first context's hooks are gone
        model(ids)
    assert len(gates[0]) == 2 and len(after[0]) == 1


def test_zeroed_engram_is_the_model_without_engram(trained_model):
    ids = random_ids(trained_model)
    with torch.no_grad():
        plain = trained_model(ids).logits
        with replaced_engram_output(trained_model, lambda delta: delta):
            identity = trained_model(ids).logits
        with zeroed_engram(trained_model):
            zeroed = trained_model(ids).logits
        restored = trained_model(ids).logits
        removed = copy.deepcopy(trained_model)
        for block in removed.blocks:
            block.engram = None
        without = removed(ids).logits
    assert torch.equal(identity, plain) and torch.equal(restored, plain)
    assert not torch.allclose(zeroed, plain, atol=1e-4)
    torch.testing.assert_close(zeroed, without, rtol=0, atol=0)


def test_hooks_refuse_a_model_without_engram(trained_model):
    baseline = variant(trained_model, engram=None)
    with pytest.raises(ValueError, match="no Engram layers"):
        with zeroed_engram(baseline):
            pass


@pytest.mark.parametrize("hc_mult", [1, 4], ids=["plain-residual", "mhc-4"])
def test_recorded_residuals_read_out_like_the_model(trained_model, hc_mult):
    model = variant(trained_model, hc_mult=hc_mult, seed=1)
    ids = random_ids(model, batch=2, length=17)
    with torch.no_grad(), recorded_residuals(model) as streams:
        logits = model(ids).logits
        first = model.readout(streams[0])
    assert len(streams) == model.cfg.n_layers + 1
    assert all(tuple(s.shape) == (2, 17, hc_mult, model.cfg.d_model) for s in streams)
    torch.testing.assert_close(model.readout(streams[-1]), logits, rtol=0, atol=0)
    embedded = model.embed(ids)
    expected = torch.nn.functional.linear(model.norm(model.merge(streams[0]) if hc_mult > 1 else embedded),
                                          model.embed.weight)
    torch.testing.assert_close(first, expected)
