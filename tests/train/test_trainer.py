import json
import shutil
import subprocess
import sys

import pytest
import torch

from engram.cli import main
from engram.model import EngramLM, EngramLMConfig
from engram.serve.generate import generate_text
from engram.train import checkpoint as checkpoint_module
from engram.train.checkpoint import flatten_state, latest_checkpoint, unflatten_state
from engram.train.compare import COMPARISON_FILE, PLOT_FILE, run_comparison
from engram.train.optim import OptimConfig
from engram.train.trainer import METRICS_FILE, Trainer, TrainConfig

def small_model(**fields) -> EngramLMConfig:
    """The tiny preset at 2 blocks of width 32 (``fields`` override more)."""
    return EngramLMConfig.from_preset("tiny", **{"d_model": 32, "n_layers": 2, "ffn_kinds": ["dense", "moe"],
                                                 **fields})


def config(text_dir, out, **kwargs) -> TrainConfig:
    fields = dict(preset="tiny", data=[str(text_dir)], tokenizer="bpe-300", out=str(out), max_steps=6,
                  batch_size=4, seq_len=32, eval_every=3, eval_batches=2, log_every=1, save_every=100,
                  progress=False, tensorboard=False, optim=OptimConfig(lr=3e-3, warmup_steps=2),
                  model=small_model())
    fields.update(kwargs)
    return TrainConfig(**fields)


