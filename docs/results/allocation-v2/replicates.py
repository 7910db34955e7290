"""Pool every finished run of issue 21's sweeps, seeds and same-seed repeats alike, into one report.

Training on a GPU is not bit-reproducible here (most likely the order of atomic adds in the backward pass): two
runs of one seed, trained in two calls, part in the fifth decimal of the loss by step 10 and end up to ~0.07 nats
apart. A repeat of a seed is therefore one more sample of the training noise, beside the other seeds. This script
reads run folders (``<run>-seed<S>/`` with ``metrics.jsonl`` and ``final/config.json``, as ``engram sweep`` writes
them) from several places and writes, into ``--out``:

- ``replicates.csv``: one row per run folder (``run``, ``seed``, ``source``: the place it came from, ``steps``,
  ``val_loss``, ``val_bpb``, ``train_loss``);
- ``replicates_summary.csv`` / ``replicates_differences.csv``: mean ± sd per run over all its replicates and every
  pair of runs, as ``engram sweep`` reports seeds (``seeds`` counts replicates here);
- ``replicates_repeats.csv``: each pair of runs of the same seed from two sources, and how far apart they ended;
- ``replicates_paired.csv``: every pair of runs compared seed by seed. A seed fixes the batch order, the same batches
  for every run of that seed, so part of the seed spread is shared between runs (a seed whose batches are slow to
  learn from is slow for every run); the per-seed difference cancels it. One row per pair: the seeds both runs have
  (a seed trained twice counts as the mean of its two losses), the mean, sd, min and max of the per-seed differences,
  and whether every seed agrees in sign;
- ``replicates.png``: every replicate's final loss per run, with the mean ± sd;
- ``replicates_curves.png``: validation loss during training, mean ± sd over the replicates;
- ``replicates_allocation.png`` (with ``--fields``): mean loss against ρ with ±1 sd bars, the activation-matched MoE
  and the controls as lines, as ``engram sweep`` draws ``sweep.png``; ``--fields`` names ``sweep.csv`` files of
  earlier reports, whose per-run columns (kind, ρ, experts, top-k, parameter counts) are then added to the summary.

    python docs/results/allocation-v2/replicates.py --out DIR SOURCE [SOURCE ...] [--runs NAME ...] [--fields CSV ...]

Each SOURCE is a folder of run folders; every run must have trained the same number of steps.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from engram.train.compare import final_losses
from engram.train.sweep import finished_seed_folders
from engram.train.sweep_report import (differences, finish_plot, mean_and_std, plot_allocation, plot_curves, pyplot,
                                       summarize, write_csv)

# the per-run columns of a sweep.csv that describe the run, not one seed's result
RUN_FIELDS = {"kind": str, "rho": float, "rho_effective": float, "num_experts": int, "top_k": int,
              "rows_per_head": float, "total_params": int, "activated_params": int, "table_params": int}


def finished_runs(sources: list[Path], runs: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per finished run folder under ``sources`` (in source order, then by name; only, and in the order of,
    ``runs`` when given); unfinished folders (no ``final/config.json``) are left out. Raises ``ValueError`` when
    runs trained different numbers of steps, or when a run of ``runs`` has no finished folder."""
    rows = []
    for source in sources:
        if not source.is_dir():
            raise ValueError(f"no such folder of runs: {str(source)!r}")
        for run, seed, folder in finished_seed_folders(source):
            losses = final_losses(folder)
            if losses["val_loss"] is None:
                raise ValueError(f"{str(folder)!r} is finished but logged no validation loss")
            rows.append({"run": run, "seed": seed, "source": str(source), "folder": str(folder), **losses})
    if runs is not None:
        missing = sorted(set(runs) - {row["run"] for row in rows})
        if missing:
            raise ValueError(f"no finished folder of run(s) {missing} under {[str(s) for s in sources]}")
        rows = sorted((row for row in rows if row["run"] in runs), key=lambda row: runs.index(row["run"]))
    if not rows:
        raise ValueError(f"no finished run folder (<run>-seed<S>/final/config.json) under {[str(s) for s in sources]}")
    steps = {row["steps"] for row in rows}
    if len(steps) > 1:
        odd = [row["folder"] for row in rows if row["steps"] != rows[0]["steps"]]
        raise ValueError(f"runs trained different numbers of steps ({sorted(steps)}), e.g. {odd[:3]}: pool one length")
    return rows


