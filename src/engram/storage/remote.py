"""Rows read from Mooncake Store: :class:`MooncakeStore`, one Engram layer's table kept as one object per hash head.

A fetch reads each distinct row once with one ranged scatter-gather get (``get_into_ranges``: one range per row,
straight into a buffer registered for the call) on the store's background thread, so a model issues every layer's
reads before its first block and computes while they travel, on a CPU target as on a GPU one. Every range's result
is checked: a row that did not arrive raises :class:`StoreReadError` naming the object, the row and the store's
error code, never leaving zeros or stale bytes in its place.
"""

from __future__ import annotations

import ctypes
import mmap

import torch
from torch import Tensor

from engram.storage.mooncake import SharedClient
from engram.storage.store import StagedStore

# Mooncake's ErrorCode values (mooncake-store types.h) and what each means for a read here.
ERROR_CODES = {
    -200: ("NO_AVAILABLE_HANDLE", "the store has no memory handle for it"),
    -600: ("INVALID_PARAMS", "the request was refused as malformed"),
    -703: ("REPLICA_IS_NOT_READY", "the object is still being written"),
    -704: ("OBJECT_NOT_FOUND", "the store no longer holds it: the holder process that kept it stopped, or it was "
                               "removed; publish the tables again"),
    -706: ("OBJECT_HAS_LEASE", "the object is leased"),
    -707: ("LEASE_EXPIRED", "its lease expired during the transfer"),
    -800: ("TRANSFER_FAIL", "the transfer from the holder process failed: it died or cannot be reached"),
    -900: ("RPC_FAIL", "the master cannot be reached"),
    -901: ("RPC_TIMEOUT", "the master did not answer in time"),
}
# Failures after which the engine may still write into the destination buffer (a transfer that timed out or broke
# midway): that buffer is kept alive instead of being freed and reused (vLLM's Mooncake connector does the same).
_SAFE_READ_FAILURES = frozenset({-200, -600, -703, -704, -705, -706, -707, -900, -901})
_PROT_READ = 0x1


class StoreReadError(RuntimeError):
    """Rows could not be read from Mooncake Store; the message names the object, the row and the error."""


def describe_code(code: int) -> str:
    """``"OBJECT_NOT_FOUND (-704): the store no longer holds it ..."`` for a Mooncake error code."""
    name, meaning = ERROR_CODES.get(code, ("error", "see Mooncake's ErrorCode"))
    return f"{name} ({code}): {meaning}"


