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

``controls`` (allocation mode) adds the controls of docs/results/allocation-v2 (:data:`engram.config.DEMO_ABLATIONS`):
the preset's Engram layers with a part removed (``no-memory``: one learned vector in place of the rows read;
``conv-only``: only the ShortConv, on the hidden state), their top-k chosen like ``moe-top{k}``'s (activated
parameters closest to the Engram runs') and their routed experts so that the total is closest to the pure MoE's.

Every run trains on the same data in the same order with the same seed, for the same number of steps, into
``OUT/<run>/`` (a normal training run folder); with ``seeds`` every run trains once per seed (the seed sets the
initial weights and the batch order) into ``OUT/<run>-seed<S>/``, seed after seed. ``only`` keeps the runs whose names
match (to split one sweep over processes that share ``OUT``). A sweep is resumable: a finished run (``final/``
present) is not trained again (refused when its ``run.json`` records another corpus, other settings or another model
than this sweep's: a reused folder never passes off one run as another), an interrupted one continues from its
checkpoint; ``report_only`` trains nothing and writes the results of runs finished elsewhere (several sweep processes
over parts of the values, say), refusing while one is missing. Results (:mod:`engram.train.sweep_report`):
``sweep.csv`` (a row per run and seed), ``sweep_summary.csv`` (mean ± sd per run), ``sweep_differences.csv`` (every
pair of runs: does the difference exceed the seed spread?), ``sweep.png`` and ``sweep_curves.png``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from engram.config import DEMO_ABLATIONS
from engram.data.corpus import load_or_prepare
from engram.model import EngramLMConfig, iso_parameter_config, param_report
from engram.parallel import init_distributed
from engram.train.checkpoint import latest_checkpoint
from engram.train.compare import run_summary
from engram.train.sweep_report import (CSV_FILE, CURVES_FILE, DIFFERENCES_FILE, PLOT_FILE, SUMMARY_FILE, differences,
                                       memory_fit, plot_allocation, plot_curves, plot_memory, summarize, write_csv)
from engram.train.trainer import Trainer, TrainConfig, finished_run_differences, model_config_for

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
    controls: list[str] = field(default_factory=list, metadata={
        "choices": DEMO_ABLATIONS, "metavar": "CONTROL",
        "help": f"allocation: also train these controls ({', '.join(DEMO_ABLATIONS)}: the Engram layers without "
                "their lookup, or their ShortConv alone) at the pure MoE's total and the Engram runs' activated "
                "parameters"})
    seeds: list[int] = field(default_factory=list, metadata={
        "metavar": "SEED",
        "help": "train every run once per seed (initial weights and batch order), into RUN-seedS/ (default: --seed "
                "alone, into RUN/)"})
    only: list[str] = field(default_factory=list, metadata={
        "metavar": "RUN",
        "help": "train and report only the runs with these names or shell patterns (e.g. 'moe-top*'): to split a "
                "sweep over processes sharing --out"})
    report_only: bool = field(default=False, metadata={
        "help": "train nothing: write the CSVs and plots from runs finished in --out (refused while one is "
                "missing)"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.controls and self.mode != "allocation":
            raise ValueError(f"controls {self.controls} belong to an allocation sweep, not to mode {self.mode!r}")
        bad = [name for name in self.controls if name not in DEMO_ABLATIONS]
        if bad:
            raise ValueError(f"controls must be among {DEMO_ABLATIONS}, got {bad[0]!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, got {self.seeds}")
        values = self.rhos if self.mode == "allocation" else self.memory_factors
        if not values:
            raise ValueError(f"a {self.mode} sweep needs at least one value")
        bad = [rho for rho in self.rhos if not 0 <= rho <= 1]
        if bad:
            raise ValueError(f"rho must lie in [0, 1], got {bad[0]}")
        bad = [factor for factor in self.memory_factors if factor < 1]
        if bad:
            raise ValueError(f"memory factors must be >= 1, got {bad[0]}")


def _moe_closest(cfg: EngramLMConfig, count: str, target: int, **moe_values: range) -> EngramLMConfig:
    """``cfg`` with the one MoE field of ``moe_values`` set to the value of its range that brings
    ``param_report(...)[count]`` closest to ``target``; the first such value on a tie."""
    ((name, values),) = moe_values.items()
    candidates = [dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **{name: v})) for v in values]
    return min(candidates, key=lambda candidate: abs(param_report(candidate)[count] - target))


def activation_matched_moe(model_cfg: EngramLMConfig) -> EngramLMConfig:
    """``model_cfg``'s backbone as a pure MoE whose top-k brings its activated parameters closest to those of
    ``model_cfg`` with its Engram layers (the Engram runs of an allocation sweep differ from it only by router
    rows); the first such top-k on a tie."""
    base = dataclasses.replace(model_cfg, engram=None)
    return _moe_closest(base, "activated", param_report(model_cfg)["activated"],
                        top_k=range(base.moe.top_k, base.moe.num_experts + 1))


def control_config(model_cfg: EngramLMConfig, ablation: str) -> EngramLMConfig:
    """The control ``ablation`` (:data:`DEMO_ABLATIONS`) of ``model_cfg``'s Engram layers: the top-k whose activated
    parameters come closest to ``model_cfg``'s (as :func:`activation_matched_moe` picks it), then the routed experts
    whose total comes closest to the pure MoE's (``model_cfg`` without Engram: the total of every allocation run)."""
    engram = dataclasses.replace(model_cfg.engram, variant=ablation)
    matched = _moe_closest(dataclasses.replace(model_cfg, engram=engram), "activated",
                           param_report(model_cfg)["activated"],
                           top_k=range(model_cfg.moe.top_k, model_cfg.moe.num_experts + 1))
    total = param_report(dataclasses.replace(model_cfg, engram=None))["total"]
    return _moe_closest(matched, "total", total, num_experts=range(matched.moe.top_k, matched.moe.num_experts + 1))


def rows_per_head(cfg: EngramLMConfig) -> float:
    """Mean table rows of one hash head of ``cfg``'s Engram layers (0 without Engram; 1 for a control)."""
    if cfg.engram is None:
        return 0
    heads = len(cfg.engram.layer_ids) * cfg.engram.num_heads
    return param_report(cfg)["engram"] / (heads * cfg.engram.head_dim)


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
            kind = "moe" if cfg.engram is None else cfg.engram.variant_spec.ablation or "engram"
            return {"kind": kind, "rho": rho, "rho_effective": kept,
                    "num_experts": moe.num_experts, "top_k": moe.top_k, "rows_per_head": rows_per_head(cfg),
                    "total_rel_diff": (report["total"] - base_report["total"]) / base_report["total"],
                    "activated_rel_diff": (report["activated"] - base_report["activated"]) / base_report["activated"]}

        for rho in sweep.rhos:
            cfg, _ = iso_parameter_config(base, rho, model_cfg.engram)
            runs.append((f"rho-{rho:.2f}", fields(rho, cfg), cfg))
        matched = activation_matched_moe(model_cfg)
        if sweep.matched_baseline and 1.0 in sweep.rhos and matched.moe.top_k != base.moe.top_k:
            runs.append((f"moe-top{matched.moe.top_k}", fields(1.0, matched), matched))
        for ablation in sweep.controls:
            control = control_config(model_cfg, ablation)
            runs.append((ablation, fields(1.0, control), control))
    else:
        engram = model_cfg.engram
        for factor in sweep.memory_factors:
            sized = dataclasses.replace(engram, engram_vocab_size=[n * factor for n in engram.engram_vocab_size])
            cfg = dataclasses.replace(model_cfg, engram=sized)
            runs.append((f"rows-x{factor}", {"memory_factor": factor, "rows_per_head": rows_per_head(cfg)}, cfg))
    return runs


def selected_runs(sweep: SweepConfig, runs: list[tuple[str, dict[str, Any], EngramLMConfig]]
                  ) -> list[tuple[str, dict[str, Any], EngramLMConfig]]:
    """The runs whose names match one of ``sweep.only`` (all without it); ``ValueError`` naming a pattern that matches
    none of them."""
    if not sweep.only:
        return runs
    names = [name for name, _, _ in runs]
    unmatched = [pattern for pattern in sweep.only if not fnmatch.filter(names, pattern)]
    if unmatched:
        raise ValueError(f"--only {unmatched[0]!r} matches none of this sweep's runs {names}")
    return [run for run in runs if any(fnmatch.fnmatchcase(run[0], pattern) for pattern in sweep.only)]


def seeded_runs(sweep: SweepConfig, runs: list[tuple[str, dict[str, Any], EngramLMConfig]]
                ) -> list[tuple[str, int, str, dict[str, Any], EngramLMConfig]]:
    """``(folder, seed, run name, CSV fields, model config)`` of every run and seed, seed after seed: with
    ``sweep.seeds`` the folder is ``<run>-seed<S>``, else ``<run>`` with the training config's one seed."""
    if not sweep.seeds:
        return [(name, sweep.train.seed, name, fields, cfg) for name, fields, cfg in runs]
    return [(f"{name}-seed{seed}", seed, name, fields, cfg) for seed in sweep.seeds for name, fields, cfg in runs]


SEED_FOLDER = re.compile(r"(?P<run>.+)-seed(?P<seed>\d+)")  # the folder names of seeded_runs


def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` trained to its end (its ``final/`` model folder is written)."""
    return (run_dir / "final" / "config.json").is_file()


def finished_seed_folders(source: Path) -> list[tuple[str, int, Path]]:
    """``(run name, seed, folder)`` of every finished ``<run>-seed<S>`` folder in ``source`` (a sweep's ``out``
    with seeds), in folder-name order."""
    found = []
    for folder in sorted(source.iterdir()):
        match = SEED_FOLDER.fullmatch(folder.name)
        if match and is_finished(folder):
            found.append((match["run"], int(match["seed"]), folder))
    return found


def run_sweep(sweep: SweepConfig, console: Console | None = None) -> dict[str, Any]:
    """Train every run of ``sweep`` not finished yet, then write the report (:mod:`engram.train.sweep_report`)
    into its ``out``."""
    context, _ = init_distributed(sweep.train.device)  # under torchrun every run is a distributed run
    console = console or Console()
    console.quiet = console.quiet or not context.is_main
    out = Path(sweep.train.out)
    with context.main_first():
        corpus = load_or_prepare(sweep.train.data, tokenizer=sweep.train.tokenizer,
                                 progress=sweep.train.progress and context.is_main)
    model_cfg = model_config_for(sweep.train, corpus)
    runs = seeded_runs(sweep, selected_runs(sweep, sweep_runs(sweep, model_cfg)))
    if sweep.report_only:
        missing = [folder for folder, *_ in runs if not is_finished(out / folder)]
        if missing:
            raise ValueError(f"report only: run(s) {missing} not finished in {str(out)!r}")
    results = []
    for index, (folder, seed, name, fields, cfg) in enumerate(runs, 1):
        run_dir = out / folder
        train = dataclasses.replace(sweep.train, out=str(run_dir), model=cfg, seed=seed)
        if is_finished(run_dir):
            differences = finished_run_differences(run_dir, train, corpus)
            if differences:
                raise ValueError(f"{run_dir} holds a finished run trained otherwise than this sweep's {folder}: "
                                 + "; ".join(differences) + ". Choose another --out, or remove that folder to "
                                 "train it again")
            console.print(f"[bold]{index}/{len(runs)} {folder}[/bold]: finished earlier, not trained again")
        else:
            resume = run_dir.exists() and latest_checkpoint(run_dir) is not None
            if run_dir.exists() and not resume:  # stopped before its first checkpoint: start it again
                shutil.rmtree(run_dir)
            console.print(f"[bold]{index}/{len(runs)} {folder}[/bold]{' (resuming)' if resume else ''}: {fields}")
            trainer = Trainer(dataclasses.replace(train, resume=resume), console=console)
            if trainer.train()["interrupted"]:
                return {"interrupted": True, "completed": index - 1}
        summary = run_summary(name, run_dir, param_report(cfg))
        results.append({"run": name, "seed": seed, **fields, **{k: v for k, v in summary.items() if k != "model"}})
    if not context.is_main:
        return {"interrupted": False, "results": results}
    report = write_report(sweep.mode, results, {folder: name for folder, _, name, _, _ in runs}, out,
                          model_cfg.moe.top_k)
    print_report(console, sweep.mode, results, report["summary"])
    console.print(f"results: {', '.join(str(path) for path in report['files'])}")
    return {"interrupted": False, "results": results, **report}


def write_report(mode: str, results: list[dict[str, Any]], folders: dict[str, str], out: Path, top_k: int
                 ) -> dict[str, Any]:
    """``sweep.csv``, ``sweep_summary.csv``, ``sweep_differences.csv`` (two runs or more) and the plots (two points
    or more) of ``results`` (a row per run and seed) into ``out``; ``folders`` maps each run folder to its run name,
    ``top_k`` is the preset's. Memory mode adds the fit (:func:`memory_fit`) to every row of both CSVs."""
    summary = summarize(results)
    files = []
    if mode == "memory" and len(summary) >= 2:
        fit = memory_fit(summary, results)
        for row in results + summary:
            row.update(fit)
    files.append(write_csv(results, out / CSV_FILE))
    files.append(write_csv(summary, out / SUMMARY_FILE))
    if len(summary) >= 2:
        files.append(write_csv(differences(summary), out / DIFFERENCES_FILE))
        files.append(plot_allocation(summary, top_k, out / PLOT_FILE) if mode == "allocation"
                     else plot_memory(summary, fit, out / PLOT_FILE))
    run_dirs: dict[str, list[Path]] = {}
    for folder, name in folders.items():
        run_dirs.setdefault(name, []).append(out / folder)
    files.append(plot_curves(run_dirs, out / CURVES_FILE))
    return {"summary": summary, "files": files, "csv": str(out / CSV_FILE)}


def print_report(console: Console, mode: str, results: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    """Every run and seed, then (with several seeds) the mean ± sd of every run."""
    table = Table(title=f"engram sweep ({mode}): same data, same order, same steps; one seed per row")
    for column in ("run", "seed", "val loss", "total params", "activated", "table params"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in results:
        table.add_row(row["run"], str(row["seed"]), f"{row['val_loss']:.4f}", f"{row['total_params']:,}",
                      f"{row['activated_params']:,}", f"{row['table_params']:,}")
    console.print(table)
    if all(row["seeds"] == 1 for row in summary):
        return
    table = Table(title="mean ± sd over seeds (sweep_differences.csv: which differences exceed the seed spread)")
    for column in ("run", "seeds", "val loss"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in summary:
        spread = "" if math.isnan(row["val_loss_std"]) else f" ± {row['val_loss_std']:.4f}"
        table.add_row(row["run"], str(row["seeds"]), f"{row['val_loss_mean']:.4f}{spread}")
    console.print(table)
