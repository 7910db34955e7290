"""Engram tables in every placement give the same outputs as tables in the model (fp32, bit for bit)."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engram.model import EngramLM
from engram.storage import CachedStore, TableFileError

from lm_helpers import assert_same_outputs, saved_small_model, small_config

PLACEMENTS = {
    "host": dict(engram_placement="host"),
    "host-shared": dict(engram_placement="host", share_memory=True),
    "disk": dict(engram_placement="disk"),
    "host-cache": dict(engram_placement="host", engram_cache_rows=64),
    "disk-cache": dict(engram_placement="disk", engram_cache_rows=64),
    "disk-cache-all": dict(engram_placement="disk", engram_cache_rows=10**6),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    return saved_small_model(directory, hc_mult=4), directory


def _ids(seed, batch=3, length=11):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128_815, (batch, length), generator=generator)


def _load(directory, tmp_path, options):
    if options.get("share_memory"):
        options = {**options, "shm_dir": tmp_path}
    return EngramLM.from_pretrained(directory, **options).eval()


def test_save_writes_one_checksummed_table_file_per_layer(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == [
        "checksums.json", "config.json", "engram-layer-0.safetensors", "engram-layer-2.safetensors",
        "model.safetensors"]
    for layer in (0, 2):
        table = model.blocks[layer].engram.multi_head_embedding.weight
        loaded = EngramLM.from_pretrained(directory).blocks[layer].engram.multi_head_embedding
        assert loaded.placement == "device" and torch.equal(loaded.weight, table)


@pytest.mark.parametrize("options", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_every_placement_gives_identical_logits_and_generations(saved, tmp_path, options):
    model, directory = saved
    placed = _load(directory, tmp_path, options)
    expected_placement = "cache" if options.get("engram_cache_rows") else options["engram_placement"]
    assert {b.engram.multi_head_embedding.placement for b in placed.blocks if b.engram} == {expected_placement}
    assert "multi_head_embedding.weight" not in " ".join(placed.state_dict())
    assert_same_outputs(placed, model, _ids)


def test_cache_counts_every_row_read(saved):
    _, directory = saved
    placed = EngramLM.from_pretrained(directory, engram_placement="disk", engram_cache_rows=32).eval()
    ids = _ids(1, batch=2, length=9)
    for _ in range(10):
        placed(ids)
    stores = [b.engram.multi_head_embedding.store for b in placed.blocks if b.engram]
    heads = placed.cfg.engram.num_heads
    for store in stores:
        assert isinstance(store, CachedStore)
        stats = store.stats()
        assert stats["hits"] + stats["misses"] == 10 * ids.numel() * heads
        assert stats["hits"] > 0 and stats["cached_rows"] <= 32  # the same text again: its rows got admitted


def test_placed_model_saves_the_same_tables(saved, tmp_path):
    model, directory = saved
    placed = EngramLM.from_pretrained(directory, engram_placement="disk")
    placed.save_pretrained(tmp_path / "again")
    again = EngramLM.from_pretrained(tmp_path / "again")
    for a, b in zip(model.blocks, again.blocks):
        if a.engram is not None:
            assert torch.equal(a.engram.multi_head_embedding.weight, b.engram.multi_head_embedding.weight)


def test_disk_serves_a_table_larger_than_the_host_budget(saved):
    model, directory = saved
    with pytest.raises(ValueError, match=r"host memory budget .* use placement 'disk'"):
        EngramLM.from_pretrained(directory, engram_placement="host", host_memory_budget=1000)
    placed = EngramLM.from_pretrained(directory, engram_placement="disk", host_memory_budget=1000).eval()
    ids = _ids(3)
    assert torch.equal(placed(ids).logits, model(ids).logits)


def test_bad_placement_arguments_are_refused(saved):
    _, directory = saved
    with pytest.raises(ValueError, match="engram_placement must be one of .* got 'ssd'"):
        EngramLM.from_pretrained(directory, engram_placement="ssd")
    with pytest.raises(ValueError, match="engram_cache_rows=8 needs engram_placement 'host' or 'disk'"):
        EngramLM.from_pretrained(directory, engram_cache_rows=8)
    with pytest.raises(ValueError, match="cache_rows must be >= 0, got -1"):
        EngramLM.from_pretrained(directory, engram_placement="host", engram_cache_rows=-1)


@pytest.mark.parametrize("placement", ["device", "host", "disk"])
def test_corrupted_table_is_refused_for_every_placement(saved, tmp_path, placement):
    _, directory = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in directory.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    table = broken / "engram-layer-2.safetensors"
    data = bytearray(table.read_bytes())
    data[-5] ^= 0x40
    table.write_bytes(bytes(data))
    with pytest.raises(TableFileError, match="fails its CRC-32 check"):
        EngramLM.from_pretrained(broken, engram_placement=placement)
    table.write_bytes(bytes(data[:-100]))
    with pytest.raises(TableFileError, match="truncated"):
        EngramLM.from_pretrained(broken, engram_placement=placement)


def test_tables_of_another_hashing_are_refused(saved, tmp_path):
    _, directory = saved
    mixed = tmp_path / "mixed"
    shutil.copytree(directory, mixed)
    cfg = small_config(hc_mult=4)
    cfg.engram.seed = 5
    EngramLM(cfg).save_pretrained(tmp_path / "seed5")
    os.replace(tmp_path / "seed5" / "engram-layer-2.safetensors", mixed / "engram-layer-2.safetensors")
    with pytest.raises(ValueError, match="refusing to load .*seed: weights 5, now 0"):
        EngramLM.from_pretrained(mixed, engram_placement="disk")


def test_folders_with_tables_inside_the_weights_still_load(saved, tmp_path):
    model, directory = saved
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = json.loads((directory / "config.json").read_text())
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        file_metadata = {k: v for k, v in handle.metadata().items() if not k.startswith("engram_crc")}  # older
    save_file(state, str(old / "model.safetensors"), metadata=file_metadata)
    for table in old.glob("engram-layer-*.safetensors"):
        table.unlink()
    del metadata["engram_tables"]
    (old / "config.json").write_text(json.dumps(metadata))
    (old / "checksums.json").unlink()  # such folders had no checksums either
    loaded = EngramLM.from_pretrained(old).eval()
    ids = _ids(4)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="inside the model weights .* save_pretrained it again"):
        EngramLM.from_pretrained(old, engram_placement="disk")


GPU_PLACEMENTS = {
    "host-cpu": dict(engram_placement="host", host_method="cpu"),
    "host-uva": dict(engram_placement="host", host_method="uva"),
    "host-uva-shared": dict(engram_placement="host", host_method="uva", share_memory=True),
    "disk": dict(engram_placement="disk"),
    "host-cache": dict(engram_placement="host", engram_cache_rows=64),
    "disk-cache": dict(engram_placement="disk", engram_cache_rows=64),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", GPU_PLACEMENTS.values(), ids=GPU_PLACEMENTS.keys())
def test_gpu_placements_give_identical_logits(saved, tmp_path, options, dtype):
    _, directory = saved
    reference = EngramLM.from_pretrained(directory).to("cuda", dtype).eval()
    placed = _load(directory, tmp_path, options).to("cuda", dtype).eval()
    for seed in range(3):
        ids = _ids(seed).cuda()
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        assert torch.equal(placed(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
    prompt = _ids(7, batch=2, length=5).cuda()
    assert torch.equal(placed.generate(prompt, max_new_tokens=6, temperature=0),
                       reference.generate(prompt, max_new_tokens=6, temperature=0))
