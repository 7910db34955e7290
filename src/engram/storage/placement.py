"""Open a table file as a store for one placement: pinned host memory, a memory-mapped disk file, either
behind an HBM cache of hot rows."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from engram.kernels.fp8 import ROW_FORMATS, packed_row_bytes, quantize_table
from engram.storage.cache import CachedStore
from engram.storage.disk import DiskStore
from engram.storage.host import HostStore
from engram.storage.store import TableStore
from engram.storage.table_file import load_table, map_table, read_header, share_in_shm

PLACEMENTS = ("device", "host", "disk")  # where a table file goes
# ... and where EngramLM.from_pretrained may put tables: also Mooncake Store (engram.storage.published)
MODEL_PLACEMENTS = (*PLACEMENTS, "store")


def available_host_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where the kernel does not say)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def private_host_table(num_rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty ``[num_rows, dim]`` CPU tensor, pageable, in pages of its own (an anonymous map): the CPU gather
    stages through pinned buffers, and "uva" page-locks the table in place, which must not lock (or collide
    with) a neighbour's memory."""
    memory = mmap.mmap(-1, num_rows * dim * dtype.itemsize)
    return torch.frombuffer(memory, dtype=dtype).view(num_rows, dim)


def open_table_store(path: str | os.PathLike[str], placement: str, cache_rows: int = 0, *,
                     row_format: str | None = None, host_method: str = "auto", workers: int | None = None,
                     share_memory: bool = False, shm_dir: str | os.PathLike[str] = "/dev/shm",
                     host_memory_budget: int | None = None, verify: bool = True) -> TableStore:
    """A store serving the ``[R, D]`` table of the file at ``path`` from ``placement`` (``host`` or ``disk``).

    Args:
        cache_rows: > 0 puts a :class:`CachedStore` of that many rows (in the compute device's memory) in front.
        row_format: the rows the store serves: ``None`` as the file holds them; ``"fp8"`` for a float file
            quantises it while loading into a private ``host`` copy of packed FP8 rows (``engram.kernels.fp8``, about a
            quarter of fp32's bytes; chunk by chunk, no fp32 copy of the table); an FP8 file is served as is.
        host_method: how host rows reach the GPU, see :class:`HostStore`.
        workers: threads gathering rows on the CPU.
        share_memory: ``host`` only: map one copy in ``/dev/shm`` that every process on the machine shares
            (copied there once) instead of a private copy per process.
        shm_dir: the RAM-backed folder ``share_memory`` uses.
        host_memory_budget: bytes a private ``host`` copy may take (default: the kernel's ``MemAvailable``); a
            larger table is refused with a hint to use ``disk``.
        verify: check every chunk's checksum while loading (``host``) or before mapping (``disk``).
    """
    if placement not in ("host", "disk"):
        raise ValueError(f"open_table_store serves placement 'host' or 'disk', got {placement!r}")
    if cache_rows < 0:
        raise ValueError(f"cache_rows must be >= 0, got {cache_rows}")
    if share_memory and placement == "disk":
        raise ValueError("share_memory applies to placement 'host' (a 'disk' table is mapped where it is)")
    if row_format is not None and row_format not in ROW_FORMATS:
        raise ValueError(f"row_format must be one of {ROW_FORMATS} (or None: as the file holds them), got "
                         f"{row_format!r}")
    path = Path(path)
    header = read_header(path)
    if row_format == "float" and header.row_format == "fp8":
        raise ValueError(f"{path} holds packed FP8 rows: they are served as they are (row_format 'fp8' or None), "
                         "not converted to float")
    quantize = row_format == "fp8" and header.row_format == "float"
    if quantize and (placement == "disk" or share_memory):
        where = "placement 'disk' maps" if placement == "disk" else "share_memory maps"
        raise ValueError(f"{path} holds float rows and {where} the file as it is: FP8 rows quantised while loading "
                         "live in a private 'host' copy. Save the model with FP8 tables (save_pretrained) and map "
                         "that folder instead")
    store: TableStore
    if placement == "disk" or share_memory:
        source = share_in_shm(path, shm_dir) if share_memory else path
        mapped = map_table(source, verify=verify, workers=workers)
        if placement == "disk":
            store = DiskStore(mapped.tensor, workers=workers, on_close=mapped.close, check=mapped.check_intact)
        else:
            store = HostStore(mapped.tensor, method=host_method, workers=workers, on_close=mapped.close)
    else:
        dtype, dim = (torch.uint8, packed_row_bytes(header.dim)) if quantize else (header.dtype, header.dim)
        data_bytes = header.num_rows * dim * dtype.itemsize
        budget = available_host_memory() if host_memory_budget is None else host_memory_budget
        if budget is not None and data_bytes > budget:
            raise ValueError(f"{path}: a host copy of this table needs {data_bytes / 2**30:.2f} GiB, more "
                             f"than the host memory budget of {budget / 2**30:.2f} GiB; use placement 'disk'")
        table = private_host_table(header.num_rows, dim, dtype)
        if quantize:
            with map_table(path, verify=verify, workers=workers) as mapped:
                quantize_table(mapped.tensor, out=table)
        else:
            load_table(path, out=table, verify=verify, workers=workers)
        store = HostStore(table, method=host_method, workers=workers)
    return CachedStore(store, cache_rows) if cache_rows else store
