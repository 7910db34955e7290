"""The report of `engram sweep`: mean ± standard deviation over seeds, which differences exceed the seed spread,
the memory-scaling fit with bootstrap confidence intervals, and the plots.

``rows`` are the sweep's results, one dict per (run, seed) with at least ``run``, ``seed`` and ``val_loss``. A run's
seed spread is the sample standard deviation of its seeds' final validation losses (``ddof = 1``; NaN for one seed).
A difference between two runs **exceeds the seed spread** when their means are further apart than the sum of their
standard deviations, i.e. when their ±1 sd error bars (as drawn in ``sweep.png``) do not overlap; with one seed on
either side it is undecided (empty in the CSV).

The memory-scaling fit (``loss = a * table_params ** -b``, least squares in log-log space) is made on the mean
loss per table size; its confidence intervals come from a bootstrap over seeds: every sample redraws each size's
seeds with replacement, refits, and the central 95% of the refitted ``a`` and ``b`` is the interval.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from engram.train.compare import read_metrics

CSV_FILE = "sweep.csv"
SUMMARY_FILE = "sweep_summary.csv"
DIFFERENCES_FILE = "sweep_differences.csv"
PLOT_FILE = "sweep.png"
CURVES_FILE = "sweep_curves.png"
BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
_PER_SEED = ("seed", "steps", "val_loss", "val_bpb", "train_loss")  # what differs between a run's seeds


def mean_and_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof = 1``; NaN for fewer than two values)."""
    array = np.asarray(list(values), dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, in the order runs first appear: the fields its seeds share, ``seeds`` (how many),
    ``val_loss_mean``, ``val_loss_std``, ``val_bpb_mean`` and ``val_bpb_std``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        runs.setdefault(row["run"], []).append(row)
    summary = []
    for seeds in runs.values():
        shared = {key: value for key, value in seeds[0].items() if key not in _PER_SEED}
        loss_mean, loss_std = mean_and_std(r["val_loss"] for r in seeds)
        bpb_mean, bpb_std = mean_and_std(r["val_bpb"] for r in seeds)
        summary.append({**shared, "seeds": len(seeds), "val_loss_mean": loss_mean, "val_loss_std": loss_std,
                        "val_bpb_mean": bpb_mean, "val_bpb_std": bpb_std})
    return summary


def exceeds_seed_spread(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether summary rows ``a`` and ``b`` differ by more than the sum of their seed standard deviations; ``None``
    when either has a single seed."""
    spread = a["val_loss_std"] + b["val_loss_std"]
    if math.isnan(spread):
        return None
    return abs(b["val_loss_mean"] - a["val_loss_mean"]) > spread


def differences(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of runs ``(run, other)``, ``run`` first in the sweep's order: ``difference`` = other's mean loss
    minus run's, its size relative to run's mean, the two standard deviations and :func:`exceeds_seed_spread`."""
    pairs = []
    for i, a in enumerate(summary):
        for b in summary[i + 1:]:
            difference = b["val_loss_mean"] - a["val_loss_mean"]
            pairs.append({"run": a["run"], "other": b["run"], "difference": difference,
                          "rel_difference": difference / a["val_loss_mean"], "run_std": a["val_loss_std"],
                          "other_std": b["val_loss_std"], "exceeds_seed_spread": exceeds_seed_spread(a, b)})
    return pairs


def fit_power_law(rows: list[float], losses: list[float]) -> dict[str, float]:
    """Least squares of ``log loss = log a - b log rows``: ``{"fit_a", "fit_b", "fit_r2"}`` (R² in log space)."""
    x, y = np.log(np.asarray(rows, dtype=float)), np.log(np.asarray(losses, dtype=float))
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else float("nan")
    return {"fit_a": float(math.exp(intercept)), "fit_b": float(-slope), "fit_r2": float(r2)}


def bootstrap_power_law(table_params: list[float], losses: list[list[float]], samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = 0) -> dict[str, float]:
    """:func:`fit_power_law` of the mean loss of each table size, with ``fit_a_low`` .. ``fit_b_high``: the central
    :data:`CONFIDENCE` of the fits over ``samples`` bootstrap draws of each size's seeds (NaN when no size has two).

    Args:
        table_params: ``[S]`` table parameters of each size.
        losses: ``[S][seeds]`` final validation losses of each size's seeds.
    """
    fit = fit_power_law(table_params, [float(np.mean(seeds)) for seeds in losses])
    tail = (1 - CONFIDENCE) / 2 * 100
    if max(len(seeds) for seeds in losses) < 2:
        return {**fit, **{f"fit_{k}_{end}": math.nan for k in "ab" for end in ("low", "high")}}
    rng = np.random.default_rng(seed)
    draws = {"a": [], "b": []}
    for _ in range(samples):
        means = [float(np.mean(rng.choice(seeds, size=len(seeds)))) for seeds in losses]
        refit = fit_power_law(table_params, means)
        draws["a"].append(refit["fit_a"])
        draws["b"].append(refit["fit_b"])
    bounds = {}
    for key, values in draws.items():
        low, high = np.percentile(values, [tail, 100 - tail])
        bounds.update({f"fit_{key}_low": float(low), f"fit_{key}_high": float(high)})
    return {**fit, **bounds}


def memory_fit(summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, float]:
    """:func:`bootstrap_power_law` of a memory sweep's runs (``table_params`` of each summary row, the losses of
    its seeds from ``rows``)."""
    losses = [[r["val_loss"] for r in rows if r["run"] == s["run"]] for s in summary]
    return bootstrap_power_law([s["table_params"] for s in summary], losses)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """``rows`` as CSV with the first row's keys as the header; ``None`` is written as an empty field."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _is_iso_curve(row: dict[str, Any], top_k: int) -> bool:
    """Whether a summary row lies on the equal-total-parameters curve: an Engram split, or the pure MoE of the
    preset's top-k (rho = 1); the rest are drawn as horizontal lines."""
    return row["kind"] == "engram" or (row["kind"] == "moe" and row["top_k"] == top_k)


def plot_allocation(summary: list[dict[str, Any]], top_k: int, out_file: Path) -> Path:
    """Mean validation loss against rho with ±1 sd error bars over seeds; the activation-matched pure MoE and the
    controls as horizontal lines with their ±1 sd band. ``top_k``: the preset's."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    iso = sorted((r for r in summary if _is_iso_curve(r, top_k)), key=lambda r: r["rho_effective"])
    ax.errorbar([r["rho_effective"] for r in iso], [r["val_loss_mean"] for r in iso],
                yerr=[0.0 if math.isnan(r["val_loss_std"]) else r["val_loss_std"] for r in iso], fmt="o-",
                color="tab:blue", capsize=3, label=f"equal total parameters (top-{top_k})")
    for r in iso:
        ax.annotate(f"{r['num_experts']} experts", (r["rho_effective"], r["val_loss_mean"]), fontsize=7,
                    textcoords="offset points", xytext=(0, 7), ha="center")
    colours = iter(("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:gray"))
    for r in summary:
        if _is_iso_curve(r, top_k):
            continue
        colour = next(colours, "black")
        what = (f"pure MoE top-{r['top_k']}: activated params matched" if r["kind"] == "moe"
                else f"{r['kind']} control ({r['num_experts']} experts, top-{r['top_k']})")
        ax.axhline(r["val_loss_mean"], ls="--", color=colour, lw=1, label=what)
        if not math.isnan(r["val_loss_std"]):
            ax.axhspan(r["val_loss_mean"] - r["val_loss_std"], r["val_loss_mean"] + r["val_loss_std"],
                       color=colour, alpha=0.12, lw=0)
    seeds = sorted({r["seeds"] for r in summary})
    ax.set_xlabel("rho: share of the sparse parameters kept as routed experts (1 = pure MoE)")
    ax.set_title(f"Validation loss against the MoE / Engram split (mean ± sd over {'/'.join(map(str, seeds))} "
                 f"seed{'s' if seeds != [1] else ''})")
    return _finish(fig, ax, out_file)


def plot_memory(summary: list[dict[str, Any]], fit: dict[str, float], out_file: Path) -> Path:
    """Mean loss against table parameters on log axes with ±1 sd error bars and the power-law fit (its bootstrap
    interval of ``b`` in the legend)."""
    from matplotlib.ticker import FormatStrFormatter

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    tables = np.asarray([r["table_params"] for r in summary], dtype=float)
    ax.errorbar(tables, [r["val_loss_mean"] for r in summary],
                yerr=[0.0 if math.isnan(r["val_loss_std"]) else r["val_loss_std"] for r in summary], fmt="o",
                color="tab:blue", capsize=3, label="runs (mean ± sd over seeds)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    line = np.geomspace(tables.min(), tables.max(), 50)
    interval = ("" if math.isnan(fit["fit_b_low"]) else
                f", b in [{fit['fit_b_low']:.3g}, {fit['fit_b_high']:.3g}] ({CONFIDENCE:.0%} bootstrap)")
    ax.plot(line, fit["fit_a"] * line ** -fit["fit_b"], "--", color="tab:orange",
            label=f"loss = {fit['fit_a']:.3g} x params^-{fit['fit_b']:.3g} (R² {fit['fit_r2']:.3f}){interval}")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.2f"))  # losses span a few percent: plain numbers, not powers of ten
    ax.set_xlabel("Engram table parameters")
    ax.set_title("Memory scaling, backbone fixed")
    return _finish(fig, ax, out_file)


def plot_curves(run_dirs: dict[str, list[Path]], out_file: Path, unit: str = "seed") -> Path:
    """Validation loss against training tokens, one line per run: the mean over its run folders (one per ``unit``:
    seed, or replicate) at every evaluation they all reached, with a ±1 sd band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, folders in run_dirs.items():
        curves = [{r["tokens"]: r["val_loss"] for r in read_metrics(folder) if "val_loss" in r} for folder in folders]
        tokens = sorted(set.intersection(*(set(curve) for curve in curves)))
        if not tokens:
            continue
        losses = np.asarray([[curve[t] for t in tokens] for curve in curves])
        mean = losses.mean(axis=0)
        (drawn,) = ax.plot(tokens, mean, "o-", lw=1.5, ms=3, label=f"{name} ({len(folders)} {unit}"
                                                                   f"{'s' if len(folders) > 1 else ''})")
        if len(folders) > 1:
            std = losses.std(axis=0, ddof=1)
            ax.fill_between(tokens, mean - std, mean + std, color=drawn.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("training tokens")
    ax.set_title(f"Validation loss during training (mean ± sd over {unit}s)")
    return _finish(fig, ax, out_file)


def _finish(fig, ax, out_file: Path) -> Path:
    ax.set_ylabel("validation loss (nats / token)")
    return finish_plot(fig, [ax], out_file)


def finish_plot(fig, axes: list, out_file: Path) -> Path:
    """Grid and legend on every axis of ``fig``, then saved to ``out_file`` and closed."""
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_file)
    pyplot().close(fig)
    return out_file
