"""Integrity of saved files: a CRC-32 of every chunk (64 MiB by default) of a file's data.

Every safetensors file engram writes carries the CRC-32s of its data region in its safetensors metadata: table
files (:mod:`engram.storage.table_file`) and the rest (:func:`write_safetensors`: dense weights, optimiser and
RNG state). A folder's other files (JSON, a tokenizer) are covered by the folder's ``checksums.json``
(:func:`record_checksums`). Loading checks them and refuses a corrupt file with a :class:`FileIntegrityError`
naming the file, the chunk and its byte range. Files saved before checksums existed (no CRC-32 metadata, no
``checksums.json``) load unchecked and silently: their integrity is unknown, not wrong.

Checksums are computed and checked in parallel chunks: ``zlib.crc32`` and ``os.preadv`` release the GIL.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from engram.atomic import atomic_path, atomic_write_text

CHUNK_BYTES = 64 * 2**20
CHECKSUMS_NAME = "checksums.json"
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_CHUNK_KEY = "engram_chunk_bytes"
_CRC_KEY = "engram_crc32"
_MANIFEST_FORMAT = 1
_ALIGN = 64  # the data region starts at a multiple of this many bytes
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_IO_BYTES = 64 * 2**20
_NAMED_TENSORS = 3  # a corrupt chunk's error names this many of the tensors in it
_EDIT_HINT = f" (to keep a deliberate edit of the file, remove its entry from {CHECKSUMS_NAME})"


class FileIntegrityError(ValueError):
    """A saved file is malformed, truncated or fails its checksums; the message names the file."""


@dataclass(frozen=True)
class ChunkChecksums:
    """The CRC-32 of every ``chunk_bytes`` (the last chunk shorter) of the ``data_bytes`` at ``data_offset`` of the
    file at ``path``."""

    path: Path
    data_offset: int
    data_bytes: int
    chunk_bytes: int
    crc32: tuple[int, ...]


def num_workers(workers: int | None) -> int:
    """Threads computing or checking checksums: ``workers``, by default one per core up to 16."""
    return min(16, os.cpu_count() or 1) if workers is None else workers


def _chunks(pieces: Sequence[memoryview], chunk_bytes: int) -> list[list[memoryview]]:
    """The bytes of ``pieces`` laid end to end, cut every ``chunk_bytes``: each chunk as its slices of the pieces."""
    chunks: list[list[memoryview]] = []
    current: list[memoryview] = []
    room = chunk_bytes
    for piece in pieces:
        start = 0
        while start < len(piece):
            take = min(room, len(piece) - start)
            current.append(piece[start:start + take])
            start += take
            room -= take
            if room == 0:
                chunks.append(current)
                current, room = [], chunk_bytes
    return chunks + [current] if current else chunks


def _crc32_of(slices: list[memoryview]) -> int:
    crc = 0
    for part in slices:
        crc = zlib.crc32(part, crc)
    return crc


def chunk_crc32(pieces: Sequence[memoryview], chunk_bytes: int = CHUNK_BYTES, workers: int | None = None
                ) -> tuple[int, ...]:
    """The CRC-32 of every ``chunk_bytes`` of the bytes of ``pieces`` (byte views, e.g. a file's tensors in file
    order) laid end to end; a chunk may span pieces."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    with ThreadPoolExecutor(num_workers(workers)) as pool:
        return tuple(pool.map(_crc32_of, _chunks(pieces, chunk_bytes)))


