"""`engram sweep`: the sparsity-allocation law at small scale, and memory scaling.

``allocation`` mode (docs/design.md §7): start from the preset's MoE backbone without Engram (rho = 1, every sparse
parameter in routed experts) and, for each rho, keep ``k + round(rho (E - k))`` routed experts and give the
freed parameters to Engram tables shaped like the preset's (:func:`engram.model.iso_parameter_config`): the
same total parameters. Their activated parameters exceed the pure MoE's by the Engram projections (a few percent
at 129k-id vocabularies, more for small backbones with small vocabularies), so when rho = 1 is swept an extra
pure-MoE run ``moe-top{k}`` raises top-k to the value whose activated parameters come closest to the preset's
with Engram: the comparison at equal total *and* activated parameters. ``memory`` mode: the preset with Engram, its tables'
rows multiplied by each factor, the backbone fixed; a power law ``loss = a * rows ** -b`` is fitted in log-log
space (``fit_a``, ``fit_b``, ``fit_r2`` on every row of the CSV).

Every run trains on the same data in the same order with the same seed, for the same number of steps, into
``OUT/<run>/`` (a normal training run folder). A sweep is resumable: a finished run (``final/`` present) is not
trained again, an interrupted one continues from its checkpoint; ``report_only`` trains nothing and writes the
results of runs finished elsewhere (several sweep processes over parts of the values, say), refusing while one
is missing. Results: ``sweep.csv`` and ``sweep.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from engram.data.corpus import load_or_prepare
from engram.model import EngramLMConfig, iso_parameter_config, param_report
from engram.parallel import init_distributed
from engram.train.checkpoint import latest_checkpoint
from engram.train.compare import run_summary
from engram.train.trainer import Trainer, TrainConfig, model_config_for

CSV_FILE = "sweep.csv"
PLOT_FILE = "sweep.png"
MODES = ("allocation", "memory")
DEFAULT_RHOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2)
DEFAULT_MEMORY_FACTORS = (1, 2, 4, 8, 16)


@dataclass
class SweepConfig:
    """A sweep: the training settings every run shares, and what varies. Every field is a flag of ``engram sweep``
    (:mod:`engram.cli.flags`: ``train`` gives the flags of ``engram train``)."""

    train: TrainConfig
    mode: str = field(default="allocation", metadata={"choices": MODES})  # "allocation" (rho) or "memory" (rows)
    rhos: list[float] = field(default_factory=lambda: list(DEFAULT_RHOS), metadata={
        "help": "shares of the sparse parameters kept as routed experts (1 = pure MoE)"})
    memory_factors: list[int] = field(default_factory=lambda: list(DEFAULT_MEMORY_FACTORS), metadata={
        "help": "table-row multipliers of the memory-scaling mode"})
    # allocation with rho = 1: also the pure MoE whose top-k matches the Engram runs' activated parameters
    matched_baseline: bool = field(default=True, metadata={
        "help": "allocation: leave out the pure MoE with top-k raised to Engram's activated parameters"})
    report_only: bool = field(default=False, metadata={
        "help": "train nothing: write sweep.csv and sweep.png from runs finished in --out (refused while one is "
                "missing)"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        values = self.rhos if self.mode == "allocation" else self.memory_factors
        if not values:
            raise ValueError(f"a {self.mode} sweep needs at least one value")
        bad = [rho for rho in self.rhos if not 0 <= rho <= 1]
        if bad:
            raise ValueError(f"rho must lie in [0, 1], got {bad[0]}")
        bad = [factor for factor in self.memory_factors if factor < 1]
        if bad:
            raise ValueError(f"memory factors must be >= 1, got {bad[0]}")


def activation_matched_moe(model_cfg: EngramLMConfig) -> EngramLMConfig:
    """``model_cfg``'s backbone as a pure MoE whose top-k brings its activated parameters closest to those of
    ``model_cfg`` with its Engram layers (the Engram runs of an allocation sweep differ from it only by router
    rows); the first such top-k on a tie."""
    target = param_report(model_cfg)["activated"]
    base = dataclasses.replace(model_cfg, engram=None)
    candidates = [dataclasses.replace(base, moe=dataclasses.replace(base.moe, top_k=k))
                  for k in range(base.moe.top_k, base.moe.num_experts + 1)]
    return min(candidates, key=lambda cfg: abs(param_report(cfg)["activated"] - target))


def sweep_runs(sweep: SweepConfig, model_cfg: EngramLMConfig) -> list[tuple[str, dict[str, Any], EngramLMConfig]]:
    """``(run name, CSV fields, model config)`` of every run, from the preset's model config ``model_cfg``."""
    if model_cfg.engram is None:
        raise ValueError("the sweep's preset must have Engram layers: their shape is the template of the tables")
    runs = []
    if sweep.mode == "allocation":
        base = dataclasses.replace(model_cfg, engram=None)
        base_report = param_report(base)

        def fields(rho: float, cfg: EngramLMConfig) -> dict[str, Any]:
            moe, report = cfg.moe, param_report(cfg)
            kept = (moe.num_experts - base.moe.top_k) / (base.moe.num_experts - base.moe.top_k)
            return {"rho": rho, "rho_effective": kept,
                    "num_experts": moe.num_experts, "top_k": moe.top_k,
                    "total_rel_diff": (report["total"] - base_report["total"]) / base_report["total"],
                    "activated_rel_diff": (report["activated"] - base_report["activated"]) / base_report["activated"]}

        for rho in sweep.rhos:
            cfg, _ = iso_parameter_config(base, rho, model_cfg.engram)
            runs.append((f"rho-{rho:.2f}", fields(rho, cfg), cfg))
        matched = activation_matched_moe(model_cfg)
        if sweep.matched_baseline and 1.0 in sweep.rhos and matched.moe.top_k != base.moe.top_k:
            runs.append((f"moe-top{matched.moe.top_k}", fields(1.0, matched), matched))
    else:
        engram = model_cfg.engram
        for factor in sweep.memory_factors:
            sized = dataclasses.replace(engram, engram_vocab_size=[n * factor for n in engram.engram_vocab_size])
            runs.append((f"rows-x{factor}", {"memory_factor": factor}, dataclasses.replace(model_cfg, engram=sized)))
    return runs


