"""Where Engram tables live: files, host memory, disk, an HBM cache.

- :mod:`~engram.storage.checksums`: a CRC-32 per chunk of every file engram saves (:func:`write_safetensors`,
  :func:`record_checksums` for a folder's other files), checked on load (:class:`FileIntegrityError`);
- :mod:`~engram.storage.table_file`: the one table file format (safetensors with per-chunk CRC-32s; float rows,
  or packed FP8 rows that the file says are) that loads into every placement, memory-maps, and shares one copy
  per machine through ``/dev/shm``;
- :class:`HostStore` (pinned host memory: CPU gather + copy, or a GPU kernel reading over UVA),
  :class:`DiskStore` (a memory-mapped file larger than RAM), :class:`CachedStore` (hot rows in HBM in front
  of either), all behind :class:`TableStore`: ``fetch`` now, ``wait`` later (a prefetch);
- :func:`open_table_store`: a table file opened for a placement.
"""

from engram.storage.cache import CachedStore
from engram.storage.checksums import (FileIntegrityError, load_safetensors, record_checksums, verify_recorded,
                                      verify_safetensors, write_safetensors)
from engram.storage.disk import DiskStore
from engram.storage.host import DEFAULT_HOST_METHOD, HostStore, cpu_gather, cuda_alias, pin_in_place, table_writable
from engram.storage.placement import PLACEMENTS, available_host_memory, open_table_store, private_host_table
from engram.storage.store import PendingRows, TableStore
from engram.storage.table_file import (MappedTable, TableFileError, TableHeader, load_table, map_table,
                                       read_header, share_in_shm, verify_table, write_table)

__all__ = [
    "CachedStore", "DEFAULT_HOST_METHOD", "DiskStore", "FileIntegrityError", "HostStore", "MappedTable", "PLACEMENTS",
    "PendingRows", "TableFileError", "TableHeader", "TableStore", "available_host_memory", "cpu_gather", "cuda_alias",
    "load_safetensors", "load_table", "map_table", "open_table_store", "pin_in_place", "private_host_table",
    "read_header", "record_checksums", "share_in_shm", "table_writable", "verify_recorded", "verify_safetensors",
    "verify_table", "write_safetensors", "write_table",
]
