"""The LM loss without the logits against the plain path (GPU): time and peak memory of forward + backward.

``plain`` is ``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` (the full ``[N, V]`` logits);
``chunked-C`` is ``engram.model.loss.linear_cross_entropy`` with ``C`` tokens per chunk (``default``: the
library's default for this vocabulary). Both run under bf16 autocast on fp32 ``hidden`` ``[N, D]`` and an fp32
weight ``[V, D]`` (a tied embedding's shape), eager and under ``torch.compile``. Peak memory is counted above
the inputs and their gradients.

    python benchmarks/bench_loss.py --tokens 16384 --d-model 512 --vocab 129280 --chunks 256 512 1024 2048 4096
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

from engram.model.loss import default_chunk_size, linear_cross_entropy, linear_cross_entropy_reference


def measure(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, steps: int,
            warmup: int) -> dict[str, float]:
    """Median milliseconds of forward + backward and the peak GB allocated above the inputs."""
    times = []
    for index in range(warmup + steps):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(hidden, weight, targets)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return {"ms": statistics.median(times), "peak_gb": peak, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--chunks", nargs="+", default=["default"], help="tokens per chunk, or 'default'")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_loss.py needs a CUDA GPU")
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, device="cuda", generator=generator).requires_grad_()
    weight = (0.02 * torch.randn(args.vocab, args.d_model, device="cuda", generator=generator)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=generator)
    variants = {"plain": linear_cross_entropy_reference}
    for chunk in args.chunks:
        size = default_chunk_size(args.vocab) if chunk == "default" else int(chunk)
        variants[f"chunked-{size}" + (" (default)" if chunk == "default" else "")] = functools.partial(
            linear_cross_entropy, chunk_size=size)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; N {args.tokens}, D {args.d_model}, "
          f"V {args.vocab}, bf16 autocast, forward + backward\n")
    print("| loss | compiled | ms | peak GB above inputs | loss value |\n|---|---|---|---|---|")
    for name, fn in variants.items():
        for compiled in (False, True):
            torch._dynamo.reset()
            run = torch.compile(fn, fullgraph=True) if compiled else fn
            result = measure(run, hidden, weight, targets, args.steps, args.warmup)
            print(f"| {name} | {'yes' if compiled else 'no'} | {result['ms']:.2f} | {result['peak_gb']:.2f} | "
                  f"{result['loss']:.5f} |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
