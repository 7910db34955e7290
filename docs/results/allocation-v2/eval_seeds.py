"""Pool the `engram eval` reports of several calls per run, over seeds: loss by position and retrieval of a key.

Each call of ``gpu_run.sh`` evaluates only the checkpoints with weights on its machine, so one length's evaluations
lie in several ``eval.json`` files, one or a few checkpoints each. This script reads them, names every checkpoint
``<run>-seed<S>`` (as ``engram sweep`` names its run folders) and keeps one result per run and seed. The same
checkpoint evaluated in two calls gives identical numbers (the same windows and keys), so a (run, seed) found twice
must match; two different results of one (run, seed) (a seed trained twice) are refused, naming both files: pass
one of them. Every file must have been evaluated with the same settings (length, windows, keys). Writes into
``--out``:

- ``eval_seeds.csv``: one row per run and measurement: ``measure`` (``val_loss`` over the windows, ``loss`` in one
  bucket of positions, ``retrieval`` accuracy at one length), ``at`` (``all``, the bucket's positions ``4-7``, or the
  length), ``seeds``, ``seed_list``, ``mean``, ``std`` (ddof 1, NaN with one seed) and, with ``--base``,
  ``minus_base_mean`` / ``minus_base_std`` / ``base_seeds``: run − base of the same seed, over the seeds both have;
- ``eval_seeds.png``: the loss by position (minus the base's of the same seed, with ``--base``) and the retrieval
  accuracy against length, mean ± sd over the seeds, one line per run.

    python docs/results/allocation-v2/eval_seeds.py EVAL_JSON [EVAL_JSON ...] --out DIR [--base RUN] [--runs RUN ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from engram.inspection.long_context import bucket_middle, label_eval_axes
from engram.train.sweep import SEED_FOLDER
from engram.train.sweep_report import finish_plot, mean_and_std, pyplot, write_csv

# the settings of `engram eval` that decide what a number measures (not where the files were)
COMPARED = ("seq_len", "batch_size", "batches", "lengths", "samples", "key_tokens", "seed", "marker_tokens")


def measurements(result: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(measure, at) -> value of one checkpoint's result in ``eval.json``."""
    values = {("val_loss", "all"): result["val_loss"]}
    for bucket in result["loss_by_position"]:
        last = bucket["end"] - 1
        values["loss", str(last) if last == bucket["start"] else f"{bucket['start']}-{last}"] = bucket["loss"]
    for row in result["retrieval"]:
        values["retrieval", str(row["length"])] = row["accuracy"]
    return values


def read_evals(files: list[Path]) -> dict[str, dict[int, dict[tuple[str, str], float]]]:
    """run -> seed -> measurements, from ``eval.json`` files; raises ``ValueError`` on a file evaluated with other
    settings than the first, a checkpoint not named ``<run>-seed<S>``, or one (run, seed) with two results."""
    runs: dict[str, dict[int, dict[tuple[str, str], float]]] = {}
    found_in: dict[tuple[str, int], Path] = {}
    reference: tuple[dict[str, Any], Path] | None = None
    for path in files:
        if not path.is_file():
            raise ValueError(f"no such eval.json: {str(path)!r}")
        report = json.loads(path.read_text())
        settings = {key: report["settings"].get(key) for key in COMPARED}
        if reference is None:
            reference = (settings, path)
        elif settings != reference[0]:
            unlike = {key: (value, reference[0][key]) for key, value in settings.items() if value != reference[0][key]}
            raise ValueError(f"{path} was evaluated with other settings than {reference[1]}: "
                             + ", ".join(f"{key} {mine} against {theirs}" for key, (mine, theirs) in unlike.items()))
        for label, result in report["checkpoints"].items():
            match = SEED_FOLDER.fullmatch(label)
            if match is None:
                raise ValueError(f"{path}: checkpoint {label!r} is not named <run>-seed<S>")
            run, seed = match["run"], int(match["seed"])
            values = measurements(result)
            earlier = runs.setdefault(run, {}).get(seed)
            if earlier is not None and earlier != values:
                raise ValueError(f"{label} has two different results, in {found_in[run, seed]} and {path} "
                                 "(a seed trained twice?): pass one of the two files")
            runs[run][seed] = values
            found_in[run, seed] = path
    return runs


