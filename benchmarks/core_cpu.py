"""Core-library timings on the CPU: prime search, compressed-tokenizer build and cache load, n-gram hashing.

Hashing is compared, in the same process, with a NumPy implementation in the demo's style (per-layer
shifts with np.pad, XOR, modulo per head). Usage:

    python benchmarks/core_cpu.py --out benchmarks/results/core_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from engram import CompressedTokenizer, EngramConfig, NgramHasher
from engram.config import table_sizes_for


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def numpy_demo_style(hasher: NgramHasher, raw: np.ndarray) -> dict[int, np.ndarray]:
    """The demo's algorithm as NumPy array ops (its way of computing, for comparison)."""
    x = hasher.tokenizer.lookup[raw]
    batch, length = x.shape
    out = {}
    for layer_id in hasher.cfg.layer_ids:
        mult = np.asarray(hasher.multipliers[layer_id], dtype=np.int64)
        shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=hasher.pad_id)[:, :length]
                        for k in range(1, hasher.cfg.max_ngram_size)]
        cols = []
        for n in range(2, hasher.cfg.max_ngram_size + 1):
            mix = shifts[0] * mult[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * mult[k])
            cols += [mix % p for p in hasher.table_sizes[layer_id][n - 2]]
        out[layer_id] = np.stack(cols, axis=2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write a markdown table here")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()

    rows = []
    demo_cfg = EngramConfig()
    rows.append(("prime search, demo config (2 layers x 2 orders x 8 heads near 646k)",
                 f"{best_of(lambda: table_sizes_for(demo_cfg)):.4f} s", "goal <= 1 s"))
    big_cfg = EngramConfig(engram_vocab_size=[400_000_000] * 2, layer_ids=[1])
    rows.append(("prime search, 2 orders x 8 heads near 400M rows",
                 f"{best_of(lambda: table_sizes_for(big_cfg)):.4f} s", "goal <= 10 s"))
    v41_cfg = EngramConfig(engram_vocab_size=[16_000_000] * 3, max_ngram_size=4, n_embed_per_ngram=2048,
                           layer_ids=[1, 14])
    rows.append(("prime search, DeepSeek-V4.1 shape (2 layers x 3 orders x 8 heads near 16M)",
                 f"{best_of(lambda: table_sizes_for(v41_cfg)):.4f} s", ""))

    with tempfile.TemporaryDirectory() as cache:
        cold = best_of(lambda: CompressedTokenizer.from_tokenizer("deepseek-v3", cache_dir=False), repeats=1)
        CompressedTokenizer.from_tokenizer("deepseek-v3", cache_dir=cache)
        warm = best_of(lambda: CompressedTokenizer.from_tokenizer("deepseek-v3", cache_dir=cache))
    rows.append(("compressed tokenizer, DeepSeek-V3, first build (no cache)", f"{cold:.3f} s", ""))
    rows.append(("compressed tokenizer, DeepSeek-V3, second build (cache hit)", f"{warm:.3f} s", "goal < 0.2 s"))

    hasher = NgramHasher(demo_cfg)
    raw = np.random.default_rng(0).integers(0, hasher.tokenizer.original_vocab_size, size=(args.batch, args.length))
    ids = torch.from_numpy(raw)
    ours = hasher.hash_all(ids)
    theirs = numpy_demo_style(hasher, raw)
    assert all(np.array_equal(ours[k].numpy(), theirs[k]) for k in ours), "implementations disagree"
    tokens = raw.size
    t_torch = best_of(lambda: hasher.hash_all(ids))
    t_numpy = best_of(lambda: numpy_demo_style(hasher, raw))
    rows.append((f"hash_all, demo config, {args.batch}x{args.length} tokens, torch CPU ({torch.get_num_threads()} threads)",
                 f"{tokens / t_torch / 1e6:.2f} M tokens/s", "identical ids"))
    rows.append(("same, NumPy in the demo's style", f"{tokens / t_numpy / 1e6:.2f} M tokens/s", ""))

    header = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"torch {torch.__version__}, numpy {np.__version__}\n"
              f"Command: python benchmarks/core_cpu.py --batch {args.batch} --length {args.length}\n")
    table = "| measurement | result | note |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    print(header)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Core library on the CPU\n\n" + header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
