"""Engram against LoRA for knowledge injection (issue 22, item 3), in one run: pretrain a small Llama base, inject
synthetic facts and a real-text domain with each adapter at equal trainable parameters and equal training tokens,
and measure fact recall, domain loss, forgetting, adapter size and generation throughput.

    python benchmarks/bench_inject.py --prepare runs/inject-data      # here, with network: BPE + token arrays (18.7 MB)
    PYTHONPATH=src python3 benchmarks/bench_inject.py --data runs/inject-data --out docs/results/retrofit   # one GPU
    python benchmarks/bench_inject.py --quick --data DIR --out DIR    # toy sizes on a CPU, seconds

``--prepare`` trains a byte-level BPE on the pretraining sources (default: the gutenberg and shakespeare presets),
tokenises them and the domain sources (default: sotu) with it into uint16 arrays (train/validation split by
document, as ``engram data prepare`` splits), and keeps the most frequent words of the pretraining text as the
facts' answers. The run needs nothing else: no network, no hub.

The run: a random ``LlamaForCausalLM`` is pretrained (bf16 autocast on CUDA, as many steps of the planned schedule as
``--pretrain-seconds`` allows, measured on a throwaway copy first). Then, for each task (``facts-N`` for every
``--facts`` N, and ``domain``), each method starts from a copy of that base: ``engram`` (Engram layers before
``--engram-layers``, tables by sparse Adam) and ``lora`` (peft LoRA on every linear layer, its rank chosen so that its
trainable parameters come closest to Engram's). Both train on the same batches for the same steps: the planned
``--inject-steps``, cut alike for every task and method to what ``--inject-seconds`` allows at the step times measured
first. Measured:

- recall: exact match (greedy) of each fact's answer after its held-out paraphrase (never trained), and after its
  first training phrasing (memorisation), per paraphrase template too;
- domain loss: mean next-token loss on the domain's validation split;
- forgetting: the same loss on the pretraining validation split, before and after injection;
- adapter size on disk (fp32, as each library saves it) and, for the domain adapters, greedy generation throughput
  with the adapter applied (LoRA also merged into the base; the Engram model also exported as an EngramLM,
  :func:`engram.hf.export.to_engram_lm`, decoding with its own loop: CUDA graphs on a GPU, as ``engram serve``).

Output in ``--out``: ``results.json`` (everything, with loss curves), ``results.md`` (the tables), ``recall.png``,
``losses.png``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from engram.data.batches import TokenBatches, validation_batches
from engram.data.corpus import open_corpus, prepare_corpus
from engram.data.facts import PARAPHRASE_TEMPLATES, Fact, make_facts, training_texts
from engram.data.sources import iter_documents
from engram.hf.evaluate import exact_match, generation_throughput, held_out_loss
from engram.hf.export import to_engram_lm
from engram.hf.injection import EngramInjection, LoraInjection, train_adapter, trainable_parameters
from engram.hf.retrofit import ATTRIBUTE, default_engram_config
from engram.tokenizer import CompressedTokenizer
from engram.train.optim import OptimConfig, param_groups

TOKENIZER = "tokenizer.json"
SPLITS = {"pretrain": ("train", "val"), "domain": ("train", "val")}
SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}  # engram.data.bpe's


@dataclass
class Settings:
    """Every size of a run (the defaults: the GPU run; :meth:`quick`: a CPU toy)."""

    d_model: int = 384
    n_layers: int = 8
    n_heads: int = 6
    n_kv_heads: int = 2
    ffn: int = 1024
    max_positions: int = 512
    seq_len: int = 256
    pretrain_batch: int = 128
    pretrain_steps: int = 1500
    pretrain_seconds: float = 150.0  # the pretraining steps are cut to what fits (measured first)
    pretrain_lr: float = 2e-3
    facts: list[int] = field(default_factory=lambda: [1000, 10000])
    fact_seq_len: int = 64
    fact_batch: int = 128
    domain_batch: int = 32
    inject_steps: int = 1000
    inject_seconds: float = 210.0  # all injections together: the steps are cut to fit (measured first), alike for all
    engram_layers: list[int] = field(default_factory=lambda: [1])
    engram_rows: int | None = None  # rows per head (prime search start); None: ~the compressed vocabulary
    engram_lr: float = 3e-3  # dense Engram weights; tables at 5x with sparse Adam
    lora_lr: float = 1e-3
    lora_alpha: float | None = None  # None: the rank (scale 1)
    eval_batches: int = 16
    eval_batch: int = 32
    throughput_batch: int = 16
    throughput_prompt: int = 32
    throughput_new: int = 128
    throughput_repeats: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=64, max_positions=128, seq_len=32,
                   pretrain_batch=8, pretrain_steps=8, pretrain_seconds=60.0, facts=[12, 30], fact_seq_len=32,
                   fact_batch=8, domain_batch=8, inject_steps=6, inject_seconds=60.0, eval_batches=2, eval_batch=4,
                   throughput_batch=2, throughput_prompt=8, throughput_new=4, throughput_repeats=1)


# ---------------------------------------------------------------- data (prepared here, read on the GPU machine)

def frequent_words(sources: list[str], count: int) -> list[str]:
    """The ``count`` most frequent lower-case words of 5-9 letters in ``sources`` (ties: first seen first)."""
    counter: Counter[str] = Counter()
    for source in sources:
        for doc in iter_documents(source):
            counter.update(re.findall(r"\b[a-z]{5,9}\b", doc.text))
    return [word for word, _ in counter.most_common(count)]


def prepare(out: Path, pretrain_sources: list[str], domain_sources: list[str], vocab: int, words: int) -> dict:
    """Write the run's inputs into ``out``: ``tokenizer.json``, ``{pretrain,domain}-{train,val}.npy`` (uint16 ids,
    documents back to back, each led by BOS) and ``data.json`` (sources, counts, answer words)."""
    if vocab > 65536:
        raise ValueError(f"vocab {vocab} does not fit the uint16 arrays")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".corpora"
    shutil.rmtree(staging, ignore_errors=True)
    pretrain = prepare_corpus(pretrain_sources, staging / "pretrain", tokenizer=f"bpe-{vocab}", progress=False)
    shutil.copyfile(staging / "pretrain" / TOKENIZER, out / TOKENIZER)
    domain = prepare_corpus(domain_sources, staging / "domain", tokenizer=str(out / TOKENIZER), progress=False)
    for name in SPLITS:
        corpus = open_corpus(staging / name)
        for split in SPLITS[name]:
            np.save(out / f"{name}-{split}.npy", np.asarray(corpus.tokens(split), dtype=np.uint16))
    shutil.rmtree(staging)
    info = {"pretrain_sources": pretrain_sources, "domain_sources": domain_sources, "vocab": vocab,
            "pretrain": {k: asdict(v) for k, v in pretrain.splits.items()},
            "domain": {k: asdict(v) for k, v in domain.splits.items()},
            "answer_words": frequent_words(pretrain_sources, words)}
    (out / "data.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


@dataclass
class Data:
    folder: Path
    info: dict
    tokenizer: Tokenizer
    arrays: dict[str, np.ndarray]  # "pretrain-train", ... as uint32

    @classmethod
    def load(cls, folder: Path) -> "Data":
        if not (folder / "data.json").is_file():
            raise FileNotFoundError(f"{folder} holds no prepared data: run --prepare {folder} first")
        arrays = {f"{name}-{split}": np.load(folder / f"{name}-{split}.npy").astype(np.uint32)
                  for name, splits in SPLITS.items() for split in splits}
        return cls(folder, json.loads((folder / "data.json").read_text()),
                   Tokenizer.from_file(str(folder / TOKENIZER)), arrays)

    def hf_tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(self.folder / TOKENIZER), **SPECIAL)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    @property
    def bos(self) -> int:
        return self.tokenizer.token_to_id(SPECIAL["bos_token"])


# ---------------------------------------------------------------- tasks

@dataclass
class Task:
    """What an injection trains on (``tokens``, windows of ``seq_len``, ``batch`` a step) and what it is scored
    on: ``facts`` (recall) or ``domain`` validation windows."""

    name: str
    tokens: np.ndarray
    seq_len: int
    batch: int
    facts: list[Fact] | None = None


def fact_task(data: Data, n: int, s: Settings) -> Task:
    facts = make_facts(n, data.info["answer_words"], s.seed)
    docs = [[data.bos, *ids] for ids in data.encode(training_texts(facts, s.seed))]
    return Task(f"facts-{n}", np.fromiter((t for doc in docs for t in doc), dtype=np.uint32), s.fact_seq_len,
                s.fact_batch, facts)


def recall_rows(data: Data, facts: list[Fact], paraphrase: bool) -> tuple[list[list[int]], list[list[int]]]:
    """BOS + prompt ids and completion ids of every fact; the completion must tokenise apart from the prompt (it
    starts a new pre-token: a space and a word), else ``ValueError``."""
    prompts = [fact.paraphrase_prompt() if paraphrase else fact.trained_prompt() for fact in facts]
    heads, tails = data.encode(prompts), data.encode([fact.completion for fact in facts])
    whole = data.encode([p + f.completion for p, f in zip(prompts, facts)])
    for prompt, head, tail, joined in zip(prompts, heads, tails, whole):
        if head + tail != joined:
            raise ValueError(f"{prompt!r}: the answer does not tokenise apart from its prompt")
    return [[data.bos, *head] for head in heads], tails


def measure(model, task: Task, data: Data, s: Settings, device: torch.device) -> dict:
    """Forgetting loss (pretraining validation), and recall (facts) or domain loss (domain) of ``model``."""
    windows = validation_batches(data.arrays["pretrain-val"], s.eval_batch, s.seq_len, s.eval_batches)
    result = {"base_val_loss": held_out_loss(model, windows, device)}
    if task.facts is None:
        domain = validation_batches(data.arrays["domain-val"], s.eval_batch, s.seq_len, s.eval_batches)
        result["domain_loss"] = held_out_loss(model, domain, device)
        return result
    for key, paraphrase in (("recall_paraphrase", True), ("recall_trained", False)):
        hits = exact_match(model, *recall_rows(data, task.facts, paraphrase), device)
        result[key] = float(hits.float().mean())
        if paraphrase:
            kinds = torch.tensor([fact.paraphrase for fact in task.facts])
            result["recall_by_paraphrase"] = {template: float(hits[kinds == i].float().mean())
                                              for i, template in enumerate(PARAPHRASE_TEMPLATES)}
    return result


# ---------------------------------------------------------------- models

def build_base(s: Settings, vocab: int, data: Data):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(s.seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=s.d_model, intermediate_size=s.ffn, num_hidden_layers=s.n_layers,
                         num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads,
                         max_position_embeddings=s.max_positions, tie_word_embeddings=True,
                         bos_token_id=data.bos, eos_token_id=data.tokenizer.token_to_id(SPECIAL["eos_token"]),
                         pad_token_id=data.tokenizer.token_to_id(SPECIAL["pad_token"]))
    return LlamaForCausalLM(config).eval()


def seconds_per_step(model, batches: TokenBatches, optim: OptimConfig, device: torch.device) -> float:
    """Training step time of ``model`` (it trains: pass a throwaway copy): 3 warm-up steps, then the mean of 5."""
    train_adapter(model, batches, 3, optim, device)
    start = time.perf_counter()
    train_adapter(model, batches, 5, optim, device)
    return (time.perf_counter() - start) / 5


def pretrain(base, data: Data, s: Settings, device: torch.device) -> dict:
    """Pretrain ``base`` in place: the planned steps, cut to what ``pretrain_seconds`` allows at the step time
    measured on a throwaway copy."""
    batches = TokenBatches(data.arrays["pretrain-train"], s.pretrain_batch, s.seq_len, s.seed)
    optim = OptimConfig(lr=s.pretrain_lr, weight_decay=0.1, warmup_steps=max(1, s.pretrain_steps // 20))
    step_seconds = seconds_per_step(copy.deepcopy(base), batches, optim, device)
    steps = max(1, min(s.pretrain_steps, int(s.pretrain_seconds / step_seconds)))
    optim = replace(optim, warmup_steps=max(1, steps // 20))
    start = time.perf_counter()
    losses = train_adapter(base, batches, steps, optim, device, "pretraining")
    return {"steps": steps, "planned_steps": s.pretrain_steps, "tokens": steps * s.pretrain_batch * s.seq_len,
            "seconds": time.perf_counter() - start, "step_seconds_probe": step_seconds, "loss_curve": losses}


def engram_method(s: Settings, tokenizer) -> EngramInjection:
    if s.engram_rows is None:
        return EngramInjection(s.engram_layers)
    pad = tokenizer.pad_token_id
    cfg = default_engram_config(CompressedTokenizer.from_tokenizer(tokenizer), s.engram_layers, pad)
    return EngramInjection(s.engram_layers, replace(cfg, engram_vocab_size=[s.engram_rows] * 2))


def parameter_budget(base, engram: EngramInjection, tokenizer, s: Settings) -> tuple[LoraInjection, dict]:
    """The LoRA whose trainable parameters come closest to Engram's (they grow linearly with the rank), and the
    counts: trainable parameters (elements of the parameters that require gradients) of each, Engram's table
    share, and the parameters used per token (Engram reads ``orders x n_embed_per_ngram`` table values a layer)."""
    probe = engram.attach(copy.deepcopy(base), tokenizer)
    cfg = getattr(probe, ATTRIBUTE).cfg
    tables = sum(p.numel() for _, p in param_groups(probe)["tables"])
    engram_params = trainable_parameters(probe)
    per_rank = trainable_parameters(LoraInjection(1).attach(copy.deepcopy(base), tokenizer))
    lora = LoraInjection(max(1, round(engram_params / per_rank)), s.lora_alpha)
    reads = len(cfg.layer_ids) * cfg.n_embed_per_ngram * (cfg.max_ngram_size - 1)
    return lora, {"engram": engram_params, "engram_tables": tables, "engram_used_per_token": engram_params - tables
                  + reads, "lora_rank": lora.rank, "lora_per_rank": per_rank, "lora": lora.rank * per_rank}


def table_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in param_groups(model)["tables"]}


def rows_changed(model, before: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(table rows whose values changed since ``before``, all table rows)."""
    after = dict(param_groups(model)["tables"])
    changed = sum(int((after[name] != rows).any(dim=1).sum()) for name, rows in before.items())
    return changed, sum(rows.shape[0] for rows in before.values())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def inject_optim(method, s: Settings, steps: int) -> OptimConfig:
    lr = s.engram_lr if method.name == "engram" else s.lora_lr
    return OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=max(1, steps // 20))


def task_batches(task: Task, s: Settings) -> TokenBatches:
    return TokenBatches(task.tokens, task.batch, task.seq_len, s.seed)


def inject(base, method, task: Task, steps: int, data: Data, s: Settings, device: torch.device, tokenizer,
           work: Path):
    """Train ``method``'s adapter on ``task`` for ``steps`` from a copy of ``base``; returns (the model, its
    measurements)."""
    torch.manual_seed(s.seed)
    model = method.attach(copy.deepcopy(base), tokenizer).to(device)
    before = table_snapshot(model) if method.name == "engram" else None
    optim = inject_optim(method, s, steps)
    start = time.perf_counter()
    losses = train_adapter(model, task_batches(task, s), steps, optim, device, f"{task.name} {method.name}")
    result = {"train_seconds": time.perf_counter() - start, "trainable_params": trainable_parameters(model),
              "lr": optim.lr, "loss_curve": losses, **measure(model, task, data, s, device)}
    if before is not None:
        result["rows_changed"], result["rows_total"] = rows_changed(model, before)
    folder = method.save(model, work / f"{task.name}-{method.name}")
    result["adapter_bytes"] = folder_bytes(folder)
    return model, result


# ---------------------------------------------------------------- the run

def run(data_dir: Path, s: Settings, device: torch.device, work: Path) -> dict:
    """The whole comparison (module docstring); adapters are saved under ``work`` to be measured."""
    import peft
    import transformers

    started = time.perf_counter()
    data = Data.load(data_dir)
    tokenizer = data.hf_tokenizer()
    base = build_base(s, data.tokenizer.get_vocab_size(), data).to(device)
    results: dict = {
        "settings": asdict(s), "data": {k: v for k, v in data.info.items() if k != "answer_words"},
        "answer_words": len(data.info["answer_words"]),
        "environment": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                        or platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "python": platform.python_version()},
        "base": {"params": sum(p.numel() for p in base.parameters())}}
    results["base"].update(pretrain(base, data, s, device))

    engram = engram_method(s, tokenizer)
    lora, results["params"] = parameter_budget(base, engram, tokenizer, s)

    tasks = [fact_task(data, n, s) for n in s.facts]
    tasks.append(Task("domain", data.arrays["domain-train"], s.seq_len, s.domain_batch))
    probes = {method.name: seconds_per_step(method.attach(copy.deepcopy(base), tokenizer).to(device),
                                            task_batches(tasks[-1], s), inject_optim(method, s, s.inject_steps), device)
              for method in (engram, lora)}
    steps = max(1, min(s.inject_steps, int(s.inject_seconds / (len(tasks) * sum(probes.values())))))
    results["injection"] = {"steps": steps, "planned_steps": s.inject_steps, "step_seconds_probe": probes}
    results["tasks"], results["throughput"] = {}, {}
    prompts = torch.from_numpy(data.arrays["domain-val"][:s.throughput_batch * s.throughput_prompt].astype(np.int64))
    prompts = prompts.view(s.throughput_batch, s.throughput_prompt).to(device)
    pad = tokenizer.pad_token_id
    for task in tasks:
        entry = {"train_tokens_available": len(task.tokens), "steps": steps,
                 "tokens_seen": steps * task.batch * task.seq_len, "base": measure(base, task, data, s, device)}
        for method in (engram, lora):
            model, entry[method.name] = inject(base, method, task, steps, data, s, device, tokenizer, work)
            if task.facts is None:
                results["throughput"][method.name] = generation_throughput(
                    model, prompts, s.throughput_new, s.throughput_repeats, pad)
                if method.name == "engram":  # the same model as an EngramLM: engram serve's decode loop
                    results["throughput"]["engram-exported"] = generation_throughput(
                        to_engram_lm(model, data.folder / TOKENIZER), prompts, s.throughput_new,
                        s.throughput_repeats, pad)
                if method.name == "lora":
                    results["throughput"]["lora-merged"] = generation_throughput(
                        copy.deepcopy(model).merge_and_unload(), prompts, s.throughput_new, s.throughput_repeats,
                        pad)
            del model
        results["tasks"][task.name] = entry
    results["throughput"]["base"] = generation_throughput(base, prompts, s.throughput_new, s.throughput_repeats, pad)
    results["seconds"] = time.perf_counter() - started
    return results


