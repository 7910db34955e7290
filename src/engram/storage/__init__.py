"""Where Engram tables live: files, host memory, disk, an HBM cache.

- :mod:`~engram.storage.checksums`: a CRC-32 per chunk of every file engram saves, checked on load
  (:class:`~engram.storage.checksums.FileIntegrityError`);
- :mod:`~engram.storage.table_file`: the one table file format (safetensors with per-chunk CRC-32s; float rows,
  or packed FP8 rows that the file says are) that loads into every placement, memory-maps, and shares one copy
  per machine through ``/dev/shm``;
- :class:`HostStore` (pinned host memory: CPU gather + copy, or a GPU kernel reading over UVA),
  :class:`DiskStore` (a memory-mapped file larger than RAM), :class:`CachedStore` (hot rows in HBM in front
  of either), all behind :class:`~engram.storage.store.TableStore`: ``fetch`` now, ``wait`` later (a prefetch);
- :func:`open_table_store`: a table file opened for a placement;
- Mooncake Store (placement ``store``, the optional extra ``store``): :mod:`~engram.storage.mooncake` (the library,
  a client, the master process), :mod:`~engram.storage.published` (the objects, their manifest, publishing and
  opening them), :mod:`~engram.storage.remote` (:class:`~engram.storage.remote.MooncakeStore`: rows read with ranged
  gets).
"""

from engram.storage.cache import CachedStore
from engram.storage.disk import DiskStore
from engram.storage.host import HostStore
from engram.storage.placement import open_table_store
from engram.storage.table_file import TableFileError, load_table, map_table, share_in_shm, write_table

__all__ = [
    "CachedStore", "DiskStore", "HostStore", "TableFileError", "load_table", "map_table", "open_table_store",
    "share_in_shm", "write_table",
]
