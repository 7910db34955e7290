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
read_metrics = run_stats.read_metrics


def write_run(folder: Path, rates: list[float], loads: bool = True) -> Path:
    folder.mkdir(parents=True)
    rows = [{"step": 10 * (i + 1), "loss": 1.0, "tokens_per_s": rate, **({"moe_load_max": 1 + i} if loads else {})}
            for i, rate in enumerate(rates)]
    rows.append({"step": 10 * len(rates), "val_loss": 2.0})  # an evaluation row: no rate
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_run_stats_medians_by_fifth_and_loads_at_the_listed_steps(tmp_path):
    rates = [100.0, 120.0, 300.0, 310.0, 320.0, 330.0, 340.0, 350.0, 50.0, 70.0]  # fifths of 2 windows
    stats = run_stats.run_stats("rho-0.80-seed1", read_metrics(write_run(tmp_path / "rho-0.80-seed1", rates)))
    assert stats["run"] == "rho-0.80-seed1"
    assert (stats["median"], stats["first_fifth"], stats["last_fifth"]) == (305.0, 110.0, 60.0)
    assert stats["load_max"] == {10: 1, 50: 5, 100: 10}
    dense = read_metrics(write_run(tmp_path / "dense", rates, loads=False))
    assert run_stats.run_stats("dense", dense)["load_max"] == {}
    with pytest.raises(ValueError, match="'empty' logged no tokens_per_s"):
        run_stats.run_stats("empty", read_metrics(write_run(tmp_path / "empty", [])))


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
    twin = write_run(tmp_path / "elsewhere" / "moe-top3-seed0", [100.0] * 5)  # the same run name, another length
    same = subprocess.run([sys.executable, str(SCRIPT), str(run), str(twin)], capture_output=True, text=True)
    assert same.returncode == 2 and "'moe-top3-seed0' given more than once" in same.stderr


def test_routing_stats_tell_a_stuck_router_from_a_rotating_one(tmp_path):
    folder = tmp_path / "moe-top3-seed2"
    folder.mkdir()
    # layer 0: expert 4 hot for the whole run (stuck); layer 1: hot windows with experts 1, 1, 7, 2, 2 (rotating),
    # cool windows between them, which end a stay; layer 2: balanced
    layer0 = [(5.0, 4)] * 6
    layer1 = [(4.0, 1), (4.5, 1), (1.2, 9), (5.0, 7), (3.0, 2), (1.1, 0), (3.5, 2)]
    layer2 = [(1.3, i) for i in range(6)]
    rows = [{"step": 10 * (i + 1), "tokens_per_s": 1.0,
             "moe_load_by_layer": [layer0[i][0], layer1[i][0], layer2[i][0]],
             "moe_hot_expert_by_layer": [layer0[i][1], layer1[i][1], layer2[i][1]]} for i in range(6)]
    rows.append({"step": 70, "tokens_per_s": 1.0, "moe_load_by_layer": [5.0, layer1[6][0], 1.3],
                 "moe_hot_expert_by_layer": [4, layer1[6][1], 3]})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    stuck, rotating, balanced = run_stats.routing_stats(read_metrics(folder), hot=3.0)
    assert stuck == {"layer": 0, "median_load": 5.0, "windows": 7, "hot_windows": 7, "distinct_hot": 1,
                     "changes": 0, "longest_stay": 60, "stays": []}  # 60 steps: shorter than MIN_STAY
    assert rotating == {"layer": 1, "median_load": 3.25, "windows": 7, "hot_windows": 5, "distinct_hot": 3,
                        "changes": 2, "longest_stay": 10, "stays": []}  # expert 2 at 50 and 70: two stays
    stuck, rotating, _ = run_stats.routing_stats(read_metrics(folder), hot=3.0, min_stay=10)
    assert stuck["stays"] == [(4, 10, 70)] and rotating["stays"] == [(1, 10, 20)]
    assert balanced["hot_windows"] == 0 and balanced["distinct_hot"] == 0 and balanced["longest_stay"] == 0
    assert run_stats.routing_stats(read_metrics(write_run(tmp_path / "old", [1.0, 2.0]))) == []  # moe_load_max only
    long_stay = tmp_path / "rho-1.00-seed0"
    long_stay.mkdir()
    (long_stay / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * (i + 1), "tokens_per_s": 1.0, "moe_load_by_layer": [8.0],
                    "moe_hot_expert_by_layer": [5 if i < 15 else 9]}) + "\n" for i in range(20)))
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder), str(long_stay), "--hot", "3"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ("layer 1: median load 3.25 (second half), 5/7 windows at >= 3, hot expert: 3 distinct, 2 changes, "
            "longest stay 10 steps") in done.stdout
    assert ("layer 0: median load 8.00 (second half), 20/20 windows at >= 3, hot expert: 2 distinct, 1 changes, "
            "longest stay 140 steps; stays of >= 100 steps: 5 at 10-150") in done.stdout


def test_routing_plot_draws_the_runs_with_per_layer_routing_and_refuses_none(tmp_path):
    folder = tmp_path / "rho-1.00-seed0"
    folder.mkdir()
    rows = [{"step": 10 * (i + 1), "tokens_per_s": 1.0, "moe_load_by_layer": [8.0 if i % 3 else 1.2, 1.3],
             "moe_hot_expert_by_layer": [i % 4, 0]} for i in range(9)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    old = write_run(tmp_path / "moe-top3-seed0", [1.0, 2.0])  # moe_load_max only: left out of the plot
    metrics = {run.name: read_metrics(run) for run in (folder, old)}
    routing = {name: run_stats.routing_stats(rows, hot=3.0) for name, rows in metrics.items()}
    run_stats.plot_routing(metrics, routing, tmp_path / "routing.png", hot=3.0)
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="none of the runs logged moe_load_by_layer"):
        run_stats.plot_routing({old.name: metrics[old.name]}, routing, tmp_path / "none.png", hot=3.0)
    assert not (tmp_path / "none.png").exists()
    plt = run_stats.pyplot()
    fig, (cool, warm) = plt.subplots(1, 2)
    run_stats.plot_hot_experts(cool, rows, 1, hot=3.0)  # layer 1 never reaches 3: said so, not an empty frame
    assert [text.get_text() for text in cool.texts] == ["load never >= 3: no hot expert"] and not cool.collections
    run_stats.plot_hot_experts(warm, rows, 0, hot=3.0)  # layer 0 at 8.0 in 6 of its 9 windows
    assert not warm.texts and len(warm.collections[0].get_offsets()) == 6
    plt.close(fig)
