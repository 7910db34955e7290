"""`engram memory lookup --deepseek-v41` and `engram inspect table --deepseek-v41` on a synthetic V4.1 checkpoint,
through the package's main entry, with the real V4 tokenizer (text must be tokenised), against the plain-Python
hashing of ``test_deepseek_v41.py`` and the FP8 decoding of ``v41_checkpoint.py``."""

import json
from collections import Counter

import numpy as np
import pytest
from test_deepseek_v41 import reference_rows
from v41_checkpoint import LAYERS, VOCAB, decoded_rows, engram_tensors, flat_offsets, table_rows, write_checkpoint

from engram.cli import main
from engram.data.corpus import bos_id
from engram.inspection.loading import tokenizer_corpus

TEXT = "The zebra code is 42, the zebra code."


@pytest.fixture(scope="module")
def v41_dir(tmp_path_factory, deepseek_v4_ct):
    """The checkpoint (its hasher needs the V4 tokenizer, which the fixture fetched into the session cache)."""
    return write_checkpoint(tmp_path_factory.mktemp("v41-cli") / "checkpoint")


def reference_flat_rows(lookup: np.ndarray, ids: list[int], dead: list[bool], layer: int) -> np.ndarray:
    return np.asarray(reference_rows(lookup, ids, dead, layer, VOCAB)) + flat_offsets(layer)


def text_ids(ct) -> list[int]:
    return [bos_id(ct.tokenizer), *ct.tokenizer.encode(TEXT, add_special_tokens=False).ids]


def test_memory_lookup_json(v41_dir, deepseek_v4_ct, capsys):
    ids = text_ids(deepseek_v4_ct)
    dead_id = ids[4]  # " code": dead wherever it appears
    capsys.readouterr()
    assert main(["memory", "lookup", TEXT, "--deepseek-v41", str(v41_dir), "--dead-token-id", str(dead_id),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    positions = result["positions"]
    assert [p["token_id"] for p in positions] == ids and result["corpus_tokens"] == 0
    assert positions[2]["ngrams"]["3"] == deepseek_v4_ct.tokenizer.decode(ids[:3], skip_special_tokens=False)
    dead = [token == dead_id for token in ids]
    assert sum(dead) == 2
    tensors = engram_tensors()
    for index, layer in enumerate(LAYERS):
        rows = reference_flat_rows(deepseek_v4_ct.lookup, ids, dead, layer)  # [T, 24]
        norms = np.linalg.norm(decoded_rows(tensors, layer, rows), axis=-1)
        for t, position in enumerate(positions):
            read = position["layers"][index]
            assert read["layer"] == layer and read["gates"] == []
            assert [h["row"] for h in read["heads"]] == rows[t].tolist()
            assert [(h["order"], h["head"]) for h in read["heads"]] == [(2 + c // 8, c % 8) for c in range(24)]
            np.testing.assert_allclose([h["row_norm"] for h in read["heads"]], norms[t], rtol=1e-6)


def test_memory_lookup_from_disk_reads_what_the_device_reads(v41_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["memory", "lookup", TEXT, "--deepseek-v41", str(v41_dir), "--json"]) == 0
    on_device = json.loads(capsys.readouterr().out)
    tables = tmp_path / "tables"
    assert main(["memory", "lookup", TEXT, "--deepseek-v41", str(v41_dir), "--json", "--table-placement", "disk",
                 "--table-dir", str(tables)]) == 0
    assert json.loads(capsys.readouterr().out) == on_device
    assert sorted(p.name for p in tables.iterdir()) == [f"engram-v41-layer-{layer}.safetensors" for layer in LAYERS]
    assert main(["memory", "lookup", TEXT, "--deepseek-v41", str(v41_dir), "--table-placement", "host"]) == 2
    assert "pass table_dir=" in capsys.readouterr().err


def test_memory_lookup_tables_one_layer_with_collisions(v41_dir, text_dir, capsys):
    capsys.readouterr()
    assert main(["memory", "lookup", "the [zebra] code", "--deepseek-v41", str(v41_dir), "--layer", "14",
                 "--corpus", str(text_dir), "--top-ngrams", "30", "--corpus-tokens", "2000"]) == 0
    out = capsys.readouterr().out
    assert "Engram layer 14: rows read (row:L2 norm), collisions among the 30 most frequent" in out  # title wraps
    assert "Engram layer 1:" not in out
    assert "no gates" in out and "gate per branch" not in out and "' ['" in out


def test_memory_lookup_refuses_mixed_flags(v41_dir, capsys):
    assert main(["memory", "lookup", "x", "--checkpoint", str(v41_dir), "--layer", "1"]) == 2
    assert "--layer, --dead-token-id, --table-placement and --table-dir go with --deepseek-v41" in \
        capsys.readouterr().err
    assert main(["memory", "lookup", "x", "--deepseek-v41", str(v41_dir), "--layer", "3"]) == 2
    assert "layer 3 is not an Engram layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memory", "lookup", "x", "--checkpoint", "a", "--deepseek-v41", "b"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_inspect_table_counts_rows_like_the_reference(v41_dir, deepseek_v4_ct, text_dir, tmp_path, capsys):
    out = tmp_path / "table"
    capsys.readouterr()
    assert main(["inspect", "table", "--deepseek-v41", str(v41_dir), "--data", str(text_dir), "--out", str(out),
                 "--tokens", "600", "--top-ngrams", "20"]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"table.json", "table.png"} and "rows read" in printed
    summary = json.loads((out / "table.json").read_text())
    corpus = tokenizer_corpus("deepseek-v4", [str(text_dir)])
    ids = np.asarray(corpus.tokens("train")[:600]).tolist()
    assert summary["tokens"] == 600 and summary["checkpoint"] == str(v41_dir)
    heads = {(h["layer_id"], h["head"]): h for h in summary["heads"]}
    compressed, bos = deepseek_v4_ct.lookup[ids].tolist(), corpus.info.bos_id
    for layer, stats in zip(LAYERS, summary["layers"]):
        rows = reference_flat_rows(deepseek_v4_ct.lookup, ids, [False] * len(ids), layer)  # hashed as one sequence
        counts = Counter(rows.ravel().tolist())
        assert stats["layer_id"] == layer and stats["rows"] == table_rows()[layer]
        assert stats["accesses"] == 600 * 24 and stats["rows_read"] == len(counts)
        assert stats["top_row_counts"] == sorted(counts.values(), reverse=True)[:100]
        for order in (2, 3, 4):  # collisions among the 20 most frequent compressed n-grams without BOS (ties: ids)
            ends = [i for i in range(order - 1, len(ids)) if bos not in ids[i - order + 1:i + 1]]
            grams = Counter(tuple(compressed[i - order + 1:i + 1]) for i in ends)
            top = sorted((g for g, c in grams.items() if c >= 2), key=lambda g: (-grams[g], g))[:20]
            row_of = {tuple(compressed[i - order + 1:i + 1]): rows[i] for i in ends}
            for head in range((order - 2) * 8, (order - 1) * 8):
                sharing = Counter(row_of[g][head] for g in top)
                assert heads[layer, head]["rows_read"] == len(set(rows[:, head].tolist()))
                assert heads[layer, head]["top_ngrams"] == len(top) > 0
                assert heads[layer, head]["collided"] == sum(sharing[row_of[g][head]] >= 2 for g in top)


def test_inspect_table_needs_data(v41_dir, tmp_path, capsys):
    assert main(["inspect", "table", "--deepseek-v41", str(v41_dir), "--out", str(tmp_path)]) == 2
    assert "names no training data: pass --data" in capsys.readouterr().err
