"""``EngramForCausalLM``: an :class:`~engram.model.EngramLM` as a transformers causal LM (``AutoModelForCausalLM``,
``generate()``, ``CausalLMOutputWithPast``), and :class:`EngramCache`, its KV cache behind transformers' ``Cache``.

Loading and saving go through EngramLM's own :mod:`engram.model.serialization` (checksums, the hashing fingerprint
check, table files and their placements), so a folder is the same whichever side wrote it.

Decoding: EngramLM's attention keeps its own KV cache (:meth:`EngramLM.new_cache`), and incremental Engram hashing
needs the last raw ids of the sequence besides it. :class:`EngramCache` holds both and is the ``cache`` that
transformers passes from step to step: ``generate(use_cache=True)`` (the default) creates one sized like
:meth:`EngramLM.generate` does (prompt + new tokens), feeds one token per step and gives
:meth:`EngramLM.generate`'s tokens; ``use_cache=False`` recomputes the whole sequence every step. By hand:
``out = model(ids, use_cache=True)`` then ``model(next_ids, cache=out.cache, attention_mask=...)``. Beam search (which
reorders a cache) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Cache, GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from engram.atomic import atomic_path, atomic_write_text
from engram.hf.config import EngramHFConfig, special_token_ids
from engram.model.lm import EngramLM
from engram.model.serialization import MAX_SHARD_BYTES, TOKENIZER_NAME, load_pretrained
from engram.tokenizer import load_tokenizer, resolve_tokenizer_path

if TYPE_CHECKING:
    from engram.model.attention import KVCache

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# What AutoModelForCausalLM.from_pretrained passes on besides the caller's arguments; a local folder needs none.
HUB_KWARGS = frozenset({"cache_dir", "force_download", "local_files_only", "proxies", "subfolder", "revision",
                        "token", "trust_remote_code", "adapter_kwargs", "_from_auto"})
# Table placement options of EngramLM.from_pretrained (engram.storage.open_table_store).
PLACEMENT_OPTIONS = frozenset({"host_method", "workers", "share_memory", "shm_dir", "host_memory_budget", "verify"})
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class EngramCache(Cache):
    """EngramLM's decoding state as a transformers ``Cache``: its :class:`~engram.model.attention.KVCache` (allocated
    at the first forward, for the batch that forward brings, with room for ``max_length`` tokens) and the last raw
    ids Engram hashes the next tokens with (padding as the Engram pad id).

    ``get_seq_length()`` is the tokens seen so far. It has no per-layer cache objects (``layers`` is empty: it is
    neither compilable nor croppable), so transformers' cache utilities beyond that do not apply.
    """

    def __init__(self, max_length: int):
        super().__init__(layers=[])
        if max_length < 1:
            raise ValueError(f"EngramCache max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.sequences: int | None = None
        self.kv: KVCache | None = None  # EngramLM.new_cache's
        self.history: torch.Tensor | None = None  # [B, <= context] raw ids before the next input

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.kv is None else self.kv.seq_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    def forward_with(self, model: EngramLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     **forward_kwargs: Any):
        """``model``'s forward of the next ``input_ids`` ``[B, T]`` continuing this cache (``attention_mask``
        ``[B, past + T]`` or ``None``), the cache advanced past them."""
        batch = input_ids.shape[0]
        if self.kv is None:
            self.kv, self.sequences = model.new_cache(batch, self.max_length), batch
        elif batch != self.sequences:
            raise ValueError(f"this EngramCache holds {self.sequences} sequences, the input {batch}")
        past = self.kv.seq_len
        out = model(input_ids, attention_mask=attention_mask, cache=self.kv, engram_history=self.history,
                    **forward_kwargs)
        if model.hasher is not None:
            hashed = input_ids
            if attention_mask is not None:
                hashed = input_ids.masked_fill(~attention_mask[:, past:].bool(), model.cfg.engram.pad_id)
            self.history = model.hasher.next_history(hashed, self.history)
        return out


class SuppressFrom(LogitsProcessor):
    """Scores of every id from ``start`` on set to -inf: one slice, where transformers' ``suppress_tokens`` tests
    every id of the vocabulary against its list at each step (~20 ms for 129,280 ids on a CPU)."""

    def __init__(self, start: int):
        self.start = start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[B, V]`` with ``scores[:, start:]`` at -inf."""
        return torch.cat([scores[:, :self.start], scores.new_full((scores.shape[0], scores.shape[1] - self.start),
                                                                   float("-inf"))], dim=1)


