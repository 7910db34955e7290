"""Speed and routing of finished runs, from their ``metrics.jsonl`` (and a call's ``logs/gpu.csv``): the figures that
the README's Compute section quotes for the 10x calls.

Per run folder: the median tokens/s of the 10-step windows, over the whole run and over its first and last fifth;
the worst MoE layer's max/mean load (``moe_load_max``) at a few steps; where the run logged each layer's load and most
loaded expert (``moe_load_by_layer``, ``moe_hot_expert_by_layer``), per layer: the median load over the second half of
the run, how many logged windows were "hot" (load >= ``--hot``, well above a balanced router's ~1.3), and among those
how many distinct experts were the hot one, how often it changed and its longest stay (one expert hot for a whole run
is a stuck router; many experts taking turns is a rotating one). Per ``gpu.csv`` (``nvidia-smi`` samples every
15 s): the median GPU utilisation of the first and last fifth of its busy samples, and the range of all.

    python docs/results/allocation-v2/run_stats.py RUN_FOLDER [...] [--gpu CALL/logs/gpu.csv ...] [--hot 3.0]
        [--plot routing.png]   # per run with per-layer routing: each layer's load, and the worst layer's hot expert
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

from engram.train.compare import read_metrics
from engram.train.sweep_report import pyplot

LOAD_STEPS = (10, 50, 100, 500, 1000, 2000, 3000, 4000, 5000, 6000)
MIN_STAY = 100  # steps: the shortest stay of one hot expert that the printout lists


def fifths(values: list[float]) -> tuple[float, float]:
    """Medians of the first and last fifth of ``values`` (at least one value each)."""
    part = max(1, len(values) // 5)
    return statistics.median(values[:part]), statistics.median(values[-part:])


def run_stats(name: str, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s (median; first and last fifth) and ``moe_load_max`` at :data:`LOAD_STEPS` of the run ``name``, from
    its ``metrics`` (the rows of its ``metrics.jsonl``)."""
    rows = [row for row in metrics if "tokens_per_s" in row]
    if not rows:
        raise ValueError(f"{name!r} logged no tokens_per_s")
    rates = [row["tokens_per_s"] for row in rows]
    first, last = fifths(rates)
    loads = {row["step"]: row["moe_load_max"] for row in rows if "moe_load_max" in row}
    return {"run": name, "median": statistics.median(rates), "first_fifth": first, "last_fifth": last,
            "load_max": {step: loads[step] for step in LOAD_STEPS if step in loads}}


