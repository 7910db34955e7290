"""The public names: each package exports what README.md, docs/ and benchmarks/ import from it, and nothing else;
everything else is imported from the module that defines it."""

import importlib
import inspect
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "engram"
PACKAGES = sorted(".".join(("engram", *path.parent.relative_to(SOURCE).parts)) for path in SOURCE.rglob("__init__.py"))
COMMAND_LINE = "engram.cli"  # its package holds the commands' code, not re-exports: no library names to pin

PUBLIC = {
    "engram": {"DEAD_TOKEN", "VARIANTS", "CompressedTokenizer", "Engram", "EngramConfig", "EngramLM",
               "EngramLMConfig", "MultiHeadEmbedding", "NgramHasher", "__version__", "convert_demo_state_dict",
               "load_deepseek_v41_engram"},
    "engram.data": set(),
    "engram.hf": {"EngramForCausalLM", "EngramHFConfig", "base_fingerprint", "engram_parameters", "export_engram_lm",
                  "freeze_base", "load_adapter", "retrofit", "save_adapter", "save_merged", "to_engram_lm"},
    "engram.inspection": {"run_ablate", "run_gates", "run_logit_lens", "run_table_stats"},
    "engram.kernels": set(),
    "engram.kernels.cross_entropy": {"cross_entropy_rows"},
    "engram.kernels.gate": {"fused_gate"},
    "engram.kernels.gather": {"fp8_gather", "multi_head_gather"},
    "engram.kernels.hash": {"DEAD_TOKEN", "ngram_hash", "ngram_hash_decode"},
    "engram.kernels.shortconv": {"fused_short_conv"},
    "engram.kernels.sinkhorn": {"sinkhorn"},
    "engram.memory": {"MemoryPatch", "apply_patch", "check_patch", "diff", "load_patch", "lookup", "merge",
                      "model_fingerprint", "ngram_rows", "revert", "save_patch", "write_ngram"},
    "engram.model": {"PRESETS", "EngramLM", "EngramLMConfig", "MoE", "RowOverlay", "iso_parameter_config",
                     "param_report", "row_overlays"},
    "engram.models": set(),
    "engram.parallel": {"DistContext", "ShardedMultiHeadEmbedding", "finish_distributed", "init_distributed",
                        "local_rows", "shard_engram_tables", "wrap_ddp"},
    "engram.serve": set(),
    "engram.storage": {"CachedStore", "DiskStore", "HostStore", "TableFileError", "load_table", "map_table",
                       "open_table_store", "share_in_shm", "write_table"},
    "engram.train": set(),
}


def test_every_package_is_listed():
    assert set(PACKAGES) - {COMMAND_LINE} == set(PUBLIC)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_exists(package):
    module = importlib.import_module(package)
    exported = getattr(module, "__all__", [])
    assert len(exported) == len(set(exported))
    assert [name for name in exported if not hasattr(module, name)] == []


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_all_is_the_stated_set(package):
    assert set(getattr(importlib.import_module(package), "__all__", [])) == PUBLIC[package]


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_a_package_holds_only_its_exports_and_submodules(package):
    module = importlib.import_module(package)
    names = {name for name, value in vars(module).items() if not name.startswith("_") and not inspect.ismodule(value)}
    assert names == PUBLIC[package] - {"__version__"}


def test_storage_internals_stay_in_their_modules():
    import engram.storage

    for name in ("private_host_table", "cpu_gather", "cuda_alias", "pin_in_place"):
        assert not hasattr(engram.storage, name)


def test_the_model_is_importable_from_the_root():
    import engram
    import engram.model

    assert (engram.EngramLM, engram.EngramLMConfig) == (engram.model.EngramLM, engram.model.EngramLMConfig)
