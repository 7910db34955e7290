"""Engram's GPU kernels against the eager torch reference and the hardware floor (one command, one table).

Ceilings are measured in the same run: a device-to-device copy (bytes read + written per second) and a
bf16 GEMM (8192^3). Each piece's floor is max(bytes / copy rate, FLOPs / GEMM rate), with these counts
per token (N tokens, L layers, H = orders x heads rows of d dims, E = H * d, D hidden, M branches, s = dtype size):
- hash (L layers): read the raw id (8 B) and write L * H row ids (8 B each); the compression lookup and
  the multipliers stay in cache. No FLOPs worth counting.
- gather forward: read H rows (H * d * s) + write E * s; backward: read E * s of gradient, write the
  coalesced row gradients (<= H * d * 4 B fp32 values + 8 B per row id), plus the sort of H row ids.
- gate forward: read keys M * D * s, hidden M * D * s, value D * s; write gated M * D * s and M gates (4 B);
  backward reads those again plus grad_gated and writes four gradients of the same sizes.
- layer forward + backward: the key/value GEMM E x (1 + M) D dominates FLOPs: 2 * E * (1 + M) * D per
  token forward, twice that backward; bytes: hidden in and delta out (M * D * s each way, forward and
  backward), the gathered rows, and the activations the gate and ShortConv save.
Speed-ups are over the eager path (the same ops with every kernel switched off) and, for hashing, over
the NumPy implementation of the demo. Usage:

    python benchmarks/bench_kernels.py --json $OUT/bench_kernels.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

from engram import Engram, EngramConfig, NgramHasher
from engram.kernels.dispatch import naive_kernels
from engram.kernels.gate.op import fused_gate
from engram.kernels.gather.op import multi_head_gather


def bench(fn, warmup: int = 5, rep: int = 20) -> float:
    """Median milliseconds of ``fn`` timed with CUDA events."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ceilings() -> dict[str, float]:
    src = torch.randn(512 * 1024 * 1024 // 4, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy = 2 * src.numel() * 4 / (ms / 1e3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    gemm = 2 * 8192**3 / (ms / 1e3)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy, "bf16_flops_per_s": gemm}


def numpy_demo_hash(hasher: NgramHasher, raw: np.ndarray) -> None:
    x = hasher.tokenizer.lookup[raw]
    length = x.shape[1]
    for layer_id in hasher.cfg.layer_ids:
        mult = np.asarray(hasher.multipliers[layer_id], dtype=np.int64)
        shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=hasher.pad_id)[:, :length]
                        for k in range(1, hasher.cfg.max_ngram_size)]
        for n in range(2, hasher.cfg.max_ngram_size + 1):
            mix = shifts[0] * mult[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * mult[k])
            for p in hasher.table_sizes[layer_id][n - 2]:
                _ = mix % p


CHECKS: list[tuple[str, float]] = []


def check(name: str, fused: torch.Tensor, reference: torch.Tensor) -> None:
    """Record ||fused - reference|| / ||reference|| (fp64) for the table printed at the end."""
    fused, reference = fused.to_dense().double(), reference.to_dense().double()
    CHECKS.append((name, float((fused - reference).norm() / reference.norm().clamp_min(1e-30))))


def row(piece: str, shape: str, variant: str, ms: float, nbytes: float, flops: float, ceil: dict[str, float],
        reference_ms: float | None = None) -> dict:
    floor_ms = max(nbytes / ceil["copy_bytes_per_s"], flops / ceil["bf16_flops_per_s"]) * 1e3
    return {"piece": piece, "shape": shape, "variant": variant, "ms": ms, "GB/s": nbytes / (ms / 1e3) / 1e9,
            "TFLOP/s": flops / (ms / 1e3) / 1e12, "floor_ms": floor_ms, "x_floor": ms / floor_ms,
            "speedup_vs_eager": (reference_ms / ms) if reference_ms else None}


