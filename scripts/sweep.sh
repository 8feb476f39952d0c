#!/usr/bin/env bash
# Sweep RAFT over datasets × shots × seeds.
#
#   bash scripts/sweep.sh                                   # 10 datasets × shots 1 2 4 8 16 × seeds 1 2 3
#   bash scripts/sweep.sh oxford_pets                       # one dataset, 15 runs
#   bash scripts/sweep.sh "dtd eurosat" "4 16" "1 2" --train_views 10
#   DATASETS=imagenet SHOTS=16 bash scripts/sweep.sh
#   DATA=/data bash scripts/sweep.sh                        # every dataset under one root: /data/<its folder>
#   PYTHON=.venv/bin/python bash scripts/sweep.sh           # an interpreter that is not on PATH
#
# Positional arguments (or DATASETS, SHOTS, SEEDS) choose the grid; arguments starting with
# -- are config overrides passed to every run. A run whose results.json exists is skipped
# (by main.py; pass --force to redo). Val/test trunk features are cached under cache/ on the
# first run of a dataset and reused by every later run of the grid. A failed run does not
# stop the sweep: the failures are listed at the end and the exit code is non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

positional=()
while [[ $# -gt 0 && "$1" != --* ]]; do positional+=("$1"); shift; done
DATASETS="${positional[0]:-${DATASETS:-$ALL_COOP}}"
SHOTS="${positional[1]:-${SHOTS:-1 2 4 8 16}}"
SEEDS="${positional[2]:-${SEEDS:-1 2 3}}"

failed=()
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