def same_seed_repeats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of rows of the same run and seed (from different sources) and the gap between their losses."""
    pairs = []
    for a, b in itertools.combinations(rows, 2):
        if (a["run"], a["seed"]) == (b["run"], b["seed"]):
            pairs.append({"run": a["run"], "seed": a["seed"], "source": a["source"], "other_source": b["source"],
                          "val_loss": a["val_loss"], "other_val_loss": b["val_loss"],
                          "difference": b["val_loss"] - a["val_loss"]})
    return pairs


def paired_differences(rows: list[dict[str, Any]], runs: list[str]) -> list[dict[str, Any]]:
    """Every pair of ``runs`` compared seed by seed: ``difference`` = other − run per seed both have (a seed's loss
    is the mean over its replicates of that seed), then the mean, sd (ddof 1), min and max of those differences and
    ``same_sign`` (every seed agrees, with two seeds or more; empty otherwise)."""
    by_seed: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        by_seed.setdefault(row["run"], {}).setdefault(row["seed"], []).append(row["val_loss"])
    pairs = []
    for a, b in itertools.combinations(runs, 2):
        seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
        diffs = [float(np.mean(by_seed[b][s]) - np.mean(by_seed[a][s])) for s in seeds]
        mean, std = mean_and_std(diffs) if diffs else (math.nan, math.nan)
        pairs.append({"run": a, "other": b, "seeds": len(seeds), "seed_list": " ".join(map(str, seeds)),
                      "difference_mean": mean, "difference_std": std,
                      "difference_min": min(diffs, default=math.nan), "difference_max": max(diffs, default=math.nan),
                      "same_sign": None if len(diffs) < 2 else all(d < 0 for d in diffs) or all(d > 0 for d in diffs)})
    return pairs


def read_run_fields(csv_files: list[Path]) -> dict[str, dict[str, Any]]:
    """Run name -> its per-run columns (``RUN_FIELDS``) from ``sweep.csv`` files; raises ``ValueError`` when a file
    lacks them or two files disagree about a run."""
    fields: dict[str, dict[str, Any]] = {}
    for path in csv_files:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [name for name in ("run", *RUN_FIELDS) if name not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{str(path)!r} is not a sweep.csv: no column(s) {missing}")
            for row in reader:
                mine = {name: kind(row[name]) for name, kind in RUN_FIELDS.items()}
                if fields.setdefault(row["run"], mine) != mine:
                    raise ValueError(f"{str(path)!r} describes run {row['run']!r} otherwise than an earlier file: "
                                     f"{mine} against {fields[row['run']]}")
    return fields


def plot_replicates(rows: list[dict[str, Any]], summary: list[dict[str, Any]], out_file: Path,
                    unit: str = "replicate") -> Path:
    """Every replicate's final validation loss, one column per run (seeds marked apart), and the mean ± sd;
    ``unit`` names a replicate in the labels (``seed`` where no seed was trained twice)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    names = [row["run"] for row in summary]
    markers = dict(zip(sorted({row["seed"] for row in rows}), "osD^vP*X"))
    for seed, marker in markers.items():
        mine = [row for row in rows if row["seed"] == seed]
        ax.scatter([names.index(row["run"]) + 0.12 for row in mine], [row["val_loss"] for row in mine],
                   marker=marker, s=22, alpha=0.75, label=f"seed {seed}")
    ax.errorbar(range(len(names)), [row["val_loss_mean"] for row in summary],
                yerr=[0.0 if row["seeds"] < 2 else row["val_loss_std"] for row in summary], fmt="_", ms=14,
                color="black", capsize=4, label=f"mean ± sd over {unit}s")
    ax.set_xticks(range(len(names)), [f"{name}\n({row['seeds']})" for name, row in zip(names, summary)], fontsize=8)
    ax.set_ylabel("final validation loss (nats / token)")
    ax.set_title(f"Every {unit} after {rows[0]['steps']} steps ({unit}s per run in brackets)")
    return finish_plot(fig, [ax], out_file)


