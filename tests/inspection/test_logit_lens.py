import json

import pytest
import torch
from inspection.inspect_helpers import variant

from engram.inspection.logit_lens import logit_lens, run_logit_lens


@pytest.mark.parametrize("hc_mult", [1, 4], ids=["plain-residual", "mhc-4"])
def test_lens_of_the_last_block_is_the_output(trained_model, hc_mult):
    model = variant(trained_model, hc_mult=hc_mult, seed=2)
    generator = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, 300, (2, 19), generator=generator) for _ in range(2)) for _ in range(2)]
    curve = logit_lens(model, batches)
    assert len(curve.kl) == len(curve.loss) == len(curve.top1_agreement) == model.cfg.n_layers + 1
    assert curve.tokens == 2 * 2 * 19
    assert curve.kl[-1] == pytest.approx(0.0, abs=1e-6) and min(curve.kl) >= -1e-6
    assert curve.top1_agreement[-1] == 1.0
    with torch.no_grad():
        expected = torch.stack([torch.nn.functional.cross_entropy(model(i).logits.transpose(1, 2), t)
                                for i, t in batches])
    assert curve.loss[-1] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_run_logit_lens_with_baseline(engram_checkpoint, baseline_checkpoint, tmp_path):
    report = run_logit_lens(engram_checkpoint, tmp_path / "out", baseline=baseline_checkpoint, device="cpu",
                            batches=1, batch_size=4, seq_len=32)
    engram, baseline = report.curves
    assert (engram.name, baseline.name) == ("engram", "baseline")
    assert engram.engram_layers == [1] and baseline.engram_layers == []
    assert engram.kl[0] > engram.kl[-1] and abs(engram.kl[-1]) < 1e-6 and abs(baseline.kl[-1]) < 1e-6
    assert report.png.stat().st_size > 10_000
    assert [c["name"] for c in json.loads(report.summary.read_text())["curves"]] == ["engram", "baseline"]
