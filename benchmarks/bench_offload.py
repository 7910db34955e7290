"""Engram tables outside GPU memory: row-gather bandwidth per placement, and batched generation with the table
in HBM, in pinned host memory and on disk behind an HBM cache, against the same model without Engram.

Two parts, one process each (every comparison inside a part runs in the same process):

    python benchmarks/bench_offload.py gather --table-gib 16 --json $OUT/gather.json
    python benchmarks/bench_offload.py generate --table-gib 90 --disk-table-gib 30 --json $OUT/generate.json

``gather``: rows of 16 heads x 64 bf16 values (128 B) per token, for a prefill-sized request (131,072 tokens)
and a decode step (512 tokens), row ids from hashing real text (Python standard-library sources through the
DeepSeek-V3 tokenizer: Zipfian, rows repeat) and uniform random ids (no repeats to exploit). Reported against
the host-to-device copy rate of pinned memory measured in the same run (the link).

``generate``: a backbone of ~1.6B parameters with random bf16 weights (d_model 2048, 24 dense SwiGLU blocks,
GQA 16/4 heads), Engram at block index 1 (the paper's "layer 2"), 512 prompts of the standard-library text
with lengths uniform in [100, 1024], sorted by length and generated in groups (greedy, fixed new tokens), so
padding stays small; tokens/s and peak GPU memory for: no Engram, table in HBM, table in pinned host memory
(both gather methods), table on disk behind an HBM cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engram import EngramConfig, NgramHasher
from engram.model import EngramLM, EngramLMConfig
from engram.storage import CachedStore, DiskStore, HostStore, map_table, write_table
from engram.storage.host import pin_in_place
from engram.tokenizer import resolve_tokenizer_path

ROW_DIM = 64  # bf16 values per row: 128-byte rows
HEADS_PER_ORDER = 8  # two orders (2- and 3-grams): 16 rows per token


def text_tokens(count: int) -> tuple[np.ndarray, str]:
    """``count`` DeepSeek-V3 token ids of the Python standard library's sources (sorted files) and their recipe."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(resolve_tokenizer_path("deepseek-v3")))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    files = sorted(stdlib.rglob("*.py"))
    for start in range(0, len(files), 256):
        texts = [f.read_text(errors="replace") for f in files[start:start + 256]]
        for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
            ids.extend(encoding.ids)
        if len(ids) >= count:
            break
    if len(ids) < count:
        ids = (ids * (count // len(ids) + 1))
    recipe = f"Python {platform.python_version()} stdlib *.py under {stdlib}, sorted, DeepSeek-V3 tokenizer"
    return np.asarray(ids[:count], dtype=np.int64), recipe


def engram_config(table_bytes: float) -> EngramConfig:
    """Two orders x 8 heads of 128-byte rows, each head's table near ``table_bytes / 16 / 128`` rows."""
    rows_per_head = int(table_bytes / (2 * HEADS_PER_ORDER * ROW_DIM * 2))
    return EngramConfig(engram_vocab_size=[rows_per_head, rows_per_head], max_ngram_size=3,
                        n_embed_per_ngram=HEADS_PER_ORDER * ROW_DIM, n_head_per_ngram=HEADS_PER_ORDER, layer_ids=[1])


def random_pinned_table(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``[rows, dim]`` bf16 N(0, 0.02) in host memory pinned in place, generated on the GPU in 1 GiB pieces."""
    table = torch.empty(rows, dim, dtype=torch.bfloat16)
    pin_in_place(table)  # pin_memory=True would round the allocation up to a power of two
    generator = torch.Generator(device="cuda").manual_seed(seed)
    step = 2**30 // (dim * 2)
    for start in range(0, rows, step):
        piece = torch.randn(min(step, rows - start), dim, device="cuda", generator=generator, dtype=torch.bfloat16)
        table[start:start + piece.shape[0]].copy_(piece.mul_(0.02))
    torch.cuda.synchronize()
    return table


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (which must leave the result on the GPU), after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def link_rate() -> float:
    """Pinned host -> GPU copy rate in bytes/s (1 GiB)."""
    host = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    seconds = timed(lambda: device.copy_(host, non_blocking=True), 5)
    return host.numel() / seconds


def evict_page_cache(path: Path) -> None:
    """Drop a file's clean pages from the page cache, so the next reads come from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def gather_part(args: argparse.Namespace) -> dict:
    link = link_rate()
    table_bytes = args.table_gib * 2**30
    cfg = engram_config(table_bytes)
    hasher = NgramHasher(cfg)
    offsets = torch.tensor(np.cumsum([0] + hasher.flat_table_sizes(1)[:-1]), dtype=torch.long)
    rows_total = sum(hasher.flat_table_sizes(1))
    table = random_pinned_table(rows_total, ROW_DIM)
    device_table = table.to("cuda")
    tokens, recipe = text_tokens(131072)
    requests = {}
    for count in (131072, 512):
        text = hasher.hash_all(torch.from_numpy(tokens[:count])[None])[1][0] + offsets
        uniform = torch.randint(0, rows_total, text.shape)
        requests[f"{count} tokens, text rows"] = text
        requests[f"{count} tokens, uniform rows"] = uniform
    disk_dir = Path(tempfile.mkdtemp(dir=args.disk_dir))
    disk_rows = min(rows_total, int(args.disk_table_gib * 2**30 / (ROW_DIM * 2)))
    start = time.perf_counter()
    write_table(disk_dir / "table.safetensors", table[:disk_rows])
    disk_write_s = time.perf_counter() - start
    mapped = map_table(disk_dir / "table.safetensors", verify=False)
    stores = {
        "host cpu gather + copy (dedup)": HostStore(table, method="cpu", dedup=True),
        "host cpu gather + copy (no dedup)": HostStore(table, method="cpu", dedup=False),
        "host uva kernel (dedup)": HostStore(table, method="uva", dedup=True),
        "host uva kernel (sorted, no dedup)": HostStore(table, method="uva", dedup=False),
    }
    results = []
    for name, rows in requests.items():
        rows_gpu = rows.cuda()
        per_token = rows.shape[-1] * ROW_DIM * 2
        expected = device_table[rows_gpu]

        def record(method: str, seconds: float, result: torch.Tensor | None) -> None:
            if result is not None and not torch.equal(result, expected):
                raise AssertionError(f"{method} on {name} returned other rows than the HBM table")
            results.append({"request": name, "method": method, "ms": seconds * 1e3,
                            "Mtokens_per_s": rows.shape[0] / seconds / 1e6,
                            "GB_per_s": rows.shape[0] * per_token / seconds / 1e9,
                            "link_share": rows.shape[0] * per_token / seconds / link})

        record("HBM index_select", timed(lambda: device_table[rows_gpu], args.repeats), None)
        for method, store in stores.items():
            out = store.fetch(rows_gpu, torch.device("cuda")).wait()
            record(method, timed(lambda: store.fetch(rows_gpu, torch.device("cuda")).wait(), args.repeats), out)
        disk_rows_gpu = rows_gpu % disk_rows
        disk_store = DiskStore(mapped.tensor)
        expected = device_table[disk_rows_gpu]
        evict_page_cache(disk_dir / "table.safetensors")
        start = time.perf_counter()
        out = disk_store.fetch(disk_rows_gpu, torch.device("cuda")).wait()
        torch.cuda.synchronize()
        record("disk, cold page cache", time.perf_counter() - start, out)
        record("disk, warm page cache", timed(lambda: disk_store.fetch(disk_rows_gpu, torch.device("cuda")).wait(),
                                              args.repeats), None)
    mapped.close()
    shutil.rmtree(disk_dir)
    return {"link_bytes_per_s": link, "table_gib": args.table_gib, "disk_table_gib": disk_rows * ROW_DIM * 2 / 2**30,
            "disk_write_bytes_per_s": disk_rows * ROW_DIM * 2 / disk_write_s, "rows": results, "text": recipe}


def backbone_config(engram: EngramConfig, max_positions: int) -> EngramLMConfig:
    return EngramLMConfig(vocab_size=129280, tokenizer_vocab_size=128815, d_model=2048, n_layers=24, n_heads=16,
                          n_kv_heads=4, head_dim=128, max_position_embeddings=max_positions,
                          ffn_kinds=["dense"] * 24, dense_ffn_dim=5632, moe=None, hc_mult=1, engram=engram,
                          tie_embeddings=False)


VARIANTS = ("none", "hbm", "host-cpu", "host-uva", "host-uva-sorted", "disk")


def generate_part(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = backbone_config(engram_config(args.table_gib * 2**30), 1024 + args.new_tokens)
    model = EngramLM(cfg, table_device="meta")
    engram = model.blocks[1].engram
    embedding = engram.multi_head_embedding
    table = random_pinned_table(embedding.num_rows, ROW_DIM)
    embedding.use_store(HostStore(table))  # drops the unallocated table before the model moves
    model.to(device="cuda", dtype=torch.bfloat16).eval()
    lengths = np.sort(np.random.default_rng(0).integers(100, 1025, size=args.sequences))
    stream, recipe = text_tokens(int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    prompts = [torch.from_numpy(stream[s:s + n]) for s, n in zip(starts, lengths)]

    groups = []
    for first in range(0, len(prompts), args.group):
        group = prompts[first:first + args.group]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(group):  # left padding
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        groups.append((ids.cuda(), mask.cuda()))

    @torch.no_grad()
    def run(prefill_only: bool) -> float:
        """Seconds to prefill every group (``prefill_only``) or to generate ``args.new_tokens`` for each."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        for ids, mask in groups:
            if prefill_only:
                model(ids, attention_mask=mask, logits_to_keep=1)
            else:
                model.generate(ids, args.new_tokens, temperature=0, attention_mask=mask)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    prompt_tokens = int(lengths.sum())
    processed = prompt_tokens + args.new_tokens * len(prompts)
    timings: dict[str, dict[str, list[float]]] = {}
    peak_gib: dict[str, float] = {}

    def measure(name: str) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        timing = timings.setdefault(name, {"prefill": [], "generate": []})
        timing["prefill"].append(run(prefill_only=True))
        timing["generate"].append(run(prefill_only=False))
        peak_gib[name] = max(peak_gib.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        print(f"{name}: prefill {timing['prefill'][-1]:.2f} s, generate {timing['generate'][-1]:.2f} s, "
              f"{peak_gib[name]:.1f} GiB", flush=True)

    def replace_store(store: HostStore | CachedStore | None) -> None:
        if embedding.store is not None:
            embedding.store.close()
        embedding.store = None
        if store is not None:
            embedding.use_store(store)

    def place(variant: str) -> str:
        """Put the table where ``variant`` says; returns the variant's name in the results."""
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
        replace_store(None)
        model.blocks[1].engram = None if variant == "none" else engram
        if variant == "none":
            return "no Engram"
        if variant == "hbm":
            embedding.weight = torch.nn.Parameter(table.to("cuda"), requires_grad=False)
            return "Engram in HBM"
        method, dedup = variant.split("-")[1], not variant.endswith("sorted")
        replace_store(HostStore(table, method=method, dedup=dedup))
        return f"Engram in host memory ({variant[5:]}, dedup={dedup})"

    def unplace() -> None:
        replace_store(None)
        embedding._parameters.pop("weight", None)

    variants = [v for v in args.variants.split(",") if v != "disk"]
    place(variants[0])
    run(prefill_only=False)  # warm-up pass over every shape: kernels built, allocator and caches warm
    for _ in range(args.rounds):  # interleaved rounds, so drifts of the machine hit every variant alike
        for variant in variants:
            measure(place(variant))
            unplace()
    extra: dict = {}
    if "disk" in args.variants.split(","):
        disk_dir = Path(tempfile.mkdtemp(dir=args.disk_dir))
        path = disk_dir / "table.safetensors"
        start = time.perf_counter()
        write_table(path, table)
        extra["disk_write_bytes_per_s"] = table.numel() * 2 / (time.perf_counter() - start)
        mapped = map_table(path, verify=False)
        model.blocks[1].engram = engram
        replace_store(CachedStore(DiskStore(mapped.tensor, on_close=mapped.close), args.cache_rows))
        evict_page_cache(path)
        name = f"Engram on disk + HBM cache of {args.cache_rows:,} rows"
        for _ in range(args.rounds):  # the first round starts from a cold page cache and an empty HBM cache
            measure(name)
        extra["cache_stats"] = embedding.store.stats()
        unplace()
        shutil.rmtree(disk_dir)
    results = []
    for name, timing in timings.items():
        prefill, generate = float(np.median(timing["prefill"])), float(np.median(timing["generate"]))
        results.append({"variant": name, "rounds": len(timing["generate"]), "prefill_s": timing["prefill"],
                        "generate_s": timing["generate"], "prefill_tokens_per_s": prompt_tokens / prefill,
                        "tokens_per_s": processed / generate, "peak_gpu_gib": peak_gib[name]})
    return {"results": results, "text": recipe, "table_gib": embedding.num_rows * ROW_DIM * 2 / 2**30,
            "table_rows": embedding.num_rows, **extra, "backbone_params": sum(p.numel() for p in model.parameters()),
            "sequences": args.sequences, "group": args.group, "new_tokens": args.new_tokens,
            "prompt_tokens": prompt_tokens, "tokens_processed": processed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["gather", "generate"])
    parser.add_argument("--table-gib", type=float, default=16.0, help="size of the Engram table (bf16)")
    parser.add_argument("--disk-table-gib", type=float, default=8.0, help="size of the table file on disk")
    parser.add_argument("--disk-dir", default=None, help="where the disk table is written (default: the temp dir)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--group", type=int, default=128, help="sequences generated together")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="generate: interleaved measurements per variant")
    parser.add_argument("--cache-rows", type=int, default=8_000_000, help="HBM cache in front of the disk table")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="generate: which placements, in order")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_offload.py needs a CUDA GPU")
    result = gather_part(args) if args.part == "gather" else generate_part(args)
    result.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, command=" ".join(sys.argv),
                  host_cpus=os.cpu_count())
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
