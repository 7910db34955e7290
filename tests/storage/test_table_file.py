import os
import random
import struct
import threading

import pytest
import torch
from safetensors import safe_open

from engram.storage import table_file
from engram.storage.table_file import (
    TableFileError,
    load_table,
    map_table,
    read_header,
    share_in_shm,
    verify_table,
    write_table,
)

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
SHAPES = [pytest.param((37, 5), id="37x5"), pytest.param((1, 1), id="1x1"), pytest.param((1000, 3), id="1000x3")]


def random_table(rows: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=gen).to(dtype)


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "chunk_bytes", [pytest.param(100, id="chunk100"), pytest.param(table_file.CHUNK_BYTES, id="default-chunk")]
)
def test_round_trip(tmp_path, dtype, shape, chunk_bytes):
    weight = random_table(*shape, dtype=dtype)
    path = tmp_path / "t.safetensors"
    written = write_table(path, weight, chunk_bytes=chunk_bytes, workers=4)
    header = read_header(path)
    assert header == written
    assert (header.num_rows, header.dim, header.dtype) == (*shape, dtype)
    assert header.data_offset % 64 == 0
    assert len(header.crc32) == -(-header.data_bytes // chunk_bytes)
    assert torch.equal(load_table(path), weight)
    with map_table(path) as table:
        assert table.tensor.shape == shape and table.tensor.dtype == dtype
        assert torch.equal(table.tensor, weight)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["weight"]
        assert torch.equal(f.get_tensor("weight"), weight)


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    metadata = {"layer": "2", "name": "bigram table", "unicode": "Ω"}
    write_table(path, random_table(9, 4), metadata)
    assert read_header(path).metadata == metadata
    with safe_open(str(path), "pt") as f:
        stored = f.metadata()
    assert {k: stored[k] for k in metadata} == metadata
    assert stored["engram_table_format"] == "1"


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_into_preallocated_out(tmp_path, dtype):
    weight = random_table(123, 7, dtype)
    path = tmp_path / "t.safetensors"
    write_table(path, weight, chunk_bytes=100)
    out = torch.full((123, 7), float("nan"), dtype=dtype)
    assert load_table(path, out=out) is out
    assert torch.equal(out, weight)
    out.fill_(float("nan"))
    load_table(path, out=out, verify=False)
    assert torch.equal(out, weight)


@pytest.mark.parametrize(
    "out",
    [pytest.param(torch.empty(10, 4), id="shape"), pytest.param(torch.empty(11, 4, dtype=torch.bfloat16), id="dtype"),
     pytest.param(torch.empty(4, 11).t(), id="non-contiguous")],
)
def test_load_rejects_bad_out(tmp_path, out):
    path = tmp_path / "t.safetensors"
    write_table(path, random_table(11, 4))
    with pytest.raises(ValueError, match="out"):
        load_table(path, out=out)


def test_works_from_a_mapped_source(tmp_path):
    weight = random_table(50, 6, torch.bfloat16)
    write_table(tmp_path / "a.safetensors", weight)
    with map_table(tmp_path / "a.safetensors") as source:
        write_table(tmp_path / "b.safetensors", source.tensor, chunk_bytes=64)
    assert torch.equal(load_table(tmp_path / "b.safetensors"), weight)


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(lambda h: h.data_offset + h.data_bytes - 1, id="data-1"),
        pytest.param(lambda h: h.data_offset + 50, id="data-50"),
        pytest.param(lambda h: h.data_offset - 10, id="into-header"),
        pytest.param(lambda h: 5, id="into-length"),
    ],
)
def test_truncated_file(tmp_path, size):
    path = tmp_path / "t.safetensors"
    header = write_table(path, random_table(20, 8))
    os.truncate(path, size(header))
    for read in (read_header, verify_table, map_table, load_table):
        with pytest.raises(TableFileError, match="truncated") as e:
            read(path)
        assert str(path) in str(e.value)


