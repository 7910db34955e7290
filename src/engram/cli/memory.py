"""`engram memory lookup | write | apply | revert | merge | diff | show`: patches and table rows from the shell.

Commands that change a model write a new ``save_pretrained`` folder (``--out``) unless told ``--in-place``, and
save the inverse patch that undoes them beside it. Bad input raises ``ValueError`` naming the bad value (the
``engram`` entry point turns it into exit code 2).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from engram.memory.edit import (DEFAULT_CORPUS_TOKENS, DEFAULT_TOP_NGRAMS, WRITE_MODES, LookupResult, lookup,
                                lookup_deepseek_v41, write_ngram)
from engram.memory.patch import MemoryPatch, apply_patch, diff, load_patch, merge, revert, save_patch
from engram.model import EngramLM
from engram.models.deepseek_v41 import load_deepseek_v41_engram
from engram.parallel.distributed import resolve_device
from engram.storage.placement import PLACEMENTS

COLLISIONS_SHOWN = 3  # per head, in the lookup table


def _finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` would write rows that poison every read)."""
    number = float(text)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return number


def _add_target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="a new folder for the changed model")
    target.add_argument("--in-place", action="store_true", help="overwrite the --checkpoint folder")
    parser.add_argument("--inverse", default=None,
                        help="where the patch that undoes this is written (default, in the target folder: "
                             "NAME.inverse.patch after apply NAME.patch, NAME.redo.patch after revert "
                             "NAME.inverse.patch)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("memory", help="look up, write, apply, revert, merge and diff memory patches")
    actions = parser.add_subparsers(dest="memory_command", required=True)

    look = actions.add_parser("lookup", help="the rows a text reads per position, order and head, their collisions "
                                             "with frequent n-grams of a corpus, and the gate values",
                              description="The rows a text reads per position, order and head, their collisions with "
                                          "frequent n-grams of a corpus, and the gate values. With --deepseek-v41 "
                                          "there are no gates: they need the backbone's hidden states, which an "
                                          "Engram-only load of the checkpoint does not compute; each row's L2 norm "
                                          "is shown instead.")
    look.add_argument("text")
    source = look.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a save_pretrained folder")
    source.add_argument("--deepseek-v41", metavar="DIR",
                        help="a DeepSeek-V4.1 checkpoint folder: config.json and its safetensors (only the Engram "
                             "tensors are read; the V4 tokenizer is fetched on first use)")
    look.add_argument("--layer", type=int, action="append", default=None,
                      help="with --deepseek-v41: an Engram layer to load (repeat; default: all). A V4.1 table is "
                           "~101 GB, loaded on --device ('auto' is the CPU with --deepseek-v41)")
    look.add_argument("--dead-token-id", type=int, action="append", default=[],
                      help="with --deepseek-v41: a token id that is dead (e.g. an image placeholder; repeat)")
    look.add_argument("--table-placement", choices=PLACEMENTS, default="device",
                      help="with --deepseek-v41: where the tables are read from: 'device' (loaded on --device), "
                           "'host' or 'disk' (a table file per layer converted once into --table-dir, then reused)")
    look.add_argument("--table-dir", default=None,
                      help="with --deepseek-v41 and --table-placement host or disk: the folder of the converted "
                           "table files (~101 GB a V4.1 layer)")
    look.add_argument("--corpus", nargs="+", default=None, help="data spec whose frequent n-grams are checked for "
                                                                "collisions (presets, files, a prepared corpus)")
    look.add_argument("--top-ngrams", type=int, default=DEFAULT_TOP_NGRAMS, help="most frequent n-grams per order")
    look.add_argument("--corpus-tokens", type=int, default=DEFAULT_CORPUS_TOKENS, help="corpus tokens counted")
    look.add_argument("--device", default="auto")
    look.add_argument("--json", action="store_true", help="print JSON instead of tables")

    write = actions.add_parser("write", help="a patch that sets or blends the rows of one n-gram")
    write.add_argument("ngram", help="2 to max_ngram_size tokens, written as mid-text (leading space: ' zebra code')")
    write.add_argument("--checkpoint", required=True)
    value = write.add_mutually_exclusive_group(required=True)
    value.add_argument("--value", type=_finite_float, help="every element of the rows (0 erases)")
    value.add_argument("--value-from", help="another n-gram of as many tokens whose rows are copied")
    write.add_argument("--mode", choices=WRITE_MODES, default="set")
    write.add_argument("--alpha", type=float, default=0.5, help="blend weight of the new value")
    write.add_argument("--layer", type=int, default=None, help="one Engram layer (default: all)")
    write.add_argument("--out", required=True, help="the patch file to write")

    apply = actions.add_parser("apply", help="write a patch into a model")
    apply.add_argument("patch")
    apply.add_argument("--checkpoint", required=True, help="the patch's base model folder")
    _add_target(apply)

    undo = actions.add_parser("revert", help="undo an apply with the inverse patch it wrote")
    undo.add_argument("patch", help="the inverse patch")
    undo.add_argument("--checkpoint", required=True, help="the patched model folder")
    _add_target(undo)

    join = actions.add_parser("merge", help="merge two patches of one base (the second wins on shared rows)")
    join.add_argument("first")
    join.add_argument("second")
    join.add_argument("--out", required=True)

    compare = actions.add_parser("diff", help="the patch that turns one model folder into another")
    compare.add_argument("base")
    compare.add_argument("other")
    compare.add_argument("--out", required=True)

    info = actions.add_parser("show", help="what a patch holds")
    info.add_argument("patch")
    info.add_argument("--json", action="store_true")
    return parser


def _target(checkpoint: str, out: str | None, in_place: bool) -> Path:
    """The folder a changed model is written to: ``out`` (new or empty), or the checkpoint with ``--in-place``."""
    source = Path(checkpoint)
    if in_place:
        return source
    target = Path(out)
    if target.resolve() == source.resolve():
        raise ValueError(f"--out {out!r} is the checkpoint folder itself; pass --in-place to overwrite it")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {out!r} exists and is not an empty folder; choose a new one")
    return target


def _change_model(args: argparse.Namespace, console: Console) -> None:
    """``apply`` and ``revert``: load, change, save into the target, write the inverse."""
    target = _target(args.checkpoint, args.out, args.in_place)
    model = EngramLM.from_pretrained(args.checkpoint)
    patch = load_patch(args.patch, model)
    inverse = apply_patch(model, patch) if args.memory_command == "apply" else revert(model, patch)
    model.save_pretrained(target)
    stem = Path(args.patch).stem
    default = (f"{stem}.inverse.patch" if args.memory_command == "apply"
               else f"{stem.removesuffix('.inverse')}.redo.patch")
    inverse_path = Path(args.inverse) if args.inverse else target / default
    save_patch(inverse, inverse_path)
    console.print(f"{args.memory_command}: {patch.num_rows:,} rows" + (f", {len(patch.dense)} dense tensors"
                  if patch.dense else "") + f" written; model saved to {target}; inverse patch {inverse_path}")


def _summary(patch: MemoryPatch, path: str) -> dict:
    return {"path": path, "bytes": Path(path).stat().st_size, "base_fingerprint": patch.base_fingerprint,
            "rows": {str(layer_id): rows.shape[0] for layer_id, (rows, _) in patch.layers.items()},
            "dense": {name: list(tensor.shape) for name, tensor in patch.dense.items()}, "metadata": patch.metadata}


def _print_lookup(result: LookupResult, console: Console) -> None:
    """One table per Engram layer: a row per position with its gates (when known), rows per order (with their L2
    norms, when known) and collisions."""
    for index, first in enumerate(result.positions[0].layers):
        orders = sorted({head.order for head in first.heads})
        has_gates, has_norms = bool(first.gates), first.heads[0].row_norm is not None
        table = Table(title=f"Engram layer {first.layer}: rows read" + (" (row:L2 norm)" if has_norms else "")
                      + (f", collisions among the {result.top_ngrams} most frequent n-grams per order of "
                         f"{result.corpus_tokens:,} corpus tokens" if result.corpus_tokens else ""),
                      caption=None if has_gates else "no gates: they need the backbone's hidden states")
        columns = ("pos", "token", *(("gate per branch",) if has_gates else ()),
                   *(f"{order}-gram rows" for order in orders), "collisions")
        for column in columns:
            table.add_column(column)
        for position in result.positions:
            layer = position.layers[index]
            rows = [" ".join(str(head.row) + (f":{head.row_norm:.3g}" if has_norms else "")
                             for head in layer.heads if head.order == order) for order in orders]
            collisions = [f"{head.order}g/h{head.head}: " + ", ".join(f"{c.ngram!r}x{c.count}"
                                                                      for c in head.collisions[:COLLISIONS_SHOWN])
                          for head in layer.heads if head.collisions]
            gates = (" ".join(f"{g:.2f}" for g in layer.gates),) if has_gates else ()
            cells = (str(position.position), repr(position.token), *gates, *rows, "\n".join(collisions))
            table.add_row(*(Text(cell) for cell in cells))  # Text: token strings are not rich markup
        console.print(table)


def run(args: argparse.Namespace) -> int:
    console = Console()
    command = args.memory_command
    if command == "lookup":
        if args.deepseek_v41 is not None:
            # "auto" is the CPU here: a V4.1 table is ~101 GB, and lookups need no GPU
            device = resolve_device("cpu" if args.device == "auto" else args.device)
            engram = load_deepseek_v41_engram(args.deepseek_v41, args.layer, device=device,
                                              dead_token_ids=args.dead_token_id,
                                              table_placement=args.table_placement, table_dir=args.table_dir)
            result = lookup_deepseek_v41(engram, args.text, corpus=args.corpus, top_ngrams=args.top_ngrams,
                                         corpus_tokens=args.corpus_tokens)
        else:
            if args.layer or args.dead_token_id or args.table_placement != "device" or args.table_dir:
                raise ValueError("--layer, --dead-token-id, --table-placement and --table-dir go with "
                                 "--deepseek-v41, not --checkpoint")
            model = EngramLM.from_pretrained(args.checkpoint).to(resolve_device(args.device))
            result = lookup(model, args.text, corpus=args.corpus, top_ngrams=args.top_ngrams,
                            corpus_tokens=args.corpus_tokens)
        if args.json:
            print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        else:
            _print_lookup(result, console)
    elif command == "write":
        model = EngramLM.from_pretrained(args.checkpoint)
        value = args.value if args.value_from is None else args.value_from
        patch = write_ngram(model, args.ngram, value, layer=args.layer, mode=args.mode, alpha=args.alpha)
        save_patch(patch, args.out)
        rows = ", ".join(f"layer {layer_id}: {rows.tolist()}" for layer_id, (rows, _) in patch.layers.items())
        console.print(f"patch of {args.ngram!r} ({rows}) written to {args.out}")
    elif command in ("apply", "revert"):
        _change_model(args, console)
    elif command == "merge":
        patch = merge(load_patch(args.first), load_patch(args.second))
        save_patch(patch, args.out)
        console.print(f"merged patch of {patch.num_rows:,} rows written to {args.out}")
    elif command == "diff":
        patch = diff(args.base, args.other)
        save_patch(patch, args.out)
        console.print(f"{patch.num_rows:,} rows" + (f" and {len(patch.dense)} dense tensors" if patch.dense else "")
                      + f" differ: patch written to {args.out}")
    else:
        summary = _summary(load_patch(args.patch), args.patch)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            for key, item in summary.items():
                console.print(f"[bold]{key}[/bold]: {item}")
    return 0
