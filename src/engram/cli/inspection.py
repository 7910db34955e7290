"""`engram inspect gates | ablate | logit-lens | table`: the command line of the inspect tools
(:mod:`engram.inspection`). Every subcommand writes its files (PNG, JSON; HTML for gates) into ``--out``.
"""

from __future__ import annotations

import argparse

_DATA_HELP = ("presets, raw files/folders or a prepared corpus, read with the checkpoint's tokenizer "
              "(default: the data of the run that wrote the checkpoint, from its run.json)")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _add_common(parser: argparse.ArgumentParser, deepseek_v41: bool = False) -> None:
    """``--checkpoint`` (or, with ``deepseek_v41``, ``--deepseek-v41`` instead), ``--out`` and ``--device``."""
    source = parser.add_mutually_exclusive_group(required=True) if deepseek_v41 else parser
    source.add_argument("--checkpoint", required=not deepseek_v41,
                        help="a save_pretrained folder (a run's final/) or a run folder")
    if deepseek_v41:
        source.add_argument("--deepseek-v41", metavar="DIR",
                            help="a DeepSeek-V4.1 checkpoint folder: only its config.json is read (the hashing needs "
                                 "no weights); --data is required and tokenised with the V4 tokenizer")
    parser.add_argument("--out", required=True, help="folder to write the results into (created when missing)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda:0', ...")


def _add_windows(parser: argparse.ArgumentParser, batches: int) -> None:
    parser.add_argument("--data", nargs="+", default=None, help=_DATA_HELP)
    parser.add_argument("--batches", type=_positive, default=batches, help="validation batches to read")
    parser.add_argument("--batch-size", type=_positive, default=8, help="windows per batch")
    parser.add_argument("--seq-len", type=_positive, default=256, help="tokens per window")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("inspect", help="see what the memory does: gates, ablation, logit lens, tables",
                                   description="Interpretability tools for a trained model; each writes into --out.")
    tools = parser.add_subparsers(dest="inspect_command", required=True)

    gates = tools.add_parser("gates", help="per-token heatmap of every Engram gate (HTML page + PNG)",
                             description="Run texts through the model and show the gate of every token, Engram "
                                         "layer and residual branch: gates.html (self-contained), gates.png, "
                                         "gates.json. (Not for a DeepSeek-V4.1 checkpoint: its gates need the "
                                         "backbone's hidden states, which this package does not compute.)")
    _add_common(gates)
    gates.add_argument("--text", action="append", required=True,
                       help="text to run (repeat for several; each gets its own section)")

    ablate = tools.add_parser("ablate", help="validation loss with Engram on vs its output zeroed, by token category",
                              description="Validation loss with Engram on and with every Engram layer's output "
                                          "zeroed at inference, by category (in a frequent n-gram of the training "
                                          "split or not; word start or continuation), and the target tokens that "
                                          "lose most: ablate.json, ablate.png.")
    _add_common(ablate)
    _add_windows(ablate, batches=16)
    ablate.add_argument("--top-ngrams", type=_positive, default=1000, help="n-grams per order that count as frequent")
    ablate.add_argument("--ngram-tokens", type=_positive, default=2_000_000,
                        help="training-split tokens counted to find them")
    ablate.add_argument("--top-tokens", type=_positive, default=20, help="most-hurt target tokens to list")
    ablate.add_argument("--min-count", type=_positive, default=5, help="occurrences a listed token needs")

    lens = tools.add_parser("logit-lens", help="per-layer KL divergence to the final prediction, with a baseline",
                            description="Read every block's residual stream out through the final norm and LM "
                                        "head; plot KL(final || layer) for the model and --baseline: "
                                        "logit_lens.json, logit_lens.png.")
    _add_common(lens)
    lens.add_argument("--baseline", default=None, help="a second checkpoint (e.g. the run's baseline/final)")
    _add_windows(lens, batches=8)

    table = tools.add_parser("table", help="row occupancy, collisions of frequent n-grams, Zipf curve of row reads",
                             description="Hash a corpus sample as the model does: row occupancy, per-head collision "
                                         "rate among the most frequent n-grams, and the Zipf curve of row accesses "
                                         "with the share a hot-row cache of k rows covers: table.json, table.png.")
    _add_common(table, deepseek_v41=True)
    table.add_argument("--data", nargs="+", default=None, help=_DATA_HELP)
    table.add_argument("--split", choices=("train", "val"), default="train")
    table.add_argument("--tokens", type=_positive, default=1_000_000, help="tokens of the split to hash")
    table.add_argument("--top-ngrams", type=_positive, default=1000, help="frequent n-grams per order checked")
    return parser


def run(args: argparse.Namespace) -> int:
    """Prints a short summary and the files written."""
    command = args.inspect_command
    if command == "gates":
        from engram.inspection.gates import run_gates

        report = run_gates(args.checkpoint, args.text, args.out, args.device)
        for text in report.texts:
            print(f"{len(text.pieces)} tokens, mean gate {text.gates.mean():.3f}: {text.text[:60]!r}")
        files = [report.html, report.png, report.summary]
        note = report.font_note
    elif command == "ablate":
        from engram.inspection.ablate import run_ablate

        report = run_ablate(args.checkpoint, args.out, args.data, args.device, args.batches, args.batch_size,
                            args.seq_len, args.top_ngrams, args.ngram_tokens, args.top_tokens, args.min_count)
        for category in report.categories:
            print(f"{category.name:<28} {category.tokens:>9,} targets  loss {category.loss_on:.4f} -> "
                  f"{category.loss_off:.4f} without Engram ({category.increase:+.4f})")
        files, note = [report.png, report.summary], report.font_note
    elif command == "logit-lens":
        from engram.inspection.logit_lens import run_logit_lens

        report = run_logit_lens(args.checkpoint, args.out, args.baseline, args.data, args.device, args.batches,
                                args.batch_size, args.seq_len)
        for curve in report.curves:
            print(f"{curve.name}: KL to final by depth " + " ".join(f"{value:.3f}" for value in curve.kl))
        files, note = [report.png, report.summary], None
    elif command == "table":
        from engram.inspection.table_stats import run_deepseek_v41_table_stats, run_table_stats

        if args.deepseek_v41 is not None:
            report = run_deepseek_v41_table_stats(args.deepseek_v41, args.out, args.data, args.tokens, args.top_ngrams,
                                                  args.split)
        else:
            report = run_table_stats(args.checkpoint, args.out, args.data, args.device, args.tokens, args.top_ngrams,
                                     args.split)
        for layer in report.layers:
            print(f"block {layer.layer_id}: {layer.rows_read:,} of {layer.rows:,} rows read "
                  f"({layer.occupancy:.1%}) over {report.tokens:,} tokens")
        for head in report.heads:
            print(f"block {head.layer_id} head {head.head} ({head.order}-gram, {head.table_size:,} rows): "
                  f"occupancy {head.occupancy:.1%}, {head.collision_rate:.1%} of the top {head.top_ngrams} "
                  f"n-grams share a row (uniform hashing: {head.expected_collision_rate:.1%})")
        files, note = [report.png, report.summary], None
    else:
        raise ValueError(f"unknown inspect command {command!r}")
    if note:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(path) for path in files))
    return 0