class MooncakeStore(StagedStore):
    """One Engram layer's ``[R, D]`` table (every head's rows back to back, as :class:`~engram.embedding.
    MultiHeadEmbedding` numbers them) served from Mooncake Store objects, one per head.

    Args:
        shared: the client this store reads through (one use of it; :meth:`close` releases it).
        keys: the object of every head, in head order; head ``h`` holds ``table_sizes[h]`` rows of ``D`` elements.
        table_sizes: rows per head.
        dim: elements per row (``D``; packed FP8 rows: bytes).
        dtype: the rows' dtype (float32, bfloat16, float16; uint8 for packed FP8 rows).

    Rows are read bit for bit (the store moves bytes). Made by :meth:`engram.storage.published.PublishedTables.
    open_layer`, which checks first that the objects are the ones the model needs.
    """

    placement = "store"

    def __init__(self, shared: SharedClient, keys: list[str], table_sizes: list[int], dim: int, dtype: torch.dtype):
        if len(keys) != len(table_sizes) or not keys or min(table_sizes) < 1 or dim < 1:
            raise ValueError(f"a MooncakeStore needs one key per head and positive sizes, got {len(keys)} keys, "
                             f"sizes {table_sizes} and dim {dim}")
        super().__init__(sum(table_sizes), dim, dtype, dedup=True, on_close=shared.release, cpu_in_background=True)
        self._shared = shared
        self.keys = list(keys)
        self.table_sizes = list(table_sizes)
        sizes = torch.tensor(table_sizes, dtype=torch.int64)
        self._ends = sizes.cumsum(0)
        self._starts = self._ends - sizes
        self._row_bytes = dim * dtype.itemsize
        self._kept: list[Tensor] = []  # buffers a failed transfer may still write into

    def _read_rows(self, rows: Tensor, out: Tensor) -> None:
        if rows.numel() == 0:
            return
        heads = torch.searchsorted(self._ends, rows, right=True)
        local = rows - self._starts[heads]
        # rows ascend, so each head's rows are one run: per head, where its run starts in out and its source offsets
        counts = torch.bincount(heads, minlength=len(self.keys)).tolist()
        present = [head for head, count in enumerate(counts) if count]
        runs = (local * self._row_bytes).split(counts)
        first = [0, *torch.tensor(counts).cumsum(0).tolist()]
        keys = [self.keys[head] for head in present]
        dst = [list(range(first[h] * self._row_bytes, first[h + 1] * self._row_bytes, self._row_bytes))
               for h in present]
        src = [runs[h].tolist() for h in present]
        sizes = [[self._row_bytes] * counts[h] for h in present]
        client = self._shared.client
        pointer, nbytes = out.data_ptr(), out.numel() * out.element_size()
        code = client.register_buffer(pointer, nbytes)
        if code != 0:
            raise StoreReadError(f"could not register a {nbytes}-byte read buffer with Mooncake Store: "
                                 f"{describe_code(code)}")
        results = client.get_into_ranges([pointer], [keys], [dst], [src], [sizes])
        failure = _first_failure(results, sizes)
        if failure is not None and failure[2] not in _SAFE_READ_FAILURES:
            self._kept.append(out)  # the engine may still write into it: never freed, never unregistered
        else:
            client.unregister_buffer(pointer)
        if failure is not None:
            key_index, position, result = failure
            head = present[key_index]
            row = int(local[first[head] + position])
            table_row = row + int(self._starts[head])
            raise StoreReadError(f"reading row {row} of {keys[key_index]!r} (table row {table_row}, head {head}) "
                                 f"from Mooncake Store failed: {describe_code(result)}; the request that "
                                 "needed it cannot be answered")

    def table(self) -> Tensor:
        """The whole ``[R, D]`` table read from the store into a read-only copy in this process (``R * D`` elements
        of memory: for saving the model or fingerprinting it for memory patches; writing into it crashes the
        process, as it would into a ``disk`` table's map)."""
        nbytes = self.num_rows * self._row_bytes
        memory = mmap.mmap(-1, nbytes)
        pointer = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        client = self._shared.client
        code = client.register_buffer(pointer, nbytes)
        if code != 0:
            raise StoreReadError(f"could not register a {nbytes}-byte buffer with Mooncake Store: "
                                 f"{describe_code(code)}")
        offsets = (self._starts * self._row_bytes).tolist()
        results = client.batch_get_into(self.keys, [pointer + offset for offset in offsets],
                                        [size * self._row_bytes for size in self.table_sizes])
        client.unregister_buffer(pointer)
        for key, size, result in zip(self.keys, self.table_sizes, results):
            if result != size * self._row_bytes:
                raise StoreReadError(f"reading {key!r} ({size * self._row_bytes} bytes) from Mooncake Store failed: "
                                     f"{describe_code(result) if result < 0 else f'{result} bytes arrived'}")
        if ctypes.CDLL(None, use_errno=True).mprotect(ctypes.c_void_p(pointer), ctypes.c_size_t(nbytes), _PROT_READ):
            raise OSError(ctypes.get_errno(), "mprotect of the table copy failed")
        return torch.frombuffer(memory, dtype=self.dtype).view(self.num_rows, self.dim)

    def _details(self) -> str:
        return f"master={self._shared.config.master!r}, keys={self.keys[0]!r}..{self.keys[-1]!r}"


def _first_failure(results: list[list[list[int]]], sizes: list[list[int]]) -> tuple[int, int, int] | None:
    """``(key index, range index, result)`` of the first range whose result is not its size (``-800``, a transfer
    failure, for a range the store gave no result for), else ``None``."""
    answered = results[0] if len(results) == 1 else []
    for key_index, expected in enumerate(sizes):
        ranges = answered[key_index] if key_index < len(answered) else []
        for position, size in enumerate(expected):
            result = ranges[position] if position < len(ranges) else -800
            if result != size:
                return key_index, position, result
    return None
