"""`engram demo`: the public demo's scenario with the real DeepSeek-V3 tokenizer."""

from __future__ import annotations

import argparse

from engram.demo import DEFAULT_TABLE_START, DEMO_TEXT, PAPER_TABLE_START, run_demo


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="run the public demo's scenario with the real DeepSeek-V3 tokenizer")
    parser.add_argument("--text", default=DEMO_TEXT, help="sentence to run (default: the demo's)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--table-size", type=int, default=DEFAULT_TABLE_START,
                      help=f"prime search start per n-gram order (default {DEFAULT_TABLE_START:,})")
    size.add_argument("--paper-size", action="store_const", dest="table_size", const=PAPER_TABLE_START,
                      help=f"use the demo's full tables ({PAPER_TABLE_START:,} per head, ~5 GB of fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the multipliers and the random weights")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.table_size < 2:
        raise SystemExit(f"engram demo: --table-size must be >= 2, got {args.table_size}")
    run_demo(text=args.text, table_start=args.table_size, seed=args.seed)
    return 0
