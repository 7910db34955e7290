"""Packed FP8 rows (uint8 ``[R, D + D / 32]``, :mod:`engram.kernels.fp8`) through table files and every store, bit for
bit; float table files quantised while loading into host memory."""

import json
import struct

import pytest
import torch
from safetensors import safe_open

from engram.kernels.fp8 import quantize_rows, quantize_table
from engram.storage import (CachedStore, DiskStore, HostStore, TableFileError, load_table, map_table, open_table_store,
                            share_in_shm, write_table)
from engram.storage.table_file import read_header

NUM_ROWS, DIM = 1009, 64  # 66 bytes a row


def packed_table(num_rows=NUM_ROWS, dim=DIM, seed=0):
    """Random bytes: every E4M3 code and scale byte, NaN ones included (the stores only move bytes)."""
    return torch.randint(0, 256, (num_rows, dim + dim // 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def random_rows(shape, num_rows=NUM_ROWS, seed=1):
    return torch.randint(0, num_rows, shape, generator=torch.Generator().manual_seed(seed))


def rewrite_metadata(path, edit):
    """Rewrite the table file at ``path`` with its ``__metadata__`` changed by ``edit`` (data kept as is)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header["__metadata__"])
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


@pytest.fixture
def fp8_file(tmp_path):
    table = packed_table()
    path = tmp_path / "fp8.safetensors"
    write_table(path, table, {"layer": "2"}, chunk_bytes=1000)
    return table, path


@pytest.fixture
def float_file(tmp_path):
    table = torch.randn(NUM_ROWS, DIM, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    path = tmp_path / "float.safetensors"
    write_table(path, table)
    return table, path


def test_table_file_records_the_row_format(fp8_file, float_file):
    table, path = fp8_file
    header = read_header(path)
    assert (header.dtype, header.row_format, header.dim) == (torch.uint8, "fp8", DIM + DIM // 32)
    assert header.metadata == {"layer": "2"}  # the row format is the file's own key, not the caller's
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["engram_table_row_format"] == "fp8-e4m3-ue8m0"
        assert torch.equal(f.get_tensor("weight"), table)  # still a plain safetensors file
    assert read_header(float_file[1]).row_format == "float"
    with safe_open(str(float_file[1]), "pt") as f:
        assert "engram_table_row_format" not in f.metadata()


def test_every_reader_gives_the_bytes_back(fp8_file, tmp_path):
    table, path = fp8_file
    assert torch.equal(load_table(path), table)
    out = torch.zeros_like(table)
    assert load_table(path, out=out) is out and torch.equal(out, table)
    with map_table(path) as mapped:
        assert mapped.tensor.dtype == torch.uint8 and torch.equal(mapped.tensor, table)
    shm = tmp_path / "shm"
    shm.mkdir()
    shared = share_in_shm(path, shm)
    assert read_header(shared).row_format == "fp8" and torch.equal(load_table(shared), table)


@pytest.mark.parametrize("edit, match", [
    pytest.param(lambda meta: meta.pop("engram_table_row_format"), "must say engram_table_row_format", id="no-key"),
    pytest.param(lambda meta: meta.update(engram_table_row_format="fp8-e5m2"), "'fp8-e5m2'", id="unknown-format"),
])
def test_reader_refuses_a_u8_table_without_its_format(fp8_file, edit, match):
    _, path = fp8_file
    rewrite_metadata(path, edit)
    with pytest.raises(TableFileError, match=match):
        read_header(path)


def test_reader_refuses_a_float_table_that_claims_fp8_rows(float_file):
    _, path = float_file
    rewrite_metadata(path, lambda meta: meta.update(engram_table_row_format="fp8-e4m3-ue8m0"))
    with pytest.raises(TableFileError, match="BF16: packed FP8 rows are U8"):
        read_header(path)


def test_writer_refuses_bad_packed_tables(tmp_path):
    with pytest.raises(ValueError, match="40 bytes is not the width of a packed FP8 row"):
        write_table(tmp_path / "t.safetensors", torch.zeros(3, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="reserved"):
        write_table(tmp_path / "t.safetensors", packed_table(), {"engram_table_row_format": "fp8-e4m3-ue8m0"})


def make_store(kind, table, tmp_path, **kwargs):
    if kind.startswith("disk"):
        path = tmp_path / "disk.safetensors"
        write_table(path, table)
        mapped = map_table(path)
        store = DiskStore(mapped.tensor, workers=3, on_close=mapped.close, **kwargs)
    else:
        store = HostStore(table, method="cpu", workers=3, **kwargs)
    return CachedStore(store, 100, refresh_every=2) if kind.endswith("cache") else store


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no-dedup"])
@pytest.mark.parametrize("kind", ["host", "disk", "host-cache", "disk-cache"])
def test_stores_serve_packed_rows_bit_for_bit(kind, dedup, tmp_path):
    table = packed_table()
    store = make_store(kind, table, tmp_path, dedup=dedup)
    assert (store.num_rows, store.dim, store.dtype) == (NUM_ROWS, DIM + DIM // 32, torch.uint8)
    for seed in range(4):  # the cache refreshes in between
        rows = random_rows((3, 50, 4), seed=seed)
        out = store.fetch(rows, "cpu").wait()
        assert out.dtype == torch.uint8 and torch.equal(out, table[rows])
    assert torch.equal(store.table(), table)
    store.close()


@pytest.mark.parametrize("placement, cache_rows", [("host", 0), ("disk", 0), ("host", 64), ("disk", 64)],
                         ids=["host", "disk", "host-cache", "disk-cache"])
def test_open_table_store_serves_an_fp8_file_as_it_is(fp8_file, placement, cache_rows):
    table, path = fp8_file
    for row_format in (None, "fp8"):
        store = open_table_store(path, placement, cache_rows, row_format=row_format, workers=2)
        rows = random_rows((7, 3))
        assert store.dtype == torch.uint8 and torch.equal(store.fetch(rows, "cpu").wait(), table[rows])
        store.close()


@pytest.mark.parametrize("cache_rows", [0, 64], ids=["host", "host-cache"])
def test_host_store_quantises_a_float_file_while_loading(float_file, cache_rows):
    table, path = float_file
    store = open_table_store(path, "host", cache_rows, row_format="fp8", workers=2)
    expected = quantize_rows(table)
    assert (store.dim, store.dtype) == (DIM + DIM // 32, torch.uint8)
    assert torch.equal(store.table(), expected)
    rows = random_rows((5, 3))
    assert torch.equal(store.fetch(rows, "cpu").wait(), expected[rows])
    store.close()


def test_quantising_while_loading_is_refused_where_the_file_is_mapped(float_file, fp8_file, tmp_path):
    _, path = float_file
    with pytest.raises(ValueError, match="placement 'disk' maps the file as it is"):
        open_table_store(path, "disk", row_format="fp8")
    with pytest.raises(ValueError, match="share_memory maps the file as it is"):
        open_table_store(path, "host", row_format="fp8", share_memory=True, shm_dir=tmp_path)
    with pytest.raises(ValueError, match="holds packed FP8 rows: they are served as they are"):
        open_table_store(fp8_file[1], "host", row_format="float")
    with pytest.raises(ValueError, match="row_format must be one of"):
        open_table_store(path, "host", row_format="e4m3")


def test_host_memory_budget_counts_the_packed_bytes(float_file):
    _, path = float_file
    packed_bytes = NUM_ROWS * (DIM + DIM // 32)
    open_table_store(path, "host", row_format="fp8", host_memory_budget=packed_bytes).close()
    with pytest.raises(ValueError, match="host memory budget"):
        open_table_store(path, "host", host_memory_budget=packed_bytes)  # the bf16 copy is twice as large


@pytest.mark.parametrize("chunk_rows", [1, 300, 10**6])
def test_quantize_table_in_chunks_equals_quantize_rows(chunk_rows):
    table = torch.randn(1000, 64, generator=torch.Generator().manual_seed(3)) * 5
    assert torch.equal(quantize_table(table, chunk_rows=chunk_rows), quantize_rows(table))
    out = torch.empty(1000, 66, dtype=torch.uint8)
    assert quantize_table(table, out=out) is out and torch.equal(out, quantize_rows(table))
    with pytest.raises(ValueError, match="out must be uint8"):
        quantize_table(table, out=torch.empty(1000, 64, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["host-uva", "host-uva-dedup", "host-cpu", "disk", "cache-uva"])
def test_cuda_stores_serve_packed_rows_of_264_bytes(kind, tmp_path):
    table = packed_table(dim=256)  # 264-byte rows: the UVA copy kernel moves them unaligned to 16 bytes
    if kind.startswith("host-uva"):
        store = HostStore(table.clone(), method="uva", dedup=kind.endswith("dedup"))
    elif kind == "cache-uva":
        store = CachedStore(HostStore(table.pin_memory(), method="uva"), 100, refresh_every=2)
    else:
        store = make_store(kind, table, tmp_path)
    for seed in range(3):
        rows = random_rows((3, 50, 24), seed=seed)
        for rows_on in ("cpu", "cuda"):
            out = store.fetch(rows.to(rows_on), torch.device("cuda")).wait()
            assert out.is_cuda and torch.equal(out.cpu(), table[rows])
    store.close()
