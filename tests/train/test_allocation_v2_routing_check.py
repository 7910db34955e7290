"""docs/results/allocation-v2/routing_check.py at toy size: the small run's per-layer loads and their plot, and the
compiled-against-eager comparison of the balancing biases (torch.compile replaced by the identity here: on a CPU
compiling takes minutes)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "results" / "allocation-v2" / "routing_check.py"
spec = importlib.util.spec_from_file_location("routing_check", SCRIPT)
routing_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(routing_check)


def test_routing_check_logs_every_moe_layers_load_and_compares_the_biases(text_dir, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, mode: compiled.append(module) or module)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["routing_check.py", "--out", str(out), "--data", str(text_dir),
                                      "--tokenizer", "bpe-300", "--steps", "50", "--batch", "2", "--seq", "16",
                                      "--compiled"])
    routing_check.main()
    assert sorted(p.name for p in out.iterdir()) == ["compiled.json", "small-run.jsonl", "small-run.png"]
    rows = [json.loads(line) for line in (out / "small-run.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [25, 50]  # every 25 steps
    ceiling = routing_check.MOE_TOP3.num_experts / routing_check.MOE_TOP3.top_k
    assert all(len(row["moe_load_by_layer"]) == 3 and 1.0 <= min(row["moe_load_by_layer"])
               and max(row["moe_load_by_layer"]) <= ceiling + 1e-6 for row in rows)  # float32
    report = json.loads((out / "compiled.json").read_text())
    assert len(compiled) == 1  # only the second tiny run compiles
    assert report["identical"] and report["eager"] == report["compiled"]
    assert len(report["eager"]) == 1 and any(bias != 0 for bias in report["eager"][0])  # the biases moved
