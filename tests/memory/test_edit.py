"""Offline editing: lookup (rows, collisions, gates) and write_ngram (set, blend, copy)."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from engram.data.corpus import load_or_prepare
from engram.memory import apply_patch, lookup, model_fingerprint, ngram_rows, write_ngram
from engram.memory.edit import frequent_ngrams
from engram.memory.patch import engram_tables
from engram.model import EngramLM

TEXT = "the king and the queen went to the sea"
TOP = 60


@pytest.fixture(scope="module")
def crowded(fact_memory):
    """The fact base's shape and tokenizer with tables of ~20 rows per head: frequent n-grams collide a lot."""
    base = EngramLM.from_pretrained(fact_memory.base_dir)
    cfg = dataclasses.replace(base.cfg, engram=dataclasses.replace(base.cfg.engram, engram_vocab_size=[17, 19]))
    torch.manual_seed(0)
    return EngramLM(cfg).eval()


@pytest.fixture(scope="module")
def corpus(crowded, text_dir):
    return load_or_prepare([str(text_dir)], tokenizer=crowded.cfg.tokenizer, progress=False)


def counted_ngrams(model, tokens, order):
    """The ``TOP`` most frequent n-grams of ``order`` by a plain Counter (ties: first seen first), as
    ``(compressed key, count, text, flat rows of layer 1 [heads])``."""
    keys = model.hasher.tokenizer(tokens)
    windows = [tuple(keys[i:i + order]) for i in range(len(keys) - order + 1)]
    counts, first = Counter(windows), {}
    for i, window in enumerate(windows):
        first.setdefault(window, i)
    table = engram_tables(model)[1]
    counted = []
    for key, count in counts.most_common(TOP):
        ids = torch.from_numpy(tokens[first[key]:first[key] + order].astype(np.int64))[None]
        rows = table.flat_row_ids(model.hasher.hash_all(ids)[1])[0, -1].tolist()
        text = model.hasher.tokenizer.tokenizer.decode(ids[0].tolist(), skip_special_tokens=False)
        counted.append((key, count, text, rows))
    return counted


