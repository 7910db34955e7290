"""Host, disk and cache stores against the plain ``table[rows]``, bit for bit.

CPU tests run everywhere; those marked ``gpu`` cover the CUDA paths (the UVA kernel, the background copy onto a
side stream, the cache in GPU memory) and run only where CUDA is.
"""

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engram.storage import TableFileError, load_table, open_table_store, write_table
from engram.storage.cache import CachedStore
from engram.storage.disk import DiskStore
from engram.storage.host import HostStore, _mapped_writable, cpu_gather, cuda_alias
from engram.storage.store import PendingRows, check_rows

DTYPES = [torch.float32, torch.bfloat16]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
_BITS = {torch.float32: (torch.int32, np.int32), torch.bfloat16: (torch.int16, np.int16)}


def random_table(num_rows, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, dim, generator=gen).to(dtype)


def random_rows(shape, num_rows, seed=1):
    return torch.randint(0, num_rows, shape, generator=torch.Generator().manual_seed(seed))


def read_only_map(table, tmp_path):
    """``table`` written to a file and mapped back read-only: writing through the result would crash."""
    torch_bits, numpy_bits = _BITS[table.dtype]
    path = tmp_path / f"table-{table.dtype}.bin"
    table.view(torch_bits).numpy().tofile(path)
    mapped = np.memmap(path, dtype=numpy_bits, mode="r", shape=tuple(table.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": the stores only read it
        return torch.from_numpy(mapped).view(table.dtype)


def make_store(kind, table, tmp_path, **kwargs):
    if kind == "disk":
        return DiskStore(read_only_map(table, tmp_path), **kwargs)
    return HostStore(table, method=kind.removeprefix("host-"), **kwargs)


@pytest.fixture(scope="module")
def gather_pool():
    with ThreadPoolExecutor(3) as pool:
        yield pool


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_rows,dim,count", [(1009, 7, 0), (1009, 7, 1), (1009, 7, 5000), (1009, 64, 5000),
                                                (3, 129, 777)])
@pytest.mark.parametrize("use_pool", [False, True], ids=["no-pool", "pool"])
def test_cpu_gather_matches_index_select(dtype, num_rows, dim, count, use_pool, gather_pool):
    table = random_table(num_rows, dim, dtype)
    rows = random_rows((count,), num_rows)
    out = torch.full((count, dim), float("nan"), dtype=dtype)  # a slot no slice wrote stays NaN
    assert cpu_gather(table, rows, out, gather_pool if use_pool else None) is out
    assert torch.equal(out, table.index_select(0, rows))


def test_cpu_gather_refuses_bad_arguments():
    table = random_table(10, 4)
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(IndexError, match=r"row 10 .* out of range \[0, 10\)"):
            cpu_gather(table, torch.tensor([1, 10, 2]), torch.empty(3, 4), pool)
        with pytest.raises(ValueError, match="out must be"):
            cpu_gather(table, torch.tensor([1, 2]), torch.empty(3, 4), pool)
        with pytest.raises(ValueError, match="out must be"):
            cpu_gather(table, torch.tensor([1, 2]), torch.empty(2, 4, dtype=torch.float64), pool)


def test_check_rows_names_the_first_bad_row():
    check_rows(torch.tensor([0, 9, 3], dtype=torch.int32), 10)
    check_rows(torch.empty(0, dtype=torch.int64), 10)
    with pytest.raises(IndexError, match=r"row -2 \(flat position 3\) is out of range \[0, 10\)"):
        check_rows(torch.tensor([[0, 9], [3, -2]]), 10)
    with pytest.raises(IndexError, match=r"row 10 \(flat position 1\)"):
        check_rows(torch.tensor([0, 10, -1]), 10)
    with pytest.raises(TypeError, match="integer"):
        check_rows(torch.tensor([0.0, 1.0]), 10)


