"""`engram sweep` end to end at a toy size: iso-parameter runs, the CSV and plot, resuming, memory scaling, the
controls, seeds (mean ± sd, differences against the seed spread) and the bootstrap of the memory fit."""

import csv
import json
import math

import numpy as np
import pytest

from engram.cli import main
from engram.model import EngramLMConfig, param_report
from engram.train.sweep import SweepConfig, finished_seed_folders, run_sweep, selected_runs, sweep_runs
from engram.train.sweep_report import (CSV_FILE, CURVES_FILE, DIFFERENCES_FILE, PLOT_FILE, SUMMARY_FILE,
                                       bootstrap_power_law, differences, fit_power_law, summarize)
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


def test_controls_hold_the_total_and_activated_parameters_of_the_sweep():
    small = EngramLMConfig.from_preset("small")
    runs = sweep_runs(SweepConfig(train=None, rhos=[1.0, 0.9], controls=["no-memory", "conv-only"]), small)
    assert [name for name, _, _ in runs] == ["rho-1.00", "rho-0.90", "moe-top3", "no-memory", "conv-only"]
    fields = {name: f for name, f, _ in runs}
    configs = {name: cfg for name, _, cfg in runs}
    assert [fields[name]["kind"] for name in fields] == ["moe", "engram", "moe", "no-memory", "conv-only"]
    assert configs["no-memory"].engram.variant == "no-memory" and configs["conv-only"].engram.variant == "conv-only"
    engram_activated = param_report(configs["rho-0.90"])["activated"]
    for name in ("no-memory", "conv-only"):
        assert abs(fields[name]["total_rel_diff"]) < 0.005, name  # the pure MoE's total
        assert abs(param_report(configs[name])["activated"] - engram_activated) / engram_activated < 0.01, name
        assert fields[name]["rows_per_head"] == 1
    # no-memory keeps rho = 0.9's experts and top-k: the two differ only by the lookup (~180 rows per head vs one)
    assert configs["no-memory"].moe == configs["rho-0.90"].moe and 150 < fields["rho-0.90"]["rows_per_head"] < 250
    assert configs["conv-only"].moe.top_k == configs["moe-top3"].moe.top_k == 3  # no projections: top-k raised
    assert configs["conv-only"].moe.num_experts == 16


