"""The gain of runs over a base run during training, seed by seed, for runs of several lengths in one picture.

Issue 21's runs were trained at several lengths (350, 1,400 and 6,000 steps), each with its own learning-rate
schedule (warmup, then cosine over the whole run), so a 6,000-step run at step 1,400 is not a 1,400-step run: the
lengths are drawn as separate lines. For every run of ``--run`` (one or several, e.g. the table sizes of a memory
sweep against the smallest), every source (a labelled folder of run folders ``<run>-seed<S>/``), every seed with a
finished folder of both that run and ``--base`` (``final/config.json``), and every evaluation both logged
(``val_loss`` in ``metrics.jsonl``): ``difference`` = run − base and ``relative`` = run / base − 1. A seed fixes
the batch order, shared by both runs, so the per-seed difference cancels that part of the spread. Writes into
``--out``:

- ``gain.csv``: one row per run, source and evaluation: ``run``, ``label``, ``seeds`` (how many, and ``seed_list``),
  ``step``, ``tokens``, ``below`` (in how many of those seeds the run's loss is below the base's),
  ``difference_mean``, ``difference_std``, ``relative_mean``, ``relative_std`` (sd: ddof 1, NaN with one seed);
- ``gain.png``: the relative difference against training tokens (log axis), one line per run and source with a ±1 sd
  band.

    python docs/results/allocation-v2/gain.py --run RUN [RUN ...] --base BASE --out DIR LABEL=FOLDER [LABEL=FOLDER ...]
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


def gain_rows(sources: list[tuple[str, Path]], runs: list[str], base: str) -> list[dict[str, Any]]:
    """The rows of ``gain.csv`` for each of ``runs`` against ``base`` in labelled ``sources``; raises ``ValueError``
    when a source is not a folder or has no seed with both a run and the base finished."""
    rows = []
    for run in runs:
        for label, source in sources:
            rows += source_gain_rows(label, source, run, base)
    return rows


def source_gain_rows(label: str, source: Path, run: str, base: str) -> list[dict[str, Any]]:
    """``gain.csv``'s rows of one run against the base in one labelled source."""
    if not source.is_dir():
        raise ValueError(f"{label}: no such folder of runs: {str(source)!r}")
    found = finished_seed_folders(source)
    mine, bases = ({seed: folder for name, seed, folder in found if name == wanted} for wanted in (run, base))
    seeds = sorted(set(mine) & set(bases))
    if not seeds:
        raise ValueError(f"{label}: no seed with finished folders of both {run!r} (seeds {sorted(mine)}) and "
                         f"{base!r} (seeds {sorted(bases)}) under {str(source)!r}")
    curves = {seed: (validation_curve(mine[seed]), validation_curve(bases[seed])) for seed in seeds}
    steps = sorted(set.intersection(*(set(ours) & set(theirs) for ours, theirs in curves.values())))
    rows = []
    for step in steps:
        pairs = [(curves[s][0][step][1], curves[s][1][step][1]) for s in seeds]
        difference = mean_and_std(ours - theirs for ours, theirs in pairs)
        relative = mean_and_std(ours / theirs - 1 for ours, theirs in pairs)
        rows.append({"run": run, "label": label, "seeds": len(seeds), "seed_list": " ".join(map(str, seeds)),
                     "step": step, "tokens": curves[seeds[0]][0][step][0],
                     "below": sum(ours < theirs for ours, theirs in pairs), "difference_mean": difference[0],
                     "difference_std": difference[1], "relative_mean": relative[0], "relative_std": relative[1]})
    return rows


def lines(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``gain.csv``'s rows grouped by (run, label), one group per line of the plot, in order of appearance."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["run"], row["label"]), []).append(row)
    return grouped


def plot_gain(rows: list[dict[str, Any]], base: str, out_file: Path) -> Path:
    """``relative_mean`` (in %) against tokens, one line per run and label, with a ±1 sd band where there are two
    seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    runs = list(dict.fromkeys(row["run"] for row in rows))
    for (run, label), mine in lines(rows).items():
        tokens = [row["tokens"] for row in mine]
        mean = [100 * row["relative_mean"] for row in mine]
        seeds = mine[0]["seeds"]
        name = f"{run}, {label}" if len(runs) > 1 else label
        (drawn,) = ax.plot(tokens, mean, "o-", lw=1.5, ms=3,
                           label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''}: {mine[0]['seed_list']})")
        if seeds > 1:
            std = [100 * row["relative_std"] for row in mine]
            ax.fill_between(tokens, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=drawn.get_color(), alpha=0.15, lw=0)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    only = runs[0] if len(runs) == 1 else None
    ax.set_ylabel(f"{only or 'run'} / {base} − 1 (validation loss, %)")
    ax.set_title(f"{only or 'each run'} against {base} during training, seed by seed (mean ± sd over seeds)")
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
    parser.add_argument("--run", nargs="+", required=True,
                        help="the run(s) whose gain is measured, e.g. rho-0.80, or rows-x2 rows-x4")
    parser.add_argument("--base", required=True, help="the run it is measured against, e.g. moe-top3")
    parser.add_argument("--out", type=Path, required=True, help="where gain.csv and gain.png go")
    args = parser.parse_args()
    try:
        rows = gain_rows(args.sources, args.run, args.base)
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "gain.csv")
    plot_gain(rows, args.base, args.out / "gain.png")
    for (run, label), mine in lines(rows).items():
        last = mine[-1]
        print(f"{label}: {last['tokens']:,} tokens, {last['seeds']} seed(s): {run} − {args.base} "
              f"{last['difference_mean']:+.4f} nats ({100 * last['relative_mean']:+.2f}%), below in {last['below']}")


if __name__ == "__main__":
    main()