def test_extra_bytes(tmp_path):
    path = tmp_path / "t.safetensors"
    write_table(path, random_table(20, 8))
    with open(path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(TableFileError, match="has 4 extra bytes"):
        read_header(path)


def test_flipped_byte_names_the_chunk(tmp_path):
    weight = random_table(100, 3)  # 12-byte rows, 1200 bytes: 12 chunks of 100 bytes
    path = tmp_path / "t.safetensors"
    header = write_table(path, weight, chunk_bytes=100)
    flip_byte(path, header.data_offset + 555)  # chunk 5: data bytes 500:600, rows 41 to 49
    expected = r"chunk 5 \(data bytes 500:600, rows 41 to 49\)"
    with pytest.raises(TableFileError, match=expected):
        verify_table(path)
    with pytest.raises(TableFileError, match=expected):
        verify_table(read_header(path), workers=1)
    with pytest.raises(TableFileError, match=expected):
        map_table(path)
    with pytest.raises(TableFileError, match=expected):
        load_table(path)
    with pytest.raises(TableFileError, match=expected):
        load_table(path, out=torch.empty(100, 3))


def test_flipped_byte_unchecked_without_verify(tmp_path):
    """verify=False skips the checksums by design: the corrupt value comes through."""
    weight = random_table(100, 3)
    path = tmp_path / "t.safetensors"
    header = write_table(path, weight, chunk_bytes=100)
    flip_byte(path, header.data_offset + 555)
    with map_table(path, verify=False) as table:
        differs = (table.tensor != weight).any(dim=1).nonzero().flatten().tolist()
    assert differs == [555 // 12]
    assert not torch.equal(load_table(path, verify=False), weight)


@pytest.mark.parametrize(
    "header_json",
    [
        pytest.param(b"{not json", id="bad-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}', id="no-metadata"),
        pytest.param(b'{"weight": {"dtype": "I64", "shape": [2, 2], "data_offsets": [0, 32]}}', id="int64"),
        pytest.param(b'{"weight": {"dtype": "F32", "shape": [16], "data_offsets": [0, 16]}}', id="1-D"),
        pytest.param(b'{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}', id="wrong-name"),
        pytest.param(
            b'{"weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": '
            b'{"engram_table_format": "1", "engram_table_chunk_bytes": "8", "engram_table_crc32": "[1]"}}',
            id="crc-count",
        ),
        pytest.param(
            b'{"weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": '
            b'{"engram_table_format": "2", "engram_table_chunk_bytes": "16", "engram_table_crc32": "[1]"}}',
            id="format-2",
        ),
    ],
)
def test_bad_header(tmp_path, header_json):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + os.urandom(16))
    with pytest.raises(TableFileError, match="t.safetensors"):
        read_header(path)


def test_plain_safetensors_file_is_not_a_table(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"weight": random_table(3, 4)}, str(path))
    with pytest.raises(TableFileError, match="__metadata__"):
        read_header(path)


def test_corrupt_header_in_written_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_table(path, random_table(5, 5))
    flip_byte(path, 8)  # the header's opening brace
    with pytest.raises(TableFileError, match="JSON"):
        read_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "absent.safetensors")