def pooled_rows(runs: dict[str, dict[int, dict[tuple[str, str], float]]], base: str | None = None
                ) -> list[dict[str, Any]]:
    """The rows of ``eval_seeds.csv`` (see the module's docstring); raises ``ValueError`` for an unknown ``base``."""
    if base is not None and base not in runs:
        raise ValueError(f"--base {base!r} is not among the evaluated runs {sorted(runs)}")
    rows = []
    for run, seeds in runs.items():
        order = sorted(seeds)
        shared = [s for s in order if s in runs[base]] if base is not None else []
        for key in seeds[order[0]]:
            mean, std = mean_and_std(seeds[s][key] for s in order)
            row = {"run": run, "measure": key[0], "at": key[1], "seeds": len(order),
                   "seed_list": " ".join(map(str, order)), "mean": mean, "std": std}
            if base is not None:
                difference = mean_and_std(seeds[s][key] - runs[base][s][key] for s in shared) if shared \
                    else (math.nan, math.nan)
                row |= {"minus_base_mean": difference[0], "minus_base_std": difference[1],
                        "base_seeds": " ".join(map(str, shared))}
            rows.append(row)
    return rows


def seeds_label(seeds: int) -> str:
    return f"{seeds} seed{'s' if seeds != 1 else ''}"


def at_middle(at: str) -> float:
    """:func:`bucket_middle` of a bucket of positions named ``"4-7"`` (or the position ``"1"``)."""
    first, _, last = at.partition("-")
    return bucket_middle(int(first), int(last or first))


def plot_pooled(rows: list[dict[str, Any]], base: str | None, out_file: Path) -> Path:
    """Loss by position (minus ``base``'s when given) and retrieval against length, mean ± sd over the seeds."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(dict.fromkeys(row["run"] for row in rows)):
        mine = [row for row in rows if row["run"] == run]
        seeds = mine[0]["seeds"]
        label, colour = f"{run} ({seeds_label(seeds)})", colours[index % len(colours)]
        loss = [row for row in mine if row["measure"] == "loss"]
        if run == base:
            left.axhline(0, color=colour, lw=1.5, label=label)
        else:
            prefix = "minus_base_" if base is not None else ""
            x = [at_middle(row["at"]) for row in loss]
            y = [row[prefix + "mean"] for row in loss]
            sd = [row[prefix + "std"] for row in loss]
            left.plot(x, y, "o-", ms=3, color=colour, label=label)
            left.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], color=colour,
                              alpha=0.15)
        retrieval = [row for row in mine if row["measure"] == "retrieval"]
        right.errorbar([int(row["at"]) for row in retrieval], [row["mean"] for row in retrieval],
                       yerr=[0 if math.isnan(row["std"]) else row["std"] for row in retrieval], fmt="o-", ms=4,
                       capsize=3, color=colour, label=label)
    label_eval_axes(left, right, f"loss minus {base}'s, same seed (nats)" if base else None,
                    note=", mean ± sd over seeds")
    return finish_plot(fig, [left, right], out_file)


def write_pooled(files: list[Path], out: Path, base: str | None = None, only: list[str] | None = None
                 ) -> list[dict[str, Any]]:
    """Read ``files``, keep the runs of ``only`` (in that order; default all, as found), write the CSV and plot."""
    runs = read_evals(files)
    if only:
        missing = [run for run in only if run not in runs]
        if missing:
            raise ValueError(f"--runs {missing} not among the evaluated runs {sorted(runs)}")
        runs = {run: runs[run] for run in only}
    rows = pooled_rows(runs, base)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "eval_seeds.csv")
    plot_pooled(rows, base, out / "eval_seeds.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="eval.json files written by `engram eval`")
    parser.add_argument("--out", type=Path, required=True, help="where eval_seeds.csv and eval_seeds.png go")
    parser.add_argument("--base", help="a run to subtract, seed by seed, in the loss-by-position panel and the CSV")
    parser.add_argument("--runs", nargs="+", help="only these runs, in this order (default: all, as found)")
    args = parser.parse_args()
    try:
        rows = write_pooled(args.files, args.out, args.base, args.runs)
    except ValueError as error:
        parser.error(str(error))
    for row in rows:
        if row["measure"] != "loss":
            versus = f"   minus {args.base}: {row['minus_base_mean']:+.3f} ± {row['minus_base_std']:.3f}" \
                if args.base else ""
            print(f"{row['run']:>10}  {row['measure']:>9} {row['at']:>5}  ({seeds_label(row['seeds'])})  "
                  f"{row['mean']:.3f} ± {row['std']:.3f}{versus}")


if __name__ == "__main__":
    main()
