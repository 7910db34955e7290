import json

import pytest

from engram import VARIANTS, EngramConfig
from engram.kernels.fp8 import FP8_SCALE_BLOCK


def test_demo_defaults():
    cfg = EngramConfig()
    assert cfg.tokenizer == "deepseek-v3"
    assert cfg.engram_vocab_size == [129280 * 5, 129280 * 5]
    assert (cfg.max_ngram_size, cfg.n_embed_per_ngram, cfg.n_head_per_ngram) == (3, 512, 8)
    assert cfg.layer_ids == [1, 15] and (cfg.pad_id, cfg.seed, cfg.kernel_size) == (2, 0, 4)
    assert (cfg.num_heads, cfg.head_dim, cfg.memory_dim) == (16, 64, 1024)


def test_json_round_trip():
    cfg = EngramConfig(engram_vocab_size=[11, 13, 17], max_ngram_size=4, n_head_per_ngram=2, n_embed_per_ngram=6,
                       layer_ids=[0, 3], pad_id=5, seed=9, kernel_size=3)
    text = json.dumps(cfg.to_dict())
    assert EngramConfig.from_dict(json.loads(text)) == cfg
    assert EngramConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size must be >= 2, got 1"),
    (dict(max_ngram_size=4), r"engram_vocab_size needs one size per n-gram order 2..4 \(3 values\), got \[646400, 646400\]"),
    (dict(n_embed_per_ngram=100), "n_embed_per_ngram must be a positive multiple of n_head_per_ngram=8, got 100"),
    (dict(n_head_per_ngram=0), "n_head_per_ngram must be >= 1, got 0"),
    (dict(layer_ids=[]), r"layer_ids must name at least one layer, got \[\]"),
    (dict(layer_ids=[1, 1]), r"layer_ids must not repeat, got \[1, 1\]"),
    (dict(layer_ids=[3, -1]), r"layer_ids must be >= 0, got -1 in \[3, -1\]"),
    (dict(engram_vocab_size=[100, 1]), r"engram_vocab_size entries must be >= 2, got 1"),
    (dict(pad_id=128_815), "pad_id must be a token id of tokenizer 'deepseek-v3' .*got 128815"),
    (dict(pad_id=-1), "pad_id must be a token id .*got -1"),
    (dict(kernel_size=0), "kernel_size must be >= 1, got 0"),
    (dict(tokenizer=""), "tokenizer must be a registered name or a path"),
], ids=["max-ngram", "vocab-length", "embed-divisible", "heads", "empty-layers", "duplicate-layers",
        "negative-layer", "small-table", "pad-too-big", "pad-negative", "kernel", "tokenizer"])
def test_validation_names_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngramConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown EngramConfig fields: \['hidden_size'\]"):
        EngramConfig.from_dict({"hidden_size": 3})


V41_TEXT_CONFIG = {
    "hidden_size": 5120, "vocab_size": 129280,
    "engram_layer_ids": [1, 14], "engram_max_ngram_size": 4, "engram_n_heads": 8, "engram_vocab_size": 16_000_000,
    "engram_num_embeddings": [384_006_168, 384_016_682], "engram_head_dim": 256, "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99_092, "rms_norm_eps": 1e-6,
}


@pytest.mark.parametrize("wrap", [True, False], ids=["config.json", "text_config"])
def test_from_hf_config_deepseek_v41(wrap):
    cfg = EngramConfig.from_hf_config({"model_type": "deepseek_v4", "text_config": V41_TEXT_CONFIG} if wrap
                                      else V41_TEXT_CONFIG)
    assert (cfg.tokenizer, cfg.variant, cfg.layer_ids) == ("deepseek-v4", "deepseek-v4.1", [1, 14])
    assert cfg.max_ngram_size == 4
    assert cfg.engram_vocab_size == [16_000_000] * 3 and (cfg.pad_id, cfg.seed) == (2, 0)
    assert (cfg.n_head_per_ngram, cfg.num_heads, cfg.head_dim, cfg.memory_dim) == (8, 24, 256, 24 * 256)
    assert cfg.compressed_vocab_size == 99_092
    spec = cfg.variant_spec
    assert spec == VARIANTS["deepseek-v4.1"] and not spec.use_short_conv and not spec.projection_bias
    assert (spec.projection_layout, spec.rms_eps, spec.table_format) == ("keys,value", 1e-20, "fp8-e4m3-ue8m0")
    assert spec.masks_dead_tokens and spec.residual_in_fp32
    assert cfg.head_dim + cfg.head_dim // FP8_SCALE_BLOCK == 264  # bytes of an FP8 row with its scales
    assert EngramConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_hf_config_legacy_pad_key_and_list_sizes():
    dropped = ("engram_pad_token_id", "engram_compressed_vocab_size")
    text = {k: v for k, v in V41_TEXT_CONFIG.items() if k not in dropped}
    cfg = EngramConfig.from_hf_config({**text, "engram_pad_id": 2, "engram_vocab_size": [16_000_000] * 3},
                                      tokenizer="some/tokenizer.json")
    assert (cfg.pad_id, cfg.compressed_vocab_size, cfg.tokenizer) == (2, None, "some/tokenizer.json")
    assert cfg.engram_vocab_size == [16_000_000] * 3


@pytest.mark.parametrize("change, message", [
    (dict(engram_num_embeddings=[384_006_168, 384_016_683]),
     r"engram_num_embeddings \[384006168, 384016683\] disagrees with the sums of the prime table sizes "
     r"\[384006168, 384016682\] of layers \[1, 14\]"),
    (dict(engram_num_embeddings=384_006_168), r"engram_num_embeddings 384006168 disagrees"),
    (dict(engram_pad_id=3), "engram_pad_token_id=2 and its older spelling engram_pad_id=3 disagree"),
    (dict(engram_head_dim=0), "engram_head_dim must be >= 1, got 0"),
    (dict(engram_head_dim=48), "head_dim must be a multiple of 32, got 48"),
], ids=["num-embeddings", "num-embeddings-not-a-list", "pad-spellings", "head-dim", "fp8-head-dim"])
def test_from_hf_config_refuses_inconsistent_configs(change, message):
    with pytest.raises(ValueError, match=message):
        EngramConfig.from_hf_config({"text_config": {**V41_TEXT_CONFIG, **change}})


def test_from_hf_config_names_missing_keys():
    text = {k: v for k, v in V41_TEXT_CONFIG.items() if k not in ("engram_n_heads", "engram_pad_token_id")}
    with pytest.raises(ValueError, match=r"config has no engram_n_heads, engram_pad_token_id \(its engram_\* keys: "
                                         r"\['engram_compressed_vocab_size', 'engram_head_dim'"):
        EngramConfig.from_hf_config({"text_config": text})


def test_variant_defaults_and_old_dicts():
    assert EngramConfig().variant == "demo" and EngramConfig().variant_spec.use_short_conv
    old = EngramConfig().to_dict()
    del old["variant"], old["compressed_vocab_size"]  # a config saved before these fields existed
    assert EngramConfig.from_dict(old) == EngramConfig()
    with pytest.raises(ValueError,
                       match=r"variant must be one of \['conv-only', 'deepseek-v4.1', 'demo', 'no-memory'\], got 'v5'"):
        EngramConfig(variant="v5")
    with pytest.raises(ValueError, match="compressed_vocab_size must be >= 1 .*got 0"):
        EngramConfig(compressed_vocab_size=0)
