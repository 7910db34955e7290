"""docs/results/allocation-v2/run_stats.py: tokens/s by fifths, moe_load_max at fixed steps, GPU utilisation."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "results" / "allocation-v2" / "run_stats.py"
spec = importlib.util.spec_from_file_location("run_stats", SCRIPT)
run_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_stats)


def write_run(folder: Path, rates: list[float], loads: bool = True) -> Path:
    folder.mkdir(parents=True)
    rows = [{"step": 10 * (i + 1), "loss": 1.0, "tokens_per_s": rate, **({"moe_load_max": 1 + i} if loads else {})}
            for i, rate in enumerate(rates)]
    rows.append({"step": 10 * len(rates), "val_loss": 2.0})  # an evaluation row: no rate
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_run_stats_medians_by_fifth_and_loads_at_the_listed_steps(tmp_path):
    rates = [100.0, 120.0, 300.0, 310.0, 320.0, 330.0, 340.0, 350.0, 50.0, 70.0]  # fifths of 2 windows
    stats = run_stats.run_stats(write_run(tmp_path / "rho-0.80-seed1", rates))
    assert stats["run"] == "rho-0.80-seed1"
    assert (stats["median"], stats["first_fifth"], stats["last_fifth"]) == (305.0, 110.0, 60.0)
    assert stats["load_max"] == {10: 1, 50: 5, 100: 10}
    assert run_stats.run_stats(write_run(tmp_path / "dense", rates, loads=False))["load_max"] == {}
    with pytest.raises(ValueError, match="logged no tokens_per_s"):
        run_stats.run_stats(write_run(tmp_path / "empty", []))


def test_gpu_stats_read_nvidia_smi_samples_and_the_cli_prints_both(tmp_path):
    gpu = tmp_path / "gpu.csv"
    samples = [0, 0, 50, 60, 70, 0, 72, 80, 75, 45, 40, 30, 0]  # the idle (0%) samples are left out
    gpu.write_text("memory.used [MiB], utilization.gpu [%]\n"
                   + "".join(f"{1000 + i} MiB, {u} %\n" for i, u in enumerate(samples)))
    assert run_stats.gpu_stats(gpu) == {"file": str(gpu), "samples": 13, "busy": 9, "first_fifth": 50,
                                        "last_fifth": 30, "min": 0, "max": 80}
    run = write_run(tmp_path / "moe-top3-seed0", [200.0] * 5)
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), "--gpu", str(gpu)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "moe-top3-seed0  tokens/s median 200, first fifth 200, last fifth 200; moe_load_max 10:1.00" in done.stdout
    assert "13 samples (9 busy), utilisation first fifth 50%, last fifth 30%, range 0-80%" in done.stdout
    (tmp_path / "bad.csv").write_text("memory.used [MiB], utilization.gpu [%]\n900 MiB, 0 %\n")
    bad = subprocess.run([sys.executable, str(SCRIPT), str(run), "--gpu", str(tmp_path / "bad.csv")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "holds no busy utilisation samples" in bad.stderr
