"""Decode speed: EngramLM's generate (the plain loop against the CUDA-graph decode step), transformers'
LlamaForCausalLM of the same dense shape as the peer, and the server under load (static against continuous batching).

Part ``generate`` (greedy, random weights, bf16 on a GPU, every prompt ``--prompt-len`` tokens, ``--new-tokens`` new
tokens each), one row per model, loop and batch size: new tokens/s and ms per decode step (the call's time over the
new tokens, prefill included, as issue 23 counts it), median of ``--repeats`` timed calls after one warm-up call (which
captures the graphs and compiles). Models: ``dense`` (the ``small`` preset's shape without MoE, mHC and Engram),
``small``, ``small-no-engram`` and ``small-host`` (its Engram tables in pinned host memory, read by the prefetch);
the eager loop runs for ``--eager-models`` only.
Loops: ``hf-eager`` (transformers' ``generate``, dynamic cache), ``hf-static`` (``cache_implementation="static"``,
which transformers compiles on CUDA), ``eager`` (``decode="eager"``), ``graph`` (``decode="graph"``; ``"static"``,
the same step op by op, off CUDA) and, when asked for, ``graph-compiled`` (the same step compiled by inductor before
its capture: a compilation per batch size). The ``match`` column gives the share of rows whose greedy tokens equal
the eager loop's (bf16 rounding may flip a near tie, after which a row diverges).

Part ``server``: an in-process :class:`engram.serve.engine.Engine` (no HTTP: no FastAPI needed) fed by
``--streams`` closed-loop clients, each sending its next request when the last one ends, ``--requests`` in all, of
mixed prompt lengths and ``max_tokens`` (greedy). Requests/s, new tokens/s, p50/p99 time to first text and p50/p99
time per token (first text to last, over the tokens after the first), for static batching (``decode="eager"``,
before issue 23) and continuous batching (``decode="auto"``), once per ``--join-every`` (how many decode steps the
running rows take between two joins of waiting requests: 1, at every step; the engine's default, 16).

    python benchmarks/bench_decode.py --out benchmarks/results/bench_decode.md --json benchmarks/results/decode.json
    python benchmarks/bench_decode.py --quick          # a CPU smoke run of every part on a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from engram.model import EngramLM, EngramLMConfig
from engram.model.config import MoEConfig
from engram.model.sampling import RowSampling
from engram.model.slots import SlotDecoder
from engram.serve.engine import Engine, GenerationRequest
from engram.storage import HostStore
from engram.tokenizer import load_tokenizer

MODELS = ("dense", "small", "small-no-engram", "small-host")
LOOPS = ("hf-eager", "hf-static", "eager", "graph", "graph-compiled")
DEFAULT_LOOPS = LOOPS[:4]  # graph-compiled compiles the step with inductor per batch size: minutes
SECTIONS = ("generate", "server")


def model_config(name: str, quick: bool) -> EngramLMConfig:
    """The config of ``name`` (see the module doc); ``quick``: the same structure at a tiny width."""
    base = EngramLMConfig.from_preset("tiny" if quick else "small")
    if quick:
        base = dataclasses.replace(base, moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_dim=32))
    if name == "dense":
        return dataclasses.replace(base, moe=None, ffn_kinds=["dense"] * base.n_layers, hc_mult=1, engram=None)
    return dataclasses.replace(base, engram=None) if name == "small-no-engram" else base


def build_model(name: str, device: torch.device, dtype: torch.dtype, quick: bool) -> EngramLM:
    torch.manual_seed(0)
    model = EngramLM(model_config(name, quick))
    if name == "small-host":
        for block in model.blocks:
            if block.engram is not None:
                table = block.engram.multi_head_embedding
                table.use_store(HostStore(table.weight.detach().to(dtype).contiguous()))
    return model.to(device, dtype).eval()


def hf_model(cfg: EngramLMConfig, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM with ``cfg``'s dense shape (tied embedding, SwiGLU, GQA, RoPE), random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.dense_ffn_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                         max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
                         rms_norm_eps=cfg.norm_eps)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the last output."""
    out = call()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = call()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def generate_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every (model, loop, batch) row of part ``generate``."""
    rows = []
    graph_loop = "graph" if device.type == "cuda" else "static"
    generator = torch.Generator().manual_seed(1)
    for name in args.models:
        model = build_model(name, device, dtype, args.quick)
        limit = model.cfg.tokenizer_vocab_size or model.cfg.vocab_size
        peer = None
        if name == "dense" and set(args.loops) & {"hf-eager", "hf-static"}:
            try:
                peer = hf_model(model.cfg, device, dtype)
            except ImportError as err:
                print(f"transformers is missing, no peer rows: {err}", flush=True)
        for batch in args.batch_sizes:
            prompts = torch.randint(3, limit, (batch, args.prompt_len), generator=generator).to(device)
            reference = None
            for loop in args.loops:
                row = {"model": name, "loop": loop, "batch": batch}
                if loop == "eager" and name not in args.eager_models:
                    continue
                if loop.startswith("hf-"):
                    if peer is None:
                        continue
                    if loop == "hf-static" and batch not in args.hf_static_batches:
                        continue
                    row.update(run_hf(peer, prompts, loop, args, device))
                else:
                    row.update(run_engram(model, prompts, loop, graph_loop, args, device))
                    if loop == "eager":
                        reference = row.get("tokens")
                    new = row.pop("tokens", None)
                    if new is not None and reference is not None:
                        row["match"] = (new == reference).all(dim=1).float().mean().item()
                if "seconds" in row:
                    row["tokens_per_s"] = batch * args.new_tokens / row["seconds"]
                    row["ms_per_step"] = 1e3 * row["seconds"] / args.new_tokens
                print(json.dumps(row), flush=True)
                rows.append(row)
        del model, peer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_engram(model: EngramLM, prompts: torch.Tensor, loop: str, graph_loop: str, args: argparse.Namespace,
               device: torch.device) -> dict:
    """One EngramLM row: seconds and the new tokens [B, new_tokens]; a loop that fails is reported, not fatal."""
    try:
        if loop == "graph-compiled":
            decode, call = "graph+inductor", compiled_step_loop(model, prompts, args.new_tokens, device)
        else:
            decode = graph_loop if loop == "graph" else "eager"
            call = functools.partial(model.generate, prompts, args.new_tokens, temperature=0, decode=decode)
        seconds, out = timed(call, args.repeats, device)
    except Exception as err:  # noqa: BLE001 - the other rows still run; the report names the failure
        return {"decode": loop, "note": f"failed: {type(err).__name__}: {str(err)[:200]}"}
    return {"seconds": seconds, "decode": decode, "tokens": out[:, args.prompt_len:]}


def compiled_step_loop(model: EngramLM, prompts: torch.Tensor, new_tokens: int,
                       device: torch.device) -> Callable[[], torch.Tensor]:
    """Greedy decoding of ``prompts`` by a SlotDecoder whose step is compiled by inductor (and CUDA-graph captured on
    a GPU): what ``generate(decode="graph")`` does, with kernels fused."""
    batch, length = prompts.shape
    decoder = SlotDecoder(model, batch, length + new_tokens, cuda_graphs=device.type == "cuda",
                          compile_backend="inductor")
    slots = list(range(batch))

    def call() -> torch.Tensor:
        decoder.admit(slots, prompts, None, [RowSampling(0.0)] * batch)
        out = []
        for _ in range(new_tokens):
            decoder.step()
            out.append(decoder.tokens[:batch].clone())
        decoder.release(slots)
        return torch.cat([prompts, torch.stack(out, dim=1)], dim=1)

    return call


def run_hf(peer, prompts: torch.Tensor, loop: str, args: argparse.Namespace, device: torch.device) -> dict:
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   attention_mask=torch.ones_like(prompts), pad_token_id=0)
    if loop == "hf-static":
        if device.type != "cuda":
            return {"note": "transformers compiles its static-cache generate on CUDA only"}
        options["cache_implementation"] = "static"
    try:
        seconds, _ = timed(lambda: peer.generate(prompts, **options), args.repeats, device)
    except Exception as err:  # noqa: BLE001 - a peer that fails on this transformers version is reported, not fatal
        return {"note": f"failed: {type(err).__name__}: {str(err)[:200]}"}
    return {"seconds": seconds}


def server_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Part ``server``: the same request stream through static and continuous batching."""
    model = build_model("small", device, dtype, args.quick)
    tokenizer = load_tokenizer(model.cfg.tokenizer)
    limit = model.cfg.tokenizer_vocab_size or model.cfg.vocab_size
    rng = np.random.default_rng(2)
    context = model.cfg.max_position_embeddings
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, size=args.requests)
    new_tokens = rng.integers(args.min_new, args.max_new + 1, size=args.requests)
    rows = []
    prompts = [rng.integers(3, limit, size=n - 1).tolist() for n in lengths]
    modes = [("static", "eager", 1)] + [("continuous", "auto", every) for every in args.join_every]
    for batching, decode, join_every in modes:
        row = {"batching": batching, "join_every": join_every if decode != "eager" else None, "streams": args.streams}
        try:
            with Engine(model, tokenizer, max_batch=args.streams, max_tokens_limit=context - 1, decode=decode,
                        join_every=join_every) as engine:
                requests = [GenerationRequest((engine.bos_id, *prompt), int(m), 0.0)
                            for prompt, m in zip(prompts, new_tokens)]
                engine.complete_many(requests[:args.streams])  # warm-up: graphs captured, kernels compiled
                row.update(drive(engine, requests, args.streams), decode=engine.decode)
        except Exception as err:  # noqa: BLE001 - the other batching mode still runs; the report names the failure
            row.update(decode=decode, note=f"failed: {type(err).__name__}: {str(err)[:200]}")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def drive(engine: Engine, requests: list[GenerationRequest], streams: int) -> dict:
    """Run ``requests`` through ``engine`` from ``streams`` closed-loop clients; latency statistics per request."""
    lock, done = threading.Lock(), threading.Event()
    upcoming = iter(enumerate(requests))
    records: dict[int, dict] = {}

    def send() -> None:
        with lock:
            index, request = next(upcoming, (None, None))
        if index is None:
            return
        record = records[index] = {"submitted": time.perf_counter(), "first": None}

        def on_event(event) -> None:
            now = time.perf_counter()
            if record["first"] is None and (event.text or event.finish_reason):
                record["first"] = now
            if event.finish_reason is not None:
                record.update(end=now, tokens=event.completion_tokens, reason=event.finish_reason)
                if len([r for r in records.values() if "end" in r]) == len(requests):
                    done.set()
                send()

        engine.submit(request, on_event)

    started = time.perf_counter()
    for _ in range(streams):
        send()
    done.wait()
    elapsed = time.perf_counter() - started
    first = sorted(r["first"] - r["submitted"] for r in records.values())
    per_token = sorted((r["end"] - r["first"]) / (r["tokens"] - 1) for r in records.values() if r["tokens"] > 1)
    tokens = sum(r["tokens"] for r in records.values())
    return {"requests": len(requests), "seconds": elapsed, "requests_per_s": len(requests) / elapsed,
            "tokens_per_s": tokens / elapsed, "ttft_p50_s": percentile(first, 50), "ttft_p99_s": percentile(first, 99),
            "per_token_p50_s": percentile(per_token, 50), "per_token_p99_s": percentile(per_token, 99),
            "errors": sum(r["reason"] == "error" for r in records.values())}