def fit_power_law(rows: list[float], losses: list[float]) -> dict[str, float]:
    """Least squares of ``log loss = log a - b log rows``: ``{"fit_a", "fit_b", "fit_r2"}`` (R² in log space)."""
    x, y = np.log(np.asarray(rows, dtype=float)), np.log(np.asarray(losses, dtype=float))
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else float("nan")
    return {"fit_a": float(math.exp(intercept)), "fit_b": float(-slope), "fit_r2": float(r2)}


def plot_sweep(results: list[dict[str, Any]], mode: str, out_file: Path) -> Path:
    """Validation loss against rho (allocation) or table parameters on log axes with the fit (memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if mode == "allocation":
        top_k = results[0]["top_k"]
        iso = [r for r in results if r["top_k"] == top_k]
        ax.plot([r["rho_effective"] for r in iso], [r["val_loss"] for r in iso], "o-", color="tab:blue",
                label=f"equal total parameters (top-{top_k})")
        for r in iso:
            ax.annotate(f"{r['num_experts']} experts", (r["rho_effective"], r["val_loss"]), fontsize=7,
                        textcoords="offset points", xytext=(0, 6), ha="center")
        for r in results:
            if r["top_k"] != top_k:
                ax.axhline(r["val_loss"], ls="--", color="tab:red", lw=1,
                           label=f"pure MoE top-{r['top_k']}: activated params matched to Engram's")
        ax.set_xlabel("rho: share of the sparse parameters kept as routed experts (1 = pure MoE)")
        ax.set_title("Validation loss against the MoE / Engram split")
        ax.legend(fontsize=8)
    else:
        tables = np.asarray([r["table_params"] for r in results], dtype=float)
        ax.loglog(tables, [r["val_loss"] for r in results], "o", color="tab:blue", label="runs")
        fit = results[0]
        line = np.geomspace(tables.min(), tables.max(), 50)
        ax.loglog(line, fit["fit_a"] * line ** -fit["fit_b"], "--", color="tab:orange",
                  label=f"loss = {fit['fit_a']:.3g} x params^-{fit['fit_b']:.3g} (R² {fit['fit_r2']:.3f})")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%.2f"))  # losses span a few percent: plain numbers, not powers of ten
        ax.set_xlabel("Engram table parameters")
        ax.set_title("Memory scaling, backbone fixed")
        ax.legend()
    ax.set_ylabel("validation loss (nats / token)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)
    return out_file


def run_sweep(sweep: SweepConfig, console: Console | None = None) -> dict[str, Any]:
    """Train every run of ``sweep`` not finished yet, then write ``sweep.csv`` and ``sweep.png`` into its ``out``."""
    context, _ = init_distributed(sweep.train.device)  # under torchrun every run is a distributed run
    console = console or Console()
    console.quiet = console.quiet or not context.is_main
    out = Path(sweep.train.out)
    with context.main_first():
        corpus = load_or_prepare(sweep.train.data, tokenizer=sweep.train.tokenizer,
                                 progress=sweep.train.progress and context.is_main)
    runs = sweep_runs(sweep, model_config_for(sweep.train, corpus))
    if sweep.report_only:
        missing = [name for name, _, _ in runs if not (out / name / "final" / "config.json").is_file()]
        if missing:
            raise ValueError(f"report only: run(s) {missing} not finished in {str(out)!r}")
    results = []
    for index, (name, fields, cfg) in enumerate(runs, 1):
        run_dir = out / name
        train = dataclasses.replace(sweep.train, out=str(run_dir), model=cfg)
        if (run_dir / "final" / "config.json").is_file():
            console.print(f"[bold]{index}/{len(runs)} {name}[/bold]: finished earlier, not trained again")
        else:
            resume = run_dir.exists() and latest_checkpoint(run_dir) is not None
            if run_dir.exists() and not resume:  # stopped before its first checkpoint: start it again
                shutil.rmtree(run_dir)
            console.print(f"[bold]{index}/{len(runs)} {name}[/bold]{' (resuming)' if resume else ''}: {fields}")
            trainer = Trainer(dataclasses.replace(train, resume=resume), console=console)
            if trainer.train()["interrupted"]:
                return {"interrupted": True, "completed": index - 1}
        report = param_report(cfg)
        summary = run_summary(name, run_dir, report)
        results.append({"run": name, **fields, **{k: v for k, v in summary.items() if k != "model"}})
    if not context.is_main:
        return {"interrupted": False, "results": results}
    if sweep.mode == "memory" and len(results) >= 2:
        fit = fit_power_law([r["table_params"] for r in results], [r["val_loss"] for r in results])
        for row in results:
            row.update(fit)
    with open(out / CSV_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    plot = plot_sweep(results, sweep.mode, out / PLOT_FILE) if len(results) >= 2 else None
    table = Table(title=f"engram sweep ({sweep.mode}): same data, same order, same seed, same steps")
    for column in ("run", "val loss", "total params", "activated", "table params"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in results:
        table.add_row(row["run"], f"{row['val_loss']:.4f}", f"{row['total_params']:,}",
                      f"{row['activated_params']:,}", f"{row['table_params']:,}")
    console.print(table)
    console.print(f"results: {out / CSV_FILE}" + (f", plot: {plot}" if plot else ""))
    return {"interrupted": False, "results": results, "csv": str(out / CSV_FILE), "plot": str(plot) if plot else None}
