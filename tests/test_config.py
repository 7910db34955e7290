import json

import pytest

from engram import EngramConfig


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
