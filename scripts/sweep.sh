#!/usr/bin/env bash
# Sweep RAFT over datasets × shots × seeds.
#
#   bash scripts/sweep.sh                                   # 10 datasets × shots 1 2 4 8 16 × seeds 1 2 3
#   bash scripts/sweep.sh oxford_pets                       # one dataset, 15 runs
#   bash scripts/sweep.sh "dtd eurosat" "4 16" "1 2" --train_views 10
#   DATASETS=imagenet SHOTS=16 bash scripts/sweep.sh
#   DATA=/data bash scripts/sweep.sh                        # every dataset under one root: /data/<its folder>
#   PYTHON=.venv/bin/python bash scripts/sweep.sh           # an interpreter that is not on PATH
#   CHECK=1 bash scripts/sweep.sh                           # scripts/check_data.py on the datasets first
#   GPUS="0 1 2 3" bash scripts/sweep.sh                    # four runs at a time, one per GPU (bash >= 5.1)
#   bash scripts/sweep.sh --list "dtd eurosat" > runs.txt   # the pending runs, one command per line
#   sbatch --array=1-$(wc -l < runs.txt) scripts/slurm_array.sh runs.txt   # ... as a SLURM job array
#
# Positional arguments (or DATASETS, SHOTS, SEEDS) choose the grid; arguments starting with
# -- are config overrides passed to every run. Runs whose results.json exists are left out
# before anything starts (one Python start lists them all: scripts/pending.py); the others
# run with [k/N], their time and an estimate for the rest. Val/test trunk features are cached
# under cache/ on the first run of a dataset and reused by every later run of the grid
# (concurrent runs share the cache safely). A failed run does not stop the sweep; one Ctrl-C
# (or SIGTERM) does: the run in progress saves its state, no further run starts, and the
# summary says what is done, failed and not started. Exit code: 0, 1 (a run failed), 130 (stopped).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
help_on_request "$0" "$@"

list=0
if [[ "${1:-}" == --list ]]; then list=1; shift; fi
split_arguments "$@"
set -- "${overrides[@]}"
DATASETS="${positional[0]:-${DATASETS:-$(all_coop)}}"
SHOTS="${positional[1]:-${SHOTS:-1 2 4 8 16}}"
SEEDS="${positional[2]:-${SEEDS:-1 2 3}}"

known=(); unknown=()
for dataset in $DATASETS; do
  if [[ -f "configs/${dataset}.yaml" ]]; then known+=("$dataset"); else unknown+=("$dataset (no config configs/${dataset}.yaml)"); fi
done

# The pending runs as shell commands (each with its --data_path under $DATA).
pending() {
  [[ ${#known[@]} -eq 0 ]] && return
  "$PYTHON" scripts/pending.py "${known[*]}" "$SHOTS" "$SEEDS" "$@"
}

if [[ $list == 1 ]]; then
  pending "$@"
  exit $?
fi

# CHECK=1: every dataset of the sweep checked first (scripts/check_data.py); a missing file stops it here
if [[ "${CHECK:-0}" == 1 && ${#known[@]} -gt 0 ]]; then
  check=("$PYTHON" scripts/check_data.py "${known[@]}")
  [[ -n "${DATA:-}" ]] && check+=(--data_root "$DATA")
  "${check[@]}" || { echo "CHECK=1: the data is incomplete (above); nothing was run" >&2; exit 1; }
fi

# one Python start lists the pending runs, after checking every dataset's folder at once
listing=$(PENDING_COUNT=1 pending "$@") || { echo "nothing was run" >&2; exit 1; }
already=0
commands=()
if [[ -n "$listing" ]]; then
  mapfile -t commands <<< "$listing"
  if [[ "${commands[0]:-}" == finished* ]]; then already="${commands[0]#finished }"; commands=("${commands[@]:1}"); fi
fi
start_runs "${#commands[@]}" "$already"
failed+=("${unknown[@]}")
label_of() { local c="${1#cd * && }"; echo "${c#* }"; }   # the command without `cd ROOT && python`

if [[ -n "${GPUS:-}" ]]; then   # one run per GPU at a time, each with its own CUDA_VISIBLE_DEVICES
  free=($GPUS)
  declare -A gpu_of command_of
  finish_one() {   # wait for any run; give its GPU back
    local pid rc=0
    wait -n -p pid || rc=$?
    [[ -z "${pid:-}" ]] && return
    case $rc in 0) done_runs+=("${command_of[$pid]}") ;; 130|143) stopped=1; failed+=("${command_of[$pid]} (stopped)") ;;
                *) failed+=("${command_of[$pid]}") ;; esac
    free+=("${gpu_of[$pid]}")
    unset "gpu_of[$pid]"
  }
  for command in "${commands[@]}"; do
    while [[ ${#free[@]} -eq 0 && $stopped == 0 ]]; do finish_one; done
    [[ $stopped == 1 ]] && break
    gpu="${free[0]}"; free=("${free[@]:1}")
    started=$((started + 1))
    echo "=== [$started/$total_runs] [gpu $gpu] $(label_of "$command")"
    CUDA_VISIBLE_DEVICES="$gpu" bash -o pipefail -c "$command 2>&1 | sed -u 's/^/[gpu $gpu] /'" &
    gpu_of[$!]="$gpu"; command_of[$!]="$(label_of "$command")"
  done
  while [[ ${#gpu_of[@]} -gt 0 ]]; do finish_one; done
  finish_runs
fi

for command in "${commands[@]}"; do
  [[ $stopped == 1 ]] && break
  run_one "$(label_of "$command")" bash -c "$command"
done
finish_runs
