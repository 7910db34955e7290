"""engram: conditional memory for language models (DeepSeek's Engram), exact, fast and trainable."""

from engram.config import VARIANTS, EngramConfig
from engram.embedding import MultiHeadEmbedding
from engram.hashing import DEAD_TOKEN, NgramHasher
from engram.layer import Engram, convert_demo_state_dict
from engram.model import EngramLM, EngramLMConfig
from engram.models.deepseek_v41 import load_deepseek_v41_engram
from engram.tokenizer import CompressedTokenizer

__version__ = "0.1.0"

# What README.md and docs/ import from the root; everything else is imported from its module.
__all__ = [
    "DEAD_TOKEN",
    "VARIANTS",
    "CompressedTokenizer",
    "Engram",
    "EngramConfig",
    "EngramLM",
    "EngramLMConfig",
    "MultiHeadEmbedding",
    "NgramHasher",
    "__version__",
    "convert_demo_state_dict",
    "load_deepseek_v41_engram",
]
