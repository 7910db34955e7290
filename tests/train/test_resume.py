"""Resuming a run: the tokenizer outlives checkpoint rotation, changed settings are refused by name, nothing to
resume is an error, and `engram train --resume` without --out continues the latest run of the preset."""

import dataclasses
import json
import shutil

import pytest

from engram.cli import main
from engram.model import EngramLM
from engram.storage.checksums import record_checksums
from engram.train.checkpoint import STATE_FILE, flatten_state, latest_checkpoint, load_checkpoint
from engram.train.optim import OptimConfig
from engram.train.trainer import METRICS_FILE, Trainer

from test_trainer import config, small_model


def cli_args(text_dir, *extra: str) -> list[str]:
    """`engram train` at toy size: the tiny preset, a 300-id BPE, 2 x 16-token batches, every step logged, no
    evaluation but the last."""
    return ["train", "--data", str(text_dir), "--tokenizer", "bpe-300", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "100", "--eval-batches", "1", "--log-every", "1", "--no-progress", *extra]


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_cli_resume_with_bpe_tokenizer_survives_checkpoint_rotation(text_dir, tmp_path, capsys):
    """A checkpoint every step, two kept: the checkpoint resumed from is deleted two saves later, and the saves
    after that must still find the tokenizer."""
    run = tmp_path / "run"
    assert main(cli_args(text_dir, "--out", str(run), "--max-steps", "3", "--save-every", "1", "--no-baseline")) == 0
    code = main(cli_args(text_dir, "--out", str(run), "--max-steps", "6", "--save-every", "1", "--no-baseline",
                         "--resume"))
    assert code == 0, capsys.readouterr().err
    assert latest_checkpoint(run).name == "step-000006"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000005", "step-000006"]
    assert all((p / "tokenizer.json").is_file() for p in (run / "checkpoints").glob("step-*"))
    assert logged_steps(run) == list(range(1, 7))
    model = EngramLM.from_pretrained(run / "final")  # self-contained: its own tokenizer copy
    assert model.cfg.tokenizer == str(run / "final" / "tokenizer.json")


def test_resume_refuses_changed_settings_and_names_each(text_dir, tmp_path):
    Trainer(config(text_dir, tmp_path, max_steps=2)).train()
    changed = config(text_dir, tmp_path, max_steps=4, resume=True, seed=1, batch_size=2, seq_len=16,
                     data=[str(tmp_path / "other-texts")], tokenizer="bpe-400", grad_accum=2,
                     optim=OptimConfig(lr=1e-3, warmup_steps=2))
    with pytest.raises(ValueError) as refused:  # before preparing the (missing) data
        Trainer(changed)
    message = str(refused.value)
    assert "step-000002" in message and "exact resume" in message
    for line in ("seed: checkpoint 0, now 1", "batch_size: checkpoint 4, now 2", "seq_len: checkpoint 32, now 16",
                 f"data: checkpoint {[str(text_dir)]!r}, now {[str(tmp_path / 'other-texts')]!r}",
                 "tokenizer: checkpoint 'bpe-300', now 'bpe-400'", "grad_accum: checkpoint 1, now 2",
                 "optim.lr: checkpoint 0.003, now 0.001"):
        assert line in message
    assert "max_steps" not in message and str(tmp_path / "run.json") in message
    with pytest.raises(ValueError, match="step 2 .* max_steps 1"):
        Trainer(config(text_dir, tmp_path, max_steps=1, resume=True))


def test_resume_accepts_safe_changes(text_dir, tmp_path, capsys):
    Trainer(config(text_dir, tmp_path, max_steps=2)).train()
    resumed = Trainer(config(text_dir, tmp_path, max_steps=4, resume=True, eval_every=2, eval_batches=1,
                             log_every=2, save_every=1, keep_checkpoints=3, device="cpu", tensorboard=True))
    assert resumed.step == 2
    assert "max_steps 2 -> 4" in capsys.readouterr().out
    resumed.train()
    assert logged_steps(tmp_path) == [1, 2, 4]  # log_every 1, then 2
    assert latest_checkpoint(tmp_path).name == "step-000004"


