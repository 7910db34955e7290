"""Prepared corpora: tokenise sources once into memory-mappable token files (:mod:`engram.data.batches` draws batches
from them).

A prepared corpus is a folder holding, per split (``train``, ``val``):

* ``<split>.bin``: uint32 little-endian token ids, documents back to back, each starting with BOS;
* ``<split>.docs.npy``: int64 start offset of each document in ``<split>.bin``;

and ``index.json`` (see :class:`CorpusInfo`), plus ``tokenizer.json`` when the tokenizer was a ``bpe-N``
trained on the corpus itself. Preparation is deterministic: the same inputs give byte-identical files,
whatever the worker count.

The split into train and validation is by document when there are enough documents for the smaller split
to expect one whole document (:func:`documents_for_document_split`: 20 at the default 5% validation), else
by position inside each document: its text's last ``val_fraction`` of characters is validation, the rest
train (so a single text file gets a split, as in nanoGPT). ``index.json``'s ``split_by`` records which.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from rich import filesize
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from tokenizers import Tokenizer

from engram.data.sources import Document, ResolvedSource, SourceFile, read_documents, resolve_sources
from engram.fetch import staging_dir
from engram.tokenizer import default_cache_dir, load_tokenizer, resolve_tokenizer_path

FORMAT_VERSION = 1
SPLITS = ("train", "val")
SPLIT_BY = ("document", "position")
# Version of the rule that splits a corpus, part of the cache key: 2 splits few documents by position.
_SPLIT_RULE = 2
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_DTYPE = np.dtype("<u4")
# Added tokens that mean "beginning of sequence" in the tokenizers engram knows (DeepSeek-V3; bpe-N).
BOS_TOKENS = ("<｜begin▁of▁sentence｜>", "<|bos|>", "<s>", "<|begin_of_text|>")
_BPE_SPEC = re.compile(r"bpe-(\d+)")
_ENCODE_BATCH = 256  # documents per encode_batch call: bounds the memory of tokenizers' Encoding objects


@dataclass(frozen=True)
class SplitInfo:
    """Counts of one split: ``tokens`` includes one BOS per document; ``bytes`` are UTF-8 bytes of the text."""

    tokens: int
    documents: int
    bytes: int
    replacements: int


@dataclass(frozen=True)
class CorpusInfo:
    """The contents of ``index.json``.

    ``sources`` holds one ``{"source": str, "file_list_sha256": str | None}`` per source as given (the
    hash is set for ``python-code``); ``replacements`` is the total count of U+FFFD characters that
    decoding invalid UTF-8 introduced; ``split_by`` is ``"document"`` or ``"position"`` (see the module
    docstring).
    """

    format_version: int
    tokenizer: str
    tokenizer_sha256: str
    bos_id: int
    vocab_size: int
    sources: list[dict[str, str | None]]
    splits: dict[str, SplitInfo]
    replacements: int
    seed: int
    val_fraction: float
    split_by: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CorpusInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        data = {"split_by": "document", **data}  # indexes written before split_by existed split by document
        if set(data) != names:
            raise ValueError(f"index keys {sorted(data)} differ from the expected {sorted(names)}")
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(f"corpus format_version {data['format_version']!r} is not {FORMAT_VERSION}")
        if set(data["splits"]) != set(SPLITS):
            raise ValueError(f"index splits {sorted(data['splits'])} are not {list(SPLITS)}")
        if data["split_by"] not in SPLIT_BY:
            raise ValueError(f"index split_by {data['split_by']!r} is not one of {SPLIT_BY}")
        return cls(**{**data, "splits": {k: SplitInfo(**v) for k, v in data["splits"].items()}})



def bos_id(tokenizer: Tokenizer) -> int:
    """The id of the tokenizer's BOS added token (see :data:`BOS_TOKENS`), else 0."""
    for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items()):
        if token.content in BOS_TOKENS:
            return token_id
    return 0


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_file(path)


