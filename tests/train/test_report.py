"""What `engram train` prints at the end: the comparison table and the summary of a run."""

import io
import json

from rich.console import Console

from engram.train.compare import format_params, print_comparison, run_comparison, run_summary
from engram.train.optim import OptimConfig
from engram.train.trainer import METRICS_FILE, TrainConfig

from test_trainer import small_model


def row(model: str, **fields) -> dict:
    return {"model": model, "steps": 100_000, "val_loss": 10.123456, "val_bpb": 3.456789, "train_loss": 9.87,
            "total_params": 26_364_123_456, "activated_params": 3_901_234_567, "table_params": 5_701_234_567,
            **fields}


def test_comparison_table_is_whole_at_80_columns():
    out = io.StringIO()
    print_comparison(Console(file=out, width=80), [row("engram"), row("baseline", table_params=0)])
    text = out.getvalue()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    for cell in ("engram", "baseline", "100,000", "10.1235", "3.4568", "26.36B", "3.90B", "5.70B", "bits/byte",
                 "activated"):
        assert cell in text, cell


def test_throughput_stays_in_the_logs(tmp_path):
    """The two runs train one after the other, so load on the machine can differ between them: tokens/s is
    logged per step but not compared."""
    rows = [{"step": 1, "tokens": 8, "loss": 5.0, "tokens_per_s": 100.0},
            {"step": 2, "tokens": 16, "loss": 4.0, "tokens_per_s": 900.0, "val_loss": 4.5, "val_bpb": 2.0}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_summary("engram", tmp_path, {"total": 3, "activated": 2, "engram": 1})
    assert summary["val_loss"] == 4.5 and summary["train_loss"] == 4.0 and "tokens_per_s" not in summary
    out = io.StringIO()
    print_comparison(Console(file=out, width=80), [summary])
    table, caption = out.getvalue().split("loss in nats per token")
    assert "tokens/s" not in table and "900" not in table and "metrics.jsonl" in caption  # says where it is


def test_parameter_counts_are_formatted():
    assert format_params({"total": 3_340_573, "activated": 554_461, "engram": 2_565_056}) == (
        "3.34M total, 0.55M activated per token, 2.57M in Engram tables")
    assert format_params({"total": 26_364_123_456, "activated": 3_901_234_567, "engram": 0}) == (
        "26.36B total, 3.90B activated per token, 0 in Engram tables")


def test_comparison_prints_counts_and_where_the_models_are(text_dir, tmp_path):
    cfg = TrainConfig(preset="tiny", data=[str(text_dir)], tokenizer="bpe-300", out=str(tmp_path), max_steps=2,
                      batch_size=2, seq_len=16, eval_every=2, eval_batches=1, progress=False, tensorboard=False,
                      optim=OptimConfig(warmup_steps=1),
                      model=small_model())
    out = io.StringIO()
    result = run_comparison(cfg, console=Console(file=out, width=80))
    text = out.getvalue()
    assert "{" not in text and "…" not in text  # no raw dicts, no cut cells
    engram, baseline = result["rows"]
    assert format_params({"total": engram["total_params"], "activated": engram["activated_params"],
                          "engram": engram["table_params"]}) in text
    assert f"{engram['val_loss']:.4f}" in text and f"{baseline['val_loss']:.4f}" in text
    assert str(tmp_path / "engram" / "final") in text and str(tmp_path / "baseline" / "final") in text