def test_seeds_split_over_processes_then_report_mean_and_spread(text_dir, tmp_path, monkeypatch):
    args = ["sweep", "--rhos", "0.5", "--controls", "no-memory", "--seeds", "0", "1", "--data", str(text_dir),
            "--tokenizer", "bpe-300", "--max-steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "1",
            "--eval-batches", "1", "--no-progress", "--no-tensorboard", "--out", str(tmp_path)]
    assert main(args + ["--only", "rho-*"]) == 0  # two processes share --out, each with its runs
    assert main(args + ["--only", "no-memory"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "final").is_dir()) == [
        "no-memory-seed0", "no-memory-seed1", "rho-0.50-seed0", "rho-0.50-seed1"]

    def no_training(self):
        raise AssertionError("report only must not train")

    monkeypatch.setattr(Trainer, "train", no_training)
    assert main(args + ["--report-only"]) == 0
    rows = read_csv(tmp_path / CSV_FILE)
    assert [(row["run"], row["seed"], row["kind"]) for row in rows] == [
        ("rho-0.50", "0", "engram"), ("no-memory", "0", "no-memory"), ("rho-0.50", "1", "engram"),
        ("no-memory", "1", "no-memory")]
    loss = {(row["run"], row["seed"]): float(row["val_loss"]) for row in rows}
    assert loss["rho-0.50", "0"] != loss["rho-0.50", "1"]  # the seed reaches the weights and the batches

    summary = read_csv(tmp_path / SUMMARY_FILE)
    assert [row["run"] for row in summary] == ["rho-0.50", "no-memory"]
    for row in summary:
        pair = [loss[row["run"], seed] for seed in "01"]
        assert row["seeds"] == "2" and "seed" not in row
        assert float(row["val_loss_mean"]) == pytest.approx(sum(pair) / 2)
        assert float(row["val_loss_std"]) == pytest.approx(abs(pair[0] - pair[1]) / 2 ** 0.5)
    (pair,) = read_csv(tmp_path / DIFFERENCES_FILE)
    assert (pair["run"], pair["other"]) == ("rho-0.50", "no-memory")
    assert float(pair["difference"]) == pytest.approx(
        float(summary[1]["val_loss_mean"]) - float(summary[0]["val_loss_mean"]))
    spread = float(pair["run_std"]) + float(pair["other_std"])
    assert pair["exceeds_seed_spread"] == str(abs(float(pair["difference"])) > spread)
    for name in (PLOT_FILE, CURVES_FILE):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean_spread_and_differences_of_seeds():
    rows = [{"run": run, "seed": seed, "kind": "engram", "val_loss": loss, "val_bpb": loss / 2}
            for run, losses in (("a", [3.0, 3.2]), ("b", [2.0, 2.2]), ("c", [3.1, 3.3]), ("d", [2.5]))
            for seed, loss in enumerate(losses)]
    summary = summarize(rows)
    assert [(s["run"], s["seeds"]) for s in summary] == [("a", 2), ("b", 2), ("c", 2), ("d", 1)]
    assert summary[0]["val_loss_mean"] == pytest.approx(3.1)
    assert summary[0]["val_loss_std"] == pytest.approx(0.1414, 1e-3)
    assert math.isnan(summary[3]["val_loss_std"]) and summary[3]["val_bpb_mean"] == 1.25
    verdicts = {(p["run"], p["other"]): p["exceeds_seed_spread"] for p in differences(summary)}
    assert verdicts["a", "b"] is True  # 1.1 apart, spread 0.28
    assert verdicts["a", "c"] is False  # 0.1 apart
    assert verdicts["a", "d"] is None  # one seed: undecided


def test_memory_fit_intervals_come_from_a_bootstrap_over_seeds():
    params = [1e4, 2e4, 4e4, 8e4, 16e4]
    exact = bootstrap_power_law(params, [[5.0 * p ** -0.1] * 3 for p in params])
    assert exact["fit_b"] == pytest.approx(0.1) and exact["fit_b_low"] == pytest.approx(0.1)
    assert exact["fit_b_high"] == pytest.approx(0.1)  # no spread between seeds: a point
    noise = np.random.default_rng(1).standard_normal((len(params), 3))
    widths = []
    for scale in (0.01, 0.03):
        noisy = bootstrap_power_law(params, [list(5.0 * p ** -0.1 * (1 + scale * n)) for p, n in zip(params, noise)])
        assert noisy["fit_b_low"] < noisy["fit_b"] < noisy["fit_b_high"]
        assert noisy["fit_a_low"] < noisy["fit_a"] < noisy["fit_a_high"]
        widths.append(noisy["fit_b_high"] - noisy["fit_b_low"])
    assert widths[1] > 2 * widths[0]  # three times the spread between seeds: about three times the interval
    one_seed = bootstrap_power_law(params, [[5.0 * p ** -0.1] for p in params])
    assert math.isnan(one_seed["fit_b_low"]) and one_seed["fit_r2"] == pytest.approx(1.0)


