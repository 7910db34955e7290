"""MultiHeadEmbedding with packed FP8 rows: the same head vectors, ``dequantize_rows(table[rows])``, from the
parameter and from every store; tables of the wrong format or width are refused."""

import pytest
import torch

from engram import MultiHeadEmbedding
from engram.embedding import quantize_tables
from engram.kernels.fp8 import dequantize_blocks, dequantize_rows, quantize_rows, scale_values
from engram.storage import CachedStore, open_table_store, write_table

SIZES, HEAD_DIM = [101, 103, 107], 64


def fp8_embedding(seed=0):
    torch.manual_seed(seed)
    return MultiHeadEmbedding(SIZES, HEAD_DIM, row_format="fp8", init_std=0.5)


def row_ids(seed=1, shape=(3, 11)):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, shape, generator=gen) for n in SIZES], dim=-1)  # [B, T, H]


def expected_rows(table, embedding, ids):
    return dequantize_rows(table[embedding.flat_row_ids(ids)]).flatten(start_dim=-2)


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory):
    embedding = fp8_embedding()
    path = tmp_path_factory.mktemp("tables") / "fp8.safetensors"
    write_table(path, embedding.table())
    return embedding.table().clone(), path


def test_fp8_rows_are_frozen_packed_bytes():
    embedding = fp8_embedding()
    assert embedding.weight.dtype == torch.uint8 and not embedding.weight.requires_grad
    assert embedding.weight.shape == (sum(SIZES), HEAD_DIM + HEAD_DIM // 32) and embedding.row_width == 66
    ids = row_ids()
    out = embedding(ids)
    assert out.shape == (3, 11, 3 * HEAD_DIM) and out.dtype == torch.float32
    assert torch.equal(out, expected_rows(embedding.weight, embedding, ids))


PLACEMENTS = {"host": ("host", 0), "disk": ("disk", 0), "host-cache": ("host", 40), "disk-cache": ("disk", 40)}


@pytest.mark.parametrize("placement, cache_rows", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_every_store_gives_the_device_placement_rows(fp8_file, placement, cache_rows):
    table, path = fp8_file
    device = MultiHeadEmbedding(SIZES, HEAD_DIM, row_format="fp8", device="meta")
    device.use_table(table.clone())
    placed = MultiHeadEmbedding(SIZES, HEAD_DIM, row_format="fp8", device="meta")
    placed.use_store(open_table_store(path, placement, cache_rows, workers=2))
    assert placed.placement == ("cache" if cache_rows else placement)
    assert "weight" not in dict(placed.named_parameters())
    for seed in range(3):  # the cache refreshes in between
        ids = row_ids(seed)
        out = placed(ids)
        assert torch.equal(out, device(ids)) and torch.equal(out, expected_rows(table, placed, ids))
    placed.store.close()


def test_stores_of_another_format_or_width_are_refused(fp8_file, tmp_path):
    table, path = fp8_file
    float_path = tmp_path / "float.safetensors"
    write_table(float_path, torch.randn(sum(SIZES), 66))  # as wide as the packed rows, but float
    fp8 = MultiHeadEmbedding(SIZES, HEAD_DIM, row_format="fp8", device="meta")
    with pytest.raises(ValueError, match=r"the store holds torch.float32 rows, this embedding reads fp8 rows"):
        fp8.use_store(open_table_store(float_path, "disk"))
    floats = MultiHeadEmbedding(SIZES, 66, device="meta")
    with pytest.raises(ValueError, match=r"the store holds packed FP8 rows \(uint8\), this embedding reads float"):
        floats.use_store(open_table_store(path, "disk"))
    narrow = MultiHeadEmbedding(SIZES, 32, row_format="fp8", device="meta")
    with pytest.raises(ValueError, match=r"holds a \[311, 66\] table, this embedding needs \[311, 33\] \(fp8 rows\)"):
        narrow.use_store(CachedStore(open_table_store(path, "host"), 8))
    with pytest.raises(ValueError, match="the table holds packed FP8 rows"):
        floats.use_table(table)
    with pytest.raises(ValueError, match="the table holds torch.int64 rows"):
        fp8.use_table(table.long())


def test_special_scale_bytes_decode_as_the_engines_decode_them():
    """UE8M0 byte 255 is +inf, as vLLM and SGLang decode it (so a row's values are +-inf, and 0 * inf is NaN);
    byte 0 is 2^-127, SGLang's reading (vLLM reads 0.0), in every plain decode: bytes, torch's e8m0 dtype, rows
    and 32x32-block matrices."""
    want = torch.tensor([float("inf"), 2.0 ** -127, 2.0 ** -126, 1.0, 2.0 ** 127])
    scales = torch.tensor([255, 0, 1, 127, 254], dtype=torch.uint8)
    assert torch.equal(scale_values(scales), want)
    assert torch.equal(scale_values(scales.view(torch.float8_e8m0fnu)), want)
    values = torch.tensor([1.0, -2.0, 0.0] + [0.5] * 29).to(torch.float8_e4m3fn)  # one 32-value block
    rows = dequantize_rows(torch.cat([values.view(torch.uint8), scales[:1]])[None])[0]
    assert rows[:2].tolist() == [float("inf"), float("-inf")] and rows[2].isnan() and rows[3] == float("inf")
    assert dequantize_rows(torch.cat([values.view(torch.uint8), scales[1:2]])[None])[0, 3] == 2.0 ** -128
    matrix = dequantize_blocks(values.view(1, 32).expand(32, 32), scales[:1].view(1, 1).to(torch.uint8))
    assert (matrix[:, 0] == float("inf")).all() and matrix[:, 2].isnan().all()


def test_quantize_turns_float_rows_into_their_fp8_rows():
    torch.manual_seed(3)
    embedding = MultiHeadEmbedding(SIZES, HEAD_DIM)
    floats = embedding.weight.detach().clone()
    assert quantize_tables(torch.nn.ModuleList([embedding])) == 1
    assert embedding.row_format == "fp8" and not embedding.weight.requires_grad
    assert torch.equal(embedding.weight, quantize_rows(floats))
    ids = row_ids(4)
    assert torch.equal(embedding(ids), expected_rows(quantize_rows(floats), embedding, ids))
    embedding.quantize_()  # already FP8: nothing to do
    meta = MultiHeadEmbedding(SIZES, HEAD_DIM, device="meta")
    meta.quantize_()
    assert meta.weight.is_meta and meta.weight.dtype == torch.uint8 and meta.weight.shape == (311, 66)


def test_a_table_in_a_store_is_not_quantised_in_place(fp8_file, tmp_path):
    path = tmp_path / "float.safetensors"
    write_table(path, torch.randn(sum(SIZES), HEAD_DIM))
    embedding = MultiHeadEmbedding(SIZES, HEAD_DIM, device="meta")
    embedding.use_store(open_table_store(path, "disk"))
    with pytest.raises(ValueError, match="sits in a 'disk' store; quantise it while loading"):
        embedding.quantize_()
