"""A DeepSeek-V4.1 checkpoint's tables served from host memory or disk (a synthetic checkpoint, ``v41_checkpoint.py``):
the same bits as on the device, through a table file converted once, reused, and rewritten when it is not the
checkpoint's."""

import os

import pytest
import torch
from test_deepseek_v41 import random_sequences, stand_in_tokenizer
from v41_checkpoint import BRANCHES, HIDDEN, LAYERS, write_checkpoint

import engram.models.deepseek_v41 as v41
from engram.models.deepseek_v41 import DeepSeekV41Engram, converted_table_name, load_deepseek_v41_engram
from engram.storage.table_file import read_header


def load(folder, **placement) -> DeepSeekV41Engram:
    return load_deepseek_v41_engram(folder, tokenizer=stand_in_tokenizer(), dtype=torch.float32, **placement)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("v41-placement") / "checkpoint")


@pytest.fixture(scope="module")
def on_device(checkpoint) -> DeepSeekV41Engram:
    return load(checkpoint)


def assert_same_reads(engram: DeepSeekV41Engram, reference: DeepSeekV41Engram) -> None:
    """Lookups and every layer's forward (output and gates) bit-identical to ``reference``'s, twice (a cache fills)."""
    ids, dead = random_sequences(13, batch=3, length=17)
    hidden = torch.randn(3, 17, BRANCHES, HIDDEN, generator=torch.Generator().manual_seed(13))
    for _ in range(2):
        reads, want_reads = engram.lookup(ids, dead_mask=dead), reference.lookup(ids, dead_mask=dead)
        for layer in LAYERS:
            assert torch.equal(reads[layer].row_ids, want_reads[layer].row_ids)
            assert torch.equal(reads[layer].values, want_reads[layer].values)
            got = engram(hidden, ids, layer_id=layer, dead_mask=dead, return_gates=True)
            want = reference(hidden, ids, layer_id=layer, dead_mask=dead, return_gates=True)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def file_identity(path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns


@pytest.mark.parametrize("placement, cache_rows", [("host", 0), ("disk", 0), ("host", 97), ("disk", 97)],
                         ids=["host", "disk", "host-cache", "disk-cache"])
def test_placements_read_the_same_bits(checkpoint, on_device, tmp_path, monkeypatch, placement, cache_rows):
    monkeypatch.setattr(v41, "_PACK_ROWS", 999)  # several chunks per table
    engram = load(checkpoint, table_placement=placement, table_dir=tmp_path, cache_rows=cache_rows)
    expected = "cache" if cache_rows else placement
    assert all(engram[layer].multi_head_embedding.placement == expected for layer in LAYERS)
    assert {p.name for p in tmp_path.iterdir()} == {converted_table_name(layer) for layer in LAYERS}
    for layer in LAYERS:
        header = read_header(tmp_path / converted_table_name(layer))
        assert header.row_format == "fp8" and header.metadata["layer_id"] == str(layer)
        assert torch.equal(engram[layer].multi_head_embedding.table(), on_device[layer].multi_head_embedding.table())
    assert_same_reads(engram, on_device)


def test_a_converted_table_is_reused(checkpoint, on_device, tmp_path):
    load(checkpoint, table_placement="disk", table_dir=tmp_path, layers=[14])
    file = tmp_path / converted_table_name(14)
    before = file_identity(file)
    again = load(checkpoint, table_placement="host", table_dir=tmp_path, layers=[14])
    assert file_identity(file) == before and sorted(p.name for p in tmp_path.iterdir()) == [file.name]
    assert torch.equal(again[14].multi_head_embedding.table(), on_device[14].multi_head_embedding.table())


def test_a_killed_conversions_scratch_file_is_removed(checkpoint, tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max: no such process
    stale = tmp_path / f".{converted_table_name(14)}.packing{dead_pid}"
    stale.write_bytes(b"half a table")
    load(checkpoint, table_placement="disk", table_dir=tmp_path, layers=[14])
    assert sorted(p.name for p in tmp_path.iterdir()) == [converted_table_name(14)]


def _truncate(file, checkpoint):
    os.truncate(file, file.stat().st_size - 5)


def _flip_a_data_byte(file, checkpoint):
    offset = read_header(file).data_offset + 1234
    with open(file, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x40]))


def _touch_the_table_shard(file, checkpoint):
    shard = checkpoint / "model-00002-of-00002.safetensors"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_data_byte, _touch_the_table_shard],
                         ids=["truncated", "corrupt", "checkpoint-changed"])
@pytest.mark.parametrize("placement", ["host", "disk"])
def test_a_stale_or_damaged_table_is_converted_again(tmp_path, damage, placement):
    checkpoint = write_checkpoint(tmp_path / "checkpoint")
    tables = tmp_path / "tables"
    reference = load(checkpoint, layers=[1])
    load(checkpoint, table_placement=placement, table_dir=tables, layers=[1])
    file = tables / converted_table_name(1)
    before = file_identity(file)
    damage(file, checkpoint)
    engram = load(checkpoint, table_placement=placement, table_dir=tables, layers=[1])
    assert file_identity(file) != before
    assert torch.equal(engram[1].multi_head_embedding.table(), reference[1].multi_head_embedding.table())
    assert sorted(p.name for p in tables.iterdir()) == [file.name]  # no scratch file left


@pytest.mark.parametrize("kwargs, message", [
    ({"table_placement": "disk"}, "table_placement 'disk' serves a table file .* pass table_dir="),
    ({"table_placement": "host"}, "table_placement 'host' serves a table file .* pass table_dir="),
    ({"table_placement": "gpu"}, r"table_placement must be one of \('device', 'host', 'disk'\), got 'gpu'"),
    ({"table_dir": "x", "cache_rows": 8}, "table_dir, cache_rows go with table_placement 'host' or 'disk'"),
    ({"verify": False}, "verify go with table_placement 'host' or 'disk'"),
], ids=["disk-no-dir", "host-no-dir", "unknown", "device-dir", "device-option"])
def test_placement_arguments_are_checked(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load(checkpoint, **kwargs)