# ---------------------------------------------------------------- report

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _task_row(task: str, method: str, m: dict) -> str:
    cells = [task, method,
             _pct(m["recall_paraphrase"]) if "recall_paraphrase" in m else "",
             _pct(m["recall_trained"]) if "recall_trained" in m else "",
             f"{m['domain_loss']:.4f}" if "domain_loss" in m else "",
             f"{m['base_val_loss']:.4f}",
             f"{m['rows_changed']:,} / {m['rows_total']:,}" if "rows_changed" in m else "",
             f"{m['adapter_bytes'] / 1e6:.2f} MB" if "adapter_bytes" in m else "",
             f"{m['train_seconds']:.1f}" if "train_seconds" in m else ""]
    return "| " + " | ".join(cells) + " |"


def markdown(r: dict) -> str:
    b, p = r["base"], r["params"]
    lines = [
        f"Base: LlamaForCausalLM, {b['params'] / 1e6:.2f}M parameters, pretrained {b['steps']} steps "
        f"({b['tokens'] / 1e6:.1f}M tokens, {b['seconds']:.0f} s) on {', '.join(r['data']['pretrain_sources'])}; "
        f"device {r['environment']['device']}; whole run {r['seconds']:.0f} s.",
        f"Trainable parameters: Engram {p['engram']:,} (tables {p['engram_tables']:,}; "
        f"{p['engram_used_per_token']:,} used per token), LoRA rank {p['lora_rank']} {p['lora']:,} "
        f"(all used per token). Each injection: {r['injection']['steps']} steps (planned "
        f"{r['injection']['planned_steps']}), the same batches for both methods.", "",
        "| task | method | recall, held-out paraphrase | recall, trained phrasing | domain loss | "
        "pretraining val loss (forgetting) | rows changed / total | adapter size | train s |",
        "|---|---|---|---|---|---|---|---|---|"]
    lines += [_task_row(name, method, task[method]) for name, task in r["tasks"].items()
              for method in ("base", "engram", "lora")]
    lines += ["", "| paraphrase template | " + " | ".join(
        f"{name} {method}" for name, task in r["tasks"].items() if "recall_by_paraphrase" in task["base"]
        for method in ("engram", "lora")) + " |"]
    fact_tasks = [(name, task) for name, task in r["tasks"].items() if "recall_by_paraphrase" in task["base"]]
    lines.append("|---|" + "---|" * (2 * len(fact_tasks)))
    for template in PARAPHRASE_TEMPLATES:
        cells = [_pct(task[method]["recall_by_paraphrase"][template]) for _, task in fact_tasks
                 for method in ("engram", "lora")]
        lines.append(f"| `{template}` | " + " | ".join(cells) + " |")
    t = r["throughput"]
    lines += ["", "| generation (greedy, KV cache) | tokens/s | vs base |", "|---|---|---|"]
    base_rate = t["base"]["tokens_per_s"]
    lines += [f"| {name} | {t[name]['tokens_per_s']:,.0f} | {t[name]['tokens_per_s'] / base_rate:.2f}x |"
              for name in ("base", "engram", "engram-exported", "lora", "lora-merged") if name in t]
    return "\n".join(lines) + "\n"


