"""An HBM cache of hot rows in front of a host or disk store: :class:`CachedStore`.

n-gram traffic is Zipfian, so a cache holding a few percent of a table's rows serves most reads. Admission
is by frequency: each fetch's distinct rows and their counts join a window; every ``refresh_every`` fetches
the window is merged into decayed candidate counts and the cache content becomes the most requested
candidates. Rows that stay keep their slots; new ones are read from the backing store.

All of it runs on one background thread and, on a GPU, one side stream: ``fetch`` returns at once, and the
cache's bookkeeping (which needs the number of misses, hence a device sync) never stalls the caller.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engram.storage.store import PendingRows, SideStreams, TableStore, as_device, check_row_dtype, check_rows, \
    receive_rows, snapshot_rows


@dataclass
class _CacheState:
    """The cache on one device."""

    device: torch.device
    cached_ids: Tensor  # [C] int64, ascending
    slots: Tensor  # [C, D]: slots[i] = table[cached_ids[i]]
    candidate_ids: Tensor  # [K] int64, ascending, K <= candidate_factor * capacity
    candidate_counts: Tensor  # [K] float32: decayed request counts
    window: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (distinct rows, counts) per fetch


class CachedStore:
    """Hot rows of ``backing``'s table in the fetch device's memory; the rest read from ``backing``.

    Args:
        backing: the store holding the whole table (host or disk).
        capacity_rows: rows the cache holds (>= 1); ``>= backing.num_rows`` loads the whole table at once.
        refresh_every: fetches between two updates of the cache content.
        candidate_factor: rows whose counts are tracked, as a multiple of ``capacity_rows``.
        decay: factor applied to the counts at every refresh, so the cache follows shifting traffic.

    The cache lives on the device of the first fetch; a fetch to another device starts it again, empty.
    Results are bit-identical to ``table[rows]``. :meth:`stats` counts hits and misses per requested row.

    Example:
        >>> from engram.storage.host import HostStore
        >>> table = torch.randn(100, 4)
        >>> cache = CachedStore(HostStore(table), capacity_rows=2)
        >>> cache.warm(torch.tensor([7, 7, 3, 3, 5]), "cpu")   # admits 3 and 7
        >>> torch.equal(cache.fetch(torch.tensor([7, 1]), "cpu").wait(), table[[7, 1]])
        True
        >>> cache.stats()["hits"], cache.stats()["misses"]
        (1, 1)
    """

    placement = "cache"

    def __init__(self, backing: TableStore, capacity_rows: int, refresh_every: int = 8, candidate_factor: int = 4,
                 decay: float = 0.5):
        if capacity_rows < 1:
            raise ValueError(f"capacity_rows must be >= 1, got {capacity_rows}")
        if refresh_every < 1 or candidate_factor < 1:
            raise ValueError(f"refresh_every and candidate_factor must be >= 1, got {refresh_every} and "
                             f"{candidate_factor}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.backing = backing
        self.num_rows, self.dim, self.dtype = backing.num_rows, backing.dim, backing.dtype
        self.capacity_rows = capacity_rows
        self.refresh_every = refresh_every
        self.candidate_factor = candidate_factor
        self.decay = decay
        self._caches_all = capacity_rows >= backing.num_rows
        self._state: _CacheState | None = None
        self._fetches_since_refresh = 0
        self._jobs = ThreadPoolExecutor(1, "engram-cache")  # the only thread touching the state
        self._streams = SideStreams()
        self._lock = threading.Lock()  # the counters, read by stats() from any thread
        self._closed = False
        self.reset_stats()

    def table(self) -> Tensor:
        return self.backing.table()

    def fetch(self, rows: Tensor, device: torch.device | str) -> PendingRows:
        """Start reading int ``rows`` ``[...]``; ``wait()`` gives ``[..., D]`` on ``device``, equal to
        ``table[rows]`` (see :class:`engram.storage.store.TableStore`)."""
        if self._closed:
            raise RuntimeError("CachedStore is closed")
        device = as_device(device)
        if rows.is_cuda:
            check_row_dtype(rows)
        else:
            check_rows(rows, self.num_rows)
        snapshot, copied = snapshot_rows(rows, device)
        done = torch.cuda.Event() if device.type == "cuda" else None
        return PendingRows(self._jobs.submit(self._fetch_job, snapshot, copied, device, done), done)

    def warm(self, rows: Tensor, device: torch.device | str | None = None) -> None:
        """Count ``rows`` as if fetched and refresh the cache content now (on ``device``: by default where the
        cache lives, else where ``rows`` are): with an empty history the cache then holds the ``capacity_rows``
        most frequent of them. Blocks until done."""
        check_rows(rows, self.num_rows)
        if device is None:
            device = self._state.device if self._state is not None else rows.device
        device = as_device(device)
        snapshot, copied = snapshot_rows(rows, device)
        self._jobs.submit(self._warm_job, snapshot, copied, device).result()

    def stats(self) -> dict:
        """Hits and misses per requested row since :meth:`reset_stats`, with the cache's size and refreshes."""
        with self._lock:
            lookups = self._hits + self._misses
            return {"hits": self._hits, "misses": self._misses, "lookups": lookups,
                    "hit_rate": self._hits / lookups if lookups else 0.0, "fetches": self._fetches,
                    "cached_rows": 0 if self._state is None else self._state.cached_ids.shape[0],
                    "capacity_rows": self.capacity_rows, "refreshes": self._refreshes}

    def reset_stats(self) -> None:
        with self._lock:
            self._hits = self._misses = self._fetches = self._refreshes = 0

    def close(self) -> None:
        """Finish pending fetches, drop the cache and close the backing store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._jobs.shutdown(wait=True)
        for device in self._streams.devices:
            torch.cuda.synchronize(device)
        self._state = None
        self.backing.close()

    def __enter__(self) -> CachedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        stats = self.stats()
        return (f"CachedStore(capacity_rows={self.capacity_rows}, cached_rows={stats['cached_rows']}, "
                f"hit_rate={stats['hit_rate']:.3f}, refresh_every={self.refresh_every}, "
                f"candidate_factor={self.candidate_factor}, decay={self.decay}, backing={self.backing!r})")

    def _fetch_job(self, snapshot: Tensor, copied: torch.cuda.Event | None, device: torch.device,
                   done: torch.cuda.Event | None) -> Tensor:
        with self._streams.on(device):
            state = self._state_on(device)
            flat = receive_rows(snapshot, copied, device).reshape(-1)
            if copied is not None:  # rows from a GPU; fetch checked those from the CPU
                check_rows(flat, self.num_rows)
            distinct, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
            position, hit = _lookup(state.cached_ids, distinct)
            hit_at, miss_at = hit.nonzero()[:, 0], (~hit).nonzero()[:, 0]
            missed = self.backing.fetch(distinct[miss_at], device)
            rows_out = torch.empty(distinct.shape[0], self.dim, dtype=self.dtype, device=device)
            rows_out.index_copy_(0, hit_at, state.slots[position[hit_at]])
            rows_out.index_copy_(0, miss_at, missed.wait())
            rows_out = rows_out.index_select(0, inverse).view(*snapshot.shape, self.dim)
            if done is not None:
                done.record()
            hits = int(counts[hit_at].sum())
            with self._lock:
                self._hits += hits
                self._misses += flat.shape[0] - hits
                self._fetches += 1
            if not self._caches_all:
                state.window.append((distinct, counts))
                self._fetches_since_refresh += 1
                if self._fetches_since_refresh >= self.refresh_every:
                    self._refresh(state)
        return rows_out

    def _warm_job(self, snapshot: Tensor, copied: torch.cuda.Event | None, device: torch.device) -> None:
        with self._streams.on(device):
            state = self._state_on(device)
            if not self._caches_all:
                state.window.append(torch.unique(receive_rows(snapshot, copied, device), return_counts=True))
                self._refresh(state)

    def _state_on(self, device: torch.device) -> _CacheState:
        if self._state is None or self._state.device != device:
            ids = torch.empty(0, dtype=torch.int64, device=device)
            self._state = _CacheState(device, ids, torch.empty(0, self.dim, dtype=self.dtype, device=device), ids,
                                      torch.empty(0, dtype=torch.float32, device=device))
            self._fetches_since_refresh = 0
            if self._caches_all:
                self._admit(self._state, torch.arange(self.num_rows, device=device))
        return self._state

    def _refresh(self, state: _CacheState) -> None:
        """Merge the window into the decayed candidate counts; cache the ``capacity_rows`` most requested."""
        ids = torch.cat([state.candidate_ids, *(distinct for distinct, _ in state.window)])
        weights = torch.cat([state.candidate_counts * self.decay, *(counts.float() for _, counts in state.window)])
        state.window.clear()
        self._fetches_since_refresh = 0
        merged_ids, slot = torch.unique(ids, return_inverse=True)
        merged = torch.zeros(merged_ids.shape[0], dtype=torch.float32, device=ids.device).scatter_add_(0, slot, weights)
        # merged_ids ascend, so a stable sort by count ranks the smaller id first among equal counts.
        ranked = torch.sort(merged, descending=True, stable=True).indices
        kept = ranked[:self.candidate_factor * self.capacity_rows].sort().values
        state.candidate_ids, state.candidate_counts = merged_ids[kept], merged[kept]
        self._admit(state, merged_ids[ranked[:self.capacity_rows].sort().values])
        with self._lock:
            self._refreshes += 1

    def _admit(self, state: _CacheState, ids: Tensor) -> None:
        """Make ``ids`` (ascending) the cache content: rows already cached keep their slots, others are read."""
        position, stays = _lookup(state.cached_ids, ids)
        stay_at, new_at = stays.nonzero()[:, 0], (~stays).nonzero()[:, 0]
        slots = torch.empty(ids.shape[0], self.dim, dtype=self.dtype, device=state.device)
        slots.index_copy_(0, stay_at, state.slots[position[stay_at]])
        slots.index_copy_(0, new_at, self.backing.fetch(ids[new_at], state.device).wait())
        state.cached_ids, state.slots = ids, slots


def _lookup(cached_ids: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending ``[C]`` cached ids, ``[N]`` rows -> each row's slot ``[N]`` (meaningful where cached) and
    whether it is cached ``[N]`` bool."""
    if cached_ids.numel() == 0:
        return torch.zeros_like(rows), torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    position = torch.searchsorted(cached_ids, rows).clamp_(max=cached_ids.shape[0] - 1)
    return position, cached_ids[position] == rows
