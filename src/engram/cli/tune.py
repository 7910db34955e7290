"""`engram tune`: train a saved model's Engram tables on new text into a patch (flags: the fields of
:class:`~engram.memory.tune.TuneConfig`)."""

from __future__ import annotations

import argparse

from engram.cli.flags import add_config_parser, config_from_args
from engram.memory.tune import TuneConfig, tune_memory


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_config_parser(
        subparsers, "tune", TuneConfig,
        help="memory-only fine-tuning: train the Engram tables of a saved model into a patch",
        description="Freeze the backbone, train the Engram tables (optionally also the Engram gate projections) on "
                    "--data, and write the rows that changed as a patch over the base model.")


def run(args: argparse.Namespace) -> int:
    tune_memory(config_from_args(TuneConfig, args))
    return 0
