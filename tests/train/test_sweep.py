"""`engram sweep` end to end at a toy size: iso-parameter runs, the CSV and plot, resuming, memory scaling."""

import csv

import pytest

from engram.cli import main
from engram.train.sweep import CSV_FILE, PLOT_FILE, SweepConfig, fit_power_law, run_sweep
from engram.train.trainer import Trainer

from test_trainer import config


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_allocation_sweep_keeps_total_parameters_and_resumes(text_dir, tmp_path, monkeypatch):
    train = config(text_dir, tmp_path, max_steps=2, eval_every=2, model_overrides={})  # tiny: room for tables
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
    result = run_sweep(SweepConfig(train=train, rhos=[1.0, 0.5]))
    assert result == {"interrupted": True, "completed": 1}
    assert (tmp_path / "rho-1.00" / "final").is_dir() and not (tmp_path / "rho-0.50" / "final").exists()

    trained = []

    def recorded(self):
        trained.append(self.cfg)
        return original_train(self)

    monkeypatch.setattr(Trainer, "train", recorded)
    result = run_sweep(SweepConfig(train=train, rhos=[1.0, 0.5]))
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
    no_engram = config(text_dir, tmp_path, max_steps=2, model_overrides={"engram": None})
    with pytest.raises(ValueError, match="must have Engram layers"):
        run_sweep(SweepConfig(train=no_engram))
