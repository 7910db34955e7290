"""docs/results/allocation-v2/gpu_run.sh at toy size on the CPU: five sweep processes side by side, the report of every
run and seed, `engram eval` on the last seed's checkpoints, what comes back in $OUT and unpack.sh's placing of it;
then a deadline that stops training before any run finishes still leaves the logs packed, and names the checkpoint a
cut run left."""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from engram.data.corpus import prepare_corpus

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "results" / "allocation-v2" / "gpu_run.sh"
UNPACK = SCRIPT.with_name("unpack.sh")


def run_driver(corpus: Path, work: Path | None, **settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORPUS": str(corpus), "PRESET": "tiny", "RHOS": "0.5", "STEPS": "1", "BATCH": "2",
           "SEQ": "32", "SEEDS": "0 1", "EVAL_EVERY": "1", "EVAL_BATCHES": "1", "DEVICE": "cpu", "THREADS": "1",
           "PYTHON": sys.executable, "EVAL_ARGS": "--samples 4 --batches 1 --batch-size 2", **settings}
    env.pop("OUT", None)
    env.pop("WORK", None)
    if work is not None:  # else the default: ROOT/<corpus>-<STEPS>steps
        env["WORK"] = str(work)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_gpu_driver_runs_the_first_priority_sweep_at_toy_size(text_dir, tmp_path):
    corpus = tmp_path / "corpus"
    prepare_corpus([str(text_dir)], corpus, tokenizer="bpe-300", progress=False)
    cache = tmp_path / "compile-cache"  # an earlier call's compile cache in two parts (the CPU run makes none)
    (tmp_path / "cache" / "fxgraph").mkdir(parents=True)
    (tmp_path / "cache" / "fxgraph" / "entry").write_text("graph")
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:xz") as archive:
        archive.add(tmp_path / "cache" / "fxgraph", arcname="fxgraph")
    cache.mkdir()
    half = len(packed.getvalue()) // 2
    (cache / "inductor-cache.tar.xz.0").write_bytes(packed.getvalue()[:half])
    (cache / "inductor-cache.tar.xz.1").write_bytes(packed.getvalue()[half:])
    done = run_driver(corpus, tmp_path / "work", GPUS="2", PROCS="3",  # the runs and seeds dealt over 3 processes
                      COMPILE_CACHE=str(cache))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "work" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["eval.png", "inductor-cache.tar.xz.0", "results.tgz",
                                                     "status.txt", "sweep.png", "sweep_summary.csv"]
    with tarfile.open(out / "inductor-cache.tar.xz.0") as archive:  # restored before training, returned after it
        assert archive.extractfile("./fxgraph/entry").read() == b"graph"
    summary = list(csv.DictReader(io.StringIO((out / "sweep_summary.csv").read_text())))
    assert [(row["run"], row["seeds"]) for row in summary] == [
        ("rho-1.00", "2"), ("rho-0.50", "2"), ("moe-top3", "2"), ("no-memory", "2"), ("conv-only", "2")]
    with tarfile.open(out / "results.tgz") as archive:
        names = set(archive.getnames())
        report = json.load(archive.extractfile("report/eval.json"))
    assert {"report/sweep.csv", "report/sweep_differences.csv", "report/sweep_curves.png", "report/corpus-index.json",
            "logs/report.log", "runs/no-memory-seed1/metrics.jsonl", "runs/conv-only-seed0/final/config.json"} <= names
    assert not [name for name in names if name.endswith(".safetensors")]
    # process p (of 3) trains jobs p, p + 3, ... of the 10 (run, seed) jobs, seed after seed, on GPU p mod 2
    assert {"logs/train-rho-1.00-p0.log", "logs/train-moe-topx-p1.log", "logs/train-rho-1.00-p2.log"} <= names
    status = (out / "status.txt").read_text()
    assert "in 3 processes on 2 GPU(s)" in status and f"restored the compile cache {cache}" in status
    assert "0 of 10 runs finished before this call (restored, or trained here earlier): 10 to train" in status
    assert "compile cache packed:" in status and "in 1 part(s) of at most 15 MiB" in status
    assert "rho-1.00 seeds 0: exit 0 (logs/train-rho-1.00-p0.log, GPU 0)" in status
    assert "rho-1.00 seeds 1: exit 0 (logs/train-rho-1.00-p2.log, GPU 0)" in status
    assert "moe-top* seeds 0: exit 0 (logs/train-moe-topx-p1.log, GPU 1)" in status
    assert "moe-top* seeds 1: exit 0 (logs/train-moe-topx-p0.log, GPU 0)" in status
    assert list(report["checkpoints"]) == ["rho-1.00-seed1", "moe-top3-seed1", "rho-0.50-seed1", "no-memory-seed1",
                                           "conv-only-seed1"]

    # here, after the call: unpack.sh puts the runs where the next call restores them, the report and logs in a
    # folder of their own, the compile cache's parts where COMPILE_CACHE can name them
    dest, parts = tmp_path / "results-here", tmp_path / "carried-cache"
    unpack = ["bash", str(UNPACK), str(out), str(dest), "call1"]
    unpacked = subprocess.run(unpack, env={**os.environ, "CACHE": str(parts)}, capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    assert f"runs in {dest}/runs: 0 -> 10" in unpacked.stdout
    assert (dest / "runs" / "conv-only-seed1" / "final" / "config.json").is_file()
    assert (dest / "call1" / "report" / "status.txt").is_file() and (dest / "call1" / "logs" / "report.log").is_file()
    assert sorted(p.name for p in parts.iterdir()) == ["inductor-cache.tar.xz.0"]
    again = subprocess.run(unpack, env={**os.environ, "CACHE": str(parts)}, capture_output=True, text=True)
    assert again.returncode == 1 and "call1' exists: name this call's folder otherwise" in again.stderr

    # a later call on the same machine (work folder) that trains one run's third seed only: the report still covers
    # seeds 0 and 1 of every run, the eval reads the run just trained; its training process exits 124 after training
    # (as when the deadline stops `engram sweep` in its own report), which the status line tells from a cut run
    stopped_late = tmp_path / "python-exits-124-after-training"
    stopped_late.write_text(f'#!/bin/sh\n"{sys.executable}" "$@" || exit $?\n'
                            'case " $* " in *" --report-only "*) exit 0 ;; *" sweep "*) exit 124 ;; esac\n')
    stopped_late.chmod(0o755)
    again = run_driver(corpus, tmp_path / "work", SEEDS="0 1 2", ONLY="rho-0.50", PYTHON=str(stopped_late))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    status = (out / "status.txt").read_text()
    assert ("rho-0.50 seeds 0 1 2: exit 124 (logs/train-rho-0.50.log); every seed's run finished (final/ saved) "
            "before that") in status
    assert "2 of 3 runs finished before this call (restored, or trained here earlier): 1 to train" in status
    assert "training 3 runs (rho-0.50 x seeds 0 1 2), 1 steps each, in 1 processes" in status
    assert "rho-1.00 seed 2: not finished" in status and "over seeds 0 1 written" in status.split("1 to train")[1]
    with tarfile.open(out / "results.tgz") as archive:
        assert list(json.load(archive.extractfile("report/eval.json"))["checkpoints"]) == ["rho-0.50-seed2"]
    wrong = run_driver(corpus, tmp_path / "work", ONLY="rho-0.30")
    assert wrong.returncode == 1
    assert "ONLY names rho-0.30, not one of the runs: rho-1.00 moe-top* rho-0.50" in wrong.stdout

    # training cut before any run ends: runs far longer than the deadline, so whether the SIGINT lands in an import
    # (which may swallow it) or in the loop (a checkpoint, no final/), no run can finish first
    # (conv-only's seed 1, never reached, keeps a checkpoint of an earlier call cut on this machine); the default
    # work folder names the corpus and the length, so calls of other lengths on one machine never share runs
    stopped_work = tmp_path / "root" / "corpus-100000steps"
    cut = stopped_work / "runs" / "conv-only-seed1" / "checkpoints" / "step-000042"
    cut.mkdir(parents=True)
    stopped = run_driver(corpus, None, ROOT=str(tmp_path / "root"), DEADLINE="1", STEPS="100000")
    assert stopped.returncode == 1
    status = (stopped_work / "out" / "status.txt").read_text()
    assert "rho-1.00 seed 0: not finished" in status and "no run finished: nothing to report" in status
    assert (f"conv-only seed 1: not finished: cut at step 42, checkpoint {cut}; the same command on this machine "
            "resumes it") in status
    assert "in 5 processes on 1 GPU(s)" in status  # one process per run, its seeds one after the other
    assert "rho-1.00 seeds 0 1: exit " in status and "finished (final/ saved)" not in status
    assert "packing" in status
    with tarfile.open(stopped_work / "out" / "results.tgz") as archive:
        assert "logs/train-moe-topx.log" in archive.getnames()


@pytest.mark.slow
def test_the_gpu_driver_runs_memory_scaling_at_toy_size(text_dir, tmp_path):
    corpus = tmp_path / "corpus"
    prepare_corpus([str(text_dir)], corpus, tokenizer="bpe-300", progress=False)
    done = run_driver(corpus, tmp_path / "work", MODE="memory", FACTORS="1 2", SEEDS="0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "work" / "out"
    summary = list(csv.DictReader(io.StringIO((out / "sweep_summary.csv").read_text())))
    assert [(row["run"], row["memory_factor"]) for row in summary] == [("rows-x1", "1"), ("rows-x2", "2")]
    assert float(summary[1]["rows_per_head"]) > float(summary[0]["rows_per_head"])
    assert "fit_b" in summary[0]  # the memory-scaling fit
    with tarfile.open(out / "results.tgz") as archive:
        assert list(json.load(archive.extractfile("report/eval.json"))["checkpoints"]) == ["rows-x1-seed0",
                                                                                           "rows-x2-seed0"]
    assert "training 2 runs (rows-x1 rows-x2 x seeds 0)" in (out / "status.txt").read_text()
    wrong = run_driver(corpus, tmp_path / "work", MODE="memroy")
    assert wrong.returncode == 1 and "MODE must be allocation or memory, not 'memroy'" in wrong.stderr


def test_unpack_places_only_the_runs_a_call_finished(tmp_path):
    def returned(folder: Path, finished: list[str], cut: list[str]) -> Path:
        """A call's $OUT: results.tgz with the runs' small files, report/ and logs/."""
        tree = folder / "tree"
        for run in finished + cut:
            (tree / "runs" / run).mkdir(parents=True)
            (tree / "runs" / run / "metrics.jsonl").write_text(f'{{"step": 1, "run": "{run}"}}\n')
            (tree / "runs" / run / "run.json").write_text("{}")
        for run in finished:
            (tree / "runs" / run / "final").mkdir()
            (tree / "runs" / run / "final" / "config.json").write_text("{}")
        for part in ("report", "logs"):
            (tree / part).mkdir()
            (tree / part / "status.txt").write_text(part)
        with tarfile.open(folder / "results.tgz", "w:gz") as archive:
            for part in ("runs", "report", "logs"):
                archive.add(tree / part, arcname=part)
        return folder

    dest = tmp_path / "dest"
    first = returned(tmp_path / "call1", finished=["rows-x1-seed0"], cut=["rows-x1-seed1"])
    unpacked = subprocess.run(["bash", str(UNPACK), str(first), str(dest), "call1"], capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    assert "left out rows-x1-seed1: not finished in this call" in unpacked.stdout
    assert f"runs in {dest}/runs: 0 -> 1" in unpacked.stdout
    assert sorted(p.name for p in (dest / "runs").iterdir()) == ["rows-x1-seed0"]
    # the next call finished the cut run: its files land, the run finished before is not overwritten
    second = returned(tmp_path / "call2", finished=["rows-x1-seed0", "rows-x1-seed1"], cut=[])
    (dest / "runs" / "rows-x1-seed0" / "metrics.jsonl").write_text("kept\n")
    unpacked = subprocess.run(["bash", str(UNPACK), str(second), str(dest), "call2"], capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    assert f"runs in {dest}/runs: 1 -> 2" in unpacked.stdout
    assert (dest / "runs" / "rows-x1-seed1" / "final" / "config.json").is_file()
    assert (dest / "runs" / "rows-x1-seed0" / "metrics.jsonl").read_text() == "kept\n"
    assert (dest / "call2" / "report" / "status.txt").read_text() == "report"