@pytest.mark.parametrize(
    "weight, kwargs, match",
    [
        pytest.param(torch.arange(6).reshape(2, 3), {}, "dtype", id="int64"),
        pytest.param(torch.randn(2, 3, dtype=torch.float64), {}, "float64", id="float64"),
        pytest.param(torch.randn(6), {}, r"\(6,\)", id="1-D"),
        pytest.param(torch.randn(2, 3, 4), {}, r"\(2, 3, 4\)", id="3-D"),
        pytest.param(torch.randn(0, 3), {}, r"\(0, 3\)", id="empty"),
        pytest.param(torch.randn(3, 2).t(), {}, "contiguous", id="non-contiguous"),
        pytest.param(torch.randn(2, 3), {"metadata": {"engram_table_crc32": "[]"}}, "engram_table_crc32",
                     id="reserved-key"),
        pytest.param(torch.randn(2, 3), {"metadata": {"layer": 2}}, "'layer': 2", id="non-str-value"),
        pytest.param(torch.randn(2, 3), {"metadata": {3: "x"}}, "3: 'x'", id="non-str-key"),
        pytest.param(torch.randn(2, 3), {"chunk_bytes": 0}, "chunk_bytes", id="chunk-0"),
    ],
)
def test_write_rejects_bad_input(tmp_path, weight, kwargs, match):
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match=match):
        write_table(path, weight, **kwargs)
    assert not path.exists()


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    old = random_table(20, 4, seed=1)
    write_table(path, old)
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(table_file.os, "fsync", full_disk)  # fails after the data is written, before the rename
    with pytest.raises(OSError, match="No space"):
        write_table(path, random_table(30, 4, seed=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_share_in_shm(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    weight = random_table(64, 5, torch.bfloat16)
    source = tmp_path / "a.safetensors"
    write_table(source, weight, {"layer": "1"}, chunk_bytes=100)

    shared = share_in_shm(source, shm_dir=shm)
    assert shared.parent == shm and shared.name.startswith("engram-")
    assert shared.read_bytes() == source.read_bytes()
    with map_table(shared) as table:
        assert torch.equal(table.tensor, weight)
    stat = shared.stat()

    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(source.read_bytes())
    assert share_in_shm(copy, shm_dir=shm) == shared  # content-addressed: same table, same file
    again = shared.stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    other = tmp_path / "b.safetensors"
    write_table(other, random_table(64, 5, torch.bfloat16, seed=7), {"layer": "1"}, chunk_bytes=100)
    assert share_in_shm(other, shm_dir=shm) != shared
    assert len(list(shm.iterdir())) == 2


def test_share_in_shm_replaces_a_broken_copy(tmp_path):
    source = tmp_path / "a.safetensors"
    weight = random_table(30, 4)
    write_table(source, weight)
    shared = share_in_shm(source, shm_dir=tmp_path)
    os.truncate(shared, shared.stat().st_size - 3)
    assert share_in_shm(source, shm_dir=tmp_path) == shared
    assert torch.equal(load_table(shared), weight)


def test_share_in_shm_refuses_a_corrupt_source(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    source = tmp_path / "a.safetensors"
    header = write_table(source, random_table(30, 4))
    flip_byte(source, header.data_offset + 7)
    with pytest.raises(TableFileError, match="chunk 0"):
        share_in_shm(source, shm_dir=shm)
    assert list(shm.iterdir()) == []


def test_share_in_shm_missing_dir(tmp_path):
    source = tmp_path / "a.safetensors"
    write_table(source, random_table(3, 4))
    with pytest.raises(FileNotFoundError, match="shared-memory folder"):
        share_in_shm(source, shm_dir=tmp_path / "absent")


def test_concurrent_readers(tmp_path):
    weight = random_table(500, 16, torch.bfloat16)
    path = tmp_path / "t.safetensors"
    write_table(path, weight, chunk_bytes=1000)
    failures: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            rng = random.Random(seed)
            with map_table(path, workers=2) as table:
                for _ in range(200):
                    row = rng.randrange(500)
                    assert torch.equal(table.tensor[row], weight[row])
        except BaseException as e:  # noqa: BLE001 - reported from the main thread
            failures.append(e)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_mapped_tensor_outlives_close(tmp_path):
    """close() never unmaps pages a view still points at."""
    weight = random_table(10, 4)
    path = tmp_path / "t.safetensors"
    write_table(path, weight)
    table = map_table(path)
    row = table.tensor[3]
    table.close()
    assert torch.equal(row, weight[3])


def test_file_truncated_after_its_header_was_read_is_refused_at_map_time(tmp_path):
    path = tmp_path / "t.safetensors"
    write_table(path, random_table(50, 8))
    header = read_header(path)
    os.truncate(path, header.data_offset + 10)  # rewritten in place by someone else
    with pytest.raises(TableFileError, match=f"table file {path}: truncated to {header.data_offset + 10} bytes while "
                                             "mapped .* Replace a table file atomically"):
        table_file.MappedTable(header)


def test_atomic_replacement_leaves_a_mapped_table_intact(tmp_path):
    """The documented way to change a table file in use: readers keep the file they mapped."""
    path = tmp_path / "t.safetensors"
    old = random_table(50, 8)
    write_table(path, old)
    with map_table(path) as table:
        write_table(path, random_table(5, 8, seed=1))  # write a new file, rename it over the old one
        table.check_intact()
        assert torch.equal(table.tensor, old)