def routing_stats(metrics: list[dict[str, Any]], hot: float = 3.0, min_stay: int = MIN_STAY) -> list[dict[str, Any]]:
    """Per MoE layer (bottom first) of one run's ``metrics`` rows: ``median_load`` (second half of the logged windows),
    ``hot_windows`` of ``windows`` (load >= ``hot``), ``distinct_hot`` experts among the hot windows, ``changes`` of
    the hot expert between consecutive hot windows, ``stays`` (``(expert, first step, last step)`` of every run of
    consecutive logged windows, all hot with one expert, lasting at least ``min_stay`` steps) and ``longest_stay``
    (steps, of any such run). Empty if the run logged no per-layer routing."""
    rows = [row for row in metrics if "moe_load_by_layer" in row]
    if not rows:
        return []
    stats = []
    for layer in range(len(rows[0]["moe_load_by_layer"])):
        loads = [row["moe_load_by_layer"][layer] for row in rows]
        experts: list[int] = []  # the hot expert of each hot window
        runs: list[list[int]] = []  # [expert, first step, last step]; a window below `hot` ends a run
        open_run = False
        for row in rows:
            if row["moe_load_by_layer"][layer] < hot:
                open_run = False
                continue
            experts.append(row["moe_hot_expert_by_layer"][layer])
            if open_run and runs[-1][0] == experts[-1]:
                runs[-1][2] = row["step"]
            else:
                runs.append([experts[-1], row["step"], row["step"]])
                open_run = True
        stats.append({"layer": layer, "median_load": statistics.median(loads[len(loads) // 2:]),
                      "windows": len(rows), "hot_windows": len(experts), "distinct_hot": len(set(experts)),
                      "changes": sum(a != b for a, b in zip(experts, experts[1:])),
                      "longest_stay": max((last - first for _, first, last in runs), default=0),
                      "stays": [tuple(run) for run in runs if run[2] - run[1] >= min_stay]})
    return stats


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


def plot_hot_experts(ax: Any, rows: list[dict[str, Any]], layer: int, hot: float) -> None:
    """MoE layer ``layer``'s most loaded expert at the windows of ``rows`` where its load is >= ``hot``, coloured by
    that load; a layer never that hot gets a line saying so, not an empty frame."""
    from matplotlib.ticker import MaxNLocator

    hot_rows = [row for row in rows if row["moe_load_by_layer"][layer] >= hot]
    ax.set(title=f"MoE layer {layer}: most loaded expert where load >= {hot:g}", xlabel="step", ylabel="expert")
    if not hot_rows:
        ax.text(0.5, 0.5, f"load never >= {hot:g}: no hot expert", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
        return
    ax.scatter([row["step"] for row in hot_rows], [row["moe_hot_expert_by_layer"][layer] for row in hot_rows],
               c=[row["moe_load_by_layer"][layer] for row in hot_rows], s=6, cmap="viridis")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def plot_routing(metrics: dict[str, list[dict[str, Any]]], routing: dict[str, list[dict[str, Any]]], path: Path,
                 hot: float) -> None:
    """One row per run (``metrics``: its name to its metrics rows) that logged per-layer routing: each MoE layer's
    load over the steps (the worst layer, by second-half median in ``routing[name]`` from :func:`routing_stats`, drawn
    thick), and the worst layer's most loaded expert at its hot windows (load >= ``hot``)."""
    runs = [(name, rows) for name, all_rows in metrics.items()
            if (rows := [row for row in all_rows if "moe_load_by_layer" in row])]
    if not runs:
        raise ValueError("none of the runs logged moe_load_by_layer: nothing to plot")
    plt = pyplot()
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.2 * len(runs)), squeeze=False)
    for (name, rows), (load_ax, expert_ax) in zip(runs, axes):
        steps = [row["step"] for row in rows]
        worst = max(routing[name], key=lambda layer: layer["median_load"])["layer"]
        for layer in range(len(rows[0]["moe_load_by_layer"])):
            load_ax.plot(steps, [row["moe_load_by_layer"][layer] for row in rows], lw=1.6 if layer == worst else 0.6,
                         label=f"MoE layer {layer}", zorder=3 if layer == worst else 2)
        top = max(max(row["moe_load_by_layer"]) for row in rows)
        load_ax.set(title=f"{name}: max / mean expert load per MoE layer", xlabel="step", ylabel="load",
                    ylim=(1, 1 + 1.35 * (top - 1)))  # room for the legend above the curves
        load_ax.legend(fontsize=7, ncol=4, loc="upper center")
        expert_ax.set(xlim=load_ax.get_xlim())
        plot_hot_experts(expert_ax, rows, worst, hot)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (their metrics.jsonl)")
    parser.add_argument("--gpu", nargs="*", type=Path, default=[], help="a call's logs/gpu.csv")
    parser.add_argument("--hot", type=float, default=3.0, help="a layer's load that counts as hot [3.0]")
    parser.add_argument("--plot", type=Path, help="draw the per-layer routing of the runs that logged it here")
    args = parser.parse_args()
    names = [folder.name for folder in args.runs]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        parser.error(f"run folders are told apart by name: {', '.join(map(repr, repeated))} given more than once")
    try:
        metrics = {folder.name: read_metrics(folder) for folder in args.runs}
        runs = [run_stats(name, rows) for name, rows in metrics.items()]
        gpus = [gpu_stats(path) for path in args.gpu]
        routing = {name: routing_stats(rows, args.hot) for name, rows in metrics.items()}
        if args.plot:
            plot_routing(metrics, routing, args.plot, args.hot)
    except ValueError as error:
        parser.error(str(error))
    for run in runs:
        loads = " ".join(f"{step}:{value:.2f}" for step, value in run["load_max"].items())
        print(f"{run['run']:>16}  tokens/s median {run['median']:,.0f}, first fifth {run['first_fifth']:,.0f}, "
              f"last fifth {run['last_fifth']:,.0f}" + (f"; moe_load_max {loads}" if loads else ""))
        for layer in routing[run["run"]]:
            stays = ", ".join(f"{expert} at {first}-{last}" for expert, first, last in layer["stays"])
            print(f"{'':>18}layer {layer['layer']}: median load {layer['median_load']:.2f} (second half), "
                  f"{layer['hot_windows']}/{layer['windows']} windows at >= {args.hot:g}, hot expert: "
                  f"{layer['distinct_hot']} distinct, {layer['changes']} changes, "
                  f"longest stay {layer['longest_stay']} steps"
                  + (f"; stays of >= {MIN_STAY} steps: {stays}" if stays else ""))
    for gpu in gpus:
        print(f"{gpu['file']}: {gpu['samples']} samples ({gpu['busy']} busy), utilisation first fifth "
              f"{gpu['first_fifth']:g}%, last fifth {gpu['last_fifth']:g}%, range {gpu['min']}-{gpu['max']}%")


if __name__ == "__main__":
    main()
