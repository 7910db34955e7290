"""Tables in host memory: :class:`HostStore`, and the threaded CPU gather it shares with ``DiskStore``.

Two ways to bring host rows to a GPU:

* ``"cpu"``: CPU threads gather the rows into a pinned staging buffer, then one asynchronous copy crosses the
  link. Works for any table, including a memory-mapped file larger than RAM.
* ``"uva"``: a GPU kernel reads the rows straight out of the pinned table over unified virtual addressing
  (the table is page-locked in place if it is not pinned yet), no CPU work and no staging.

Both run on a background thread and a side CUDA stream, so ``fetch`` returns at once and the rows cross the
link while the caller computes. With ``dedup`` each distinct row is read and sent once and expanded on the
GPU: n-gram traffic is Zipfian, so this cuts both CPU work and link bytes.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from engram.kernels.gather import multi_head_gather
from engram.storage.store import PendingRows, StagedStore, as_device, check_rows, receive_rows, snapshot_rows

# Measured on an H200 (benchmarks/results/bench_offload.md): sorted UVA reads reach ~60% of the link, the CPU
# gather ~45% with its deduplication; a CPU-only machine has only the CPU gather.
DEFAULT_HOST_METHOD = "uva"
HOST_METHODS = ("auto", "cpu", "uva")
DEFAULT_WORKERS = min(16, os.cpu_count() or 1)
# Below this many bytes per slice a thread hop costs more than the copy it saves.
MIN_TASK_BYTES = 64 * 2**10
# Up to this many slices per gather thread: slices that fault pages in from disk vary in time, small ones balance.
TASKS_PER_WORKER = 4
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TYPESTRS = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}
_CUDA_HOST_REGISTER_PORTABLE = 0x01  # every GPU may read it
_CUDA_HOST_REGISTER_MAPPED = 0x02  # implied under unified addressing, stated to be sure
_CUDA_HOST_REGISTER_READ_ONLY = 0x08


def cpu_gather(table: Tensor, rows: Tensor, out: Tensor, pool: ThreadPoolExecutor | None = None) -> Tensor:
    """``out = table[rows]``, split into contiguous slices gathered on ``pool``'s threads.

    Args:
        table: ``[R, D]`` CPU tensor (any dtype; may be a read-only memory map, never written).
        rows: int ``[N]`` CPU row ids in ``[0, R)`` (checked: ``IndexError`` otherwise).
        out: contiguous ``[N, D]`` CPU tensor of ``table``'s dtype (e.g. pinned), filled and returned.
        pool: threads for the slices; ``None`` gathers with ``torch.index_select`` on the calling thread (and
            ATen's own intra-op threads). The plain twin is ``table.index_select(0, rows)``.

    The slices go through ``np.take`` on the rows' raw bits: it releases the GIL like ``index_select`` does, but
    never starts an OpenMP team of its own, where ``index_select`` from every pool thread would (threads x
    cores threads on the machine).

    Example:
        >>> table = torch.arange(12.0).view(4, 3)
        >>> cpu_gather(table, torch.tensor([3, 0, 3]), torch.empty(3, 3)).tolist()
        [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0], [9.0, 10.0, 11.0]]
    """
    if table.dim() != 2 or rows.dim() != 1:
        raise ValueError(f"cpu_gather takes a [R, D] table and [N] rows, got {tuple(table.shape)} and "
                         f"{tuple(rows.shape)}")
    if (out.shape != (rows.shape[0], table.shape[1]) or out.dtype != table.dtype or out.device.type != "cpu"
            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [{rows.shape[0]}, {table.shape[1]}] {table.dtype} CPU tensor, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    check_rows(rows, table.shape[0])
    num_tasks = 0
    if pool is not None:
        row_bytes = table.shape[1] * table.element_size()
        # _max_workers: ThreadPoolExecutor's thread count, stable since Python 3.2 but not public.
        num_tasks = min(TASKS_PER_WORKER * pool._max_workers, rows.shape[0] * row_bytes // MIN_TASK_BYTES)
    if num_tasks < 2:
        return torch.index_select(table, 0, rows.to(torch.int64), out=out)
    table_bits, out_bits, row_ids = _raw_bits(table), _raw_bits(out), rows.numpy()
    bounds = [rows.shape[0] * i // num_tasks for i in range(num_tasks + 1)]
    slices = [pool.submit(np.take, table_bits, row_ids[start:end], axis=0, out=out_bits[start:end], mode="clip")
              for start, end in zip(bounds, bounds[1:])]
    for task in slices:
        task.result()
    return out


def _raw_bits(tensor: Tensor) -> np.ndarray:
    """A numpy view of ``tensor``'s elements as same-width integers (numpy has no bfloat16)."""
    if tensor.element_size() not in _BITS:
        raise TypeError(f"no integer type of {tensor.element_size()} bytes to copy {tensor.dtype} through")
    return tensor.detach().view(_BITS[tensor.element_size()]).numpy()


