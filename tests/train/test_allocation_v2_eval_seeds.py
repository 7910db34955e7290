"""docs/results/allocation-v2/eval_seeds.py: `engram eval` reports of several calls pooled per run over seeds, the
same checkpoint found twice accepted only with identical numbers, settings checked, a base subtracted seed by seed."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "results" / "allocation-v2" / "eval_seeds.py"
spec = importlib.util.spec_from_file_location("eval_seeds", SCRIPT)
eval_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_seeds)

SETTINGS = {"checkpoint": [], "out": "x", "data": ["corpus"], "device": "auto", "seq_len": 16, "batch_size": 2,
            "batches": 2, "lengths": [8, 16], "samples": 4, "key_tokens": 2, "seed": 0, "marker_tokens": 2}


def result(shift: float) -> dict:
    """One checkpoint's entry of eval.json: loss buckets 1, 2-3, 4-7 and retrieval at lengths 8 and 16."""
    buckets = [(1, 2, 5.0), (2, 4, 4.0), (4, 8, 3.0)]
    return {"checkpoint": "somewhere", "val_loss": 3.5 + shift, "chance": 0.01,
            "loss_by_position": [{"start": s, "end": e, "tokens": 8, "loss": loss + shift} for s, e, loss in buckets],
            "retrieval": [{"length": 8, "distance": 5, "accuracy": 0.5 + shift, "first_token_accuracy": 0.5,
                           "key_loss": 2.0}, {"length": 16, "distance": 13, "accuracy": 0.25 + shift,
                                              "first_token_accuracy": 0.25, "key_loss": 3.0}]}


def write_eval(path: Path, checkpoints: dict, **settings) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": SETTINGS | settings, "checkpoints": checkpoints}))
    return path


def rows_by(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    return {(r["run"], r["measure"], r["at"]): r for r in csv.DictReader(path.open())}


def test_eval_reports_pool_per_run_over_seeds_with_a_base_subtracted_seed_by_seed(tmp_path):
    files = [write_eval(tmp_path / "call1" / "eval.json", {"base-seed0": result(0.0), "engram-seed0": result(-0.1)}),
             write_eval(tmp_path / "call2" / "eval.json", {"base-seed1": result(0.2), "engram-seed1": result(0.0)}),
             # the same checkpoint evaluated again in a later call: identical numbers, kept once
             write_eval(tmp_path / "call3" / "eval.json", {"engram-seed1": result(0.0), "engram-seed2": result(0.3)})]
    rows = eval_seeds.write_pooled(files, tmp_path / "out", base="base", only=["engram", "base"])
    assert [r["run"] for r in rows][0] == "engram"
    table = rows_by(tmp_path / "out" / "eval_seeds.csv")
    assert {at for run, measure, at in table if measure == "loss"} == {"1", "2-3", "4-7"}
    engram = table["engram", "val_loss", "all"]
    assert engram["seeds"] == "3" and engram["seed_list"] == "0 1 2"
    assert float(engram["mean"]) == pytest.approx(3.5 + (-0.1 + 0.0 + 0.3) / 3)
    assert float(engram["std"]) == pytest.approx(math.sqrt(((-0.1 - 0.2 / 3) ** 2 + (0.2 / 3) ** 2
                                                             + (0.3 - 0.2 / 3) ** 2) / 2))
    # minus the base over the seeds both have (0 and 1): -0.1 and -0.2
    retrieval = table["engram", "retrieval", "16"]
    assert retrieval["base_seeds"] == "0 1"
    assert float(retrieval["minus_base_mean"]) == pytest.approx(-0.15)
    assert float(retrieval["minus_base_std"]) == pytest.approx(math.sqrt(0.005))
    assert float(table["base", "loss", "4-7"]["minus_base_mean"]) == 0.0
    assert (tmp_path / "out" / "eval_seeds.png").stat().st_size > 10_000


def test_eval_seeds_refuses_two_results_of_one_seed_other_settings_and_bad_names(tmp_path):
    first = write_eval(tmp_path / "a" / "eval.json", {"engram-seed0": result(0.0)})
    repeat = write_eval(tmp_path / "b" / "eval.json", {"engram-seed0": result(0.05)})
    with pytest.raises(ValueError, match=r"engram-seed0 has two different results, in .*a/eval.json and .*b/eval.json"):
        eval_seeds.read_evals([first, repeat])
    longer = write_eval(tmp_path / "c" / "eval.json", {"engram-seed1": result(0.0)}, seq_len=32)
    with pytest.raises(ValueError, match=r"c/eval.json was evaluated with other settings .*seq_len 32 against 16"):
        eval_seeds.read_evals([first, longer])
    unnamed = write_eval(tmp_path / "d" / "eval.json", {"my-checkpoint": result(0.0)})
    with pytest.raises(ValueError, match="'my-checkpoint' is not named <run>-seed<S>"):
        eval_seeds.read_evals([unnamed])
    with pytest.raises(ValueError, match=r"--base 'moe' is not among the evaluated runs \['engram'\]"):
        eval_seeds.pooled_rows(eval_seeds.read_evals([first]), base="moe")


def test_eval_seeds_cli_prints_the_pooled_figures_and_names_bad_input(tmp_path):
    files = [write_eval(tmp_path / "a" / "eval.json", {"base-seed0": result(0.0), "engram-seed0": result(-0.1)})]
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[3] / "src")}
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, files), "--out", str(tmp_path / "out"),
                           "--base", "base"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "engram   val_loss   all  (1 seed)  3.400 ± nan   minus base: -0.100 ± nan" in done.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nowhere.json"), "--out",
                              str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "no such eval.json: '" in missing.stderr