def split_hash(seed: int, origin: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, origin): a document is validation when it is < val_fraction."""
    digest = hashlib.sha256(f"{seed}\0{origin}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def documents_for_document_split(val_fraction: float) -> int:
    """The fewest documents a corpus is split by document with: the smaller split then expects one whole
    document (20 at ``val_fraction`` 0.05)."""
    return math.ceil(round(1 / min(val_fraction, 1 - val_fraction), 6))


def _count_documents(files: list[SourceFile], limit: int) -> int:
    """The documents of ``files``, counted up to ``limit`` (reading stops there)."""
    documents = itertools.chain.from_iterable(map(read_documents, files))
    return sum(1 for _ in itertools.islice(documents, limit))


def _position_pieces(doc: Document, val_fraction: float) -> list[tuple[str, Document]]:
    """``doc``'s text cut in two: its last ``val_fraction`` of characters (at least one) for validation, the rest
    for training; a one-character document stays whole, in training."""
    if len(doc.text) < 2:
        return [("train", doc)]
    cut = len(doc.text) - min(max(round(val_fraction * len(doc.text)), 1), len(doc.text) - 1)
    head, tail = doc.text[:cut], doc.text[cut:]
    # The text does not tell decoding's U+FFFD from genuine ones: the tail's count as decoding's first, which is
    # exact unless the document also holds genuine U+FFFD (the total stays exact).
    tail_replacements = min(tail.count("\ufffd"), doc.replacements)
    return [("train", Document(head, doc.origin, doc.replacements - tail_replacements, len(head.encode()))),
            ("val", Document(tail, doc.origin, tail_replacements, len(tail.encode())))]


@dataclass(frozen=True)
class _SplitRule:
    """Where each document goes (see the module docstring): whole, by its :func:`split_hash`, or cut by position."""

    val_fraction: float
    seed: int
    by_position: bool

    def pieces(self, doc: Document) -> list[tuple[str, Document]]:
        """(split, text) pairs that together hold ``doc``."""
        if self.by_position:
            return _position_pieces(doc, self.val_fraction)
        return [("val" if split_hash(self.seed, doc.origin) < self.val_fraction else "train", doc)]


@dataclass
class _EncodedFile:
    """The pieces of one file's documents (:meth:`_SplitRule.pieces`), tokenised: ``tokens`` concatenates them,
    each led by BOS."""

    splits: list[str]
    hashes: list[float]  # split_hash of each piece's document
    lengths: np.ndarray  # int64 [P], tokens per piece incl. BOS
    num_bytes: list[int]
    replacements: list[int]
    tokens: np.ndarray  # uint32 [sum(lengths)]


def _encode_file(tokenizer_path: str, bos: int, rule: _SplitRule, file: SourceFile) -> _EncodedFile:
    tokenizer = _cached_tokenizer(tokenizer_path)
    pieces = [(split, piece) for doc in read_documents(file) for split, piece in rule.pieces(doc)]
    ids: list[np.ndarray] = []
    for start in range(0, len(pieces), _ENCODE_BATCH):
        batch = pieces[start:start + _ENCODE_BATCH]
        for enc in tokenizer.encode_batch([p.text for _, p in batch], add_special_tokens=False):
            ids.append(np.asarray([bos, *enc.ids], dtype=TOKEN_DTYPE))
    return _EncodedFile(
        splits=[split for split, _ in pieces],
        hashes=[split_hash(rule.seed, p.origin) for _, p in pieces],
        lengths=np.asarray([len(x) for x in ids], dtype=np.int64),
        num_bytes=[p.num_bytes for _, p in pieces],
        replacements=[p.replacements for _, p in pieces],
        tokens=np.concatenate(ids) if ids else np.zeros(0, dtype=TOKEN_DTYPE),
    )


def _quiet_worker() -> None:
    # One tokenizer per process already fills the cores; its own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encoded_files(files: list[SourceFile], tokenizer_path: Path, bos: int, rule: _SplitRule,
                   workers: int) -> Iterator[_EncodedFile]:
    """The files tokenised in order: in this process for one worker, else by a pool of processes."""
    encode = functools.partial(_encode_file, str(tokenizer_path), bos, rule)
    if workers == 1:
        yield from map(encode, files)
        return
    # fork where there is one: spawn re-imports the caller's main script, which breaks scripts without an
    # ``if __name__ == "__main__"`` guard, and re-imports torch in every worker. The workers use neither
    # torch nor tokenizers' thread pool, so the parent's threads are not needed in them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_quiet_worker) as pool:
        yield from pool.imap(encode, files, chunksize=4)


class _SplitWriter:
    """Appends documents to ``<split>.bin`` and remembers their offsets, sizes and split hashes."""

    def __init__(self, folder: Path, split: str):
        self.bin_path = folder / f"{split}.bin"
        self.docs_path = folder / f"{split}.docs.npy"
        self._fh: BinaryIO = self.bin_path.open("wb")
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.num_bytes: list[int] = []
        self.replacements: list[int] = []
        self.hashes: list[float] = []
        self.tokens = 0

    def append(self, tokens: np.ndarray, num_bytes: int, replacements: int, hash_: float) -> None:
        self._fh.write(tokens.tobytes())
        self.offsets.append(self.tokens)
        self.lengths.append(len(tokens))
        self.num_bytes.append(num_bytes)
        self.replacements.append(replacements)
        self.hashes.append(hash_)
        self.tokens += len(tokens)

    def pop(self, index: int) -> tuple[np.ndarray, int, int, float]:
        """Remove document ``index`` (rewriting the file) and return (tokens, bytes, replacements, hash).

        Only used when a split came out empty, which happens for small corpora only, so reading the
        whole file back is cheap.
        """
        self._fh.flush()
        data = np.fromfile(self.bin_path, dtype=TOKEN_DTYPE)
        start, length = self.offsets[index], self.lengths[index]
        doc = data[start:start + length].copy()
        self._fh.close()
        self._fh = self.bin_path.open("wb")
        self._fh.write(data[:start].tobytes())
        self._fh.write(data[start + length:].tobytes())
        del self.offsets[index], self.lengths[index]
        self.offsets[index:] = [o - length for o in self.offsets[index:]]
        self.tokens -= length
        return doc, self.num_bytes.pop(index), self.replacements.pop(index), self.hashes.pop(index)

    def close(self) -> SplitInfo:
        self._fh.close()
        np.save(self.docs_path, np.asarray(self.offsets, dtype=np.int64), allow_pickle=False)
        return SplitInfo(self.tokens, len(self.offsets), sum(self.num_bytes), sum(self.replacements))


def _train_bpe(files: list[SourceFile], vocab_size: int, out_path: Path) -> Path:
    from engram.data.bpe import train_bpe_tokenizer

    texts = (doc.text for file in files for doc in read_documents(file))
    return train_bpe_tokenizer(texts, vocab_size, out_path)


def _progress(enabled: bool, console: Console | None) -> Progress:
    return Progress(TextColumn("[bold]tokenising"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[files]} files"), console=console, disable=not enabled)


def _files_size(files: list[SourceFile]) -> str:
    count, size = len(files), sum(f.path.stat().st_size for f in files)
    return f"{count:,} file{'s' if count != 1 else ''} ({filesize.decimal(size)})"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


def _choose_split(files: list[SourceFile], val_fraction: float, seed: int, log: Console) -> _SplitRule:
    """By document when the files hold :func:`documents_for_document_split` documents, else by position."""
    needed = documents_for_document_split(val_fraction)
    count = _count_documents(files, needed)
    if count < needed:
        log.print(f"splitting by position: the last {_percent(val_fraction)} of each document's text is validation "
                  f"({count:,} document{'s' if count != 1 else ''}, fewer than the {needed:,} a split by document "
                  "needs)", markup=False, soft_wrap=True)
    return _SplitRule(val_fraction, seed, by_position=count < needed)



def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX_FILE).is_file():
        raise ValueError(f"refusing to overwrite {str(out)!r}: it is not empty and not a prepared corpus")


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished ``new`` to ``out``; an existing ``out`` is removed only once ``new`` is in place."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{new.name.rsplit('-', 1)[-1]}")
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old)


def prepare_corpus(sources: list[str], out_dir: str | os.PathLike[str], tokenizer: str = "deepseek-v3",
                   val_fraction: float = 0.05, seed: int = 0, workers: int | None = None,
                   progress: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                   console: Console | None = None) -> CorpusInfo:
    """Tokenise ``sources`` into a prepared corpus at ``out_dir`` (see the module docstring).

    Args:
        sources: paths (files or folders) and preset names, see :mod:`engram.data.sources`.
        out_dir: the corpus folder; built in a sibling temporary folder and renamed into place, so it is
            either absent, the previous corpus, or complete. A non-empty folder that is not a prepared
            corpus is refused.
        tokenizer: a registered name, a ``tokenizer.json`` path, or ``"bpe-N"`` for a byte-level BPE of
            N ids trained on these sources (saved as ``tokenizer.json`` in the corpus).
        val_fraction: the share of the data in validation, in (0, 1). With at least
            :func:`documents_for_document_split` documents, a document is validation when :func:`split_hash` of
            (seed, its origin) is below it, and each split gets at least one (the closest document is moved and
            appended); with fewer, the last ``val_fraction`` of each document's characters is validation.
        seed: the split seed.
        workers: tokenising processes (default: CPU count, at most one per file); 1 runs in-process.
        progress: show a rich progress bar.
        cache_dir: engram cache root for fetched presets (default :func:`default_cache_dir`).
        console: where each stage (fetch, BPE training, split, tokenising) is announced; none: nowhere.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    out = Path(out_dir)
    _check_out_dir(out)
    log = console or Console(quiet=True)
    resolved = resolve_sources(sources, cache_dir=cache_dir, console=console)
    files = [f for src in resolved for f in src.files]
    owners = [src.source for src in resolved for _ in src.files]
    workers = max(1, min(workers or os.cpu_count() or 1, len(files)))

    staging = staging_dir(out.parent, out.name)
    try:
        bpe = _BPE_SPEC.fullmatch(tokenizer)
        if bpe:
            log.print(f"training a {int(bpe.group(1)):,}-id byte-level BPE tokenizer on {_files_size(files)}",
                      markup=False, soft_wrap=True)
            tokenizer_path = _train_bpe(files, int(bpe.group(1)), staging / TOKENIZER_FILE)
        else:
            tokenizer_path = resolve_tokenizer_path(tokenizer)
        tok = load_tokenizer(tokenizer_path)
        bos = bos_id(tok)
        rule = _choose_split(files, val_fraction, seed, log)
        writers = {split: _SplitWriter(staging, split) for split in SPLITS}
        documents = dict.fromkeys(owners, 0)
        log.print(f"tokenising {_files_size(files)} with {tokenizer} into {out}", markup=False,
                  soft_wrap=True)
        with _progress(progress, console) as bar:
            task = bar.add_task("tokenising", total=sum(f.path.stat().st_size for f in files), files=0)
            encoded_files = _encoded_files(files, tokenizer_path, bos, rule, workers)
            for n, (file, owner, encoded) in enumerate(zip(files, owners, encoded_files), 1):
                documents[owner] += len(encoded.splits)
                ends = np.cumsum(encoded.lengths)
                for i, split in enumerate(encoded.splits):
                    writers[split].append(encoded.tokens[ends[i] - encoded.lengths[i]:ends[i]], encoded.num_bytes[i],
                                          encoded.replacements[i], encoded.hashes[i])
                bar.update(task, advance=file.path.stat().st_size, files=n)
        empty = [source for source, count in documents.items() if count == 0]
        if empty:
            raise ValueError(f"source(s) {empty} yielded no documents (all their files are empty)")
        train, val = writers["train"], writers["val"]
        if not rule.by_position:
            if not val.offsets:
                val.append(*train.pop(int(np.argmin(train.hashes))))
            elif not train.offsets:
                train.append(*val.pop(int(np.argmax(val.hashes))))
        splits = {split: writer.close() for split, writer in writers.items()}
        info = CorpusInfo(
            format_version=FORMAT_VERSION,
            tokenizer=tokenizer,
            tokenizer_sha256=hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
            bos_id=bos,
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            sources=[{"source": src.source, "file_list_sha256": src.file_list_sha256} for src in resolved],
            splits=splits,
            replacements=sum(s.replacements for s in splits.values()),
            seed=seed,
            val_fraction=val_fraction,
            split_by="position" if rule.by_position else "document",
        )
        (staging / INDEX_FILE).write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info



