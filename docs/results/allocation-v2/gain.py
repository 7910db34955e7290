"""The gain of one run over another during training, seed by seed, for runs of several lengths in one picture.

Issue 21's runs were trained at several lengths (350, 1,400 and 6,000 steps), each with its own learning-rate
schedule (warmup, then cosine over the whole run), so a 6,000-step run at step 1,400 is not a 1,400-step run: the
lengths are drawn as separate lines. For every source (a labelled folder of run folders ``<run>-seed<S>/``), every
seed with a finished folder of both ``--run`` and ``--base`` (``final/config.json``), and every evaluation both
logged (``val_loss`` in ``metrics.jsonl``): ``difference`` = run − base and ``relative`` = run / base − 1. A seed fixes
the batch order, shared by both runs, so the per-seed difference cancels that part of the spread. Writes into
``--out``:

- ``gain.csv``: one row per source and evaluation: ``label``, ``seeds`` (how many, and ``seed_list``), ``step``,
  ``tokens``, ``difference_mean``, ``difference_std``, ``relative_mean``, ``relative_std`` (sd: ddof 1, NaN with one
  seed);
- ``gain.png``: the relative difference against training tokens (log axis), one line per source with a ±1 sd band.

    python docs/results/allocation-v2/gain.py --run rho-0.80 --base moe-top3 --out DIR LABEL=FOLDER [LABEL=FOLDER ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engram.train.compare import read_metrics
from engram.train.sweep import finished_seed_folders
from engram.train.sweep_report import finish_plot, mean_and_std, pyplot, write_csv


def validation_curve(folder: Path) -> dict[int, tuple[int, float]]:
    """Step -> (tokens, validation loss) of every evaluation a run logged."""
    return {row["step"]: (row["tokens"], row["val_loss"]) for row in read_metrics(folder) if "val_loss" in row}


def gain_rows(sources: list[tuple[str, Path]], run: str, base: str) -> list[dict[str, Any]]:
    """The rows of ``gain.csv`` for labelled ``sources``; raises ``ValueError`` when a source is not a folder or
    has no seed with both runs finished."""
    rows = []
    for label, source in sources:
        if not source.is_dir():
            raise ValueError(f"{label}: no such folder of runs: {str(source)!r}")
        found = finished_seed_folders(source)
        runs, bases = ({seed: folder for name, seed, folder in found if name == wanted} for wanted in (run, base))
        seeds = sorted(set(runs) & set(bases))
        if not seeds:
            raise ValueError(f"{label}: no seed with finished folders of both {run!r} (seeds {sorted(runs)}) and "
                             f"{base!r} (seeds {sorted(bases)}) under {str(source)!r}")
        curves = {seed: (validation_curve(runs[seed]), validation_curve(bases[seed])) for seed in seeds}
        steps = sorted(set.intersection(*(set(mine) & set(theirs) for mine, theirs in curves.values())))
        for step in steps:
            pairs = [(curves[s][0][step][1], curves[s][1][step][1]) for s in seeds]
            difference = mean_and_std(mine - theirs for mine, theirs in pairs)
            relative = mean_and_std(mine / theirs - 1 for mine, theirs in pairs)
            rows.append({"label": label, "seeds": len(seeds), "seed_list": " ".join(map(str, seeds)), "step": step,
                         "tokens": curves[seeds[0]][0][step][0], "difference_mean": difference[0],
                         "difference_std": difference[1], "relative_mean": relative[0], "relative_std": relative[1]})
    return rows


def plot_gain(rows: list[dict[str, Any]], run: str, base: str, out_file: Path) -> Path:
    """``relative_mean`` (in %) against tokens, one line per label, with a ±1 sd band where there are two seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for label in dict.fromkeys(row["label"] for row in rows):
        mine = [row for row in rows if row["label"] == label]
        tokens = [row["tokens"] for row in mine]
        mean = [100 * row["relative_mean"] for row in mine]
        seeds = mine[0]["seeds"]
        (drawn,) = ax.plot(tokens, mean, "o-", lw=1.5, ms=3,
                           label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''}: {mine[0]['seed_list']})")
        if seeds > 1:
            std = [100 * row["relative_std"] for row in mine]
            ax.fill_between(tokens, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=drawn.get_color(), alpha=0.15, lw=0)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"{run} / {base} − 1 (validation loss, %)")
    ax.set_title(f"{run} against {base} during training, seed by seed (mean ± sd over seeds)")
    return finish_plot(fig, [ax], out_file)


def labelled_source(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=FOLDER, got {text!r}")
    return label, Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=labelled_source,
                        help="LABEL=FOLDER: a folder of run folders (<run>-seed<S>/) and its label in the plot")
    parser.add_argument("--run", required=True, help="the run whose gain is measured, e.g. rho-0.80")
    parser.add_argument("--base", required=True, help="the run it is measured against, e.g. moe-top3")
    parser.add_argument("--out", type=Path, required=True, help="where gain.csv and gain.png go")
    args = parser.parse_args()
    try:
        rows = gain_rows(args.sources, args.run, args.base)
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "gain.csv")
    plot_gain(rows, args.run, args.base, args.out / "gain.png")
    for label in dict.fromkeys(row["label"] for row in rows):
        last = [row for row in rows if row["label"] == label][-1]
        print(f"{label}: {last['tokens']:,} tokens, {last['seeds']} seed(s): {args.run} − {args.base} "
              f"{last['difference_mean']:+.4f} nats ({100 * last['relative_mean']:+.2f}%)")


if __name__ == "__main__":
    main()
