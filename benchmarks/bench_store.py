"""Edge/cloud split: Engram tables in Mooncake Store held by another process, the backbone in this one.

Three processes on one machine, all on loopback: a ``mooncake_master``, a holder (``engram store hold``: the
"cloud", the only process with the tables in memory) and this one (the "edge": the backbone, reading rows from the
holder over TCP). A model of ``--preset`` with random weights is saved, published, then loaded twice: tables in
host memory (``host``, the baseline) and in the store (``store``; ``store+cache``: behind a cache of
``--cache-rows`` hot rows in the compute device's memory). Per placement, median over ``--repeats``:

* prefill: one forward of ``--batch`` x ``--prompt-len`` tokens;
* decode: ms per new token of a greedy ``generate`` of ``--new-tokens`` tokens, less one of 1 token (the same
  prefill), over the tokens after the first;
* per Engram layer, from the table fetches themselves: the lead (ms from the fetch being issued, before block 0,
  to the layer asking for its rows: the time the read may take for free) and the stall (ms the layer then waits);
* the cache's hit rate after the run.

Token ids are Zipfian (exponent 1.1 over the tokenizer's ids, as text is), so the n-grams repeat as in real text.
Nothing is fetched from the network; the tokenizer is the DeepSeek-V3 one the package ships.

    python benchmarks/bench_store.py --device cuda --preset small --out benchmarks/results/store   # the GPU machine
    python benchmarks/bench_store.py --device cpu --out benchmarks/results/store                  # a CPU figure
    python benchmarks/bench_store.py --device cpu --smoke                                          # seconds: the logic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("GLOG_minloglevel", "2")  # Mooncake's INFO lines

from engram.cli import main as engram_main  # noqa: E402
from engram.embedding import MultiHeadEmbedding  # noqa: E402
from engram.model import EngramLM, EngramLMConfig  # noqa: E402
from engram.storage.mooncake import start_master  # noqa: E402


class FetchTimer:
    """Wraps every ``MultiHeadEmbedding.fetch`` of ``model``: per layer and phase (prefill: fetches of more than one
    position; decode: of one), ms from the fetch to the layer's ``wait`` (lead) and inside the ``wait`` (stall)."""

    def __init__(self, model: EngramLM) -> None:
        self.layers = {id(b.engram.multi_head_embedding): b.layer_idx for b in model.blocks if b.engram is not None}
        self.leads: dict[tuple[int, str], list[float]] = {}
        self.stalls: dict[tuple[int, str], list[float]] = {}
        self._fetch = MultiHeadEmbedding.fetch

    def __enter__(self) -> FetchTimer:
        timer, fetch = self, self._fetch

        def timed_fetch(embedding: MultiHeadEmbedding, row_ids: torch.Tensor):
            issued = time.perf_counter()
            pending = fetch(embedding, row_ids)
            wait = pending.wait
            key = (timer.layers[id(embedding)], "prefill" if row_ids.shape[1] > 1 else "decode")

            def timed_wait() -> torch.Tensor:
                asked = time.perf_counter()
                rows = wait()
                if rows.is_cuda:
                    torch.cuda.current_stream(rows.device).synchronize()
                timer.leads.setdefault(key, []).append(1e3 * (asked - issued))
                timer.stalls.setdefault(key, []).append(1e3 * (time.perf_counter() - asked))
                return rows

            pending.wait = timed_wait
            return pending

        MultiHeadEmbedding.fetch = timed_fetch
        return self

    def __exit__(self, *exc_info: object) -> None:
        MultiHeadEmbedding.fetch = self._fetch

    def summary(self) -> dict[str, dict[str, float]]:
        """``{"1/decode": {"lead_ms": median, "stall_ms": median}, ...}``"""
        return {f"{layer}/{phase}": {"lead_ms": statistics.median(self.leads[layer, phase]),
                                     "stall_ms": statistics.median(self.stalls[layer, phase])}
                for layer, phase in sorted(self.leads)}


