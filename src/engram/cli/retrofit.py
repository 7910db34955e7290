"""`engram retrofit`: add Engram layers to a local transformers causal LM, train only them on text and save the
adapter (flags: the fields of :class:`~engram.train.retrofit.RetrofitConfig`)."""

from __future__ import annotations

import argparse

from engram.cli.flags import add_config_parser, config_from_args
from engram.train.retrofit import RetrofitConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_config_parser(
        subparsers, "retrofit", RetrofitConfig,
        help="add Engram layers to a transformers causal LM and train them into an adapter",
        description="Insert Engram layers before --layers of the local transformers model --model (an exact no-op "
                    "at first), train only them on --data with the model's own tokenizer, print the held-out "
                    "loss before/after and save the adapter into --out (engram.hf.load_adapter loads it); --export "
                    "also writes a Llama-family model as an EngramLM folder that engram serve and engram tune read.")


def run(args: argparse.Namespace) -> int:
    from engram.hf.retrofit_train import train_retrofit  # transformers is optional and slow to import

    train_retrofit(config_from_args(RetrofitConfig, args))
    return 0
