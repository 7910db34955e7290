"""EngramLM in transformers: importing this package registers the ``"engram"`` model type with ``AutoConfig`` and
``AutoModelForCausalLM`` (``import engram`` alone does not: transformers is optional and slow to import).

Example:
    >>> import engram.hf  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained("ckpt")  # doctest: +SKIP
"""

import transformers

from engram.hf.config import EngramHFConfig
from engram.hf.modeling import EngramForCausalLM

transformers.AutoConfig.register(EngramHFConfig.model_type, EngramHFConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(EngramHFConfig, EngramForCausalLM, exist_ok=True)

__all__ = ["EngramForCausalLM", "EngramHFConfig"]