def read_chunks(sums: ChunkChecksums, fail: Callable[[str], Exception], workers: int | None = None,
                dest: Callable[[int, int], memoryview] | None = None, check: bool = True,
                where: Callable[[int, int], str] | None = None) -> None:
    """Read every chunk of ``sums``' data region into ``dest(start, stop)`` (a scratch buffer if None), checking
    its CRC-32 if ``check``.

    A short read or a mismatch raises ``fail(what)`` (the caller's error, naming the file); a mismatch names
    the chunk, its data bytes ``start:stop`` and ``where(start, stop)`` (e.g. the rows or tensors it holds).
    """

    def read_chunk(index: int) -> None:
        start = index * sums.chunk_bytes
        stop = min(start + sums.chunk_bytes, sums.data_bytes)
        buffer = memoryview(bytearray(stop - start)) if dest is None else dest(start, stop)
        done = 0
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], sums.data_offset + start + done)
            if n == 0:
                raise fail("truncated while being read")
            done += n
        if check and (computed := zlib.crc32(buffer)) != sums.crc32[index]:
            place = "" if where is None else f", {where(start, stop)}"
            raise fail(f"chunk {index} (data bytes {start}:{stop}{place}) fails its CRC-32 check: stored "
                       f"{sums.crc32[index]:08x}, computed {computed:08x}; the file is corrupt")

    fd = os.open(sums.path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(num_workers(workers)) as pool:
            # map yields in chunk order and cancels the chunks not yet started once one fails.
            for _ in pool.map(read_chunk, range(len(sums.crc32))):
                pass
    finally:
        os.close(fd)


def read_safetensors_header(path: Path, fail: Callable[[str], Exception]) -> tuple[dict[str, Any], int, int]:
    """``(header, data_offset, file_bytes)`` of the safetensors file at ``path``: its parsed JSON header (with
    ``__metadata__``), where its data region starts and the file's size. Nothing beyond the header is read."""
    with open(path, "rb") as f:
        file_bytes = os.fstat(f.fileno()).st_size
        if file_bytes < 8:
            raise fail(f"truncated: {file_bytes} bytes, too short for the 8-byte header length")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise fail(f"bad header length {header_len} (more than {_MAX_HEADER_BYTES}); not a safetensors file?")
        if file_bytes < 8 + header_len:
            raise fail(f"truncated inside the header: it needs {8 + header_len} bytes, the file has {file_bytes}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail(f"header is a JSON {type(header).__name__}, not an object")
    return header, 8 + header_len, file_bytes


def checked_metadata(metadata: Mapping[str, str] | None, reserved: Iterable[str]) -> dict[str, str]:
    """The caller's safetensors ``metadata`` as a dict, refused unless it maps str to str without ``reserved`` keys
    (those of the file's own integrity data)."""
    metadata = dict(metadata or {})
    reserved = frozenset(reserved)
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map str to str, got {key!r}: {value!r}")
        if key in reserved:
            raise ValueError(f"metadata key {key!r} is reserved for the file's integrity data")
    return metadata


def write_checked_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                              metadata_for: Callable[[tuple[int, ...]], dict[str, str]],
                              chunk_bytes: int = CHUNK_BYTES, workers: int | None = None) -> ChunkChecksums:
    """Stream ``tensors`` (contiguous CPU tensors, possibly memory maps) into a safetensors file at ``path``
    whose metadata is ``metadata_for(crc32s of the data region)``; the file is replaced atomically and synced.

    Tensors are laid out by decreasing element size (then name), as safetensors does, so each one is aligned;
    the header is padded so the data starts at a multiple of 64 bytes. Returns where the checksums lie.
    """
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"tensor {name!r} must be a contiguous CPU tensor, got one on {tensor.device} "
                             f"(contiguous: {tensor.is_contiguous()})")
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    views = [memoryview(tensors[name].detach().reshape(-1).view(torch.uint8).numpy()) for name in names]
    crc32 = chunk_crc32(views, chunk_bytes, workers)
    header: dict[str, Any] = {}
    offset = 0
    for name, view in zip(names, views):
        dtype, shape = SAFETENSORS_DTYPES[tensors[name].dtype], list(tensors[name].shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(view)]}
        offset += len(view)
    header["__metadata__"] = metadata_for(crc32)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % _ALIGN)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for view in views:
            for start in range(0, len(view), _IO_BYTES):
                f.write(view[start:start + _IO_BYTES])
        f.flush()
        os.fsync(f.fileno())  # else a crash soon after the rename can leave the new name with missing data
    return ChunkChecksums(Path(path), 8 + len(header_bytes), offset, chunk_bytes, crc32)


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None, chunk_bytes: int = CHUNK_BYTES,
                      workers: int | None = None) -> None:
    """Write ``tensors`` (contiguous CPU tensors) as a safetensors file that any safetensors reader opens, with
    the caller's ``metadata`` and a CRC-32 of every ``chunk_bytes`` of its data; replaced atomically.

    Example: ``write_safetensors("optimizer.safetensors", {"t0": exp_avg}); load_safetensors(...)["t0"]``.
    """
    metadata = checked_metadata(metadata, reserved=(_CHUNK_KEY, _CRC_KEY))
    write_checked_safetensors(path, tensors, lambda crc32: {**metadata, _CHUNK_KEY: str(chunk_bytes),
                                                            _CRC_KEY: json.dumps(crc32)}, chunk_bytes, workers)


def _tensor_spans(header: dict[str, Any], fail: Callable[[str], Exception]) -> dict[str, tuple[int, int]]:
    """``{tensor name: (start, end)}`` in the data region, from a safetensors header without ``__metadata__``."""
    spans = {}
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise fail(f"tensor {name!r} has no valid data_offsets: {entry}")
        spans[name] = (offsets[0], offsets[1])
    return spans


