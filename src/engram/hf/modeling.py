"""``EngramForCausalLM``: an :class:`~engram.model.EngramLM` as a transformers causal LM (``AutoModelForCausalLM``,
``generate()``, ``CausalLMOutputWithPast``).

Loading and saving go through EngramLM's own :mod:`engram.model.serialization` (checksums, the hashing fingerprint
check, table files and their placements), so a folder is the same whichever side wrote it. transformers'
``generate()`` runs without a KV cache: every step feeds the whole sequence so far and recomputes it (exact, and
quadratic in the length); :meth:`EngramLM.generate` keeps the fast cached path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from engram.atomic import atomic_path, atomic_write_text
from engram.hf.config import EngramHFConfig
from engram.model.lm import EngramLM
from engram.model.serialization import MAX_SHARD_BYTES, TOKENIZER_NAME, load_pretrained
from engram.tokenizer import resolve_tokenizer_path

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# What AutoModelForCausalLM.from_pretrained passes on besides the caller's arguments; a local folder needs none.
_HUB_KWARGS = frozenset({"cache_dir", "force_download", "local_files_only", "proxies", "subfolder", "revision",
                         "token", "trust_remote_code", "adapter_kwargs", "_from_auto"})


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
        cfg = self.model.cfg
        if cfg.tokenizer_vocab_size is not None and cfg.tokenizer_vocab_size < cfg.vocab_size:
            # embedding padding is never generated, as in EngramLM.generate
            self.generation_config.suppress_tokens = list(range(cfg.tokenizer_vocab_size, cfg.vocab_size))
        self.generation_config.use_cache = False
        self.post_init()

    @classmethod
    def from_engram(cls, model: EngramLM) -> "EngramForCausalLM":
        """Wrap an existing EngramLM (shares its parameters)."""
        return cls(EngramHFConfig(model=model.cfg.to_dict()), model)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: :meth:`EngramLM.init_weights` set every weight when the EngramLM was built."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no transformers cache: see the module docstring

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, next_sequence_length: int | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """Every step's inputs: the whole ``[B, S]`` sequence so far (no cache), whatever ``use_cache`` says."""
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=None, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """``input_ids`` ``[B, T]`` -> logits ``[B, T, V]`` fp32 (``[B, logits_to_keep, V]`` when given), and the
        loss when ``labels`` ``[B, T]`` are given (unshifted, ``-100`` ignored: :meth:`EngramLM.forward`'s).

        ``use_cache`` and ``return_dict`` (from ``generate``) change nothing: no cache is kept, a
        ``CausalLMOutputWithPast`` is returned. Any other input (``inputs_embeds``, ``position_ids``, ...) is refused.
        """
        unsupported = sorted(name for name, value in kwargs.items() if value is not None)
        if unsupported:
            raise ValueError(f"EngramForCausalLM.forward does not take {unsupported}")
        out = self.model(input_ids, attention_mask=attention_mask, labels=labels, logits_to_keep=logits_to_keep,
                         return_logits=True)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

    def save_pretrained(self, save_directory: str | os.PathLike[str], max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
        """:meth:`EngramLM.save_pretrained`'s folder, plus the text tokenizer (``tokenizer.json``, copied if the
        config names a registered one) and a ``tokenizer_config.json`` that lets ``AutoTokenizer`` load it."""
        directory = self.model.save_pretrained(save_directory, max_shard_bytes)
        if not (directory / TOKENIZER_NAME).is_file():
            with atomic_path(directory / TOKENIZER_NAME) as tmp:
                shutil.copyfile(resolve_tokenizer_path(self.model.cfg.tokenizer), tmp)
        atomic_write_text(directory / TOKENIZER_CONFIG_NAME, '{"tokenizer_class": "PreTrainedTokenizerFast"}\n')
        return directory

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any,
                        config: EngramHFConfig | None = None, engram_placement: str = "device",
                        engram_cache_rows: int = 0, engram_table_format: str | None = None,
                        **kwargs: Any) -> "EngramForCausalLM":
        """Load a local :meth:`save_pretrained` (or ``EngramLM.save_pretrained``) folder with
        :meth:`EngramLM.from_pretrained`: ``engram_placement`` (``device``/``host``/``disk``), ``engram_cache_rows``,
        ``engram_table_format`` and placement options (``host_method``, ``workers``, ...) are its arguments.
        ``config`` (what ``AutoModelForCausalLM`` read) is not used: the folder's ``config.json`` is."""
        if model_args:
            raise ValueError(f"EngramForCausalLM.from_pretrained takes no positional model arguments, got {model_args}")
        if not Path(pretrained_model_name_or_path).is_dir():
            raise FileNotFoundError(f"{pretrained_model_name_or_path} is not a local folder (no model hub is used)")
        placement_options = {name: value for name, value in kwargs.items() if name not in _HUB_KWARGS}
        lm = load_pretrained(EngramLM, pretrained_model_name_or_path, engram_placement, engram_cache_rows,
                             engram_table_format, **placement_options)
        return cls.from_engram(lm).eval()