class _HostArray:
    """Presents a pinned host buffer as a CUDA array (``__cuda_array_interface__``), keeping the table alive."""

    def __init__(self, table: Tensor):
        self.table = table
        self.__cuda_array_interface__ = {
            "shape": tuple(table.shape),
            "typestr": _TYPESTRS[table.element_size()],  # raw bits: numpy has no bfloat16
            "data": (table.data_ptr(), False),  # torch refuses the read-only flag; the GPU only reads it
            "version": 3,
        }


def cuda_alias(table: Tensor, device: torch.device | str = "cuda") -> Tensor:
    """A CUDA tensor on ``device`` aliasing the pinned (or registered) contiguous CPU ``table``: kernels reading
    it fetch host memory over the link (unified virtual addressing). No copy is made; keep ``table`` pinned
    while the alias is used.

    Example (needs CUDA):
        >>> host = torch.randn(1000, 64).pin_memory()  # doctest: +SKIP
        >>> torch.equal(cuda_alias(host)[torch.tensor([5, 7], device="cuda")].cpu(), host[[5, 7]])  # doctest: +SKIP
        True
    """
    if not table.is_contiguous():
        raise ValueError("cuda_alias needs a contiguous table")
    # An explicit index: without one torch would infer the device from the pointer and then "move" the alias
    # to the current device, copying the whole table when the two differ.
    device = as_device(device)
    return torch.as_tensor(_HostArray(table), device=device).view(table.dtype)


