"""Tables on disk: :class:`DiskStore` gathers rows out of a memory-mapped file that may exceed RAM.

The gather threads touch the mapped pages and the kernel brings them in from the page cache or the SSD, so
more threads than cores pay off: while one waits for a page fault the others read.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from engram.storage.host import GatherStore

# Threads mostly wait on page faults; this many keep a fast NVMe drive's queue busy.
DEFAULT_DISK_WORKERS = 32


class DiskStore(GatherStore):
    """A memory-mapped ``[R, D]`` table, read with the threaded CPU gather of :class:`HostStore`'s ``"cpu"``
    method (into pinned staging, then an asynchronous copy for a CUDA target).

    Args:
        table: ``[R, D]`` CPU tensor over a read-only memory map; never written.
        workers: gather threads (default :data:`DEFAULT_DISK_WORKERS`).
        dedup: read and send each distinct row once, expanding on the target device.
        on_close: called by :meth:`close` after the last read (e.g. to unmap the file).
        check: called at every fetch before anything is read; :func:`engram.storage.open_table_store` passes
            :meth:`MappedTable.check_intact`, so a table file truncated in place raises a ``TableFileError``
            naming it instead of killing the process with ``SIGBUS``.
    """

    placement = "disk"

    def __init__(self, table: Tensor, workers: int | None = None, dedup: bool = True,
                 on_close: Callable[[], None] | None = None, check: Callable[[], None] | None = None):
        super().__init__(table, workers, dedup, on_close, default_workers=DEFAULT_DISK_WORKERS, check=check)
