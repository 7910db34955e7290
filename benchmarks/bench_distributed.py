"""Sharded Engram training over GPUs (NCCL): throughput per GPU, all-to-all time share, bytes moved per step.

One process per GPU. A plain ``python`` launch is the single-GPU reference (whole tables on the GPU, no
exchange); under ``torchrun`` every Engram table is row-sharded over the ranks (``engram.parallel``), the rest
replicated under DDP, exactly as ``torchrun -m engram train`` trains. Each rank trains ``--batch-per-gpu``
sequences per step (weak scaling: the global batch grows with the GPUs) on real token windows of a prepared
corpus, with the trainer's objective, optimiser and bf16 autocast.

    python benchmarks/bench_distributed.py run --data CORPUS --label 1-gpu --out bench.jsonl
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py run --data CORPUS --label 2-gpu --out bench.jsonl
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py run --data CORPUS --engram-vocab 16000000 ...
    python benchmarks/bench_distributed.py report bench.jsonl --curves 1-gpu=RUN1 2-gpu=RUN2 --out results.md

``--engram-vocab N`` starts every order's prime search at N instead of the preset's (tables of about
``heads x N`` rows a layer): the tables are then built on the meta device and each rank draws only its own rows
(``shard_engram_tables(..., device=)``), so no process ever holds a whole table. A run that does not fit is
recorded as out of memory, not dropped.

Timing: ``--steps`` steps after ``--warmup``, each bracketed by ``torch.cuda.synchronize()`` (the step time is
the slowest rank's, as the ranks meet in every collective); then ``--exchange-steps`` more steps in which every
``all_to_all_single`` call is also bracketed by synchronisations and timed: its share of those steps' time is the
all-to-all share (the brackets remove overlap, so that share is an upper bound). Bytes: what each rank handed to
the table exchange (``ShardedMultiHeadEmbedding.traffic``: ids and rows forward, row gradients backward, the
``1/W`` it addresses to itself included) and the payload DDP all-reduces (the replicated fp32 gradients).
``report`` writes the table and, from two ``engram train`` run folders of the same global batch, the loss curves
(``metrics.jsonl``) side by side with their largest difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engram.data.batches import TokenBatches
from engram.data.corpus import load_or_prepare
from engram.model import EngramLM
from engram.parallel import finish_distributed, init_distributed, local_rows, shard_engram_tables, wrap_ddp
from engram.train.optim import EngramOptimizer, OptimConfig, enable_sparse_tables
from engram.train.trainer import TrainConfig, lm_loss, model_config_for, optimizer_step, rank_objective


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExchangeTimer:
    """Times every ``torch.distributed.all_to_all_single`` while active, synchronising before and after each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds, self.calls, self._original = 0.0, 0, dist.all_to_all_single

    def __enter__(self) -> "ExchangeTimer":
        def timed(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            result = self._original(*args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return result

        dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._original


def build(args: argparse.Namespace, ctx, device: torch.device):
    corpus = load_or_prepare(args.data, progress=False)
    cfg = model_config_for(TrainConfig(preset=args.preset, data=[args.data], seq_len=args.seq_len), corpus)
    if args.engram_vocab:
        orders = cfg.engram.max_ngram_size - 1
        cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, engram_vocab_size=[args.engram_vocab] * orders))
    torch.manual_seed(0)
    if ctx.enabled:
        model = EngramLM(cfg, table_device="meta" if args.engram_vocab else "cpu")
        enable_sparse_tables(model)
        shard_engram_tables(model, device=device)
    else:
        model = EngramLM(cfg, table_device=device)
        enable_sparse_tables(model)
    model.to(device)
    return corpus, cfg, model


def table_modules(model: torch.nn.Module) -> list:
    return [b.engram.multi_head_embedding for b in model.blocks if b.engram is not None]


