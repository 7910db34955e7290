"""The `engram` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from engram.demo import DEFAULT_TABLE_START, DEMO_TEXT, PAPER_TABLE_START

    parser = subparsers.add_parser("demo", help="run the public demo's scenario with the real DeepSeek-V3 tokenizer")
    parser.add_argument("--text", default=DEMO_TEXT, help="sentence to run (default: the demo's)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--table-size", type=int, default=DEFAULT_TABLE_START,
                      help=f"prime search start per n-gram order (default {DEFAULT_TABLE_START:,})")
    size.add_argument("--paper-size", action="store_const", dest="table_size", const=PAPER_TABLE_START,
                      help=f"use the demo's full tables ({PAPER_TABLE_START:,} per head, ~5 GB of fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the multipliers and the random weights")


def _run_demo(args: argparse.Namespace) -> int:
    from engram.demo import run_demo

    if args.table_size < 2:
        raise SystemExit(f"engram demo: --table-size must be >= 2, got {args.table_size}")
    run_demo(text=args.text, table_start=args.table_size, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Conditional memory for language models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    return parser


_COMMANDS = {"demo": _run_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return _COMMANDS[args.command](args)