class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers' face of an :class:`EngramLM` (held as ``self.model``; its weights, its forward).

    Example:
        >>> import engram.hf  # registers "engram" with AutoConfig / AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("ckpt", engram_placement="host")  # doctest: +SKIP
        >>> model.generate(input_ids, do_sample=False, max_new_tokens=8)  # doctest: +SKIP
    """

    config_class = EngramHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: EngramHFConfig, model: EngramLM | None = None):
        """``model``: the EngramLM to wrap (its config must be ``config.model``); ``None`` builds a fresh one."""
        super().__init__(config)
        self.model = model if model is not None else EngramLM(config.engram_lm_config)
        self.post_init()

    @classmethod
    def from_engram(cls, model: EngramLM) -> "EngramForCausalLM":
        """Wrap an existing EngramLM (shares its parameters); the special token ids come from its tokenizer."""
        return cls(EngramHFConfig.for_model(model.cfg), model)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: :meth:`EngramLM.init_weights` set every weight when the EngramLM was built."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # EngramLM's attention does not speak DynamicCache's per-layer protocol: EngramCache instead

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict[str, Any],
                                      generation_mode: Any, batch_size: int, max_cache_length: int) -> None:
        """``generate``'s cache: an :class:`EngramCache` of ``max_cache_length`` tokens (prompt + new tokens - 1),
        unless the caller passed a cache or ``use_cache=False``."""
        if generation_config.num_beams > 1:
            raise ValueError(f"EngramForCausalLM does not beam-search (num_beams={generation_config.num_beams}): "
                             "greedy or sampled decoding only")
        if model_kwargs.get("cache") is None and generation_config.use_cache:
            model_kwargs["cache"] = EngramCache(max_cache_length)

    def _get_logits_processor(self, *args: Any, **kwargs: Any) -> LogitsProcessorList:
        """transformers' processors, led by one that never lets ``generate`` pick the embedding's padding ids (past
        ``tokenizer_vocab_size``), as :meth:`EngramLM.generate` never does."""
        processors = super()._get_logits_processor(*args, **kwargs)
        cfg = self.model.cfg
        if cfg.tokenizer_vocab_size is not None and cfg.tokenizer_vocab_size < cfg.vocab_size:
            processors.insert(0, SuppressFrom(cfg.tokenizer_vocab_size))
        return processors

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: EngramCache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, return_logits: bool | None = None,
                num_items_in_batch: int | torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """``input_ids`` ``[B, T]`` -> logits ``[B, T, V]`` fp32 (``[B, logits_to_keep, V]`` when given), and the
        loss when ``labels`` ``[B, T]`` are given.

        Args:
            attention_mask: ``[B, S]``, 0 at (left) padding, over every token so far (``S = past + T`` with a cache).
            labels: unshifted targets (position ``t`` is scored on ``labels[:, t + 1]``), ``-100`` ignored. The loss
                is EngramLM's (:func:`engram.model.loss.linear_cross_entropy`, a chunk of tokens at a time), plus the
                MoE auxiliary loss while training; the logits are then not made unless ``return_logits=True``.
            cache: an :class:`EngramCache` to continue (``generate`` passes it); returned advanced.
            use_cache: ``True`` without ``cache`` starts an :class:`EngramCache` of ``max_position_embeddings`` tokens
                and returns it; otherwise nothing is cached.
            num_items_in_batch: with ``labels``, divide the summed token losses by this instead of taking their
                mean (transformers' Trainer passes it under gradient accumulation).
            return_dict: accepted for transformers' callers; a ``CausalLMOutputWithPast`` is always returned.
        Raises:
            ValueError: any other input with a value (``inputs_embeds``, ``position_ids``, ...).
        """
        unsupported = sorted(name for name, value in kwargs.items() if value is not None)
        if unsupported:
            raise ValueError(f"EngramForCausalLM.forward does not take {unsupported}")
        if cache is None and use_cache:
            cache = EngramCache(self.model.cfg.max_position_embeddings)
        reduction = "mean" if num_items_in_batch is None or labels is None else "sum"
        arguments = dict(labels=labels, logits_to_keep=logits_to_keep, return_logits=return_logits,
                         loss_reduction=reduction)
        if cache is None:
            out = self.model(input_ids, attention_mask=attention_mask, **arguments)
        else:
            out = cache.forward_with(self.model, input_ids, attention_mask, **arguments)
        loss = out.loss
        if loss is not None and num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        if loss is not None and out.aux_loss is not None:
            loss = loss + out.aux_loss
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, cache=cache)

    def save_pretrained(self, save_directory: str | os.PathLike[str], is_main_process: bool = True,
                        max_shard_size: int | str = MAX_SHARD_BYTES, **kwargs: Any) -> Path:
        """:meth:`EngramLM.save_pretrained`'s folder, plus the text tokenizer (``tokenizer.json``, copied if the
        config names a registered one) and a ``tokenizer_config.json`` naming its special tokens, for
        ``AutoTokenizer``.

        Args:
            is_main_process: ``False`` writes nothing (transformers' convention for the other ranks).
            max_shard_size: bytes per weights shard, an int or a string like ``"2GB"`` / ``"500MiB"``.
            kwargs: transformers' other options are refused (``ValueError`` naming them), except their values
                that change nothing: ``safe_serialization=True`` (safetensors is all EngramLM writes),
                ``push_to_hub=False``, ``state_dict=None`` (what transformers' Trainer passes).
        """
        harmless = {"safe_serialization": lambda v: bool(v), "push_to_hub": lambda v: not v,
                    "state_dict": lambda v: v is None}
        refused = sorted(name for name, value in kwargs.items() if not harmless.get(name, lambda v: False)(value))
        if refused:
            raise ValueError(f"EngramForCausalLM.save_pretrained does not take {refused} (a local folder, safetensors)")
        directory = Path(save_directory)
        if not is_main_process:
            return directory
        self.model.save_pretrained(directory, shard_bytes(max_shard_size))
        if not (directory / TOKENIZER_NAME).is_file():
            with atomic_path(directory / TOKENIZER_NAME) as tmp:
                shutil.copyfile(resolve_tokenizer_path(self.model.cfg.tokenizer), tmp)
        tokenizer = load_tokenizer(directory / TOKENIZER_NAME)
        tokens = {name.removesuffix("_id"): tokenizer.id_to_token(token_id)
                  for name, token_id in special_token_ids(tokenizer).items() if token_id is not None}
        atomic_write_text(directory / TOKENIZER_CONFIG_NAME,
                          json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **tokens}, ensure_ascii=False,
                                     indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any,
                        config: EngramHFConfig | None = None, engram_placement: str = "device",
                        engram_cache_rows: int = 0, engram_table_format: str | None = None,
                        dtype: torch.dtype | str | None = None, device_map: str | int | torch.device | None = None,
                        **kwargs: Any) -> "EngramForCausalLM":
        """Load a local :meth:`save_pretrained` (or ``EngramLM.save_pretrained``) folder with
        :meth:`EngramLM.from_pretrained`, in eval mode.

        Args:
            config: what ``AutoModelForCausalLM`` read; not used (the folder's ``config.json`` is).
            engram_placement, engram_cache_rows, engram_table_format: :meth:`EngramLM.from_pretrained`'s, as are
                the placement options in ``kwargs`` (:data:`PLACEMENT_OPTIONS`: ``host_method``, ``workers``, ...).
            dtype: cast the loaded model (``torch.bfloat16``, ``"bfloat16"``; ``torch_dtype`` is the old name).
            device_map: one device to move the model to (``"cuda"``, ``0``, ``torch.device``; ``"auto"``: the first
                GPU if there is one); a map of modules to devices is refused.
        Raises:
            FileNotFoundError: not a local folder (no hub is used).
            ValueError: positional model arguments, an option it does not know (named), a device map of several
                devices.
        """
        if model_args:
            raise ValueError(f"EngramForCausalLM.from_pretrained takes no positional model arguments, got {model_args}")
        if not Path(pretrained_model_name_or_path).is_dir():
            raise FileNotFoundError(f"{pretrained_model_name_or_path} is not a local folder (no model hub is used)")
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        unknown = sorted(set(kwargs) - HUB_KWARGS - PLACEMENT_OPTIONS)
        if unknown:
            raise ValueError(f"EngramForCausalLM.from_pretrained does not take {unknown}; placement options are "
                             f"{sorted(PLACEMENT_OPTIONS)}")
        device = one_device(device_map)
        placement_options = {name: value for name, value in kwargs.items() if name in PLACEMENT_OPTIONS}
        lm = load_pretrained(EngramLM, pretrained_model_name_or_path, engram_placement, engram_cache_rows,
                             engram_table_format, **placement_options)
        dtype = as_dtype(dtype)
        if dtype is not None:
            lm.to(dtype)
        if device is not None:
            lm.to(device)
        return cls.from_engram(lm).eval()


def shard_bytes(size: int | str) -> int:
    """Bytes of a shard size given as an int or as ``"<number><unit>"`` (KB/MB/GB, KiB/MiB/GiB)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in _SIZE_UNITS.items():
        if text.endswith(unit) and text[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * factor)
    raise ValueError(f"max_shard_size must be an int or like '2GB' / '500MiB', got {size!r}")


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` given as transformers takes it (``torch.bfloat16``, ``"bfloat16"``); ``None`` or ``"auto"``: as
    saved (``None``)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype")
    return getattr(torch, dtype)


def one_device(device_map: str | int | torch.device | None) -> torch.device | None:
    """The device ``device_map`` names (``"auto"``: ``cuda:0`` when available, else ``None``: stay on the CPU)."""
    if device_map is None or isinstance(device_map, torch.device):
        return device_map
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else None
    if isinstance(device_map, (str, int)):
        return torch.device(device_map)
    raise ValueError(f"EngramForCausalLM loads onto one device; device_map {device_map!r} is not one")
