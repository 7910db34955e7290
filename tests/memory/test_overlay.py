"""Row overlays: reading a memory patch per batch row is bit-identical to reading a table it was applied to."""

import sys
import threading
from pathlib import Path

import pytest
import torch

from engram.memory import MemoryPatch, apply_patch, model_fingerprint
from engram.model import EngramLM, RowOverlay
from engram.model.overlay import overlay_rows, row_overlays

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from lm_helpers import small_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_overlay(layer_id: int, num_rows: int, count: int, head_dim: int, dtype: torch.dtype,
                   generator: torch.Generator) -> RowOverlay:
    rows = torch.randperm(num_rows, generator=generator)[:count].sort().values
    return RowOverlay({layer_id: (rows, torch.randn(count, head_dim, generator=generator).to(dtype))})


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("batch,length,heads,head_dim", [(3, 7, 4, 5), (5, 63, 2, 3)], ids=["b3t7", "b5t63"])
def test_overlay_rows_equals_reading_a_patched_table(dtype, batch, length, heads, head_dim):
    generator = torch.Generator().manual_seed(batch * length)
    num_rows = 40  # few rows: many positions read an overlaid one
    table = torch.randn(num_rows, head_dim, generator=generator).to(dtype)
    flat_rows = torch.randint(0, num_rows, (batch, length, heads), generator=generator)
    overlays = [random_overlay(7, num_rows, 1 + 9 * b, head_dim, dtype, generator) if b % 2 == 0 else None
                for b in range(batch)]
    overlays[-1] = RowOverlay({3: (torch.tensor([0]), torch.ones(1, head_dim, dtype=dtype))})  # another layer only
    memory = table[flat_rows].flatten(-2)  # [B, T, H * head_dim]
    out = overlay_rows(memory, flat_rows, overlays, layer_id=7)
    for b, overlay in enumerate(overlays):
        patched = table.clone()
        if overlay is not None and 7 in overlay.layers:
            rows, values = overlay.layers[7]
            patched[rows] = values
        assert torch.equal(out[b], patched[flat_rows[b]].flatten(-2)), b
    assert out.dtype == dtype and out.shape == memory.shape


def test_overlay_rows_without_rows_for_the_layer_returns_the_memory_itself():
    memory, flat_rows = torch.randn(2, 3, 8), torch.randint(0, 9, (2, 3, 2))
    assert overlay_rows(memory, flat_rows, [None, RowOverlay({1: (torch.tensor([2]), torch.ones(1, 4))})], 0) is memory


@pytest.mark.parametrize("rows,values,match", [
    (torch.tensor([3, 1]), torch.zeros(2, 4), "sorted and unique"),
    (torch.tensor([1, 1]), torch.zeros(2, 4), "sorted and unique"),
    (torch.tensor([-1, 2]), torch.zeros(2, 4), "non-negative"),
    (torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2, 4), "int64"),
    (torch.tensor([1, 2]), torch.zeros(3, 4), r"\[N=2, head_dim\]"),
], ids=["unsorted", "repeated", "negative", "int32", "count"])
def test_row_overlay_refuses_malformed_rows(rows, values, match):
    with pytest.raises(ValueError, match=match):
        RowOverlay({1: (rows, values)})


@pytest.fixture(scope="module")
def dense_model():
    """mHC, dense FFNs: a batch row's outputs do not depend on what the other rows route to experts."""
    torch.manual_seed(0)
    return EngramLM(small_config(use_moe=False)).eval()


def read_rows_patch(model: EngramLM, ids: torch.Tensor, seed: int, per_layer: int) -> MemoryPatch:
    """A patch over ``per_layer`` of the rows ``ids`` read in each Engram layer (so that it changes outputs)."""
    generator = torch.Generator().manual_seed(seed)
    hashed = model.hasher.hash_all(ids)
    layers = {}
    for block in model.blocks:
        if block.engram is None:
            continue
        table = block.engram.multi_head_embedding
        read = table.flat_row_ids(hashed[block.layer_idx]).unique()
        rows = read[torch.randperm(read.numel(), generator=generator)[:per_layer]].sort().values
        layers[block.layer_idx] = (rows, torch.randn(rows.numel(), table.head_dim, generator=generator))
    return MemoryPatch(layers, model_fingerprint(model))


