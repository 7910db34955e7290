"""`engram demo`: the public demo's scenario with the real DeepSeek-V3 tokenizer, shown step by step.

A mocked backbone (embedding, 30 blocks whose attention and MoE are identities, LM head; hidden 1024,
4 hyper-connection branches, vocabulary 129,280) runs one sentence through Engram layers 1 and 15,
as ``engram_demo_v1.py`` does, and prints what every stage produced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.layer import Engram
from engram.tokenizer import CompressedTokenizer

DEMO_TEXT = "Only Alexander the Great could tame the horse Bucephalus."
PAPER_TABLE_START = 129280 * 5  # the demo's engram_vocab_size per order
DEFAULT_TABLE_START = 129280 // 10  # 50x smaller than the demo's tables: the default run stays light on a CPU
BOS_ID = 0  # <｜begin▁of▁sentence｜>, prepended as the DeepSeek-V3 tokenizer config does


@dataclass
class DemoBackbone:
    hidden_size: int = 1024
    hc_mult: int = 4
    vocab_size: int = 129280
    num_layers: int = 30


@dataclass
class DemoResult:
    input_ids: torch.Tensor  # [1, T] original ids
    compressed_ids: torch.Tensor  # [1, T]
    hash_ids: dict[int, torch.Tensor]  # layer -> [1, T, heads]
    gates: dict[int, torch.Tensor]  # layer -> [1, T, M]
    logits: torch.Tensor  # [1, T, vocab]
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(text: str = DEMO_TEXT, table_start: int = DEFAULT_TABLE_START, seed: int = 0,
             backbone: DemoBackbone | None = None, console: Console | None = None) -> DemoResult:
    """Run the demo scenario and print it; returns every intermediate for programmatic use."""
    backbone = backbone or DemoBackbone()
    console = console or Console()
    timings: dict[str, float] = {}
    start_all = time.perf_counter()

    start = time.perf_counter()
    compressed = CompressedTokenizer.from_tokenizer("deepseek-v3")
    timings["compressed tokenizer"] = time.perf_counter() - start
    _print_compression(console, compressed, timings["compressed tokenizer"])

    ids = [BOS_ID] + compressed.tokenizer.encode(text, add_special_tokens=False).ids
    input_ids = torch.tensor([ids], dtype=torch.long)
    compressed_ids = compressed(input_ids)
    _print_tokens(console, compressed, input_ids[0], compressed_ids[0])

    cfg = EngramConfig(engram_vocab_size=[table_start] * 2, layer_ids=[1, 15], seed=seed)
    start = time.perf_counter()
    hasher = NgramHasher(cfg, tokenizer=compressed)
    hash_ids = hasher.hash_all(input_ids)
    timings["hasher + hashing"] = time.perf_counter() - start
    _print_hashes(console, hasher, hash_ids)

    start = time.perf_counter()
    torch.manual_seed(seed)
    embed = nn.Embedding(backbone.vocab_size, backbone.hidden_size)
    engrams = {layer: Engram(cfg, layer, backbone.hidden_size, backbone.hc_mult, hasher=hasher)
               for layer in cfg.layer_ids}
    lm_head = nn.Linear(backbone.hidden_size, backbone.vocab_size)
    timings["build backbone"] = time.perf_counter() - start

    start = time.perf_counter()
    gates = {}
    with torch.no_grad():
        # Mocked hyper-connections: copy the embedding into every branch, read branch 0 at the end.
        hidden = embed(input_ids).unsqueeze(2).expand(-1, -1, backbone.hc_mult, -1)
        for layer_id in range(backbone.num_layers):
            if layer_id in engrams:
                delta, gates[layer_id] = engrams[layer_id](hidden, hash_ids=hash_ids[layer_id], return_gates=True)
                hidden = hidden + delta
            # attention and MoE are identities in the demo
        logits = lm_head(hidden[:, :, 0, :])
    timings["forward"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - start_all

    _print_gates(console, compressed, input_ids[0], gates)
    _print_shapes(console, cfg, input_ids, hash_ids, engrams, logits)
    _print_timings(console, timings, table_start)
    return DemoResult(input_ids, compressed_ids, hash_ids, gates, logits, timings)


def _token_text(compressed: CompressedTokenizer, token_id: int) -> str:
    return repr(compressed.tokenizer.decode([token_id], skip_special_tokens=False))


def _print_compression(console: Console, compressed: CompressedTokenizer, seconds: float) -> None:
    table = Table(title="1. Tokenizer compression (DeepSeek-V3, offline)")
    for column in ("original ids", "canonical ids", "reduction", "build / cache load"):
        table.add_column(column, justify="right")
    reduction = 1 - len(compressed) / compressed.original_vocab_size
    table.add_row(f"{compressed.original_vocab_size:,}", f"{len(compressed):,}", f"{reduction:.1%}", f"{seconds:.2f} s")
    console.print(table)


def _print_tokens(console: Console, compressed: CompressedTokenizer, ids: torch.Tensor,
                  compressed_ids: torch.Tensor) -> None:
    table = Table(title="2. Tokens and their canonical ids")
    for column in ("pos", "token", "id", "canonical id", "canonical key"):
        table.add_column(column, justify="right" if column != "token" else "left")
    for pos, (tid, cid) in enumerate(zip(ids.tolist(), compressed_ids.tolist())):
        table.add_row(str(pos), _token_text(compressed, tid), str(tid), str(cid), repr(compressed.canonical_key(tid)))
    console.print(table)


def _print_hashes(console: Console, hasher: NgramHasher, hash_ids: dict[int, torch.Tensor],
                  positions: int = 3) -> None:
    heads = hasher.cfg.n_head_per_ngram
    table = Table(title=f"3. Hash row ids, first {positions} positions (row inside each head's prime-sized table)")
    table.add_column("layer/pos/n")
    for head in range(heads):
        table.add_column(f"h{head}", justify="right")
    for layer_id, rows in hash_ids.items():
        for pos in range(min(positions, rows.shape[1])):
            for order_index in range(hasher.cfg.num_orders):
                cols = rows[0, pos, order_index * heads:(order_index + 1) * heads].tolist()
                table.add_row(f"L{layer_id} t{pos} n{order_index + 2}", *map(str, cols))
    console.print(table)
    sizes = ", ".join(f"layer {layer}: {hasher.table_sizes[layer][0][0]:,}..{hasher.table_sizes[layer][-1][-1]:,}"
                      for layer in hasher.cfg.layer_ids)
    console.print(f"   table sizes (primes): {sizes}; multipliers layer {hasher.cfg.layer_ids[0]}: "
                  f"{hasher.multipliers[hasher.cfg.layer_ids[0]]}")


def _gate_cell(value: float) -> str:
    colour = "green" if value >= 0.6 else "red" if value <= 0.4 else "yellow"
    return f"[{colour}]{value:.3f}[/{colour}]"


def _print_gates(console: Console, compressed: CompressedTokenizer, ids: torch.Tensor,
                 gates: dict[int, torch.Tensor]) -> None:
    branches = next(iter(gates.values())).shape[-1]
    table = Table(title="4. Gate alpha per token and branch (random init: the gate has learned nothing yet)")
    table.add_column("token")
    for layer_id in gates:
        for branch in range(branches):
            table.add_column(f"L{layer_id} b{branch}", justify="right")
    for pos, tid in enumerate(ids.tolist()):
        cells = [_gate_cell(float(gates[layer][0, pos, branch])) for layer in gates for branch in range(branches)]
        table.add_row(_token_text(compressed, tid), *cells)
    console.print(table)


def _print_shapes(console: Console, cfg: EngramConfig, input_ids: torch.Tensor, hash_ids: dict[int, torch.Tensor],
                  engrams: dict[int, Engram], logits: torch.Tensor) -> None:
    table = Table(title="5. Shapes")
    table.add_column("tensor")
    table.add_column("shape", justify="right")
    first = cfg.layer_ids[0]
    table.add_row("input_ids [B, T]", str(tuple(input_ids.shape)))
    table.add_row(f"hash ids, layer {first} [B, T, orders x heads]", str(tuple(hash_ids[first].shape)))
    memory = engrams[first].memory(hash_ids[first])
    table.add_row(f"memory e_t, layer {first} [B, T, orders x n_embed]", str(tuple(memory.shape)))
    table.add_row(f"table, layer {first} [rows, head_dim]", str(tuple(engrams[first].multi_head_embedding.weight.shape)))
    table.add_row("Engram output [B, T, M, D]", f"{tuple(input_ids.shape) + (engrams[first].hc_mult, engrams[first].hidden_size)}")
    table.add_row("logits [B, T, vocab]", str(tuple(logits.shape)))
    console.print(table)


def _print_timings(console: Console, timings: dict[str, float], table_start: int) -> None:
    table = Table(title="6. Wall time (CPU)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.2f}")
    console.print(table)
    if table_start != PAPER_TABLE_START:
        console.print(f"   tables start their prime search at {table_start:,} rows per head "
                      f"(the demo's {PAPER_TABLE_START:,}: pass --paper-size)")
    console.print("[bold green]Forward complete.[/bold green]")
