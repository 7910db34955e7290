"""`engram tune` and `engram memory ...` through their parsers (listed in engram.cli.COMMANDS)."""

import argparse
import json
import shutil

import pytest

from engram.memory import diff, load_patch, model_fingerprint
from engram.cli import memory, tune
from engram.model import EngramLM


def run(*argv) -> int:
    parser = argparse.ArgumentParser(prog="engram")
    commands = parser.add_subparsers(dest="command", required=True)
    tune.add_parser(commands)
    memory.add_parser(commands)
    args = parser.parse_args([str(arg) for arg in argv])
    return tune.run(args) if args.command == "tune" else memory.run(args)


@pytest.fixture(scope="module")
def tuned(fact_memory, tmp_path_factory):
    patch = tmp_path_factory.mktemp("cli") / "short.patch"
    assert run("tune", "--checkpoint", fact_memory.base_dir, "--data", fact_memory.data_dir, "--out", patch,
               "--steps", 3, "--batch-size", 2, "--seq-len", 16, "--no-progress") == 0
    return patch


def test_tune_apply_revert_through_new_folders(fact_memory, tuned, tmp_path):
    base = EngramLM.from_pretrained(fact_memory.base_dir)
    fingerprint = model_fingerprint(base)
    patch = load_patch(tuned, base)
    assert patch.metadata["steps"] == 3 and patch.num_rows > 0
    assert run("memory", "apply", tuned, "--checkpoint", fact_memory.base_dir, "--out", tmp_path / "patched") == 0
    inverse = tmp_path / "patched" / "short.inverse.patch"
    found = diff(base, tmp_path / "patched")
    assert {k: v[0].tolist() for k, v in found.layers.items()} == {k: v[0].tolist() for k, v in patch.layers.items()}
    assert run("memory", "revert", inverse, "--checkpoint", tmp_path / "patched", "--out", tmp_path / "restored",
               "--inverse", tmp_path / "redo.patch") == 0
    assert model_fingerprint(EngramLM.from_pretrained(tmp_path / "restored")) == fingerprint
    assert load_patch(tmp_path / "redo.patch").metadata["kind"] == "inverse"
    assert model_fingerprint(EngramLM.from_pretrained(fact_memory.base_dir)) == fingerprint  # base untouched


def test_apply_overwrites_the_checkpoint_only_in_place(fact_memory, tuned, tmp_path):
    with pytest.raises(ValueError, match="is the checkpoint folder itself; pass --in-place"):
        run("memory", "apply", tuned, "--checkpoint", fact_memory.base_dir, "--out", fact_memory.base_dir)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        run("memory", "apply", tuned, "--checkpoint", fact_memory.base_dir, "--out", tmp_path / "full")
    copy = shutil.copytree(fact_memory.base_dir, tmp_path / "copy")
    fingerprint = model_fingerprint(EngramLM.from_pretrained(copy))
    assert run("memory", "apply", tuned, "--checkpoint", copy, "--in-place") == 0
    assert model_fingerprint(EngramLM.from_pretrained(copy)) != fingerprint
    with pytest.raises(ValueError, match="refusing a patch made for another base model"):
        run("memory", "apply", tuned, "--checkpoint", copy, "--in-place")
    assert run("memory", "revert", copy / "short.inverse.patch", "--checkpoint", copy, "--in-place") == 0
    assert model_fingerprint(EngramLM.from_pretrained(copy)) == fingerprint
    assert load_patch(copy / "short.redo.patch", EngramLM.from_pretrained(copy)).num_rows > 0


def test_write_merge_diff_show(fact_memory, tuned, tmp_path, capsys):
    base = fact_memory.base_dir
    assert run("memory", "write", " the queen", "--checkpoint", base, "--value", 0,
               "--out", tmp_path / "erase.patch") == 0
    assert run("memory", "write", " the horse", "--checkpoint", base, "--value-from", " the queen", "--mode", "blend",
               "--alpha", 0.5, "--out", tmp_path / "blend.patch") == 0
    erase, blend = load_patch(tmp_path / "erase.patch"), load_patch(tmp_path / "blend.patch")
    assert run("memory", "merge", tmp_path / "erase.patch", tmp_path / "blend.patch",
               "--out", tmp_path / "both.patch") == 0
    both = load_patch(tmp_path / "both.patch")
    assert both.num_rows == erase.num_rows + blend.num_rows == 8
    assert run("memory", "apply", tmp_path / "both.patch", "--checkpoint", base, "--out", tmp_path / "edited") == 0
    assert run("memory", "diff", base, tmp_path / "edited", "--out", tmp_path / "diff.patch") == 0
    assert load_patch(tmp_path / "diff.patch").layers[1][0].tolist() == both.layers[1][0].tolist()
    capsys.readouterr()
    assert run("memory", "show", tmp_path / "both.patch", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rows"] == {"1": 8} and shown["metadata"]["kind"] == "merge"
    with pytest.raises(ValueError, match="is 1 token"):
        run("memory", "write", " queen", "--checkpoint", base, "--value", 1, "--out", tmp_path / "bad.patch")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_write_refuses_a_non_finite_value_before_loading_anything(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        run("memory", "write", " the queen", "--checkpoint", tmp_path / "absent", f"--value={value}",
            "--out", tmp_path / "p.patch")
    assert f"argument --value: must be a finite number, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "p.patch").exists()


def test_lookup_prints_tables_or_json(fact_memory, capsys):
    capsys.readouterr()
    assert run("memory", "lookup", "the zebra code is", "--checkpoint", fact_memory.base_dir,
               "--corpus", fact_memory.data_dir, "--top-ngrams", 50, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["corpus_tokens"] > 0 and result["positions"][0]["layers"][0]["layer"] == 1
    assert run("memory", "lookup", "the [zebra] code", "--checkpoint", fact_memory.base_dir) == 0
    out = capsys.readouterr().out
    assert "Engram layer 1: rows read" in out and "'['" in out  # tokens are printed, not parsed as markup