def plots(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, colours = ("base", "engram", "lora"), {"base": "grey", "engram": "tab:blue", "lora": "tab:orange"}
    facts = [name for name, task in r["tasks"].items() if "recall_paraphrase" in task["base"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(axes, ("recall_paraphrase", "recall_trained"),
                              ("held-out paraphrase", "trained phrasing")):
        for i, method in enumerate(methods):
            ax.bar(np.arange(len(facts)) + (i - 1) * 0.27, [r["tasks"][f][method][key] for f in facts], 0.27,
                   label=method, color=colours[method])
        ax.set_xticks(range(len(facts)), facts)
        ax.set_title(f"exact-match recall, {title}")
    axes[0].set_ylabel("share of facts")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    domain = r["tasks"]["domain"]
    axes[0].bar(methods, [domain[m]["domain_loss"] for m in methods], color=[colours[m] for m in methods])
    axes[0].set_title("domain validation loss (nats/token)")
    names = list(r["tasks"])
    for i, method in enumerate(methods):
        axes[1].bar(np.arange(len(names)) + (i - 1) * 0.27, [r["tasks"][n][method]["base_val_loss"] for n in names],
                    0.27, label=method, color=colours[method])
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_title("pretraining validation loss after injection")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.5))
    axes[0].plot(r["base"]["loss_curve"], color="grey")
    axes[0].set_title("base pretraining")
    for ax, name in zip(axes[1:], names):
        for method in ("engram", "lora"):
            ax.plot(r["tasks"][name][method]["loss_curve"], label=method, color=colours[method])
        ax.set_title(f"injection: {name}")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="write the run's inputs into DIR, then stop")
    parser.add_argument("--pretrain-sources", nargs="+", default=["gutenberg", "shakespeare"])
    parser.add_argument("--domain-sources", nargs="+", default=["sotu"])
    parser.add_argument("--vocab", type=int, default=8192, help="BPE ids (--prepare)")
    parser.add_argument("--answer-words", type=int, default=512, help="distinct answers of the facts (--prepare)")
    parser.add_argument("--data", type=Path, help="a --prepare folder")
    parser.add_argument("--out", type=Path, help="where results.json, results.md and the plots go")
    parser.add_argument("--quick", action="store_true", help="toy sizes (CPU, seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    overrides = {"facts": int, "inject_steps": int, "inject_seconds": float, "pretrain_steps": int,
                 "pretrain_seconds": float, "engram_layers": int, "engram_rows": int, "engram_lr": float,
                 "lora_lr": float, "seed": int}
    for name, kind in overrides.items():
        many = "+" if name in ("facts", "engram_layers") else None
        parser.add_argument("--" + name.replace("_", "-"), type=kind, nargs=many, help=f"overrides Settings.{name}")
    args = parser.parse_args(argv)
    if args.prepare is not None:
        info = prepare(args.prepare, args.pretrain_sources, args.domain_sources, args.vocab, args.answer_words)
        print(json.dumps({k: v for k, v in info.items() if k != "answer_words"}, indent=1))
        return 0
    if args.data is None or args.out is None:
        parser.error("a run needs --data (a --prepare folder) and --out")
    settings = Settings.quick() if args.quick else Settings()
    settings = replace(settings, **{k: getattr(args, k) for k in overrides if getattr(args, k) is not None})
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.quick:
        torch.set_num_threads(1)  # toy matrices: threads only add contention on a shared CPU
    try:
        with tempfile.TemporaryDirectory() as work:
            results = run(args.data, settings, torch.device(args.device), Path(work))
    finally:
        torch.set_num_threads(threads)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    plots(results, args.out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
