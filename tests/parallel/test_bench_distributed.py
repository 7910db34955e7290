"""benchmarks/bench_distributed.py runs on CPUs (gloo) and its report says what the runs measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engram.data.corpus import prepare_corpus

from test_distributed_training import free_port

pytestmark = pytest.mark.slow  # benchmark runs under torchrun: deselect with -m "not slow"

ROOT = Path(__file__).resolve().parents[2]
BENCH = str(ROOT / "benchmarks" / "bench_distributed.py")


def bench(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port",
                 str(free_port())] if ranks > 1 else [sys.executable])
    result = subprocess.run(launcher + [BENCH, *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def write_curve(folder: Path, losses: list[float]) -> Path:
    folder.mkdir()
    lines = [json.dumps({"step": 10 * (i + 1), "loss": loss, "tokens_per_s": 1000.0 * (i + 1)})
             for i, loss in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_bench_distributed_runs_and_reports(text_dir, tmp_path):
    corpus = tmp_path / "corpus"
    prepare_corpus([str(text_dir)], corpus, tokenizer="bpe-300", progress=False)
    results = tmp_path / "bench.jsonl"
    common = ["run", "--data", str(corpus), "--preset", "tiny", "--batch-per-gpu", "2", "--seq-len", "32",
              "--warmup", "1", "--steps", "2", "--exchange-steps", "1", "--device", "cpu", "--out", str(results)]
    bench(*common, "--label", "one")
    bench(*common, "--label", "two", ranks=2)
    bench(*common, "--label", "two-meta", "--engram-vocab", "30000", ranks=2)
    one, two, meta = [json.loads(line) for line in results.read_text().splitlines()]
    assert (one["world"], two["world"], meta["world"]) == (1, 2, 2)
    assert "exchange_bytes_per_step_per_gpu" not in one  # whole tables: no exchange
    for run in (two, meta):
        assert run["exchange_bytes_per_step_per_gpu"] > 0
        assert 0 < run["dedup_ratio"] <= 1
        assert 0 < run["exchange_share"] < 1
        assert run["exchange_calls_per_step"] == 4  # tiny: 1 Engram layer x (counts, ids, rows; gradients)
        assert [r["global_tokens"] for r in run["ranks"]] == [2 * 2 * 32] * 2
    assert meta["table_rows_total"] > two["table_rows_total"]
    assert meta["table_state_gb_per_gpu"] * 2 >= 3 * meta["table_rows_total"] * 16 * 4 / 1e9 * 0.999

    reference = write_curve(tmp_path / "a", [5.0, 4.0, 3.0])
    other = write_curve(tmp_path / "b", [5.0, 4.5, 3.1])
    report = bench("report", str(results), "--curves", f"ref={reference}", f"other={other}").stdout
    for label in ("one", "two", "two-meta"):
        assert f"| {label} |" in report
    assert "| other | +0.5000 (20) | 0.2000 |" in report