def run(args: argparse.Namespace) -> None:
    ctx, device = init_distributed(args.device)
    world = ctx.world_size
    record = {"label": args.label, "world": world, "preset": args.preset, "batch_per_gpu": args.batch_per_gpu,
              "seq_len": args.seq_len, "engram_vocab": args.engram_vocab,
              "command": (f"torchrun --nproc_per_node={world} " if ctx.enabled else "python ") + " ".join(sys.argv),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        record.update(measure(args, ctx, device))
    except torch.OutOfMemoryError as err:  # recorded: a table too large for this many GPUs is a result
        record["oom"] = str(err).splitlines()[0]
    if ctx.enabled:
        records = [None] * world
        dist.all_gather_object(records, record)
    else:
        records = [record]
    if ctx.is_main:
        summary = summarise(records)
        print(json.dumps(summary, indent=1))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(summary) + "\n")
    finish_distributed()


def measure(args: argparse.Namespace, ctx, device: torch.device) -> dict:
    corpus, _, model = build(args, ctx, device)
    tables = table_modules(model)
    global_batch = args.batch_per_gpu * ctx.world_size
    rows = local_rows(global_batch, ctx)
    batches = TokenBatches(corpus.tokens("train"), global_batch, args.seq_len, seed=0)
    optimizer = EngramOptimizer(model, OptimConfig(lr=args.lr, warmup_steps=args.warmup))
    forward = wrap_ddp(model, ctx, device)
    batch_tokens = global_batch * args.seq_len
    share = (rows.stop - rows.start) / global_batch
    total = args.warmup + args.steps + args.exchange_steps

    def step(index: int) -> float:
        inputs, targets = batches.batch(index)
        inputs, targets = inputs[rows].to(device), targets[rows].to(device)
        optimizer.set_lr(index, total)
        loss, aux = lm_loss(forward, inputs, targets, autocast=device.type == "cuda", reduction="sum")
        rank_objective(loss, aux, batch_tokens, share).backward()
        optimizer_step(model, optimizer, ctx)
        return float(loss.detach())

    def timed_step(index: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        step(index)
        synchronize(device)
        return time.perf_counter() - start

    for index in range(args.warmup):
        step(index)
    synchronize(device)
    before = [dict(t.traffic) for t in tables] if ctx.enabled else []
    times = [timed_step(args.warmup + i) for i in range(args.steps)]
    traffic = {key: sum(t.traffic[key] - b[key] for t, b in zip(tables, before)) / args.steps
               for key in ("rows_requested", "rows_sent", "bytes_sent")} if ctx.enabled else {}
    exchange_times = []
    with ExchangeTimer(device) as timer:
        for i in range(args.exchange_steps):
            exchange_times.append(timed_step(args.warmup + args.steps + i))
    profile = profile_steps(timed_step, args.warmup + args.steps + args.exchange_steps, args.profile_steps, device)
    replicated = [p for n, p in model.named_parameters() if p.requires_grad and "multi_head_embedding" not in n]
    return {
        "step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
        "local_tokens": (rows.stop - rows.start) * args.seq_len, "global_tokens": batch_tokens,
        "exchange_step_s": sum(exchange_times), "exchange_s": timer.seconds, "exchange_calls": timer.calls,
        "exchange_steps": args.exchange_steps, **{f"{k}_per_step": v for k, v in traffic.items()},
        "allreduce_bytes_per_step": sum(p.numel() * 4 for p in replicated) if ctx.enabled else 0,
        "table_rows_total": sum(t.num_rows for t in tables),
        # the rows here and their two Adam moments
        "table_state_gb_here": 3 * sum(t.weight.numel() * t.weight.element_size() for t in tables) / 1e9,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0,
        **profile,
    }


def kernel_category(name: str) -> str:
    if name.startswith("ncclDevKernel_AllReduce") or name.startswith("ncclKernel_AllReduce"):
        return "allreduce"
    if "SendRecv" in name or "AllToAll" in name:
        return "all_to_all"
    return "other"


def profile_steps(timed_step, first: int, steps: int, device: torch.device) -> dict:
    """GPU kernel time per step by kind (NCCL all-reduce, NCCL send/recv = all_to_all, everything else) over
    ``steps`` profiled steps, and their wall time; kernels of different streams may overlap, so the kinds'
    sum can exceed the wall time while the GPU is busy, and ``1 - sum / wall`` bounds its idle share from below."""
    if steps < 1 or device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = sum(timed_step(first + i) for i in range(steps))
    kernels = {"allreduce": 0.0, "all_to_all": 0.0, "other": 0.0}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[kernel_category(event.key)] += event.self_device_time_total / 1e6
    return {"profile_wall_s_per_step": wall / steps, **{f"profile_{k}_s_per_step": v / steps for k, v in kernels.items()}}


def summarise(records: list[dict]) -> dict:
    """One line per launch: the ranks' figures reduced (slowest step, mean traffic) and kept per rank."""
    first = {k: v for k, v in records[0].items() if k in ("label", "world", "preset", "batch_per_gpu", "seq_len",
                                                           "engram_vocab", "command", "gpu", "torch", "python",
                                                           "date")}
    ooms = [r.get("oom") for r in records if r.get("oom")]
    if ooms:
        return {**first, "oom": ooms[0]}
    step = max(r["step_s"] for r in records)
    tokens = sum(r["local_tokens"] for r in records)
    out = {**first, "step_s": step, "tokens_per_s": tokens / step, "tokens_per_s_per_gpu": tokens / step / len(records),
           "exchange_share": max(r["exchange_s"] / r["exchange_step_s"] for r in records),
           "exchange_calls_per_step": records[0]["exchange_calls"] / records[0]["exchange_steps"],
           "table_rows_total": records[0]["table_rows_total"],
           "table_state_gb_per_gpu": max(r["table_state_gb_here"] for r in records),
           "peak_gb_per_gpu": max(r["peak_gb"] for r in records),
           "allreduce_bytes_per_step": records[0]["allreduce_bytes_per_step"], "ranks": records}
    if "profile_wall_s_per_step" in records[0]:
        out.update({k: statistics.mean(r[k] for r in records) for k in records[0] if k.startswith("profile_")})
    if "bytes_sent_per_step" in records[0]:
        out["exchange_bytes_per_step_per_gpu"] = statistics.mean(r["bytes_sent_per_step"] for r in records)
        out["dedup_ratio"] = (sum(r["rows_sent_per_step"] for r in records)
                              / sum(r["rows_requested_per_step"] for r in records))
    return out


def read_curve(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    one = next((r for r in rows if r["world"] == 1 and "oom" not in r and not r["engram_vocab"]), None)
    lines = [f"Machine: {rows[0]['gpu']} x {max(r['world'] for r in rows)}, torch {rows[0]['torch']}, "
             f"Python {rows[0]['python']}; {rows[0]['date']}.", "",
             "| run | GPUs | table rows (state per GPU) | tokens/s per GPU | scaling efficiency | all-to-all share "
             "| exchange bytes/step per GPU | rows sent / read | DDP all-reduce payload | peak mem per GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "oom" in r:
            lines.append(f"| {r['label']} | {r['world']} | {r['engram_vocab'] or 'preset'} per order | out of memory: "
                         f"{r['oom'][:90]} | | | | | | |")
            continue
        efficiency = (f"{r['tokens_per_s_per_gpu'] / one['tokens_per_s_per_gpu']:.1%}"
                      if one and r["world"] > 1 else "-")
        cells = [r["label"], str(r["world"]),
                 f"{r['table_rows_total'] / 1e6:,.1f}M ({r['table_state_gb_per_gpu']:.1f} GB)",
                 f"{r['tokens_per_s_per_gpu']:,.0f}", efficiency, "-", "-", "-"]
        if "exchange_bytes_per_step_per_gpu" in r:
            cells[5:8] = [f"{r['exchange_share']:.1%}", f"{r['exchange_bytes_per_step_per_gpu'] / 1e6:,.1f} MB",
                          f"{r['dedup_ratio']:.2f}"]
        cells += [f"{r['allreduce_bytes_per_step'] / 1e6:,.1f} MB", f"{r['peak_gb_per_gpu']:.1f} GB"]
        lines.append("| " + " | ".join(cells) + " |")
    profiled = [r for r in rows if "profile_wall_s_per_step" in r]
    if profiled:
        lines += ["", "GPU kernel time per step under torch.profiler (mean over ranks; streams may overlap):", "",
                  "| run | wall | NCCL all-reduce | NCCL send/recv (all_to_all) | other kernels | GPU idle (at least) |",
                  "|---|---|---|---|---|---|"]
        for r in profiled:
            wall = r["profile_wall_s_per_step"]
            kinds = [r[f"profile_{k}_s_per_step"] for k in ("allreduce", "all_to_all", "other")]
            lines.append(f"| {r['label']} | {wall * 1e3:.1f} ms | " + " | ".join(
                f"{k * 1e3:.1f} ms ({k / wall:.0%})" for k in kinds) + f" | {max(0.0, 1 - sum(kinds) / wall):.0%} |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    if args.curves:
        lines += ["", *compare_curves(dict(c.split("=", 1) for c in args.curves), args.plot)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def compare_curves(runs: dict[str, str], plot: str | None) -> list[str]:
    """The first run against each other one: largest and mean |loss difference| over the common logged steps,
    validation losses, and the median training tokens/s (``engram train``'s logged windows) of each."""
    curves = {name: read_curve(Path(path)) for name, path in runs.items()}
    (ref, ref_curve), others = next(iter(curves.items())), list(curves.items())[1:]
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    lines = [f"Loss curves of the same global batch, against {ref}, over {len(steps)} logged steps:", "",
             "| run | largest loss difference (step) | mean difference | validation losses | median tokens/s |",
             "|---|---|---|---|---|"]
    for name, curve in curves.items():
        diffs = [curve[s]["loss"] - ref_curve[s]["loss"] for s in steps]
        worst = max(range(len(steps)), key=lambda i: abs(diffs[i]))
        val = ", ".join(f"{curve[s]['val_loss']:.4f} (step {s})" for s in steps if "val_loss" in curve[s])
        speed = statistics.median(curve[s]["tokens_per_s"] for s in steps[1:])
        lines.append(f"| {name} | {diffs[worst]:+.4f} ({steps[worst]}) | {statistics.mean(map(abs, diffs)):.4f} "
                     f"| {val} | {speed:,.0f} |" if name != ref else f"| {name} | - | - | {val} | {speed:,.0f} |")
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1.3])
        for i, (name, curve) in enumerate(curves.items()):
            top.plot(steps, [curve[s]["loss"] for s in steps], label=name, color=f"C{i}")
        top.set_ylabel("training loss (nats/token)")
        top.legend()
        for i, (name, curve) in enumerate(others, start=1):
            bottom.plot(steps, [curve[s]["loss"] - ref_curve[s]["loss"] for s in steps], label=f"{name} - {ref}",
                        color=f"C{i}")
        bottom.axhline(0, color="grey", lw=0.5)
        bottom.set_ylabel("difference")
        bottom.set_xlabel("step")
        bottom.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        lines += ["", f"Plot: {Path(plot).name}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="measure one launch (plain python: 1 GPU; torchrun: one rank per GPU)")
    p.add_argument("--data", required=True, help="a prepared corpus folder (engram data prepare)")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-per-gpu", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--engram-vocab", type=int, default=0, help="prime search start per order (0: the preset's)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--exchange-steps", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=0, help="then this many steps under torch.profiler")
    p.add_argument("--label", default="run")
    p.add_argument("--device", default="cuda", help="cuda (one GPU per rank, NCCL) or cpu (gloo: a dry run)")
    p.add_argument("--out", help="append the summary line to this JSONL file")
    r = sub.add_parser("report", help="a markdown table of run lines, and two training runs' loss curves")
    r.add_argument("results")
    r.add_argument("--curves", nargs="+", metavar="NAME=RUN_FOLDER", help="the first is the reference")
    r.add_argument("--plot", help="PNG of the two loss curves")
    r.add_argument("--out")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
