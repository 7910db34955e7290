"""engram: conditional memory for language models (DeepSeek's Engram), exact, fast and trainable."""

from engram.config import VARIANTS, EngramConfig, EngramVariant
from engram.embedding import MultiHeadEmbedding
from engram.hashing import DEAD_TOKEN, NgramHasher
from engram.layer import BranchRMSNorm, Engram, ShortConv, convert_demo_state_dict
from engram.model import EngramLM, EngramLMConfig
from engram.models.deepseek_v41 import DeepSeekV41Engram, load_deepseek_v41_engram
from engram.primes import is_prime, next_prime
from engram.tokenizer import NAMED_TOKENIZERS, CompressedTokenizer

__version__ = "0.1.0"

__all__ = [
    "DEAD_TOKEN",
    "NAMED_TOKENIZERS",
    "VARIANTS",
    "BranchRMSNorm",
    "CompressedTokenizer",
    "DeepSeekV41Engram",
    "Engram",
    "EngramConfig",
    "EngramLM",
    "EngramLMConfig",
    "EngramVariant",
    "MultiHeadEmbedding",
    "NgramHasher",
    "ShortConv",
    "__version__",
    "convert_demo_state_dict",
    "is_prime",
    "load_deepseek_v41_engram",
    "next_prime",
]
