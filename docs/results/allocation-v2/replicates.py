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
- ``replicates.png``: every replicate's final loss per run, with the mean ± sd;
- ``replicates_curves.png``: validation loss during training, mean ± sd over the replicates.

    python docs/results/allocation-v2/replicates.py --out DIR SOURCE [SOURCE ...] [--runs NAME ...]

Each SOURCE is a folder of run folders; every run must have trained the same number of steps.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path
from typing import Any

from engram.train.compare import final_losses
from engram.train.sweep_report import differences, finish_plot, plot_curves, pyplot, summarize, write_csv

RUN_FOLDER = re.compile(r"(?P<run>.+)-seed(?P<seed>\d+)")


def finished_runs(sources: list[Path], runs: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per finished run folder under ``sources`` (in source order, then by name; only, and in the order of,
    ``runs`` when given); unfinished folders (no ``final/config.json``) are left out. Raises ``ValueError`` when
    runs trained different numbers of steps, or when a run of ``runs`` has no finished folder."""
    rows = []
    for source in sources:
        if not source.is_dir():
            raise ValueError(f"no such folder of runs: {str(source)!r}")
        for folder in sorted(source.iterdir()):
            match = RUN_FOLDER.fullmatch(folder.name)
            if not match or not (folder / "final" / "config.json").is_file():
                continue
            losses = final_losses(folder)
            if losses["val_loss"] is None:
                raise ValueError(f"{str(folder)!r} is finished but logged no validation loss")
            rows.append({"run": match["run"], "seed": int(match["seed"]), "source": str(source),
                         "folder": str(folder), **losses})
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


def plot_replicates(rows: list[dict[str, Any]], summary: list[dict[str, Any]], out_file: Path) -> Path:
    """Every replicate's final validation loss, one column per run (seeds marked apart), and the mean ± sd."""
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
                color="black", capsize=4, label="mean ± sd over replicates")
    ax.set_xticks(range(len(names)), [f"{name}\n({row['seeds']})" for name, row in zip(names, summary)], fontsize=8)
    ax.set_ylabel("final validation loss (nats / token)")
    ax.set_title(f"Every replicate after {rows[0]['steps']} steps (replicates per run in brackets)")
    return finish_plot(fig, [ax], out_file)


def write_replicates(sources: list[Path], out: Path, runs: list[str] | None = None) -> dict[str, Any]:
    """Read the finished runs of ``sources`` (those of ``runs``, in its order, when given) and write the CSVs and
    plots named in the module docstring into ``out``; returns the rows, the summary and the same-seed repeats."""
    rows = finished_runs(sources, runs)
    summary = summarize([{k: v for k, v in row.items() if k not in ("source", "folder")} for row in rows])
    repeats = same_seed_repeats(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "replicates.csv")
    write_csv(summary, out / "replicates_summary.csv")
    if len(summary) >= 2:
        write_csv(differences(summary), out / "replicates_differences.csv")
    if repeats:
        write_csv(repeats, out / "replicates_repeats.csv")
    plot_replicates(rows, summary, out / "replicates.png")
    folders: dict[str, list[Path]] = {}
    for row in rows:
        folders.setdefault(row["run"], []).append(Path(row["folder"]))
    plot_curves(folders, out / "replicates_curves.png", unit="replicate")
    return {"rows": rows, "summary": summary, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="folders of run folders (<run>-seed<S>/)")
    parser.add_argument("--out", type=Path, required=True, help="where the CSVs and plots go")
    parser.add_argument("--runs", nargs="+", help="only these runs, in this order (default: all, as found)")
    args = parser.parse_args()
    try:
        report = write_replicates(args.sources, args.out, args.runs)
    except ValueError as error:
        parser.error(str(error))
    for row in report["summary"]:
        print(f"{row['run']:>10}  {row['seeds']} replicates  {row['val_loss_mean']:.4f} ± {row['val_loss_std']:.4f}")
    for pair in report["repeats"]:
        print(f"{pair['run']:>10}  seed {pair['seed']} twice: {pair['val_loss']:.4f} / {pair['other_val_loss']:.4f}")


if __name__ == "__main__":
    main()
