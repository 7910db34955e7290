"""Reading FP8 Engram rows on the GPU: the fused gather + dequantise kernel against gathering the packed rows and
then dequantising them (``dequantize_rows``), and against a bf16 ``multi_head_gather`` of the same rows.

One table of packed FP8 rows (``engram.kernels.fp8``: D E4M3 bytes + D / 32 UE8M0 scale bytes, 264 B for D = 256) and
its bf16 twin holding the same values (exact: an E4M3 value times a power of two fits bf16), both in GPU memory
(a few GB each by default). Per call: ``tokens`` x H uniformly random row ids (no repeats to exploit, the
worst case for the caches), for a prefill-sized call (16,384 tokens) and a decode-sized one (256). Reported per
variant: median ms (CUDA events around each call, after warm-up), rows/s, bytes read/s (the table bytes of the
rows read: 264 B per FP8 row, 512 B per bf16 row) and bytes written/s (fp32 out for FP8, bf16 out for bf16).
Checked in the same run: fused == gather-then-dequantise bit for bit, and == the bf16 gather's values.

``--host`` adds the same rows read from host memory through ``MultiHeadEmbedding`` over a ``HostStore`` (methods
``uva``: a GPU kernel reads the pinned table in place, and ``cpu``: threaded gather + copy), the FP8 table
(dequantised on the GPU after arrival) against the bf16 one: what FP8 saves on the host link, 264 B instead of
512 B per row. A host fetch is timed from ``fetch()`` to its rows being on the GPU, dequantised.

    python benchmarks/bench_fp8_gather.py --host --json $OUT/bench_fp8_gather.json
    python benchmarks/bench_fp8_gather.py --device cpu --rows 1000      # a dry run of the logic (naive paths)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engram.embedding import MultiHeadEmbedding
from engram.kernels.fp8 import dequantize_rows, packed_row_bytes, quantize_rows
from engram.kernels.gather import fp8_gather, multi_head_gather
from engram.storage import HostStore
from engram.storage.placement import private_host_table

CHUNK_ROWS = 1 << 20


def random_tables(rows: int, dim: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed FP8 rows of N(0, 1) values ``[rows, dim + dim / 32]`` and the same values in bf16 ``[rows, dim]``,
    made on ``device`` a chunk at a time."""
    generator = torch.Generator(device=device).manual_seed(seed)
    packed = torch.empty(rows, packed_row_bytes(dim), dtype=torch.uint8, device=device)
    bf16 = torch.empty(rows, dim, dtype=torch.bfloat16, device=device)
    for start in range(0, rows, CHUNK_ROWS):
        count = min(CHUNK_ROWS, rows - start)
        packed[start:start + count] = quantize_rows(torch.randn(count, dim, device=device, generator=generator))
        bf16[start:start + count] = dequantize_rows(packed[start:start + count], torch.bfloat16)
    return packed, bf16