class Corpus:
    """A prepared corpus opened for reading (use :func:`open_corpus`)."""

    def __init__(self, path: Path, info: CorpusInfo):
        self.path = path
        self.info = info

    def tokens(self, split: str, seq_len: int | None = None) -> np.ndarray:
        """uint32 [N] token ids of ``split``, memory-mapped (an empty array for an empty split).

        With ``seq_len``, a ``ValueError`` naming the split, its size and a remedy unless it holds one window
        of ``seq_len + 1`` tokens.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        count = self.info.splits[split].tokens
        if seq_len is not None and count < seq_len + 1:
            raise ValueError(self._too_small(split, count, seq_len))
        if count == 0:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        return np.memmap(self.path / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r")

    def _too_small(self, split: str, count: int, seq_len: int) -> str:
        share = self.info.val_fraction if split == "val" else 1 - self.info.val_fraction
        remedy = f"use --seq-len {count - 1} or less, or more text" if count >= 2 else "give more text"
        return (f"the {split} split of corpus {str(self.path)!r} holds {count:,} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1:,} (one window): {remedy} (the {split} split holds {_percent(share)} of the text, "
                f"split by {self.info.split_by})")

    def doc_offsets(self, split: str) -> np.ndarray:
        """int64 [D] start offset of each document of ``split`` in :meth:`tokens`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.load(self.path / f"{split}.docs.npy", allow_pickle=False)

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token of ``split`` (BOS tokens count as tokens of 0 bytes)."""
        counts = self.info.splits[split]
        if counts.tokens == 0:
            raise ValueError(f"split {split!r} of {self.path} is empty")
        return counts.bytes / counts.tokens

    @property
    def tokenizer_name(self) -> str:
        return self.info.tokenizer

    @property
    def tokenizer_path(self) -> Path:
        """The corpus's own ``tokenizer.json`` (``bpe-N``), else the registered or given path."""
        own = self.path / TOKENIZER_FILE
        return own if own.is_file() else resolve_tokenizer_path(self.info.tokenizer)

    @property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    @property
    def vocab_size(self) -> int:
        """Token ids including added tokens."""
        return self.info.vocab_size

    def info_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), **self.info.to_dict()}

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={c.tokens:,} tokens/{c.documents:,} docs" for s, c in self.info.splits.items())
        return f"Corpus({str(self.path)!r}, {self.info.tokenizer}, {counts})"