def test_mixed_batch_of_overlays_is_bit_identical_to_patched_tables(dense_model):
    ids = torch.randint(3, 128_815, (4, 13), generator=torch.Generator().manual_seed(1))
    patches = [read_rows_patch(dense_model, ids, seed, per_layer=25) for seed in (10, 11)]
    overlays = [patches[0].overlay(), None, patches[1].overlay(), patches[0].overlay()]
    with torch.no_grad():
        base = dense_model(ids).logits
        with row_overlays(dense_model, overlays):
            mixed = dense_model(ids).logits
        per_patch = []
        for patch in patches:
            inverse = apply_patch(dense_model, patch)
            per_patch.append(dense_model(ids).logits)
            apply_patch(dense_model, inverse)
    expected = [per_patch[0][0], base[1], per_patch[1][2], per_patch[0][3]]
    for b in range(4):
        assert torch.equal(mixed[b], expected[b]), b
    assert not torch.equal(mixed[0], base[0])  # the overlay did change what row 0 reads
    with row_overlays(dense_model, [None] * 4):
        assert torch.equal(dense_model(ids).logits, base)


def test_generate_with_an_overlay_equals_generate_after_apply(dense_model):
    ids = torch.randint(3, 128_815, (2, 6), generator=torch.Generator().manual_seed(2))
    patch = read_rows_patch(dense_model, ids, seed=3, per_layer=40)
    with row_overlays(dense_model, [patch.overlay(), None]):
        overlaid = dense_model.generate(ids, 5, temperature=0)
    plain = dense_model.generate(ids, 5, temperature=0)
    inverse = apply_patch(dense_model, patch)
    patched = dense_model.generate(ids, 5, temperature=0)
    apply_patch(dense_model, inverse)
    assert torch.equal(overlaid[0], patched[0]) and torch.equal(overlaid[1], plain[1])


def test_forward_refuses_overlays_that_do_not_fit(dense_model):
    ids = torch.randint(3, 1000, (2, 5))
    with pytest.raises(ValueError, match="row_overlays has 1 entries for a batch of 2 rows"):
        with row_overlays(dense_model, [None]):
            dense_model(ids)
    with pytest.raises(ValueError, match=r"layer 1, which is not an Engram layer of this model \(Engram layers: "
                                         r"\[0, 2\]\)"):
        with row_overlays(dense_model, [RowOverlay({1: (torch.tensor([0]), torch.zeros(1, 8))}), None]):
            dense_model(ids)
    with pytest.raises(ValueError, match="rows of width 5, the table's are 8"):
        with row_overlays(dense_model, [None, RowOverlay({0: (torch.tensor([0]), torch.zeros(1, 5))})]):
            dense_model(ids)
    with pytest.raises(ValueError, match="must be a RowOverlay or None"):
        with row_overlays(dense_model, [None, {0: 1}]):
            dense_model(ids)


def test_overlays_are_served_in_their_thread_only(dense_model):
    """A forward in another thread while a batch runs inside row_overlays reads the base tables."""
    ids = torch.randint(3, 128_815, (2, 7), generator=torch.Generator().manual_seed(4))
    patch = read_rows_patch(dense_model, ids, seed=5, per_layer=30)
    with torch.no_grad():
        base = dense_model(ids).logits
        elsewhere = []
        with row_overlays(dense_model, [patch.overlay(), patch.overlay()]):
            overlaid = dense_model(ids).logits
            thread = threading.Thread(target=lambda: elsewhere.append(dense_model(ids).logits))
            thread.start()
            thread.join()
        assert torch.equal(elsewhere[0], base) and not torch.equal(overlaid, base)
        assert torch.equal(dense_model(ids).logits, base)  # nothing is left behind after the block


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_overlays_over_a_store_equal_overlays_over_device_tables(dense_model, tmp_path, placement):
    """The overlay applies behind fetch() whatever store the table lives in."""
    dense_model.save_pretrained(tmp_path)
    stored = EngramLM.from_pretrained(tmp_path, engram_placement=placement).eval()
    ids = torch.randint(3, 128_815, (2, 9), generator=torch.Generator().manual_seed(6))
    overlays = [read_rows_patch(dense_model, ids, seed=7, per_layer=25).overlay(), None]
    with torch.no_grad():
        with row_overlays(dense_model, overlays):
            expected = dense_model(ids).logits
        with row_overlays(stored, overlays):
            assert torch.equal(stored(ids).logits, expected)
