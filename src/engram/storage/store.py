"""What every table store offers: ``fetch`` rows now, ``wait`` for them later.

A store serves one ``[R, D]`` table from wherever it lives (pinned host memory, a memory-mapped file, an HBM
cache in front of either). Engram's row ids depend only on the input tokens, so a model issues every layer's
reads before its first block and waits for each just before the layer needs it: the copy overlaps compute.

The helpers here are shared by the stores that do their work on a background thread: a private snapshot of
the caller's rows, its arrival on the thread's side stream, the side streams themselves, and
:class:`StagedStore`, the fetch machinery of every store that reads rows into host memory first (host, disk,
Mooncake Store).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch
from torch import Tensor

_ROW_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class PendingRows:
    """Rows being fetched; :meth:`wait` returns them ``[*shape, D]`` on the target device (blocks until ready).

    Made from a ready tensor (:meth:`ready`) or from a future plus, for a CUDA result written on another
    stream, the event after which it is complete: :meth:`wait` makes the current stream wait for that event
    and tells the allocator the tensor is used there. Repeated calls return the same tensor.

    Example:
        >>> PendingRows.ready(torch.ones(2, 3)).then(lambda rows: rows.sum(0)).wait()
        tensor([2., 2., 2.])
    """

    def __init__(self, future: Future[Tensor] | None, ready_event: torch.cuda.Event | None = None,
                 rows: Tensor | None = None):
        self._future = future
        self._ready_event = ready_event
        self._rows = rows

    @classmethod
    def ready(cls, rows: Tensor, ready_event: torch.cuda.Event | None = None) -> PendingRows:
        """Rows already queued: ``wait`` only orders the current stream after ``ready_event`` (if any). Holds no
        future (whose lock ``torch.compile`` cannot trace), so a device table's read stays inside a compiled graph."""
        return cls(None, ready_event, rows)

    def done(self) -> bool:
        """Whether :meth:`wait` would return without blocking the calling thread."""
        return self._rows is not None or self._future.done()

    def wait(self) -> Tensor:
        rows = self._rows if self._rows is not None else self._future.result()
        if self._ready_event is not None:
            stream = torch.cuda.current_stream(rows.device)
            stream.wait_event(self._ready_event)
            rows.record_stream(stream)
        return rows

    def then(self, fn: Callable[[Tensor], Tensor]) -> PendingRows:
        """Rows whose :meth:`wait` returns ``fn(self.wait())``, computed once by the first thread that waits."""
        return _Then(self, fn)


class _Then(PendingRows):
    def __init__(self, source: PendingRows, fn: Callable[[Tensor], Tensor]):
        self._source = source
        self._fn = fn
        self._rows: Tensor | None = None
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._rows is not None or self._source.done()

    def wait(self) -> Tensor:
        with self._lock:
            if self._rows is None:
                self._rows = self._fn(self._source.wait())
            return self._rows


class TableStore(Protocol):
    """An ``[R, D]`` table served from outside the compute device's own parameters."""

    placement: str  # "host" | "disk" | "store" | "cache"
    num_rows: int
    dim: int
    dtype: torch.dtype

    def fetch(self, rows: Tensor, device: torch.device) -> PendingRows:
        """Start reading ``rows`` (int ``[...]`` flat row ids in ``[0, R)``, on any device); ``wait()`` gives
        ``[..., D]`` on ``device``, bit-identical to ``table[rows]`` (a copy). Out-of-range rows raise
        ``IndexError``: from ``fetch`` for rows on the CPU, from ``wait`` for rows on a GPU (checking them in
        ``fetch`` would stall the caller until the GPU has computed them)."""
        ...

    def table(self) -> Tensor:
        """The full ``[R, D]`` CPU tensor behind the store (for saving; read-only for a disk store)."""
        ...

    def close(self) -> None:
        """Stop the store's threads and release what it holds; fetch no more afterwards."""
        ...


def check_row_dtype(rows: Tensor) -> None:
    """Raise ``TypeError`` unless ``rows`` holds integers (never reads the values: no device sync)."""
    if rows.dtype not in _ROW_DTYPES:
        raise TypeError(f"row ids must be an integer tensor, got {rows.dtype}")


def check_rows(rows: Tensor, num_rows: int) -> None:
    """Raise ``TypeError`` for non-integer ``rows`` and ``IndexError`` naming the first row outside
    ``[0, num_rows)``. Reads the values: on a CUDA tensor this waits for the GPU to compute them.

    Example:
        >>> check_rows(torch.tensor([0, 3, -1]), 3)
        Traceback (most recent call last):
        ...
        IndexError: row 3 (flat position 1) is out of range [0, 3)
    """
    check_row_dtype(rows)
    if rows.numel() == 0:
        return
    low, high = torch.aminmax(rows)
    if int(low) >= 0 and int(high) < num_rows:
        return
    flat = rows.reshape(-1)
    position = int(((flat < 0) | (flat >= num_rows)).nonzero()[0, 0])
    raise IndexError(f"row {int(flat[position])} (flat position {position}) is out of range [0, {num_rows})")


