import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from inspection.inspect_helpers import variant

import engram.inspection.table_stats as table_module
from engram.data.corpus import bos_id
from engram.inspection.loading import model_tokenizer
from engram.inspection.table_stats import run_table_stats, table_statistics


@pytest.mark.parametrize("chunk, table_rows", [(7, None), (1 << 16, None), (5, 11)],
                         ids=["chunked", "whole", "11-row-tables"])
def test_table_stats_match_a_brute_force_count(trained_model, monkeypatch, chunk, table_rows):
    monkeypatch.setattr(table_module, "_HASH_CHUNK", chunk)
    model = trained_model if table_rows is None else variant(trained_model,
                                                             engram_fields={"engram_vocab_size": [table_rows] * 2})
    tokenizer = model_tokenizer(model)
    bos = bos_id(tokenizer)
    text = "the king and the queen by the way the king went to the sea and the queen "
    ids = np.array(([bos] + tokenizer.encode(text * 3, add_special_tokens=False).ids) * 2, dtype=np.int64)
    heads, layers = table_statistics(model, ids, top_ngrams=6, bos=bos)

    hasher = model.hasher
    rows = hasher.hash(ids[None], layer_id=1)[0].numpy()  # [S, H], hashed in one piece
    sizes = hasher.flat_table_sizes(1)
    offsets = np.cumsum([0] + sizes[:-1])
    (layer,) = layers
    accesses = Counter((rows + offsets).ravel().tolist())
    assert layer.layer_id == 1 and layer.rows == sum(sizes) and layer.accesses == rows.size
    assert layer.row_counts.tolist() == sorted(accesses.values(), reverse=True)
    assert layer.coverage()[max(layer.coverage())] == pytest.approx(1.0)
    compressed = hasher.tokenizer.lookup[ids]
    k = hasher.cfg.n_head_per_ngram
    assert len(heads) == len(sizes)
    for head in heads:
        assert head.rows_read == len(set(rows[:, head.head].tolist()))
        order = head.order
        assert order == 2 + head.head // k and head.table_size == sizes[head.head]
        # the 6 most frequent compressed n-grams without BOS seen twice or more (ties: smaller ids first)
        ends = [i for i in range(order - 1, len(ids)) if bos not in ids[i - order + 1:i + 1]]
        grams = Counter(tuple(compressed[i - order + 1:i + 1]) for i in ends)
        top = sorted((g for g, c in grams.items() if c >= 2), key=lambda g: (-grams[g], g))[:6]
        row_of = defaultdict(set)
        for i in ends:
            row_of[tuple(compressed[i - order + 1:i + 1])].add(int(rows[i, head.head]))
        assert all(len(r) == 1 for r in row_of.values())  # one row per n-gram: hashing reads compressed ids
        sharing = Counter(min(row_of[g]) for g in top)
        assert head.top_ngrams == len(top) > 0
        assert head.collided == sum(1 for g in top if sharing[min(row_of[g])] >= 2)
        assert 0.0 <= head.collision_rate <= 1.0 and 0.0 < head.expected_collision_rate < 1.0
    if table_rows is not None:  # 6 n-grams in 11 to 37 rows: some share a row
        assert sum(head.collided for head in heads) > 0


def test_run_table_stats_writes_results(engram_checkpoint, tmp_path):
    report = run_table_stats(engram_checkpoint, tmp_path / "out", device="cpu", tokens=5000, top_ngrams=100)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"table.json", "table.png"}
    summary = json.loads(report.summary.read_text())
    assert summary["tokens"] == report.tokens == 5000
    (layer,) = summary["layers"]
    assert layer["accesses"] == 5000 * 8 and 0 < layer["occupancy"] <= 1
    assert list(layer["coverage"].values()) == sorted(layer["coverage"].values())
    assert len(summary["heads"]) == 8


def test_run_table_stats_refuses_bad_values(engram_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="tokens must be >= 1, got 0"):
        run_table_stats(engram_checkpoint, tmp_path, tokens=0)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        run_table_stats(engram_checkpoint, tmp_path, device="cpu", split="test")
