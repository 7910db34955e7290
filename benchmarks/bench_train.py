"""Training throughput of EngramLM against a minimal compiled GPT of the same dense shape (GPU).

Every variant runs full optimiser steps on random token ids (bf16 autocast, fresh ids every step), timed with
CUDA events after warm-up, one variant after the other in this process, so every row of the table is measured
on the same card in the same call. The reference is an independent minimal GPT written in this file (RMSNorm,
RoPE, grouped-query SDPA, SwiGLU, tied embedding, plain cross-entropy on the logits, fused AdamW) and compiled
with ``torch.compile``; the project's models train through the trainer's own loss (``lm_loss``) and optimiser
step (``optimizer_step``: clipping, AdamW + sparse Adam for the tables, router-bias update).

Variants (from the ``small`` preset: d_model 512, 8 blocks, GQA 8/4 heads of 64, 129,280-id tied embedding):
``reference`` (the minimal GPT), ``dense`` (EngramLM with the reference's shape: SwiGLU 1536 in every block,
``hc_mult=1``, no Engram), ``dense-hc4`` (the same with 4 mHC streams, carried in bf16),
``dense-hc4-fp32`` (the streams in fp32, ``hc_stream_dtype="float32"``), ``small-no-engram`` (the preset without
Engram) and ``small``. MFU = 3 x forward FLOPs per token (``param_report``; the reference counts as ``dense``) x
tokens/s over the peak bf16 rate named in the output.

    python benchmarks/bench_train.py --batch-size 16 --seq-len 1024 --out benchmarks/results/bench_train.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from engram.model import EngramLM, EngramLMConfig
from engram.model.params import param_report
from engram.parallel import DistContext
from engram.train.optim import EngramOptimizer, OptimConfig, enable_sparse_tables
from engram.train.trainer import COMPILE_MODES, lm_loss, optimizer_step

DATASHEET_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16 (the device notes measured ~790e12 on a matmul)
VARIANTS = ("reference", "dense", "dense-hc4", "dense-hc4-fp32", "small-no-engram", "small")


class _RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, d, bias=False)
        self.up = nn.Linear(d, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = _rope(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = _rope(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class ReferenceGPT(nn.Module):
    """The minimal GPT every row is compared with: ids ``[B, T]`` and targets ``[B, T]`` -> mean loss."""

    def __init__(self, cfg: EngramLMConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(_RefBlock(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                              cfg.dense_ffn_dim) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.max_position_embeddings).float(), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_std)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.cos[:t], self.sin[:t])
        logits = F.linear(self.norm(x), self.embed.weight)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def variant_config(name: str, seq_len: int) -> EngramLMConfig:
    """The model config of a variant (``reference`` uses the ``dense`` shape)."""
    small = EngramLMConfig.from_preset("small", max_position_embeddings=max(seq_len, 1024))
    dense = dataclasses.replace(small, moe=None, ffn_kinds=["dense"] * small.n_layers, hc_mult=1, engram=None)
    return {"reference": dense, "dense": dense, "dense-hc4": dataclasses.replace(dense, hc_mult=4),
            "dense-hc4-fp32": dataclasses.replace(dense, hc_mult=4, hc_stream_dtype="float32"),
            "small-no-engram": dataclasses.replace(small, engram=None), "small": small}[name]


def _reference_step(cfg: EngramLMConfig, device: torch.device, compile_model: bool
                    ) -> Callable[[torch.Tensor], float | torch.Tensor]:
    model = ReferenceGPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    loss_fn = torch.compile(model) if compile_model else model

    def step(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _engram_step(cfg: EngramLMConfig, device: torch.device, compile_model: bool, compile_mode: str = "default"
                 ) -> Callable[[torch.Tensor], float | torch.Tensor]:
    model = EngramLM(cfg)
    enable_sparse_tables(model)
    model.to(device)
    optimizer = EngramOptimizer(model, OptimConfig(lr=1e-3, warmup_steps=1))
    forward = torch.compile(model, mode=compile_mode) if compile_model else model

    def step(ids: torch.Tensor) -> torch.Tensor:
        loss, aux = lm_loss(forward, ids[:, :-1], ids[:, 1:], autocast=True)
        (loss if aux is None else loss + aux).backward()
        optimizer_step(model, optimizer, DistContext())
        return loss.detach()

    return step


def run_variant(name: str, batch: int, seq_len: int, steps: int, warmup: int, compile_model: bool,
                device: torch.device, profile_dir: str | None = None, compile_mode: str = "default") -> dict:
    """Time ``steps`` optimiser steps of variant ``name`` after ``warmup`` ones; peak memory from a fresh count."""
    cfg = variant_config(name, seq_len)
    graphs_before = counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    if name == "reference":
        step = _reference_step(cfg, device, compile_model)
    else:
        step = _engram_step(cfg, device, compile_model, compile_mode)
    limit = cfg.tokenizer_vocab_size or cfg.vocab_size
    generator = torch.Generator(device=device).manual_seed(1)
    times, losses = [], []
    started = time.perf_counter()
    warmup_s = 0.0
    for index in range(warmup + steps):
        ids = torch.randint(3, limit, (batch, seq_len + 1), device=device, generator=generator)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step(ids)
        end.record()
        torch.cuda.synchronize()
        if index == warmup - 1:
            warmup_s = time.perf_counter() - started
        if index >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
            losses.append(float(loss))
    if profile_dir:
        _profile(name, step, batch, seq_len, limit, device, profile_dir)
    report = param_report(cfg, seq_len)
    flops = report["flops_per_token"]
    step_s = statistics.median(times)
    tokens_per_s = batch * seq_len / step_s
    mode = compile_mode if name != "reference" else "default"
    return {"variant": name, "compiled": compile_model, "compile_mode": mode if compile_model else None,
            "step_s": step_s, "step_min_s": min(times),
            "step_max_s": max(times), "tokens_per_s": tokens_per_s, "flops_per_token": flops,
            "mfu": 3 * flops * tokens_per_s / DATASHEET_BF16_FLOPS, "loss_first": losses[0], "loss_last": losses[-1],
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "warmup_s": warmup_s,
            "params": report["total"], "graphs": counters["stats"]["unique_graphs"] - graphs_before}


def _profile(name: str, step: Callable, batch: int, seq_len: int, limit: int, device: torch.device,
             profile_dir: str) -> None:
    """Three profiled steps: the top CUDA kernels by total time into ``profile_dir/profile-<name>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(torch.randint(3, limit, (batch, seq_len + 1), device=device))
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    with open(f"{profile_dir}/profile-{name}.txt", "w") as f:
        f.write(table)


