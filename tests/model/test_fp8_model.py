"""EngramLM with packed FP8 Engram tables: quantised while loading a float folder, saved as FP8 table files, and
read back in every placement with identical outputs, equal to a float model holding ``dequantize_rows(table)``."""

import json
import shutil

import pytest
import torch

from engram.embedding import quantize_tables
from engram.kernels.fp8 import dequantize_rows, quantize_rows
from engram.model import EngramLM
from engram.storage.table_file import read_header
from engram.train.optim import EngramOptimizer, OptimConfig, enable_sparse_tables

from lm_helpers import small_config

PLACEMENTS = {
    "device": dict(engram_placement="device"),
    "host": dict(engram_placement="host"),
    "host-shared": dict(engram_placement="host", share_memory=True),
    "disk": dict(engram_placement="disk"),
    "host-cache": dict(engram_placement="host", engram_cache_rows=64),
    "disk-cache": dict(engram_placement="disk", engram_cache_rows=64),
}


def fp8_config():
    # head_dim 32: one UE8M0 scale per row
    cfg = small_config(hc_mult=1, use_moe=False)
    cfg.engram.n_embed_per_ngram, cfg.engram.n_head_per_ngram = 64, 2
    return cfg


def tables(model):
    return {b.layer_idx: b.engram.multi_head_embedding for b in model.blocks if b.engram is not None}


