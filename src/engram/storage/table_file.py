"""The table file: one on-disk format for an Engram memory table ``[R, D]``, loadable into any placement.

A table file is a valid safetensors file (``safetensors.safe_open`` reads it) holding exactly one 2-D
tensor, ``"weight"`` (fp32, bf16 or fp16; or uint8 packed FP8 rows), whose ``__metadata__`` carries a CRC-32 of
every ``chunk_bytes`` of the data region beside the caller's own string metadata. A uint8 table holds packed
FP8 rows (:mod:`engram.kernels.fp8`: ``D`` E4M3 bytes, then one UE8M0 scale byte per 32 values) and says so under
``engram_table_row_format`` = ``"fp8-e4m3-ue8m0"``; a float table has no such key (files from before it
existed read as float). The header is padded so the
data starts at a multiple of 64 bytes. The same file is read into GPU or pinned host memory
(:func:`load_table`), memory-mapped from disk (:func:`map_table`) or shared by every process of a host
through ``/dev/shm`` (:func:`share_in_shm`), never converted.

Tables reach 100 GB, so :func:`write_table` streams the data instead of serialising it in memory (as
``safetensors.torch.save_file`` would), and checksums are computed and checked in parallel chunks
(:mod:`engram.storage.checksums`, shared with every other file engram saves).

A table file in use must be replaced atomically (a new file renamed over the old one, as :func:`write_table`
does), never changed in place: a process that maps it (:func:`map_table`, placement ``disk``) keeps reading
the file it opened, and one truncated under it would kill that process with ``SIGBUS``.
:meth:`MappedTable.check_intact` turns a truncation it can see into a :class:`TableFileError`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from engram.atomic import atomic_path
from engram.kernels.fp8 import row_dim
from engram.storage.checksums import (CHUNK_BYTES, SAFETENSORS_DTYPES, ChunkChecksums, FileIntegrityError,
                                      checked_metadata, read_chunks, read_safetensors_header, write_checked_safetensors)

FORMAT_VERSION = "1"
_FORMAT_KEY = "engram_table_format"
_CHUNK_KEY = "engram_table_chunk_bytes"
_CRC_KEY = "engram_table_crc32"
_ROW_FORMAT_KEY = "engram_table_row_format"
FP8_ROW_FORMAT = "fp8-e4m3-ue8m0"  # the row_format "fp8" as a file names it
_RESERVED_KEYS = frozenset({_FORMAT_KEY, _CHUNK_KEY, _CRC_KEY, _ROW_FORMAT_KEY})
_DTYPE_NAMES = {dtype: SAFETENSORS_DTYPES[dtype]
                for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8)}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
# warnings.catch_warnings swaps process-wide state; threads mapping tables at once must take turns.
_WARNINGS_LOCK = threading.Lock()
_SHM_LOCK = threading.Lock()  # atomic_path's temporary name is per process, not per thread


class TableFileError(FileIntegrityError):
    """A table file is malformed, truncated or fails its checksums; the message names the file."""


@dataclass(frozen=True)
class TableHeader:
    """What a table file's header says about its ``[num_rows, dim]`` tensor."""

    path: Path
    num_rows: int
    dim: int
    dtype: torch.dtype
    data_offset: int  # byte offset of row 0 in the file: 8 + header length
    chunk_bytes: int  # bytes covered by each checksum, the last chunk shorter; need not hold whole rows
    crc32: tuple[int, ...]  # zlib.crc32 of each chunk of the data region
    metadata: dict[str, str]  # the caller's metadata, integrity keys removed

    @property
    def row_format(self) -> str:
        """``"fp8"`` for packed FP8 rows (a uint8 table), else ``"float"``."""
        return "fp8" if self.dtype == torch.uint8 else "float"

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def data_bytes(self) -> int:
        return self.num_rows * self.row_bytes

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.data_bytes

    @property
    def checksums(self) -> ChunkChecksums:
        return ChunkChecksums(self.path, self.data_offset, self.data_bytes, self.chunk_bytes, self.crc32)