def render(results: list[dict], args: argparse.Namespace) -> str:
    """The markdown report: header, table with ratios to the reference, and the issue's derived goals."""
    by_name = {r["variant"]: r for r in results}
    ref = by_name.get("reference")
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, Python {platform.python_version()}",
             f"Command: `python {' '.join(sys.argv)}`",
             f"Batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps after {args.warmup} warm-up, "
             f"bf16 autocast; MFU against {DATASHEET_BF16_FLOPS / 1e12:.0f} TFLOP/s (bf16 datasheet).", "",
             "| variant | compile mode (graphs) | params | tokens/s | x ref | MFU | peak mem | x ref | step ms (min-max) |"
             " warm-up s | loss first→last |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        memory = f"{r['peak_mem_gb'] / ref['peak_mem_gb']:.2f}" if ref else "-"
        compiled = f"{r['compile_mode']} ({r['graphs']})" if r["compiled"] else "no"
        lines.append(f"| {r['variant']} | {compiled} | {r['params'] / 1e6:.1f}M | "
                     f"{r['tokens_per_s']:,.0f} | {speed} | {r['mfu']:.1%} | {r['peak_mem_gb']:.1f} GB | {memory} | "
                     f"{r['step_s'] * 1e3:.1f} ({r['step_min_s'] * 1e3:.1f}-{r['step_max_s'] * 1e3:.1f}) | "
                     f"{r['warmup_s']:.0f} | {r['loss_first']:.3f}→{r['loss_last']:.3f} |")
    lines.append("")
    for slower, faster, label in (("small", "small-no-engram", "Engram step-time overhead"),
                                  ("dense-hc4", "dense", "mHC (hc_mult 4 vs 1, bf16 streams) step-time overhead"),
                                  ("dense-hc4-fp32", "dense", "mHC (hc_mult 4 vs 1, fp32 streams) step-time overhead")):
        if slower in by_name and faster in by_name:
            overhead = by_name[slower]["step_s"] / by_name[faster]["step_s"] - 1
            lines.append(f"- {label}: {overhead:+.1%}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="run the project's models without torch.compile")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode of the project's models (reduce-overhead: CUDA graphs); the "
                             "reference always compiles with the default mode")
    parser.add_argument("--profile-dir", default=None, help="write 3 profiled steps of every variant here")
    parser.add_argument("--out", default=None, help="append the markdown report to this file")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    device = torch.device("cuda")
    results = []
    for name in args.variants:
        compiled = name == "reference" or not args.eager
        results.append(run_variant(name, args.batch_size, args.seq_len, args.steps, args.warmup, compiled, device,
                                   args.profile_dir, args.compile_mode))
        print(json.dumps(results[-1]), flush=True)
        torch.cuda.empty_cache()
    text = render(results, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}\n")


if __name__ == "__main__":
    main()
