"""`engram sweep` end to end at a toy size: iso-parameter runs, the CSV and plot, resuming, memory scaling."""

import csv

import pytest

from engram.cli import main
from engram.model import EngramLMConfig, param_report
from engram.train.sweep import CSV_FILE, PLOT_FILE, SweepConfig, fit_power_law, run_sweep, sweep_runs
from engram.train.trainer import Trainer

from test_trainer import config


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_allocation_sweep_keeps_total_parameters_and_resumes(text_dir, tmp_path, monkeypatch):
    train = config(text_dir, tmp_path, max_steps=2, eval_every=2, model=None)  # tiny: room for tables
    original_train = Trainer.train
    calls = []

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    def interrupted_second_run(self):
        calls.append(self.out.name)
        if len(calls) == 2:  # Ctrl-C during the second run's first step: it saves a checkpoint and stops
            monkeypatch.setattr(self, "train_step", ctrl_c)
        return original_train(self)

    monkeypatch.setattr(Trainer, "train", interrupted_second_run)
    result = run_sweep(SweepConfig(train=train, rhos=[1.0, 0.5], matched_baseline=False))
    assert result == {"interrupted": True, "completed": 1}
    assert (tmp_path / "rho-1.00" / "final").is_dir() and not (tmp_path / "rho-0.50" / "final").exists()

    trained = []

    def recorded(self):
        trained.append(self.cfg)
        return original_train(self)

    monkeypatch.setattr(Trainer, "train", recorded)
    result = run_sweep(SweepConfig(train=train, rhos=[1.0, 0.5], matched_baseline=False))
    assert [cfg.out for cfg in trained] == [str(tmp_path / "rho-0.50")]  # the finished run was not trained again
    assert trained[0].resume  # the interrupted one continued from its checkpoint

    rows = read_csv(tmp_path / CSV_FILE)
    assert [row["run"] for row in rows] == ["rho-1.00", "rho-0.50"]
    assert [int(row["num_experts"]) for row in rows] == [8, 5]  # tiny: 8 experts, top-2: 2 + round(0.5 * 6)
    assert int(rows[0]["table_params"]) == 0 and int(rows[1]["table_params"]) > 0
    totals = [int(row["total_params"]) for row in rows]
    assert abs(totals[1] - totals[0]) / totals[0] < 0.01  # iso-parameter
    assert all(float(row["val_loss"]) > 0 for row in rows)
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activation_matched_baseline_comes_with_rho_one():
    small = EngramLMConfig.from_preset("small")
    engram_activated = param_report(small)["activated"]
    runs = sweep_runs(SweepConfig(train=None, rhos=[1.0, 0.6]), small)
    assert [name for name, _, _ in runs] == ["rho-1.00", "rho-0.60", "moe-top3"]
    (_, pure, pure_cfg), (_, _, engram_cfg), (_, matched, matched_cfg) = runs
    assert matched_cfg.engram is None and matched_cfg.moe.num_experts == pure_cfg.moe.num_experts
    assert matched["top_k"] == 3 and matched["total_rel_diff"] == 0.0 and matched["rho_effective"] == 1.0
    gaps = {k: abs(param_report(cfg)["activated"] - engram_activated) for k, cfg in
            [(2, pure_cfg), (3, matched_cfg)]}
    assert gaps[3] < gaps[2]  # top-3 is closer to the Engram runs' activated parameters than top-2
    assert abs(param_report(engram_cfg)["activated"] - engram_activated) / engram_activated < 0.001
    assert [name for name, _, _ in sweep_runs(SweepConfig(train=None, rhos=[0.6, 0.4]), small)] == [
        "rho-0.60", "rho-0.40"]  # only the process that trains rho = 1 trains the matched baseline
    assert len(sweep_runs(SweepConfig(train=None, rhos=[1.0], matched_baseline=False), small)) == 1


def test_report_only_trains_nothing_and_names_missing_runs(text_dir, tmp_path, monkeypatch, capsys):
    args = ["sweep", "--mode", "memory", "--data", str(text_dir), "--tokenizer", "bpe-300", "--max-steps", "2",
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "2", "--no-progress",
            "--out", str(tmp_path)]
    assert main(args + ["--memory-factors", "2"]) == 0
    (tmp_path / CSV_FILE).unlink()

    def no_training(self):
        raise AssertionError("report only must not train")

    monkeypatch.setattr(Trainer, "train", no_training)
    assert main(args + ["--memory-factors", "1", "2", "--report-only"]) == 2
    assert "run(s) ['rows-x1'] not finished" in capsys.readouterr().err
    assert not (tmp_path / CSV_FILE).exists()
    assert main(args + ["--memory-factors", "2", "--report-only"]) == 0
    assert [row["run"] for row in read_csv(tmp_path / CSV_FILE)] == ["rows-x2"]


def test_memory_sweep_fits_a_power_law(text_dir, tmp_path):
    exit_code = main(["sweep", "--mode", "memory", "--memory-factors", "1", "3", "--data", str(text_dir),
                      "--tokenizer", "bpe-300", "--max-steps", "2", "--batch-size", "4", "--seq-len", "32",
                      "--eval-every", "2", "--eval-batches", "2", "--no-progress", "--out", str(tmp_path)])
    assert exit_code == 0
    rows = read_csv(tmp_path / CSV_FILE)
    assert [row["memory_factor"] for row in rows] == ["1", "3"]
    assert int(rows[1]["table_params"]) == pytest.approx(3 * int(rows[0]["table_params"]), rel=0.01)
    assert {"fit_a", "fit_b", "fit_r2"} <= set(rows[0])
    assert float(rows[0]["fit_r2"]) == pytest.approx(1.0)  # two points lie on a line


def test_power_law_fit_recovers_its_coefficients():
    rows = [1e3, 2e3, 4e3, 8e3, 16e3]
    fit = fit_power_law(rows, [5.0 * r ** -0.1 for r in rows])
    assert fit["fit_a"] == pytest.approx(5.0) and fit["fit_b"] == pytest.approx(0.1)
    assert fit["fit_r2"] == pytest.approx(1.0)


def test_bad_sweeps_are_refused(text_dir, tmp_path):
    train = config(text_dir, tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="rho must lie in .0, 1., got 1.5"):
        SweepConfig(train=train, rhos=[1.0, 1.5])
    with pytest.raises(ValueError, match="mode must be one of .* got 'depth'"):
        SweepConfig(train=train, mode="depth")
    with pytest.raises(ValueError, match="memory factors must be >= 1, got 0"):
        SweepConfig(train=train, mode="memory", memory_factors=[0, 2])
    no_engram = config(text_dir, tmp_path, max_steps=2, model=EngramLMConfig.from_preset("tiny", engram=None))
    with pytest.raises(ValueError, match="must have Engram layers"):
        run_sweep(SweepConfig(train=no_engram))
