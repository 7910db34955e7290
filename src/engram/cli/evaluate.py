"""`engram eval`: loss by position in the context and retrieval of a planted key, for one or more checkpoints
(flags: the fields of :class:`~engram.inspection.long_context.EvalConfig`)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from engram.cli.flags import add_config_parser, config_from_args
from engram.inspection.long_context import JSON_FILE, PNG_FILE, EvalConfig, run_eval


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_config_parser(
        subparsers, "eval", EvalConfig,
        help="long context: validation loss by position, retrieval of a key planted early and asked for late",
        description="For each checkpoint: validation loss by how many tokens of context a prediction saw "
                    "(power-of-two buckets), and the accuracy of predicting a random key planted at the start of a "
                    "sequence of validation text and asked for at its end, at several lengths. Writes eval.json "
                    "and eval.png into --out.")


def run(args: argparse.Namespace) -> int:
    report = run_eval(config_from_args(EvalConfig, args))
    lengths = report["settings"]["lengths"]
    table = Table(title="engram eval: retrieval accuracy of the planted key (val loss over the windows)")
    for column in ("checkpoint", "val loss", *(f"L={length}" for length in lengths)):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for label, result in report["checkpoints"].items():
        table.add_row(label, f"{result['val_loss']:.4f}", *(f"{r['accuracy']:.2f}" for r in result["retrieval"]))
    console = Console()
    console.print(table)
    console.print(f"results: {args.out}/{JSON_FILE}, {args.out}/{PNG_FILE}")
    return 0