def _mapped_writable(ptr: int, nbytes: int) -> bool:
    """Whether every page of ``[ptr, ptr + nbytes)`` is mapped writable, by ``/proc/self/maps`` (Linux; assumed
    writable where that file does not exist)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return True
    for line in lines:
        bounds, permissions = line.split()[:2]
        low, high = (int(bound, 16) for bound in bounds.split("-"))
        if low < ptr + nbytes and ptr < high and "w" not in permissions:
            return False
    return True


def table_writable(table: Tensor) -> bool:
    """Whether ``table``'s CPU memory may be written: ``False`` for a view of a read-only memory map (a ``disk``
    table, a ``/dev/shm`` copy shared between processes), where a write would crash the process."""
    return _mapped_writable(table.data_ptr(), table.numel() * table.element_size())


def pin_in_place(table: Tensor) -> None:
    """Page-lock ``table``'s memory in place (``cudaHostRegister``), read-only when it is mapped read-only.

    For tables too large for ``torch.empty(..., pin_memory=True)``, whose caching allocator rounds every
    request up to a power of two (a 90 GiB table would ask for 128 GiB). Undone by ``cudaHostUnregister``.

    The flag is chosen up front rather than by trying one and then the other: a failed runtime call leaves its
    error behind for the next kernel launch check, which would then raise in unrelated code.
    """
    flags = _CUDA_HOST_REGISTER_PORTABLE | _CUDA_HOST_REGISTER_MAPPED
    nbytes = table.numel() * table.element_size()
    if not _mapped_writable(table.data_ptr(), nbytes):
        flags |= _CUDA_HOST_REGISTER_READ_ONLY
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(table.data_ptr(), nbytes, flags)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of the {nbytes}-byte table (flags {flags:#x}) failed: "
                           f"{cudart.cudaGetErrorString(error)}")


class GatherStore(StagedStore):
    """A table in CPU memory (or a memory map) read by :func:`cpu_gather` on ``workers`` threads, with the fetch
    machinery of :class:`~engram.storage.store.StagedStore`: the common part of :class:`HostStore` and
    :class:`DiskStore`."""

    def __init__(self, table: Tensor, workers: int | None = None, dedup: bool = True,
                 on_close: Callable[[], None] | None = None, default_workers: int = DEFAULT_WORKERS,
                 check: Callable[[], None] | None = None):
        if table.dim() != 2 or table.device.type != "cpu":
            raise ValueError(f"a store's table is a [R, D] CPU tensor, got {tuple(table.shape)} on {table.device}")
        self.workers = default_workers if workers is None else workers
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        super().__init__(*table.shape, table.dtype, dedup, on_close, check)
        self._table = table.detach()
        self._pool = ThreadPoolExecutor(self.workers, "engram-gather") if self.workers > 1 else None

    def table(self) -> Tensor:
        return self._table

    def _read_rows(self, rows: Tensor, out: Tensor) -> None:
        cpu_gather(self._table, rows, out, self._pool)

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _details(self) -> str:
        return f"workers={self.workers}, {super()._details()}"


class HostStore(GatherStore):
    """A table in host memory (pinned, or plain, or a memory map), read into GPU or CPU tensors.

    Args:
        table: ``[R, D]`` CPU tensor; never written.
        method: ``"cpu"`` (threaded gather into pinned staging, then an asynchronous copy), ``"uva"`` (a GPU
            kernel reads the pinned table in place; needs CUDA; a table not pinned yet is page-locked in place,
            which faults in every page of a memory map, and released by :meth:`close`) or ``"auto"``
            (:data:`DEFAULT_HOST_METHOD` where CUDA is available, else ``"cpu"``). A CPU target always takes
            the CPU gather.
        workers: threads of the CPU gather (default :data:`DEFAULT_WORKERS`); 1 gathers on one thread.
        dedup: read and send each distinct row once, expanding on the target device. For ``"uva"``,
            ``False`` reads every row, in ascending address order, entirely queued on a side stream (no host
            synchronisation); ``True`` finds the distinct rows first, which needs one synchronisation.
            ``None`` (default): ``True`` for ``"cpu"``, ``False`` for ``"uva"`` (the faster of each, measured).
        on_close: called by :meth:`close` after the last read (e.g. to unmap the file behind ``table``).

    Example:
        >>> store = HostStore(torch.randn(100, 8))
        >>> store.fetch(torch.tensor([[3, 3, 9]]), "cpu").wait().shape
        torch.Size([1, 3, 8])
    """

    placement = "host"

    def __init__(self, table: Tensor, method: str = "auto", workers: int | None = None, dedup: bool | None = None,
                 on_close: Callable[[], None] | None = None):
        if method not in HOST_METHODS:
            raise ValueError(f"unknown host method {method!r}; expected one of {HOST_METHODS}")
        if method == "auto":
            method = DEFAULT_HOST_METHOD if torch.cuda.is_available() else "cpu"
        self.method = method
        if dedup is None:
            dedup = method == "cpu"
        if self.method == "uva" and not torch.cuda.is_available():
            raise RuntimeError("host method 'uva' reads the table from a GPU kernel and needs CUDA, which is not "
                               "available; use method 'cpu'")
        super().__init__(table, workers, dedup, on_close)
        self._unpin: weakref.finalize | None = None
        self._aliases: dict[torch.device, Tensor] = {}
        if self.method == "uva":
            if not table.is_contiguous():
                raise ValueError("host method 'uva' needs a contiguous table")
            if not table.is_pinned():
                pin_in_place(table)
                # Also when the store is dropped without close(): memory freed while still registered would stay
                # locked, and a later allocation at the same address could not be registered again.
                self._unpin = weakref.finalize(self, torch.cuda.cudart().cudaHostUnregister, table.data_ptr())

    def _fetch_cuda(self, rows: Tensor, device: torch.device) -> PendingRows:
        if self.method == "cpu":
            return super()._fetch_cuda(rows, device)
        if not self.dedup:
            return self._uva_sorted(rows, device)
        snapshot, copied = snapshot_rows(rows, device)
        done = torch.cuda.Event()
        return PendingRows(self._jobs.submit(self._uva_job, snapshot, copied, device, done), done)

    def _uva_job(self, snapshot: Tensor, copied: torch.cuda.Event | None, device: torch.device,
                 done: torch.cuda.Event) -> Tensor:
        with self._streams.on(device):
            flat = receive_rows(snapshot, copied, device).reshape(-1)
            if copied is not None:  # rows from a GPU; fetch checked those from the CPU
                check_rows(flat, self.num_rows)
            flat, inverse = torch.unique(flat, return_inverse=True)
            self._count(snapshot.numel(), flat.shape[0])
            rows_out = self._expand(multi_head_gather(self._alias(device), flat[:, None], sparse_grad=False), inverse)
            done.record()
        return rows_out.view(*snapshot.shape, self.dim)

    def _uva_sorted(self, rows: Tensor, device: torch.device) -> PendingRows:
        """Read every requested row in ascending address order (the link is far faster for sorted reads) and put
        it back in place, all queued on the side stream, no background thread. Rows outside the table are read
        as row 0 and flagged; :meth:`PendingRows.wait` synchronises with the side stream once and raises
        ``IndexError`` for a flagged fetch (a device-side assertion would kill the CUDA context instead)."""
        caller = torch.cuda.current_stream(device)
        flat = rows.reshape(-1).to(device, torch.int64, non_blocking=True, copy=True)  # the caller may reuse rows
        self._count(flat.shape[0], flat.shape[0])
        if flat.numel() == 0:
            return PendingRows.ready(torch.empty(*rows.shape, self.dim, dtype=self.dtype, device=device))
        all_in_range = torch.empty((), dtype=torch.bool, pin_memory=True)
        with self._streams.on(device):
            torch.cuda.current_stream(device).wait_stream(caller)
            flat.record_stream(torch.cuda.current_stream(device))
            in_range = (flat >= 0) & (flat < self.num_rows)
            all_in_range.copy_(in_range.all(), non_blocking=True)
            safe = torch.where(in_range, flat, 0)
            order = safe.argsort()
            gathered = multi_head_gather(self._alias(device), safe[order][:, None], sparse_grad=False)
            rows_out = torch.empty_like(gathered).index_copy_(0, order, gathered)
            done = torch.cuda.Event()
            done.record()

        def checked(result: Tensor) -> Tensor:
            done.synchronize()
            if not bool(all_in_range):
                check_rows(flat.cpu(), self.num_rows)  # raises, naming the first bad row
            return result

        return PendingRows.ready(rows_out.view(*rows.shape, self.dim), done).then(checked)

    def _alias(self, device: torch.device) -> Tensor:
        with self._lock:  # the job thread and (for sorted reads) the caller both use it
            alias = self._aliases.get(device)
            if alias is None:
                alias = self._aliases[device] = cuda_alias(self._table, device)
        return alias

    def _release(self) -> None:
        super()._release()
        self._aliases.clear()
        if self._unpin is not None:
            self._unpin()

    def _details(self) -> str:
        return f"method={self.method!r}, {super()._details()}"