def write_table(
    path: str | os.PathLike[str],
    weight: torch.Tensor,
    metadata: Mapping[str, str] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    workers: int | None = None,
) -> TableHeader:
    """Write ``weight`` ``[R, D]`` (a contiguous CPU fp32/bf16/fp16 tensor, possibly a memory map) to ``path``.

    A uint8 ``weight`` is a table of packed FP8 rows ``[R, D + D / 32]`` (:func:`engram.kernels.fp8.quantize_rows`), and
    its file records that row format. The file is replaced atomically: readers see the old file or the complete
    new one.
    Example: ``write_table("layer2.safetensors", table, {"layer": "2"})``.
    """
    if weight.dtype not in _DTYPE_NAMES:
        raise ValueError(f"table dtype must be one of {list(_DTYPE_NAMES)}, got {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"a table is a non-empty 2-D tensor [rows, dim], got shape {tuple(weight.shape)}")
    if weight.dtype == torch.uint8:
        row_dim(weight.shape[1])  # a uint8 table is packed FP8 rows: refuse a width that is none
    if weight.device.type != "cpu":
        raise ValueError(f"write_table needs a CPU tensor, got one on {weight.device}; call .cpu() first")
    if not weight.is_contiguous():
        raise ValueError("write_table needs a contiguous tensor (a copy of a huge table is the caller's call)")
    metadata = checked_metadata(metadata, _RESERVED_KEYS)
    row_format = {_ROW_FORMAT_KEY: FP8_ROW_FORMAT} if weight.dtype == torch.uint8 else {}

    def with_integrity(crc32: tuple[int, ...]) -> dict[str, str]:
        return {**metadata, _FORMAT_KEY: FORMAT_VERSION, _CHUNK_KEY: str(chunk_bytes), _CRC_KEY: json.dumps(crc32),
                **row_format}

    sums = write_checked_safetensors(path, {"weight": weight}, with_integrity, chunk_bytes, workers)
    num_rows, dim = weight.shape
    return TableHeader(sums.path, num_rows, dim, weight.dtype, sums.data_offset, chunk_bytes, sums.crc32, metadata)


def read_header(path: str | os.PathLike[str]) -> TableHeader:
    """Parse and validate the header of the table file at ``path`` (the data is not read)."""
    path = Path(path)

    def fail(what: str) -> TableFileError:
        return TableFileError(f"table file {path}: {what}")

    header, data_offset, file_bytes = read_safetensors_header(path, fail)
    meta = header.pop("__metadata__", None)
    if list(header) != ["weight"]:
        raise fail(f"holds tensors {sorted(header)}, a table file holds exactly one named 'weight'")
    entry = header["weight"]
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        raise fail(f"'weight' has no supported dtype (one of {list(_DTYPES)}): {entry}")
    dtype, shape = _DTYPES[entry["dtype"]], entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
        raise fail(f"'weight' must have a non-empty 2-D shape [rows, dim], got {shape}")
    data_bytes = shape[0] * shape[1] * dtype.itemsize
    if entry.get("data_offsets") != [0, data_bytes]:
        raise fail(f"'weight' data_offsets {entry.get('data_offsets')} should be [0, {data_bytes}]")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise fail("__metadata__ is missing or not a str -> str map")
    if meta.get(_FORMAT_KEY) != FORMAT_VERSION:
        raise fail(f"{_FORMAT_KEY} is {meta.get(_FORMAT_KEY)!r}; this reader knows {FORMAT_VERSION!r}")
    try:
        chunk_bytes = int(meta[_CHUNK_KEY])
        crc32 = tuple(json.loads(meta[_CRC_KEY]))
    except (KeyError, ValueError, TypeError) as e:
        raise fail(f"malformed integrity metadata ({type(e).__name__}: {e})") from None
    row_format = meta.get(_ROW_FORMAT_KEY)
    if dtype == torch.uint8:
        if row_format != FP8_ROW_FORMAT:
            raise fail(f"a U8 table holds packed FP8 rows and must say {_ROW_FORMAT_KEY}={FP8_ROW_FORMAT!r}, "
                       f"got {row_format!r}")
        try:
            row_dim(shape[1])
        except ValueError as e:
            raise fail(str(e)) from None
    elif row_format is not None:
        raise fail(f"{_ROW_FORMAT_KEY}={row_format!r} but the table is {entry['dtype']}: packed FP8 rows are U8")
    expected_chunks = -(-data_bytes // chunk_bytes) if chunk_bytes > 0 else -1
    if len(crc32) != expected_chunks or not all(type(c) is int and 0 <= c < 2**32 for c in crc32):
        raise fail(f"{_CRC_KEY} should hold {expected_chunks} 32-bit checksums of {chunk_bytes}-byte chunks")
    if file_bytes != data_offset + data_bytes:
        extra = file_bytes - data_offset - data_bytes
        problem = "truncated" if extra < 0 else f"has {extra} extra bytes"
        raise fail(f"{problem}: expected {data_offset + data_bytes} bytes, the file has {file_bytes}")
    metadata = {k: v for k, v in meta.items() if k not in _RESERVED_KEYS}
    return TableHeader(path, shape[0], shape[1], dtype, data_offset, chunk_bytes, crc32, metadata)


def _read_chunks(
    header: TableHeader, workers: int | None, dest: Callable[[int, int], memoryview] | None, check: bool
) -> None:
    """Read every chunk into ``dest(start, stop)`` (a scratch buffer if None), checking CRC-32s if ``check``."""

    def rows(start: int, stop: int) -> str:
        return f"rows {start // header.row_bytes} to {(stop - 1) // header.row_bytes}"

    read_chunks(header.checksums, lambda what: TableFileError(f"table file {header.path}: {what}"), workers, dest,
                check, where=rows)


def verify_table(path_or_header: str | os.PathLike[str] | TableHeader, workers: int | None = None) -> None:
    """Recompute every chunk's CRC-32; raise :class:`TableFileError` naming the first corrupt chunk."""
    header = path_or_header if isinstance(path_or_header, TableHeader) else read_header(path_or_header)
    _read_chunks(header, workers, None, check=True)


class MappedTable:
    """A read-only memory map of a table file; ``tensor`` is a zero-copy ``[R, D]`` CPU view of its data.

    The map is shared (``MAP_SHARED``): processes mapping the same file share its page-cache pages.
    ``tensor`` is READ-ONLY although torch cannot mark it so: writing into it crashes the process.
    ``close`` drops this object's references; the pages are unmapped once no view of ``tensor`` is left
    (unmapping earlier would leave those views pointing at nothing).
    """

    def __init__(self, header: TableHeader) -> None:
        self.header = header
        with open(header.path, "rb") as f:
            self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.check_intact()  # the file may have changed since its header was read
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(
                self._buffer, dtype=header.dtype, count=header.num_rows * header.dim, offset=header.data_offset
            )
        self.tensor = flat.view(header.num_rows, header.dim)

    def check_intact(self) -> None:
        """Raise :class:`TableFileError` if the mapped file is shorter than its header says (truncated in place):
        reading its lost pages would kill the process with ``SIGBUS``. One ``fstat``: cheap enough for every read.
        """
        size = self._buffer.size()  # the file's current size, not the mapping's
        if size < self.header.file_bytes:
            raise TableFileError(
                f"table file {self.header.path}: truncated to {size} bytes while mapped (its header needs "
                f"{self.header.file_bytes}): it was changed in place. Replace a table file atomically (write the new "
                "file, then rename it over the old one, as write_table does), never rewrite it where it is"
            )

    def close(self) -> None:
        del self.tensor, self._buffer

    def __enter__(self) -> MappedTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_table(path: str | os.PathLike[str], verify: bool = True, workers: int | None = None) -> MappedTable:
    """Memory-map the table at ``path``; with ``verify`` every checksum is checked first (reads the whole file).

    Example: ``with map_table(p) as table: rows = table.tensor[row_ids]``.
    """
    header = read_header(path)
    if verify:
        verify_table(header, workers)
    return MappedTable(header)


def load_table(
    path: str | os.PathLike[str],
    out: torch.Tensor | None = None,
    verify: bool = True,
    workers: int | None = None,
) -> torch.Tensor:
    """Read the table at ``path`` into ``out`` (a contiguous ``[R, D]`` CPU tensor of its dtype, e.g. pinned)
    or a new tensor, checking checksums in the same pass. Returns the ``[R, D]`` tensor.

    On a :class:`TableFileError` ``out`` holds partial data and must not be used.
    Example: ``load_table(p, out=torch.empty(r, d, dtype=torch.bfloat16, pin_memory=True))``.
    """
    header = read_header(path)
    shape = (header.num_rows, header.dim)
    if out is None:
        out = torch.empty(shape, dtype=header.dtype)
    elif tuple(out.shape) != shape or out.dtype != header.dtype:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, the table {path} is {shape} {header.dtype}")
    elif out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous CPU tensor, got one on {out.device}")
    data = memoryview(out.view(torch.uint8).reshape(-1).numpy())
    _read_chunks(header, workers, lambda start, stop: data[start:stop], check=verify)
    return out


def share_in_shm(path: str | os.PathLike[str], shm_dir: str | os.PathLike[str] = "/dev/shm") -> Path:
    """Copy the table at ``path`` into RAM-backed ``shm_dir`` once per host; return the copy's path.

    The copy is named by its content (shape, dtype, checksums, metadata), so every process sharing a table
    maps one copy and an existing valid copy is reused; it is checked before it appears under its name.
    Example: ``table = map_table(share_in_shm(p), verify=False)``.
    """
    shm_dir = Path(shm_dir)
    if not shm_dir.is_dir():
        raise FileNotFoundError(f"shared-memory folder {shm_dir} does not exist; pass shm_dir= a tmpfs folder")
    header = read_header(path)
    identity = [header.num_rows, header.dim, str(header.dtype), header.chunk_bytes, header.crc32, header.metadata]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    shared = shm_dir / f"engram-{key}.safetensors"
    with _SHM_LOCK:
        try:
            existing = read_header(shared)
            if dataclasses.replace(existing, path=header.path) == header:
                return shared
        except (FileNotFoundError, TableFileError):
            pass
        with atomic_path(shared) as tmp:
            shutil.copyfile(header.path, tmp)
            verify_table(tmp)
    return shared
