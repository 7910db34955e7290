import pytest

from engram import EngramConfig
from engram.model import EngramLM, EngramLMConfig, PRESETS, iso_parameter_config, param_report

from lm_helpers import small_config

PAPER = {  # the paper's figures (total, activated, Engram table parameters)
    "paper-27b-shape": (26.7e9, 3.8e9, 5.7e9),
    "paper-moe-27b-shape": (26.7e9, 3.8e9, 0),
}


def test_presets_exist():
    assert set(PRESETS) == {"tiny", "small", "paper-27b-shape", "paper-moe-27b-shape"}
    assert 100e6 <= param_report(EngramLMConfig.from_preset("small"))["total"] <= 150e6


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_shapes_within_five_percent(name):
    cfg = EngramLMConfig.from_preset(name)
    report = param_report(cfg)
    total, activated, engram = PAPER[name]
    assert abs(report["total"] - total) / total < 0.05, report["total"]
    assert abs(report["activated"] - activated) / activated < 0.05, report["activated"]
    if engram:
        assert abs(report["engram"] - engram) / engram < 0.05, report["engram"]
        assert cfg.engram.layer_ids == [1, 14] and cfg.moe.num_experts == 55
    else:
        assert report["engram"] == 0 and cfg.moe.num_experts == 72
    assert cfg.n_layers == 30 and cfg.d_model == 2560 and cfg.hc_mult == 4
    assert report["flops_per_token"] > 2 * (report["activated"] - report["embedding"])


def test_report_of_config_equals_real_model():
    cfg = small_config()
    model = EngramLM(cfg)
    report = model.param_report()
    assert report == param_report(cfg)
    assert report["total"] == sum(p.numel() for p in model.parameters())
    experts = report["moe_routed_experts"]
    tables = report["engram_tables"]
    rows_read = 2 * cfg.engram.num_heads * cfg.engram.head_dim
    assert report["activated"] == report["total"] - experts * 3 // 5 - tables + rows_read
    assert report["engram"] == tables == sum(b.engram.multi_head_embedding.weight.numel()
                                             for b in model.blocks if b.engram is not None)


def test_iso_parameter_pairs_keep_totals():
    base = small_config(engram=False, moe=dict(num_experts=12, num_shared_experts=1, top_k=2, expert_dim=96))
    template = EngramConfig(engram_vocab_size=[2, 2], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])
    same, report = iso_parameter_config(base, 1.0, template)
    assert same.engram is None and report["total"] == report["base_total"]
    previous_experts = 12
    for rho in (0.8, 0.5, 0.2):
        cfg, report = iso_parameter_config(base, rho, template)
        assert cfg.moe.num_experts == 2 + round(rho * 10) < previous_experts
        previous_experts = cfg.moe.num_experts
        assert report["engram"] > 0 and abs(report["total_rel_diff"]) < 0.002
        assert abs(report["activated_rel_diff"]) < 0.02
        assert param_report(cfg)["total"] == report["total"]
    with pytest.raises(ValueError, match="rho must be in"):
        iso_parameter_config(base, 1.5, template)
    with pytest.raises(ValueError, match="without Engram"):
        iso_parameter_config(small_config(), 0.5, template)
