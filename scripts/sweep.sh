#!/usr/bin/env bash
# Sweep RAFT over datasets × shots × seeds.
#
#   bash scripts/sweep.sh                                   # 10 datasets × shots 1 2 4 8 16 × seeds 1 2 3
#   bash scripts/sweep.sh oxford_pets                       # one dataset, 15 runs
#   bash scripts/sweep.sh "dtd eurosat" "4 16" "1 2" --train_views 10
#   DATASETS=imagenet SHOTS=16 bash scripts/sweep.sh
#   DATA=/data bash scripts/sweep.sh                        # every dataset under one root: /data/<its folder>
#   PYTHON=.venv/bin/python bash scripts/sweep.sh           # an interpreter that is not on PATH
#   GPUS="0 1 2 3" bash scripts/sweep.sh                    # four runs at a time, one per GPU (bash >= 5.1)
#   bash scripts/sweep.sh --list "dtd eurosat" > runs.txt   # the pending runs, one command per line
#   sbatch --array=1-$(wc -l < runs.txt) scripts/slurm_array.sh runs.txt   # ... as a SLURM job array
#
# Positional arguments (or DATASETS, SHOTS, SEEDS) choose the grid; arguments starting with
# -- are config overrides passed to every run. A run whose results.json exists is skipped
# (by main.py; pass --force to redo). Val/test trunk features are cached under cache/ on the
# first run of a dataset and reused by every later run of the grid (concurrent runs share the
# cache safely: one builds, the others wait for it). A failed run does not stop the sweep:
# the failures are listed at the end and the exit code is non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

list=0
if [[ "${1:-}" == --list ]]; then list=1; shift; fi
positional=()
while [[ $# -gt 0 && "$1" != --* ]]; do positional+=("$1"); shift; done
DATASETS="${positional[0]:-${DATASETS:-$ALL_COOP}}"
SHOTS="${positional[1]:-${SHOTS:-1 2 4 8 16}}"
SEEDS="${positional[2]:-${SEEDS:-1 2 3}}"

# The pending runs as shell commands (each with its --data_path under $DATA).
pending() {
  "$PYTHON" scripts/pending.py "$DATASETS" "$SHOTS" "$SEEDS" "$@"
}

if [[ $list == 1 ]]; then
  pending "$@"
  exit
fi

failed=()
if [[ -n "${GPUS:-}" ]]; then   # one run per GPU at a time, each with its own CUDA_VISIBLE_DEVICES
  mapfile -t commands < <(pending "$@")
  free=($GPUS)
  declare -A gpu_of command_of
  finish_one() {   # wait for any run; give its GPU back
    local pid rc=0
    wait -n -p pid || rc=$?
    [[ $rc -ne 0 ]] && failed+=("${command_of[$pid]}")
    free+=("${gpu_of[$pid]}")
    unset "gpu_of[$pid]"
  }
  for command in "${commands[@]}"; do
    while [[ ${#free[@]} -eq 0 ]]; do finish_one; done
    gpu="${free[0]}"; free=("${free[@]:1}")
    echo "=== [gpu $gpu] $command"
    CUDA_VISIBLE_DEVICES="$gpu" bash -o pipefail -c "$command 2>&1 | sed -u 's/^/[gpu $gpu] /'" &
    gpu_of[$!]="$gpu"; command_of[$!]="$command"
  done
  while [[ ${#gpu_of[@]} -gt 0 ]]; do finish_one; done
  report_failures
  exit
fi

for dataset in $DATASETS; do
  if [[ ! -f "configs/${dataset}.yaml" ]]; then
    echo "no config configs/${dataset}.yaml" >&2; failed+=("$dataset (no config)"); continue
  fi
  for shots in $SHOTS; do
    for seed in $SEEDS; do
      echo "=== $dataset  shots=$shots  seed=$seed"
      # shellcheck disable=SC2046  # data_args is empty or two words
      if ! "$PYTHON" "$(entry_of "$dataset")" --config "configs/${dataset}.yaml" --shots "$shots" --seed "$seed" \
          $(data_args "$dataset") "$@"; then
        failed+=("$dataset shots=$shots seed=$seed")
      fi
    done
  done
done
report_failures