def write_replicates(sources: list[Path], out: Path, runs: list[str] | None = None,
                     fields: list[Path] | None = None) -> dict[str, Any]:
    """Read the finished runs of ``sources`` (those of ``runs``, in its order, when given) and write the CSVs and
    plots named in the module docstring into ``out`` (the allocation plot when ``fields`` names sweep.csv files that
    describe every run); returns the rows, the summary, the same-seed repeats and the paired differences."""
    rows = finished_runs(sources, runs)
    summary = summarize([{k: v for k, v in row.items() if k not in ("source", "folder")} for row in rows])
    if fields:
        described = read_run_fields(fields)
        undescribed = [row["run"] for row in summary if row["run"] not in described]
        if undescribed:
            raise ValueError(f"no row for run(s) {undescribed} in {[str(f) for f in fields]}")
        summary = [{"run": row["run"], **described[row["run"]], **{k: v for k, v in row.items() if k != "run"}}
                   for row in summary]
    repeats = same_seed_repeats(rows)
    paired = paired_differences(rows, [row["run"] for row in summary])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "replicates.csv")
    write_csv(summary, out / "replicates_summary.csv")
    if len(summary) >= 2:
        write_csv(differences(summary), out / "replicates_differences.csv")
        write_csv(paired, out / "replicates_paired.csv")
    if repeats:
        write_csv(repeats, out / "replicates_repeats.csv")
    unit = "replicate" if repeats else "seed"
    plot_replicates(rows, summary, out / "replicates.png", unit)
    if fields:
        # the preset's top-k: the Engram splits and rho = 1 keep it, the matched MoE and conv-only raise it
        plot_allocation(summary, min(row["top_k"] for row in summary), out / "replicates_allocation.png")
    folders: dict[str, list[Path]] = {}
    for row in rows:
        folders.setdefault(row["run"], []).append(Path(row["folder"]))
    plot_curves(folders, out / "replicates_curves.png", unit=unit)
    return {"rows": rows, "summary": summary, "repeats": repeats, "paired": paired}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="folders of run folders (<run>-seed<S>/)")
    parser.add_argument("--out", type=Path, required=True, help="where the CSVs and plots go")
    parser.add_argument("--runs", nargs="+", help="only these runs, in this order (default: all, as found)")
    parser.add_argument("--fields", nargs="+", type=Path,
                        help="sweep.csv files describing the runs (kind, rho, experts, ...): adds the allocation plot")
    args = parser.parse_args()
    try:
        report = write_replicates(args.sources, args.out, args.runs, args.fields)
    except ValueError as error:
        parser.error(str(error))
    for row in report["summary"]:
        print(f"{row['run']:>10}  {row['seeds']} replicates  {row['val_loss_mean']:.4f} ± {row['val_loss_std']:.4f}")
    for pair in report["paired"]:
        print(f"{pair['other']:>10} - {pair['run']:<10} seed by seed ({pair['seeds']}): "
              f"{pair['difference_mean']:+.4f} ± {pair['difference_std']:.4f}"
              f"{'  (every seed agrees)' if pair['same_sign'] else ''}")
    for pair in report["repeats"]:
        print(f"{pair['run']:>10}  seed {pair['seed']} twice: {pair['val_loss']:.4f} / {pair['other_val_loss']:.4f}")


if __name__ == "__main__":
    main()