def test_pending_rows_wait_returns_the_same_tensor():
    rows = torch.randn(2, 3)
    pending = PendingRows.ready(rows)
    assert pending.done() and pending.wait() is rows and pending.wait() is rows
    chained = pending.then(lambda r: r * 2)
    assert chained.wait() is chained.wait()
    assert torch.equal(chained.wait(), rows * 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no-dedup"])
@pytest.mark.parametrize("kind", ["host-cpu", "host-auto", "disk"])
def test_store_fetch_is_table_rows(kind, dedup, dtype, tmp_path):
    table = random_table(1009, 24, dtype)
    store = make_store(kind, table, tmp_path, workers=3, dedup=dedup)
    assert (store.num_rows, store.dim, store.dtype) == (1009, 24, dtype)
    assert store.placement == ("disk" if kind == "disk" else "host")
    rows = random_rows((3, 50, 4), 1009)  # [B, T, H], with repeats
    out = store.fetch(rows, torch.device("cpu")).wait()
    assert out.shape == (3, 50, 4, 24) and out.dtype == dtype
    assert torch.equal(out, table[rows])
    assert store.rows_requested == rows.numel()
    assert store.rows_transferred == (torch.unique(rows).numel() if dedup else rows.numel())
    assert torch.equal(store.fetch(rows[0, 0].to(torch.int32), "cpu").wait(), table[rows[0, 0]])
    assert torch.equal(store.table(), table)
    store.close()


@pytest.mark.parametrize("kind", ["host-cpu", "disk", "cache"])
@pytest.mark.parametrize("bad", [-1, 1009, 10**12])
def test_out_of_range_rows_raise(kind, bad, tmp_path):
    table = random_table(1009, 8)
    store = (CachedStore(HostStore(table), 16) if kind == "cache" else make_store(kind, table, tmp_path))
    rows = torch.tensor([[0, 5], [bad, 7]])
    with pytest.raises(IndexError, match=rf"row {bad} \(flat position 2\) is out of range \[0, 1009\)"):
        store.fetch(rows, "cpu").wait()
    with pytest.raises(TypeError, match="integer"):
        store.fetch(rows.float(), "cpu")
    store.close()


def test_disk_store_serves_concurrent_readers(tmp_path):
    table = random_table(4099, 32, torch.bfloat16)
    closed = []
    store = DiskStore(read_only_map(table, tmp_path), workers=4, on_close=lambda: closed.append(True))
    barrier = threading.Barrier(8)
    results = {}

    def reader(seed):
        rows = random_rows((2000,), 4099, seed=seed)
        barrier.wait()
        results[seed] = (rows, store.fetch(rows, "cpu").wait())

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(8))
    for rows, out in results.values():
        assert torch.equal(out, table[rows])
    assert store.rows_requested == 8 * 2000
    store.close()
    store.close()
    assert closed == [True]
    with pytest.raises(RuntimeError, match="closed"):
        store.fetch(torch.tensor([1]), "cpu")


def test_host_store_refuses_bad_arguments():
    table = random_table(10, 4)
    with pytest.raises(ValueError, match="'gpu'"):
        HostStore(table, method="gpu")
    with pytest.raises(ValueError, match="workers"):
        HostStore(table, workers=0)
    with pytest.raises(ValueError, match=r"\[R, D\] CPU tensor"):
        HostStore(table[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_uva_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="'uva' .* needs CUDA"):
        HostStore(random_table(10, 4), method="uva")


def test_mapped_writable_tells_read_only_maps(tmp_path):
    table = random_table(2048, 16)
    assert _mapped_writable(table.data_ptr(), table.numel() * 4)
    mapped = read_only_map(table, tmp_path)
    assert not _mapped_writable(mapped.data_ptr(), mapped.numel() * 4)


DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def warmed_cache(table, device, method="cpu", **kwargs):
    cache = CachedStore(HostStore(table, method=method, workers=2), capacity_rows=4, **kwargs)
    cache.warm(torch.tensor([1, 1, 1, 2, 2, 3, 3, 4, 4, 5], device=device))  # counts 3, 2, 2, 2, 1: caches 1..4
    return cache


def fetch_checked(store, table, rows, device):
    """``store``'s rows for ``rows`` (sent from ``device`` to ``device``), checked against ``table[rows]``."""
    out = store.fetch(torch.as_tensor(rows, device=device), device).wait()
    assert out.device.type == torch.device(device).type
    assert torch.equal(out.cpu(), table[torch.as_tensor(rows)])


@pytest.mark.parametrize("device", DEVICES)
def test_cache_counts_hits_and_misses(device):
    table = random_table(50, 6, torch.bfloat16)
    cache = warmed_cache(table, device, refresh_every=100)
    assert cache.stats()["cached_rows"] == 4 and cache.stats()["refreshes"] == 1
    fetch_checked(cache, table, [[1, 2, 5], [6, 1, 4]], device)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["lookups"], stats["fetches"]) == (4, 2, 6, 1)
    assert stats["hit_rate"] == pytest.approx(4 / 6)
    assert cache.backing.rows_requested == 4 + 2  # warm read rows 1..4; the misses read 5 and 6
    cache.reset_stats()
    assert cache.stats()["hits"] == cache.stats()["misses"] == 0
    cache.close()


