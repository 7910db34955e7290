"""EngramLM in transformers: importing this package registers the ``"engram"`` model type with ``AutoConfig`` and
``AutoModelForCausalLM`` (``import engram`` alone does not: transformers is optional and slow to import); and
:func:`retrofit` adds Engram layers to a transformers causal LM, saved and loaded as adapters (:mod:`.retrofit`) or
as one standalone folder (:func:`save_merged`, model type ``"engram_retrofit"``, also registered); a Llama-family
model, retrofitted or not, converts to an :class:`~engram.model.EngramLM` (:func:`to_engram_lm`,
:func:`export_engram_lm`).

Example:
    >>> import engram.hf  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained("ckpt")  # doctest: +SKIP
"""

import transformers

from engram.hf import merged
from engram.hf.config import EngramHFConfig
from engram.hf.export import export_engram_lm, to_engram_lm
from engram.hf.merged import save_merged
from engram.hf.modeling import EngramForCausalLM
from engram.hf.retrofit import (base_fingerprint, engram_parameters, freeze_base, load_adapter, retrofit,
                                save_adapter)

transformers.AutoConfig.register(EngramHFConfig.model_type, EngramHFConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(EngramHFConfig, EngramForCausalLM, exist_ok=True)
transformers.AutoConfig.register(merged.MODEL_TYPE, merged.EngramRetrofitConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(merged.EngramRetrofitConfig, merged.RetrofittedCausalLM, exist_ok=True)

__all__ = ["EngramForCausalLM", "EngramHFConfig", "base_fingerprint", "engram_parameters", "export_engram_lm",
           "freeze_base", "load_adapter", "retrofit", "save_adapter", "save_merged", "to_engram_lm"]