def safetensors_checksums(path: str | os.PathLike[str]) -> tuple[ChunkChecksums | None, dict[str, tuple[int, int]]]:
    """The checksums the safetensors file at ``path`` carries (``None`` for a file without: written by other code
    or before checksums existed) and where each tensor lies in its data region. A file whose size differs from
    what its header says is refused."""
    path = Path(path)

    def fail(what: str) -> FileIntegrityError:
        return FileIntegrityError(f"{path}: {what}")

    header, data_offset, file_bytes = read_safetensors_header(path, fail)
    metadata = header.pop("__metadata__", None) or {}
    spans = _tensor_spans(header, fail)
    data_bytes = max((end for _, end in spans.values()), default=0)
    if file_bytes != data_offset + data_bytes:
        extra = file_bytes - data_offset - data_bytes
        problem = "truncated" if extra < 0 else f"has {extra} extra bytes"
        raise fail(f"{problem}: expected {data_offset + data_bytes} bytes, the file has {file_bytes}")
    if not isinstance(metadata, dict) or _CRC_KEY not in metadata:
        return None, spans
    try:
        chunk_bytes = int(metadata[_CHUNK_KEY])
        crc32 = tuple(json.loads(metadata[_CRC_KEY]))
    except (KeyError, ValueError, TypeError) as e:
        raise fail(f"malformed checksum metadata ({type(e).__name__}: {e})") from None
    expected_chunks = -(-data_bytes // chunk_bytes) if chunk_bytes > 0 else -1
    if len(crc32) != expected_chunks or not all(type(c) is int and 0 <= c < 2**32 for c in crc32):
        raise fail(f"{_CRC_KEY} should hold {expected_chunks} 32-bit checksums of {chunk_bytes}-byte chunks")
    return ChunkChecksums(path, data_offset, data_bytes, chunk_bytes, crc32), spans


def verify_safetensors(path: str | os.PathLike[str], workers: int | None = None) -> bool:
    """Check every chunk of the safetensors file at ``path``; raise :class:`FileIntegrityError` naming the first
    corrupt chunk, its bytes and the tensors in it. Returns whether the file carried checksums (``False``: a file
    without them, accepted unchecked)."""
    sums, spans = safetensors_checksums(path)
    if sums is None:
        return False

    def where(start: int, stop: int) -> str:
        inside = [name for name, (low, high) in sorted(spans.items(), key=lambda item: item[1])
                  if low < stop and start < high]
        more = f" and {len(inside) - _NAMED_TENSORS} more" if len(inside) > _NAMED_TENSORS else ""
        return (f"file bytes {sums.data_offset + start}:{sums.data_offset + stop}, tensors "
                f"{', '.join(inside[:_NAMED_TENSORS])}{more}")

    read_chunks(sums, lambda what: FileIntegrityError(f"{sums.path}: {what}"), workers, where=where)
    return True


def load_safetensors(path: str | os.PathLike[str], workers: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``, its checksums verified first (:func:`verify_safetensors`)."""
    verify_safetensors(path, workers)
    return load_file(str(path))


def _manifest_files(directory: Path) -> dict[str, Any]:
    """The entries of ``directory``'s ``checksums.json`` (``{}`` without one); a malformed one is refused."""
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest["format"] != _MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest['format']!r} (this reader knows {_MANIFEST_FORMAT})")
        for entry in files.values():
            if not (type(entry["bytes"]) is int and type(entry["chunk_bytes"]) is int and entry["chunk_bytes"] > 0
                    and isinstance(entry["crc32"], list) and all(type(c) is int for c in entry["crc32"])):
                raise ValueError(f"bad entry {entry}")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise FileIntegrityError(f"{path} is malformed ({type(e).__name__}: {e}); the folder is corrupt") from None
    return files


def record_checksums(directory: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Record the CRC-32s of the files ``names`` of ``directory`` in its ``checksums.json`` (replaced atomically),
    beside the entries of its other files that still exist; a malformed earlier manifest is started afresh."""
    directory = Path(directory)
    try:
        files = {name: entry for name, entry in _manifest_files(directory).items() if (directory / name).is_file()}
    except FileIntegrityError:
        files = {}
    for name in names:
        data = memoryview((directory / name).read_bytes())
        files[name] = {"bytes": len(data), "chunk_bytes": CHUNK_BYTES, "crc32": list(chunk_crc32([data]))}
    manifest = {"format": _MANIFEST_FORMAT, "files": files}
    atomic_write_text(directory / CHECKSUMS_NAME, json.dumps(manifest, indent=1, sort_keys=True))


def verify_recorded(directory: str | os.PathLike[str], names: Iterable[str], workers: int | None = None) -> None:
    """Check each of the files ``names`` of ``directory`` that its ``checksums.json`` lists; raise
    :class:`FileIntegrityError` naming the file and its corrupt byte range. Files it does not list, and folders
    without one (saved before checksums existed), are not checked; a listed file that is missing is left to
    the caller, which reports it its own way."""
    directory = Path(directory)
    files = _manifest_files(directory)
    for name in names:
        path = directory / name
        entry = files.get(name)
        if entry is None or not path.is_file():
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise FileIntegrityError(f"{path}: {size} bytes, {CHECKSUMS_NAME} recorded {entry['bytes']}: the file is "
                                     f"truncated or was changed after it was saved{_EDIT_HINT}")
        sums = ChunkChecksums(path, 0, size, entry["chunk_bytes"], tuple(entry["crc32"]))
        if len(sums.crc32) != -(-size // sums.chunk_bytes):
            raise FileIntegrityError(f"{directory / CHECKSUMS_NAME} is malformed: its entry for {name} holds "
                                     f"{len(sums.crc32)} checksums for {size} bytes")
        read_chunks(sums, lambda what: FileIntegrityError(f"{path}: {what}{_EDIT_HINT}"), workers)
