"""benchmarks/bench_decode.py --quick: every part runs on the CPU, the loops agree, and the report is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and decodes eight tiny models in a subprocess: deselect with -m "not slow"

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode.py"


def test_quick_run_measures_every_part_and_writes_the_report(tmp_path):
    report, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(report), "--json", str(raw)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(raw.read_text())["results"]
    rows = {(row["model"], row["loop"]): row for row in results["generate"]}
    for model in ("dense", "small", "small-no-engram", "small-host"):
        for loop in ("eager", "graph"):
            row = rows[(model, loop)]
            assert row["tokens_per_s"] > 0 and row["match"] == 1.0, row  # greedy tokens equal the eager loop's
        assert rows[(model, "graph")]["decode"] == "static"  # the sync-free step, op by op on the CPU
    assert rows[("dense", "hf-eager")]["tokens_per_s"] > 0
    assert "CUDA only" in rows[("dense", "hf-static")]["note"]
    server = {(row["batching"], row["join_every"]): row for row in results["server"]}
    assert set(server) == {("static", None), ("continuous", 1), ("continuous", 16)}
    assert server[("continuous", 16)]["decode"] == "static"
    assert all(row["requests"] == 3 and row["errors"] == 0 and row["tokens_per_s"] > 0 for row in server.values())
    text = report.read_text()
    assert "| model | loop | batch | new tokens/s |" in text and "| batching | join every | decode |" in text
    assert result.stdout.rstrip().splitlines()[-1].startswith("| continuous | 16 steps | static |")  # the table comes last


def test_a_failing_loop_is_reported_in_its_row_and_the_others_still_run():
    import argparse
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Broken:
        def generate(self, *args, **kwargs):
            raise RuntimeError("capture failed at batch 3")

    args = argparse.Namespace(new_tokens=2, repeats=1, prompt_len=4)
    row = bench.run_engram(Broken(), torch.zeros(3, 4, dtype=torch.long), "graph", "graph", args, torch.device("cpu"))
    assert row == {"decode": "graph", "note": "failed: RuntimeError: capture failed at batch 3"}
