"""The training loop: data, the paper's optimiser recipe, logging, validation, exact resume.

Under ``torchrun`` every rank trains its slice of each global batch: Engram tables are row-sharded over the
ranks and the rest is replicated under DDP (:mod:`engram.parallel`); ``batch_size`` stays the global batch and
the logged loss the global-batch mean, so the same flags give the same optimisation at any world size. Rank 0
alone logs; in checkpoints every rank writes its table rows and rank 0 the rest; they resume at any world size.

A run folder holds ``run.json`` (the settings), ``metrics.jsonl`` (one JSON object per logged step,
appended across resumes: ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, with MoE layers ``moe_load_by_layer``
(each MoE layer's most loaded expert against an even split, bottom first), ``moe_load_max`` (their largest) and
``moe_hot_expert_by_layer`` (that expert's index), and at evaluations ``val_loss`` and ``val_bpb``), ``tensorboard/``
(when TensorBoard is installed), ``checkpoints/`` and, at the end, ``final/`` (a ``save_pretrained`` folder).
The batch of step ``s`` is a pure function of the seed and ``s``, so a resumed run, or a second model trained with
the same seed, sees the same data in the same order.
Every checkpoint holds the run's ``TrainConfig``; a resume refuses settings that would change the model, the
data or its order, or the optimiser's updates (all but :data:`RESUMABLE_CHANGES`), naming each difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from engram.data.batches import TokenBatches, token_byte_lengths, validation_batches
from engram.data.corpus import Corpus, load_or_prepare
from engram.data.sources import PRESETS as DATA_PRESETS
from engram.model import PRESETS, EngramLM, EngramLMConfig
from engram.model.lm import LMOutput
from engram.parallel import DistContext, init_distributed, local_rows, shard_engram_tables, wrap_ddp
from engram.parallel.checkpoint import gather_full_model, load_table_moments, sharded_tables, write_table_shards
from engram.parallel.distributed import all_reduce_sum, sync_router_load
from engram.train.checkpoint import (latest_checkpoint, load_checkpoint, remove_stale_staging, save_checkpoint,
                                     staging_folder)
from engram.train.optim import NOT_A_FLAG, EngramOptimizer, OptimConfig, enable_sparse_tables

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
DEFAULT_DATA = ("shakespeare",)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile modes


@dataclass
class TrainConfig:
    """Settings of one training run. Every field but ``model`` is a flag of ``engram train`` and ``engram sweep``
    (:mod:`engram.cli.flags`; ``metadata`` holds its help text)."""

    preset: str = field(default="tiny", metadata={
        "help": f"model preset: {', '.join(PRESETS)} (default: %(default)s)"})
    data: list[str] = field(default_factory=lambda: list(DEFAULT_DATA), metadata={
        "metavar": "SOURCE",
        "help": f"preset names ({', '.join(DATA_PRESETS)}), .txt/.jsonl/.parquet files or folders, or a prepared "
                "corpus; with too few documents for a split by document (one text file) the last 5%% of each is "
                f"validation (default: {' '.join(DEFAULT_DATA)})"})
    tokenizer: str = field(default="bpe-4096", metadata={
        "help": "'deepseek-v3', a tokenizer.json path, or 'bpe-N' (a byte-level BPE of N ids trained on the data) "
                "(default: %(default)s)"})
    out: str = field(default="runs/engram", metadata={
        "default": None,  # on the command line: a new run folder per run
        "help": "run folder (default: runs/PRESET-YYYYmmdd-HHMMSS)"})
    max_steps: int = field(default=300, metadata={"help": "optimiser steps to train for (default: %(default)s)"})
    batch_size: int = field(default=16, metadata={
        "help": "sequences per step, over all processes (default: %(default)s)"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches each step's batch is split into (divides --batch-size) (default: %(default)s)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence (default: %(default)s)"})
    seed: int = field(default=0, metadata={
        "help": "seed of the initial weights and of the batch order (default: %(default)s)"})
    device: str = field(default="auto", metadata={
        "help": "'auto' (CUDA when available), 'cpu', 'cuda', ... (default: %(default)s)"})
    compile: bool | None = field(default=None, metadata={  # None: on CUDA (faster there), not on the CPU
        "help": "torch.compile the model (default: on CUDA, not on the CPU)"})
    compile_mode: str = field(default="default", metadata={"choices": COMPILE_MODES, "help": (
        "torch.compile mode when compiling: 'reduce-overhead' replays the compiled forward and backward as CUDA "
        "graphs (no per-kernel launch cost) (default: %(default)s)")})
    eval_every: int = field(default=100, metadata={
        "help": "steps between validation passes (and one at the end) (default: %(default)s)"})
    eval_batches: int = field(default=16, metadata={
        "help": "validation batches per pass, at most (default: %(default)s)"})
    log_every: int = field(default=10, metadata={"help": "steps between lines of metrics.jsonl (default: %(default)s)"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (default: %(default)s)"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept: a save deletes the older ones (default: %(default)s)"})
    resume: bool = field(default=False, metadata={  # only RESUMABLE_CHANGES may differ from the checkpoint's run
        "help": "continue the run in --out from its latest checkpoint (engram train without --out: the latest "
                "runs/PRESET-YYYYmmdd-HHMMSS run)"})
    tensorboard: bool = field(default=True, metadata={
        "help": "no TensorBoard logs (written into tensorboard/ of the run folder when TensorBoard is installed)"})
    progress: bool = field(default=True, metadata={
        "help": "no progress bar (stage messages and the final summary still print)"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The model to train, before the data's tokenizer and seq_len are applied (model_config_for); None: the preset's.
    model: EngramLMConfig | None = field(default=None, metadata=NOT_A_FLAG)

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        if isinstance(self.data, str):
            self.data = [self.data]
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches",
                     "log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        if not self.data:
            raise ValueError("data must name at least one source")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config_for(cfg: TrainConfig, corpus: Corpus) -> EngramLMConfig:
    """``cfg.model`` (else its preset's) with the corpus's tokenizer and room for the run's sequence length."""
    model = cfg.model if cfg.model is not None else EngramLMConfig.from_preset(cfg.preset)
    changes: dict[str, Any] = {"max_position_embeddings": max(model.max_position_embeddings, cfg.seq_len)}
    if model.tokenizer != corpus.tokenizer_name:
        tokenizer, vocab = str(corpus.tokenizer_path), corpus.vocab_size
        changes.update(tokenizer=tokenizer, vocab_size=-(-vocab // 64) * 64, tokenizer_vocab_size=vocab)
        if model.engram is not None:
            changes["engram"] = dataclasses.replace(model.engram, tokenizer=tokenizer,
                                                    pad_id=min(model.engram.pad_id, vocab - 1))
    return dataclasses.replace(model, **changes)


def lm_loss(forward: Callable[..., LMOutput], inputs: torch.Tensor, targets: torch.Tensor,
            autocast: bool, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token cross entropy of ``forward(inputs)`` against ``targets`` (both int64 ``[B, T]``) and the MoE
    auxiliary loss; under bf16 autocast on CUDA when ``autocast``. ``reduction`` as in ``F.cross_entropy``
    (``"none"``: ``[B * T]``). The model computes the loss itself (``forward(inputs, targets=...)``, a chunk of
    tokens at a time), so no ``[B, T, V]`` logits are made."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = forward(inputs, targets=targets, loss_reduction=reduction)
    return (out.loss.flatten() if reduction == "none" else out.loss), out.aux_loss


def rank_objective(loss_sum: torch.Tensor, aux: torch.Tensor | None, batch_tokens: int, share: float
                   ) -> torch.Tensor:
    """This rank's part of the global-batch objective: its summed token losses over the global micro-batch's
    ``batch_tokens``, plus the MoE auxiliary loss times its ``share`` of the sequences. The ranks' gradients are
    summed (:mod:`engram.parallel`), which makes them the global-batch mean's whatever the split."""
    return loss_sum / batch_tokens if aux is None else loss_sum / batch_tokens + aux * share


def optimizer_step(model: EngramLM, optimizer: EngramOptimizer, dist_ctx: DistContext) -> float:
    """Clip, step and clear the gradients, then update the MoE balancing biases from the load summed over the
    ranks; returns the dense gradients' norm before clipping."""
    grad_norm = optimizer.clip_grad_norm()
    optimizer.step()
    optimizer.zero_grad()
    sync_router_load(model, dist_ctx)
    model.update_router_biases()
    return float(grad_norm)


@torch.no_grad()
def evaluate_loss(forward: Callable[[torch.Tensor], LMOutput], batches: list[tuple[torch.Tensor, torch.Tensor]],
                  token_bytes: torch.Tensor, device: torch.device, autocast: bool,
                  dist_ctx: DistContext = DistContext()) -> dict[str, float]:
    """Loss (nats per token) and bits per byte of ``forward`` over ``batches`` (:func:`validation_batches`).

    ``token_bytes``: int64 ``[V]`` UTF-8 bytes per token id on ``device`` (:func:`token_byte_lengths`). Under
    torchrun each rank scores its rows of every batch and the sums are reduced over the ranks.
    """
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for inputs, targets in batches:
        rows = local_rows(inputs.shape[0], dist_ctx)
        inputs, targets = inputs[rows].to(device), targets[rows].to(device)
        losses, _ = lm_loss(forward, inputs, targets, autocast, reduction="none")
        total_nats += float(losses.sum())
        total_tokens += targets.numel()
        total_bytes += int(token_bytes[targets].sum())
    total_nats, total_tokens, total_bytes = all_reduce_sum([total_nats, total_tokens, total_bytes], dist_ctx, device)
    return {"val_loss": total_nats / total_tokens, "val_bpb": total_nats / math.log(2) / max(total_bytes, 1)}


def _config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "", saved: str = "checkpoint"
                        ) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_differences(va, vb, f"{prefix}{key}.", saved)
        elif va != vb:
            out.append(f"{prefix}{key}: {saved} {va!r}, now {vb!r}")
    return out


# TrainConfig fields a resumed run may change: they alter neither the model nor the batches nor the updates
# before max_steps (extending a run is what resuming is for; the LR schedule then spans the new max_steps).
RESUMABLE_CHANGES = frozenset({"out", "resume", "max_steps", "device", "compile", "compile_mode", "eval_every",
                               "eval_batches", "log_every", "save_every", "keep_checkpoints", "tensorboard", "progress"})


def _exact_resume_settings(train_config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a ``TrainConfig.to_dict()`` that must not change across a resume: this code's fields (a
    checkpoint written before ``model`` replaced ``model_overrides`` resumes too) but the model, which is compared
    as built with the checkpoint's own ``config.json`` (``Trainer._load_model``)."""
    return {item.name: train_config.get(item.name) for item in dataclasses.fields(TrainConfig)
            if item.name not in RESUMABLE_CHANGES and item.name != "model"}


def _without_tokenizer(model_config: dict[str, Any]) -> dict[str, Any]:
    """A model ``to_dict()`` without its tokenizer paths (a checkpoint carries its own copy, under another path)."""
    data = {**model_config, "tokenizer": None}
    if data.get("engram"):
        data["engram"] = {**data["engram"], "tokenizer": None}
    return data


def finished_run_differences(run_dir: Path, cfg: TrainConfig, corpus: Corpus) -> list[str]:
    """How a run recorded in ``run_dir`` (its ``run.json``) differs from training ``cfg`` on ``corpus`` in what
    shapes its result: the corpus (by content: index and tokenizer digest, wherever it and its tokenizer lie), every
    setting that an exact resume keeps but the data and tokenizer paths, ``max_steps``, and the model but its
    tokenizer path. ``ValueError`` when there is no ``run.json`` to compare."""
    record = run_dir / RUN_FILE
    if not record.is_file():
        raise ValueError(f"{run_dir} has no {RUN_FILE}: what it was trained with cannot be checked")
    saved = json.loads(record.read_text())

    def settings(train: dict[str, Any]) -> dict[str, Any]:
        kept = {**_exact_resume_settings(train), "max_steps": train.get("max_steps")}
        return {key: value for key, value in kept.items() if key not in ("data", "tokenizer")}

    def content(info: dict[str, Any]) -> dict[str, Any]:  # tokenizer: the path it was prepared with (sha256 kept)
        return {key: value for key, value in info.items() if key not in ("path", "tokenizer")}

    wanted = json.loads(json.dumps({"train": cfg.to_dict(), "corpus": corpus.info_dict()}, default=str))  # as saved
    differences = _config_differences(settings(saved["train"]), settings(wanted["train"]), saved="run")
    differences += _config_differences(content(saved.get("corpus", {})), content(wanted["corpus"]), "corpus.", "run")
    if cfg.model is not None:
        differences += _config_differences(_without_tokenizer(saved["model"]),
                                           _without_tokenizer(wanted["train"]["model"]), "model.", "run")
    return differences


class Trainer:
    """Train one model as ``TrainConfig`` says; :meth:`train` returns a summary dict."""

    def __init__(self, cfg: TrainConfig, console: Console | None = None):
        self.cfg = cfg
        self.dist, self.device = init_distributed(cfg.device)
        self.console = console or Console(quiet=not self.dist.is_main)
        self.out = Path(cfg.out)
        self.step = 0
        checkpoint = self._existing_checkpoint()
        for stale in remove_stale_staging(self.out) if self.dist.is_main else []:
            self.console.print(f"removed {stale}, left by a save that was killed midway")
        saved = load_checkpoint(checkpoint) if checkpoint is not None else None  # (step, optimizer, trainer)
        if saved is not None:  # before the corpus, whose preparation may take long
            self._check_resumable(checkpoint, saved[0], saved[2]["train_config"])
        with self.dist.main_first():  # rank 0 prepares the corpus, the others then read it
            self.corpus = load_or_prepare(cfg.data, tokenizer=cfg.tokenizer,
                                          progress=cfg.progress and self.dist.is_main, console=self.console)
        self.model_cfg = model_config_for(cfg, self.corpus)
        torch.manual_seed(cfg.seed)
        if checkpoint is not None:
            self.model = self._load_model(checkpoint)
        else:
            self.model = EngramLM(self.model_cfg)
        enable_sparse_tables(self.model)
        if self.dist.enabled:
            shard_engram_tables(self.model)
        self.model.to(self.device)
        self.optimizer = EngramOptimizer(self.model, cfg.optim)
        if saved is not None:
            self._restore(checkpoint, *saved)
        self.micro_batch = cfg.batch_size // cfg.grad_accum
        self.rows = local_rows(self.micro_batch, self.dist)
        self.batches = TokenBatches(self.corpus.tokens("train", cfg.seq_len), self.micro_batch, cfg.seq_len, cfg.seed)
        self.val_batches = validation_batches(self.corpus.tokens("val", cfg.seq_len), self.micro_batch, cfg.seq_len,
                                              cfg.eval_batches)
        self.token_bytes = torch.from_numpy(token_byte_lengths(self.corpus.tokenizer)).to(self.device)
        self.autocast = self.device.type == "cuda"
        wrapped = wrap_ddp(self.model, self.dist, self.device)
        self.compiled = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        self.forward = torch.compile(wrapped, mode=cfg.compile_mode) if self.compiled else wrapped

    def _existing_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: refused without ``resume``, required with it."""
        checkpoint = latest_checkpoint(self.out) if self.out.exists() else None
        if checkpoint is not None and not self.cfg.resume:
            raise FileExistsError(f"{self.out} already holds a run (checkpoint {checkpoint.name}); pass --resume to "
                                  "continue it or choose another --out")
        if checkpoint is None and self.cfg.resume:
            where = "no checkpoint there" if self.out.exists() else "the folder does not exist"
            raise FileNotFoundError(f"nothing to resume in {self.out}: {where}; run without --resume to start a "
                                    "new run")
        return checkpoint

    def _check_resumable(self, checkpoint: Path, step: int, saved: dict[str, Any]) -> None:
        """Refuse settings that differ from those ``checkpoint`` was trained with where that breaks exact resume
        (``saved``: its ``TrainConfig.to_dict()``), or a ``max_steps`` the run is already past."""
        differences = _config_differences(_exact_resume_settings(saved), _exact_resume_settings(self.cfg.to_dict()))
        if differences:
            raise ValueError(f"refusing to resume from {checkpoint}: these settings differ from the run's and would "
                             "break exact resume: " + "; ".join(differences) + ". Pass the run's values (see "
                             f"{self.out / RUN_FILE}) or choose another --out to start a new run")
        if step > self.cfg.max_steps:
            raise ValueError(f"cannot resume {checkpoint} at step {step} with max_steps {self.cfg.max_steps}: "
                             f"pass --max-steps {step} or more")
        if saved["max_steps"] != self.cfg.max_steps:
            self.console.print(f"max_steps {saved['max_steps']} -> {self.cfg.max_steps}: the learning-rate "
                               f"schedule from step {step} on is that of a {self.cfg.max_steps}-step run")

    def _load_model(self, checkpoint: Path) -> EngramLM:
        saved = json.loads((checkpoint / "config.json").read_text())["model"]
        differences = _config_differences(_without_tokenizer(saved), _without_tokenizer(self.model_cfg.to_dict()))
        if differences:
            raise ValueError(f"refusing to resume from {checkpoint}: it was written for another model config: "
                             + "; ".join(differences))
        model = EngramLM.from_pretrained(checkpoint)
        tokenizer = Path(self.model_cfg.tokenizer)
        if model.cfg.tokenizer != self.model_cfg.tokenizer and not filecmp.cmp(model.cfg.tokenizer, tokenizer,
                                                                                shallow=False):
            raise ValueError(f"refusing to resume from {checkpoint}: its tokenizer.json differs from the data's "
                             f"tokenizer {tokenizer}")
        model.cfg = self.model_cfg  # not the checkpoint's tokenizer copy, which goes when rotation deletes it
        return model

    def _restore(self, checkpoint: Path, step: int, optimizer_state: dict[str, Any],
                 trainer_state: dict[str, Any]) -> None:
        """Load ``checkpoint``'s optimiser and RNG states and step (as :func:`load_checkpoint` returns them)."""
        self.optimizer.load_state_dict(load_table_moments(optimizer_state, self.model, checkpoint))
        torch.set_rng_state(trainer_state["torch_rng"])
        if self.device.type == "cuda" and trainer_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(trainer_state["cuda_rng"])
        kind, keys, pos, has_gauss, gauss = trainer_state["numpy_rng"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, python_gauss = trainer_state["python_rng"]
        random.setstate((version, tuple(internal), python_gauss))
        self.step = step
        self.console.print(f"resumed from {checkpoint} at step {step}")

    def save(self, final: bool = False) -> Path | None:
        """Write a checkpoint and, with ``final``, the ``final/`` model folder. Under torchrun every rank writes
        its rows of the sharded tables, rank 0 the rest (``engram.parallel.checkpoint``). Returns the checkpoint
        folder (``None`` on the other ranks)."""
        optimizer_state, staging, table_parts = self.optimizer.state_dict(), None, None
        if sharded_tables(self.model):
            staging = staging_folder(self.out, self.step, shared=True)
            if self.dist.is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            dist.barrier()
            table_parts, optimizer_state = write_table_shards(staging, self.model, optimizer_state)
            dist.barrier()
        path = self._save_checkpoint(optimizer_state, staging, table_parts) if self.dist.is_main else None
        if final:
            model = gather_full_model(self.model)  # a collective when tables are sharded
            if self.dist.is_main:
                model.save_pretrained(self.out / "final")
        return path

    def _save_checkpoint(self, optimizer_state: dict[str, Any], staging: Path | None,
                         table_parts: dict[int, list[list[Any]]] | None) -> Path:
        trainer_state = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "numpy_rng": _jsonable_numpy_rng(np.random.get_state()),
            "python_rng": _jsonable_python_rng(random.getstate()),
            "train_config": self.cfg.to_dict(),
        }
        return save_checkpoint(self.out, self.step, self.model, optimizer_state, trainer_state,
                               keep=self.cfg.keep_checkpoints, staging=staging, table_parts=table_parts)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return lm_loss(self.forward, inputs, targets, self.autocast, reduction)

    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per token) and bits per byte over the fixed validation windows."""
        self.model.eval()
        metrics = evaluate_loss(self.forward, self.val_batches, self.token_bytes, self.device, self.autocast, self.dist)
        self.model.train()
        return metrics

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = self.optimizer.set_lr(self.step, cfg.max_steps)
        batch_tokens = self.micro_batch * cfg.seq_len  # of the global micro-batch, over every rank
        share = (self.rows.stop - self.rows.start) / self.micro_batch
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            inputs, targets = self.batches.batch(self.step * cfg.grad_accum + micro)
            if self.compiled:  # the compiled model skips its id range check (a host sync): done here on the CPU
                self.model.check_input_ids(inputs)
            inputs, targets = inputs[self.rows].to(self.device), targets[self.rows].to(self.device)
            loss, aux = self._loss(inputs, targets, reduction="sum")
            (rank_objective(loss, aux, batch_tokens, share) / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        grad_norm = optimizer_step(self.model, self.optimizer, self.dist)
        self.step += 1
        (loss_sum,) = all_reduce_sum([loss_sum], self.dist, self.device)
        return {"loss": loss_sum / (batch_tokens * cfg.grad_accum), "lr": lr, "grad_norm": grad_norm}

    def train(self) -> dict[str, Any]:
        """Run to ``max_steps`` (from the resumed step); Ctrl-C saves a checkpoint and returns."""
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_FILE).write_text(json.dumps({"train": cfg.to_dict(), "model": self.model_cfg.to_dict(),
                                                         "corpus": self.corpus.info_dict()}, indent=2, default=str))
        writer = self._tensorboard() if main else None
        tokens_per_step = cfg.batch_size * cfg.seq_len
        metrics: dict[str, Any] = {}
        interrupted = False
        started, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
        self.model.train()
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  lr {task.fields[lr]}"),
                            TimeRemainingColumn(), console=self.console, disable=not (cfg.progress and main))
        try:
            with progress, open(self.out / METRICS_FILE, "a") if main else contextlib.nullcontext() as log:
                task = progress.add_task(self.out.name, total=cfg.max_steps, completed=self.step,
                                         loss="-", tps="-", lr="-")
                while self.step < cfg.max_steps:
                    metrics = self.train_step()
                    window_steps += 1
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or self.step % cfg.eval_every == 0:
                        elapsed = time.perf_counter() - window_start
                        metrics["tokens_per_s"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
                        routing = self.model.router_load_stats()  # this rank's last micro-batch
                        if routing is not None:
                            metrics["moe_load_max"] = max(routing["imbalance"])
                            metrics["moe_load_by_layer"] = routing["imbalance"]
                            metrics["moe_hot_expert_by_layer"] = routing["hot_expert"]
                        window_start, window_steps = time.perf_counter(), 0
                        if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                            metrics.update(self.evaluate())
                            window_start = time.perf_counter()  # validation time is not training time
                        record = {"step": self.step, "tokens": self.step * tokens_per_step, **metrics}
                        if log is not None:
                            log.write(json.dumps(record) + "\n")
                            log.flush()
                        if writer is not None:
                            for key, value in record.items():
                                if isinstance(value, list):  # one curve per entry: key/0, key/1, ...
                                    for index, entry in enumerate(value):
                                        writer.add_scalar(f"{key}/{index}", entry, self.step)
                                elif key != "step":
                                    writer.add_scalar(key, value, self.step)
                        progress.update(task, loss=f"{metrics['loss']:.3f}", tps=f"{metrics['tokens_per_s']:,.0f}",
                                        lr=f"{metrics['lr']:.2e}")
                    progress.update(task, completed=self.step)
                    if self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                        self.save()
        except KeyboardInterrupt:
            interrupted = True
            path = self.save()
            self.console.print(f"[yellow]interrupted at step {self.step}: checkpoint written to {path}[/yellow]")
        finally:
            if writer is not None:
                writer.close()
        if not interrupted:
            self.save(final=True)
        return {"step": self.step, "interrupted": interrupted, "seconds": time.perf_counter() - started,
                "metrics": metrics, "params": self.model.param_report(cfg.seq_len)}

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.console.print("TensorBoard logs off: `pip install tensorboard` to write them")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))


def _jsonable_python_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _jsonable_numpy_rng(state: tuple) -> list:
    kind, keys, pos, has_gauss, gauss = state
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
