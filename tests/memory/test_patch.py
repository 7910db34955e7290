"""Memory patches: file round trips, refusals, apply/revert bit for bit, merge, diff, placements."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from engram.memory import (MemoryPatch, apply_patch, check_patch, diff, load_patch, merge, model_fingerprint, revert,
                           save_patch)
from engram.memory.patch import engram_tables
from engram.embedding import quantize_tables
from engram.model import EngramLM

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from lm_helpers import small_config  # noqa: E402
from memory.patch_helpers import write_raw_patch  # noqa: E402


def make_model(seed: int = 0, **overrides) -> EngramLM:
    torch.manual_seed(seed)
    return EngramLM(small_config(**overrides)).eval()


def random_patch(model: EngramLM, seed: int, rows_per_layer: int, dtype: torch.dtype = torch.float32) -> MemoryPatch:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for layer_id, table in engram_tables(model).items():
        rows = torch.randperm(table.num_rows, generator=generator)[:rows_per_layer].sort().values
        layers[layer_id] = (rows, torch.randn(rows_per_layer, table.head_dim, generator=generator).to(dtype))
    return MemoryPatch(layers, model_fingerprint(model), metadata={"seed": seed})


def state(model: EngramLM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def assert_same_patch(a: MemoryPatch, b: MemoryPatch) -> None:
    assert a.base_fingerprint == b.base_fingerprint and a.metadata == b.metadata
    assert a.layers.keys() == b.layers.keys() and a.dense.keys() == b.dense.keys()
    for layer_id in a.layers:
        assert torch.equal(a.layers[layer_id][0], b.layers[layer_id][0])
        assert torch.equal(a.layers[layer_id][1], b.layers[layer_id][1])
    for name in a.dense:
        assert torch.equal(a.dense[name], b.dense[name])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_model()
    directory = tmp_path_factory.mktemp("base")
    model.save_pretrained(directory)
    return model, directory


def test_fingerprint_survives_save_load_and_placement_and_sees_one_bit(saved, tmp_path):
    model, directory = saved
    fingerprint = model_fingerprint(model)
    assert fingerprint.startswith("sha256:")
    assert model_fingerprint(EngramLM.from_pretrained(directory)) == fingerprint
    assert model_fingerprint(EngramLM.from_pretrained(directory, engram_placement="host")) == fingerprint
    EngramLM.from_pretrained(directory).save_pretrained(tmp_path)
    assert model_fingerprint(EngramLM.from_pretrained(tmp_path)) == fingerprint
    other = EngramLM.from_pretrained(directory)
    table = engram_tables(other)[2].weight.data
    table.view(torch.int32)[17, 3] ^= 1  # one bit of one table row
    assert model_fingerprint(other) != fingerprint
    other = EngramLM.from_pretrained(directory)
    other.blocks[1].attn_norm.weight.data.view(torch.int32)[0] ^= 1
    assert model_fingerprint(other) != fingerprint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_round_trip(saved, tmp_path, dtype):
    model, _ = saved
    patch = random_patch(model, seed=1, rows_per_layer=37, dtype=dtype)
    patch = MemoryPatch(patch.layers, patch.base_fingerprint, {"blocks.0.attn_norm.weight": torch.randn(32)},
                        {"kind": "test", "nested": {"a": [1, 2]}})
    path = save_patch(patch, tmp_path / "p.patch")
    assert_same_patch(load_patch(path), patch)
    assert_same_patch(load_patch(path, model), patch)
    empty = MemoryPatch({}, patch.base_fingerprint)
    assert_same_patch(load_patch(save_patch(empty, tmp_path / "empty.patch"), model), empty)


def test_size_grows_with_rows_touched_not_with_the_table(tmp_path):
    small_tables = make_model()
    torch.manual_seed(0)
    large_engram = dataclasses.replace(small_config().engram, engram_vocab_size=[30011, 30013])
    large_tables = EngramLM(dataclasses.replace(small_config(), engram=large_engram))
    assert engram_tables(large_tables)[0].num_rows > 50 * engram_tables(small_tables)[0].num_rows
    sizes = {}
    for name, model in (("small", small_tables), ("large", large_tables)):
        for rows in (10, 20):
            path = save_patch(random_patch(model, 0, rows), tmp_path / f"{name}{rows}.patch")
            sizes[name, rows] = path.stat().st_size
    assert sizes["small", 10] == sizes["large", 10] and sizes["small", 20] == sizes["large", 20]
    row_bytes = 2 * 10 * (8 + 8 * 4)  # 2 layers x 10 more rows x (an int64 id + 8 fp32 values)
    assert sizes["small", 20] - sizes["small", 10] == pytest.approx(row_bytes, abs=64)


def test_apply_then_revert_restores_the_base_bit_for_bit(saved):
    model, directory = saved
    model = EngramLM.from_pretrained(directory).eval()
    before, fingerprint = state(model), model_fingerprint(model)
    patch = random_patch(model, seed=2, rows_per_layer=50)
    patch = MemoryPatch(patch.layers, patch.base_fingerprint,
                        {"blocks.0.engram.value_key_proj.weight": torch.randn(5 * 32, 32)}, {})
    ids = torch.randint(3, 128_815, (2, 9))
    logits = model(ids).logits
    inverse = apply_patch(model, patch)
    for layer_id, (rows, values) in patch.layers.items():
        assert torch.equal(engram_tables(model)[layer_id].weight[rows], values)
    projection = "blocks.0.engram.value_key_proj.weight"
    assert torch.equal(model.blocks[0].engram.value_key_proj.weight, patch.dense[projection])
    assert inverse.base_fingerprint == model_fingerprint(model) != fingerprint
    assert inverse.metadata == {"kind": "inverse", "restores": fingerprint}
    redo = revert(model, inverse)
    assert_same_state(state(model), before)
    assert model_fingerprint(model) == fingerprint and torch.equal(model(ids).logits, logits)
    apply_patch(model, redo)
    assert model_fingerprint(model) == inverse.base_fingerprint  # the redo patch re-applies it


def test_a_patch_for_another_base_is_refused(saved, tmp_path):
    model, _ = saved
    patch = random_patch(model, seed=3, rows_per_layer=5)
    other = make_model(seed=1)
    untouched = state(other)
    with pytest.raises(ValueError, match="refusing a patch made for another base model"):
        apply_patch(other, patch)
    path = save_patch(patch, tmp_path / "p.patch")
    with pytest.raises(ValueError, match="refusing a patch made for another base model"):
        load_patch(path, other)
    with pytest.raises(ValueError, match="refusing a patch made for another base model"):
        load_patch(path, model, fingerprint=model_fingerprint(other))  # a fingerprint known beforehand
    assert load_patch(path, model, fingerprint=patch.base_fingerprint).num_rows == patch.num_rows
    assert_same_state(state(other), untouched)
    baseline = EngramLM(small_config(engram=False))
    with pytest.raises(ValueError, match="no Engram layers"):
        apply_patch(baseline, patch)


@pytest.mark.parametrize("change,match", [
    (lambda p, t: MemoryPatch({1: p.layers[0]}, p.base_fingerprint), "layer 1, which is not an Engram layer"),
    (lambda p, t: MemoryPatch({0: (torch.tensor([t]), torch.zeros(1, 8))}, p.base_fingerprint), "outside the table"),
    (lambda p, t: MemoryPatch({0: (torch.tensor([0]), torch.zeros(1, 4))}, p.base_fingerprint), "rows of width 4"),
    (lambda p, t: MemoryPatch({}, p.base_fingerprint, {"nope.weight": torch.zeros(1)}), "'nope.weight'"),
    (lambda p, t: MemoryPatch({}, p.base_fingerprint, {"norm.weight": torch.zeros(3)}), r"shape \(3,\)"),
], ids=["layer", "row", "width", "dense-name", "dense-shape"])
def test_a_patch_that_does_not_fit_the_tables_is_refused(saved, change, match):
    model, _ = saved
    bad = change(random_patch(model, 4, 3), engram_tables(model)[0].num_rows)
    with pytest.raises(ValueError, match=match):
        check_patch(model, bad)


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip-last-byte":
        data[-1] ^= 0x40
    elif how == "flip-checksum":
        data[data.index(b'"checksum":"sha256:') + 20] ^= 0x01
    elif how == "flip-fingerprint":
        position = data.index(b'"base_fingerprint":"sha256:') + 30
        data[position] = ord("0") if data[position] != ord("0") else ord("1")
    elif how == "header":
        data[8] = ord("x")
    else:
        keep = {"half": len(data) // 2, "minus-one": len(data) - 1, "header-only": 40, "empty": 0}[how]
        data = data[:keep]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["half", "minus-one", "header-only", "empty", "header", "flip-last-byte",
                                 "flip-checksum", "flip-fingerprint"])
def test_truncated_or_corrupted_patch_is_refused_at_load(saved, tmp_path, how):
    model, _ = saved
    path = save_patch(random_patch(model, 5, 12), tmp_path / "p.patch")
    corrupt(path, how)
    with pytest.raises(ValueError, match="truncated or corrupt|is corrupt"):
        load_patch(path)


def test_load_refuses_files_that_are_not_patches(saved, tmp_path):
    _, directory = saved
    with pytest.raises(ValueError, match="not an engram memory patch"):
        load_patch(directory / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        load_patch(tmp_path / "missing.patch")


def poisoned(values: torch.Tensor, how: str) -> torch.Tensor:
    if how == "fp8":
        return values.to(torch.float8_e4m3fn)
    values = values.clone()
    values[1, 3] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[how]
    return values


@pytest.mark.parametrize("how, message", [
    ("nan", r"patch layer 0: values hold 1 NaN or infinite element\(s\) of 24; a memory patch must be finite"),
    ("inf", "patch layer 0: values hold 1 NaN or infinite"),
    ("-inf", "patch layer 0: values hold 1 NaN or infinite"),
    ("fp8", r"patch layer 0: values must be \[N=3, head_dim\] of float16, bfloat16, float32, float64, got "
            r"torch.float8_e4m3fn"),
], ids=["nan", "inf", "-inf", "fp8"])
def test_non_finite_or_fp8_values_are_refused_built_or_loaded(saved, tmp_path, how, message):
    model, _ = saved
    rows, values = random_patch(model, 6, 3).layers[0]
    with pytest.raises(ValueError, match=message):
        MemoryPatch({0: (rows, poisoned(values, how))}, model_fingerprint(model))
    path = write_raw_patch(tmp_path / "p.patch", {"layers.0.rows": rows, "layers.0.values": poisoned(values, how)},
                           {"base_fingerprint": model_fingerprint(model), "metadata": "{}"})
    with pytest.raises(ValueError, match=f"p.patch: {message}"):
        load_patch(path)


def test_non_finite_dense_tensors_are_refused(saved):
    model, _ = saved
    with pytest.raises(ValueError, match="patch dense tensor 'norm.weight' hold 1 NaN"):
        MemoryPatch({}, model_fingerprint(model), {"norm.weight": poisoned(torch.ones(2, 16), "nan").flatten()})


def test_an_inverse_keeps_a_models_own_non_finite_rows_but_never_serves_them(saved):
    """Erasing a broken (NaN) row works and reverts bit for bit; the inverse holding the NaN cannot be overlaid."""
    _, directory = saved
    model = EngramLM.from_pretrained(directory).eval()
    engram_tables(model)[0].weight.data[7, 2] = float("nan")
    before = state(model)
    inverse = apply_patch(model, MemoryPatch({0: (torch.tensor([7]), torch.zeros(1, 8))}, model_fingerprint(model)))
    assert torch.equal(engram_tables(model)[0].weight[7], torch.zeros(8))
    with pytest.raises(ValueError, match="patch layer 0: values hold 1 NaN"):
        inverse.overlay()
    revert(model, inverse)
    assert_same_state(state(model), before)


@pytest.mark.parametrize("header, message", [
    ({"metadata": "{}"}, r"lacks \['base_fingerprint'\]"),
    ({"base_fingerprint": "sha256:x"}, r"lacks \['metadata'\]"),
    ({}, r"lacks \['base_fingerprint', 'metadata'\]"),
    ({"base_fingerprint": "sha256:x", "metadata": "[1, 2]"}, r"metadata must be a JSON object, got '\[1, 2\]'"),
    ({"base_fingerprint": "sha256:x", "metadata": "{oops"}, "Expecting property name"),
], ids=["no-fingerprint", "no-metadata", "neither", "metadata-list", "metadata-not-json"])
def test_a_header_missing_its_fields_is_refused_clearly(saved, tmp_path, header, message):
    model, _ = saved
    rows, values = random_patch(model, 7, 2).layers[0]
    path = write_raw_patch(tmp_path / "p.patch", {"layers.0.rows": rows, "layers.0.values": values}, header)
    with pytest.raises(ValueError, match=f"p.patch: .*{message}"):
        load_patch(path)


def test_merge_takes_the_union_and_the_second_wins(saved):
    model, _ = saved
    fingerprint = model_fingerprint(model)
    a = MemoryPatch({0: (torch.tensor([1, 4, 9]), torch.full((3, 8), 1.0)), 2: (torch.tensor([3]), torch.ones(1, 8))},
                    fingerprint, {"norm.weight": torch.zeros(32)}, {"name": "a"})
    b = MemoryPatch({0: (torch.tensor([4, 5]), torch.full((2, 8), 2.0))}, fingerprint,
                    {"norm.weight": torch.ones(32)}, {"name": "b"})
    merged = merge(a, b)
    assert merged.layers[0][0].tolist() == [1, 4, 5, 9]
    assert merged.layers[0][1][:, 0].tolist() == [1.0, 2.0, 2.0, 1.0]
    assert torch.equal(merged.layers[2][0], a.layers[2][0]) and torch.equal(merged.dense["norm.weight"], torch.ones(32))
    assert merged.metadata == {"kind": "merge", "parts": [{"name": "a"}, {"name": "b"}]}
    reversed_order = merge(b, a)
    assert reversed_order.layers[0][1][:, 0].tolist() == [1.0, 1.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="different base models"):
        merge(a, MemoryPatch({}, "sha256:other"))
    with pytest.raises(ValueError, match="cannot be merged"):
        merge(a, MemoryPatch({0: (torch.tensor([1]), torch.ones(1, 8, dtype=torch.bfloat16))}, fingerprint))


def test_applying_a_merge_equals_writing_both_patches(saved):
    model, directory = saved
    a, b = random_patch(model, 6, 30), random_patch(model, 7, 30)
    merged_model = EngramLM.from_pretrained(directory)
    apply_patch(merged_model, merge(a, b))
    for layer_id, table in engram_tables(model).items():
        expected = table.weight.detach().clone()
        for patch in (a, b):
            rows, values = patch.layers[layer_id]
            expected[rows] = values
        assert torch.equal(engram_tables(merged_model)[layer_id].weight, expected)


def test_diff_finds_exactly_the_changed_rows_and_dense_tensors(saved, tmp_path):
    model, directory = saved
    patched = EngramLM.from_pretrained(directory)
    patch = random_patch(model, 8, 20)
    patch = MemoryPatch(patch.layers, patch.base_fingerprint, {"norm.weight": torch.randn(32)}, {})
    apply_patch(patched, patch)
    found = diff(model, patched)
    assert found.base_fingerprint == model_fingerprint(model) and found.metadata == {"kind": "diff"}
    assert_same_patch(MemoryPatch(found.layers, found.base_fingerprint, found.dense, {}), patch)
    patched.save_pretrained(tmp_path)
    assert_same_patch(diff(directory, tmp_path), found)  # folders work alike
    assert diff(model, EngramLM.from_pretrained(directory)).num_rows == 0
    zero, negative_zero = EngramLM.from_pretrained(directory), EngramLM.from_pretrained(directory)
    engram_tables(zero)[0].weight.data[3, 0] = 0.0
    engram_tables(negative_zero)[0].weight.data[3, 0] = -0.0  # equal as numbers, not as bits
    assert diff(zero, negative_zero).layers[0][0].tolist() == [3]
    with pytest.raises(ValueError, match="different configs"):
        diff(model, make_model(hc_mult=1))


def test_overlay_of_a_gate_tuned_patch_is_refused(saved):
    model, _ = saved
    patch = MemoryPatch({}, model_fingerprint(model), {"norm.weight": torch.ones(32)})
    with pytest.raises(ValueError, match="gate-tuned patches cannot be served as overlays; apply them"):
        patch.overlay()


def test_revert_takes_only_inverse_patches(saved):
    model, directory = saved
    with pytest.raises(ValueError, match="revert takes the inverse patch"):
        revert(EngramLM.from_pretrained(directory), random_patch(model, 9, 3))


def test_host_tables_are_patched_in_place_and_read_only_ones_refused(saved, tmp_path):
    model, directory = saved
    patch = random_patch(model, 10, 40)
    ids = torch.randint(3, 128_815, (2, 9))
    device_model = EngramLM.from_pretrained(directory).eval()
    apply_patch(device_model, patch)
    host = EngramLM.from_pretrained(directory, engram_placement="host").eval()
    fingerprint = model_fingerprint(host)
    inverse = apply_patch(host, patch)
    assert torch.equal(host(ids).logits, device_model(ids).logits)
    revert(host, inverse)
    assert model_fingerprint(host) == fingerprint
    for options, match in ((dict(engram_placement="disk"), "read-only memory map"),
                           (dict(engram_placement="host", share_memory=True, shm_dir=tmp_path), "read-only memory map"),
                           (dict(engram_placement="host", engram_cache_rows=16), "HBM cache")):
        placed = EngramLM.from_pretrained(directory, **options)
        with pytest.raises(ValueError, match=match):
            apply_patch(placed, patch)
        assert model_fingerprint(placed) == fingerprint


def test_fp8_tables_refuse_patches():
    cfg = small_config(hc_mult=1, use_moe=False)
    cfg.engram.n_embed_per_ngram, cfg.engram.n_head_per_ngram = 64, 2  # head_dim 32: FP8 rows
    torch.manual_seed(0)
    model = EngramLM(cfg).eval()
    quantize_tables(model)
    untouched = state(model)
    patch = MemoryPatch({layer: (torch.tensor([0, 5]), torch.zeros(2, table.head_dim))
                         for layer, table in engram_tables(model).items()}, model_fingerprint(model))
    with pytest.raises(ValueError, match="FP8 tables are read-only.*patching Engram layer"):
        apply_patch(model, patch)
    assert_same_state(state(model), untouched)