def ids(seed, batch=2, length=9):
    return torch.randint(3, 128_815, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A float model and its folder; the same model quantised in memory and its FP8 folder."""
    torch.manual_seed(0)
    model = EngramLM(fp8_config()).eval()
    float_dir = tmp_path_factory.mktemp("float")
    model.save_pretrained(float_dir)
    quantized = EngramLM(fp8_config()).eval()
    quantized.load_state_dict(model.state_dict())
    assert quantize_tables(quantized) == 2
    fp8_dir = tmp_path_factory.mktemp("fp8")
    quantized.save_pretrained(fp8_dir)
    return model, float_dir, quantized, fp8_dir


def load(directory, tmp_path, options):
    if options.get("share_memory"):
        options = {**options, "shm_dir": tmp_path}
    return EngramLM.from_pretrained(directory, **options).eval()


def test_an_fp8_model_reads_dequantised_rows(folders):
    model, _, quantized, _ = folders
    # A float model holding dequantize_rows(table) as its tables computes exactly what the FP8 model does.
    reference = EngramLM(fp8_config()).eval()
    reference.load_state_dict(model.state_dict())
    for layer, table in tables(reference).items():
        table.weight.data = dequantize_rows(tables(quantized)[layer].weight)
    for seed in range(2):
        assert torch.equal(quantized(ids(seed)).logits, reference(ids(seed)).logits)
    assert not torch.equal(quantized(ids(0)).logits, model(ids(0)).logits)  # FP8 rows are not the float ones


def test_fp8_folder_holds_uint8_table_files_and_says_so(folders):
    _, float_dir, quantized, fp8_dir = folders
    assert json.loads((fp8_dir / "config.json").read_text())["engram_table_format"] == "fp8"
    assert json.loads((float_dir / "config.json").read_text())["engram_table_format"] == "float"
    for layer, table in tables(quantized).items():
        header = read_header(fp8_dir / f"engram-layer-{layer}.safetensors")
        assert (header.dtype, header.row_format, header.dim) == (torch.uint8, "fp8", 33)
        assert header.num_rows == table.num_rows


@pytest.mark.parametrize("options", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_fp8_folder_loads_in_every_placement_with_identical_outputs(folders, tmp_path, options):
    _, _, quantized, fp8_dir = folders
    placed = load(fp8_dir, tmp_path, options)
    for layer, table in tables(placed).items():
        assert table.row_format == "fp8" and torch.equal(table.table(), tables(quantized)[layer].weight)
    for seed in range(3):  # the cache refreshes in between
        batch = ids(seed)
        mask = torch.ones_like(batch)
        mask[0, :3] = 0
        assert torch.equal(placed(batch, attention_mask=mask).logits, quantized(batch, attention_mask=mask).logits)
    prompt = ids(7, length=4)
    assert torch.equal(placed.generate(prompt, max_new_tokens=4, temperature=0),
                       quantized.generate(prompt, max_new_tokens=4, temperature=0))


@pytest.mark.parametrize("options", [PLACEMENTS["device"], PLACEMENTS["host"], PLACEMENTS["host-cache"]],
                         ids=["device", "host", "host-cache"])
def test_quantising_a_float_folder_while_loading_equals_quantize_rows(folders, options):
    model, float_dir, quantized, _ = folders
    placed = EngramLM.from_pretrained(float_dir, engram_table_format="fp8", **options).eval()
    for layer, table in tables(placed).items():
        assert torch.equal(table.table(), quantize_rows(tables(model)[layer].weight))
    batch = ids(5)
    assert torch.equal(placed(batch).logits, quantized(batch).logits)


def test_a_model_quantised_while_loading_saves_an_fp8_folder(folders, tmp_path):
    _, float_dir, quantized, _ = folders
    EngramLM.from_pretrained(float_dir, engram_placement="host", engram_table_format="fp8").save_pretrained(tmp_path)
    again = EngramLM.from_pretrained(tmp_path, engram_placement="disk").eval()
    for layer, table in tables(again).items():
        assert torch.equal(table.table(), tables(quantized)[layer].weight)


def test_formats_that_do_not_fit_are_refused(folders, tmp_path):
    _, float_dir, _, fp8_dir = folders
    with pytest.raises(ValueError, match="placement 'disk' maps the files as they are"):
        EngramLM.from_pretrained(float_dir, engram_placement="disk", engram_table_format="fp8")
    with pytest.raises(ValueError, match="holds FP8 Engram tables; they load as they are"):
        EngramLM.from_pretrained(fp8_dir, engram_table_format="float")
    with pytest.raises(ValueError, match="engram_table_format must be one of .* got 'int8'"):
        EngramLM.from_pretrained(float_dir, engram_table_format="int8")
    lying = tmp_path / "lying"  # FP8 table files under a config that says float
    shutil.copytree(fp8_dir, lying)
    config = json.loads((lying / "config.json").read_text())
    del config["engram_table_format"]  # as a folder from before the key: float
    (lying / "config.json").write_text(json.dumps(config))
    (lying / "checksums.json").unlink()  # such folders had no checksums either
    for placement in ("device", "host", "disk"):
        with pytest.raises(ValueError, match="holds packed FP8 rows"):
            EngramLM.from_pretrained(lying, engram_placement=placement)


def test_float_folders_without_the_key_still_load_as_float(folders, tmp_path):
    model, float_dir, _, _ = folders
    old = tmp_path / "old"
    shutil.copytree(float_dir, old)
    config = json.loads((old / "config.json").read_text())
    del config["engram_table_format"]
    (old / "config.json").write_text(json.dumps(config))
    (old / "checksums.json").unlink()  # such folders had no checksums either
    loaded = EngramLM.from_pretrained(old).eval()
    assert {t.row_format for t in tables(loaded).values()} == {"float"}
    assert torch.equal(loaded(ids(1)).logits, model(ids(1)).logits)


def test_training_fp8_tables_is_refused(folders):
    _, _, _, fp8_dir = folders
    model = EngramLM.from_pretrained(fp8_dir)
    with pytest.raises(ValueError, match="FP8 tables are read-only .* training Engram table 'blocks.0.engram"):
        enable_sparse_tables(model)
    with pytest.raises(ValueError, match="FP8 tables are read-only .*EngramOptimizer"):
        EngramOptimizer(model, OptimConfig())


GPU_PLACEMENTS = {
    "host-cpu": dict(engram_placement="host", host_method="cpu"),
    "host-uva": dict(engram_placement="host", host_method="uva"),
    "disk": dict(engram_placement="disk"),
    "host-uva-cache": dict(engram_placement="host", host_method="uva", engram_cache_rows=64),
    "disk-cache": dict(engram_placement="disk", engram_cache_rows=64),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", GPU_PLACEMENTS.values(), ids=GPU_PLACEMENTS.keys())
def test_gpu_placements_of_fp8_tables_give_identical_logits(folders, options):
    _, _, _, fp8_dir = folders
    reference = EngramLM.from_pretrained(fp8_dir).to("cuda").eval()  # the fused gather kernel
    placed = EngramLM.from_pretrained(fp8_dir, **options).to("cuda").eval()  # a store, then one dequantise kernel
    for seed in range(3):
        batch = ids(seed).cuda()
        assert torch.equal(placed(batch).logits, reference(batch).logits)