def percentile(ordered: list[float], q: float) -> float:
    return float(np.percentile(ordered, q)) if ordered else float("nan")


def render(results: dict, args: argparse.Namespace, device: torch.device) -> str:
    """The markdown report: setup, the generate table with ratios, the server table."""
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    lines = [f"Device: {card}, torch {torch.__version__}, Python {platform.python_version()}",
             f"Command: `python {' '.join(sys.argv)}`", ""]
    generate = results.get("generate", [])
    if generate:
        lines += [f"Greedy generate, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, {args.dtype}; "
                  f"median of {args.repeats} after a warm-up call. x eager: speed over the same model's eager loop; "
                  "x hf, x hf-static: over transformers' generate of the dense shape at that batch (eager; static "
                  "cache, compiled).", "",
                  "| model | loop | batch | new tokens/s | ms per step | x eager | x hf | x hf-static | match |",
                  "|---|---|---|---|---|---|---|---|---|"]
        timed_rows = {(r["model"], r["loop"], r["batch"]): r for r in generate if "seconds" in r}

        def ratio(row: dict, key: tuple) -> str:
            other = timed_rows.get(key)
            return f"{other['seconds'] / row['seconds']:.2f}" if other and other is not row else "-"

        for r in generate:
            if "seconds" not in r:
                lines.append(f"| {r['model']} | {r['loop']} | {r['batch']} | - | - | - | - | - | {r.get('note', '')} |")
                continue
            own = ratio(r, (r["model"], "eager", r["batch"])) if not r["loop"].startswith("hf") else "-"
            match = f"{r['match']:.0%}" if r.get("match") is not None else "-"
            lines.append(f"| {r['model']} | {r['loop']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['ms_per_step']:.2f} | {own} | {ratio(r, ('dense', 'hf-eager', r['batch']))} | "
                         f"{ratio(r, ('dense', 'hf-static', r['batch']))} | {match} |")
        lines.append("")
        for slower, faster, label in (("small", "small-no-engram", "Engram's decode overhead"),
                                      ("small-host", "small", "tables in host memory against HBM")):
            for batch in args.batch_sizes:
                pair = [timed_rows.get((name, "graph", batch)) for name in (slower, faster)]
                if all(pair):
                    lines.append(f"- {label} (graph loop, batch {batch}): "
                                 f"{pair[0]['seconds'] / pair[1]['seconds'] - 1:+.1%}")
        lines.append("")
    server = results.get("server", [])
    if server:
        lines += [f"Server (in-process engine, `small`): {args.requests} greedy requests from {args.streams} "
                  f"closed-loop streams, prompts {args.min_prompt}-{args.max_prompt} tokens, "
                  f"{args.min_new}-{args.max_new} new tokens.", "",
                  "| batching | join every | decode | requests/s | new tokens/s | TTFT p50 | TTFT p99 | "
                  "per token p50 | per token p99 | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in server:
            joins = f"{r['join_every']} steps" if r.get("join_every") else "-"
            if "note" in r:
                lines.append(f"| {r['batching']} | {joins} | {r['decode']} | {r['note']} |  |  |  |  |  |  |")
                continue
            lines.append(f"| {r['batching']} | {joins} | {r['decode']} | {r['requests_per_s']:.2f} | "
                         f"{r['tokens_per_s']:,.0f} | "
                         f"{1e3 * r['ttft_p50_s']:.0f} ms | {1e3 * r['ttft_p99_s']:.0f} ms | "
                         f"{1e3 * r['per_token_p50_s']:.1f} ms | {1e3 * r['per_token_p99_s']:.1f} ms | {r['errors']} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--loops", nargs="+", default=list(DEFAULT_LOOPS), choices=LOOPS)
    parser.add_argument("--eager-models", nargs="+", default=["dense", "small"], choices=MODELS,
                        help="models timed with the eager loop too (the others: graph only, to save minutes)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--hf-static-batches", nargs="+", type=int, default=[64],
                        help="batch sizes of the hf-static rows (each compiles on its own)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--streams", type=int, default=64, help="server: concurrent clients (and max_batch)")
    parser.add_argument("--requests", type=int, default=192, help="server: requests in all")
    parser.add_argument("--join-every", nargs="+", type=int, default=[1, 16],
                        help="server: the continuous-batching rows, one per Engine(join_every=...) value")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run on the CPU: tiny models, batch 2, short prompts, 2 streams")
    parser.add_argument("--out", default=None, help="append the markdown report to this file")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.eager_models = list(MODELS)
        args.batch_sizes, args.hf_static_batches, args.prompt_len, args.new_tokens, args.repeats = [2], [2], 6, 3, 1
        args.streams, args.requests, args.min_prompt, args.max_prompt, args.min_new, args.max_new = 2, 3, 4, 10, 2, 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.quick:
        sys.exit("bench_decode.py measures a CUDA GPU; --quick runs the CPU smoke test")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.dtype = str(dtype).removeprefix("torch.")
    results = {}
    if "generate" in args.sections:
        results["generate"] = generate_rows(args, device, dtype)
    if "server" in args.sections:
        results["server"] = server_rows(args, device, dtype)
    text = render(results, args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