def bench_hash(ceil: dict[str, float], batch: int, length: int) -> list[dict]:
    hasher = NgramHasher(EngramConfig())
    raw = np.random.default_rng(0).integers(0, hasher.tokenizer.original_vocab_size, size=(batch, length))
    ids = torch.from_numpy(raw).cuda()
    tokens = batch * length
    heads = hasher.cfg.num_heads * len(hasher.cfg.layer_ids)
    nbytes = tokens * (8 + heads * 8)
    with naive_kernels():
        eager = bench(lambda: hasher.hash_all(ids))
    fused = bench(lambda: hasher.hash_all(ids))
    with naive_kernels():
        reference = hasher.hash_all(ids)
    result = hasher.hash_all(ids)
    assert all(torch.equal(result[k], reference[k]) for k in reference), "hash kernel disagrees with torch"
    start = time.perf_counter()
    numpy_demo_hash(hasher, raw)
    numpy_ms = (time.perf_counter() - start) * 1e3
    shape = f"{batch}x{length} tokens, 2 layers x 16 heads"
    rows = [row("hash", shape, "NumPy (demo's way)", numpy_ms, nbytes, 0, ceil),
            row("hash", shape, "torch ops", eager, nbytes, 0, ceil),
            row("hash", shape, "Triton", fused, nbytes, 0, ceil, reference_ms=eager)]
    rows[-1]["speedup_vs_numpy"] = numpy_ms / fused
    return rows


