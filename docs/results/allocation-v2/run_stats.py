"""Speed and routing of finished runs, from their ``metrics.jsonl`` (and a call's ``logs/gpu.csv``): the figures that
the README's Compute section quotes for the 10x calls.

Per run folder: the median tokens/s of the 10-step windows, over the whole run and over its first and last fifth;
the worst MoE layer's max/mean load (``moe_load_max``) at a few steps. Per ``gpu.csv`` (``nvidia-smi`` samples every
15 s): the median GPU utilisation of the first and last fifth of its busy samples, and the range of all.

    python docs/results/allocation-v2/run_stats.py RUN_FOLDER [...] [--gpu CALL/logs/gpu.csv ...]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

from engram.train.compare import read_metrics

LOAD_STEPS = (10, 50, 100, 500, 1000, 2000, 3000, 4000, 5000, 6000)


def fifths(values: list[float]) -> tuple[float, float]:
    """Medians of the first and last fifth of ``values`` (at least one value each)."""
    part = max(1, len(values) // 5)
    return statistics.median(values[:part]), statistics.median(values[-part:])


def run_stats(folder: Path) -> dict[str, Any]:
    """Tokens/s (median; first and last fifth) and ``moe_load_max`` at :data:`LOAD_STEPS` of one run folder."""
    rows = [row for row in read_metrics(folder) if "tokens_per_s" in row]
    if not rows:
        raise ValueError(f"{str(folder)!r} logged no tokens_per_s")
    rates = [row["tokens_per_s"] for row in rows]
    first, last = fifths(rates)
    loads = {row["step"]: row["moe_load_max"] for row in rows if "moe_load_max" in row}
    return {"run": folder.name, "median": statistics.median(rates), "first_fifth": first, "last_fifth": last,
            "load_max": {step: loads[step] for step in LOAD_STEPS if step in loads}}


def gpu_stats(gpu_csv: Path) -> dict[str, Any]:
    """Median utilisation (%) of the first and last fifth of the busy samples (above 0%: the idle ones are the
    processes' start, waits while compiling, and the report after training), and the range of all samples."""
    with open(gpu_csv, newline="") as f:
        samples = [int(row[1].split()[0]) for row in csv.reader(f)
                   if len(row) > 1 and row[1].strip().split()[0].isdigit()]
    utilisation = [value for value in samples if value > 0]
    if not utilisation:
        raise ValueError(f"{str(gpu_csv)!r} holds no busy utilisation samples")
    first, last = fifths(utilisation)
    return {"file": str(gpu_csv), "samples": len(samples), "busy": len(utilisation), "first_fifth": first,
            "last_fifth": last, "min": min(samples), "max": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (their metrics.jsonl)")
    parser.add_argument("--gpu", nargs="*", type=Path, default=[], help="a call's logs/gpu.csv")
    args = parser.parse_args()
    try:
        runs, gpus = [run_stats(folder) for folder in args.runs], [gpu_stats(path) for path in args.gpu]
    except ValueError as error:
        parser.error(str(error))
    for run in runs:
        loads = " ".join(f"{step}:{value:.2f}" for step, value in run["load_max"].items())
        print(f"{run['run']:>16}  tokens/s median {run['median']:,.0f}, first fifth {run['first_fifth']:,.0f}, "
              f"last fifth {run['last_fifth']:,.0f}" + (f"; moe_load_max {loads}" if loads else ""))
    for gpu in gpus:
        print(f"{gpu['file']}: {gpu['samples']} samples ({gpu['busy']} busy), utilisation first fifth "
              f"{gpu['first_fifth']:g}%, last fifth {gpu['last_fifth']:g}%, range {gpu['min']}-{gpu['max']}%")


if __name__ == "__main__":
    main()