def test_lookup_reports_rows_collisions_and_gates(crowded, corpus):
    tokens = np.asarray(corpus.tokens("train")[:3000]).astype(np.int64)
    result = lookup(crowded, TEXT, corpus=corpus, top_ngrams=TOP, corpus_tokens=3000)
    tokenizer = crowded.hasher.tokenizer.tokenizer
    ids = [corpus.info.bos_id, *tokenizer.encode(TEXT, add_special_tokens=False).ids]
    assert [p.token_id for p in result.positions] == ids and result.corpus_tokens == 3000
    assert result.positions[2].ngrams[2] == tokenizer.decode(ids[1:3])
    cfg = crowded.cfg.engram
    padded = np.asarray([cfg.pad_id] * 2 + ids)
    keys = crowded.hasher.tokenizer(padded)
    table = engram_tables(crowded)[1]
    rows = table.flat_row_ids(crowded.hasher.hash_all(torch.tensor([ids]))[1])[0]
    counted = {order: counted_ngrams(crowded, tokens, order) for order in (2, 3)}
    compared = 0
    for position in result.positions:
        (layer,) = position.layers
        assert layer.layer == 1 and len(layer.gates) == crowded.cfg.hc_mult
        assert all(0.0 < gate < 1.0 for gate in layer.gates)
        for column, head in enumerate(layer.heads):
            assert (head.order, head.head) == (2 + column // cfg.n_head_per_ngram, column % cfg.n_head_per_ngram)
            assert head.row == int(rows[position.position, column])
            t = position.position + 2
            own = keys[t + 1 - head.order:t + 1]
            got = [(c.ngram, c.count) for c in head.collisions]
            assert got == [(text, count) for key, count, text, key_rows in counted[head.order]
                           if key_rows[column] == head.row and key != tuple(own)]
            compared += len(got)
    assert compared > 50  # tables this small make collisions certain
    assert result.to_dict()["positions"][1]["layers"][0]["heads"][0]["row"] == int(rows[1, 0])


def test_lookup_gates_are_the_engram_modules_own_and_leave_no_hooks(crowded):
    engram = crowded.blocks[1].engram
    seen = {}

    def keep_inputs(module, args, kwargs):
        seen["hidden"], seen["memory"] = args[0], kwargs["memory"]

    handle = engram.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    ids = torch.tensor([[0, *crowded.hasher.tokenizer.tokenizer.encode(TEXT, add_special_tokens=False).ids]])
    with torch.no_grad():
        logits = crowded(ids).logits
    handle.remove()
    _, gates = engram(seen["hidden"], memory=seen["memory"], return_gates=True)
    result = lookup(crowded, TEXT)
    assert [list(p.layers[0].gates) for p in result.positions] == gates[0].tolist()
    assert result.corpus_tokens == 0 and all(not h.collisions for p in result.positions for h in p.layers[0].heads)
    assert not engram._forward_hooks and not engram._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(crowded(ids).logits, logits)


def test_write_ngram_sets_blends_and_copies_rows(fact_memory):
    model = EngramLM.from_pretrained(fact_memory.base_dir)
    fingerprint = model_fingerprint(model)
    tokenizer = model.hasher.tokenizer.tokenizer
    target = tokenizer.encode(" the queen", add_special_tokens=False).ids
    source = tokenizer.encode(" the horse", add_special_tokens=False).ids
    assert len(target) == len(source) == 2
    table = engram_tables(model)[1].weight.detach()
    rows = ngram_rows(model, target)[1]
    assert rows.shape == (4,) and torch.equal(rows, ngram_rows(model, " the queen")[1])

    erase = write_ngram(model, " the queen", 0.0)
    assert torch.equal(erase.layers[1][0], rows) and not erase.layers[1][1].any()
    assert erase.base_fingerprint == fingerprint == model_fingerprint(model)  # the model itself is unchanged
    assert erase.metadata == {"kind": "write", "ngram": " the queen", "value": 0.0, "mode": "set"}

    vector = torch.randn(16)
    blend = write_ngram(model, target, vector, mode="blend", alpha=0.25)
    assert torch.allclose(blend.layers[1][1], 0.75 * table[rows] + 0.25 * vector, atol=1e-6)
    assert blend.metadata["alpha"] == 0.25 and blend.metadata["ngram"] == target

    copy = write_ngram(model, target, " the horse", layer=1)
    source_rows = ngram_rows(model, source)[1]
    assert torch.equal(copy.layers[1][1], table[source_rows])
    inverse = apply_patch(model, copy)
    assert torch.equal(engram_tables(model)[1].weight[rows], table[source_rows])
    apply_patch(model, inverse)
    assert model_fingerprint(model) == fingerprint


@pytest.mark.parametrize("args,kwargs,match", [
    (([5],), {}, r"is 1 token\(s\) \[5\]; Engram hashes n-grams of 2 to 3 tokens"),
    (([5, 6, 7, 8],), {}, "is 4 token"),
    (([5, 6], 1.0), {"mode": "add"}, "mode must be one of"),
    (([5, 6], 1.0), {"mode": "blend", "alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
    (([5, 6], torch.zeros(3)), {}, r"value must be \[16\] or \[4, 16\]"),
    (([5, 6], [7, 8, 9]), {}, "must have as many tokens"),
    (([5, 6], 1.0), {"layer": 0}, "layer 0 is not an Engram layer"),
    (([5, 6], float("nan")), {}, "value must be a finite number, got nan"),
    (([5, 6], float("-inf")), {"mode": "blend"}, "value must be a finite number, got -inf"),
    (([5, 6], torch.full((16,), float("inf"))), {}, r"patch layer 1: values hold 64 NaN or infinite element\(s\)"),
    (([5, 6], 1.0), {"mode": "blend", "alpha": float("nan")}, r"alpha must be in \[0, 1\], got nan"),
], ids=["short", "long", "mode", "alpha", "shape", "source-length", "layer", "nan", "-inf", "inf-tensor",
        "alpha-nan"])
def test_write_ngram_refuses_bad_input(fact_memory, args, kwargs, match):
    model = EngramLM.from_pretrained(fact_memory.base_dir)
    ngram, *value = args
    if value and isinstance(value[0], list):
        value = [model.hasher.tokenizer.tokenizer.decode(value[0])]
    with pytest.raises(ValueError, match=match):
        write_ngram(model, ngram, value[0] if value else 0.0, **kwargs)


def test_frequent_ngrams_counts_by_compressed_ids_and_skips_orders_longer_than_the_tokens(crowded):
    tokens = np.array([5, 6, 5, 6, 7])
    index = frequent_ngrams(crowded, tokens, top=2)
    assert index.counts[2].tolist() == [2, 1]
    assert index.keys[2][0].tolist() == crowded.hasher.tokenizer(tokens[:2]).tolist()
    assert index.texts[2][0] == crowded.hasher.tokenizer.tokenizer.decode([5, 6])
    assert index.rows[1][2].shape == (2, crowded.cfg.engram.n_head_per_ngram)
    short = frequent_ngrams(crowded, tokens[:2])
    assert 3 not in short.keys and short.collisions(1, 3, 0, 0, np.zeros(3)) == ()