def final_state(run_dir):
    return EngramLM.from_pretrained(run_dir / "final").state_dict()


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_interrupt_and_resume_is_exact(text_dir, tmp_path, monkeypatch):
    Trainer(config(text_dir, tmp_path / "straight")).train()

    interrupted = Trainer(config(text_dir, tmp_path / "split"))
    original = interrupted.train_step

    def stop_after_three():
        if interrupted.step == 3:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(interrupted, "train_step", stop_after_three)
    result = interrupted.train()
    assert result["interrupted"] and result["step"] == 3
    assert latest_checkpoint(tmp_path / "split").name == "step-000003"
    assert not (tmp_path / "split" / "final").exists()
    monkeypatch.undo()

    resumed = Trainer(config(text_dir, tmp_path / "split", resume=True))
    assert resumed.step == 3
    resumed.train()
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # metrics appended across the resume
    straight, split = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    rows = [json.loads(line) for line in (tmp_path / "split" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "lr", "tokens_per_s"} <= rows[0].keys() and "val_bpb" in rows[2] and rows[2]["val_bpb"] > 0
    # each MoE layer's routing: from an even split (1.0) up to every token sending one of its picks to one expert
    moe = small_model().moe
    assert all(1.0 <= r["moe_load_max"] <= moe.num_experts / moe.top_k for r in rows)
    assert all(r["moe_load_max"] == max(r["moe_load_by_layer"]) for r in rows)
    assert all(0 <= e < moe.num_experts for r in rows for e in r["moe_hot_expert_by_layer"])


def test_existing_run_needs_resume_and_foreign_checkpoint_is_refused(text_dir, tmp_path):
    Trainer(config(text_dir, tmp_path, max_steps=2)).train()
    with pytest.raises(FileExistsError, match="pass --resume"):
        Trainer(config(text_dir, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"another model config: d_model: checkpoint 32, now 48"):
        Trainer(config(text_dir, tmp_path, max_steps=4, resume=True, model=small_model(d_model=48)))
    config_file = latest_checkpoint(tmp_path) / "config.json"  # same flags, but the preset changed since
    saved = json.loads(config_file.read_text())
    saved["model"]["d_model"] = 48
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"another model config: d_model: checkpoint 48, now 32"):
        Trainer(config(text_dir, tmp_path, max_steps=4, resume=True))


def test_failed_save_keeps_previous_checkpoint(text_dir, tmp_path, monkeypatch):
    trainer = Trainer(config(text_dir, tmp_path, max_steps=2))
    trainer.train()
    before = latest_checkpoint(tmp_path)
    files_before = sorted(p.name for p in before.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "write_safetensors", disk_full)
    trainer.step = 5
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    assert latest_checkpoint(tmp_path) == before
    assert sorted(p.name for p in before.iterdir()) == files_before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")] == []
    EngramLM.from_pretrained(before)  # still loads


def test_state_flattening_round_trip():
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, "groups": [{"betas": (0.9, 0.95),
             "params": [0, 1], "lr": 1e-3, "name": None}], "flag": True}
    tensors = {}
    skeleton = flatten_state(state, tensors)
    json.dumps(skeleton)
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["groups"][0]["betas"] == (0.9, 0.95) and 0 in back and back["flag"] is True
    assert torch.equal(back[0]["exp_avg"], state[0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot checkpoint a value of type object"):
        flatten_state({"x": object()}, {})


def test_comparison_and_generate(text_dir, tmp_path):
    result = run_comparison(config(text_dir, tmp_path, max_steps=3))
    engram_row, baseline_row = result["rows"]
    assert engram_row["table_params"] > 0 and baseline_row["table_params"] == 0
    assert abs(engram_row["total_params"] - baseline_row["total_params"]) / engram_row["total_params"] < 0.01
    assert engram_row["val_loss"] > 0 and baseline_row["val_bpb"] > 0
    assert (tmp_path / PLOT_FILE).stat().st_size > 10_000
    assert json.loads((tmp_path / COMPARISON_FILE).read_text())["rows"][0]["model"] == "engram"
    text = generate_text(tmp_path / "engram" / "final", "the king", max_new_tokens=5, seed=0)
    assert text.startswith("the king") and len(text) > len("the king")
    copied = tmp_path / "moved"
    shutil.copytree(tmp_path / "engram" / "final", copied)  # self-contained: carries its tokenizer
    assert generate_text(copied, "the king", max_new_tokens=5, seed=0) == text


def test_cli_train_and_generate(text_dir, tmp_path, capsys):
    args = ["train", "--data", str(text_dir), "--tokenizer", "bpe-300", "--out", str(tmp_path), "--max-steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--no-baseline",
            "--no-progress"]
    assert main(args) == 0
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert f"model: {tmp_path / 'final'}" in capsys.readouterr().out  # the run's summary
    assert main(["generate", "--checkpoint", str(tmp_path / "final"), "--prompt", "the sea", "--max-new-tokens", "3",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the sea")
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err


def test_start_of_a_run_removes_staging_folders_of_killed_saves(text_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / "checkpoints" / f".tmp-step-000002-{suffix}" for suffix in (dead.pid, "shared")]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "optimizer.safetensors").write_bytes(b"partial")
    Trainer(config(text_dir, tmp_path, max_steps=2))
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_compile_defaults_to_cuda_only_and_checks_ids_on_the_host(text_dir, tmp_path, monkeypatch):
    """``compile=None`` compiles on CUDA only; a compiled run checks every batch's ids on the CPU (the compiled
    model skips its own check, a host sync). ``torch.compile`` is replaced by a recording identity here, so the
    model still checks too: a compiled step checks twice, an eager one once."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, mode: compiled.append((module, mode)) or module)
    eager = Trainer(config(text_dir, tmp_path / "auto", max_steps=1))  # CPU
    assert not eager.compiled and compiled == []
    trainer = Trainer(config(text_dir, tmp_path / "on", max_steps=1, compile=True))
    assert trainer.compiled and compiled == [(trainer.model, "default")]
    Trainer(config(text_dir, tmp_path / "graphs", max_steps=1, compile=True, compile_mode="reduce-overhead"))
    assert compiled[-1][1] == "reduce-overhead"
    with pytest.raises(ValueError, match="compile_mode.*'fast'"):
        config(text_dir, tmp_path / "bad", compile_mode="fast")
    for run, checks in ((eager, 1), (trainer, 2)):
        checked = []
        real = run.model.check_input_ids
        monkeypatch.setattr(run.model, "check_input_ids", lambda ids: checked.append(ids.device.type) or real(ids))
        run.train_step()
        assert checked == ["cpu"] * checks


@pytest.mark.parametrize("flag, expected", [([], None), (["--compile"], True), (["--no-compile"], False)])
def test_cli_compile_flag(flag, expected, monkeypatch):
    seen = []
    monkeypatch.setattr("engram.train.trainer.Trainer.__init__",
                        lambda self, cfg, **kw: seen.append(cfg.compile) or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        main(["train", "--no-baseline", "--no-progress", *flag])
    assert seen == [expected]


def test_tensorboard_gets_every_logged_scalar_and_one_curve_per_moe_layer(text_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(config(text_dir, tmp_path / "run", max_steps=3, tensorboard=True)).train()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    layers = len(rows[-1]["moe_load_by_layer"])
    assert layers == small_model().ffn_kinds.count("moe")
    lists = ("moe_load_by_layer", "moe_hot_expert_by_layer")
    assert set(events.Tags()["scalars"]) == ({key for key in rows[-1] if key != "step" and key not in lists}
                                             | {f"{key}/{i}" for key in lists for i in range(layers)})
    assert [e.value for e in events.Scalars(f"moe_load_by_layer/{layers - 1}")] == pytest.approx(
        [r["moe_load_by_layer"][-1] for r in rows])