def test_bad_controls_seeds_and_run_filters_are_refused(text_dir, tmp_path):
    train = config(text_dir, tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="controls .'no-memory'. belong to an allocation sweep, not to mode 'memory'"):
        SweepConfig(train=train, mode="memory", controls=["no-memory"])
    with pytest.raises(ValueError, match="controls must be among .* got 'no-conv'"):
        SweepConfig(train=train, controls=["no-conv"])
    with pytest.raises(ValueError, match=r"seeds must not repeat, got \[1, 1\]"):
        SweepConfig(train=train, seeds=[1, 1])
    small = EngramLMConfig.from_preset("small")
    sweep = SweepConfig(train=train, rhos=[1.0], only=["moe-top*", "rho-0.5*"])
    with pytest.raises(ValueError, match=r"--only 'rho-0.5\*' matches none of this sweep's runs \['rho-1.00', "
                                         r"'moe-top3'\]"):
        selected_runs(sweep, sweep_runs(sweep, small))
    sweep = SweepConfig(train=train, rhos=[1.0], only=["moe-top*"])
    assert [name for name, _, _ in selected_runs(sweep, sweep_runs(sweep, small))] == ["moe-top3"]


def test_a_finished_run_trained_otherwise_is_refused_not_reused(text_dir, tmp_path, monkeypatch):
    """A sweep reuses a finished run folder only when its run.json records this sweep's corpus, settings and model:
    another corpus in the same --out (a warm machine's /tmp, say) must not pass off one run's results as another's."""
    train = config(text_dir, tmp_path, max_steps=2, eval_every=2, model=None)
    run_sweep(SweepConfig(train=train, rhos=[1.0], matched_baseline=False))

    def no_training(self):
        raise AssertionError(f"{self.out} was trained again")

    monkeypatch.setattr(Trainer, "train", no_training)
    assert run_sweep(SweepConfig(train=train, rhos=[1.0], matched_baseline=False))["results"][0]["run"] == "rho-1.00"
    with pytest.raises(ValueError, match=r"rho-1.00 holds a finished run trained otherwise.*max_steps: run 2, now 3"):
        run_sweep(SweepConfig(train=config(text_dir, tmp_path, max_steps=3, eval_every=2, model=None), rhos=[1.0],
                              matched_baseline=False))
    other_corpus = config(text_dir, tmp_path, max_steps=2, eval_every=2, model=None, tokenizer="bpe-280")
    with pytest.raises(ValueError, match=r"corpus.tokenizer_sha256: run '[0-9a-f]{64}', now '[0-9a-f]{64}'"):
        run_sweep(SweepConfig(train=other_corpus, rhos=[1.0], matched_baseline=False))
    record = tmp_path / "rho-1.00" / "run.json"
    saved = json.loads(record.read_text())
    # the same corpus prepared elsewhere, with the same tokenizer file at another path: still this sweep's run
    record.write_text(json.dumps({**saved, "corpus": {**saved["corpus"], "path": "/elsewhere/corpus",
                                                      "tokenizer": "/elsewhere/tokenizer.json"}}))
    assert run_sweep(SweepConfig(train=train, rhos=[1.0], matched_baseline=False))["results"][0]["run"] == "rho-1.00"
    record.write_text(json.dumps({**saved, "model": {**saved["model"], "d_model": 2 * saved["model"]["d_model"]}}))
    with pytest.raises(ValueError, match=r"model.d_model: run \d+, now \d+"):
        run_sweep(SweepConfig(train=train, rhos=[1.0], matched_baseline=False))


def test_finished_seed_folders_are_the_seeded_runs_that_wrote_final(tmp_path):
    for name in ("rho-0.80-seed2", "rho-0.80-seed10", "moe-top3-seed0", "no-memory-seed1", "rho-1.00", "notes-seedx"):
        (tmp_path / name).mkdir()
    for name in ("rho-0.80-seed2", "rho-0.80-seed10", "moe-top3-seed0", "rho-1.00", "notes-seedx"):
        (tmp_path / name / "final").mkdir()
        (tmp_path / name / "final" / "config.json").write_text("{}")
    (tmp_path / "no-memory-seed1" / "checkpoints").mkdir()  # cut before its end: not finished
    assert finished_seed_folders(tmp_path) == [("moe-top3", 0, tmp_path / "moe-top3-seed0"),
                                               ("rho-0.80", 10, tmp_path / "rho-0.80-seed10"),
                                               ("rho-0.80", 2, tmp_path / "rho-0.80-seed2")]
