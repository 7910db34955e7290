"""`engram train`: train an Engram model and its iso-parameter baseline, then compare them (flags: the fields of
:class:`~engram.train.trainer.TrainConfig`)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from engram.cli.flags import add_config_parser, config_from_args
from engram.model import EngramLMConfig
from engram.parallel import finish_distributed
from engram.train.compare import run_comparison, run_single
from engram.train.trainer import TrainConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_config_parser(
        subparsers, "train", TrainConfig,
        help="train an Engram model and its iso-parameter baseline, then compare them",
        description="Train the preset's Engram model and (unless --no-baseline) its iso-parameter baseline on "
                    "the same data and order, then print a side-by-side table and write a loss-curve PNG.")
    parser.add_argument("--no-baseline", action="store_true", help="train the Engram model only")
    parser.add_argument("--no-engram", action="store_true", help="train the preset without Engram (implies --no-baseline)")
    return parser


def latest_run(preset: str, root: Path = Path("runs")) -> Path:
    """The newest ``runs/PRESET-YYYYmmdd-HHMMSS`` folder: the run ``engram train --resume`` continues without --out."""
    name = re.compile(rf"{re.escape(preset)}-\d{{8}}-\d{{6}}")
    runs = sorted(p for p in root.iterdir() if p.is_dir() and name.fullmatch(p.name)) if root.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"--resume without --out: no run of preset {preset!r} ({root}/{preset}-YYYYmmdd-"
                                f"HHMMSS) in {root.resolve()}; pass --out RUN to name the run to continue")
    return runs[-1]


def run(args: argparse.Namespace) -> int:
    if args.resume and args.out is None:
        out = str(latest_run(args.preset))
        print(f"resuming {out}, the latest run of preset {args.preset!r}")
    else:
        out = args.out or f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    model = EngramLMConfig.from_preset(args.preset, engram=None) if args.no_engram else None
    cfg = config_from_args(TrainConfig, args, out=out, model=model)
    result = run_single(cfg) if args.no_baseline or args.no_engram else run_comparison(cfg)
    finish_distributed()  # under torchrun: leave the process group once every rank is done
    return 130 if result.get("interrupted") else 0