def as_device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit index for CUDA (the current one when unnamed), so equal devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def snapshot_rows(rows: Tensor, device: torch.device) -> tuple[Tensor, torch.cuda.Event | None]:
    """A private int64 copy of ``rows`` for a background job on ``device``, taken without blocking the caller
    (who may overwrite ``rows`` as soon as ``fetch`` returns), and the event that marks it complete.

    GPU rows for a CUDA job are copied to ``device`` on its current stream; GPU rows for a host job go to pinned
    host memory; both return an event recorded after the copy. CPU rows are copied at once, into pinned memory
    for a CUDA job so that its own host-to-device copy is asynchronous, with no event.
    """
    if not rows.is_cuda:
        copy = torch.empty(rows.shape, dtype=torch.int64, pin_memory=device.type == "cuda")
        return copy.copy_(rows), None
    if device.type == "cuda":
        copy = rows.to(device, torch.int64, non_blocking=True, copy=True)
        stream = torch.cuda.current_stream(device)
    else:
        copy = torch.empty(rows.shape, dtype=torch.int64, pin_memory=True).copy_(rows, non_blocking=True)
        stream = torch.cuda.current_stream(rows.device)
    copied = torch.cuda.Event()
    copied.record(stream)
    return copy, copied


def receive_rows(snapshot: Tensor, copied: torch.cuda.Event | None, device: torch.device) -> Tensor:
    """Inside a background job: the :func:`snapshot_rows` copy on ``device``, ordered after the copy on the
    job's current stream (a CUDA ``device``) or on the host (a CPU ``device``: waits for the event)."""
    if device.type != "cuda":
        if copied is not None:
            copied.synchronize()
        return snapshot
    if not snapshot.is_cuda:
        return snapshot.to(device, non_blocking=True)
    stream = torch.cuda.current_stream(device)
    stream.wait_event(copied)
    snapshot.record_stream(stream)  # allocated on the caller's stream, read on this one
    return snapshot


