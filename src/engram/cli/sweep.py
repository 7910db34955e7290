"""`engram sweep`: the sparsity-allocation sweep or memory scaling (flags: the fields of
:class:`~engram.train.sweep.SweepConfig`, those of ``engram train`` among them)."""

from __future__ import annotations

import argparse
import time

from engram.cli.flags import add_config_parser, config_from_args
from engram.parallel import finish_distributed
from engram.train.sweep import SweepConfig, run_sweep
from engram.train.trainer import TrainConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_config_parser(
        subparsers, "sweep", SweepConfig,
        help="the sparsity-allocation sweep (MoE <-> Engram at equal parameters) or memory scaling",
        description="allocation: for each --rhos value keep that share of the preset's sparse parameters as routed "
                    "experts and give the rest to Engram tables (equal total parameters); memory: multiply the "
                    "preset's table rows by each --memory-factors value. --controls adds the Engram layers without "
                    "their lookup (no-memory) or with their ShortConv alone (conv-only); --seeds trains every run "
                    "once per seed. Every run trains on the same data in the same order for --max-steps; an "
                    "interrupted sweep continues where it stopped. Writes sweep.csv (a row per run and seed), "
                    "sweep_summary.csv (mean ± sd over seeds), sweep_differences.csv (which differences exceed the "
                    "seed spread), sweep.png and sweep_curves.png into --out.")


def run(args: argparse.Namespace) -> int:
    out = args.out or f"runs/sweep-{args.mode}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_sweep(config_from_args(SweepConfig, args, train=config_from_args(TrainConfig, args, out=out)))
    finish_distributed()  # under torchrun: leave the process group once every rank is done
    return 130 if result.get("interrupted") else 0
