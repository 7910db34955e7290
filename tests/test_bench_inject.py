"""benchmarks/bench_inject.py end to end at toy size on the CPU: --prepare from local text, then --quick runs both
adapters (Engram and peft LoRA) through the same comparison code and writes the JSON, the tables and the plots."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inject.py"
DOMAIN_WORDS = "the president spoke of congress and the nation while taxes rose and people asked for peace".split()


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inject", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def data_dir(bench, text_dir, tmp_path_factory):
    domain = tmp_path_factory.mktemp("domain")
    rng = np.random.default_rng(0)
    for doc in range(6):
        (domain / f"speech{doc}.txt").write_text(" ".join(rng.choice(DOMAIN_WORDS, 800)))
    folder = tmp_path_factory.mktemp("inject-data")
    assert bench.main(["--prepare", str(folder), "--pretrain-sources", str(text_dir), "--domain-sources", str(domain),
                       "--vocab", "300", "--answer-words", "8"]) == 0
    return folder


def test_prepare_writes_compact_token_arrays(data_dir):
    info = json.loads((data_dir / "data.json").read_text())
    assert len(info["answer_words"]) == 8 and all(len(w) >= 5 for w in info["answer_words"])
    for name in ("pretrain", "domain"):
        for split in ("train", "val"):
            tokens = np.load(data_dir / f"{name}-{split}.npy")
            assert tokens.dtype == np.uint16 and len(tokens) == info[name][split]["tokens"]
    assert not (data_dir / ".corpora").exists()


def test_quick_run_compares_engram_and_lora_with_equal_budgets(bench, data_dir, tmp_path):
    out = tmp_path / "out"
    assert bench.main(["--quick", "--data", str(data_dir), "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    settings = bench.Settings.quick()
    assert list(results["tasks"]) == [f"facts-{n}" for n in settings.facts] + ["domain"]
    assert results["injection"]["steps"] == settings.inject_steps  # the toy budget is not cut
    params = results["params"]
    assert abs(params["lora"] - params["engram"]) <= params["lora_per_rank"] / 2  # the closest rank
    assert params["engram_used_per_token"] < params["engram"]
    for name, task in results["tasks"].items():
        engram, lora = task["engram"], task["lora"]
        assert len(engram["loss_curve"]) == len(lora["loss_curve"]) == results["injection"]["steps"]  # equal tokens
        assert engram["trainable_params"] == params["engram"] and lora["trainable_params"] == params["lora"]
        assert 0 < engram["rows_changed"] <= engram["rows_total"] and "rows_changed" not in lora
        assert engram["adapter_bytes"] > 0 and lora["adapter_bytes"] > 0
        for method in ("engram", "lora"):  # both adapters changed the base's predictions
            assert task[method]["base_val_loss"] != task["base"]["base_val_loss"]
        if name == "domain":
            assert all("domain_loss" in task[m] for m in ("base", "engram", "lora"))
        else:
            for method in ("base", "engram", "lora"):
                assert 0 <= task[method]["recall_paraphrase"] <= 1 and 0 <= task[method]["recall_trained"] <= 1
                assert len(task[method]["recall_by_paraphrase"]) == 3
    assert set(results["throughput"]) == {"base", "engram", "engram-exported", "lora", "lora-merged"}
    assert all(t["tokens_per_s"] > 0 for t in results["throughput"].values())
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| facts-") for line in table.splitlines()) == 3 * len(settings.facts)
    assert "| domain | lora |" in table
    assert all((out / png).stat().st_size > 0 for png in ("recall.png", "losses.png", "curves.png"))


def test_recall_prompts_end_where_the_answer_starts(bench, data_dir):
    data = bench.Data.load(data_dir)
    facts = bench.fact_task(data, 5, bench.Settings.quick()).facts
    prompts, completions = bench.recall_rows(data, facts, paraphrase=True)
    for fact, prompt, completion in zip(facts, prompts, completions):
        assert prompt[0] == data.bos
        assert data.tokenizer.decode(prompt[1:] + completion) == fact.paraphrase_prompt() + fact.completion


def test_a_run_without_data_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="--prepare"):
        bench.Data.load(tmp_path)


def test_the_gpu_settings_fit_the_model(bench):
    s = bench.Settings()
    assert s.throughput_prompt + s.throughput_new <= s.max_positions and s.seq_len <= s.max_positions
    assert max(s.engram_layers) < s.n_layers and s.d_model % s.n_heads == 0 and min(s.facts) >= 1
    assert s.fact_batch * s.fact_seq_len == s.domain_batch * s.seq_len  # every task's step holds the same tokens