class SideStreams:
    """One CUDA stream per device, made on first use, on which a store's background jobs run.

    The streams have high priority: their small gathers are scheduled ahead of the model's queued kernels, so
    they finish before the Engram layer waits for them instead of queueing behind whole blocks for free SMs.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    @property
    def devices(self) -> list[torch.device]:
        return list(self._streams)

    @contextlib.contextmanager
    def on(self, device: torch.device) -> Iterator[None]:
        """Make ``device`` and its side stream current (nothing for a CPU ``device``)."""
        if device.type != "cuda":
            yield
            return
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device, priority=-1)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            yield


class StagedStore:
    """The fetch machinery of the stores whose rows are read into host memory, then copied to the target device:
    :class:`~engram.storage.host.HostStore` (CPU method), :class:`~engram.storage.disk.DiskStore` and
    :class:`~engram.storage.remote.MooncakeStore`. A subclass says how rows are read (:meth:`_read_rows`).

    For a CUDA target a background thread reads the rows into pinned memory and copies them to the GPU on a side
    stream; for a CPU target the caller's thread reads them, or (``cpu_in_background``: a read that waits on the
    network, not on the CPU) the background thread does, so ``fetch`` returns at once there too. With ``dedup``
    each distinct row is read once (in ascending order) and expanded on the target device.

    Thread-safe: each fetch has its own buffers; the counters ``rows_requested`` (every row asked for) and
    ``rows_transferred`` (rows read, distinct ones with ``dedup``) are kept under a lock. ``check``, when given, is
    called at every fetch before anything is read (e.g. :meth:`engram.storage.table_file.MappedTable.check_intact`:
    a clear error instead of a crash on a truncated file).
    """

    placement = "host"

    def __init__(self, num_rows: int, dim: int, dtype: torch.dtype, dedup: bool = True,
                 on_close: Callable[[], None] | None = None, check: Callable[[], None] | None = None,
                 cpu_in_background: bool = False):
        self.num_rows, self.dim, self.dtype = num_rows, dim, dtype
        self.dedup = dedup
        self.rows_requested = 0
        self.rows_transferred = 0
        self._jobs = ThreadPoolExecutor(1, "engram-fetch")  # one job at a time, in fetch order
        self._streams = SideStreams()
        self._lock = threading.Lock()
        self._on_close = on_close
        self._check = check
        self._cpu_in_background = cpu_in_background
        self._closed = False

    def _read_rows(self, rows: Tensor, out: Tensor) -> None:
        """Fill ``out`` ``[U, D]`` (a contiguous CPU tensor of the table's dtype, pinned for a CUDA target) with
        the table's int64 ``rows`` ``[U]`` (CPU, in ``[0, R)``; ascending and distinct with ``dedup``)."""
        raise NotImplementedError

    def fetch(self, rows: Tensor, device: torch.device | str) -> PendingRows:
        """Start reading int ``rows`` ``[...]``; ``wait()`` gives ``[..., D]`` on ``device``, equal to
        ``table[rows]`` (see :class:`TableStore`)."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if self._check is not None:
            self._check()
        device = as_device(device)
        if rows.is_cuda:
            check_row_dtype(rows)
        else:
            check_rows(rows, self.num_rows)
        if device.type == "cuda":
            return self._fetch_cuda(rows, device)
        if self._cpu_in_background:
            snapshot, copied = snapshot_rows(rows, device)
            return PendingRows(self._jobs.submit(self._copy_job, snapshot, copied, device, None))
        flat = rows.reshape(-1).to("cpu", torch.int64)
        return PendingRows.ready(self._expand(*self._gather(flat, pin=False)).view(*rows.shape, self.dim))

    def _fetch_cuda(self, rows: Tensor, device: torch.device) -> PendingRows:
        done = torch.cuda.Event()
        if rows.is_cuda and self.dedup:  # distinct rows found on the GPU: torch.unique is slow on the CPU
            snapshot, copied = snapshot_rows(rows, device)
            return PendingRows(self._jobs.submit(self._unique_on_device_job, snapshot, copied, device, done), done)
        snapshot, copied = snapshot_rows(rows, torch.device("cpu"))
        return PendingRows(self._jobs.submit(self._copy_job, snapshot, copied, device, done), done)

    def _copy_job(self, snapshot: Tensor, copied: torch.cuda.Event | None, device: torch.device,
                  done: torch.cuda.Event | None) -> Tensor:
        host_rows = receive_rows(snapshot, copied, torch.device("cpu"))
        gathered, inverse = self._gather(host_rows.reshape(-1), pin=device.type == "cuda")
        if device.type != "cuda":
            return self._expand(gathered, inverse).view(*snapshot.shape, self.dim)
        with self._streams.on(device):
            # The staging buffer stays alive until this copy ends: the caching host allocator records it.
            rows_out = self._expand(gathered.to(device, non_blocking=True),
                                    None if inverse is None else inverse.pin_memory().to(device, non_blocking=True))
            done.record()
        return rows_out.view(*snapshot.shape, self.dim)

    def _unique_on_device_job(self, snapshot: Tensor, copied: torch.cuda.Event | None, device: torch.device,
                              done: torch.cuda.Event) -> Tensor:
        with self._streams.on(device):
            flat = receive_rows(snapshot, copied, device).reshape(-1)
            distinct, inverse = torch.unique(flat, return_inverse=True)  # ascending: the CPU reads in address order
            host_rows = distinct.cpu()
            check_rows(host_rows, self.num_rows)
            out = torch.empty(host_rows.shape[0], self.dim, dtype=self.dtype, pin_memory=True)
            self._read_rows(host_rows, out)
            self._count(flat.shape[0], host_rows.shape[0])
            rows_out = out.to(device, non_blocking=True).index_select(0, inverse)
            done.record()
        return rows_out.view(*snapshot.shape, self.dim)

    def _gather(self, flat_rows: Tensor, pin: bool) -> tuple[Tensor, Tensor | None]:
        """int64 ``[N]`` CPU rows -> the rows read ``[U, D]`` (pinned if ``pin``) and, with ``dedup``, the
        ``[N]`` inverse index that expands them (``U`` distinct rows), else ``None`` (``U = N``)."""
        requested, inverse = flat_rows.shape[0], None
        if self.dedup:
            flat_rows, inverse = torch.unique(flat_rows, return_inverse=True)
        out = torch.empty(flat_rows.shape[0], self.dim, dtype=self.dtype, pin_memory=pin)
        self._read_rows(flat_rows, out)
        self._count(requested, flat_rows.shape[0])
        return out, inverse

    @staticmethod
    def _expand(gathered: Tensor, inverse: Tensor | None) -> Tensor:
        return gathered if inverse is None else gathered.index_select(0, inverse)

    def _count(self, requested: int, transferred: int) -> None:
        with self._lock:
            self.rows_requested += requested
            self.rows_transferred += transferred

    def close(self) -> None:
        """Finish pending fetches, stop the threads, then call ``on_close`` (e.g. unmap the file). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.shutdown(wait=True)
        for device in self._streams.devices:
            torch.cuda.synchronize(device)  # nothing may still read the table once on_close releases it
        self._release()
        if self._on_close is not None:
            self._on_close()

    def _release(self) -> None:
        """What a subclass frees after the last read and before ``on_close``."""

    def __enter__(self) -> StagedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _details(self) -> str:
        return f"dedup={self.dedup}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rows={self.num_rows}, dim={self.dim}, dtype={self.dtype}, {self._details()}, "
                f"requested={self.rows_requested}, transferred={self.rows_transferred}"
                f"{', closed' if self._closed else ''})")
