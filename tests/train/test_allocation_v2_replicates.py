"""docs/results/allocation-v2/replicates.py: every finished run folder of several sources pooled per run, same-seed
repeats paired, steps checked; gain.py: one run's gain over another during training, seed by seed, per length."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "results" / "allocation-v2" / "replicates.py"
spec = importlib.util.spec_from_file_location("replicates", SCRIPT)
replicates = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replicates)
gain_spec = importlib.util.spec_from_file_location("gain", SCRIPT.with_name("gain.py"))
gain = importlib.util.module_from_spec(gain_spec)
gain_spec.loader.exec_module(gain)


def make_run(source: Path, folder: str, val_losses: list[float], steps: int = 20, finished: bool = True) -> None:
    run = source / folder
    (run / "final").mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(val_losses, 1):
            step = steps * i // len(val_losses)
            f.write(json.dumps({"step": step, "tokens": step * 64, "loss": loss + 0.1}) + "\n")
            f.write(json.dumps({"step": step, "tokens": step * 64, "loss": loss + 0.1, "val_loss": loss,
                                "val_bpb": loss / 2}) + "\n")
    if finished:
        (run / "final" / "config.json").write_text("{}")


def read(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_replicates_pool_seeds_and_repeats_from_several_sources(tmp_path):
    first, second = tmp_path / "call-a", tmp_path / "call-b"
    make_run(first, "moe-seed0", [3.0, 2.9])
    make_run(first, "moe-seed1", [3.1, 2.7])
    make_run(first, "engram-seed0", [2.8, 2.5])
    make_run(first, "engram-seed1", [2.9, 2.6], finished=False)  # cut by a deadline: not a replicate
    make_run(second, "moe-seed0", [3.0, 2.95])  # the same seed trained again in another call
    make_run(second, "notes", [1.0])  # not a run folder
    report = replicates.write_replicates([first, second], tmp_path / "out", runs=["moe", "engram"])

    assert [(r["run"], r["seed"], r["source"]) for r in report["rows"]] == [
        ("moe", 0, str(first)), ("moe", 1, str(first)), ("moe", 0, str(second)), ("engram", 0, str(first))]
    summary = {row["run"]: row for row in read(tmp_path / "out" / "replicates_summary.csv")}
    assert list(summary) == ["moe", "engram"] and summary["moe"]["seeds"] == "3"
    assert float(summary["moe"]["val_loss_mean"]) == pytest.approx(np.mean([2.9, 2.7, 2.95]))
    assert float(summary["moe"]["val_loss_std"]) == pytest.approx(np.std([2.9, 2.7, 2.95], ddof=1))
    assert math.isnan(float(summary["engram"]["val_loss_std"]))
    (repeat,) = read(tmp_path / "out" / "replicates_repeats.csv")
    assert (repeat["run"], repeat["seed"]) == ("moe", "0")
    assert float(repeat["difference"]) == pytest.approx(0.05)
    (pair,) = read(tmp_path / "out" / "replicates_differences.csv")
    assert (pair["run"], pair["other"]) == ("moe", "engram") and pair["exceeds_seed_spread"] == ""
    for plot in ("replicates.png", "replicates_curves.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 10_000


def test_replicates_refuse_mixed_lengths_and_missing_runs(tmp_path):
    make_run(tmp_path / "a", "moe-seed0", [3.0], steps=20)
    make_run(tmp_path / "b", "moe-seed1", [3.0], steps=40)
    with pytest.raises(ValueError, match=r"different numbers of steps \(\[20, 40\]\).*moe-seed1"):
        replicates.finished_runs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match=r"no finished folder of run\(s\) \['engram'\]"):
        replicates.finished_runs([tmp_path / "a"], runs=["moe", "engram"])
    with pytest.raises(ValueError, match="no such folder of runs"):
        replicates.finished_runs([tmp_path / "missing"])


def write_sweep_csv(path: Path, rows: list[dict]) -> Path:
    columns = ["run", "seed", *replicates.RUN_FIELDS, "val_loss"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({"seed": 0, "val_loss": 9.9, "rows_per_head": 0, "total_params": 100,
                          "activated_params": 50, "table_params": 0, **row} for row in rows)
    return path


def test_replicates_pair_runs_seed_by_seed_and_draw_the_allocation(tmp_path):
    runs = tmp_path / "runs"
    # seed 1's batches are slow for every run: the per-run spread is large, the per-seed difference is not
    make_run(runs, "rho-1.00-seed0", [3.0, 2.8])
    make_run(runs, "rho-1.00-seed1", [3.4, 3.2])
    make_run(runs, "rho-0.50-seed0", [2.9, 2.6])
    make_run(runs, "rho-0.50-seed1", [3.3, 3.05])
    make_run(tmp_path / "again", "rho-0.50-seed0", [2.9, 2.7])  # seed 0 twice: the pair uses the mean, 2.65
    make_run(runs, "no-memory-seed1", [3.5, 3.3])
    fields = write_sweep_csv(tmp_path / "sweep.csv", [
        {"run": "rho-1.00", "kind": "moe", "rho": 1.0, "rho_effective": 1.0, "num_experts": 4, "top_k": 2},
        {"run": "rho-0.50", "kind": "engram", "rho": 0.5, "rho_effective": 0.5, "num_experts": 2, "top_k": 2},
        {"run": "no-memory", "kind": "no-memory", "rho": 1.0, "rho_effective": 0.75, "num_experts": 3, "top_k": 2}])
    report = replicates.write_replicates([runs, tmp_path / "again"], tmp_path / "out",
                                        runs=["rho-1.00", "rho-0.50", "no-memory"], fields=[fields])

    pairs = {(p["run"], p["other"]): p for p in report["paired"]}
    engram = pairs[("rho-1.00", "rho-0.50")]
    assert engram["seeds"] == 2 and engram["seed_list"] == "0 1"
    assert engram["difference_mean"] == pytest.approx(np.mean([2.65 - 2.8, 3.05 - 3.2]))
    assert engram["difference_std"] == pytest.approx(np.std([2.65 - 2.8, 3.05 - 3.2], ddof=1))
    assert engram["same_sign"] is True
    memory = pairs[("rho-1.00", "no-memory")]
    assert memory["seeds"] == 1 and memory["difference_mean"] == pytest.approx(0.1) and memory["same_sign"] is None
    written = {(p["run"], p["other"]): p for p in read(tmp_path / "out" / "replicates_paired.csv")}
    assert written[("rho-1.00", "rho-0.50")]["same_sign"] == "True"
    summary = {row["run"]: row for row in read(tmp_path / "out" / "replicates_summary.csv")}
    assert summary["rho-0.50"]["kind"] == "engram" and summary["rho-0.50"]["num_experts"] == "2"
    assert (tmp_path / "out" / "replicates_allocation.png").stat().st_size > 10_000


def test_replicates_fields_must_describe_every_run_alike(tmp_path):
    make_run(tmp_path / "runs", "rho-1.00-seed0", [3.0])
    make_run(tmp_path / "runs", "rho-0.50-seed0", [2.9])
    moe = {"run": "rho-1.00", "kind": "moe", "rho": 1.0, "rho_effective": 1.0, "num_experts": 4, "top_k": 2}
    only_moe = write_sweep_csv(tmp_path / "a.csv", [moe])
    with pytest.raises(ValueError, match=r"no row for run\(s\) \['rho-0.50'\]"):
        replicates.write_replicates([tmp_path / "runs"], tmp_path / "out", fields=[only_moe])
    other = write_sweep_csv(tmp_path / "b.csv", [{**moe, "num_experts": 5}])
    with pytest.raises(ValueError, match="describes run 'rho-1.00' otherwise"):
        replicates.read_run_fields([only_moe, other])
    (tmp_path / "c.csv").write_text("run,seed,val_loss\nrho-1.00,0,3.0\n")
    with pytest.raises(ValueError, match=r"not a sweep.csv: no column\(s\) \['kind'"):
        replicates.read_run_fields([tmp_path / "c.csv"])


def test_gain_pairs_each_length_seed_by_seed(tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    make_run(short, "engram-seed0", [3.0, 2.0], steps=20)
    make_run(short, "moe-seed0", [4.0, 2.5], steps=20)
    make_run(short, "engram-seed1", [3.3, 2.2], steps=20)
    make_run(short, "moe-seed1", [3.5, 2.0], steps=20)
    make_run(short, "engram-seed2", [2.0, 1.0], steps=20)  # no moe of seed 2: not paired
    make_run(short, "moe-seed3", [2.0, 1.0], steps=20, finished=False)
    make_run(long, "engram-seed0", [3.0, 2.0, 1.5, 1.2], steps=80)
    make_run(long, "moe-seed0", [3.2, 2.1, 1.5, 1.0], steps=80)

    rows = gain.gain_rows([("short", short), ("long", long)], ["engram"], "moe")

    assert [(row["label"], row["step"], row["tokens"]) for row in rows] == [
        ("short", 10, 640), ("short", 20, 1280), ("long", 20, 1280), ("long", 40, 2560), ("long", 60, 3840),
        ("long", 80, 5120)]
    end = rows[1]  # short, step 20: seed 0 -0.5 (-20%), seed 1 +0.2 (+10%)
    assert (end["seeds"], end["seed_list"]) == (2, "0 1")
    assert end["difference_mean"] == pytest.approx(-0.15)
    assert end["difference_std"] == pytest.approx(np.std([-0.5, 0.2], ddof=1))
    assert end["relative_mean"] == pytest.approx((-0.2 + 0.1) / 2)
    assert (end["run"], end["below"], rows[0]["below"]) == ("engram", 1, 2)  # step 10: both seeds below
    last = rows[-1]  # long, one seed: no spread
    assert last["seeds"] == 1 and last["relative_mean"] == pytest.approx(0.2) and math.isnan(last["relative_std"])

    out = tmp_path / "out"
    out.mkdir()
    assert gain.plot_gain(rows, "moe", out / "gain.png").stat().st_size > 0


def test_gain_measures_several_runs_against_one_base(tmp_path):
    source = tmp_path / "runs"
    for seed, (small, large, larger) in enumerate([(3.0, 2.8, 2.9), (3.2, 3.0, 3.3)]):
        make_run(source, f"rows-x1-seed{seed}", [4.0, small])
        make_run(source, f"rows-x2-seed{seed}", [3.9, large])
        make_run(source, f"rows-x4-seed{seed}", [3.8, larger])

    rows = gain.gain_rows([("1x", source)], ["rows-x2", "rows-x4"], "rows-x1")

    assert [(row["run"], row["step"], row["below"]) for row in rows] == [
        ("rows-x2", 10, 2), ("rows-x2", 20, 2), ("rows-x4", 10, 2), ("rows-x4", 20, 1)]
    assert rows[3]["difference_mean"] == pytest.approx((-0.1 + 0.1) / 2)
    assert gain.plot_gain(rows, "rows-x1", tmp_path / "gain.png").stat().st_size > 0


def test_gain_refuses_sources_without_a_pair(tmp_path):
    source = tmp_path / "runs"
    make_run(source, "engram-seed0", [3.0])
    make_run(source, "moe-seed1", [3.0])
    with pytest.raises(ValueError, match=r"one: no seed with finished folders of both 'engram' \(seeds \[0\]\) and "
                                         r"'moe' \(seeds \[1\]\)"):
        gain.gain_rows([("one", source)], ["engram"], "moe")
    with pytest.raises(ValueError, match="two: no such folder of runs"):
        gain.gain_rows([("two", tmp_path / "missing")], ["engram"], "moe")


def test_gain_command_writes_the_csv_and_plot(tmp_path, monkeypatch, capsys):
    source, out = tmp_path / "runs", tmp_path / "out"
    make_run(source, "engram-seed0", [3.0, 2.0])
    make_run(source, "moe-seed0", [3.0, 2.5])
    monkeypatch.setattr("sys.argv", ["gain.py", f"1x={source}", "--run", "engram", "--base", "moe", "--out", str(out)])
    gain.main()
    assert [row["difference_mean"] for row in read(out / "gain.csv")] == ["0.0", "-0.5"]
    assert (out / "gain.png").stat().st_size > 0
    assert "1x: 1,280 tokens, 1 seed(s): engram − moe -0.5000 nats (-20.00%), below in 1" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["gain.py", str(source), "--run", "engram", "--base", "moe", "--out", str(out)])
    with pytest.raises(SystemExit):
        gain.main()
    assert "expected LABEL=FOLDER" in capsys.readouterr().err
