#!/usr/bin/env bash
# The allocation and memory-scaling sweeps of docs/results/allocation/, as run on the lent H200.
#
#   bash docs/results/allocation/h200.sh MODE GROUP [GROUP ...]
#
# MODE is allocation or memory; each GROUP is a quoted list of rho values (allocation) or table-row factors
# (memory) trained one after the other by one `engram sweep` process; the groups run side by side on the one
# GPU (small models leave it idle between kernels). Runs finished in earlier calls are restored from
# MODE/runs/ beside this script (their metrics.jsonl, run.json and final/config.json: `engram sweep` does not
# train a finished run again; with rho 1.0 the same process also trains the activation-matched pure MoE). When
# every run of the mode is finished, `engram sweep --report-only` over all values writes sweep.csv and sweep.png.
# The small files of every run are packed into $OUT/MODE-runs.tgz. DEADLINE (seconds) stops the training with
# Ctrl-C's effect (a checkpoint) so that the packing still happens inside a call's time limit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-/tmp/allocation}
out=${OUT:-$work/out}
mode=$1; shift
case $mode in
  allocation) flag=--rhos; all="1.0 0.9 0.8 0.7 0.6 0.4 0.2" ;;
  memory) flag=--memory-factors; all="1 2 4 8 16" ;;
  *) echo "MODE must be allocation or memory, got '$mode'" >&2; exit 2 ;;
esac
common=(--preset small --data "$work/corpus" --tokenizer "$here/tokenizer.json" --max-steps 600 --batch-size 32 --seq-len 512 --warmup-steps 60
        --eval-every 150 --eval-batches 32 --log-every 10 --save-every 600 --seed 0 --no-progress --mode "$mode"
        ${EXTRA_ARGS:-})  # EXTRA_ARGS: later flags win, e.g. a toy-size try on a CPU
mkdir -p "$work/$mode" "$out"
if [ ! -f "$work/corpus/index.json" ]; then
  engram data prepare python-code --tokenizer "$here/tokenizer.json" --out "$work/corpus"
fi
if [ -d "$here/$mode/runs" ]; then cp -rn "$here/$mode/runs/." "$work/$mode/"; fi
pids=()
for group in "$@"; do
  OMP_NUM_THREADS=4 timeout --signal=INT "${DEADLINE:-1000000}" engram sweep "${common[@]}" $flag $group --out "$work/$mode" \
    >"$out/$mode-${group// /_}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if engram sweep "${common[@]}" $flag $all --report-only --out "$work/$mode" >"$out/$mode-report.log" 2>&1; then
  cp "$work/$mode/sweep.csv" "$work/$mode/sweep.png" "$out/"
else
  tail -n 3 "$out/$mode-report.log"
fi
(cd "$work/$mode" && tar czf "$out/$mode-runs.tgz" --exclude='*.safetensors' --exclude='checkpoints' \
  --exclude='events.*' */metrics.jsonl */run.json */final/config.json)
exit $status
