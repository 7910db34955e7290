"""The main job: train an Engram model and its iso-parameter baseline on the same data, then compare.

The baseline is the same backbone without Engram, with the Engram parameters given to routed experts
(or to the dense FFN width): same total parameters, nearly the same activated parameters
(:func:`engram.model.params.baseline_config`). Both runs use the same seed, hence the same batches in the
same order. Results: a table on the console, ``comparison.json`` and ``loss_curves.png`` in ``--out``.
Throughput is not compared: the runs train one after the other, so load on the machine can differ between
them; each run's ``metrics.jsonl`` logs its tokens/s. A single run (:func:`run_single`) ends with a summary.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from engram.model.params import baseline_config
from engram.train.checkpoint import latest_checkpoint
from engram.train.trainer import METRICS_FILE, Trainer, TrainConfig

COMPARISON_FILE = "comparison.json"
PLOT_FILE = "loss_curves.png"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def final_losses(run_dir: Path) -> dict[str, Any]:
    """The last logged step, validation loss and bits per byte, and training loss of a run (None where not logged)."""
    rows = read_metrics(run_dir)
    evals = [row for row in rows if "val_loss" in row]
    return {
        "steps": rows[-1]["step"] if rows else 0,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_bpb": evals[-1]["val_bpb"] if evals else None,
        "train_loss": rows[-1]["loss"] if rows else None,
    }


def run_summary(name: str, run_dir: Path, params: Mapping[str, int]) -> dict[str, Any]:
    """The last logged losses and the parameter counts of a finished run."""
    return {
        "model": name,
        **final_losses(run_dir),
        "total_params": params["total"],
        "activated_params": params["activated"],
        "table_params": params["engram"],
    }


def plot_loss_curves(runs: dict[str, Path], out_file: Path) -> Path:
    """Training loss (thin) and validation loss (markers) against tokens, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for (name, run_dir), colour in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        rows = read_metrics(run_dir)
        ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], color=colour, alpha=0.5, lw=1,
                label=f"{name} train")
        evals = [r for r in rows if "val_loss" in r]
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", color=colour, lw=2,
                label=f"{name} validation")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Engram vs iso-parameter baseline")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)
    return out_file


def format_count(count: int) -> str:
    """A parameter count for people: ``"3.34M"``, ``"26.36B"``, ``"0"``."""
    if count == 0:
        return "0"
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def format_params(params: Mapping[str, int]) -> str:
    """``total``, ``activated`` and ``engram`` counts (as :meth:`EngramLM.param_report` names them) in words."""
    return (f"{format_count(params['total'])} total, {format_count(params['activated'])} activated per token, "
            f"{format_count(params['engram'])} in Engram tables")


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def print_comparison(console: Console, rows: list[dict[str, Any]]) -> None:
    """The runs side by side; two-line headers keep it whole in an 80-column terminal."""
    table = Table(title="Engram vs iso-parameter baseline (same data, same order, same seed)",
                  caption="loss in nats per token; tokens/s of each run in its metrics.jsonl")
    for column in ("model", "steps", "val\nloss", "val\nbits/byte", "total\nparams", "activated\nparams",
                   "table\nparams"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for row in rows:
        table.add_row(row["model"], f"{row['steps']:,}", _loss(row["val_loss"]), _loss(row["val_bpb"]),
                      format_count(row["total_params"]), format_count(row["activated_params"]),
                      format_count(row["table_params"]))
    console.print(table)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def print_run_summary(console: Console, run_dir: Path, result: Mapping[str, Any]) -> None:
    """The end of one finished run (``result`` from :meth:`Trainer.train`): its final losses, parameter counts
    and where its ``final/`` model is."""
    summary = run_summary(run_dir.name, run_dir, result["params"])
    validation = (f"validation loss {summary['val_loss']:.4f} nats/token ({summary['val_bpb']:.4f} bits/byte)"
                  if summary["val_loss"] is not None else "no validation loss logged")
    training = f", training loss {summary['train_loss']:.4f}" if summary["train_loss"] is not None else ""
    final = run_dir / "final"
    for line in (f"finished step {result['step']:,} in {_duration(result['seconds'])}: {validation}{training}",
                 f"parameters: {format_params(result['params'])}",
                 f"model: {final} (engram generate --checkpoint {final} --prompt TEXT)"):
        console.print(line, markup=False, soft_wrap=True)


def run_single(cfg: TrainConfig, console: Console | None = None) -> dict[str, Any]:
    """Train ``cfg``'s model alone into ``cfg.out`` (``engram train --no-baseline``) and print its summary."""
    trainer = Trainer(cfg, console=console)
    result = trainer.train()
    if trainer.dist.is_main and not result["interrupted"]:
        print_run_summary(trainer.console, Path(cfg.out), result)
    return result


def run_comparison(cfg: TrainConfig, console: Console | None = None) -> dict[str, Any]:
    """Train ``cfg``'s Engram model and its baseline into ``cfg.out/engram`` and ``cfg.out/baseline``."""
    console = console or Console()
    out = Path(cfg.out)
    engram_trainer = Trainer(dataclasses.replace(cfg, out=str(out / "engram")), console=console)
    main = engram_trainer.dist.is_main  # under torchrun only rank 0 reports and writes
    console.quiet = console.quiet or not main
    if engram_trainer.model_cfg.engram is None:
        raise ValueError(f"preset {cfg.preset!r} has no Engram layers: nothing to compare (use --no-baseline)")
    baseline, counts = baseline_config(engram_trainer.model_cfg)
    console.print(f"[bold]1/2 Engram model[/bold]: {format_params(counts['engram_model'])}")
    engram_result = engram_trainer.train()
    if engram_result["interrupted"]:
        return {"interrupted": True}
    console.print(f"[bold]2/2 baseline[/bold] (Engram parameters moved to experts / FFN): "
                  f"{format_params(counts['baseline'])}")
    resume_baseline = cfg.resume and latest_checkpoint(out / "baseline") is not None  # else not yet started
    baseline_trainer = Trainer(dataclasses.replace(cfg, out=str(out / "baseline"), model=baseline,
                                                   resume=resume_baseline), console=console)
    baseline_result = baseline_trainer.train()
    if baseline_result["interrupted"]:
        return {"interrupted": True}
    if not main:
        return {"interrupted": False}
    rows = [run_summary("engram", out / "engram", engram_result["params"]),
            run_summary("baseline", out / "baseline", baseline_result["params"])]
    print_comparison(console, rows)
    plot = plot_loss_curves({"engram": out / "engram", "baseline": out / "baseline"}, out / PLOT_FILE)
    result = {"rows": rows, "plot": str(plot), "train_config": cfg.to_dict()}
    (out / COMPARISON_FILE).write_text(json.dumps(result, indent=2, default=str))
    console.print(f"models: {out / 'engram' / 'final'} and {out / 'baseline' / 'final'}; loss curves: {plot}; "
                  f"table: {out / COMPARISON_FILE}", markup=False, soft_wrap=True)
    return result
