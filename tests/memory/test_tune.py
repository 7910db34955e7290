"""Memory-only fine-tuning: only table rows that were read change, and the patch teaches the model a fact."""

import json

import pytest
import torch

from engram.data.batches import TokenBatches
from engram.data.corpus import load_or_prepare
from engram.memory import apply_patch, diff, load_patch
from engram.memory.patch import engram_tables
from engram.memory.tune import TuneConfig, freeze_for_memory_tuning, tune_memory
from engram.model import EngramLM, EngramLMConfig
from engram.model.overlay import row_overlays

from memory.fact import ANSWER, TUNE


def test_the_patch_teaches_the_fact_applied_or_overlaid_and_only_then(fact_memory):
    model = EngramLM.from_pretrained(fact_memory.base_dir)
    patch = load_patch(fact_memory.patch_path, model)
    (without,) = fact_memory.greedy(model)
    assert without != ANSWER
    with row_overlays(model, [patch.overlay()]):
        assert fact_memory.greedy(model) == [ANSWER]
    with row_overlays(model, [None, patch.overlay(), None]):
        assert fact_memory.greedy(model, batch_size=3) == [without, ANSWER, without]
    apply_patch(model, patch)
    assert fact_memory.greedy(model) == [ANSWER]


def test_tuning_changes_only_table_rows_that_were_read(fact_memory):
    base = EngramLM.from_pretrained(fact_memory.base_dir)
    patch = load_patch(fact_memory.patch_path, base)
    # diff compares every non-table tensor bit for bit: none differs.
    assert patch.dense == {} and patch.num_rows > 0
    assert patch.metadata["kind"] == "tune" and patch.metadata["steps"] == TUNE["steps"]
    assert patch.metadata["trained"] == ["blocks.1.engram.multi_head_embedding.weight"]
    corpus = load_or_prepare([str(fact_memory.data_dir)], tokenizer=base.cfg.tokenizer, progress=False)
    batches = TokenBatches(corpus.tokens("train"), TUNE["batch_size"], TUNE["seq_len"], TUNE["seed"])
    tables = engram_tables(base)
    read = {layer_id: torch.zeros(table.num_rows, dtype=torch.bool) for layer_id, table in tables.items()}
    for step in range(TUNE["steps"]):
        hashed = base.hasher.hash_all(batches.batch(step)[0])
        for layer_id, table in tables.items():
            read[layer_id][table.flat_row_ids(hashed[layer_id]).reshape(-1)] = True
    for layer_id, (rows, _) in patch.layers.items():
        assert bool(read[layer_id][rows].all()), f"layer {layer_id} changed rows no batch read"
    tuned = EngramLM.from_pretrained(fact_memory.base_dir)
    apply_patch(tuned, patch)
    assert diff(base, tuned).dense == {}


def test_freeze_leaves_tables_and_optionally_the_gates_trainable(fact_memory):
    model = EngramLM.from_pretrained(fact_memory.base_dir)
    assert freeze_for_memory_tuning(model) == ["blocks.1.engram.multi_head_embedding.weight"]
    assert freeze_for_memory_tuning(model, train_gates=True) == [
        "blocks.1.engram.multi_head_embedding.weight", "blocks.1.engram.value_key_proj.weight",
        "blocks.1.engram.value_key_proj.bias", "blocks.1.engram.key_norm.weight", "blocks.1.engram.query_norm.weight"]


def test_gate_tuning_puts_the_projections_in_the_patch(fact_memory, tmp_path):
    patch = tune_memory(TuneConfig(fact_memory.base_dir, fact_memory.data_dir, tmp_path / "gates.patch", steps=3,
                                   train_gates=True, batch_size=2, seq_len=16, progress=False))
    assert patch.metadata["data"] == [str(fact_memory.data_dir)] and patch.metadata["train_gates"]
    assert set(patch.dense) == {"blocks.1.engram.value_key_proj.weight", "blocks.1.engram.value_key_proj.bias",
                                "blocks.1.engram.key_norm.weight", "blocks.1.engram.query_norm.weight"}
    with pytest.raises(ValueError, match="gate-tuned patches cannot be served as overlays"):
        patch.overlay()
    model = EngramLM.from_pretrained(fact_memory.base_dir)
    apply_patch(model, load_patch(tmp_path / "gates.patch", model))
    assert torch.equal(model.blocks[1].engram.key_norm.weight, patch.dense["blocks.1.engram.key_norm.weight"])


def test_tuning_on_a_prepared_corpus_reports_domain_and_general_losses(fact_memory, tmp_path):
    prepared = json.loads((fact_memory.base_dir.parent / "run.json").read_text())["corpus"]["path"]
    patch = tune_memory(TuneConfig(fact_memory.base_dir, prepared, tmp_path / "domain.patch", steps=4, lr=3e-2,
                                   batch_size=4, seq_len=32, progress=False, eval_data=[prepared], eval_batches=1))
    losses = patch.metadata["val_loss"]
    assert patch.metadata["data"] == patch.metadata["eval_data"] == [prepared]
    assert losses.keys() == {"domain", "general"}
    assert losses["domain"]["after"] < losses["domain"]["before"]
    assert losses["general"] == losses["domain"]  # the same text both times


def test_tuning_refuses_bad_settings(fact_memory, tmp_path):
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        tune_memory(TuneConfig(fact_memory.base_dir, str(fact_memory.data_dir), tmp_path / "p.patch", steps=0))
    with pytest.raises(ValueError, match="seq_len 4096 exceeds the model's max_position_embeddings 512"):
        tune_memory(TuneConfig(fact_memory.base_dir, str(fact_memory.data_dir), tmp_path / "p.patch", seq_len=4096))
    baseline = tmp_path / "baseline"
    EngramLM(EngramLMConfig.from_preset("tiny", engram=None, n_layers=1, ffn_kinds=["dense"])).save_pretrained(baseline)
    with pytest.raises(ValueError, match="no Engram layers"):
        tune_memory(TuneConfig(baseline, str(fact_memory.data_dir), tmp_path / "p.patch"))
    assert not (tmp_path / "p.patch").exists()