def median_ms(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()``: CUDA events around each call on a GPU (after ``warmup`` calls), the wall
    clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal fp32 values, NaN positions included."""
    a, b = a.float(), b.float()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def host_copy(table: torch.Tensor) -> torch.Tensor:
    """``table`` copied into host memory of its own, as ``open_table_store`` allocates host tables."""
    host = private_host_table(*table.shape, table.dtype)
    for start in range(0, table.shape[0], CHUNK_ROWS):
        host[start:start + CHUNK_ROWS] = table[start:start + CHUNK_ROWS].cpu()
    return host


def host_variants(packed: torch.Tensor, bf16: torch.Tensor, methods: list[str]
                  ) -> tuple[dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int, int]], list[HostStore]]:
    """Per host method, FP8 and bf16 embeddings reading host copies of the tables (row ids ``[N, H]``)."""
    dim = bf16.shape[1]
    tables = {"fp8": host_copy(packed), "bf16": host_copy(bf16)}
    variants, stores = {}, []
    for method in methods:
        for fmt, table in tables.items():
            embedding = MultiHeadEmbedding([table.shape[0]], dim, device="meta",
                                           row_format="fp8" if fmt == "fp8" else "float")
            store = HostStore(table, method=method)
            embedding.use_store(store)
            stores.append(store)
            out_bytes = dim * 4 if fmt == "fp8" else dim * 2
            variants[f"host {method}: {fmt} rows"] = (
                lambda rows, e=embedding: e.fetch(rows[..., None]).wait(), table.shape[1] * table.element_size(),
                out_bytes)
    return variants, stores


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    packed, bf16 = random_tables(args.rows, args.dim, device)
    fp8_row_bytes, bf16_row_bytes = packed.shape[1], args.dim * 2
    variants: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int, int]] = {
        # name: (call, table bytes read per row, output bytes written per row)
        "fp8 fused gather + dequantise": (lambda rows: fp8_gather(packed, rows), fp8_row_bytes, args.dim * 4),
        "fp8 gather, then dequantize_rows": (lambda rows: dequantize_rows(packed[rows]).flatten(-2),
                                             fp8_row_bytes, args.dim * 4),
        "bf16 multi_head_gather": (lambda rows: multi_head_gather(bf16, rows, sparse_grad=False),
                                   bf16_row_bytes, bf16_row_bytes),
    }
    stores: list[HostStore] = []
    if args.host:
        host, stores = host_variants(packed, bf16, ["uva", "cpu"] if device.type == "cuda" else ["cpu"])
        variants.update(host)
    generator = torch.Generator(device=device).manual_seed(1)
    results, checks = [], {}
    for tokens in args.tokens:
        rows = torch.randint(0, args.rows, (tokens, args.heads), device=device, generator=generator)
        outputs = {name: call(rows) for name, (call, _, _) in variants.items()}
        fused = outputs["fp8 fused gather + dequantise"]
        checks[f"{tokens} tokens: fused == gather, then dequantize_rows"] = same_values(
            fused, outputs["fp8 gather, then dequantize_rows"])
        checks[f"{tokens} tokens: fused == bf16 gather"] = same_values(fused, outputs["bf16 multi_head_gather"])
        for name, out in outputs.items():
            if name.startswith("host"):
                checks[f"{tokens} tokens: {name} == fused"] = same_values(out.flatten(-2), fused)
        del outputs, fused
        for name, (call, read_bytes, written_bytes) in variants.items():
            ms = median_ms(lambda: call(rows), device, args.warmup, args.repeats)
            count = tokens * args.heads
            results.append({"variant": name, "tokens": tokens, "rows": count, "ms": ms,
                            "rows_per_s": count / (ms / 1e3), "read_bytes_per_s": count * read_bytes / (ms / 1e3),
                            "written_bytes_per_s": count * written_bytes / (ms / 1e3)})
    for store in stores:
        store.close()
    return {"results": results, "checks": checks, "table_rows": args.rows, "dim": args.dim, "heads": args.heads,
            "fp8_table_gib": packed.numel() / 2**30, "bf16_table_gib": bf16.numel() * 2 / 2**30,
            "warmup": args.warmup, "repeats": args.repeats}


def machine(device: torch.device) -> dict:
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": gpu or f"CPU ({platform.processor() or platform.machine()}), a dry run: not GPU numbers",
            "host": platform.node(), "host_cpus": os.cpu_count(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the logic")
    parser.add_argument("--rows", type=int, default=12_000_000,
                        help="table rows (default: 3.0 GiB of FP8 rows, 5.7 GiB in bf16 at D = 256)")
    parser.add_argument("--dim", type=int, default=256, help="values per row (D, a multiple of 32)")
    parser.add_argument("--heads", type=int, default=24, help="rows per token (H)")
    parser.add_argument("--tokens", type=lambda text: [int(t) for t in text.split(",")], default=[16384, 256],
                        help="tokens per call, comma-separated")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--host", action="store_true", help="also read the rows from host memory (HostStore)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_fp8_gather.py needs a CUDA GPU (or --device cpu for a dry run)")
    if args.device == "cpu":
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    report = run(args)
    report.update(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=machine(torch.device(args.device)))
    print(f"{report['machine']['device']}; torch {torch.__version__}; command: {report['command']}")
    print(f"table: {args.rows:,} rows x D {args.dim} ({report['fp8_table_gib']:.2f} GiB FP8, "
          f"{report['bf16_table_gib']:.2f} GiB bf16), H {args.heads}")
    print("| variant | tokens | ms | rows/s | read GB/s | written GB/s |\n|---|---|---|---|---|---|")
    for r in report["results"]:
        print(f"| {r['variant']} | {r['tokens']:,} | {r['ms']:.3f} | {r['rows_per_s']:.3e} | "
              f"{r['read_bytes_per_s'] / 1e9:.1f} | {r['written_bytes_per_s'] / 1e9:.1f} |")
    for name, ok in report["checks"].items():
        print(f"check {name}: {'ok' if ok else 'MISMATCH'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if not all(report["checks"].values()):
        sys.exit("the variants disagree on the same rows")


if __name__ == "__main__":
    main()
