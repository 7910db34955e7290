#!/usr/bin/env bash
# Issue 8 on the lent nvidia-h200-x2 (2 H200s of one host), from the repository root:
#
#   bash benchmarks/results/distributed/h200x2.sh bench    # bench_distributed.py: 1 and 2 GPUs, preset and 16M-prime tables
#   bash benchmarks/results/distributed/h200x2.sh train    # engram train: 1 GPU, then torchrun 2 GPUs, same global batch
#   bash benchmarks/results/distributed/h200x2.sh control  # 1 and 2 GPUs under torch.profiler (kernel time by kind),
#                                                          # then the 1-GPU training run again (run-to-run noise)
#
# DATA is a prepared corpus (default .bench-corpus: the python-code preset of a Python 3.11 stdlib, prepared with
# `engram data prepare python-code --tokenizer docs/results/allocation/tokenizer.json --out .bench-corpus`, about
# 11.3M training tokens). NVLink multicast stays off (the device notes): the three variables below are exported
# for every process started here.
set -uo pipefail
out=${OUT:-/tmp/distributed-out}
data=${DATA:-.bench-corpus}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
bench=(run --data "$data" --preset small --batch-per-gpu 32 --seq-len 512 --out "$out/bench.jsonl")
train=(train --preset small --data "$data" --tokenizer docs/results/allocation/tokenizer.json --batch-size 64
       --seq-len 512 --max-steps 200 --warmup-steps 20 --log-every 10 --eval-every 100 --eval-batches 8
       --save-every 1000 --no-baseline --no-progress --seed 0)
case ${1:-} in
  bench)
    nvidia-smi topo -m > "$out/topo.txt" 2>&1
    python3 benchmarks/bench_distributed.py "${bench[@]}" --label 1-gpu
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py "${bench[@]}" --label 2-gpu
    python3 benchmarks/bench_distributed.py "${bench[@]}" --label 1-gpu-16M --engram-vocab 16000000
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py "${bench[@]}" --label 2-gpu-16M --engram-vocab 16000000
    ;;
  train)
    python3 -m engram "${train[@]}" --out "$out/train-1gpu"
    torchrun --nproc_per_node=2 -m engram "${train[@]}" --out "$out/train-2gpu"
    (cd "$out" && tar czf train-runs.tgz train-*/metrics.jsonl train-*/run.json && rm -rf train-1gpu train-2gpu)
    ;;
  control)
    profiled=("${bench[@]}" --steps 10 --exchange-steps 3 --profile-steps 3)
    python3 benchmarks/bench_distributed.py "${profiled[@]}" --label 1-gpu-profiled
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py "${profiled[@]}" --label 2-gpu-profiled
    python3 -m engram "${train[@]}" --out "$out/train-1gpu-repeat"
    (cd "$out" && tar czf train-repeat.tgz train-1gpu-repeat/metrics.jsonl train-1gpu-repeat/run.json \
      && rm -rf train-1gpu-repeat)
    ;;
  *) echo "usage: $0 bench|train|control" >&2; exit 2 ;;
esac