def open_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Open a prepared corpus, checking ``index.json`` and that every file is present and whole."""
    root = Path(path)
    index = root / INDEX_FILE
    if not index.is_file():
        raise FileNotFoundError(f"{str(root)!r} is not a prepared corpus: {index} is missing")
    try:
        info = CorpusInfo.from_dict(json.loads(index.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{index} is not a valid corpus index: {err}") from None
    for split, counts in info.splits.items():
        bin_path, docs_path = root / f"{split}.bin", root / f"{split}.docs.npy"
        for file in (bin_path, docs_path):
            if not file.is_file():
                raise FileNotFoundError(f"corpus {str(root)!r} is missing {file.name}")
        expected = counts.tokens * TOKEN_DTYPE.itemsize
        if bin_path.stat().st_size != expected:
            raise ValueError(f"{bin_path} has {bin_path.stat().st_size} bytes, index.json says {expected} "
                             f"({counts.tokens} tokens): the file is truncated or corrupt")
        try:
            offsets = np.load(docs_path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{docs_path} is truncated or corrupt: {err}") from None
        if offsets.shape != (counts.documents,) or offsets.dtype != np.int64:
            raise ValueError(f"{docs_path} holds {offsets.dtype} {offsets.shape}, index.json says "
                             f"int64 ({counts.documents},)")
    if (root / TOKENIZER_FILE).is_file():
        actual = hashlib.sha256((root / TOKENIZER_FILE).read_bytes()).hexdigest()
        if actual != info.tokenizer_sha256:
            raise ValueError(f"{root / TOKENIZER_FILE} does not match the tokenizer_sha256 in {index}")
    return Corpus(root, info)


def _same_tokenizer(tokenizer: str, info: CorpusInfo) -> bool:
    """Whether ``tokenizer`` (a name, ``bpe-N`` or a path) is the one ``info``'s corpus was prepared with: the
    same name, or a file of the same content (e.g. a model folder's copy of the corpus's ``bpe-N`` tokenizer)."""
    if tokenizer == info.tokenizer:
        return True
    if _BPE_SPEC.fullmatch(tokenizer):
        return False
    return hashlib.sha256(resolve_tokenizer_path(tokenizer).read_bytes()).hexdigest() == info.tokenizer_sha256


def _is_prepared(entry: str) -> bool:
    return (Path(entry) / INDEX_FILE).is_file()


def corpus_cache_key(resolved: list[ResolvedSource], tokenizer: str, val_fraction: float, seed: int) -> str:
    """sha256 of what a prepared corpus depends on: sources, their files' sizes and mtimes, tokenizer, split
    (its settings and rule)."""
    bpe = _BPE_SPEC.fullmatch(tokenizer)
    tokenizer_id = tokenizer if bpe else hashlib.sha256(resolve_tokenizer_path(tokenizer).read_bytes()).hexdigest()
    files = []
    for src in resolved:
        for file in src.files:
            stat = file.path.stat()
            files.append([src.source, str(file.path), stat.st_size, stat.st_mtime_ns])
    key = {"format_version": FORMAT_VERSION, "files": files, "tokenizer": tokenizer_id,
           "val_fraction": val_fraction, "seed": seed, "split_rule": _SPLIT_RULE}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_or_prepare(data: str | os.PathLike[str] | list[str], cache_dir: str | os.PathLike[str] | None = None, *,
                    tokenizer: str | None = None, val_fraction: float = 0.05, seed: int = 0,
                    workers: int | None = None, progress: bool = True, console: Console | None = None) -> Corpus:
    """A prepared corpus from ``data``: a prepared corpus folder, or raw files/folders and preset names.

    Raw sources are prepared into ``<cache_dir>/corpora/<key>`` (``key`` from :func:`corpus_cache_key`)
    and reused while nothing it depends on changes. ``tokenizer`` defaults to ``"deepseek-v3"`` for raw
    sources; for a prepared folder, a given tokenizer must be the one it was prepared with (by name, or a
    tokenizer file of the same content). ``console``: where the stages of preparing (see
    :func:`prepare_corpus`) and the corpus used are announced; none: nowhere.
    """
    entries = [str(data)] if isinstance(data, (str, os.PathLike)) else [str(d) for d in data]
    if not entries:
        raise ValueError("data must name at least one source or a prepared corpus")
    if any(_is_prepared(e) for e in entries):
        if len(entries) != 1:
            raise ValueError(f"a prepared corpus must be given alone, got {entries}")
        corpus = open_corpus(entries[0])
        if tokenizer is not None and not _same_tokenizer(tokenizer, corpus.info):
            raise ValueError(f"corpus {entries[0]!r} was prepared with tokenizer {corpus.info.tokenizer!r}, "
                             f"not {tokenizer!r}")
        return _announced(corpus, "", console)
    tokenizer = tokenizer or "deepseek-v3"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    resolved = resolve_sources(entries, cache_dir=root, console=console)
    out = root / "corpora" / corpus_cache_key(resolved, tokenizer, val_fraction, seed)[:32]
    if _is_prepared(str(out)):
        try:
            return _announced(open_corpus(out), " (prepared earlier)", console)
        except (FileNotFoundError, ValueError):
            pass  # damaged: prepare it again below
    prepare_corpus(entries, out, tokenizer=tokenizer, val_fraction=val_fraction, seed=seed, workers=workers,
                   progress=progress, cache_dir=root, console=console)
    return _announced(open_corpus(out), "", console)


def _announced(corpus: Corpus, note: str, console: Console | None) -> Corpus:
    """``corpus``, after telling ``console`` (if any) where it is and what its splits hold."""
    if console is not None:
        train, val = corpus.info.splits["train"], corpus.info.splits["val"]
        console.print(f"corpus {corpus.path}{note}: {train.tokens:,} training and {val.tokens:,} validation tokens "
                      f"({corpus.info.tokenizer}, split by {corpus.info.split_by})", markup=False, soft_wrap=True)
    return corpus
