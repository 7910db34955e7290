"""Training throughput of a preset with and without Engram on the same backbone (GPU).

Each variant runs full optimiser steps (bf16 autocast, AdamW + sparse Adam for the tables, router-bias
update) on random token ids, timed with CUDA events after warm-up; both variants run in this process.
Model FLOPs utilisation = 3 x forward FLOPs per token (``param_report``) x tokens/s / peak bf16 rate.

    python benchmarks/bench_train.py --preset small --batch-size 32 --seq-len 1024 --out benchmarks/results/bench_train.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from engram.model import EngramLM, EngramLMConfig
from engram.parallel import DistContext
from engram.train.optim import EngramOptimizer, OptimConfig, enable_sparse_tables
from engram.train.trainer import optimizer_step

DATASHEET_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16
MEASURED_BF16_FLOPS = 790e12  # the device notes' matmul rate on random data, for reference


def run_variant(cfg: EngramLMConfig, batch: int, seq_len: int, steps: int, warmup: int, compile_model: bool,
                device: torch.device) -> dict:
    torch.manual_seed(0)
    model = EngramLM(cfg)
    enable_sparse_tables(model)
    model.to(device)
    optimizer = EngramOptimizer(model, OptimConfig(lr=1e-3, warmup_steps=1))
    forward = torch.compile(model) if compile_model else model
    limit = cfg.tokenizer_vocab_size or cfg.vocab_size
    generator = torch.Generator(device=device).manual_seed(1)
    times, losses = [], []
    for step in range(warmup + steps):
        ids = torch.randint(3, limit, (batch, seq_len + 1), device=device, generator=generator)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        optimizer.set_lr(step, warmup + steps)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer_step(model, optimizer, DistContext())
        end.record()
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
            losses.append(float(loss.detach()))
    report = model.param_report(seq_len)
    step_time = statistics.median(times)
    tokens_per_s = batch * seq_len / step_time
    del model, optimizer
    torch.cuda.empty_cache()
    return {"step_s": step_time, "step_s_spread": (min(times), max(times)), "tokens_per_s": tokens_per_s,
            "flops_per_token": report["flops_per_token"], "total": report["total"], "engram": report["engram"],
            "mfu": 3 * report["flops_per_token"] * tokens_per_s / DATASHEET_BF16_FLOPS,
            "loss_first_last": (losses[0], losses[-1]), "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    device = torch.device("cuda")
    with_engram = EngramLMConfig.from_preset(args.preset, max_position_embeddings=max(args.seq_len, 1024))
    variants = {"with Engram": with_engram, "without Engram (same backbone)": EngramLMConfig.from_dict(
        {**with_engram.to_dict(), "engram": None})}
    results = {}
    for name, cfg in variants.items():
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        results[name] = run_variant(cfg, args.batch_size, args.seq_len, args.steps, args.warmup, args.compile, device)
        results[name]["wall_s"] = time.perf_counter() - started
    base = results["without Engram (same backbone)"]["step_s"]
    overhead = results["with Engram"]["step_s"] / base - 1
    command = "python " + " ".join(sys.argv)
    header = (f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, Python {platform.python_version()}\n"
              f"Command: `{command}`\n"
              f"Preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps after "
              f"{args.warmup} warm-up, bf16 autocast, {'torch.compile' if args.compile else 'eager'}.\n")
    rows = ["| variant | params (tables) | step (median, min-max) | tokens/s | MFU (of 989 TF) | loss first→last | peak mem |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['total'] / 1e6:.1f}M ({r['engram'] / 1e6:.1f}M) | {r['step_s'] * 1e3:.1f} ms "
                    f"({r['step_s_spread'][0] * 1e3:.1f}-{r['step_s_spread'][1] * 1e3:.1f}) | {r['tokens_per_s']:,.0f} | "
                    f"{r['mfu']:.1%} | {r['loss_first_last'][0]:.3f}→{r['loss_first_last'][1]:.3f} | "
                    f"{r['peak_mem_gb']:.1f} GB |")
    verdict = "met" if overhead <= 0.05 else "MISSED"
    summary = f"\nEngram step-time overhead: {overhead:+.1%} (goal <= +5%: {verdict})\n"
    text = header + "\n" + "\n".join(rows) + "\n" + summary
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}\n")


if __name__ == "__main__":
    main()
