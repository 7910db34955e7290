import json
import os
import subprocess
import sys

import pytest
import torch

from engram.model import EngramLM, EngramLMConfig
from engram.parallel.checkpoint import load_table_moments
from engram.storage.checksums import FileIntegrityError, write_safetensors
from engram.train.checkpoint import (checkpoint_folder, load_checkpoint, remove_stale_staging, save_checkpoint,
                                     staging_folder)
from engram.train.optim import EngramOptimizer, OptimConfig, enable_sparse_tables


def tiny_model() -> EngramLM:
    torch.manual_seed(0)
    return EngramLM(EngramLMConfig.from_preset("tiny", d_model=16, n_layers=2, ffn_kinds=["dense", "moe"],
                                               max_position_embeddings=64))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def states():
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 8)}}, "groups": [{"lr": 1e-3}]}
    return optimizer, {"torch_rng": torch.get_rng_state(), "note": "x"}


def data_offset(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["optimizer.safetensors", "trainer_tensors.safetensors"])
def test_flipped_byte_in_saved_state_is_refused(tmp_path, model, name):
    folder = save_checkpoint(tmp_path, 3, model, *states())
    step, optimizer, trainer = load_checkpoint(folder)
    assert step == 3 and optimizer["state"][0]["exp_avg"].shape == (64, 8) and trainer["note"] == "x"
    flip_byte(folder / name, data_offset(folder / name) + 100)
    with pytest.raises(FileIntegrityError, match=f"{folder / name}: chunk 0 \\(data bytes 0:.* fails its CRC-32"):
        load_checkpoint(folder)


def test_changed_trainer_state_json_is_refused(tmp_path, model):
    folder = save_checkpoint(tmp_path, 3, model, *states())
    path = folder / "trainer_state.json"
    path.write_text(path.read_text().replace('"step": 3', '"step": 8'))
    with pytest.raises(FileIntegrityError, match=f"{path}: chunk 0 .* fails its CRC-32 check"):
        load_checkpoint(folder)


def test_every_file_of_a_checkpoint_is_checksummed(tmp_path, model):
    folder = save_checkpoint(tmp_path, 3, model, *states())
    recorded = set(json.loads((folder / "checksums.json").read_text())["files"])
    for path in folder.iterdir():
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                header = json.loads(f.read(data_offset(path))[8:])
            assert "engram_crc32" in header["__metadata__"] or "engram_table_crc32" in header["__metadata__"], path
        elif path.name != "checksums.json":
            assert path.name in recorded


def test_stale_staging_folders_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folders = {kind: tmp_path / "checkpoints" / f".tmp-step-000004-{suffix}" for kind, suffix in
                   [("dead", dead.pid), ("live", live.pid), ("shared", "shared"), ("odd", "x")]}
        for folder in folders.values():
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(b"partial")
        assert remove_stale_staging(tmp_path) == sorted([folders["dead"], folders["shared"]])
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(
            folders[kind].name for kind in ("live", "odd"))
    finally:
        live.kill()
        live.wait()
    assert remove_stale_staging(tmp_path / "no-run-yet") == []


def test_staging_folder_names_are_what_cleanup_parses(tmp_path):
    assert staging_folder(tmp_path, 7).name == f".tmp-step-000007-{os.getpid()}"
    assert staging_folder(tmp_path, 7, shared=True).name == ".tmp-step-000007-shared"


def make_run(root, steps=(2, 4), final=True):
    for step in steps:
        folder = root / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "trainer_state.json").write_text("{}")
    if steps:
        (root / "checkpoints" / "latest").write_text(f"step-{steps[-1]:06d}")
    if final:
        (root / "final").mkdir(parents=True)
        (root / "final" / "config.json").write_text("{}")
    return root


def test_checkpoint_folder_accepts_a_run_its_latest_pointer_and_a_model_folder(tmp_path):
    run = make_run(tmp_path / "run")
    assert checkpoint_folder(run) == run / "final"
    assert checkpoint_folder(run / "final") == run / "final"
    assert checkpoint_folder(run / "checkpoints" / "latest") == run / "checkpoints" / "step-000004"
    assert checkpoint_folder(str(run / "checkpoints")) == run / "checkpoints" / "step-000004"
    assert checkpoint_folder(run / "checkpoints" / "step-000002") == run / "checkpoints" / "step-000002"


def test_checkpoint_folder_of_an_unfinished_run_lists_its_checkpoints(tmp_path):
    run = make_run(tmp_path / "run", final=False)
    with pytest.raises(ValueError, match=f"'{run}' is not a model folder: no config.json in it or in its final/ "
                                         f"\\(an unfinished run\\?\\); pass one of: {run}/checkpoints/step-000002, "
                                         f"{run}/checkpoints/step-000004, {run}/checkpoints/latest"):
        checkpoint_folder(run)


def test_checkpoint_folder_hints(tmp_path):
    runs = tmp_path / "comparison"
    make_run(runs / "engram", steps=())
    make_run(runs / "baseline", steps=())
    with pytest.raises(ValueError, match=f"pass one of: {runs}/baseline/final, {runs}/engram/final$"):
        checkpoint_folder(runs)
    weights = runs / "engram" / "final" / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=f"is not a model folder: it is a file; pass the folder that holds it: "
                                         f"{weights.parent}"):
        checkpoint_folder(weights)
    with pytest.raises(ValueError, match="'/nonexistent/run' is not a model folder: it does not exist"):
        checkpoint_folder("/nonexistent/run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json in it or in its final/ \\(pass a run folder, its final/ "
                                         "or one of its checkpoints/step-N\\)"):
        checkpoint_folder(tmp_path / "empty")


def test_flipped_byte_in_a_table_moment_part_is_refused(tmp_path):
    """A sharded run's ranks write their tables' Adam moments as part files; resuming checks them."""
    model = tiny_model()
    enable_sparse_tables(model)
    optimizer = EngramOptimizer(model, OptimConfig())
    model(torch.randint(3, 1000, (1, 8)), labels=torch.randint(3, 1000, (1, 8))).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    state = optimizer.state_dict()
    (name, shape), = state["layout"]["groups"]["tables"]
    moments = state["optimizers"]["tables"]["state"][0]
    write_safetensors(tmp_path / "part.safetensors", {key: moments[key] for key in ("exp_avg", "exp_avg_sq")})
    parts = {key: {"parts": [["part.safetensors", 0, shape[0]]]} for key in ("exp_avg", "exp_avg_sq")}
    in_parts = {**state, "optimizers": {**state["optimizers"], "tables": {
        **state["optimizers"]["tables"], "state": {0: {**moments, **parts}}}}}
    loaded = load_table_moments(in_parts, model, tmp_path)["optimizers"]["tables"]["state"][0]
    assert torch.equal(loaded["exp_avg"], moments["exp_avg"]) and torch.equal(loaded["exp_avg_sq"],
                                                                              moments["exp_avg_sq"])
    flip_byte(tmp_path / "part.safetensors", data_offset(tmp_path / "part.safetensors") + 5)
    with pytest.raises(FileIntegrityError, match="part.safetensors: chunk 0 .* tensors exp_avg"):
        load_table_moments(in_parts, model, tmp_path)