def zipf_ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """``[batch, length]`` token ids drawn from a Zipf law (exponent 1.1) over ``[3, vocab)``, shuffled ranks."""
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.1, size=(batch, length)) % (vocab - 3)
    return torch.from_numpy(rng.permutation(vocab - 3)[ranks] + 3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(models: dict[str, EngramLM], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Prefill and decode times of every model (medians, ms), with the fetch leads and stalls per Engram layer.

    The models take turns within each repeat, so a machine whose load changes slows all of them alike. Decode is
    ``(generate(n) - generate(1)) / (n - 1)``: both include the same prefill."""
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
    timers = {name: FetchTimer(model) for name, model in models.items()}
    vocab = next(iter(models.values())).cfg.tokenizer_vocab_size

    def timed(fn) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return 1e3 * (time.perf_counter() - start)

    with torch.inference_mode():
        for repeat in range(args.warmup + args.repeats):
            ids = zipf_ids(args.batch, args.prompt_len, vocab, seed=repeat).to(device)
            for name, model in models.items():
                with timers[name]:
                    prefill = timed(lambda: model(ids))
                    one = timed(lambda: model.generate(ids, max_new_tokens=1, temperature=0))
                    many = timed(lambda: model.generate(ids, max_new_tokens=args.new_tokens, temperature=0))
                if repeat >= args.warmup:
                    times[name]["prefill"].append(prefill)
                    times[name]["decode"].append((many - one) / (args.new_tokens - 1))
    return {name: {"prefill_ms": statistics.median(times[name]["prefill"]),
                   "decode_ms_per_token": statistics.median(times[name]["decode"]),
                   "layers": timers[name].summary()} for name in models}


def cache_stats(model: EngramLM) -> dict[str, float]:
    stats = [b.engram.multi_head_embedding.store.stats() for b in model.blocks if b.engram is not None]
    lookups = sum(s["lookups"] for s in stats)
    return {"hit_rate": sum(s["hits"] for s in stats) / lookups if lookups else 0.0, "lookups": lookups}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    overrides = dict(max_position_embeddings=args.prompt_len + args.new_tokens)
    model = EngramLM(EngramLMConfig.from_preset(args.preset, **overrides)).eval()
    table_bytes = sum(b.engram.multi_head_embedding.table().numel() * 4 for b in model.blocks if b.engram is not None)
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    model.save_pretrained(work / "model")
    del model
    results: dict = {"device": args.device, "preset": args.preset, "table_bytes": table_bytes,
                     "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "cache_rows": args.cache_rows, "machine": platform.machine(), "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "placements": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    mib = max(32, 2 * table_bytes // 2**20 + 16)
    with (work / "master.log").open("w") as log, start_master(log=log) as master:
        holder = subprocess.Popen([sys.executable, "-m", "engram", "store", "hold", "--master", master.address,
                                   "--mib", str(mib)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            holder.stdout.readline()
            start = time.perf_counter()
            assert engram_main(["store", "publish", "--checkpoint", str(work / "model"), "--master",
                                master.address]) == 0
            results["publish_s"] = time.perf_counter() - start
            placements = {"host": dict(engram_placement="host"),
                          "store": dict(engram_placement="store", store_master=master.address),
                          "store+cache": dict(engram_placement="store", store_master=master.address,
                                              engram_cache_rows=args.cache_rows)}
            models = {name: EngramLM.from_pretrained(work / "model", **options).eval().to(device)
                      for name, options in placements.items()}
            results["placements"] = measure(models, args, device)
            results["placements"]["store+cache"]["cache"] = cache_stats(models["store+cache"])
            for name, entry in results["placements"].items():
                print(name, json.dumps(entry), flush=True)
        finally:
            holder.terminate()
            holder.wait()
    host = results["placements"]["host"]
    for name in ("store", "store+cache"):
        entry = results["placements"][name]
        entry["prefill_slowdown"] = entry["prefill_ms"] / host["prefill_ms"] - 1
        entry["decode_slowdown"] = entry["decode_ms_per_token"] / host["decode_ms_per_token"] - 1
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--cache-rows", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the logic")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.prompt_len, args.new_tokens, args.repeats, args.warmup = 1, 16, 3, 1, 0
    results = run(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"results-{args.device}-{args.preset}.json"
        (args.out / name).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
