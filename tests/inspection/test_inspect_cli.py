import argparse

import pytest

from engram.cli import inspection


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse as ``engram`` does once ``inspect`` is one of its subcommands."""
    parser = argparse.ArgumentParser(prog="engram")
    inspection.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_every_subcommand_writes_into_out(engram_checkpoint, baseline_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(engram_checkpoint), "--device", "cpu"]
    windows = ["--batches", "1", "--batch-size", "2", "--seq-len", "32"]
    runs = {
        "gates": ["--text", "the king", "--text", "亚历山大"],
        "ablate": windows + ["--top-ngrams", "20", "--top-tokens", "3", "--min-count", "1"],
        "logit-lens": windows + ["--baseline", str(baseline_checkpoint)],
        "table": ["--tokens", "2000", "--top-ngrams", "20", "--split", "val"],
    }
    written = {"gates": {"gates.html", "gates.png", "gates.json"}, "ablate": {"ablate.json", "ablate.png"},
               "logit-lens": {"logit_lens.json", "logit_lens.png"}, "table": {"table.json", "table.png"}}
    summaries = {"gates": "mean gate", "ablate": "without Engram", "logit-lens": "baseline: KL to final by depth",
                 "table": "rows read"}
    for command, flags in runs.items():
        out = tmp_path / command
        assert inspection.run(parse(["inspect", command, *common, "--out", str(out), *flags])) == 0
        assert {p.name for p in out.iterdir()} == written[command]
        printed = capsys.readouterr().out
        assert f"wrote {out}" in printed and summaries[command] in printed


@pytest.mark.parametrize("argv, message", [
    (["inspect", "gates", "--checkpoint", "c", "--out", "o"], "--text"),
    (["inspect", "table", "--checkpoint", "c"], "--out"),
    (["inspect", "ablate", "--checkpoint", "c", "--out", "o", "--batches", "0"], "must be >= 1, got 0"),
    (["inspect", "table", "--checkpoint", "c", "--out", "o", "--split", "test"], "invalid choice: 'test'"),
    (["inspect", "lens", "--checkpoint", "c", "--out", "o"], "invalid choice: 'lens'"),
], ids=["no-text", "no-out", "zero-batches", "bad-split", "bad-command"])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