def test_resume_refuses_a_checkpoint_whose_tokenizer_differs_from_the_data(text_dir, tmp_path):
    """The same flags over edited files: the corpus is prepared again and its BPE, of the same size, differs."""
    texts = tmp_path / "texts"
    shutil.copytree(text_dir, texts)
    run = config(texts, tmp_path / "run", max_steps=2, model=small_model(engram=None))  # no hash fingerprint
    Trainer(run).train()
    (texts / "doc00.txt").write_text("a brand new document of quite other words " * 200)
    with pytest.raises(ValueError, match="its tokenizer.json differs from the data's tokenizer"):
        Trainer(dataclasses.replace(run, max_steps=4, resume=True))


def test_a_checkpoint_whose_settings_name_model_overrides_resumes(text_dir, tmp_path):
    """Checkpoints written before ``TrainConfig.model`` hold ``model_overrides`` (fields over the preset) in their
    settings instead: they resume, and the model is still checked against their config.json."""
    Trainer(config(text_dir, tmp_path, max_steps=2)).train()
    checkpoint = latest_checkpoint(tmp_path)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    settings = dict(state["trainer"]["__dict__"])["train_config"]["__dict__"]
    settings[:] = [pair for pair in settings if pair[0] != "model"]
    settings.append(["model_overrides", flatten_state({"d_model": 32, "n_layers": 2, "ffn_kinds": ["dense", "moe"]},
                                                      {})])
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    record_checksums(checkpoint, [STATE_FILE])
    assert "model_overrides" in load_checkpoint(checkpoint)[2]["train_config"]

    with pytest.raises(ValueError, match=r"another model config: d_model: checkpoint 32, now 48"):
        Trainer(config(text_dir, tmp_path, max_steps=4, resume=True, model=small_model(d_model=48)))
    resumed = Trainer(config(text_dir, tmp_path, max_steps=4, resume=True))
    assert resumed.step == 2
    assert resumed.train()["step"] == 4 and logged_steps(tmp_path) == [1, 2, 3, 4]


def test_resume_with_nothing_to_resume_is_an_error(text_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"nothing to resume in {tmp_path / 'missing'}"):
        Trainer(config(text_dir, tmp_path / "missing", resume=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to resume .* no checkpoint"):
        Trainer(config(text_dir, tmp_path / "empty", resume=True))


def test_cli_resume_without_out_continues_the_latest_run_of_the_preset(text_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(cli_args(text_dir, "--resume", "--max-steps", "2")) == 2
    assert "no run of preset 'tiny'" in capsys.readouterr().err and not (tmp_path / "runs").exists()

    assert main(cli_args(text_dir, "--max-steps", "2")) == 0  # a comparison: runs/tiny-<time>/{engram,baseline}
    (run,) = (tmp_path / "runs").iterdir()
    (tmp_path / "runs" / "tiny-20000101-000000").mkdir()  # an older run
    (tmp_path / "runs" / "tiny-notes").mkdir()  # not a run folder name
    capsys.readouterr()
    assert main(cli_args(text_dir, "--resume", "--max-steps", "3")) == 0
    out = capsys.readouterr().out
    assert f"resuming {run.relative_to(tmp_path)}" in out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([run.name, "tiny-20000101-000000",
                                                                           "tiny-notes"])
    for side in ("engram", "baseline"):  # both sides of the comparison continued from step 2
        assert logged_steps(run / side) == [1, 2, 3]
        assert latest_checkpoint(run / side).name == "step-000003"
    assert main(cli_args(text_dir, "--resume", "--max-steps", "3", "--out", str(tmp_path / "nowhere"))) == 2
    assert "nothing to resume" in capsys.readouterr().err