@pytest.mark.parametrize("device", DEVICES)
def test_cache_refresh_admits_the_most_requested_rows(device):
    table = random_table(50, 6)
    cache = warmed_cache(table, device, refresh_every=2, decay=0.5)
    fetch_checked(cache, table, [1, 2, 5, 6, 1], device)  # 3 hits
    fetch_checked(cache, table, [6, 6, 6, 6, 7], device)  # 5 misses, then a refresh
    # Decayed counts 1.5, 1, 1, 1, 0.5 for rows 1..5, plus this window's: 6 has 5, 1 has 3.5, 2 has 2, 5 has
    # 1.5, and 3, 4 and 7 have 1: the cache now holds 1, 2, 5 and 6.
    assert cache.stats()["refreshes"] == 2
    fetch_checked(cache, table, [3, 5, 6, 1], device)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (3 + 0 + 3, 2 + 5 + 1)
    cache.close()


def zipf_rows(num_batches, batch, num_rows, seed=0):
    """Batches of rows whose popularity follows Zipf's law (exponent 1.2) over a random order of the rows."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, num_rows + 1, dtype=torch.float64) ** -1.2
    order = torch.randperm(num_rows, generator=gen)
    return [order[torch.multinomial(weights, batch, replacement=True, generator=gen)] for _ in range(num_batches)]


@pytest.mark.parametrize("device", DEVICES)
def test_cache_learns_zipfian_traffic(device, tmp_path):
    num_rows, capacity = 10_000, 200
    table = random_table(num_rows, 16, torch.bfloat16)
    cache = CachedStore(DiskStore(read_only_map(table, tmp_path), workers=2), capacity, refresh_every=4)
    for i, rows in enumerate(zipf_rows(40, 2000, num_rows)):
        if i == 20:
            cache.reset_stats()
        fetch_checked(cache, table, rows, device)
    stats = cache.stats()
    assert stats["cached_rows"] == capacity and stats["refreshes"] == 5
    # The 200 most popular rows take ~80% of this traffic; capacity / num_rows is 2%.
    assert stats["hit_rate"] > 0.6
    cache.close()


@pytest.mark.parametrize("device", DEVICES)
def test_cache_as_large_as_the_table_holds_all_of_it(device):
    table = random_table(300, 5)
    cache = CachedStore(HostStore(table, workers=1), capacity_rows=300)
    fetch_checked(cache, table, random_rows((40, 7), 300), device)
    stats = cache.stats()
    assert stats["hit_rate"] == 1.0 and stats["cached_rows"] == 300
    assert torch.equal(cache.table(), table)
    cache.close()


def test_cache_refuses_bad_arguments_and_closes_its_backing(tmp_path):
    table = random_table(20, 4)
    with pytest.raises(ValueError, match="capacity_rows must be >= 1, got 0"):
        CachedStore(HostStore(table), 0)
    closed = []
    cache = CachedStore(DiskStore(read_only_map(table, tmp_path), on_close=lambda: closed.append(True)), 4)
    assert cache.placement == "cache" and "DiskStore" in repr(cache)
    cache.close()
    cache.close()
    assert closed == [True]
    with pytest.raises(RuntimeError, match="closed"):
        cache.fetch(torch.tensor([1]), "cpu")


def test_pipelined_fetches_all_arrive(tmp_path):
    table = random_table(1009, 12)
    store = CachedStore(make_store("disk", table, tmp_path, workers=2), 64, refresh_every=1)
    batches = [random_rows((5, 30), 1009, seed) for seed in range(6)]
    pending = [store.fetch(rows, "cpu") for rows in batches]  # all issued before any is waited for
    for rows, rows_pending in zip(batches, pending):
        assert torch.equal(rows_pending.wait(), table[rows])
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no-dedup"])
@pytest.mark.parametrize("kind", ["host-uva-pinned", "host-uva-registered", "host-uva-mapped", "host-cpu", "disk",
                                  "cache-cpu", "cache-uva"])
@pytest.mark.parametrize("rows_on", ["cpu", "cuda"])
def test_cuda_fetch_is_table_rows(kind, dedup, dtype, rows_on, tmp_path):
    table = random_table(1009, 24, dtype)
    if kind == "host-uva-pinned":
        store = HostStore(table.pin_memory(), method="uva", dedup=dedup)
    elif kind == "host-uva-registered":  # page-locked in place, then released by close()
        store = HostStore(table.clone(), method="uva", dedup=dedup)
    elif kind == "host-uva-mapped":  # a read-only mapping is page-locked read-only
        store = HostStore(read_only_map(table, tmp_path), method="uva", dedup=dedup)
    elif kind.startswith("cache"):
        store = CachedStore(HostStore(table.pin_memory(), method=kind.split("-")[1], dedup=dedup), 100,
                            refresh_every=2)
    else:
        store = make_store(kind, table, tmp_path, workers=3, dedup=dedup)
    batches = [random_rows((3, 50, 4), 1009, seed).to(rows_on) for seed in range(4)]
    expected = [table[rows.cpu()] for rows in batches]
    caller = torch.cuda.Stream()  # a caller on a stream of its own
    caller.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(caller):
        pending = [store.fetch(rows, torch.device("cuda")) for rows in batches]
        for rows in batches:
            rows.fill_(0)  # the caller may reuse its rows as soon as fetch returns
        outs = [p.wait() for p in pending]
        outs = [out.cpu() for out in outs]
    for out, want in zip(outs, expected):
        assert torch.equal(out, want)
    if not kind.startswith("cache"):
        assert store.rows_requested == 4 * 600
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["host-uva", "host-cpu", "disk", "cache"])
def test_cuda_rows_out_of_range_raise_at_wait(kind, tmp_path):
    table = random_table(1009, 8).pin_memory()
    store = CachedStore(HostStore(table), 16) if kind == "cache" else make_store(kind, table, tmp_path)
    pending = store.fetch(torch.tensor([0, 1009, 3], device="cuda"), torch.device("cuda"))
    with pytest.raises(IndexError, match=r"row 1009 .* out of range \[0, 1009\)"):
        pending.wait()
    fetch_checked(store, table, [[5, 1008]], "cuda")  # the store still serves
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_alias_reads_host_memory_in_place(dtype):
    table = random_table(1000, 64, dtype).pin_memory()
    alias = cuda_alias(table)
    assert alias.is_cuda and alias.dtype == dtype and alias.shape == table.shape
    assert alias.data_ptr() == table.data_ptr()
    rows = random_rows((300,), 1000)
    assert torch.equal(alias[rows.cuda()].cpu(), table[rows])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_rebuilds_empty_on_another_device():
    table = random_table(50, 6)
    cache = warmed_cache(table, "cuda")
    assert cache.stats()["cached_rows"] == 4
    fetch_checked(cache, table, [1, 2, 3], "cpu")
    assert cache.stats()["cached_rows"] == 0 and cache.stats()["hits"] == 0
    cache.close()


def test_disk_store_refuses_a_file_truncated_in_place(tmp_path):
    """Reading the lost pages of a mapped file truncated under the store would kill the process (SIGBUS)."""
    path = tmp_path / "t.safetensors"
    header = write_table(path, random_table(4096, 64))
    store = open_table_store(path, "disk", workers=2)
    last = torch.tensor([4095])
    assert torch.equal(store.fetch(last, "cpu").wait()[0], load_table(path)[4095])
    os.truncate(path, header.data_offset + 100)
    with pytest.raises(TableFileError, match=f"table file {path}: truncated to .* while mapped"):
        store.fetch(last, "cpu")
    store.close()
