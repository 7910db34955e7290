"""The transformers config of an :class:`~engram.model.EngramLM`: ``config.json`` as ``EngramLM.save_pretrained`` writes
it, read by ``AutoConfig`` through its ``model_type``; the special token ids come from the model's tokenizer."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from transformers import PretrainedConfig

from engram.data.corpus import BOS_TOKENS
from engram.model.config import EngramLMConfig
from engram.model.serialization import MODEL_TYPE
from engram.tokenizer import load_tokenizer, resolve_tokenizer_path

# Added tokens that end a text / pad a batch in the tokenizers engram knows (DeepSeek-V3, bpe-N, common others).
EOS_TOKENS = ("<｜end▁of▁sentence｜>", "<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>")
PAD_TOKENS = ("<｜▁pad▁｜>", "<|pad|>", "<pad>")


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of ``tokenizer``'s added tokens named in
    :data:`~engram.data.corpus.BOS_TOKENS`, :data:`EOS_TOKENS` and :data:`PAD_TOKENS` (``None`` when it has none;
    padding falls back to the EOS id, transformers' convention)."""
    added = {token.content: token_id for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())}

    def first(names: tuple[str, ...]) -> int | None:
        return next((added[name] for name in names if name in added), None)

    eos = first(EOS_TOKENS)
    pad = first(PAD_TOKENS)
    return {"bos_token_id": first(BOS_TOKENS), "eos_token_id": eos, "pad_token_id": eos if pad is None else pad}


class EngramHFConfig(PretrainedConfig):
    """``model``: the :class:`EngramLMConfig` dict (``config.json``'s ``"model"``). The folder's other keys
    (``format_version``, ``engram_fingerprint``, ``engram_tables``, ...) are kept as attributes; loading reads them
    from the folder itself (:func:`engram.model.serialization.load_pretrained`), not from this object.
    ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``: :meth:`for_model` reads them from the model's tokenizer;
    ``AutoConfig`` on a folder leaves them ``None`` (``EngramLM`` does not write them into ``config.json``), while
    ``AutoModelForCausalLM`` fills them from the folder's tokenizer."""

    model_type = MODEL_TYPE
    model: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.model is None:
            self.model = EngramLMConfig().to_dict()
        self.tie_word_embeddings = False  # EngramLM ties its own head: transformers must not tie anything
        super().__post_init__(**kwargs)

    @classmethod
    def for_model(cls, cfg: EngramLMConfig) -> "EngramHFConfig":
        """The config of an EngramLM built from ``cfg``, with the special token ids of its tokenizer."""
        return cls(model=cfg.to_dict(), **special_token_ids(load_tokenizer(resolve_tokenizer_path(cfg.tokenizer))))

    @property
    def engram_lm_config(self) -> EngramLMConfig:
        return EngramLMConfig.from_dict(self.model)

    @property
    def vocab_size(self) -> int:
        return self.model["vocab_size"]

    @property
    def hidden_size(self) -> int:
        return self.model["d_model"]

    @property
    def num_hidden_layers(self) -> int:
        return self.model["n_layers"]

    @property
    def num_attention_heads(self) -> int:
        return self.model["n_heads"]

    @property
    def max_position_embeddings(self) -> int:
        return self.model["max_position_embeddings"]