def bench_layer(ceil: dict[str, float], name: str, hidden: int, n_embed: int, tokens: int, branches: int = 4,
                dtype=torch.bfloat16, profile: bool = False) -> list[dict]:
    cfg = EngramConfig(n_embed_per_ngram=n_embed, layer_ids=[1])
    hasher = NgramHasher(cfg)
    layer = Engram(cfg, 1, hidden, branches, hasher=hasher, sparse=True).cuda()
    emb = layer.multi_head_embedding
    batch, length = tokens // 4096, 4096
    ids = torch.randint(3, hasher.tokenizer.original_vocab_size, (batch, length), device="cuda")
    rows_ids = hasher.hash(ids, 1)
    flat = emb.flat_row_ids(rows_ids)
    heads, d = emb.num_heads, emb.head_dim
    size = torch.finfo(dtype).bits // 8
    weight = emb.weight.detach().to(dtype).requires_grad_()
    shape = f"{name}: {tokens // 1024}k tokens, D {hidden}, M {branches}, {heads} heads x {d}"
    out = []

    gathered = multi_head_gather(weight, flat)
    grad = torch.randn_like(gathered)
    with naive_kernels():
        check(f"{name} gather fwd", gathered, multi_head_gather(weight, flat))
        reference_grad = torch.autograd.grad(multi_head_gather(weight, flat), weight, grad)[0]
    check(f"{name} gather bwd", torch.autograd.grad(multi_head_gather(weight, flat), weight, grad)[0], reference_grad)
    gather_bytes = tokens * (heads * d * size * 2)
    with naive_kernels():
        eager_f = bench(lambda: multi_head_gather(weight, flat))
        eager_b = bench(lambda: torch.autograd.grad(multi_head_gather(weight, flat), weight, grad))
    out.append(row("gather fwd", shape, "Triton", bench(lambda: multi_head_gather(weight, flat)), gather_bytes, 0,
                   ceil, eager_f))
    out.append(row("gather fwd+bwd", shape, "Triton",
                   bench(lambda: torch.autograd.grad(multi_head_gather(weight, flat), weight, grad)),
                   gather_bytes + tokens * heads * (d * (size + 4) + 8), 0, ceil, eager_b))

    keys = torch.randn(batch, length, branches, hidden, device="cuda", dtype=dtype, requires_grad=True)
    query = torch.randn_like(keys, requires_grad=True)
    value = torch.randn(batch, length, hidden, device="cuda", dtype=dtype, requires_grad=True)
    kw, qw = layer.key_norm.weight, layer.query_norm.weight
    gate_bytes = tokens * (3 * branches * hidden + hidden) * size

    gated, gates = fused_gate(keys, query, value, kw, qw, None, None)
    fused_grads = torch.autograd.grad(gated.float().sum(), [keys, query, value])
    with naive_kernels():
        ref_gated, ref_gates = fused_gate(keys, query, value, kw, qw, None, None)
        ref_grads = torch.autograd.grad(ref_gated.float().sum(), [keys, query, value])
    check(f"{name} gate fwd", gated, ref_gated)
    for label, got, want in zip(("keys", "hidden", "value"), fused_grads, ref_grads):
        check(f"{name} gate bwd d{label}", got, want)

    def gate_fb():
        gated, gates = fused_gate(keys, query, value, kw, qw, None, None)
        torch.autograd.grad(gated.float().sum(), [keys, query, value])

    with naive_kernels():
        eager_gf = bench(lambda: fused_gate(keys, query, value, kw, qw, None, None))
        eager_gb = bench(gate_fb)
    out.append(row("gate fwd", shape, "Triton", bench(lambda: fused_gate(keys, query, value, kw, qw, None, None)),
                   gate_bytes, 0, ceil, eager_gf))
    out.append(row("gate fwd+bwd", shape, "Triton", bench(gate_fb), gate_bytes * 3, 0, ceil, eager_gb))

    hidden_states = torch.randn(batch, length, branches, hidden, device="cuda", dtype=torch.float32,
                                requires_grad=True)
    upstream = torch.randn(batch, length, branches, hidden, device="cuda", dtype=dtype)

    def layer_fb():
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            delta = layer(hidden_states, hash_ids=rows_ids)
        delta.backward(upstream)

    layer_fb()
    fused_delta_grad = (hidden_states.grad.clone(), emb.weight.grad.to_dense().clone())
    hidden_states.grad = None
    with naive_kernels():
        layer_fb()
        check(f"{name} layer d hidden", fused_delta_grad[0], hidden_states.grad)
        check(f"{name} layer d table", fused_delta_grad[1], emb.weight.grad.to_dense())
        hidden_states.grad = None
        eager_l = bench(layer_fb)
    fused_l = bench(layer_fb)
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            layer_fb()
            torch.cuda.synchronize()
        print(f"{name}: where the layer's GPU time goes (kernels path)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    flops = 3 * 2 * tokens * emb.num_heads * d * (1 + branches) * hidden
    layer_bytes = tokens * (branches * hidden * (4 + 2 * size) * 2 + heads * d * 4 * 2 + 6 * branches * hidden * size)
    out.append(row("Engram layer fwd+bwd", shape, "eager torch", eager_l, layer_bytes, flops, ceil))
    out.append(row("Engram layer fwd+bwd", shape, "kernels", fused_l, layer_bytes, flops, ceil, eager_l))
    del layer, weight, keys, query, value, hidden_states
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument("--tokens", type=int, default=32 * 1024)
    parser.add_argument("--profile", action="store_true", help="print the layer's top GPU kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    ceil = ceilings()
    rows = bench_hash(ceil, 64, 4096)
    rows += bench_layer(ceil, "demo shape", 1024, 512, args.tokens, profile=args.profile)
    rows += bench_layer(ceil, "paper shape", 2560, 640, args.tokens)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, Python {platform.python_version()}; "
          f"measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
          f"{ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s\nCommand: python {' '.join(sys.argv)}\n")
    print("| piece | shape | variant | ms | GB/s | TFLOP/s | x floor | speed-up vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['speedup_vs_eager']:.1f}x" if r["speedup_vs_eager"] else ""
        if "speedup_vs_numpy" in r:
            speed += f" ({r['speedup_vs_numpy']:.0f}x vs NumPy)"
        print(f"| {r['piece']} | {r['shape']} | {r['variant']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
              f"{r['TFLOP/s']:.1f} | {r['x_floor']:.1f} | {speed} |")
    print("\n| check (fused vs eager on the same inputs) | relative error |\n|---|---|")
    for name, error in CHECKS:
        print(f"| {name} | {error:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceil, "rows": rows, "checks": CHECKS, "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "command": " ".join(sys.argv)}, f, indent=2)


if __name__ == "__main__":
    main()
