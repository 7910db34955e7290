"""The transformers config of an :class:`~engram.model.EngramLM`: ``config.json`` as ``EngramLM.save_pretrained`` writes
it, read by ``AutoConfig`` through its ``model_type``."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from engram.model.config import EngramLMConfig
from engram.model.serialization import MODEL_TYPE


class EngramHFConfig(PretrainedConfig):
    """``model``: the :class:`EngramLMConfig` dict (``config.json``'s ``"model"``). The folder's other keys
    (``format_version``, ``engram_fingerprint``, ``engram_tables``, ...) are kept as attributes; loading reads them
    from the folder itself (:func:`engram.model.serialization.load_pretrained`), not from this object."""

    model_type = MODEL_TYPE
    model: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.model is None:
            self.model = EngramLMConfig().to_dict()
        self.tie_word_embeddings = False  # EngramLM ties its own head: transformers must not tie anything
        super().__post_init__(**kwargs)

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
